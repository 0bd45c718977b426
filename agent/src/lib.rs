//! breakwater's node agent: loader, domain core, gRPC server and CLI.

pub mod advise;
pub mod api;
pub mod breaker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod destroy;
pub mod ebpf;
pub mod error;
pub mod features;
pub mod latency;
pub mod metrics;
pub mod netns;
pub mod service;
pub mod timewait;
