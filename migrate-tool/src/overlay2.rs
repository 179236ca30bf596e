//! Writing overlay2 layers exactly as dockerd's overlay2 driver lays them out:
//! `overlay2/<id>/{diff, link, lower, work, committed}` and `overlay2/l/<26 chars> -> ../<id>/diff`,
//! `lower` as `l/A:l/B` (nearest parent first).

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{mknod, Mode, SFlag};
use rand::Rng;
use strata_image::fsutil::{clone_attrs, mknod_like};

/// A new short link name: 26 characters of A-Z and 0-9, as dockerd makes them.
pub fn link_name() -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..26)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// Writes `link`, `lower` (from the parents' link names, nearest first), `work` and, for image
/// layers, `committed` into the layer directory `dir` (whose `diff` is filled already).
pub fn finish_layer(
    dir: &Path,
    link: &str,
    parents: &[String],
    committed: bool,
) -> std::io::Result<()> {
    fs::write(dir.join("link"), link)?;
    if !parents.is_empty() {
        let lower: Vec<String> = parents.iter().map(|l| format!("l/{l}")).collect();
        fs::write(dir.join("lower"), lower.join(":"))?;
        fs::create_dir_all(dir.join("work"))?;
        fs::set_permissions(dir.join("work"), fs::Permissions::from_mode(0o700))?;
    }
    if committed {
        fs::write(dir.join("committed"), "")?;
    }
    fs::set_permissions(
        dir.join("diff"),
        fs::Permissions::from_mode(fs::metadata(dir.join("diff"))?.mode() & 0o7777),
    )
}

/// Recreates the tree `src` at `dst`: directories (with owner, mode, times, xattrs such as
/// `trusted.overlay.opaque`), regular files as hard links (no data copied), symlinks, and device
/// nodes (overlay whiteouts are char 0/0). An overlay upper directory has overlay2's diff format
/// already; an aufs branch (`aufs`) has its whiteouts converted: `.wh.<name>` becomes a 0/0 device,
/// `.wh..wh..opq` the opaque xattr, and aufs' own `.wh..wh.plnk|aufs|orph` are left out (a
/// pseudo-linked file is the same inode as its real path, which is linked).
pub fn link_tree(src: &Path, dst: &Path, aufs: bool) -> std::io::Result<u64> {
    let meta = fs::symlink_metadata(src)?;
    let mut entries = 0;
    if meta.is_dir() {
        if !dst.exists() {
            fs::create_dir(dst)?;
        }
        let mut opaque = false;
        for e in fs::read_dir(src)? {
            let e = e?;
            let name = e.file_name();
            let name_str = name.to_string_lossy();
            if aufs {
                if name_str == ".wh..wh..opq" {
                    opaque = true;
                    continue;
                }
                if name_str.starts_with(".wh..wh.") {
                    continue;
                }
                if let Some(hidden) = name_str.strip_prefix(".wh.") {
                    mknod(
                        &dst.join(hidden),
                        SFlag::S_IFCHR,
                        Mode::empty(),
                        nix::sys::stat::makedev(0, 0),
                    )
                    .map_err(std::io::Error::from)?;
                    entries += 1;
                    continue;
                }
            }
            entries += link_tree(&e.path(), &dst.join(&name), aufs)?;
        }
        if opaque {
            // clone_attrs adds the source's xattrs; the aufs marker became this one.
            xattr::set(dst, "trusted.overlay.opaque", b"y")?;
        }
        clone_attrs(src, dst, &meta)?;
        return Ok(entries + 1);
    }
    let ft = meta.file_type();
    if ft.is_file() {
        fs::hard_link(src, dst)?;
        return Ok(1);
    }
    if ft.is_symlink() {
        symlink(fs::read_link(src)?, dst)?;
    } else if !mknod_like(dst, &meta)? {
        return Ok(0); // sockets are not layer content
    }
    clone_attrs(src, dst, &meta)?;
    Ok(1)
}
