//! After a migration: `cleanup` removes the old driver's data once `verify` has passed;
//! `rollback` undoes the migration while that data is still there.

use std::fs;
use std::path::Path;

use crate::dataroot::{DataRoot, Driver};
use crate::error::{io, MigrateError};
use crate::journal::{daemon_json_backup, write_atomic, TMP};
use crate::migrate::{container_config, set_driver};
use crate::verify::VERIFIED;

/// Removes the old driver's layers and store, and the migration's work directory. Refused
/// unless a verify has passed since the migration (a failing verify revokes its marker).
pub fn cleanup(data_root: &Path) -> Result<(), MigrateError> {
    let tmp = data_root.join(TMP);
    if !tmp.join(VERIFIED).exists() {
        return Err(MigrateError::Refused(
            "refusing to remove the old driver's data: run migrate-tool verify first (it must pass)".into(),
        ));
    }
    let legacy = [Driver::Aufs, Driver::Overlay, Driver::Devicemapper]
        .into_iter()
        .map(Driver::dir_name)
        .find(|d| data_root.join("image").join(d).is_dir())
        .unwrap_or("overlay");
    remove_dirs(&[
        data_root.join(legacy),
        data_root.join("image").join(legacy),
        tmp,
    ])
}

fn remove_dirs(dirs: &[std::path::PathBuf]) -> Result<(), MigrateError> {
    for d in dirs {
        if d.exists() {
            fs::remove_dir_all(d).map_err(io(format!("remove {}", d.display())))?;
        }
    }
    Ok(())
}

/// Undoes a migration: removes what it added and points containers and dockerd back to overlay.
pub fn rollback(data_root: &Path, daemon_json: &Path) -> Result<(), MigrateError> {
    let tmp = data_root.join(TMP);
    if !tmp.exists() {
        return Err(MigrateError::Refused(format!(
            "{}: no migration to roll back",
            data_root.display()
        )));
    }
    let legacy = [Driver::Aufs, Driver::Overlay, Driver::Devicemapper]
        .into_iter()
        .find_map(|d| DataRoot::open_driver(data_root, d).ok())
        .ok_or_else(|| MigrateError::Refused("the old driver's store is gone: cleanup already ran; rollback is no longer possible".into()))?;
    for c in &legacy.containers {
        set_driver(
            &container_config(data_root, &c.id),
            legacy.driver.dir_name(),
        )?;
    }
    let orig = daemon_json_backup(&tmp);
    if let Ok(bytes) = fs::read(&orig) {
        write_atomic(daemon_json, &bytes)?;
    }
    remove_dirs(&[
        data_root.join("image/overlay2"),
        data_root.join("overlay2"),
        tmp,
    ])
}
