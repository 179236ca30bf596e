//! migrate-tool on generated stores made by a real dockerd on the overlay (v1) driver (and the same
//! rewritten into aufs and devicemapper form): wall time and bytes written by `migrate`, `verify`
//! throughput, against `docker save` + `docker load` of the same image into a dockerd on overlay2,
//! in the same run.
//!
//! `migrate-bench [TOTAL_MB] [LAYERS] [DM_TOTAL_MB] [DM_LAYERS]` (devicemapper keeps a full
//! filesystem per layer, so its store is smaller by default). A size of 0 skips those drivers.

use std::path::Path;
use std::process::Command;
use std::time::Instant;
use strata_benches::Row;

use strata_fs_tests::docker_roots::{overlay_to_aufs, overlay_to_devicemapper};
use strata_fs_tests::dockerd::Dockerd;
use strata_fs_tests::strata::Strata;

/// Bytes this process and its reaped children have caused to be written to storage
/// (`write_bytes` of /proc/self/io: the kernel adds a child's counters when it is waited for),
/// so the delta around a migrate-tool run is what migrate-tool wrote, whatever else frees space.
fn written_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("read /proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes in /proc/self/io")
}

fn tool(args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = Command::new(strata_fs_tests::workspace_bin("migrate-tool"))
        .args(args)
        .output()
        .expect("migrate-tool");
    assert!(
        out.status.success(),
        "migrate-tool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

/// A stopped dockerd (overlay v1) holding one image of `layers` layers and `total_mb` MB, and the
/// seconds `docker save` + `docker load` (into overlay2) take for it.
fn store(total_mb: u64, layers: u64) -> (Strata, Dockerd, f64, f64) {
    let s = Strata::new();
    let mut df = String::from("FROM busybox\n");
    for i in 0..layers {
        // Random (incompressible) data and many small files.
        df.push_str(&format!("RUN head -c {}m /dev/urandom > /blob{i} && mkdir /small{i} && for j in $(seq 1 200); do echo $j > /small{i}/$j; done\n", (total_mb / layers).max(1)));
    }
    s.dockerfile(&df);
    let archive = s.root.path().join("big.tar");
    let base = s.root.path().join("busybox.tar");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=big:1", archive.display()),
    ]);
    let b = Strata::new();
    b.dockerfile("FROM busybox\n");
    b.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=busybox:latest", base.display()),
    ]);
    let mut v1 = Dockerd::start("overlay", &[]);
    v1.load(&base);
    v1.load(&archive);
    let saved = s.root.path().join("saved.tar");
    let t = Instant::now();
    v1.docker(&["save", "-o", saved.to_str().unwrap(), "big:1"]);
    let save = t.elapsed().as_secs_f64();
    let v2 = Dockerd::start("overlay2", &[]);
    let t = Instant::now();
    v2.docker(&["load", "-i", saved.to_str().unwrap()]);
    let load = t.elapsed().as_secs_f64();
    drop(v2);
    std::fs::remove_file(&saved).ok();
    v1.stop();
    (s, v1, save, load)
}

fn run(driver: &str, total_mb: u64, layers: u64, convert: fn(&Path)) {
    let (s, d, save, load) = store(total_mb, layers);
    let root = d.data_root();
    let layer_bytes: u64 = std::fs::read_dir(root.join("image/overlay/layerdb/sha256"))
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_to_string(e.path().join("size"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    convert(&root);
    let daemon_json = s.root.path().join("daemon.json");
    nix::unistd::sync();
    let before = written_bytes();
    let migrate = tool(&[
        "migrate",
        "--data-root",
        root.to_str().unwrap(),
        "--daemon-json",
        daemon_json.to_str().unwrap(),
        "--json",
    ]);
    let written = written_bytes() - before;
    let verify = tool(&["verify", "--data-root", root.to_str().unwrap(), "--json"]);
    let mb = layer_bytes as f64 / 1e6;
    println!("{driver}: {layers} layers, {mb:.0} MB of layers");
    println!("  migrate       {migrate:>7.2} s  {:>6.0} MB/s  bytes written {written} ({:.3}% of layer bytes)", mb / migrate, written as f64 * 100.0 / layer_bytes.max(1) as f64);
    println!("  verify        {verify:>7.2} s  {:>6.0} MB/s", mb / verify);
    println!("  docker save + load {:.2} s ({save:.2} + {load:.2}); migrate / (save + load) = {:.3}, with verify {:.3}", save + load, migrate / (save + load), (migrate + verify) / (save + load));
    let case = format!("{driver}, {layers} layers of {mb:.0} MB: migrate");
    Row::new("migrate", &case, "s", migrate)
        .against("docker save + load", save + load)
        .report();
    let case = format!("{driver}: bytes written, % of layer bytes");
    let percent = written as f64 * 100.0 / layer_bytes.max(1) as f64;
    Row::new("migrate", &case, "%", percent).report();
    Row::new("migrate", &format!("{driver}: verify"), "MB/s", mb / verify).report();
}

fn main() {
    let a: Vec<u64> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("a number"))
        .collect();
    let (mb, layers) = (
        a.first().copied().unwrap_or(2000),
        a.get(1).copied().unwrap_or(50),
    );
    let (dm_mb, dm_layers) = (
        a.get(2).copied().unwrap_or(300),
        a.get(3).copied().unwrap_or(10),
    );
    println!(
        "migrate-tool benchmark (goal for aufs and overlay: bytes written under 1% of layer bytes)"
    );
    // A size of 0 skips those drivers (e.g. `migrate-bench 0 0 300 10`: devicemapper only).
    if mb > 0 {
        run("overlay", mb, layers, |_| {});
        run("aufs", mb, layers, overlay_to_aufs);
    }
    if dm_mb > 0 {
        run("devicemapper", dm_mb, dm_layers, overlay_to_devicemapper);
    }
}
