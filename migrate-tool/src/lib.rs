//! migrate-tool: moves a Docker data root off the removed storage drivers (aufs, overlay v1,
//! devicemapper) onto overlay2, verified and resumable.
//!
//! - [`dataroot`]: reading a data root as dockerd lays it out (layer store, images, containers).
//! - [`plan`]: what a migration would do and what stands in its way (read-only).
//! - [`migrate`]: building the overlay2 tree through a [`journal`] of steps, then the switch;
//!   [`tarsplit`] rebuilds each layer's original tar, [`devicemapper`] mounts thin devices
//!   (served by [`thin_device`]),
//!   [`changes`] diffs full filesystems, [`overlay2`] writes overlay2's layer directories.
//! - [`verify`]: every migrated layer checked against its tar; [`finish`]: cleanup or rollback.
//! - [`to_strata`] (feature `strata`): the migrated images imported into containerd on Strata.

pub mod changes;
pub mod dataroot;
pub mod devicemapper;
pub mod error;
pub mod finish;
pub mod journal;
pub mod migrate;
pub mod overlay2;
pub mod plan;
pub mod tarsplit;
pub mod thin_device;
#[cfg(feature = "strata")]
pub mod to_strata;
pub mod verify;
