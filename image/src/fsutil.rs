//! Small filesystem steps shared by every crate that recreates trees entry by entry (layer
//! extraction, build copies, storage migration): metadata, extended attributes, device nodes,
//! sparse copies, and paths resolved beneath a root. None of them follows symlinks.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{lchown, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// Everything an entry carries besides its content and type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    /// Seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// `None`: the same as `mtime`.
    pub atime: Option<(i64, i64)>,
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Attrs {
    /// The attributes of an existing entry, xattrs included.
    pub fn of(path: &Path, meta: &fs::Metadata) -> io::Result<Attrs> {
        Ok(Attrs {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            atime: Some((meta.atime(), meta.atime_nsec())),
            xattrs: xattrs(path)?,
        })
    }
}

/// Removes a file, link or directory tree at `path`; absent is fine.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Every extended attribute of `path` (not following a symlink), sorted by name.
pub fn xattrs(path: &Path) -> io::Result<Vec<(OsString, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in xattr::list(path)? {
        if let Some(v) = xattr::get(path, &name)? {
            out.push((name, v));
        }
    }
    out.sort();
    Ok(out)
}

/// Gives `path` the attributes `a`, in the one order that keeps them all: chown clears the
/// setuid/setgid bits and `security.capability`, so mode and xattrs come after it; times last.
pub fn restore(path: &Path, a: &Attrs, symlink: bool) -> io::Result<()> {
    lchown(path, Some(a.uid), Some(a.gid))?;
    if !symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(a.mode & 0o7777))?;
    }
    for (k, v) in &a.xattrs {
        xattr::set(path, k, v)?;
    }
    let m = TimeSpec::new(a.mtime.0, a.mtime.1);
    let at = a.atime.map_or(m, |(s, ns)| TimeSpec::new(s, ns));
    utimensat(None, path, &at, &m, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

/// Gives `dst` every attribute of `src` (whose metadata is `meta`): owner, mode, xattrs, times.
pub fn clone_attrs(src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
    restore(dst, &Attrs::of(src, meta)?, meta.file_type().is_symlink())
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

/// The block size below which runs of zeros are written as data rather than holes.
const HOLE: usize = 4096;

/// Copies `reader` into `out` (a new, empty file), leaving every all-zero 4 KiB block a hole, so
/// sparse files stay sparse (and zero-filled ones become so: the content reads the same).
pub fn write_sparse(mut reader: impl Read, out: &mut fs::File) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * HOLE];
    let (mut total, mut pending_hole) = (0u64, false);
    loop {
        let n = read_full(&mut reader, &mut buf)?;
        if n == 0 {
            break;
        }
        for block in buf[..n].chunks(HOLE) {
            if block.len() == HOLE && block.iter().all(|b| *b == 0) {
                out.seek(SeekFrom::Current(HOLE as i64))?;
                pending_hole = true;
            } else {
                out.write_all(block)?;
                pending_hole = false;
            }
        }
        total += n as u64;
    }
    if pending_hole {
        out.set_len(total)?; // a trailing hole: seeking alone does not extend the file
    }
    Ok(total)
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies the regular file `src` to the new file `dst` sparsely (see [`write_sparse`]).
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let from = fs::File::open(src)?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    write_sparse(from, &mut to)
}

/// Opens `rel` beneath the directory `root` without following any symlink on the way or at the
/// end, and without climbing out (`..`, absolute links, mount tricks are refused by the kernel):
/// the way to touch paths named by untrusted data (layer tars, tar-split, data roots).
pub fn open_beneath(root: &Path, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let dir = fs::File::open(root)?;
    open_beneath_fd(&dir, rel, flags)
}

/// [`open_beneath`] relative to an open directory.
pub fn open_beneath_fd(dir: &fs::File, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    if rel.components().any(|c| c == Component::ParentDir) {
        return Err(io::Error::other(format!(
            "{} climbs out with ..",
            rel.display()
        )));
    }
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    match openat2(dir.as_raw_fd(), rel, how) {
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(nix::Error::ELOOP) | Err(nix::Error::EXDEV) => Err(io::Error::other(format!(
            "{} passes through a symlink, which could lead outside its root",
            rel.display()
        ))),
        Err(e) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_become_holes_and_content_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 8 << 20];
        data[4 << 20] = 7;
        data[(8 << 20) - 10] = 9; // a partial last block is written as data
        let path = dir.path().join("f");
        let mut f = fs::File::create(&path).unwrap();
        assert_eq!(write_sparse(&data[..], &mut f).unwrap(), data.len() as u64);
        drop(f);
        assert_eq!(fs::read(&path).unwrap(), data);
        let m = fs::metadata(&path).unwrap();
        assert!(m.blocks() * 512 <= 64 * 1024, "{} blocks", m.blocks());

        let trailing = dir.path().join("t");
        let mut f = fs::File::create(&trailing).unwrap();
        write_sparse(&vec![0u8; 1 << 20][..], &mut f).unwrap();
        assert_eq!(fs::metadata(&trailing).unwrap().len(), 1 << 20);
        assert_eq!(fs::metadata(&trailing).unwrap().blocks(), 0);
    }

    #[test]
    fn paths_beneath_a_root_never_pass_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "s").unwrap();
        fs::create_dir(root.path().join("d")).unwrap();
        fs::write(root.path().join("d/f"), "f").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
        std::os::unix::fs::symlink("d", root.path().join("in")).unwrap();
        assert!(open_beneath(root.path(), Path::new("d/f"), OFlag::O_RDONLY).is_ok());
        for bad in ["out/secret", "in/f", "../x", "d/../../x"] {
            let e = open_beneath(root.path(), Path::new(bad), OFlag::O_RDONLY).unwrap_err();
            assert!(
                e.to_string().contains("symlink") || e.to_string().contains(".."),
                "{bad}: {e}"
            );
        }
        // The final component is not followed either.
        assert!(open_beneath(root.path(), Path::new("in"), OFlag::O_RDONLY).is_err());
    }

    #[test]
    fn capabilities_survive_the_owner_change() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bin");
        fs::write(&p, "x").unwrap();
        // cap_net_bind_service, permitted + effective (VFS_CAP_REVISION_2).
        let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let a = Attrs {
            uid: 1000,
            gid: 1000,
            mode: 0o4755,
            mtime: (1_614_834_367, 123_456_789),
            atime: None,
            xattrs: vec![("security.capability".into(), cap.to_vec())],
        };
        restore(&p, &a, false).unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (1000, 0o4755));
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_614_834_367, 123_456_789));
        assert_eq!(xattr::get(&p, "security.capability").unwrap().unwrap(), cap);
    }
}
