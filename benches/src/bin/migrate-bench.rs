//! migrate-tool on a generated store (default ~2 GB across 50 layers) made by a real dockerd on the
//! overlay (v1) driver: wall time and bytes written by `migrate`, `verify` throughput, against
//! `docker save` + `docker load` of the same image into a dockerd on overlay2, in the same run.
//!
//! `migrate-bench [TOTAL_MB] [LAYERS]`

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use strata_fs_tests::dockerd::Dockerd;
use strata_fs_tests::strata::Strata;

fn used_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).expect("statvfs");
    (s.blocks() - s.blocks_free()) * s.fragment_size()
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

fn main() {
    let mut args = std::env::args().skip(1);
    let total_mb: u64 = args
        .next()
        .map(|a| a.parse().expect("TOTAL_MB"))
        .unwrap_or(2000);
    let layers: u64 = args
        .next()
        .map(|a| a.parse().expect("LAYERS"))
        .unwrap_or(50);
    let per_layer = total_mb / layers;

    let s = Strata::new();
    let mut df = String::from("FROM busybox\n");
    for i in 0..layers {
        // Half random (incompressible) data, half many small files.
        df.push_str(&format!("RUN head -c {}m /dev/urandom > /blob{i} && mkdir /small{i} && for j in $(seq 1 200); do echo $j > /small{i}/$j; done\n", per_layer.max(1)));
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
    // The peer: docker save from the old daemon + docker load into an overlay2 daemon.
    let saved = s.root.path().join("saved.tar");
    let t = Instant::now();
    v1.docker(&["save", "-o", saved.to_str().unwrap(), "big:1"]);
    let save = t.elapsed().as_secs_f64();
    let v2 = Dockerd::start("overlay2", &[]);
    let t = Instant::now();
    v2.docker(&["load", "-i", saved.to_str().unwrap()]);
    let load = t.elapsed().as_secs_f64();
    drop(v2);
    v1.stop();

    let root = v1.data_root();
    let daemon_json = s.root.path().join("daemon.json");
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
    let before = used_bytes(&root);
    let migrate = tool(&[
        "migrate",
        "--data-root",
        root.to_str().unwrap(),
        "--daemon-json",
        daemon_json.to_str().unwrap(),
        "--json",
    ]);
    let written = used_bytes(&root).saturating_sub(before);
    let verify = tool(&["verify", "--data-root", root.to_str().unwrap(), "--json"]);
    let mb = layer_bytes as f64 / 1e6;
    println!("migrate-tool on overlay v1: {layers} layers, {mb:.0} MB of layers");
    println!("migrate        {migrate:>7.2} s   bytes written {written} ({:.3}% of layer bytes; goal < 1%)", written as f64 * 100.0 / layer_bytes.max(1) as f64);
    println!("verify         {verify:>7.2} s   {:.0} MB/s", mb / verify);
    println!(
        "docker save    {save:>7.2} s   + docker load {load:>7.2} s = {:.2} s",
        save + load
    );
    println!(
        "ratio migrate / (save + load) = {:.3}; (migrate + verify) / (save + load) = {:.3}",
        migrate / (save + load),
        (migrate + verify) / (save + load)
    );
}
