//! Layer tars: applying one into a snapshot directory, and diffing an upper directory into one.
//!
//! Both convert whiteouts between the two forms: the OCI layer form (`.wh.<name>` files and
//! `.wh..wh..opq` markers) and the overlayfs form (character devices 0/0 and the
//! `trusted.overlay.opaque=y` xattr). Applying never writes outside the destination: names with
//! `..`, and entries that would pass through a symlink, are refused with an error naming the entry.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::fsutil;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR: &str = "SCHILY.xattr.";

/// Errors reading or writing a layer; each names the entry concerned.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer entry {entry:?} is unsafe: {reason}; the layer is refused")]
    Unsafe { entry: String, reason: &'static str },
    #[error("layer entry {entry:?}: {source}")]
    Entry {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("reading layer tar: {0}")]
    Read(#[source] io::Error),
}

fn entry_err(entry: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Entry {
        entry: entry.display().to_string(),
        source,
    }
}

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from(e)
}

/// The entry's path made relative and clean, or an error when it climbs out with `..`.
fn clean(raw: &Path) -> Result<PathBuf, LayerError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(LayerError::Unsafe {
                    entry: raw.display().to_string(),
                    reason: "it climbs out of the layer with ..",
                })
            }
            Component::Prefix(_) => unreachable!("no prefixes on unix"),
        }
    }
    Ok(out)
}

/// Makes sure every directory of `rel`'s parent exists under `root` as a real directory (never a
/// symlink, which could lead outside `root`).
fn ensure_parents(root: &Path, rel: &Path, entry: &Path) -> Result<(), LayerError> {
    let mut dir = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            dir.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(LayerError::Unsafe {
                        entry: entry.display().to_string(),
                        reason:
                            "its parent directory is a symlink, which could lead outside the layer",
                    })
                }
                Ok(_) => {
                    // A file (or whiteout) where a directory is needed: the layer replaces it.
                    fsutil::remove_tree(&dir).map_err(entry_err(entry))?;
                    fs::create_dir(&dir).map_err(entry_err(entry))?;
                }
                Err(_) => {
                    fs::create_dir(&dir).map_err(entry_err(entry))?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                        .map_err(entry_err(entry))?;
                }
            }
        }
    }
    Ok(())
}

fn remove_existing(path: &Path, entry: &Path) -> Result<(), LayerError> {
    fsutil::remove_tree(path).map_err(entry_err(entry))
}

/// A PAX time (`1614834367.123456789`, possibly negative) as seconds and nanoseconds.
fn pax_time(v: &str) -> Option<(i64, i64)> {
    let (neg, v) = v.strip_prefix('-').map_or((false, v), |r| (true, r));
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = secs.parse().ok()?;
    if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return frac
            .is_empty()
            .then_some((if neg { -secs } else { secs }, 0));
    }
    let digits = &frac[..frac.len().min(9)];
    let nanos: i64 = digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32);
    Some(if neg && nanos > 0 {
        (-secs - 1, 1_000_000_000 - nanos)
    } else {
        (if neg { -secs } else { secs }, nanos)
    })
}

/// The attributes a layer entry gives its file: owner, mode, times (PAX `mtime`/`atime` to the
/// nanosecond where present, else the header's whole seconds) and xattrs (`SCHILY.xattr.*`).
pub fn entry_attrs<R: Read>(e: &mut tar::Entry<'_, R>) -> io::Result<fsutil::Attrs> {
    let h = e.header();
    let mut a = fsutil::Attrs {
        uid: h.uid()? as u32,
        gid: h.gid()? as u32,
        mode: h.mode()?,
        mtime: (h.mtime()? as i64, 0),
        atime: None,
        xattrs: Vec::new(),
    };
    if let Some(exts) = e.pax_extensions()? {
        for x in exts {
            let x = x?;
            let Ok(key) = x.key() else { continue };
            if let Some(name) = key.strip_prefix(PAX_XATTR) {
                a.xattrs.push((name.into(), x.value_bytes().to_vec()));
            }
            let time = || x.value().ok().and_then(pax_time);
            match key {
                "mtime" => a.mtime = time().unwrap_or(a.mtime),
                "atime" => a.atime = time(),
                _ => {}
            }
        }
    }
    a.xattrs.sort();
    Ok(a)
}

/// What applying a layer did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Applies the (uncompressed) layer tar from `reader` into `dest`, a snapshot's own directory,
/// converting OCI whiteouts to overlay whiteouts.
pub fn apply(reader: impl Read, dest: &Path) -> Result<ApplyStats, LayerError> {
    unpack(reader, dest, true, None)
}

/// Like [`apply`], but regular files are hard links to the same paths under `files` (a tree that
/// already holds this layer's files with their metadata, as an overlay v1 or aufs layer does)
/// instead of copies: no file data is written, and the linked inodes are never modified.
pub fn apply_linked(
    reader: impl Read,
    dest: &Path,
    files: &Path,
) -> Result<ApplyStats, LayerError> {
    unpack(reader, dest, true, Some(files))
}

/// Extracts a plain tar archive (not a layer: `.wh.` names are ordinary files) into `dest`, with
/// the same refusal of entries that would escape it. Used by `ADD archive.tar /dir/`.
pub fn extract(reader: impl Read, dest: &Path) -> Result<ApplyStats, LayerError> {
    unpack(reader, dest, false, None)
}

fn unpack(
    reader: impl Read,
    dest: &Path,
    whiteouts: bool,
    link_from: Option<&Path>,
) -> Result<ApplyStats, LayerError> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = ApplyStats::default();
    let links = link_from
        .map(|p| fs::File::open(p).map_err(|e| entry_err(p)(e)))
        .transpose()?;
    let mut dirs: Vec<(PathBuf, fsutil::Attrs)> = Vec::new();
    for entry in archive.entries().map_err(LayerError::Read)? {
        let mut e = entry.map_err(LayerError::Read)?;
        let raw = e.path().map_err(LayerError::Read)?.into_owned();
        let rel = clean(&raw)?;
        stats.entries += 1;
        let Some(name) = rel.file_name().map(OsStr::to_owned) else {
            continue; // the layer root itself
        };
        ensure_parents(dest, &rel, &raw)?;
        let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
        if whiteouts && whiteout(&parent, name.as_bytes(), &raw)? {
            continue;
        }
        let path = dest.join(&rel);
        let attrs = entry_attrs(&mut e).map_err(LayerError::Read)?;
        let kind = e.header().entry_type();
        let placed = match (kind, &links) {
            (tar::EntryType::Directory, _) => {
                make_dir(&path, &raw)?;
                dirs.push((path, attrs));
                continue;
            }
            (tar::EntryType::Regular | tar::EntryType::Continuous, Some(files)) => {
                let size = e.header().size().map_err(LayerError::Read)?;
                link_source(files, &rel, size, &path, &raw)?;
                continue; // the source inode already carries the layer's metadata
            }
            (tar::EntryType::Link, _) => {
                hard_link_within(dest, &mut e, &path, &raw)?;
                continue; // the link shares the target's metadata
            }
            _ => place(&mut e, kind, &attrs, &path, &raw, &mut stats)?,
        };
        if placed {
            fsutil::restore(&path, &attrs, kind == tar::EntryType::Symlink)
                .map_err(entry_err(&raw))?;
        }
    }
    // Directories last, deepest first: adding children changed their mtimes.
    for (path, attrs) in dirs.iter().rev() {
        fsutil::restore(path, attrs, false).map_err(entry_err(path))?;
    }
    Ok(stats)
}

/// Turns an OCI whiteout named `name` in `parent` into overlay's form; false when it is none.
fn whiteout(parent: &Path, name: &[u8], raw: &Path) -> Result<bool, LayerError> {
    if name == OPAQUE.as_bytes() {
        xattr::set(parent, OPAQUE_XATTR, b"y").map_err(entry_err(raw))?;
        return Ok(true);
    }
    let Some(hidden) = name.strip_prefix(WHITEOUT.as_bytes()) else {
        return Ok(false);
    };
    if hidden.starts_with(WHITEOUT.as_bytes()) {
        return Ok(true); // aufs bookkeeping (.wh..wh.plnk and friends): not content
    }
    let target = parent.join(OsStr::from_bytes(hidden));
    remove_existing(&target, raw)?;
    mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
        .map_err(|e| entry_err(raw)(nix_err(e)))?;
    Ok(true)
}

fn make_dir(path: &Path, raw: &Path) -> Result<(), LayerError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            remove_existing(path, raw)?;
            fs::create_dir(path).map_err(entry_err(raw))
        }
        Err(_) => fs::create_dir(path).map_err(entry_err(raw)),
    }
}

/// Hard-links `path` to the regular file `rel` of `size` bytes under the open tree `files`,
/// resolved beneath it without following symlinks: a tree whose `dir/file` passes through a
/// symlink is refused, so nothing outside it is ever linked in.
fn link_source(
    files: &fs::File,
    rel: &Path,
    size: u64,
    path: &Path,
    raw: &Path,
) -> Result<(), LayerError> {
    use nix::fcntl::{AtFlags, OFlag};
    use std::os::fd::AsRawFd;
    let unsafe_source = |reason| LayerError::Unsafe {
        entry: raw.display().to_string(),
        reason,
    };
    let parent = rel.parent().unwrap_or(Path::new(""));
    let name = rel.file_name().unwrap_or_default();
    let dir = fsutil::open_beneath_fd(files, parent, OFlag::O_PATH | OFlag::O_DIRECTORY).map_err(
        |_| {
            unsafe_source("its directory in the source tree is missing or passes through a symlink")
        },
    )?;
    let st = nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW);
    match st {
        Ok(st)
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
                && st.st_size as u64 == size => {}
        _ => {
            return Err(unsafe_source(
                "the source tree has no regular file of this size at this path",
            ))
        }
    }
    remove_existing(path, raw)?;
    nix::unistd::linkat(
        Some(dir.as_raw_fd()),
        name,
        None,
        path.as_os_str(),
        AtFlags::empty(),
    )
    .map_err(|e| entry_err(raw)(nix_err(e)))
}

/// A hard link entry: to a regular file this layer already placed under `dest`.
fn hard_link_within<R: Read>(
    dest: &Path,
    e: &mut tar::Entry<'_, R>,
    path: &Path,
    raw: &Path,
) -> Result<(), LayerError> {
    let target = e.link_name().map_err(LayerError::Read)?.unwrap_or_default();
    let target_rel = clean(&target)?;
    ensure_parents(dest, &target_rel, raw)?;
    let source = dest.join(&target_rel);
    match fs::symlink_metadata(&source) {
        Ok(m) if m.is_file() => {}
        _ => {
            return Err(LayerError::Unsafe {
                entry: raw.display().to_string(),
                reason: "a hard link to something that is not a regular file of this layer",
            })
        }
    }
    remove_existing(path, raw)?;
    fs::hard_link(&source, path).map_err(entry_err(raw))
}

/// Writes a file, symlink or device entry at `path`; false for entries that carry no file.
fn place<R: Read>(
    e: &mut tar::Entry<'_, R>,
    kind: tar::EntryType,
    attrs: &fsutil::Attrs,
    path: &Path,
    raw: &Path,
    stats: &mut ApplyStats,
) -> Result<bool, LayerError> {
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            remove_existing(path, raw)?;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(entry_err(raw))?;
            stats.bytes += fsutil::write_sparse(e, &mut f).map_err(entry_err(raw))?;
        }
        tar::EntryType::Symlink => {
            let target =
                e.link_name()
                    .map_err(LayerError::Read)?
                    .ok_or_else(|| LayerError::Unsafe {
                        entry: raw.display().to_string(),
                        reason: "a symlink without a target",
                    })?;
            remove_existing(path, raw)?;
            symlink(&target, path).map_err(entry_err(raw))?;
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let h = e.header();
            let major = h.device_major().ok().flatten().unwrap_or(0) as u64;
            let minor = h.device_minor().ok().flatten().unwrap_or(0) as u64;
            let flag = match kind {
                tar::EntryType::Char => SFlag::S_IFCHR,
                tar::EntryType::Block => SFlag::S_IFBLK,
                _ => SFlag::S_IFIFO,
            };
            remove_existing(path, raw)?;
            mknod(
                path,
                flag,
                Mode::from_bits_truncate(attrs.mode & 0o777),
                makedev(major, minor),
            )
            .map_err(|e| entry_err(raw)(nix_err(e)))?;
        }
        _ => return Ok(false), // pax/gnu headers are consumed by the reader; others carry no files
    }
    Ok(true)
}

/// Options of [`diff`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DiffOptions {
    /// Clamp every mtime to at most this (SOURCE_DATE_EPOCH), for reproducible layers.
    pub mtime_max: Option<u64>,
}

/// Writes the changes recorded in overlay upper directory `upper` as an OCI layer tar: entries in
/// sorted order, overlay whiteouts as `.wh.` files, opaque directories with `.wh..wh..opq`, hard
/// links within the layer as link entries. Reads only the upper directory, never the merged tree.
pub fn diff(upper: &Path, out: impl Write, opts: DiffOptions) -> io::Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    diff_dir(upper, Path::new(""), &mut tar, &mut links, opts)?;
    tar.finish()
}

fn header_for(meta: &fs::Metadata, kind: tar::EntryType, opts: DiffOptions) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(meta.uid() as u64);
    h.set_gid(meta.gid() as u64);
    let mtime = meta.mtime().max(0) as u64;
    h.set_mtime(opts.mtime_max.map_or(mtime, |m| mtime.min(m)));
    h.set_size(0);
    h
}

fn write_xattrs<W: Write>(tar: &mut tar::Builder<W>, path: &Path) -> io::Result<()> {
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    for name in xattr::list(path)? {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("trusted.overlay.") {
            continue; // overlay's own bookkeeping, expressed as whiteouts instead
        }
        if let Some(value) = xattr::get(path, &name)? {
            pax.push((format!("{PAX_XATTR}{name}"), value));
        }
    }
    if !pax.is_empty() {
        pax.sort();
        tar.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    Ok(())
}

fn diff_dir<W: Write>(
    root: &Path,
    rel: &Path,
    tar: &mut tar::Builder<W>,
    links: &mut HashMap<(u64, u64), PathBuf>,
    opts: DiffOptions,
) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let rel_path = rel.join(&name);
        let path = root.join(&rel_path);
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            let mut wh_name = std::ffi::OsString::from(WHITEOUT);
            wh_name.push(&name);
            let mut h = header_for(&meta, tar::EntryType::Regular, opts);
            h.set_mode(0o600);
            tar.append_data(&mut h, rel.join(wh_name), io::empty())?;
        } else if ft.is_dir() {
            write_xattrs(tar, &path)?;
            let mut h = header_for(&meta, tar::EntryType::Directory, opts);
            tar.append_data(&mut h, &rel_path, io::empty())?;
            if xattr::get(&path, OPAQUE_XATTR)?.as_deref() == Some(b"y") {
                let mut h = header_for(&meta, tar::EntryType::Regular, opts);
                h.set_mode(0o600);
                tar.append_data(&mut h, rel_path.join(OPAQUE), io::empty())?;
            }
            diff_dir(root, &rel_path, tar, links, opts)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                    let mut h = header_for(&meta, tar::EntryType::Link, opts);
                    tar.append_link(&mut h, &rel_path, first)?;
                    continue;
                }
                links.insert((meta.dev(), meta.ino()), rel_path.clone());
            }
            write_xattrs(tar, &path)?;
            let mut h = header_for(&meta, tar::EntryType::Regular, opts);
            h.set_size(meta.len());
            tar.append_data(&mut h, &rel_path, fs::File::open(&path)?)?;
        } else if ft.is_symlink() {
            let mut h = header_for(&meta, tar::EntryType::Symlink, opts);
            tar.append_link(&mut h, &rel_path, fs::read_link(&path)?)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            let mut h = header_for(&meta, kind, opts);
            let rdev = meta.rdev();
            h.set_device_major(nix::sys::stat::major(rdev) as u32)?;
            h.set_device_minor(nix::sys::stat::minor(rdev) as u32)?;
            tar.append_data(&mut h, &rel_path, io::empty())?;
        }
        // Sockets cannot be represented in a tar and are not part of a layer.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn add(
        b: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        path: &str,
        link: &str,
        data: &[u8],
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        if path.contains("..") || link.contains("..") {
            // The tar crate refuses to write such names; hostile archives have them anyway.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            b.append(&h, data).unwrap();
        } else if link.is_empty() {
            b.append_data(&mut h, path, data).unwrap();
        } else {
            b.append_link(&mut h, path, link).unwrap();
        }
    }

    fn is_whiteout(p: &Path) -> bool {
        let m = fs::symlink_metadata(p).unwrap();
        m.file_type().is_char_device() && m.rdev() == 0
    }

    #[test]
    fn whiteouts_round_trip_between_oci_and_overlay_forms() {
        let layer = tar_of(|b| {
            add(b, tar::EntryType::Directory, "etc/", "", b"");
            add(b, tar::EntryType::Regular, "etc/.wh.motd", "", b"");
            add(b, tar::EntryType::Directory, "opt/", "", b"");
            add(b, tar::EntryType::Regular, "opt/.wh..wh..opq", "", b"");
            add(b, tar::EntryType::Regular, "opt/new", "", b"new");
            add(b, tar::EntryType::Link, "opt/linked", "opt/new", b"");
            add(b, tar::EntryType::Symlink, "opt/sym", "/etc/passwd", b"");
        });
        let dir = tempfile::tempdir().unwrap();
        apply(&layer[..], dir.path()).unwrap();
        assert!(is_whiteout(&dir.path().join("etc/motd")));
        assert_eq!(
            xattr::get(dir.path().join("opt"), OPAQUE_XATTR)
                .unwrap()
                .as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(fs::read(dir.path().join("opt/linked")).unwrap(), b"new");
        assert_eq!(
            fs::read_link(dir.path().join("opt/sym")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            fs::metadata(dir.path().join("opt/new")).unwrap().mtime(),
            1_600_000_000
        );

        let mut out = Vec::new();
        diff(dir.path(), &mut out, DiffOptions::default()).unwrap();
        let mut names = Vec::new();
        let mut archive = tar::Archive::new(&out[..]);
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            names.push((
                e.path().unwrap().display().to_string(),
                e.header().entry_type(),
            ));
        }
        let want = [
            ("etc", tar::EntryType::Directory),
            ("etc/.wh.motd", tar::EntryType::Regular),
            ("opt", tar::EntryType::Directory),
            ("opt/.wh..wh..opq", tar::EntryType::Regular),
            ("opt/linked", tar::EntryType::Regular),
            ("opt/new", tar::EntryType::Link),
            ("opt/sym", tar::EntryType::Symlink),
        ];
        let got: Vec<(&str, tar::EntryType)> =
            names.iter().map(|(n, k)| (n.as_str(), *k)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn nanosecond_times_capabilities_owners_and_holes_survive_apply() {
        let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut data = vec![0u8; 1 << 20];
        data[512 << 10] = 1;
        let layer = tar_of(|b| {
            b.append_pax_extensions([
                ("mtime", &b"1614834367.123456789"[..]),
                ("atime", &b"1614834300.5"[..]),
                ("SCHILY.xattr.security.capability", &cap[..]),
            ])
            .unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o4755);
            h.set_uid(1234);
            h.set_gid(5678);
            h.set_mtime(1614834367);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, "bin", &data[..]).unwrap();
            b.append_pax_extensions([("mtime", &b"1614834368.000000001"[..])])
                .unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o1777);
            h.set_mtime(1614834368);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, "tmp/", io::empty()).unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        apply(&layer[..], dir.path()).unwrap();
        let bin = dir.path().join("bin");
        let m = fs::metadata(&bin).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 5678, 0o4755));
        assert_eq!((m.mtime(), m.mtime_nsec()), (1614834367, 123456789));
        assert_eq!((m.atime(), m.atime_nsec()), (1614834300, 500000000));
        assert_eq!(
            xattr::get(&bin, "security.capability").unwrap().unwrap(),
            cap
        );
        assert_eq!(fs::read(&bin).unwrap(), data);
        assert!(
            m.blocks() * 512 <= 16 << 10,
            "{} blocks: not sparse",
            m.blocks()
        );
        let t = fs::metadata(dir.path().join("tmp")).unwrap();
        assert_eq!(
            (t.mtime(), t.mtime_nsec(), t.mode() & 0o7777),
            (1614834368, 1, 0o1777)
        );
    }

    #[test]
    fn pax_times_parse_to_the_nanosecond() {
        assert_eq!(pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(pax_time("12"), Some((12, 0)));
        assert_eq!(pax_time("1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(pax_time("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(pax_time("x"), None);
        assert_eq!(pax_time("1.x"), None);
    }

    #[test]
    fn hostile_layers_are_refused_and_write_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        let escapes = [
            tar_of(|b| add(b, tar::EntryType::Regular, "../../escaped", "", b"x")),
            tar_of(|b| {
                add(
                    b,
                    tar::EntryType::Symlink,
                    "evil",
                    outside.path().to_str().unwrap(),
                    b"",
                );
                add(b, tar::EntryType::Regular, "evil/victim", "", b"x");
            }),
            tar_of(|b| add(b, tar::EntryType::Link, "hard", "../../etc/passwd", b"")),
        ];
        for (i, layer) in escapes.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let sub = dir.path().join("a/b");
            fs::create_dir_all(&sub).unwrap();
            let err = apply(&layer[..], &sub).unwrap_err();
            assert!(matches!(err, LayerError::Unsafe { .. }), "case {i}: {err}");
            assert!(err.to_string().contains("refused"), "{err}");
            assert!(!target.exists());
            assert!(!dir.path().join("escaped").exists());
        }
    }

    #[test]
    fn diff_clamps_mtimes_for_reproducible_layers() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "x").unwrap();
        let mut a = Vec::new();
        diff(dir.path(), &mut a, DiffOptions { mtime_max: Some(1) }).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        fs::write(dir.path().join("f"), "x").unwrap();
        let mut b = Vec::new();
        diff(dir.path(), &mut b, DiffOptions { mtime_max: Some(1) }).unwrap();
        assert_eq!(a, b);
    }
}
