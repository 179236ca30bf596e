//! The changes between two full trees, written as an overlay diff directory: what `new` adds or
//! alters (entries copied with owner, mode, times and xattrs), and what it removes from `old` (0/0
//! character devices, overlay's whiteouts). Used where a driver keeps full filesystems per layer
//! (devicemapper) but overlay2 wants each layer's own changes.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use strata_image::fsutil::{clone_attrs, copy_sparse, mknod_like, xattrs};

fn same(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.file_type() == b.file_type()
        && a.mode() == b.mode()
        && a.uid() == b.uid()
        && a.gid() == b.gid()
        && (a.mtime(), a.mtime_nsec()) == (b.mtime(), b.mtime_nsec())
        && (a.is_dir() || (a.len() == b.len() && a.rdev() == b.rdev()))
}

/// Copies one entry (a whole directory tree for directories).
fn copy_entry(src: &Path, dst: &Path) -> std::io::Result<u64> {
    let m = fs::symlink_metadata(src)?;
    let ft = m.file_type();
    let mut bytes = 0;
    if ft.is_dir() {
        fs::create_dir(dst)?;
        for e in fs::read_dir(src)? {
            let e = e?;
            bytes += copy_entry(&e.path(), &dst.join(e.file_name()))?;
        }
    } else if ft.is_file() {
        bytes += copy_sparse(src, dst)?;
    } else if ft.is_symlink() {
        symlink(fs::read_link(src)?, dst)?;
    } else if !mknod_like(dst, &m)? {
        return Ok(0);
    }
    clone_attrs(src, dst, &m)?;
    Ok(bytes)
}

/// Writes the changes from `old` to `new` into `out` (which must exist). Returns bytes copied.
pub fn diff(new: &Path, old: &Path, out: &Path) -> std::io::Result<u64> {
    let mut bytes = 0;
    let mut names: Vec<_> = fs::read_dir(new)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in &names {
        let (n, o, d) = (new.join(name), old.join(name), out.join(name));
        let nm = fs::symlink_metadata(&n)?;
        match fs::symlink_metadata(&o) {
            Ok(om) if nm.is_dir() && om.is_dir() => {
                fs::create_dir(&d)?;
                bytes += diff(&n, &o, &d)?;
                let changed = !same(&nm, &om) || xattrs(&n)? != xattrs(&o)?;
                if changed || fs::read_dir(&d)?.next().is_some() {
                    clone_attrs(&n, &d, &nm)?;
                } else {
                    fs::remove_dir(&d)?;
                }
            }
            Ok(om) if same(&nm, &om) && xattrs(&n)? == xattrs(&o)? => {}
            Ok(om) if om.is_dir() => {
                // A directory replaced by something else: hide it, then add the new entry.
                bytes += copy_entry(&n, &d)?;
            }
            _ => bytes += copy_entry(&n, &d)?,
        }
    }
    for e in fs::read_dir(old)?.filter_map(|e| e.ok()) {
        let name = e.file_name();
        if fs::symlink_metadata(new.join(&name)).is_err() {
            mknod(
                &out.join(&name),
                SFlag::S_IFCHR,
                Mode::empty(),
                makedev(0, 0),
            )
            .map_err(std::io::Error::from)?;
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn changes_between_full_trees() {
        let (old, new, out) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        for root in [old.path(), new.path()] {
            fs::create_dir_all(root.join("etc/sub")).unwrap();
            fs::write(root.join("etc/same"), "x").unwrap();
            // The same times in both trees: created a clock tick apart (a loaded machine), the
            // directories would differ by their mtimes.
            let t = TimeSpec::new(1_600_000_000, 0);
            for p in ["etc/same", "etc/sub"] {
                utimensat(None, &root.join(p), &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
            }
        }
        fs::write(old.path().join("etc/gone"), "g").unwrap();
        fs::write(new.path().join("etc/added"), "a").unwrap();
        diff(new.path(), old.path(), out.path()).unwrap();
        assert!(out.path().join("etc/added").is_file());
        assert!(!out.path().join("etc/same").exists());
        assert!(
            !out.path().join("etc/sub").exists(),
            "unchanged directories are left out"
        );
        let m = fs::symlink_metadata(out.path().join("etc/gone")).unwrap();
        assert!(m.file_type().is_char_device() && m.rdev() == 0);
    }
}
