//! Build benchmarks, each against peers in the same run:
//! (a) eight independent stages of `sleep 2` (waiting, as downloads do): default parallelism vs
//!     `--max-parallelism 1`;
//! (b) a fully cached rebuild of a 20-step Dockerfile vs its uncached build;
//! (c) a rebuild after changing the file copied at step 10 of 20 vs the uncached build;
//! (e) four independent stages of ~2 s of CPU each: default parallelism vs `--max-parallelism 1`;
//! (d) the export of a ~300 MB image as an OCI archive, gzip (the default) vs uncompressed: time
//!     and size; and its push to a local registry, strata vs `docker push` (dockerd 20.10);
//! and the same through BuildKit in Debian's dockerd 20.10 (`DOCKER_BUILDKIT=1 docker build
//! --network none`), started privately by this program, each round of strata's and BuildKit's
//! builds interleaved.
//!
//! `build-bench [REPEATS] [export]` (default 3) prints medians in seconds and the ratios; with
//! `export`, only (d).

use std::process::Command;
use std::time::Instant;
use strata_benches::Row;

use strata_fs_tests::dockerd::{Dockerd, DOCKER};
use strata_fs_tests::registry::Registry;
use strata_fs_tests::strata::Strata;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One builder under test.
trait Builder {
    fn build(&self, s: &Strata, args: &[&str]) -> f64;
}

struct StrataBuild;

impl Builder for StrataBuild {
    fn build(&self, s: &Strata, args: &[&str]) -> f64 {
        let t = Instant::now();
        s.build_ok(args);
        t.elapsed().as_secs_f64()
    }
}

struct BuildKit(Dockerd);

impl Builder for BuildKit {
    fn build(&self, s: &Strata, args: &[&str]) -> f64 {
        let args: Vec<&str> = args
            .iter()
            .map(|a| {
                if *a == "--max-parallelism" {
                    "--max-parallelism-unsupported"
                } else {
                    a
                }
            })
            .collect();
        let t = Instant::now();
        let out = Command::new(DOCKER)
            .arg("-H")
            .arg(self.0.socket())
            .args([
                "build",
                "--network",
                "none",
                "--progress",
                "plain",
                "-t",
                "bench",
            ])
            .args(&args)
            .arg(s.path())
            .env("DOCKER_BUILDKIT", "1")
            .output()
            .expect("docker build");
        assert!(
            out.status.success(),
            "docker build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_secs_f64()
    }
}

/// Medians of one builder's scenarios, in seconds (`None`: the builder has no such flag).
#[derive(Default)]
struct Times {
    par: f64,
    seq: Option<f64>,
    cpu_par: f64,
    cpu_seq: Option<f64>,
    cold: f64,
    cached: f64,
    changed: f64,
}

/// The medians of `repeats` rounds of `build` for each of `builders`, interleaved round by
/// round: this VM's speed drifts by 10-20 % over minutes, and each builder should see the same.
/// `before(round)` runs once at the start of each round.
fn interleaved(
    builders: &[&dyn Builder],
    repeats: usize,
    before: impl Fn(usize),
    build: impl Fn(&dyn Builder) -> f64,
) -> Vec<f64> {
    let mut times = vec![Vec::new(); builders.len()];
    for round in 0..repeats {
        before(round);
        for (i, b) in builders.iter().enumerate() {
            times[i].push(build(*b));
        }
    }
    times.into_iter().map(median).collect()
}

/// A context of `stages` independent stages running `run`, copied into a final stage.
fn stages_context(stages: usize, run: &str) -> Strata {
    let s = Strata::new();
    let mut df = String::new();
    for i in 0..stages {
        df.push_str(&format!(
            "FROM busybox AS s{i}\nRUN {run}; echo {i} > /out{i}\n"
        ));
    }
    df.push_str("FROM busybox\n");
    for i in 0..stages {
        df.push_str(&format!("COPY --from=s{i} /out{i} /\n"));
    }
    s.dockerfile(&df);
    s
}

/// About 2 s of one core in busybox's shell (a compiler-like CPU-bound step).
const CPU_2S: &str = "i=0; while [ $i -lt 1200000 ]; do i=$((i+1)); done";

/// Every scenario for each builder (strata first: only it has `--max-parallelism`).
fn scenarios(builders: &[&dyn Builder], repeats: usize) -> Vec<Times> {
    let mut t: Vec<Times> = builders.iter().map(|_| Times::default()).collect();
    let nothing = |_| {};
    fn uncached<'a>(s: &'a Strata, extra: &'a [&'a str]) -> impl Fn(&dyn Builder) -> f64 + 'a {
        let args: Vec<&str> = ["--no-cache"].iter().chain(extra).copied().collect();
        move |b: &dyn Builder| b.build(s, &args)
    }
    let sleeps = stages_context(8, "sleep 2");
    let cpu = stages_context(4, CPU_2S);
    let seq = ["--max-parallelism", "1"];
    for (i, v) in interleaved(builders, repeats, nothing, uncached(&sleeps, &[]))
        .into_iter()
        .enumerate()
    {
        t[i].par = v;
    }
    for (i, v) in interleaved(builders, repeats, nothing, uncached(&cpu, &[]))
        .into_iter()
        .enumerate()
    {
        t[i].cpu_par = v;
    }
    let strata = &builders[..1];
    t[0].seq = interleaved(strata, repeats, nothing, uncached(&sleeps, &seq)).pop();
    t[0].cpu_seq = interleaved(strata, repeats, nothing, uncached(&cpu, &seq)).pop();

    let s = Strata::new();
    let mut df = String::from("FROM busybox\n");
    s.file("step10.txt", "v0");
    for i in 1..20 {
        if i == 10 {
            df.push_str("COPY step10.txt /step10.txt\n");
        } else {
            df.push_str(&format!("RUN echo step {i} > /f{i}\n"));
        }
    }
    s.dockerfile(&df);
    let cold = interleaved(builders, repeats, nothing, uncached(&s, &[]));
    let cached = interleaved(builders, repeats, nothing, |b| b.build(&s, &[]));
    let step10 = |round: usize| drop(s.file("step10.txt", &format!("v{}", round + 1)));
    let changed = interleaved(builders, repeats, step10, |b| b.build(&s, &[]));
    for (i, t) in t.iter_mut().enumerate() {
        (t.cold, t.cached, t.changed) = (cold[i], cached[i], changed[i]);
    }
    t
}

/// About 300 MB of text in one layer (compressible, as most layers are).
const IMAGE_300MB: &str = "FROM busybox\nRUN seq 1 36000000 > /numbers\n";

/// (d): the image exported after it is built; once each, since an export remembers the
/// compressed blob it made.
fn export() {
    let s = Strata::new();
    s.dockerfile(IMAGE_300MB);
    let out = |name: &str| s.root.path().join(name);
    let spec = |name: &str, extra: &str| format!("type=oci,dest={}{extra}", out(name).display());
    // The build and the layer's diff, once: what follows times the export.
    s.build_ok(&["--output", &spec("warm.tar", ",compression=uncompressed")]);
    let time = |name: &str, extra: &str| {
        let t = Instant::now();
        s.build_ok(&["--output", &spec(name, extra)]);
        let size = std::fs::metadata(out(name)).unwrap().len() as f64 / 1e6;
        (t.elapsed().as_secs_f64(), size)
    };
    let (gz, gz_size) = time("gzip.tar", "");
    let (raw, raw_size) = time("raw.tar", ",compression=uncompressed");
    println!("(d) export of a 300 MB image  gzip    {gz:>6.2}s {gz_size:>6.0} MB   uncompressed {raw:>6.2}s {raw_size:>6.0} MB   time ratio {:.2}, size ratio {:.2}", gz / raw, gz_size / raw_size);
    let case = "export of a 300 MB image, gzip vs uncompressed (size)";
    Row::new("build", case, "MB", gz_size)
        .against("uncompressed", raw_size)
        .report();
    push();
}

/// The image pushed to a fresh local registry: `strata build --output type=registry` (the build
/// cached: export, gzip at its default level and upload) vs `docker push` of it loaded into
/// dockerd 20.10 (its gzip at its default level and upload), each to a repository of its own.
fn push() {
    if Command::new("dockerd").arg("--version").output().is_err() {
        return println!("(d) push: dockerd is not installed; no comparison");
    }
    // A store of its own: a compressed blob, once made, is remembered, and the export above
    // would have made this push an upload only.
    let s = Strata::new();
    s.dockerfile(IMAGE_300MB);
    s.build_ok(&[]);
    let reg = Registry::start();
    let t = Instant::now();
    let to = format!("type=registry,name={}/strata/push:1", reg.host);
    s.build_ok(&["--output", &to]);
    let strata = t.elapsed().as_secs_f64();
    let name = format!("{}/docker/push:1", reg.host);
    let archive = s.root.path().join("push-docker.tar");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name={name}", archive.display()),
    ]);
    let d = Dockerd::start("overlay2", &[]);
    d.load(&archive);
    let t = Instant::now();
    d.docker(&["push", &name]);
    let docker = t.elapsed().as_secs_f64();
    println!("(d) push of the 300 MB image  strata  {strata:>6.2}s   docker push {docker:>6.2}s   ratio {:.2}", strata / docker);
    Row::new(
        "build",
        "push of a 300 MB image to a local registry",
        "s",
        strata,
    )
    .against("docker push", docker)
    .report();
}

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPEATS is a number"))
        .unwrap_or(3);
    if std::env::args().nth(2).as_deref() == Some("export") {
        return export();
    }
    // BuildKit's base image: the same busybox, exported by strata as a docker archive.
    let buildkit = Command::new("dockerd")
        .arg("--version")
        .output()
        .is_ok()
        .then(|| {
            let base = Strata::new();
            base.dockerfile("FROM busybox\n");
            let archive = base.root.path().join("busybox-docker.tar");
            let spec = format!("type=docker,dest={},name=busybox:latest", archive.display());
            base.build_ok(&["--output", &spec]);
            let d = Dockerd::start("overlay2", &[]);
            d.load(&archive);
            BuildKit(d)
        });
    let mut builders: Vec<&dyn Builder> = vec![&StrataBuild];
    builders.extend(buildkit.as_ref().map(|b| b as &dyn Builder));
    let times = scenarios(&builders, repeats);
    drop(buildkit);
    let t = &times[0];
    let (par, cold, cached, changed) = (t.par, t.cold, t.cached, t.changed);
    let seq = t.seq.expect("measured");
    let cpu_seq = t.cpu_seq.expect("measured");
    println!("strata build benchmarks, median of {repeats} (seconds)");
    println!("(a) 8 parallel stages of 2 s   default {par:>6.2}   --max-parallelism 1 {seq:>6.2}   speed-up {:.2}", seq / par);
    println!("(e) 4 stages of 2 s of CPU     default {:>6.2}   --max-parallelism 1 {cpu_seq:>6.2}   speed-up {:.2}", t.cpu_par, cpu_seq / t.cpu_par);
    println!("(b) 20 steps, fully cached      cached  {cached:>6.2}   uncached            {cold:>6.2}   ratio {:.3}", cached / cold);
    println!("(c) 20 steps, step 10 changed   rebuild {changed:>6.2}   uncached            {cold:>6.2}   ratio {:.2}", changed / cold);
    let seq_peer = "--max-parallelism 1";
    Row::new("build", "8 stages of `sleep 2`", "s", par)
        .against(seq_peer, seq)
        .report();
    Row::new("build", "4 stages of 2 s of CPU", "s", t.cpu_par)
        .against(seq_peer, cpu_seq)
        .report();

    export();

    let Some(bk) = times.get(1) else {
        println!("BuildKit: dockerd is not installed (Debian docker.io); no comparison");
        return;
    };
    let (bpar, bcold, bcached, bchanged) = (bk.par, bk.cold, bk.cached, bk.changed);
    println!("BuildKit (dockerd 20.10) in the same run, rounds interleaved with strata's, median of {repeats} (seconds); ratio = strata / BuildKit");
    println!(
        "(a) 8 parallel stages           strata  {par:>6.2}   BuildKit {bpar:>6.2}   ratio {:.2}",
        par / bpar
    );
    println!(
        "(e) 4 CPU stages                strata  {:>6.2}   BuildKit {:>6.2}   ratio {:.2}",
        t.cpu_par,
        bk.cpu_par,
        t.cpu_par / bk.cpu_par
    );
    println!("(b) 20 steps, fully cached      strata  {cached:>6.2}   BuildKit {bcached:>6.2}   ratio {:.2}", cached / bcached);
    println!("(c) 20 steps, step 10 changed   strata  {changed:>6.2}   BuildKit {bchanged:>6.2}   ratio {:.2}", changed / bchanged);
    println!(
        "    20 steps, uncached          strata  {cold:>6.2}   BuildKit {bcold:>6.2}   ratio {:.2}",
        cold / bcold
    );
    let rows = [
        ("8 stages of `sleep 2`", par, bpar),
        ("4 stages of 2 s of CPU", t.cpu_par, bk.cpu_par),
        ("20 steps, fully cached", cached, bcached),
        ("20 steps, step 10 changed", changed, bchanged),
        ("20 steps, uncached", cold, bcold),
    ];
    for (case, strata, buildkit) in rows {
        Row::new("build", case, "s", strata)
            .against("BuildKit (dockerd 20.10)", buildkit)
            .report();
    }
}
