//! Small filesystem steps shared by every crate that recreates trees entry by entry (layer
//! extraction, build copies, storage migration): metadata, extended attributes, device nodes.
//! None of them follows symlinks.

use std::fs;
use std::io;
use std::os::unix::fs::{lchown, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// Sets owner, mode (not on symlinks, which have none) and modification time, in that order
/// (chown clears setuid bits, so the mode comes after it).
pub fn apply_meta(
    path: &Path,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: (i64, i64),
    symlink: bool,
) -> io::Result<()> {
    lchown(path, Some(uid), Some(gid))?;
    if !symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))?;
    }
    let t = TimeSpec::new(mtime.0, mtime.1);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

/// Gives `path` the owner, mode and modification time of `meta`.
pub fn set_meta(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    apply_meta(
        path,
        meta.uid(),
        meta.gid(),
        meta.mode(),
        (meta.mtime(), meta.mtime_nsec()),
        meta.file_type().is_symlink(),
    )
}

/// Copies every extended attribute of `src` to `dst`.
pub fn copy_xattrs(src: &Path, dst: &Path) -> io::Result<()> {
    for name in xattr::list(src)? {
        if let Some(v) = xattr::get(src, &name)? {
            xattr::set(dst, &name, &v)?;
        }
    }
    Ok(())
}

/// Makes a character device, block device or fifo at `dst` like the one `meta` describes;
/// `Ok(false)` when `meta` is none of those.
pub fn mknod_like(dst: &Path, meta: &fs::Metadata) -> io::Result<bool> {
    let ft = meta.file_type();
    let kind = if ft.is_char_device() {
        SFlag::S_IFCHR
    } else if ft.is_block_device() {
        SFlag::S_IFBLK
    } else if ft.is_fifo() {
        SFlag::S_IFIFO
    } else {
        return Ok(false);
    };
    mknod(
        dst,
        kind,
        Mode::from_bits_truncate(meta.mode() & 0o7777),
        meta.rdev(),
    )
    .map_err(io::Error::from)?;
    Ok(true)
}
