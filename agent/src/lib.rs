//! breakwater's node agent: loader, domain core, gRPC server and CLI.

pub mod api;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod destroy;
pub mod ebpf;
pub mod error;
pub mod fleet;
pub mod metrics;
pub mod netns;
pub mod tls;
