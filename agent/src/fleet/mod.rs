//! The fleet: desired state (services, policies, trips) shared through etcd, and each node's
//! breakers published there. See [`schema`] for the keys.

pub mod schema;
