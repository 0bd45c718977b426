//! The `breakwater.v1` gRPC API. The code under `src/gen` is generated from `proto/` by the
//! `bootstrap` test and committed, so building needs no protoc.

pub mod v1 {
    #![allow(clippy::all)]
    include!("gen/breakwater.v1.rs");
}

/// The encoded `FileDescriptorSet` of the .proto files (with their imports and comments), as
/// gRPC server reflection serves it. Generated with the code and drift-checked like it.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/file_descriptor_set.bin");

/// Serde helpers for enum fields: prost stores them as `i32`, the JSON output names them
/// (`"outbound"`, `"active"`), without the proto's type prefix.
pub mod json {
    use serde::Serializer;

    use crate::v1::{
        BreakerCause, BreakerState, ConnectionEventKind, DestinationSort, Direction, FeatureStatus,
        Granularity, Owner, PressureLevel, Severity,
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

    pub fn feature_status<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match FeatureStatus::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "FEATURE_STATUS_")),
            Err(_) => s.serialize_i32(*v),
        }
    }

    /// "service" or "destination".
    pub fn granularity<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match Granularity::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "GRANULARITY_")),
            Err(_) => s.serialize_i32(*v),
        }
    }

    /// "local", "config", "fleet"; "unspecified" for none.
    pub fn owner<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match Owner::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "OWNER_")),
            Err(_) => s.serialize_i32(*v),
        }
    }

    pub fn connection_event_kind<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match ConnectionEventKind::try_from(*v) {
            Ok(d) => s.serialize_str(&short(d.as_str_name(), "CONNECTION_EVENT_KIND_")),
            Err(_) => s.serialize_i32(*v),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    /// Reflection resolves every service, method and message type from this set alone.
    #[test]
    fn descriptor_set_describes_the_agent_service() {
        let fds = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let file = fds
            .file
            .iter()
            .find(|f| f.name() == "breakwater/v1/agent.proto")
            .expect("agent.proto");
        assert_eq!(file.package(), "breakwater.v1");
        let agent = file.service.iter().find(|s| s.name() == "Agent").unwrap();
        assert!(agent.method.iter().any(|m| m.name() == "ListServices"));
        // Comments come along, so `grpcurl describe` shows them.
        assert!(file.source_code_info.is_some());
    }
}
