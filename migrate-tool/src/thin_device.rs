//! One thin device of a devicemapper pool, served read-only as a single FUSE file whose reads
//! come straight from the pool's data file at the device's mapped blocks (zeros elsewhere), so
//! that a loop mount of it shows the device's filesystem without writing a copy of the device.
//! Only the blocks the migration reads (filesystem metadata, the layer's own files) are read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyOpen,
    Request, SessionACL,
};

/// The device never changes while it is served.
const TTL: Duration = Duration::from_secs(3600);

/// A run of `len` blocks of the device at block `origin`, stored in the pool at block `data`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    pub origin: u64,
    pub data: u64,
    pub len: u64,
}

struct Device {
    pool: File,
    block: u64,
    size: u64,
    /// Sorted by origin, not overlapping.
    runs: Vec<Run>,
}

impl Device {
    /// Reads `len` bytes of the device at `offset` into `out`.
    fn read(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> std::io::Result<()> {
        let end = (offset + len).min(self.size);
        let mut at = offset;
        // The first run that ends after `at`.
        let mut i = self
            .runs
            .partition_point(|r| (r.origin + r.len) * self.block <= at);
        while at < end {
            let run = self.runs.get(i).filter(|r| r.origin * self.block < end);
            let Some(r) = run else {
                out.resize(out.len() + (end - at) as usize, 0);
                break;
            };
            let (start, stop) = (
                r.origin * self.block,
                ((r.origin + r.len) * self.block).min(end),
            );
            if at < start {
                out.resize(out.len() + (start - at) as usize, 0);
                at = start;
            }
            let n = (stop - at) as usize;
            let from = out.len();
            out.resize(from + n, 0);
            self.pool
                .read_exact_at(&mut out[from..], r.data * self.block + (at - start))?;
            at = stop;
            i += 1;
        }
        Ok(())
    }

    fn attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o400,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for Device {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // The loop device reads ahead through this file: let the kernel ask for big, many reads.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT => reply.attr(&TTL, &self.attr()),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut out = Vec::with_capacity(size as usize);
        match self.read(offset, size as u64, &mut out) {
            Ok(()) => reply.data(&out),
            Err(_) => reply.error(Errno::EIO),
        }
    }
}

/// Serves the device (`size` bytes, blocks of `block` bytes mapped by `runs`, sorted by origin
/// and not overlapping) from the pool data file `pool` at `at`, an existing regular file that the
/// FUSE mount covers until the session is dropped (or unmounted and joined).
pub fn serve(
    pool: &Path,
    block: u64,
    size: u64,
    runs: Vec<Run>,
    at: &Path,
) -> std::io::Result<BackgroundSession> {
    let device = Device {
        pool: File::open(pool)?,
        block,
        size,
        runs,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("migrate-tool:thin-device".into()),
        MountOption::Subtype("thin".into()),
        MountOption::RO,
    ];
    config.acl = SessionACL::RootAndOwner;
    // Reads are preads of the pool: two threads keep both cores' worth of them in flight.
    config.n_threads = Some(2);
    config.clone_fd = true;
    fuser::spawn_mount(device, at, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mapped_blocks_from_the_pool_and_zeros_between_them() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("data");
        // Pool blocks of 4 bytes: block n holds four bytes of value n.
        let bytes: Vec<u8> = (0u8..16).flat_map(|n| [n; 4]).collect();
        std::fs::write(&pool, &bytes).unwrap();
        let d = Device {
            pool: File::open(&pool).unwrap(),
            block: 4,
            size: 30,
            runs: vec![
                Run {
                    origin: 1,
                    data: 9,
                    len: 2,
                },
                Run {
                    origin: 5,
                    data: 3,
                    len: 1,
                },
            ],
        };
        let mut out = Vec::new();
        d.read(0, 64, &mut out).unwrap();
        let mut want = vec![0u8; 4];
        want.extend([9; 4]);
        want.extend([10; 4]);
        want.extend([0; 8]);
        want.extend([3; 4]);
        want.extend([0; 6]);
        assert_eq!(out, want);
        // A read starting inside a run.
        let mut out = Vec::new();
        d.read(6, 8, &mut out).unwrap();
        assert_eq!(out, [9, 9, 10, 10, 10, 10, 0, 0]);
    }
}
