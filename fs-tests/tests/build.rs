//! `strata build` end to end with real runc and overlayfs: images that run in containerd, BuildKit's
//! caching semantics, COPY semantics, parallelism, and bad input.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::Daemon;
use strata_fs_tests::dockerd::Dockerd;
use strata_fs_tests::strata::Strata;

#[test]
fn built_images_run_in_containerd_on_strata_and_overlayfs() {
    let s = Strata::new();
    s.file("greeting.txt", "hello from strata build");
    s.dockerfile("FROM busybox AS build\nWORKDIR /src\nCOPY greeting.txt .\nRUN tr a-z A-Z < greeting.txt > shout.txt\n\nFROM busybox\nCOPY --from=build /src/shout.txt /app/\nCMD [\"cat\", \"/app/shout.txt\"]\n");
    let archive = s.root.path().join("app.tar");
    let spec = format!("type=oci,dest={}", archive.display());
    s.build_ok(&["-t", "docker.io/strata/app:1", "--output", &spec]);

    let strata = Daemon::start();
    let c = Containerd::start(&strata.socket);
    for snapshotter in ["strata", "overlayfs"] {
        c.ctr(&[
            "images",
            "import",
            "--snapshotter",
            snapshotter,
            archive.to_str().unwrap(),
        ]);
        let out = c.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            "docker.io/strata/app:1",
            &format!("app-{snapshotter}"),
        ]);
        assert_eq!(out.trim(), "HELLO FROM STRATA BUILD", "{snapshotter}");
    }
}

#[test]
fn caching_follows_buildkit() {
    let s = Strata::new();
    s.file("foo1", "1");
    s.file("foo2", "2");
    s.file("bar", "b");
    s.dockerfile("FROM busybox AS s1\nRUN echo s1 > /s1\nFROM busybox\nCOPY foo* /in/\nRUN ls /in > /list\nCOPY --from=s1 /s1 /s1\n");
    let first = s.build_ok(&[]);
    let (_, _, ran) = first.counts();
    assert!(ran >= 4, "{}", first.progress);

    // A fully cached rebuild runs nothing.
    assert_eq!(s.build_ok(&[]).counts().2, 0);
    // A file outside the COPY glob keeps the cache.
    s.file("bar", "changed");
    assert_eq!(s.build_ok(&[]).counts().2, 0);
    // A matched file busts it: the COPY and everything after it in that stage.
    s.file("foo2", "changed");
    let b = s.build_ok(&[]);
    assert!(
        b.progress.contains("COPY foo* /in/\n") && b.counts().2 == 3,
        "{}",
        b.progress
    );
    // Renaming a matched file busts it too.
    fs::rename(s.path().join("foo2"), s.path().join("foo3")).unwrap();
    assert_eq!(s.build_ok(&[]).counts().2, 3);
    // --no-cache reruns every step.
    let all = s.build_ok(&["--no-cache"]);
    assert_eq!(all.counts().1, 0, "{}", all.progress);
    // --no-cache-filter reruns only that stage's steps (and what depends on them).
    let filtered = s.build_ok(&["--no-cache-filter", "s1"]);
    let reran: Vec<&str> = filtered
        .progress
        .lines()
        .filter(|l| l.contains("] RUN") || l.contains("] COPY"))
        .collect();
    assert!(reran.iter().any(|l| l.contains("echo s1")), "{reran:?}");
    let cached_ls = filtered
        .progress
        .lines()
        .skip_while(|l| !l.contains("RUN ls /in"))
        .nth(1)
        .unwrap_or("");
    assert!(
        cached_ls.ends_with("CACHED"),
        "RUN ls stays cached: {}",
        filtered.progress
    );

    // Records do not grow on a cached rebuild.
    let du = |s: &Strata| {
        String::from_utf8(s.run(&["du"]).stdout)
            .unwrap()
            .lines()
            .count()
    };
    let before = du(&s);
    s.build_ok(&[]);
    assert_eq!(du(&s), before);
}

#[test]
fn source_date_epoch_gives_identical_digests() {
    let s = Strata::new();
    s.file("data", "x");
    s.dockerfile("FROM busybox\nCOPY data /data\nRUN echo built > /stamp\n");
    let env = [("SOURCE_DATE_EPOCH", "1700000000")];
    let a = s.build_env(&["--no-cache"], &env);
    assert!(a.ok, "{}", a.progress);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = s.build_env(&["--no-cache"], &env);
    assert!(b.ok, "{}", b.progress);
    assert_eq!(a.digest(), b.digest());
    let c = s.build_env(&["--no-cache"], &[]);
    assert_ne!(c.digest(), a.digest(), "without the epoch, times differ");
}

#[test]
fn copy_semantics() {
    let s = Strata::new();
    s.file("foo1", "f1");
    s.file("foo2", "f2");
    s.file("dir/a", "a");
    s.file("dir/sub/b", "b");
    s.file("target-file", "t");
    symlink("target-file", s.path().join("link")).unwrap();
    let sock = std::os::unix::net::UnixListener::bind(s.path().join("dir/ctx.sock")).unwrap();
    s.dockerfile(
        "FROM busybox\n\
         ARG OWNER=1234:5678\n\
         RUN echo app:x:1001:1001::/home/app:/bin/sh >> /etc/passwd && echo app:x:1001: >> /etc/group\n\
         WORKDIR /w\n\
         COPY foo* globbed/\n\
         COPY nomatch* foo1 both/\n\
         COPY dir/ asdir/\n\
         COPY dir/. dotdir/\n\
         COPY . whole/\n\
         COPY --chown=app foo1 byname\n\
         COPY --chown=42:43 foo1 byid\n\
         COPY --chown=${OWNER} foo1 byarg\n\
         COPY --chmod=0741 foo1 moded\n\
         COPY link linkfollowed\n\
         COPY dir/ twice/\n\
         COPY dir/ twice/\n",
    );
    let (_, out) = s.build_local(&[]);
    let o = out.path();
    let read = |p: &str| fs::read_to_string(o.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(
        (
            read("w/globbed/foo1").as_str(),
            read("w/globbed/foo2").as_str()
        ),
        ("f1", "f2")
    );
    assert_eq!(
        read("w/both/foo1"),
        "f1",
        "an empty wildcard beside a match is fine"
    );
    assert_eq!(read("w/asdir/a"), "a");
    assert_eq!(read("w/asdir/sub/b"), "b");
    assert!(!o.join("w/asdir/dir").exists(), "dir/ copies its contents");
    assert_eq!(read("w/dotdir/sub/b"), "b");
    assert_eq!(read("w/whole/dir/a"), "a");
    assert!(
        !o.join("w/whole/dir/ctx.sock").exists(),
        "a socket in the context is skipped"
    );
    assert_eq!(
        fs::read_link(o.join("w/whole/link")).unwrap().to_str(),
        Some("target-file"),
        "links inside a copy stay links"
    );
    assert_eq!(read("w/linkfollowed"), "t", "a named symlink is followed");
    let owner = |p: &str| {
        let m = fs::symlink_metadata(o.join(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("w/byname"), (1001, 1001));
    assert_eq!(owner("w/byid"), (42, 43));
    assert_eq!(owner("w/byarg"), (1234, 5678));
    assert_eq!(
        owner("w/globbed/foo1"),
        (0, 0),
        "context files belong to root"
    );
    assert_eq!(
        fs::metadata(o.join("w/moded"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o741
    );
    assert_eq!(read("w/twice/sub/b"), "b");
    drop(sock);
}

#[test]
fn independent_stages_run_in_parallel() {
    let s = Strata::new();
    let mut df = String::new();
    for i in 0..4 {
        // /proc/uptime is the host's clock: the steps' start and end times are comparable.
        df.push_str(&format!("FROM busybox AS s{i}\nRUN cat /proc/uptime; sleep 2; cat /proc/uptime; echo {i} > /out{i}\n"));
    }
    df.push_str("FROM busybox\n");
    for i in 0..4 {
        df.push_str(&format!("COPY --from=s{i} /out{i} /\n"));
    }
    s.dockerfile(&df);
    let intervals = |b: &strata_fs_tests::strata::Build| -> Vec<(f64, f64)> {
        let mut by_vertex: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for l in b.progress.lines() {
            let parts: Vec<&str> = l.split_whitespace().collect();
            if parts.len() == 4 && parts[0].starts_with('#') {
                if let (Ok(up), Ok(_)) = (parts[2].parse::<f64>(), parts[3].parse::<f64>()) {
                    by_vertex.entry(parts[0].to_string()).or_default().push(up);
                }
            }
        }
        by_vertex
            .values()
            .filter(|v| v.len() == 2)
            .map(|v| (v[0], v[1]))
            .collect()
    };
    let overlaps = |iv: &[(f64, f64)]| {
        iv.iter().enumerate().any(|(i, a)| {
            iv[i + 1..]
                .iter()
                .any(|b| a.0 < b.1 - 0.5 && b.0 < a.1 - 0.5)
        })
    };
    // How many run at once at the busiest moment (a step's start, when others are well inside).
    let most_at_once = |iv: &[(f64, f64)]| {
        iv.iter()
            .map(|a| {
                iv.iter()
                    .filter(|b| b.0 <= a.0 + 0.5 && a.0 < b.1 - 0.5)
                    .count()
            })
            .max()
            .unwrap_or(0)
    };
    let parallel = s.build_ok(&["--no-cache"]);
    let iv = intervals(&parallel);
    assert_eq!(iv.len(), 4, "{}", parallel.progress);
    assert!(
        overlaps(&iv),
        "default parallelism overlaps the stages: {iv:?}"
    );
    // Waiting steps are not capped by the CPU count (2 on the CI machines).
    assert!(
        most_at_once(&iv) >= 3,
        "more waiting steps than cores run at once: {iv:?}"
    );
    let serial = s.build_ok(&["--no-cache", "--max-parallelism", "1"]);
    let iv = intervals(&serial);
    assert_eq!(iv.len(), 4);
    assert!(
        !overlaps(&iv),
        "--max-parallelism 1 runs one at a time: {iv:?}"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_the_next_build_works() {
    let s = Strata::new();
    s.file("ok", "ok");
    symlink("/etc/passwd", s.path().join("escape")).unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "FROM busybox\nRUNN echo\n",
            "Dockerfile:2: unknown instruction: RUNN (did you mean RUN?)",
        ),
        (
            "FROM busybox\nCOPY --chwon=1 ok /\n",
            "unknown flag --chwon for COPY (did you mean --chown?)",
        ),
        (
            "FROM busybox\nRUN \"unterminated\nRUN <<EOF\necho\n",
            "unterminated heredoc",
        ),
        (
            "FROM busybox AS a\nCOPY --from=a /x /y\n",
            "refers to its own stage",
        ),
        (
            "FROM nothere:1\n",
            "docker.io/library/nothere:1 is not in the local store",
        ),
        (
            "FROM busybox\nCOPY missing /\n",
            "missing: not found in the build context",
        ),
        (
            "FROM busybox\nRUN echo some output; echo more; exit 3\n",
            "exit code: 3",
        ),
        (
            "FROM busybox\nCOPY escape /etc/copied\n",
            "not found in the build context",
        ),
    ];
    for (df, want) in cases {
        s.dockerfile(df);
        let b = s.build(&[]);
        assert!(!b.ok, "{df} should fail");
        assert!(
            b.progress.contains(want),
            "{df}: expected {want:?} in:\n{}",
            b.progress
        );
    }
    s.dockerfile("FROM busybox\nRUN echo some output; echo more; exit 3\n");
    let b = s.build(&[]);
    assert!(
        b.progress
            .contains("last lines of its output:\nsome output\nmore"),
        "{}",
        b.progress
    );
    // The host's files never leak into a build through a context symlink.
    s.dockerfile("FROM busybox\nCOPY . /ctx/\n");
    let (_, out) = s.build_local(&[]);
    assert_eq!(
        fs::read_link(out.path().join("ctx/escape"))
            .unwrap()
            .to_str(),
        Some("/etc/passwd"),
        "copied as a link, not followed"
    );
    // And the store is intact: the next build works.
    s.dockerfile("FROM busybox\nCOPY ok /ok\nRUN cat /ok\n");
    s.build_ok(&[]);
}

#[test]
fn docker_archive_output_has_docker_save_layout() {
    let s = Strata::new();
    s.dockerfile("FROM busybox\nRUN echo hi > /hi\n");
    let dest = s.root.path().join("docker.tar");
    let spec = format!("type=docker,dest={}", dest.display());
    s.build_ok(&["-t", "app:2", "--output", &spec]);
    let mut archive = tar::Archive::new(fs::File::open(&dest).unwrap());
    let mut manifest = None;
    let mut names = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if name == "manifest.json" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            manifest = Some(serde_json::from_str::<serde_json::Value>(&text).unwrap());
        }
        names.push(name);
    }
    let m = manifest.expect("manifest.json");
    assert_eq!(m[0]["RepoTags"][0], "app:2");
    let layers = m[0]["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "busybox + RUN");
    for l in layers {
        assert!(names.contains(&l.as_str().unwrap().to_string()));
    }
    assert!(names.contains(&m[0]["Config"].as_str().unwrap().to_string()));

    // And a real dockerd loads and runs it.
    let d = Dockerd::start("overlay2", &[]);
    d.load(&dest);
    assert_eq!(
        d.docker(&["run", "--rm", "--network", "none", "app:2", "cat", "/hi"])
            .trim(),
        "hi"
    );
}

#[test]
fn add_extracts_local_archives_and_downloads_urls() {
    let s = Strata::new();
    // A gzip tar archive in the context, and a gzip file that is not a tar.
    let mut tarball = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o640);
    h.set_uid(7);
    h.set_gid(8);
    h.set_size(5);
    h.set_mtime(1_600_000_000);
    tarball
        .append_data(&mut h, "inner/file.txt", &b"inner"[..])
        .unwrap();
    fs::write(
        s.path().join("bundle.tar.gz"),
        tarball.into_inner().unwrap().finish().unwrap(),
    )
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"just text").unwrap();
    fs::write(s.path().join("note.gz"), gz.finish().unwrap()).unwrap();

    // A web server on loopback for ADD URL.
    let web = tempfile::tempdir().unwrap();
    fs::write(web.path().join("remote.txt"), "from the web").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(web.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let url = format!("http://127.0.0.1:{port}/remote.txt");
    let sum = "sha256:8d8a0d61ba8fdc9dd5a0b6da1a0a3e4f8a6b2a5ac1b3ff3d0e8bb7e6bb2b0d55";
    s.dockerfile(&format!(
        "FROM busybox\nADD bundle.tar.gz /x/\nADD note.gz /y/\nADD {url} /web/\n"
    ));
    let (_, out) = s.build_local(&[]);
    let o = out.path();
    assert_eq!(
        fs::read_to_string(o.join("x/inner/file.txt")).unwrap(),
        "inner"
    );
    let m = fs::metadata(o.join("x/inner/file.txt")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777),
        (7, 8, 0o640),
        "archive ownership and modes kept"
    );
    assert!(
        o.join("y/note.gz").is_file(),
        "a gzip file that is not a tar is copied as is"
    );
    assert_eq!(
        fs::read_to_string(o.join("web/remote.txt")).unwrap(),
        "from the web"
    );
    assert_eq!(
        fs::metadata(o.join("web/remote.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // --checksum guards the download.
    s.dockerfile(&format!("FROM busybox\nADD --checksum={sum} {url} /web/\n"));
    let b = s.build(&[]);
    assert!(!b.ok && b.progress.contains("tampered"), "{}", b.progress);
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn dockerignore_and_heredocs() {
    let s = Strata::new();
    s.file("app/main.sh", "echo main");
    s.file("node_modules/dep/index.js", "x");
    s.file("debug.log", "x");
    s.file("keep.log", "kept");
    s.file(".dockerignore", "node_modules\n*.log\n!keep.log\n");
    s.dockerfile("FROM busybox\nCOPY . /c/\nCOPY <<EOF /etc/motd\nwelcome $HOSTNAME\nEOF\nRUN <<EOF\necho from a heredoc > /h\nEOF\n");
    let (_, out) = s.build_local(&[]);
    let o = out.path();
    assert!(o.join("c/app/main.sh").is_file());
    assert!(!o.join("c/node_modules").exists());
    assert!(!o.join("c/debug.log").exists());
    assert_eq!(fs::read_to_string(o.join("c/keep.log")).unwrap(), "kept");
    assert_eq!(fs::read_to_string(o.join("h")).unwrap(), "from a heredoc\n");
    assert!(fs::read_to_string(o.join("etc/motd"))
        .unwrap()
        .starts_with("welcome"));
}

#[test]
fn ctrl_c_kills_the_step_and_leaves_a_working_store() {
    let s = Strata::new();
    s.dockerfile("FROM busybox\nRUN echo started; sleep 60\n");
    let (mut child, mut stderr, mut progress) = build_until_started(&s);
    let runtime_root = s.root.path().join("build/runtime");
    let runc_list = || {
        let out = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runtime_root)
            .args(["list", "-q"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(
        !runc_list().is_empty(),
        "the step's container runs before the interrupt"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut progress).unwrap();
    assert!(!child.wait().unwrap().success());
    assert!(progress.contains("cancelled"), "{progress}");
    // No container, mount or temporary snapshot is left behind.
    assert!(runc_list().is_empty(), "containers left: {}", runc_list());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(s.root.path().to_str().unwrap()),
        "mounts left under the root"
    );
    // The same build runs the step again (no cache record was written for it): it starts.
    let (mut again, _, _) = build_until_started(&s);
    again.kill().unwrap();
    again.wait().unwrap();
}

/// Starts `strata build` of the context and returns once its step printed "started": the child,
/// the rest of its progress stream, and the progress so far.
// The child is handed to the caller, who waits for it; clippy cannot follow the return.
#[allow(clippy::zombie_processes)]
fn build_until_started(
    s: &Strata,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStderr>,
    String,
) {
    let mut child = std::process::Command::new(strata_fs_tests::workspace_bin("strata"))
        .arg("--root")
        .arg(s.root.path())
        .args(["build", "--progress", "plain"])
        .arg(s.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut progress = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        if n == 0 {
            let status = child.wait().unwrap();
            panic!("the build ended ({status}) before its step started:\n{progress}");
        }
        progress.push_str(&line);
        if line.trim_end().ends_with(" started") {
            return (child, stderr, progress);
        }
    }
}

#[test]
fn containerd_output_imports_through_the_api() {
    let s = Strata::new();
    s.dockerfile("FROM busybox\nRUN echo imported > /msg\nCMD [\"cat\", \"/msg\"]\n");
    let strata = Daemon::start();
    let c = Containerd::start(&strata.socket);
    let spec = format!(
        "type=containerd,name=strata/imported:1,address={},namespace={}",
        c.address.display(),
        c.namespace
    );
    s.build_ok(&["--output", &spec]);
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        "docker.io/strata/imported:1",
        "imported",
    ]);
    assert_eq!(out.trim(), "imported");
}

#[test]
fn prune_follows_its_policy() {
    let s = Strata::new();
    s.dockerfile("FROM busybox\nRUN head -c 100000 /dev/zero > /big\nRUN echo small > /small\n");
    s.build_ok(&[]);
    let keep = s.run(&["prune", "--keep-duration", "1h"]);
    assert!(
        String::from_utf8_lossy(&keep.stdout).contains("removed 0 cache records"),
        "{}",
        String::from_utf8_lossy(&keep.stdout)
    );
    assert_eq!(s.build_ok(&[]).counts().2, 0, "kept records still hit");
    let trim = s.run(&["prune", "--keep-storage", "1B"]);
    assert!(trim.status.success());
    assert!(
        !String::from_utf8_lossy(&trim.stdout).contains("removed 0 "),
        "{}",
        String::from_utf8_lossy(&trim.stdout)
    );
    assert!(s.build_ok(&[]).counts().2 >= 1, "pruned steps run again");
    let all = s.run(&["prune"]);
    assert!(all.status.success());
    let du = String::from_utf8(s.run(&["du"]).stdout).unwrap();
    assert!(du.trim_end().ends_with("total: 0B"), "{du}");
}

#[test]
fn onbuild_triggers_run_in_the_child_build() {
    let s = Strata::new();
    s.file("hello.txt", "triggered");
    s.dockerfile(
        "FROM busybox\nONBUILD COPY hello.txt /from-trigger\nONBUILD RUN echo ran > /ran\n",
    );
    s.build_ok(&["-t", "parent:1"]);
    s.dockerfile("FROM parent:1\nRUN cat /from-trigger /ran\n");
    let (b, out) = s.build_local(&[]);
    assert!(
        b.progress.contains("ONBUILD COPY hello.txt"),
        "{}",
        b.progress
    );
    assert_eq!(
        fs::read_to_string(out.path().join("from-trigger")).unwrap(),
        "triggered"
    );
    assert_eq!(fs::read_to_string(out.path().join("ran")).unwrap(), "ran\n");
}

#[test]
fn named_context_from_an_oci_layout_directory() {
    let s = Strata::empty();
    let layout = tempfile::tempdir().unwrap();
    let archive = s.root.path().join("bb.tar");
    strata_fs_tests::image::write_oci_archive(
        &archive,
        "docker.io/library/busybox:latest",
        &[strata_fs_tests::image::busybox_layer().finish()],
        &["/bin/sh"],
    );
    tar::Archive::new(fs::File::open(&archive).unwrap())
        .unpack(layout.path())
        .unwrap();
    s.dockerfile("FROM base\nRUN echo from the layout > /x\n");
    let spec = format!("base=oci-layout://{}:latest", layout.path().display());
    let (_, out) = s.build_local(&["--build-context", &spec]);
    assert_eq!(
        fs::read_to_string(out.path().join("x")).unwrap(),
        "from the layout\n"
    );
    let bad = format!("base=oci-layout://{}:nosuchtag", layout.path().display());
    let b = s.build(&["--build-context", &bad]);
    assert!(
        !b.ok && b.progress.contains("no image tagged nosuchtag"),
        "{}",
        b.progress
    );
}

/// `strata build` killed with SIGKILL at random points of 50 builds that use a locked cache mount:
/// afterwards every variant builds, cached results are right (no cache record points at missing
/// or partial data), and the cache volume is usable (not left locked).
#[test]
fn kill9_during_builds_leaves_a_store_the_next_build_trusts() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let s = Strata::new();
    s.dockerfile(
        "FROM busybox\nARG N\n\
         RUN --mount=type=cache,target=/c,sharing=locked for i in $(seq 1 100); do echo $N > /c/f$i; done; echo $N > /n1\n\
         ARG R\n\
         RUN dd if=/dev/zero of=/big bs=1M count=2 2>/dev/null && sleep 0.3 && echo $N > /n2\n\
         COPY Dockerfile /df\n",
    );
    let seed: u64 = std::env::var("STRATA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut killed, mut finished) = (0, 0);
    for i in 0..50 {
        let mut child = std::process::Command::new(strata_fs_tests::workspace_bin("strata"))
            .arg("--root")
            .arg(s.root.path())
            .args(["build", "--progress", "plain", "--build-arg"])
            .arg(format!("N={}", i % 5))
            .arg("--build-arg")
            .arg(format!("R={i}"))
            .arg(s.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(0..900)));
        match child.try_wait().unwrap() {
            Some(_) => finished += 1,
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
            }
        }
    }
    eprintln!("seed {seed}: {killed} builds killed, {finished} finished before the kill");
    let mounts = || {
        fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .filter(|l| l.contains(s.root.path().to_str().unwrap()))
            .count()
    };
    eprintln!("after the kills: {} mounts under the root", mounts());
    for n in 0..5 {
        let (b, out) = s.build_local(&["--build-arg", &format!("N={n}"), "--build-arg", "R=final"]);
        assert!(b.ok, "seed {seed}: N={n} after the kills:\n{}", b.progress);
        for f in ["n1", "n2"] {
            assert_eq!(
                fs::read_to_string(out.path().join(f)).unwrap().trim(),
                n.to_string(),
                "seed {seed}: /{f} of N={n}"
            );
        }
        assert_eq!(fs::metadata(out.path().join("big")).unwrap().len(), 2 << 20);
    }
    // The locked cache volume is usable: a step that writes it runs and sees earlier writes.
    s.dockerfile(
        "FROM busybox\nRUN --mount=type=cache,target=/c,sharing=locked ls /c | wc -l > /count\n",
    );
    let (b, out) = s.build_local(&[]);
    assert!(b.ok, "seed {seed}: {}", b.progress);
    let count: usize = fs::read_to_string(out.path().join("count"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        count <= 100,
        "seed {seed}: {count} files in the cache volume"
    );
    assert!(
        killed >= 10,
        "seed {seed}: only {killed} kills landed mid-build"
    );
}
