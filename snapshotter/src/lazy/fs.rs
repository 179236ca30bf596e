//! The read-only FUSE filesystem of one lazy layer, served by its own process
//! (`strata-snapshotter serve-layer`) so that it outlives restarts of the daemon. Metadata comes
//! from the TOC index; reads get exactly the chunks they touch from [`Fetcher`], off the session
//! thread. The first mount of a layer records the order files are opened in; later mounts
//! prefetch in that order.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tracing::info;

use super::cache::ChunkCache;
use super::fetch::{background_fetch, Fetcher};
use super::index::{Kind, Node};
use super::nodes::Nodes;
use super::LayerSpec;
use crate::chunked::toc::Chunk;

/// The layer is immutable: the kernel may keep attributes and pages for as long as it likes.
const TTL: Duration = Duration::from_secs(3600);

/// Records the order in which files are first opened, for the prefetch of later mounts.
struct Recorder {
    file: Option<Mutex<std::fs::File>>,
    seen: Mutex<HashSet<u64>>,
}

impl Recorder {
    fn opened(&self, ino: u64, path: &str) {
        let Some(f) = &self.file else { return };
        if self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ino)
        {
            let _ = writeln!(f.lock().unwrap_or_else(|p| p.into_inner()), "{path}");
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

pub struct LazyFs {
    index: Arc<Nodes>,
    fetcher: Arc<Fetcher>,
    recorder: Recorder,
    jobs: mpsc::Sender<Job>,
}

fn to_system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH
    }
}

fn attr(ino: u64, n: &Node) -> FileAttr {
    let kind = match n.kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Char => FileType::CharDevice,
        Kind::Block => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    };
    let t = to_system_time(n.mtime);
    FileAttr {
        ino,
        size: n.size,
        blocks: n.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind,
        perm: (n.mode & 0o7777) as u16,
        nlink: n.nlink,
        uid: n.uid,
        gid: n.gid,
        rdev: n.rdev,
        blksize: 4096,
        flags: 0,
    }
}

impl LazyFs {
    pub fn new(
        index: Arc<Nodes>,
        fetcher: Arc<Fetcher>,
        record_to: Option<PathBuf>,
        workers: usize,
    ) -> LazyFs {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let rx = rx.clone();
            std::thread::spawn(move || loop {
                let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(j) => j,
                    Err(_) => return,
                };
                job();
            });
        }
        LazyFs {
            index,
            fetcher,
            recorder: Recorder {
                file: record_to.and_then(|p| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .ok()
                        .map(Mutex::new)
                }),
                seen: Mutex::new(HashSet::new()),
            },
            jobs: tx,
        }
    }
}

/// Bytes `offset..offset+size` of a file with `chunks`.
fn read_range(
    fetcher: &Fetcher,
    chunks: &[Chunk],
    file_size: u64,
    offset: u64,
    size: u64,
) -> Result<Vec<u8>, String> {
    let end = (offset + size).min(file_size);
    let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
    for c in chunks {
        let (cs, ce) = (c.file_offset, c.file_offset + c.size);
        if ce <= offset || cs >= end {
            continue;
        }
        let data = fetcher.chunk(c)?;
        let from = offset.max(cs) - cs;
        let to = end.min(ce) - cs;
        out.extend_from_slice(&data[from as usize..to as usize]);
    }
    Ok(out)
}

impl Filesystem for LazyFs {
    fn init(
        &mut self,
        _req: &Request<'_>,
        config: &mut fuser::KernelConfig,
    ) -> Result<(), libc::c_int> {
        // Reads are answered from worker threads: let the kernel keep many in flight.
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = name
            .to_str()
            .and_then(|name| self.index.child(parent, name))
            .and_then(|ino| Some((ino, self.index.node(ino)?)));
        match found {
            Some((ino, n)) => reply.entry(&TTL, &attr(ino, &n), 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.index.node(ino) {
            Some(n) => reply.attr(&TTL, &attr(ino, &n)),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.index.node(ino) {
            Some(n) if n.kind == Kind::Symlink => reply.data(n.link.as_bytes()),
            Some(_) => reply.error(libc::EINVAL),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        match self.index.node(ino) {
            Some(n) => {
                if n.kind == Kind::File {
                    self.recorder.opened(ino, &n.path);
                }
                reply.opened(0, fuser::consts::FOPEN_KEEP_CACHE)
            }
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let (index, fetcher) = (self.index.clone(), self.fetcher.clone());
        // Fetching may take a round trip: off the session thread, so other requests go on.
        let job = Box::new(move || {
            let Some(n) = index.node(ino) else {
                return reply.error(libc::ENOENT);
            };
            match read_range(
                &fetcher,
                &n.chunks,
                n.size,
                offset.max(0) as u64,
                size as u64,
            ) {
                Ok(data) => reply.data(&data),
                Err(_) => reply.error(libc::EIO),
            }
        });
        if let Err(e) = self.jobs.send(job) {
            (e.0)();
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = self.index.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        // Position 0 is ".", 1 is "..", 2.. the children by name; `offset` is where to go on.
        let children = self.index.children(ino);
        for pos in offset.max(0) as usize..children.len() + 2 {
            let (child, kind, name) = match pos {
                0 => (ino, FileType::Directory, "."),
                1 => (n.parent, FileType::Directory, ".."),
                _ => {
                    let (name, child) = &children[pos - 2];
                    let Some(c) = self.index.node(*child) else {
                        continue;
                    };
                    (*child, attr(*child, &c).kind, name.as_str())
                }
            };
            if reply.add(child, (pos + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let Some(n) = self.index.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        let name = name.to_string_lossy();
        let value: Option<Vec<u8>> = if n.opaque && name == "trusted.overlay.opaque" {
            Some(b"y".to_vec())
        } else {
            n.xattrs.get(name.as_ref()).cloned()
        };
        match value {
            None => reply.error(libc::ENODATA),
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if v.len() > size as usize => reply.error(libc::ERANGE),
            Some(v) => reply.data(&v),
        }
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let Some(n) = self.index.node(ino) else {
            return reply.error(libc::ENOENT);
        };
        let mut list = Vec::new();
        for k in n.xattrs.keys() {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(libc::ERANGE)
        } else {
            reply.data(&list)
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let blocks = self.index.total_bytes.div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.index.count, 0, 4096, 255, 4096);
    }
}

/// Mounts the layer described in `state` at `mountpoint` and serves it until unmounted.
pub fn serve(state: &Path, mountpoint: &Path) -> anyhow::Result<()> {
    let spec = LayerSpec::load(state)?;
    let index = Arc::new(Nodes::open_or_build(&state.join("index"), || {
        super::load_toc(state)
    })?);
    let cache = ChunkCache::open(&spec.cache_dir, spec.cache_max_bytes)?;
    let fetcher = Arc::new(Fetcher::new(&spec, cache, state)?);
    fetcher
        .stats
        .total_bytes
        .store(spec.size, Ordering::Relaxed);
    let access = super::access_log(&spec);
    // The first mount of a layer records; later mounts replay that order.
    let order: Vec<String> = std::fs::read_to_string(&access)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default();
    let record_to = order.is_empty().then(|| access.clone());
    let fs = LazyFs::new(
        index.clone(),
        fetcher.clone(),
        record_to,
        spec.fetch_concurrency.max(4),
    );
    let stop = Arc::new(AtomicBool::new(false));
    if spec.background_fetch {
        let (i, f, s, n) = (
            index.clone(),
            fetcher.clone(),
            stop.clone(),
            spec.fetch_concurrency,
        );
        std::thread::spawn(move || background_fetch(i, f, order, n, s));
    }
    fetcher.stats.write(state);
    let options = [
        MountOption::FSName(format!("strata:{}", spec.digest)),
        MountOption::Subtype("strata".into()),
        MountOption::RO,
        MountOption::AllowOther,
        MountOption::DefaultPermissions,
        MountOption::Suid,
        MountOption::Dev,
        MountOption::Exec,
    ];
    info!(layer = %spec.digest, mountpoint = %mountpoint.display(), "serving lazy layer");
    let result = fuser::mount2(fs, mountpoint, &options);
    stop.store(true, Ordering::SeqCst);
    fetcher.stats.write(state);
    result.map_err(|e| anyhow::anyhow!("FUSE mount at {}: {e}", mountpoint.display()))
}
