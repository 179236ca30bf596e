//! The read-only FUSE filesystem of one lazy layer, served by its own process
//! (`strata-snapshotter serve-layer`) so that it outlives restarts of the daemon. Metadata comes
//! from the TOC index; reads get exactly the chunks they touch from [`Fetcher`], off the session
//! thread. Fully fetched files are passed through to a whole copy in the cache
//! ([`super::passthrough`]). The first mount of a layer records the order files are opened in;
//! later mounts prefetch in that order.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use parking_lot::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
    SessionACL,
};
use tracing::{info, warn};

use super::background::background_fetch;
use super::cache::ChunkCache;
use super::fetch::Fetcher;
use super::index::{Kind, Node};
use super::nodes::Nodes;
use super::passthrough::Passthrough;
use super::LayerSpec;
use strata_image::chunked::toc::Chunk;

/// The layer is immutable: the kernel may keep attributes and pages for as long as it likes.
const TTL: Duration = Duration::from_secs(3600);

/// How long after its start a server writes a freshly built index to disk.
const PERSIST_AFTER: Duration = Duration::from_secs(10);

/// Records the order in which files are first opened, for the prefetch of later mounts.
struct Recorder {
    file: Option<Mutex<std::fs::File>>,
    seen: Mutex<HashSet<u64>>,
}

impl Recorder {
    fn opened(&self, ino: u64, path: &str) {
        let Some(f) = &self.file else { return };
        if self.seen.lock().insert(ino) {
            let _ = writeln!(f.lock(), "{path}");
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

pub struct LazyFs {
    index: Arc<Nodes>,
    fetcher: Arc<Fetcher>,
    recorder: Recorder,
    passthrough: Arc<Passthrough>,
    /// Whether to ask the kernel for passthrough (`[lazy] passthrough`).
    want_passthrough: bool,
    jobs: Mutex<mpsc::Sender<Job>>,
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
        ino: INodeNo(ino),
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
        passthrough: Arc<Passthrough>,
        want_passthrough: bool,
    ) -> LazyFs {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let rx = rx.clone();
            std::thread::spawn(move || loop {
                let job = match rx.lock().recv() {
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
            want_passthrough,
            passthrough,
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `job` on a worker thread, so that the session thread goes on with other requests.
    fn spawn(&self, job: Job) {
        let sent = self.jobs.lock().send(job);
        if let Err(e) = sent {
            (e.0)();
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
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Reads are answered from worker threads: let the kernel keep many in flight.
        let _ = config.set_max_background(64);
        // Passthrough needs a stack depth of 1: overlayfs still stacks on this mount, and the
        // backing files must then live on a plain filesystem.
        if self.want_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough.enable();
        } else if self.want_passthrough {
            warn!("the kernel offers no FUSE passthrough (Linux 6.9+); reads go through the cache");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = name
            .to_str()
            .and_then(|name| self.index.child(parent.0, name))
            .and_then(|ino| Some((ino, self.index.node(ino)?)));
        match found {
            Some((ino, n)) => reply.entry(&TTL, &attr(ino, &n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.index.node(ino.0) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, &n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.index.node(ino.0) {
            Some(n) if n.kind == Kind::Symlink => reply.data(n.link.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(n) = self.index.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != Kind::File {
            return reply.opened(super::passthrough::CACHED, FopenFlags::FOPEN_KEEP_CACHE);
        }
        self.recorder.opened(ino.0, &n.path);
        let (passthrough, fetcher) = (self.passthrough.clone(), self.fetcher.clone());
        // Passthrough may first assemble the file from its chunks.
        self.spawn(Box::new(move || {
            passthrough.open(ino.0, &n, &fetcher, reply)
        }));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.passthrough.release(ino.0, fh);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written.
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (index, fetcher) = (self.index.clone(), self.fetcher.clone());
        // Fetching may take a round trip.
        self.spawn(Box::new(move || {
            let Some(n) = index.node(ino.0) else {
                return reply.error(Errno::ENOENT);
            };
            if let Some(data) = fetcher.cache.read(&n.digest, n.size, offset, size as u64) {
                fetcher.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return reply.data(&data);
            }
            match read_range(&fetcher, &n.chunks, n.size, offset, size as u64) {
                Ok(data) => reply.data(&data),
                Err(_) => reply.error(Errno::EIO),
            }
        }));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = self.index.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // Position 0 is ".", 1 is "..", 2.. the children by name; `offset` is where to go on.
        let children = self.index.children(ino.0);
        for pos in offset as usize..children.len() + 2 {
            let (child, kind, name) = match pos {
                0 => (ino.0, FileType::Directory, "."),
                1 => (n.parent, FileType::Directory, ".."),
                _ => {
                    let (name, child) = &children[pos - 2];
                    let Some(c) = self.index.node(*child) else {
                        continue;
                    };
                    (*child, attr(*child, &c).kind, name.as_str())
                }
            };
            if reply.add(INodeNo(child), (pos + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(n) = self.index.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let name = name.to_string_lossy();
        let value: Option<Vec<u8>> = if n.opaque && name == "trusted.overlay.opaque" {
            Some(b"y".to_vec())
        } else {
            n.xattrs.get(name.as_ref()).cloned()
        };
        match value {
            None => reply.error(Errno::NO_XATTR),
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some(v) => reply.data(&v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(n) = self.index.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for k in n.xattrs.keys() {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&list)
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.index.total_bytes.div_ceil(4096);
        reply.statfs(blocks, 0, 0, self.index.count, 0, 4096, 255, 4096);
    }
}

/// Mounts the layer described in `state` at `mountpoint` and serves it until unmounted.
pub fn serve(state: &Path, mountpoint: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let spec = LayerSpec::load(state)?;
    let index = Arc::new(Nodes::open_or_build(&state.join("index"), || {
        super::load_toc(state)
    })?);
    let index_ms = started.elapsed().as_millis();
    {
        // A fresh index is written to disk once the layer has been serving for a while, off the
        // path a starting container waits on.
        let index = index.clone();
        std::thread::spawn(move || {
            std::thread::sleep(PERSIST_AFTER);
            if let Err(e) = index.persist() {
                warn!(error = %e, "writing the layer's index to disk (it is built again at the next start)");
            }
        });
    }
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
    let passthrough = Arc::new(Passthrough::default());
    let fs = LazyFs::new(
        index.clone(),
        fetcher.clone(),
        record_to,
        spec.fetch_concurrency.max(4),
        passthrough.clone(),
        spec.passthrough,
    );
    super::background::fetch_prefetch_area(&index, &fetcher);
    let stop = Arc::new(AtomicBool::new(false));
    if spec.background_fetch {
        let (i, f, s, n) = (
            index.clone(),
            fetcher.clone(),
            stop.clone(),
            spec.fetch_concurrency,
        );
        std::thread::spawn(move || background_fetch(i, f, order, n, s, passthrough));
    }
    fetcher.stats.write(state);
    {
        // Counters that change without a fetch (passthrough opens) reach `stats.json` too.
        let (fetcher, stop, state) = (fetcher.clone(), stop.clone(), state.to_path_buf());
        std::thread::spawn(move || {
            let mut written = fetcher.stats.snapshot();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let now = fetcher.stats.snapshot();
                if now != written {
                    fetcher.stats.write(&state);
                    written = now;
                }
            }
        });
    }
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("strata:{}", spec.digest)),
        MountOption::Subtype("strata".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::Suid,
        MountOption::Dev,
        MountOption::Exec,
    ];
    config.acl = SessionACL::All;
    let ms = started.elapsed().as_millis();
    info!(layer = %spec.digest, mountpoint = %mountpoint.display(), index_ms, ms, "serving lazy layer");
    let result = fuser::mount(fs, mountpoint, &config);
    stop.store(true, Ordering::SeqCst);
    fetcher.stats.write(state);
    result.map_err(|e| anyhow::anyhow!("FUSE mount at {}: {e}", mountpoint.display()))
}
