//! File ops (mkdir, mkfile, copy) applied to a mounted container root, with Docker's COPY rules.

use std::fs;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::path::Path;

use super::tree::{self, Attrs, Source};
use super::{rootfs, WorkerError};
use crate::llb;
use crate::pattern;

fn owner(root: &Path, opt: &Option<llb::ChownOpt>) -> Result<Option<(u32, u32)>, WorkerError> {
    match opt {
        None => Ok(None),
        Some(o) => rootfs::user(root, &o.user)
            .map(Some)
            .map_err(WorkerError::Copy),
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> WorkerError {
    move |e| WorkerError::Copy(format!("{what}: {e}"))
}

/// Extracts `src` into directory `dest` when it is a tar archive (plain or gzip); false when it
/// is not an archive (ADD then copies it as a file).
fn unpack_archive(
    root: &Path,
    src: &Path,
    dest: &str,
    owner: (u32, u32),
) -> Result<bool, WorkerError> {
    let mut head = [0u8; 262];
    let n = {
        let mut f = fs::File::open(src).map_err(io(format!("open {}", src.display())))?;
        std::io::Read::read(&mut f, &mut head).map_err(io(format!("read {}", src.display())))?
    };
    let gzip = n >= 2 && head[..2] == [0x1f, 0x8b];
    let is_tar = |h: &[u8]| h.len() >= 262 && &h[257..262] == b"ustar";
    let tar = if gzip {
        // A gzip file is an archive only when what it holds is a tar.
        let f = fs::File::open(src).map_err(io(format!("open {}", src.display())))?;
        let mut inner = Vec::with_capacity(262);
        let _ = std::io::Read::read_to_end(
            &mut std::io::Read::take(flate2::read::MultiGzDecoder::new(f), 262),
            &mut inner,
        );
        is_tar(&inner)
    } else {
        is_tar(&head[..n])
    };
    if !tar {
        return Ok(false);
    }
    let f = fs::File::open(src).map_err(io(format!("open {}", src.display())))?;
    let reader: Box<dyn std::io::Read> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let dst = rootfs::resolve(root, dest, true).map_err(io(format!("resolve {dest}")))?;
    tree::mkdir_all(&dst, owner).map_err(io(format!("create {dest}")))?;
    strata_image::layer::extract(reader, &dst)
        .map_err(|e| WorkerError::Copy(format!("ADD {}: {e}", src.display())))?;
    Ok(true)
}

pub fn mkdir(root: &Path, a: &llb::FileActionMkDir) -> Result<(), WorkerError> {
    let own = owner(root, &a.owner)?.unwrap_or((0, 0));
    let path = rootfs::resolve(root, &a.path, true).map_err(io(format!("mkdir {}", a.path)))?;
    if path.is_dir() {
        return Ok(());
    }
    if a.make_parents {
        tree::mkdir_all(&path, own).map_err(io(format!("mkdir {}", a.path)))?;
    } else {
        fs::create_dir(&path).map_err(io(format!("mkdir {}", a.path)))?;
        lchown(&path, Some(own.0), Some(own.1)).map_err(io(format!("chown {}", a.path)))?;
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(a.mode as u32 & 0o7777))
        .map_err(io(format!("chmod {}", a.path)))
}

/// ADD of a remote file: `data` written at `dest` (or `dest/name` for a directory), mode 0600
/// unless --chmod, as Docker does.
pub fn add_remote(
    root: &Path,
    data: &Path,
    name: &str,
    a: &llb::FileActionCopy,
) -> Result<(), WorkerError> {
    let own = owner(root, &a.owner)?.unwrap_or((0, 0));
    let dest = if a.dest.ends_with('/')
        || rootfs::resolve(root, &a.dest, true).is_ok_and(|p| p.is_dir())
    {
        format!("{}/{name}", a.dest.trim_end_matches('/'))
    } else {
        a.dest.clone()
    };
    let dst = rootfs::resolve(root, &dest, false).map_err(io(format!("resolve {dest}")))?;
    if let Some(parent) = dst.parent() {
        tree::mkdir_all(parent, own).map_err(io(format!("create parent of {dest}")))?;
    }
    fs::copy(data, &dst).map_err(io(format!("write {dest}")))?;
    lchown(&dst, Some(own.0), Some(own.1)).map_err(io(format!("chown {dest}")))?;
    let mode = if a.mode >= 0 { a.mode as u32 } else { 0o600 };
    fs::set_permissions(&dst, fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {dest}")))
}

pub fn mkfile(root: &Path, a: &llb::FileActionMkFile) -> Result<(), WorkerError> {
    let own = owner(root, &a.owner)?.unwrap_or((0, 0));
    let path = rootfs::resolve(root, &a.path, true).map_err(io(format!("create {}", a.path)))?;
    if let Some(parent) = path.parent() {
        tree::mkdir_all(parent, own).map_err(io(format!("create parent of {}", a.path)))?;
    }
    fs::write(&path, &a.data).map_err(io(format!("write {}", a.path)))?;
    lchown(&path, Some(own.0), Some(own.1)).map_err(io(format!("chown {}", a.path)))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(a.mode as u32 & 0o7777))
        .map_err(io(format!("chmod {}", a.path)))
}

/// COPY `a.src` from `source` into `root` at `a.dest`. Context copies are owned by root unless
/// `--chown` says otherwise; copies from stages keep their owners.
pub fn copy(
    root: &Path,
    source: &Source,
    from_context: bool,
    a: &llb::FileActionCopy,
) -> Result<(), WorkerError> {
    let attrs = Attrs {
        owner: owner(root, &a.owner)?.or(if from_context { Some((0, 0)) } else { None }),
        mode: (a.mode >= 0).then_some(a.mode as u32),
    };
    let matches = source
        .select(&a.src)
        .map_err(io(format!("read {}", a.src)))?;
    let shown = a.src.trim_start_matches('/');
    if matches.is_empty() {
        if a.allow_empty_wildcard && pattern::has_wildcard(&a.src) {
            return Ok(());
        }
        let where_ = if from_context {
            "build context (or excluded by .dockerignore)"
        } else {
            "source stage"
        };
        return Err(WorkerError::Copy(format!(
            "{shown}: not found in the {where_}"
        )));
    }
    let dest_is_dir = a.dest.ends_with('/')
        || matches.len() > 1
        || rootfs::resolve(root, &a.dest, true).is_ok_and(|p| p.is_dir());
    let parent_owner = attrs.owner.unwrap_or((0, 0));
    for rel in matches {
        let src = rootfs::resolve(source.root, &rel, a.follow_symlink)
            .map_err(io(format!("resolve {rel}")))?;
        let meta = match fs::symlink_metadata(&src) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let where_ = if from_context {
                    "build context"
                } else {
                    "source stage"
                };
                return Err(WorkerError::Copy(format!("{rel}: not found in the {where_}: it is a symlink whose target is missing or outside it")));
            }
            Err(e) => return Err(io(format!("stat {rel}"))(e)),
        };
        if meta.is_dir() && a.dir_copy_contents {
            // A directory's contents go into the destination directory.
            let dst =
                rootfs::resolve(root, &a.dest, true).map_err(io(format!("resolve {}", a.dest)))?;
            tree::mkdir_all(&dst, parent_owner).map_err(io(format!("create {}", a.dest)))?;
            let names: Vec<_> = fs::read_dir(&src)
                .map_err(io(format!("read {rel}")))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect();
            for n in names {
                let child_rel = if rel.is_empty() {
                    n.to_string_lossy().into_owned()
                } else {
                    format!("{rel}/{}", n.to_string_lossy())
                };
                if source.ignore.is_some_and(|i| i.excludes(&child_rel)) {
                    continue;
                }
                tree::copy(source, &src.join(&n), &child_rel, &dst.join(&n), attrs)
                    .map_err(io(format!("copy {child_rel}")))?;
            }
        } else if a.attempt_unpack
            && meta.is_file()
            && unpack_archive(root, &src, &a.dest, parent_owner)?
        {
            // ADD extracted it.
        } else {
            let dest = if dest_is_dir {
                let name = Path::new(&rel)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{}/{name}", a.dest.trim_end_matches('/'))
            } else {
                a.dest.clone()
            };
            let dst = rootfs::resolve(root, &dest, false).map_err(io(format!("resolve {dest}")))?;
            if let Some(parent) = dst.parent() {
                if a.create_dest_path {
                    tree::mkdir_all(parent, parent_owner)
                        .map_err(io(format!("create parent of {dest}")))?;
                }
            }
            tree::copy(source, &src, &rel, &dst, attrs)
                .map_err(io(format!("copy {rel} to {dest}")))?;
        }
    }
    Ok(())
}
