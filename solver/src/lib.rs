//! Strata's build engine.
//!
//! - [`client`]: the client side of a build (what `strata build` runs): its context, secrets,
//!   agents and outputs stay with it; it reaches a builder in-process, on a unix socket or over ssh.
//! - [`service`]: the builder service (`strata serve`, or in-process) and its protocol.
//! - [`build`]: one build on the builder, from request to outputs.
//! - [`dockerfile`]: the Dockerfile frontend (parser → instructions → LLB).
//! - [`llb`]: the build graph, serialized deterministically; op digest = sha256 of its bytes.
//! - [`solver`]: the parallel scheduler with the content-addressed cache.
//! - [`worker`]: snapshots, images, and running ops (runc, file ops).
//! - [`export`]: image assembly and outputs.
//! - [`progress`]: BuildKit-style progress.
//! - [`secrets`]: `--secret` values, read with a cap and masked wherever output goes.

pub mod build;
pub mod client;
pub mod db;
pub mod dockerfile;
pub mod export;
pub mod form;
pub mod frontend;
pub mod gc;
pub mod keylock;
pub mod llb;
pub mod pattern;
pub mod progress;
pub mod remote_cache;
pub mod secrets;
pub mod service;
pub mod solver;
pub mod source;
pub mod spec;
pub mod volumes;
pub mod worker;
