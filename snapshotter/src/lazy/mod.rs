//! Lazy layers: zstd:chunked and eStargz layers mounted from the registry over FUSE instead of
//! being downloaded (containerd's "remote snapshot" protocol).
//!
//! A Prepare whose labels name the target (`containerd.io/snapshot.ref`), the image and the
//! layer (`containerd.io/snapshot/cri.image-ref`, `.cri.manifest-digest`, `.cri.layer-digest`,
//! as containerd's CRI plugin and `strata-snapshotter pull --lazy` pass them) is answered by
//! [`remote::Lazy::prepare`]: it reads the layer's descriptor from the manifest, fetches and
//! verifies its TOC, saves both in the snapshot's `lazy/` directory, starts a
//! `strata-snapshotter serve-layer` process that mounts the FUSE filesystem ([`fs`]) on the
//! snapshot's `fs`, commits the snapshot as the target and answers AlreadyExists, so containerd
//! skips the download. It does not wait for the mount: mounts on top of the layer do
//! ([`crate::snapshots::RemoteLayers::ready`]). The serving process is its own session: it outlives the daemon, so
//! running containers keep reading across a restart; the daemon remounts what is not mounted at
//! start.
//!
//! Layout of `snapshots/<id>/lazy/`: `layer.json` ([`LayerSpec`]), `toc.json` (verified),
//! `pid`, `stats.json` ([`Stats`]), `serve.log`.

pub mod background;
pub mod cache;
pub mod fetch;
pub mod fs;
pub mod index;
pub mod nodes;
pub mod passthrough;
pub mod remote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use strata_image::chunked::toc::Toc;

/// Everything the serving process needs, saved at Prepare.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Repository (`host/name`) the blob is read from.
    pub reference: String,
    pub digest: String,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
    pub insecure: Vec<String>,
    pub timeout_secs: u64,
    pub retries: u32,
    pub cache_dir: PathBuf,
    pub cache_max_bytes: u64,
    pub access_dir: PathBuf,
    pub background_fetch: bool,
    pub fetch_concurrency: usize,
    /// Ask the kernel for FUSE passthrough of fully fetched files.
    #[serde(default = "yes")]
    pub passthrough: bool,
}

fn yes() -> bool {
    true
}

impl LayerSpec {
    pub fn load(state: &Path) -> anyhow::Result<LayerSpec> {
        let p = state.join("layer.json");
        let bytes = std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub fn registry_options(&self) -> strata_image::registry::Options {
        strata_image::registry::Options {
            insecure: self.insecure.clone(),
            timeout: std::time::Duration::from_secs(self.timeout_secs.max(1)),
            retries: self.retries,
        }
    }
}

pub fn load_toc(state: &Path) -> anyhow::Result<Toc> {
    let p = state.join("toc.json");
    let bytes = std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Where the access logs of the lazy layers under snapshotter root `root` are.
pub fn access_dir(root: &Path) -> PathBuf {
    root.join("lazy").join("access")
}

/// Where the first mount of a layer records the order files are opened in.
pub fn access_log(spec: &LayerSpec) -> PathBuf {
    log_in(&spec.access_dir, &spec.digest)
}

fn log_in(access_dir: &Path, digest: &str) -> PathBuf {
    access_dir.join(digest.trim_start_matches("sha256:"))
}

/// The files containers opened, in the order the first mount of each of `layers` (digests, in
/// image order) recorded them under snapshotter root `root`: the prefetch list for `convert
/// --prefetch` and the `prefetch=` output key. Each path once.
pub fn prefetch_list(root: &Path, layers: &[String]) -> Vec<String> {
    let dir = access_dir(root);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for digest in layers {
        let text = std::fs::read_to_string(log_in(&dir, digest)).unwrap_or_default();
        out.extend(
            text.lines()
                .filter(|p| seen.insert(p.to_string()))
                .map(str::to_string),
        );
    }
    out
}

/// Counters of one lazy layer, written to `stats.json` by its serving process.
#[derive(Debug, Default)]
pub struct Stats {
    pub total_bytes: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub cache_hits: AtomicU64,
    pub verify_failures: AtomicU64,
    pub fetch_errors: AtomicU64,
    pub passthrough_opens: AtomicU64,
}

/// `stats.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    pub total_bytes: u64,
    pub fetched_bytes: u64,
    pub cache_hits: u64,
    pub verify_failures: u64,
    pub fetch_errors: u64,
    /// Opens passed through to a whole cached file (read by the kernel, not by the server).
    #[serde(default)]
    pub passthrough_opens: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            verify_failures: self.verify_failures.load(Ordering::Relaxed),
            fetch_errors: self.fetch_errors.load(Ordering::Relaxed),
            passthrough_opens: self.passthrough_opens.load(Ordering::Relaxed),
        }
    }

    /// Writes `stats.json` atomically.
    pub fn write(&self, state: &Path) {
        let tmp = state.join("stats.json.tmp");
        if std::fs::write(
            &tmp,
            serde_json::to_vec(&self.snapshot()).unwrap_or_default(),
        )
        .is_ok()
        {
            let _ = std::fs::rename(&tmp, state.join("stats.json"));
        }
    }
}

/// Whether `path` is the mountpoint of a live mount (per /proc/self/mountinfo), and reachable.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    let listed = text
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want));
    // A dead FUSE server leaves the mount listed but answering ENOTCONN. Ask with statfs, which
    // always reaches the server: a stat can be answered from the kernel's attribute cache.
    listed && nix::sys::statfs::statfs(path).is_ok()
}

/// The counters of every lazy layer under snapshotter root `root`: (layer digest, stats, or why
/// they cannot be read). A served layer always has a `stats.json` (its server writes one before
/// mounting), so a missing or corrupt one is reported, never read as zeros.
pub fn layer_stats(root: &Path) -> Vec<(String, Result<StatsSnapshot, String>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root.join("snapshots")) else {
        return out;
    };
    for e in rd.flatten() {
        let state = e.path().join("lazy");
        let Ok(spec) = LayerSpec::load(&state) else {
            continue;
        };
        let path = state.join("stats.json");
        let stats = std::fs::read(&path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display()))
            });
        out.push((spec.digest, stats));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
