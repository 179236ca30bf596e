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
//! skips the download. The serving process is its own session: it outlives the daemon, so
//! running containers keep reading across a restart; the daemon remounts what is not mounted at
//! start.
//!
//! Layout of `snapshots/<id>/lazy/`: `layer.json` ([`LayerSpec`]), `toc.json` (verified),
//! `pid`, `stats.json` ([`Stats`]), `serve.log`.

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

/// Where the first mount of a layer records the order files are opened in.
pub fn access_log(spec: &LayerSpec) -> PathBuf {
    spec.access_dir
        .join(spec.digest.trim_start_matches("sha256:"))
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

/// Stops serving the lazy layer of snapshot directory `dir` (if it is one): detaches its mount
/// and ends its process. Called before the directory is removed.
pub fn detach(dir: &Path) {
    let state = dir.join("lazy");
    if !state.is_dir() {
        return;
    }
    let fs = dir.join("fs");
    if let Ok(c) = std::ffi::CString::new(fs.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    if let Some(pid) = std::fs::read_to_string(state.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        if pid > 1 {
            // SAFETY: sending a signal has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
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

/// The counters in Prometheus' text format.
pub fn prometheus(root: &Path, fell_back: u64) -> String {
    let layers = layer_stats(root);
    let mut out = String::new();
    type Metric = (&'static str, &'static str, fn(&StatsSnapshot) -> u64);
    let metrics: [Metric; 6] = [
        (
            "strata_lazy_layer_bytes",
            "Compressed size of the layer blob",
            |s| s.total_bytes,
        ),
        (
            "strata_lazy_fetched_bytes_total",
            "Compressed bytes fetched from the registry",
            |s| s.fetched_bytes,
        ),
        (
            "strata_lazy_cache_hits_total",
            "Chunks and whole-file reads served from the cache",
            |s| s.cache_hits,
        ),
        (
            "strata_lazy_verify_failures_total",
            "Chunks whose sha256 did not match (never served)",
            |s| s.verify_failures,
        ),
        (
            "strata_lazy_fetch_errors_total",
            "Chunk fetches that failed",
            |s| s.fetch_errors,
        ),
        (
            "strata_lazy_passthrough_opens_total",
            "Opens passed through to a whole cached file (FUSE passthrough)",
            |s| s.passthrough_opens,
        ),
    ];
    for (name, help, get) in metrics {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {}\n",
            if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            }
        ));
        for (digest, s) in &layers {
            if let Ok(s) = s {
                out.push_str(&format!("{name}{{layer=\"{digest}\"}} {}\n", get(s)));
            }
        }
    }
    out.push_str("# HELP strata_lazy_stats_unreadable Layers whose counters cannot be read (see status)\n# TYPE strata_lazy_stats_unreadable gauge\n");
    for (digest, s) in &layers {
        out.push_str(&format!(
            "strata_lazy_stats_unreadable{{layer=\"{digest}\"}} {}\n",
            u8::from(s.is_err())
        ));
    }
    out.push_str(&format!(
        "# HELP strata_lazy_fallback_layers_total Layers that were neither zstd:chunked nor eStargz and were pulled whole\n# TYPE strata_lazy_fallback_layers_total counter\nstrata_lazy_fallback_layers_total {fell_back}\n"
    ));
    out
}

/// Serves `GET /metrics` on `address` from a thread.
pub fn serve_metrics(
    address: &str,
    root: PathBuf,
    lazy: std::sync::Arc<remote::Lazy>,
) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind(address)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            let (status, body) = if line.starts_with("GET /metrics") {
                (
                    "200 OK",
                    prometheus(&root, lazy.fell_back.load(Ordering::Relaxed)),
                )
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let mut c = conn;
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}
