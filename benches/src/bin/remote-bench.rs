//! Remote builds over ssh, strata vs docker (BuildKit in dockerd 20.10), same machine, same link,
//! same Dockerfile and context, in one run: `strata build --builder ssh://root@NS/...` and
//! `DOCKER_HOST=ssh://root@NS docker build`, both through Debian's sshd in a network namespace
//! (its sessions' `docker system dial-stdio` reaches a private dockerd, `strata dial-stdio` a
//! `strata serve`). Cold build, one-file-changed rebuild, no-change rebuild; seconds and bytes
//! on the link, per link rate.
//!
//! Usage: remote-bench [CONTEXT_MB] [RATE,...] (default 64, "20mbit,unlimited")

use std::path::Path;
use std::process::Command;
use std::time::Instant;
use strata_benches::Row;

use strata_fs_tests::dockerd::{Dockerd, DOCKER};
use strata_fs_tests::image::noise;
use strata_fs_tests::remote::{Builder, Netns, Sshd};
use strata_fs_tests::strata::Strata;

/// Seconds and bytes sent on the link for one build.
type Cost = (f64, u64);

fn context(dir: &Path, mb: usize, seed: u64) {
    let per = (mb << 20) / 2000 + 1;
    for i in 0..2000u64 {
        let p = dir.join(format!("data/{:02}/f{i:04}", i % 40));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, noise(seed * 10_000 + i, per)).unwrap();
    }
    std::fs::write(dir.join("small.txt"), "one\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCOPY data /data\nRUN find /data -type f | wc -l > /count\nCOPY small.txt /small.txt\nRUN cat /small.txt > /seen\n",
    )
    .unwrap();
}

/// Runs `cmd`, which must succeed; its time and the link's bytes.
fn measure(ns: &Netns, mut cmd: Command) -> Cost {
    let (bytes, t) = (ns.sent(), Instant::now());
    let out = cmd.output().expect("run the client");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (t.elapsed().as_secs_f64(), ns.sent() - bytes)
}

/// Cold, one file changed, nothing changed.
fn rounds(ns: &Netns, ctx: &Path, client: impl Fn() -> Command) -> [Cost; 3] {
    let cold = measure(ns, client());
    std::fs::write(ctx.join("small.txt"), "two\n").unwrap();
    let changed = measure(ns, client());
    let same = measure(ns, client());
    [cold, changed, same]
}

fn main() {
    let mb: usize = std::env::args()
        .nth(1)
        .map_or(64, |s| s.parse().expect("CONTEXT_MB"));
    let rates = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "20mbit,unlimited".into());
    let store = Strata::new();
    store.dockerfile("FROM busybox\n");
    let archive = store.root.path().join("busybox-docker.tar");
    store.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=busybox:latest", archive.display()),
    ]);
    let builder = Builder::start(None, store.root.path());
    let dockerd = Dockerd::start("overlay2", &[]);
    dockerd.load(&archive);
    println!("remote builds over ssh: {mb} MiB context of 2000 files; strata serve vs dockerd 20.10 (BuildKit)");
    println!(
        "{:<10} {:<14} {:>9} {:>11} {:>9} {:>11} {:>7} {:>7}",
        "link", "build", "strata s", "strata MB", "docker s", "docker MB", "time", "bytes"
    );
    for (n, rate) in rates.split(',').enumerate() {
        let ns = Netns::new((rate != "unlimited").then_some(rate));
        let host = format!("unix://{}", dockerd.socket());
        let sshd = Sshd::start_with(&ns, &[("DOCKER_HOST", &host)]);
        let path = format!(
            "{}:{}",
            sshd.client_path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let (sctx, dctx) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        context(sctx.path(), mb, 2 * n as u64 + 1);
        context(dctx.path(), mb, 2 * n as u64 + 2);
        let address = format!("ssh://root@{}{}", sshd.address, builder.socket.display());
        let strata = rounds(&ns, sctx.path(), || {
            let mut c = Command::new(strata_fs_tests::workspace_bin("strata"));
            c.args(["build", "--progress", "quiet", "--builder", &address])
                .arg(sctx.path())
                .env("PATH", &path);
            c
        });
        let docker_host = format!("ssh://root@{}", sshd.address);
        let docker = rounds(&ns, dctx.path(), || {
            let mut c = Command::new(DOCKER);
            c.args(["build", "-q", "--network=none"]).arg(dctx.path());
            c.env("PATH", &path)
                .env("DOCKER_HOST", &docker_host)
                .env("DOCKER_BUILDKIT", "1");
            c
        });
        for (i, name) in ["cold", "1 file changed", "no change"].iter().enumerate() {
            let ((st, sb), (dt, db)) = (strata[i], docker[i]);
            let mbs = |b: u64| b as f64 / 1e6;
            println!(
                "{rate:<10} {name:<14} {st:>9.2} {:>11.2} {dt:>9.2} {:>11.2} {:>7.2} {:>7.2}",
                mbs(sb),
                mbs(db),
                st / dt,
                sb as f64 / db.max(1) as f64
            );
            let case = format!("{mb} MiB context over ssh, {rate}, {name}");
            Row::new("remote", &case, "s", st)
                .against("docker build over ssh (BuildKit)", dt)
                .report();
        }
    }
    drop(builder);
}
