//! The domain core: what the agent knows and decides, in its own types. The gRPC API, the
//! metrics and the CLI read it; it reads none of them.

pub mod advise;
pub mod counters;
pub mod features;
pub mod latency;
pub mod policy;
pub mod service;
pub mod timewait;
