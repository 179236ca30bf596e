//! Strata's storage foundation: a containerd snapshotter with overlay2-style layered snapshots and
//! crash-safe metadata in RocksDB.
//!
//! - [`snapshots`]: containerd's snapshot semantics (prepare, view, commit, remove, ...), usable as
//!   a library (the build solver does) or over gRPC ([`service`], [`server`]).
//! - [`store`]: the metadata records, each change one atomic RocksDB write.
//! - [`layout`]: the directories and short links under the root.
//! - [`mounts`]: mount specs for a snapshot chain, and mounting them.
//! - [`filter`]: containerd's filter syntax for List/Walk.

pub mod activation;
pub mod config;
pub mod daemon;
pub mod error;
pub mod filter;
pub mod layout;
pub mod lazy;
pub mod metrics;
pub mod mounts;
pub mod reaper;
pub mod server;
pub mod service;
pub mod snapshots;
pub mod store;
pub mod upgrade;
pub mod usage;

pub use containerd_snapshots::api;
pub use error::{Error, Result};
pub use snapshots::{Options, Snapshot, Snapshots};
