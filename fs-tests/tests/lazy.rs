//! Lazy layers end to end: an image converted to zstd:chunked in a real registry, pulled lazily
//! through containerd into strata, run with `ctr run` before the layer is fetched, and compared
//! file by file with the original; tampered chunks, bad TOCs, a stopped registry, a restarted
//! snapshotter.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::{metric, Daemon};
use strata_fs_tests::image::{busybox_layer, noise, write_oci_archive, LayerBuilder};
use strata_fs_tests::registry::Registry;
use strata_fs_tests::{snapshotter_cli, workspace_bin};

/// The data layer: many small files, a few large ones (several chunks each), a symlink, and a
/// whiteout of a busybox file. Returns the layer and the expected sha256 of each file.
fn data_layer(small: usize, big: usize, big_size: usize) -> (Vec<u8>, BTreeMap<String, String>) {
    let mut b = LayerBuilder::default();
    let mut sums = BTreeMap::new();
    for i in 0..small {
        let data = noise(i as u64, 500 + (i * 37) % 7000);
        let path = format!("data/small/f{i:04}");
        sums.insert(format!("/{path}"), hex::encode(Sha256::digest(&data)));
        b.file(&path, 0o644, &data);
    }
    for i in 0..big {
        let data = noise(1000 + i as u64, big_size);
        let path = format!("data/big-{i}");
        sums.insert(format!("/{path}"), hex::encode(Sha256::digest(&data)));
        b.file(&path, 0o600, &data);
    }
    b.symlink("data/link", "big-0");
    b.whiteout("bin", "vi");
    b.opaque("usr/sbin");
    b.file("usr/sbin/only-this", 0o755, b"#!/bin/sh\n");
    (b.finish(), sums)
}

/// `sha256sum` output as path → sum.
fn sums_of(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (path.to_string(), sum.to_string()))
        .collect()
}

/// An OCI archive of busybox with `data` on top.
fn app_archive(dir: &Path, data: Vec<u8>) -> std::path::PathBuf {
    let archive = dir.join("app.tar");
    write_oci_archive(
        &archive,
        "docker.io/strata/app:1",
        &[busybox_layer().finish(), data],
        &["/bin/sh"],
    );
    archive
}

/// `strata-snapshotter convert ARGS`, which must succeed.
fn convert(args: &[&str]) {
    snapshotter_cli(&[&["convert"], args].concat());
}

struct Setup {
    reg: Registry,
    lazy_ref: String,
    sums: BTreeMap<String, String>,
    dir: tempfile::TempDir,
}

fn setup(small: usize, big: usize, big_size: usize) -> Setup {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let (data, sums) = data_layer(small, big, big_size);
    let archive = app_archive(dir.path(), data);
    reg.push_archive(&archive, "strata/app:1");
    let lazy_ref = format!("{}/strata/app:lazy", reg.host);
    let src = format!("{}/strata/app:1", reg.host);
    convert(&["--chunk-size", "1048576", &src, &lazy_ref]);
    Setup {
        reg,
        lazy_ref,
        sums,
        dir,
    }
}

fn config(dir: &Path, extra: &str) -> String {
    let p = dir.join("snapshotter.toml");
    std::fs::write(
        &p,
        format!("[lazy]\nfetch_timeout_secs = 3\nfetch_retries = 0\n{extra}"),
    )
    .unwrap();
    p.display().to_string()
}

fn try_pull_lazy(c: &Containerd, reference: &str) -> std::process::Output {
    Command::new(workspace_bin("strata-snapshotter"))
        .args(["pull", "--lazy", reference, "--containerd-address"])
        .arg(&c.address)
        .args(["--namespace", &c.namespace])
        .output()
        .unwrap()
}

/// `strata-snapshotter pull --lazy`, which must succeed; returns what it printed.
fn pull_lazy(c: &Containerd, reference: &str) -> String {
    let out = try_pull_lazy(c, reference);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pull --lazy {reference}: {text}");
    text
}

/// `ctr run --rm --snapshotter strata IMAGE ID CMD...`, which must succeed; returns its stdout.
fn ctr_run(c: &Containerd, image: &str, id: &str, cmd: &[&str]) -> String {
    c.ctr(&[&["run", "--rm", "--snapshotter", "strata", image, id], cmd].concat())
}

/// strata-snapshotter with `[lazy]` settings `extra` (config file in `dir`), and its containerd.
fn lazy_daemon(dir: &Path, extra: &str) -> (Daemon, Containerd) {
    let d = Daemon::start_with(&["--config", &config(dir, extra)]);
    let c = Containerd::start(&d.socket);
    (d, c)
}

#[test]
fn lazy_pull_runs_before_the_layer_is_fetched_and_matches_the_original() {
    let s = setup(300, 3, 5 << 20);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (d, c) = lazy_daemon(
        s.dir.path(),
        &format!("background_fetch = false\nmetrics_address = \"127.0.0.1:{port}\"\n"),
    );
    let text = pull_lazy(&c, &s.lazy_ref);
    assert!(text.contains("mounted lazily"), "{text}");

    // A few files read: right content, and most of the layer never fetched.
    let run = ctr_run(
        &c,
        &s.lazy_ref,
        "few",
        &["sha256sum", "/data/small/f0007", "/data/big-1"],
    );
    for line in run.lines() {
        let (sum, path) = line.split_once("  ").unwrap();
        assert_eq!(s.sums[path], sum, "{path}");
    }
    let st = d.lazy_metrics();
    let (fetched, total) = (
        metric(&st, "strata_lazy_fetched_bytes_total"),
        metric(&st, "strata_lazy_layer_bytes"),
    );
    assert!(
        fetched > 0 && fetched < total / 2,
        "fetched {fetched} of {total}:\n{st}"
    );

    // Everything, through FUSE: equal to the original, whiteout and symlink included.
    let all = ctr_run(&c, &s.lazy_ref, "all", &["sh", "-c",
        "find /data -type f -exec sha256sum {} + ; readlink /data/link; test -e /bin/vi || echo vi-gone; test -e /bin/ls && echo ls-here; echo sbin: $(ls /usr/sbin)"]);
    let seen = sums_of(&all);
    assert_eq!(seen, s.sums);
    assert!(
        all.lines().any(|l| l == "big-0"),
        "readlink /data/link prints exactly its target: {all}"
    );
    assert!(all.contains("vi-gone") && all.contains("ls-here"), "{all}");
    assert!(
        all.contains("sbin: only-this\n"),
        "an opaque directory hides the layer below: {all}"
    );
    assert_eq!(
        metric(&d.lazy_metrics(), "strata_lazy_verify_failures_total"),
        0
    );
    // Writes in the container copy files up from the FUSE lower; deletes leave whiteouts.
    let rw = ctr_run(&c, &s.lazy_ref, "rw", &["sh", "-c",
        "echo more >> /data/small/f0001 && tail -c 5 /data/small/f0001; rm /data/big-0 && test ! -e /data/big-0 && echo removed; mv /data/small /data/moved && ls /data/moved | wc -l; chmod 600 /data/moved/f0002 && stat -c %a /data/moved/f0002"]);
    assert_eq!(
        rw.split_whitespace().collect::<Vec<_>>(),
        ["more", "removed", "300", "600"],
        "{rw}"
    );
    // The metrics endpoint serves the same counters.
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut conn, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut conn, &mut body).unwrap();
    assert!(
        body.contains("strata_lazy_fetched_bytes_total{layer=\"sha256:"),
        "{body}"
    );
    // The first mount recorded the order files were opened in, for later prefetches.
    let recorded: String = std::fs::read_dir(d.root.join("lazy/access"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect();
    let first = recorded.lines().position(|l| l == "data/small/f0007");
    let later = recorded.lines().position(|l| l == "data/small/f0001");
    assert!(first.is_some() && first < later, "{recorded}");
}

/// The data layer's descriptor and its TOC, from the registry.
fn data_layer_toc(
    s: &Setup,
) -> (
    strata_image::oci::Descriptor,
    strata_image::chunked::toc::Toc,
) {
    layer_toc(&s.lazy_ref, 1)
}

/// Layer `index` of `reference` and its TOC, from the registry.
fn layer_toc(
    reference: &str,
    index: usize,
) -> (
    strata_image::oci::Descriptor,
    strata_image::chunked::toc::Toc,
) {
    use strata_image::registry::{Client, Options, Reference};
    let c = Client::new(Options::default());
    let r = Reference::parse(reference).unwrap();
    let (bytes, _, _) = c.manifest(&r).unwrap();
    let m: strata_image::oci::Manifest = serde_json::from_slice(&bytes).unwrap();
    let layer = m.layers[index].clone();
    let fetch = |a: u64, b: u64| -> std::io::Result<Vec<u8>> {
        c.blob_range(&r, &layer.digest, a, b)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    let toc = strata_image::chunked::lazy::read_toc(&layer.annotations, layer.size, &fetch, false)
        .unwrap();
    (layer, toc)
}

#[test]
fn tampered_chunks_fail_with_eio_and_are_never_served() {
    let s = setup(20, 3, 3 << 20);
    let (layer, toc) = data_layer_toc(&s);
    let big2 = toc.entries.iter().find(|e| e.name == "data/big-2").unwrap();
    // Flip a byte inside big-2's second chunk in the registry's storage.
    let second = toc
        .entries
        .iter()
        .find(|e| e.name == "data/big-2" && e.kind == "chunk")
        .unwrap();
    let path = s.reg.blob_path(&layer.digest);
    let mut blob = std::fs::read(&path).unwrap();
    blob[((second.offset + second.end_offset) / 2) as usize] ^= 0x55;
    std::fs::write(&path, &blob).unwrap();
    assert!(big2.size > second.chunk_offset);

    let (d, c) = lazy_daemon(s.dir.path(), "background_fetch = false\n");
    pull_lazy(&c, &s.lazy_ref);
    let run = c.try_ctr(&["run", "--rm", "--snapshotter", "strata", &s.lazy_ref, "bad", "sh", "-c",
        "head -c 1048576 /data/big-2 | sha256sum; cat /data/big-2 > /dev/null && echo READ-ALL || echo read-failed; sha256sum /data/big-0"]);
    let text =
        String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(
        text.contains("read-failed") && !text.contains("READ-ALL"),
        "{text}"
    );
    assert!(
        text.contains("I/O error") || text.contains("Input/output error"),
        "{text}"
    );
    assert!(
        text.contains(&s.sums["/data/big-0"]),
        "other files still read: {text}"
    );
    let st = d.lazy_metrics();
    assert!(
        metric(&st, "strata_lazy_verify_failures_total") >= 1,
        "{st}"
    );
    // The bad bytes were not cached: every cached chunk hashes to its name.
    assert_cache_verified(&d.root);
    let log = std::fs::read_dir(d.root.join("snapshots"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("lazy/serve.log")).ok())
        .collect::<String>();
    assert!(log.contains("not served"), "the failure is logged: {log}");
}

#[test]
fn bad_tocs_and_plain_layers() {
    let s = setup(5, 1, 100_000);
    use strata_image::registry::{Client, Options, Reference};
    let client = Client::new(Options::default());
    let r = Reference::parse(&s.lazy_ref).unwrap();
    let (bytes, _, _) = client.manifest(&r).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let key = "io.github.containers.zstd-chunked.manifest-checksum";
    m["layers"][1]["annotations"][key] = format!("sha256:{}", "0".repeat(64)).into();
    let bad_ref = Reference::parse(&format!("{}/strata/app:badtoc", s.reg.host)).unwrap();
    client
        .push_manifest(
            &bad_ref,
            &serde_json::to_vec(&m).unwrap(),
            "application/vnd.oci.image.manifest.v1+json",
        )
        .unwrap();

    let (d, c) = lazy_daemon(s.dir.path(), "");
    let out = try_pull_lazy(&c, &bad_ref.to_string());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("TOC's digest"),
        "{err}"
    );

    // A layer that is not zstd:chunked is pulled whole, and said so.
    let plain = format!("{}/strata/app:1", s.reg.host);
    let text = pull_lazy(&c, &plain);
    assert!(
        text.contains("neither zstd:chunked nor eStargz: pulled whole"),
        "{text}"
    );
    let run = ctr_run(&c, &plain, "plain", &["sha256sum", "/data/big-0"]);
    assert!(run.contains(&s.sums["/data/big-0"]), "{run}");
    assert!(d.log_text().contains("falling back to a full pull"));
}

#[test]
fn a_stopped_registry_gives_eio_in_bounded_time_and_reads_resume() {
    let mut s = setup(5, 2, 2 << 20);
    let (d, c) = lazy_daemon(s.dir.path(), "background_fetch = false\n");
    pull_lazy(&c, &s.lazy_ref);
    // What starting a container reads (the shell, /etc/passwd and /etc/group) is fetched first,
    // so that it is a read inside the running container that meets the stopped registry.
    ctr_run(
        &c,
        &s.lazy_ref,
        "warm",
        &["sh", "-c", "cat /etc/passwd /etc/group > /dev/null"],
    );
    s.reg.stop();
    let started = std::time::Instant::now();
    let run = c.try_ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &s.lazy_ref,
        "down",
        "sh",
        "-c",
        "cat /data/big-1 > /dev/null && echo READ || echo failed",
    ]);
    let text =
        String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the container itself runs: {text}");
    assert!(
        text.contains("read error: Input/output error")
            && text.contains("failed")
            && !text.contains("READ"),
        "the read fails with EIO: {text}"
    );
    // A hang guard, not a speed check: the registry refuses connections at once.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "bounded: {:?}",
        started.elapsed()
    );
    s.reg.start_again();
    let run = ctr_run(&c, &s.lazy_ref, "up", &["sha256sum", "/data/big-1"]);
    assert!(run.contains(&s.sums["/data/big-1"]), "{run}");
    assert!(metric(&d.lazy_metrics(), "strata_lazy_fetch_errors_total") >= 1);
}

#[test]
fn a_running_container_reads_on_across_a_snapshotter_kill_and_restart() {
    let s = setup(200, 2, 2 << 20);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(s.dir.path(), "background_fetch = false\n");
    let mut d = Daemon::start_in_with(dir.path(), &["--config", &cfg]);
    let c = Containerd::start(&d.socket);
    pull_lazy(&c, &s.lazy_ref);
    // The container reads every file, a few at a time, for about four seconds; it says when it
    // has begun, and the daemon is killed then, with reads before and after the kill.
    let mut reader = c
        .ctr_command(&["run", "--rm", "--snapshotter", "strata", &s.lazy_ref, "reader", "sh", "-c",
            "echo begun; for i in $(seq 0 199); do f=$(printf /data/small/f%04d $i); sha256sum $f > /dev/null || echo FAIL $f; sleep 0.02; done; sha256sum /data/big-1; echo done"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(reader.stdout.take().unwrap());
    let mut text = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut text).unwrap();
    assert_eq!(text.trim(), "begun", "the reader did not start");
    d.kill9();
    d.start_again();
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    let out = reader.wait_with_output().unwrap();
    text += &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("done") && !text.contains("FAIL"), "{text}");
    assert!(text.contains(&s.sums["/data/big-1"]), "{text}");
    // After the restart the layers are still served and still listed.
    c.wait_for_snapshotter("strata");
    let run = ctr_run(&c, &s.lazy_ref, "after", &["sha256sum", "/data/big-0"]);
    assert!(run.contains(&s.sums["/data/big-0"]), "{run}");
    assert!(metric(&d.lazy_metrics(), "strata_lazy_layer_bytes") > 0);
}

/// Layers written by another implementation (skopeo's containers/image) are served too.
#[test]
fn layers_converted_by_skopeo_are_served() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let (data, sums) = data_layer(50, 1, 3 << 20);
    let archive = app_archive(dir.path(), data);
    let image = format!("{}/strata/app:skopeo", reg.host);
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-compress-format",
            "zstd:chunked",
            "--dest-compress",
        ])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_daemon, c) = lazy_daemon(dir.path(), "background_fetch = false\n");
    let text = pull_lazy(&c, &image);
    assert!(text.contains("mounted lazily"), "{text}");
    let all = ctr_run(
        &c,
        &image,
        "sk",
        &["sh", "-c", "find /data -type f -exec sha256sum {} +"],
    );
    let seen = sums_of(&all);
    assert_eq!(seen, sums);
}

/// `ctr-remote` (stargz-snapshotter's ctr) against `c`'s containerd in namespace `ns`.
fn ctr_remote(c: &Containerd, ns: &str, args: &[&str]) -> String {
    let out = Command::new("ctr-remote")
        .arg("--address")
        .arg(&c.address)
        .args(["--namespace", ns])
        .args(args)
        .output()
        .expect("ctr-remote is missing: install Debian's stargz-snapshotter (scripts/setup does)");
    assert!(
        out.status.success(),
        "ctr-remote {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether every zstd:chunked manifest-position annotation of `image` lies inside its layer.
fn positions_fit(image: &str) -> bool {
    use strata_image::registry::{Client, Options, Reference};
    let r = Reference::parse(image).unwrap();
    let (bytes, _, _) = Client::new(Options::default()).manifest(&r).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    m["layers"].as_array().unwrap().iter().all(|l| {
        let size = l["size"].as_u64().unwrap();
        let position = l["annotations"]["io.containers.zstd-chunked.manifest-position"].as_str();
        position.is_none_or(|p| {
            let mut f = p.split(':').map(|x| x.parse::<u64>().unwrap_or(u64::MAX));
            let (offset, len) = (f.next().unwrap(), f.next().unwrap_or(u64::MAX));
            offset.saturating_add(len) <= size
        })
    })
}

/// Layers written by stargz-snapshotter's converter, eStargz (gzip) and its zstd:chunked, are
/// served lazily and read back equal to the original, the eStargz landmarks hidden.
#[test]
fn estargz_and_zstd_chunked_layers_from_ctr_remote_are_served() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let (data, sums) = data_layer(60, 2, 3 << 20);
    let archive = app_archive(dir.path(), data);
    let (d, c) = lazy_daemon(dir.path(), "background_fetch = false\n");
    // Converted in a namespace of its own, so the pull below starts from nothing.
    let ns = "convert";
    ctr_remote(
        &c,
        ns,
        &["images", "import", "--no-unpack", archive.to_str().unwrap()],
    );
    for (format, flags) in [
        ("esgz", ["--estargz", "--estargz-chunk-size", "1048576"]),
        (
            "zstdchunked",
            ["--zstdchunked", "--estargz-chunk-size", "1048576"],
        ),
    ] {
        let image = format!("{}/strata/app:{format}", reg.host);
        let mut args = vec!["images", "convert", "--oci"];
        args.extend(flags);
        args.extend(["docker.io/strata/app:1", &image]);
        // ctr-remote (stargz-snapshotter 0.12) converts layers in parallel and now and then
        // writes one layer's zstd:chunked manifest-position on another layer: convert again.
        for attempt in 1..=3 {
            ctr_remote(&c, ns, &args);
            ctr_remote(&c, ns, &["images", "push", "--plain-http", &image]);
            if positions_fit(&image) {
                break;
            }
            eprintln!("ctr-remote wrote a manifest-position beyond its layer (attempt {attempt}); converting again");
            ctr_remote(&c, ns, &["images", "rm", &image]);
        }
        if format == "esgz" {
            // An eStargz layer whose TOC does not match its toc.digest annotation is refused.
            use strata_image::registry::{Client, Options, Reference};
            let client = Client::new(Options::default());
            let r = Reference::parse(&image).unwrap();
            let (bytes, _, _) = client.manifest(&r).unwrap();
            let mut m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            m["layers"][1]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] =
                format!("sha256:{}", "0".repeat(64)).into();
            let bad = Reference::parse(&format!("{}/strata/app:esgz-bad", reg.host)).unwrap();
            let media = "application/vnd.oci.image.manifest.v1+json";
            client
                .push_manifest(&bad, &serde_json::to_vec(&m).unwrap(), media)
                .unwrap();
            let out = try_pull_lazy(&c, &bad.to_string());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("TOC's digest"),
                "{err}"
            );
        }
        let out = try_pull_lazy(&c, &image);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            // Whose fault: the converter's manifest is part of the report.
            use strata_image::registry::{Client, Options, Reference};
            let r = Reference::parse(&image).unwrap();
            let (bytes, _, _) = Client::new(Options::default()).manifest(&r).unwrap();
            panic!(
                "pull --lazy {image}: {text}\nmanifest: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        assert!(text.contains("mounted lazily"), "{format}: {text}");
        let st = d.lazy_metrics();
        let before = metric(&st, "strata_lazy_fetched_bytes_total");
        let hits_before = metric(&st, "strata_lazy_cache_hits_total")
            + metric(&st, "strata_lazy_passthrough_opens_total");
        let one = ctr_run(
            &c,
            &image,
            &format!("{format}-one"),
            &["sha256sum", "/data/big-1"],
        );
        assert!(one.contains(&sums["/data/big-1"]), "{format}: {one}");
        let st = d.lazy_metrics();
        let fetched = metric(&st, "strata_lazy_fetched_bytes_total") - before;
        let hits = metric(&st, "strata_lazy_cache_hits_total")
            + metric(&st, "strata_lazy_passthrough_opens_total")
            - hits_before;
        if format == "esgz" {
            assert!(
                fetched > 3 << 20 && fetched < 6 << 20,
                "{format}: reading one 3 MiB file fetched {fetched} bytes"
            );
        } else {
            // The same content, so the same digests: the cache (chunks and whole files) is
            // shared across formats.
            assert!(
                fetched == 0 && hits > 0,
                "{format}: fetched {fetched} bytes, {hits} cache hits or passthrough opens"
            );
        }
        let all = ctr_run(&c, &image, &format!("{format}-all"), &["sh", "-c",
            "find /data -type f -exec sha256sum {} + ; echo landmarks: $(ls -a / | grep -c landmark)"]);
        assert_eq!(sums_of(&all), sums, "{format}");
        assert!(
            all.contains("landmarks: 0\n"),
            "{format}: landmarks are hidden: {all}"
        );
    }
    assert_eq!(
        metric(&d.lazy_metrics(), "strata_lazy_verify_failures_total"),
        0
    );
}

/// Mount points of strata's FUSE mounts under `root`.
fn fuse_mountpoints(root: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" strata:sha256:"))
        .filter_map(|l| l.split(' ').nth(4).map(std::path::PathBuf::from))
        .filter(|p| p.starts_with(root))
        .collect()
}

fn fuse_mounts(root: &Path) -> usize {
    fuse_mountpoints(root).len()
}

/// Strata's FUSE mounts under `root` once there are `n`: a lazy Prepare returns while its
/// layer's server is still mounting (a container on top waits for it; a test looking at the
/// mounts themselves must too).
fn fuse_mountpoints_when(root: &Path, n: usize) -> Vec<std::path::PathBuf> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mounts = fuse_mountpoints(root);
        if mounts.len() >= n || std::time::Instant::now() > deadline {
            return mounts;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Once a layer is fetched, the kernel reads its files straight from the cache (FUSE
/// passthrough): a file opened then reads whole while its serving process is frozen, which a
/// read answered by that process could not.
#[test]
fn fully_fetched_files_are_read_by_the_kernel_while_their_server_is_frozen() {
    let s = setup(40, 2, 3 << 20);
    let (d, c) = lazy_daemon(s.dir.path(), "");
    pull_lazy(&c, &s.lazy_ref);
    let mountpoint = fuse_mountpoints_when(&d.root, 2)
        .into_iter()
        .find(|m| m.join("data/big-1").exists())
        .expect("the data layer is mounted");
    // The background fetch brings every chunk; then an open is passed through.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let file = loop {
        let before = metric(&d.lazy_metrics(), "strata_lazy_passthrough_opens_total");
        let f = std::fs::File::open(mountpoint.join("data/big-1")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        if metric(&d.lazy_metrics(), "strata_lazy_passthrough_opens_total") > before {
            break f;
        }
        drop(f);
        assert!(
            std::time::Instant::now() < deadline,
            "no open was passed through:\n{}",
            d.lazy_metrics()
        );
    };
    let pid: i32 = std::fs::read_to_string(mountpoint.parent().unwrap().join("lazy/pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let server = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(server, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut file = file;
        let mut data = Vec::new();
        let _ = tx.send(std::io::Read::read_to_end(&mut file, &mut data).map(|_| data));
    });
    let read = rx.recv_timeout(std::time::Duration::from_secs(20));
    nix::sys::signal::kill(server, nix::sys::signal::Signal::SIGCONT).unwrap();
    let data = read
        .expect("a passed-through read does not wait for the frozen server")
        .unwrap();
    assert_eq!(hex::encode(Sha256::digest(&data)), s.sums["/data/big-1"]);
    // The cache holds the file once: whole, named by its sha256, its chunks dropped.
    let cache = d.root.join("lazy/chunks");
    assert!(cache.join(&s.sums["/data/big-1"]).is_file());
    let (_, toc) = data_layer_toc(&s);
    let chunks: Vec<&str> = toc
        .entries
        .iter()
        .filter(|e| e.name == "data/big-1" && !e.chunk_digest.is_empty())
        .map(|e| e.chunk_digest.trim_start_matches("sha256:"))
        .collect();
    assert_eq!(chunks.len(), 3, "3 MiB in 1 MiB chunks");
    for c in chunks {
        assert!(!cache.join(c).exists(), "chunk {c} is kept beside its file");
    }
    // And through overlayfs in a container, every file still equals the original.
    let all = ctr_run(
        &c,
        &s.lazy_ref,
        "pt",
        &["sh", "-c", "find /data -type f -exec sha256sum {} +"],
    );
    assert_eq!(sums_of(&all), s.sums);
    assert_eq!(
        metric(&d.lazy_metrics(), "strata_lazy_verify_failures_total"),
        0
    );
}

#[test]
fn lazy_snapshots_follow_the_snapshotter_rules() {
    let s = setup(30, 1, 1 << 20);
    let (d, c) = lazy_daemon(s.dir.path(), "");
    pull_lazy(&c, &s.lazy_ref);
    assert_eq!(
        fuse_mountpoints_when(&d.root, 2).len(),
        2,
        "one FUSE mount per layer: {}",
        std::fs::read_to_string("/proc/self/mountinfo").unwrap()
    );
    // Committed, parent chained, with usage; a second lazy pull finds them present.
    let ls = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(
        ls.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{ls}"
    );
    let top = ls
        .lines()
        .find(|l| {
            l.contains("sha256:")
                && l.split_whitespace()
                    .nth(1)
                    .is_some_and(|p| p.starts_with("sha256:"))
        })
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let usage = c.ctr(&["snapshots", "--snapshotter", "strata", "usage", &top]);
    assert!(usage.lines().count() >= 2, "{usage}");
    assert!(pull_lazy(&c, &s.lazy_ref).contains("already present"));
    // A view of the lazy chain reads through FUSE.
    c.ctr(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "view",
        "lazy-view",
        &top,
    ]);
    let mounts = c.ctr(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "mounts",
        "/mnt",
        "lazy-view",
    ]);
    assert!(
        mounts.contains("lowerdir=") || mounts.contains("bind"),
        "{mounts}"
    );
    c.ctr(&["snapshots", "--snapshotter", "strata", "rm", "lazy-view"]);
    // Removing the image lets containerd's GC remove the lazy snapshots: mounts and servers go.
    c.ctr(&["images", "rm", "--sync", &s.lazy_ref]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fuse_mounts(&d.root) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        fuse_mounts(&d.root),
        0,
        "{}",
        c.ctr(&["snapshots", "--snapshotter", "strata", "ls"])
    );
    // Unmounted, each server exits: wait for the processes to be gone (10 s at most).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !serve_layer_pids(&d.root).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(serve_layer_pids(&d.root), Vec::<i32>::new(), "servers left");
    // And the image can be pulled lazily again.
    pull_lazy(&c, &s.lazy_ref);
    let run = ctr_run(&c, &s.lazy_ref, "again", &["sha256sum", "/data/big-0"]);
    assert!(run.contains(&s.sums["/data/big-0"]), "{run}");
}

#[test]
fn a_prefetch_list_puts_its_files_first_and_the_image_stays_valid() {
    let s = setup(20, 2, 1 << 20);
    let list = s.dir.path().join("prefetch.txt");
    std::fs::write(&list, "/data/big-1\n/data/small/f0013\n/not/there\n").unwrap();
    let ordered = format!("{}/strata/app:ordered", s.reg.host);
    let src = format!("{}/strata/app:1", s.reg.host);
    convert(&["--prefetch", list.to_str().unwrap(), &src, &ordered]);
    let s2 = Setup {
        lazy_ref: ordered.clone(),
        ..s
    };
    let (_, toc) = data_layer_toc(&s2);
    let data: Vec<&str> = toc
        .entries
        .iter()
        .filter(|e| e.kind == "reg" && e.size > 0)
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(&data[..2], ["data/big-1", "data/small/f0013"], "{data:?}");
    // containerd's own full pull checks every layer against the (new) diff_ids.
    let d = Daemon::start();
    let c = Containerd::start(&d.socket);
    let sums = ["sha256sum", "/data/big-1", "/data/small/f0013"];
    let run = whole_run(&c, &ordered, "o", &sums);
    assert_eq!(sums_of(&run).len(), 2);
    for (path, sum) in sums_of(&run) {
        assert_eq!(s2.sums[&path], sum, "{path}");
    }
}

/// The layer servers and the snapshotter killed with SIGKILL at random points while containers
/// read and the background fetch runs, five times: after each restart the layers are remounted,
/// every file in the chunk cache is named by the sha256 of its content (nothing partial or
/// unverified was kept), and a container reads every file with its original content.
#[test]
fn servers_killed_while_fetching_never_serve_an_unverified_byte() {
    use rand::{Rng, SeedableRng};
    let s = setup(300, 3, 3 << 20);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(s.dir.path(), "background_fetch = true\n");
    let mut d = Daemon::start_in_with(dir.path(), &["--config", &cfg]);
    let c = Containerd::start(&d.socket);
    pull_lazy(&c, &s.lazy_ref);
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let read_all = "find /data -type f | sort | xargs sha256sum";
    for round in 0..5 {
        let id = format!("r{round}");
        let mut read = c.ctr_command(&[
            "run",
            "--rm",
            "--snapshotter",
            "strata",
            &s.lazy_ref,
            &id,
            "sh",
            "-c",
            read_all,
        ]);
        let reader = std::thread::spawn(move || read.output().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(100..2500)));
        let servers = serve_layer_pids(&d.root);
        for pid in &servers {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        d.kill9();
        let _ = reader.join().unwrap(); // it may fail: its layers' servers died under it
        d.start_again();
        eprintln!(
            "seed {seed} round {round}: killed {} layer servers",
            servers.len()
        );
        assert!(
            serve_layer_pids(&d.root).len() >= servers.len(),
            "seed {seed}: the killed layer servers were not started again"
        );
        c.wait_for_snapshotter("strata");
        assert_cache_verified(&d.root);
    }
    let out = ctr_run(&c, &s.lazy_ref, "final", &["sh", "-c", read_all]);
    assert_eq!(
        sums_of(&out),
        s.sums,
        "seed {seed}: content after the kills"
    );
    assert_cache_verified(&d.root);
}

/// The pids of the `serve-layer` processes of the snapshotter whose root is `root`.
fn serve_layer_pids(root: &Path) -> Vec<i32> {
    let want = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains("serve-layer") && cmd.contains(&want)).then_some(pid)
        })
        .collect()
}

/// Every file of the chunk cache (temporary files aside) hashes to its name.
fn assert_cache_verified(root: &Path) {
    let cache = root.join("lazy/chunks");
    let mut checked = 0;
    for e in std::fs::read_dir(&cache).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let data = std::fs::read(e.path()).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&data)),
            name,
            "cache file {name}"
        );
        checked += 1;
    }
    assert!(
        checked > 0,
        "nothing in the chunk cache at {}",
        cache.display()
    );
}

/// Builds 400 files of 100 kB of noise (not compressible: bytes fetched are bytes read) and
/// pushes them with `output` keys (`compression=...`); a fresh lazy snapshotter mounts both
/// layers (busybox, recompressed, and the built one) from the registry, and `cat` prints after
/// fetching under 5 % of their bytes.
fn built_and_pulled_lazily(
    reg: &Registry,
    s: &strata_fs_tests::strata::Strata,
    name: &str,
    keys: &str,
) -> (String, tempfile::TempDir, Daemon, Containerd) {
    s.dockerfile(
        "FROM busybox\nRUN mkdir /data && i=0 && while [ $i -lt 400 ]; do head -c 100000 /dev/urandom > /data/f$i; i=$((i+1)); done && echo hello > /data/hello\n",
    );
    let target = format!("{}/team/{name}", reg.host);
    s.build_ok(&["--output", &format!("type=registry,name={target},{keys}")]);
    let dir = tempfile::tempdir().unwrap();
    let (d, c) = lazy_daemon(dir.path(), "background_fetch = false\n");
    let text = pull_lazy(&c, &target);
    assert!(text.contains("mounted lazily"), "{text}");
    let out = ctr_run(&c, &target, "first", &["cat", "/data/hello"]);
    assert_eq!(out.trim(), "hello");
    let st = d.lazy_metrics();
    let lazy_layers = st
        .lines()
        .filter(|l| l.starts_with("strata_lazy_layer_bytes{"))
        .count();
    assert_eq!(lazy_layers, 2, "{st}");
    let (fetched, total) = (
        metric(&st, "strata_lazy_fetched_bytes_total"),
        metric(&st, "strata_lazy_layer_bytes"),
    );
    assert!(
        fetched * 20 < total,
        "fetched {fetched} of {total} bytes before the first output:\n{st}"
    );
    (target, dir, d, c)
}

#[test]
fn a_build_pushed_as_estargz_is_pulled_lazily() {
    let reg = Registry::start();
    let s = strata_fs_tests::strata::Strata::new();
    let (target, dir, _d, c) =
        built_and_pulled_lazily(&reg, &s, "estargz:1", "compression=estargz");
    // eStargz is gzip: every puller takes it whole (its landmark and TOC are then files at the
    // root, as in any eStargz image; lazy mounts hide them).
    others_pull_it_whole(&c, &target, dir.path());
}

#[test]
fn a_build_pushed_as_zstd_chunked_is_pulled_lazily() {
    let reg = Registry::start();
    let s = strata_fs_tests::strata::Strata::new();
    let (target, dir, d, c) =
        built_and_pulled_lazily(&reg, &s, "lazy:1", "compression=zstd:chunked");

    // Every other puller takes it whole and verifies it: containerd's overlayfs, skopeo, podman.
    others_pull_it_whole(&c, &target, dir.path());

    // What the container read is the next pull's prefetch list.
    let list = snapshotter_cli(&[
        "--root",
        d.root.to_str().unwrap(),
        "status",
        "--prefetch-list",
        &target,
    ]);
    assert!(
        list.lines()
            .any(|l| l.trim_start_matches('/') == "data/hello"),
        "{list}"
    );
    let reads = dir.path().join("reads.txt");
    std::fs::write(&reads, &list).unwrap();
    let reordered = format!("{}/team/lazy:prefetch", reg.host);
    snapshotter_cli(&[
        "convert",
        &target,
        &reordered,
        "--prefetch",
        reads.to_str().unwrap(),
    ]);
    // The converter writes eStargz too; it mounts lazily.
    let esgz = format!("{}/team/lazy:esgz", reg.host);
    snapshotter_cli(&["convert", "--estargz", &target, &esgz]);
    let text = pull_lazy(&c, &esgz);
    assert!(text.contains("mounted lazily"), "{text}");
    let out = ctr_run(&c, &esgz, "esgz", &["cat", "/data/hello"]);
    assert_eq!(out.trim(), "hello");

    // Or straight from the build: the file the container read comes first in its layer, and
    // the image still verifies and runs.
    let rebuilt = format!("{}/team/lazy:rebuilt", reg.host);
    let key = format!("prefetch={}", reads.display());
    s.build_ok(&[
        "--output",
        &format!("type=registry,name={rebuilt},compression=zstd:chunked,{key}"),
    ]);
    let (_, toc) = layer_toc(&rebuilt, 1);
    let first = toc.entries.iter().find(|e| e.kind == "reg" && e.size > 0);
    assert_eq!(first.map(|e| e.name.as_str()), Some("data/hello"));
    assert_eq!(
        whole_run(&c, &rebuilt, "rebuilt", &["cat", "/data/hello"]),
        "hello"
    );
    // On a fresh snapshotter (no background fetch) the recorded files come in the mount's one
    // ranged read of the prefetch area: the container's read fetches nothing more.
    let dir2 = tempfile::tempdir().unwrap();
    let (d2, c2) = lazy_daemon(dir2.path(), "background_fetch = false\n");
    pull_lazy(&c2, &rebuilt);
    fuse_mountpoints_when(&d2.root, 2);
    let before = metric(&d2.lazy_metrics(), "strata_lazy_fetched_bytes_total");
    assert!(before > 0, "the prefetch area was fetched at mount");
    let out = ctr_run(&c2, &rebuilt, "prefetched", &["cat", "/data/hello"]);
    assert_eq!(out.trim(), "hello");
    let after = metric(&d2.lazy_metrics(), "strata_lazy_fetched_bytes_total");
    assert_eq!(
        before, after,
        "the first read was served from the prefetch area"
    );
    let b = s.build(&["--output", &format!("type=registry,name={rebuilt},{key}")]);
    assert!(
        !b.ok && b.progress.contains("add compression=zstd:chunked"),
        "{}",
        b.progress
    );

    // Plain zstd: containerd pulls and runs it whole.
    let zstd = format!("{}/team/zstd:1", reg.host);
    s.build_ok(&[
        "--output",
        &format!("type=registry,name={zstd},compression=zstd"),
    ]);
    c.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "strata",
        &zstd,
    ]);
    let out = ctr_run(&c, &zstd, "whole", &["cat", "/data/hello"]);
    assert_eq!(out.trim(), "hello");
}

/// `image` pulled whole by containerd onto its overlayfs (every layer checked against its
/// diff_id) and `cmd` run in it: its output, trimmed.
fn whole_run(c: &Containerd, image: &str, id: &str, cmd: &[&str]) -> String {
    c.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        image,
    ]);
    let mut args = vec!["run", "--rm", "--snapshotter", "overlayfs", image, id];
    args.extend_from_slice(cmd);
    c.ctr(&args).trim().to_string()
}

/// `image` (with /data/hello) pulled whole by containerd's overlayfs, `skopeo copy` to an OCI
/// layout (every blob checked against its digest) and podman (containers/storage, which knows
/// zstd:chunked): each has the file.
fn others_pull_it_whole(c: &Containerd, image: &str, dir: &Path) {
    assert_eq!(
        whole_run(c, image, "whole", &["cat", "/data/hello"]),
        "hello"
    );
    let layout = dir.join("skopeo-layout");
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:copy", layout.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy: {out:?}");
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .arg("--root")
            .arg(dir.join("podman-root"))
            .arg("--runroot")
            .arg(dir.join("podman-run"))
            .args(["--storage-driver", "overlay"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "podman {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    podman(&["pull", "--tls-verify=false", image]);
    let mounted = podman(&["image", "mount", image]);
    let hello = std::fs::read_to_string(Path::new(&mounted).join("data/hello"));
    podman(&["image", "unmount", image]);
    assert_eq!(hello.unwrap().trim(), "hello");
}
