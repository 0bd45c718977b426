//! The `breakwater.v1` gRPC API. The code under `src/gen` is generated from `proto/` by the
//! `bootstrap` test and committed, so building needs no protoc.

pub mod v1 {
    #![allow(clippy::all)]
    include!("gen/breakwater.v1.rs");
}

/// Serde helpers for enum fields: prost stores them as `i32`, the JSON output names them
/// (`"outbound"`, `"active"`), without the proto's type prefix.
pub mod json {
    use serde::Serializer;

    use crate::v1::{
        BreakerCause, BreakerState, DestinationSort, Direction, PressureLevel, Severity,
    };

    fn short(full: &str, prefix: &str) -> String {
        full.strip_prefix(prefix)
            .unwrap_or(full)
            .to_ascii_lowercase()
    }

    pub fn direction<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match Direction::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "DIRECTION_")),
            Err(_) => s.serialize_i32(*v),
        }
    }

    pub fn destination_sort<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match DestinationSort::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "DESTINATION_SORT_")),
            Err(_) => s.serialize_i32(*v),
        }
    }

    pub fn pressure_level<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match PressureLevel::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "PRESSURE_LEVEL_")),
            Err(_) => s.serialize_i32(*v),
        }
    }

    pub fn severity<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match Severity::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "SEVERITY_")),
            Err(_) => s.serialize_i32(*v),
        }
    }

    pub fn breaker_state<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match BreakerState::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "BREAKER_STATE_")),
            Err(_) => s.serialize_i32(*v),
        }
    }

    pub fn breaker_cause<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match BreakerCause::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "BREAKER_CAUSE_")),
            Err(_) => s.serialize_i32(*v),
        }
    }
}
