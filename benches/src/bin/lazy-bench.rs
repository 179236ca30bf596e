//! Lazy pull benchmark, in one run against the same registry behind the same bandwidth limit
//! (a rate-limiting TCP proxy in this program), for each limit:
//! - time from pull start to a container's first output: `strata-snapshotter pull --lazy` +
//!   `ctr run --snapshotter strata` vs `ctr images pull` + `ctr run` on containerd's overlayfs;
//!   and the bytes fetched before that output;
//! - sequential read throughput of the large files once cached, through the FUSE lower vs on
//!   overlayfs (median of five, page cache dropped before each);
//! - at the first limit, an image whose entrypoint reads 50 files spread over its data layer:
//!   time to the first output and registry requests before it, without a prefetch list vs with
//!   the one a first run recorded (`status --prefetch-list`, `convert --prefetch`).
//!
//! `lazy-bench [IMAGE_MB] [MBIT,...]` (defaults: 300 and 100,1000).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_benches::Row;

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::{metric, Daemon};
use strata_fs_tests::image::{busybox_layer, noise, write_oci_archive, LayerBuilder};
use strata_fs_tests::registry::Registry;
use strata_fs_tests::snapshotter_cli;

/// A token bucket: `rate` bytes a second with bursts of at most `burst` bytes, so idle time never
/// turns into an unthrottled burst.
struct Bucket {
    rate: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64, burst: u64) -> Bucket {
        Bucket {
            rate: rate as f64,
            burst: burst as f64,
            state: std::sync::Mutex::new((burst as f64, Instant::now())),
        }
    }

    /// Waits until `n` bytes may be sent (callers queue up as debt).
    fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap();
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.burst) - n as f64;
            s.1 = now;
            (s.0 < 0.0).then(|| Duration::from_secs_f64(-s.0 / self.rate))
        };
        if let Some(w) = wait {
            std::thread::sleep(w);
        }
    }
}

/// Registry requests seen by a proxy (request lines of registry API calls).
type Requests = Arc<std::sync::atomic::AtomicU64>;

/// How many registry API request lines `data` (client to registry) holds.
fn request_lines(data: &[u8]) -> u64 {
    let starts = |m: &[u8]| data.windows(m.len()).filter(|w| *w == m).count() as u64;
    starts(b"GET /v2/") + starts(b"HEAD /v2/")
}

/// A proxy to `upstream` whose responses share `bytes_per_sec` (bursts of 64 KiB at most),
/// counting requests in `requests`.
fn throttled_proxy(upstream: String, bytes_per_sec: u64, requests: Requests) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let bucket = Arc::new(Bucket::new(bytes_per_sec, 64 << 10));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            // As a registry's own sockets are (Go sets TCP_NODELAY): without it, Nagle holds a
            // response's small last segment until the client's delayed ACK (~40 ms a request).
            let _ = (server.set_nodelay(true), client.set_nodelay(true));
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let requests = requests.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n @ 1..) = c_read.read(&mut buf) {
                    requests.fetch_add(
                        request_lines(&buf[..n]),
                        std::sync::atomic::Ordering::SeqCst,
                    );
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write, bucket) = (server, client, bucket.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    bucket.take(n);
                    if c_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn lazy_metric(d: &Daemon, name: &str) -> u64 {
    metric(&d.lazy_metrics(), name)
}

/// Drops the page cache, so that reads are measured from the disk; a bench that cannot is wrong.
fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .expect("drop the page cache (/proc/sys/vm/drop_caches): run the bench as root");
}

/// MB/s of reading the large files inside a container (timed inside it): the median of `n`
/// reads, the page cache dropped before each.
fn read_throughput(
    c: &Containerd,
    snapshotter: &str,
    image: &str,
    id: &str,
    bytes: u64,
    n: usize,
) -> f64 {
    let mut runs: Vec<f64> = (0..n)
        .map(|_| {
            drop_caches();
            let out = c.ctr(&["run", "--rm", "--snapshotter", snapshotter, image, id, "sh", "-c",
                "a=$(cut -d' ' -f1 /proc/uptime); cat /data/big-* > /dev/null; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"]);
            let t: Vec<f64> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
            bytes as f64 / 1e6 / (t[1] - t[0]).max(0.01)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[n / 2]
}

/// The bench image: busybox and a layer of `mb` MB (2000 small files and 14 MB big ones),
/// pushed to `reg` as `strata/app:1` and converted to zstd:chunked as `strata/app:lazy`.
/// Returns the bytes of the big files.
fn push_image(reg: &Registry, dir: &Path, mb: usize) -> u64 {
    let mut b = LayerBuilder::default();
    let small = 2000;
    for i in 0..small {
        b.file(
            &format!("data/small/f{i:04}"),
            0o644,
            &noise(i as u64, 1000 + (i * 37) % 6000),
        );
    }
    let big_size = 14 << 20;
    let bigs = (mb.saturating_sub(8) << 20) / big_size;
    for i in 0..bigs {
        b.file(
            &format!("data/big-{i:02}"),
            0o644,
            &noise(10_000 + i as u64, big_size),
        );
    }
    let archive = dir.join("app.tar");
    write_oci_archive(
        &archive,
        "docker.io/strata/app:1",
        &[busybox_layer().finish(), b.finish()],
        &["/bin/sh"],
    );
    reg.push_archive(&archive, "strata/app:1");
    snapshotter_cli(&[
        "convert",
        &format!("{}/strata/app:1", reg.host),
        &format!("{}/strata/app:lazy", reg.host),
    ]);
    println!("lazy-bench: image of {mb} MB ({small} small files, {bigs} x 14 MB), zstd:chunked with 4 MiB chunks");
    (bigs * big_size) as u64
}

/// What the first-output rows run: one small file read.
const FIRST_CMD: &[&str] = &["sha256sum", "/data/small/f0007"];

/// Seconds to the first output of a container of `image` on `snapshotter`, after `pull`.
fn first_output(c: &Containerd, snapshotter: &str, image: &str, id: &str, pull: &[&str]) -> f64 {
    first_output_of(c, (snapshotter, image, id), pull, FIRST_CMD)
}

/// [`first_output`] of `cmd`.
fn first_output_of(
    c: &Containerd,
    (snapshotter, image, id): (&str, &str, &str),
    pull: &[&str],
    cmd: &[&str],
) -> f64 {
    let t = Instant::now();
    if !pull.is_empty() {
        snapshotter_cli(pull);
    } else {
        c.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            image,
        ]);
    }
    let pulled = t.elapsed().as_secs_f64();
    run(c, (snapshotter, image, id), cmd);
    let total = t.elapsed().as_secs_f64();
    println!(
        "  {snapshotter} {id}: pull {pulled:.2}s + run {:.2}s",
        total - pulled
    );
    total
}

/// Runs `cmd` in a container of `image` (pulled already) and checks it printed something.
fn run(c: &Containerd, (snapshotter, image, id): (&str, &str, &str), cmd: &[&str]) {
    let mut args = vec!["run", "--rm", "--snapshotter", snapshotter, image, id];
    args.extend_from_slice(cmd);
    let out = c.ctr(&args);
    assert!(out.starts_with(char::is_alphanumeric), "{out}");
}

/// After every file was read once: cached reads through the FUSE lower vs overlayfs, the chunk
/// cache's size, and the memory of the FUSE servers.
fn cached_reads(d: &Daemon, c: &Containerd, lazy: &str, full: &str, big_bytes: u64, mb: usize) {
    let total = lazy_metric(d, "strata_lazy_layer_bytes");
    c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        lazy,
        "fetch-all",
        "sh",
        "-c",
        "find / -xdev -type f -exec cat {} + > /dev/null",
    ]);
    let fetched = lazy_metric(d, "strata_lazy_fetched_bytes_total");
    if fetched < total * 95 / 100 {
        println!("  WARNING: only {fetched} of {total} layer bytes fetched after reading every file: the cached-read numbers below include fetches");
    }
    let warm = read_throughput(c, "strata", lazy, "warm", big_bytes, 1);
    let fuse = read_throughput(c, "strata", lazy, "fuse", big_bytes, 5);
    let overlay = read_throughput(c, "overlayfs", full, "overlay", big_bytes, 5);
    println!("  cached sequential read of {} MB: FUSE lower {fuse:.0} MB/s (first read after fetch {warm:.0} MB/s) vs overlayfs {overlay:.0} MB/s: ratio {:.2}; opens passed through: {}", big_bytes / 1_000_000, fuse / overlay, lazy_metric(d, "strata_lazy_passthrough_opens_total"));
    let case = "cached sequential reads through the FUSE lower (higher is better)";
    Row::new("lazy", case, "MB/s", fuse)
        .against("overlayfs", overlay)
        .report();
    // Whole files replace their chunks: the cache should hold the content about once.
    let cached: u64 = std::fs::read_dir(d.root.join("lazy/chunks"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "  chunk cache after the fetch: {:.0} MB for {mb} MB of file content",
        cached as f64 / 1e6
    );
    serve_layer_memory();
}

/// The resident memory of each FUSE server (the TOC index lives in them).
fn serve_layer_memory() {
    let pids = Command::new("pgrep")
        .args(["-f", "serve-layer"])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(rss) = status.lines().find(|l| l.starts_with("VmRSS")) {
            let kb = rss.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
            println!("  serve-layer {pid}: {kb}");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mb: usize = args.first().map(|a| a.parse().unwrap()).unwrap_or(300);
    let rates: Vec<u64> = args
        .get(1)
        .map(|a| a.split(',').map(|r| r.parse().unwrap()).collect())
        .unwrap_or(vec![100, 1000]);
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let big_bytes = push_image(&reg, dir.path(), mb);
    let last = rates.last().copied();
    let first_rate = rates[0];
    for mbit in rates {
        let proxy = throttled_proxy(reg.host.clone(), mbit * 1_000_000 / 8, Default::default());
        // Lazy: strata, without the background fetch, so that what is fetched before the first
        // output is what the container needed and nothing shares the link with the full pull.
        let (d, c) = lazy_daemon();
        let lazy = format!("{proxy}/strata/app:lazy");
        let lazy_first = lazy_first_output(&c, &lazy, "first", FIRST_CMD);
        for l in d
            .log_text()
            .lines()
            .filter(|l| l.contains("lazy layer mounted"))
        {
            println!("  daemon: {l}");
        }
        let fetched = lazy_metric(&d, "strata_lazy_fetched_bytes_total");
        // The same container again: pulled, its reads cached; what a lazy start adds is the rest.
        let t = Instant::now();
        run(&c, ("strata", &lazy, "warm-start"), FIRST_CMD);
        let warm = t.elapsed().as_secs_f64();
        // Full pull + run on containerd's overlayfs, through the same proxy.
        let full = format!("{proxy}/strata/app:1");
        let full_first = first_output(&c, "overlayfs", &full, "firstfull", &[]);
        println!("  {mbit} Mbit/s: first output lazy {lazy_first:.2}s vs full pull + run {full_first:.2}s: ratio {:.3}; fetched before first output {:.1} MB of {mb} MB", lazy_first / full_first, fetched as f64 / 1e6);
        println!("  {mbit} Mbit/s: warm start of the same container {warm:.2}s: the lazy pull added {:.2}s", lazy_first - warm);
        let case = format!("{mb} MB image at {mbit} Mbit/s: first output");
        Row::new("lazy", &case, "s", lazy_first)
            .against("full pull + run on overlayfs", full_first)
            .report();
        let case = format!("{mb} MB image at {mbit} Mbit/s: first output");
        Row::new("lazy", &case, "s", lazy_first)
            .against("warm start of the same container", warm)
            .report();
        if Some(mbit) == last {
            cached_reads(&d, &c, &lazy, &full, big_bytes, mb);
        }
    }
    prefetch_row(&reg, dir.path(), mb, first_rate);
}

/// A daemon without the background fetch (what is fetched is what was read) and its containerd.
fn lazy_daemon() -> (Daemon, Containerd) {
    let cfg = std::env::temp_dir().join(format!("lazy-bench-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[lazy]\nbackground_fetch = false\n").unwrap();
    let d = Daemon::start_quiet(&["--config", cfg.to_str().unwrap()]);
    let c = Containerd::start(&d.socket);
    (d, c)
}

/// `pull --lazy IMAGE` into `c`, then `cmd` in a container: seconds to its output.
fn lazy_first_output(c: &Containerd, image: &str, id: &str, cmd: &[&str]) -> f64 {
    let address = c.address.to_str().unwrap().to_string();
    let pull = [
        "pull",
        "--lazy",
        image,
        "--containerd-address",
        &address,
        "--namespace",
        &c.namespace,
    ];
    first_output_of(c, ("strata", image, id), &pull, cmd)
}

/// 50 files of 1 MB read by the entrypoint, every sixth of the layer's files: without a prefetch
/// list vs with the one a first run recorded, each on a fresh snapshotter behind `mbit`.
fn prefetch_row(reg: &Registry, dir: &Path, mb: usize, mbit: u64) {
    let n = mb.max(60);
    let mut b = LayerBuilder::default();
    for i in 0..n {
        b.file(
            &format!("data/f{i:03}"),
            0o644,
            &noise(20_000 + i as u64, 1 << 20),
        );
    }
    let archive = dir.join("reads.tar");
    write_oci_archive(
        &archive,
        "docker.io/strata/reads:1",
        &[busybox_layer().finish(), b.finish()],
        &["/bin/sh"],
    );
    reg.push_archive(&archive, "strata/reads:1");
    let at = |tag: &str| format!("{}/strata/reads:{tag}", reg.host);
    snapshotter_cli(&["convert", &at("1"), &at("lazy")]);
    let files: Vec<String> = (0..50)
        .map(|i| format!("/data/f{:03}", i * n / 50))
        .collect();
    let script = format!("cat {} > /dev/null && echo ready", files.join(" "));
    let cmd = ["sh", "-c", script.as_str()];
    // A first run records what the entrypoint reads; the image is converted with that order.
    let (d, c) = lazy_daemon();
    lazy_first_output(&c, &at("lazy"), "record", &cmd);
    let root = d.root.to_str().unwrap().to_string();
    let list = snapshotter_cli(&["--root", &root, "status", "--prefetch-list", &at("lazy")]);
    let reads = dir.join("reads.txt");
    std::fs::write(&reads, list).unwrap();
    snapshotter_cli(&[
        "convert",
        "--prefetch",
        reads.to_str().unwrap(),
        &at("1"),
        &at("prefetch"),
    ]);
    drop((c, d));
    let mut row = Vec::new();
    for tag in ["lazy", "prefetch"] {
        let requests: Requests = Default::default();
        let proxy = throttled_proxy(reg.host.clone(), mbit * 1_000_000 / 8, requests.clone());
        let (_d, c) = lazy_daemon();
        let image = format!("{proxy}/strata/reads:{tag}");
        let secs = lazy_first_output(&c, &image, tag, &cmd);
        row.push((secs, requests.load(std::sync::atomic::Ordering::SeqCst)));
    }
    let [(plain, plain_req), (pre, pre_req)] = row[..] else {
        unreachable!()
    };
    println!("  prefetch, {mbit} Mbit/s, 50 x 1 MB read of {n} MB: first output without a list {plain:.2}s ({plain_req} registry requests) vs with the recorded one {pre:.2}s ({pre_req} requests): ratio {:.2}", pre / plain);
    let case = format!("50 x 1 MB read at {mbit} Mbit/s: first output with a prefetch list");
    Row::new("lazy", &case, "s", pre)
        .against("without one", plain)
        .report();
}
