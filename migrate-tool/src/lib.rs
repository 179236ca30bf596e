//! migrate-tool: moves a Docker data root off the removed storage drivers (aufs, overlay v1,
//! devicemapper) onto overlay2, verified and resumable.
//!
//! - [`dataroot`]: reading a data root as dockerd lays it out (layer store, images, containers).
//! - [`plan`]: what a migration would do and what stands in its way (read-only).

pub mod changes;
pub mod dataroot;
pub mod devicemapper;
pub mod migrate;
pub mod overlay2;
pub mod plan;
pub mod tarsplit;
#[cfg(feature = "strata")]
pub mod to_strata;
pub mod verify;
