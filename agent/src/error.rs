//! Domain errors. Their one mapping to gRPC status codes is `api`'s `From<Error> for Status`.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's input is wrong; nothing was changed.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this (a change by an identity not on the writers' allow-list);
    /// nothing was changed.
    #[error("{0}")]
    PermissionDenied(String),
    /// A configured capacity (map size) would be exceeded; nothing was changed.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The call needs a feature that this kernel does not offer (see `crate::core::features`).
    #[error("{0}")]
    FeatureOff(String),
    /// Another source owns the object (the fleet, for a change through the local API); nothing
    /// was changed.
    #[error("{0}")]
    Owned(String),
    #[error("kernel map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    pub fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| Self::Map { map, source }
    }

    /// A map that could not be mapped into memory (`ebpf::mapped`).
    pub fn mmap(map: &'static str, io_error: std::io::Error) -> Self {
        Self::Map {
            map,
            source: aya::sys::SyscallError {
                call: "mmap",
                io_error,
            }
            .into(),
        }
    }
}

/// An error and its sources on one line, each said once ("a: b: c").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
