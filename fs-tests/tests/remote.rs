//! Remote builds: `strata build --builder ssh://root@ADDRESS/PATH` against `strata serve` in a
//! network namespace behind a 20 Mbit/s veth, with the system ssh and Debian's sshd; and two
//! clients on one builder's unix socket.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use strata_fs_tests::image::{self, noise};
use strata_fs_tests::remote::{keygen, Builder, Netns, Sshd};
use strata_fs_tests::strata::Strata;

const MIB: u64 = 1 << 20;

/// A remote machine: namespace, sshd, and a builder whose root has `base` loaded.
struct Remote {
    ns: Netns,
    sshd: Sshd,
    builder: Builder,
    store: Strata,
}

impl Remote {
    fn new(store: Strata, rate: Option<&str>) -> Remote {
        let ns = Netns::new(rate);
        let sshd = Sshd::start(&ns);
        let builder = Builder::start(Some(&ns), store.root.path());
        Remote {
            ns,
            sshd,
            builder,
            store,
        }
    }

    fn address(&self) -> String {
        format!(
            "ssh://root@{}{}",
            self.sshd.address,
            self.builder.socket.display()
        )
    }

    /// `strata build --builder ssh://... ARGS CONTEXT`, with the client's environment `env`.
    fn build(&self, ctx: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        client(&self.address(), ctx, args, env, &self.sshd.ssh_command())
    }
}

fn client(builder: &str, ctx: &Path, args: &[&str], env: &[(&str, &str)], ssh: &str) -> Output {
    Command::new(strata_fs_tests::workspace_bin("strata"))
        .args(["build", "--progress", "plain", "--builder", builder])
        .args(args)
        .arg(ctx)
        .env("STRATA_SSH_COMMAND", ssh)
        .envs(env.iter().copied())
        .output()
        .expect("run strata build")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "build failed:\n{}", text(&o));
    text(&o)
}

fn write(ctx: &Path, rel: &str, data: &[u8]) {
    let p = ctx.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// 2,000 files of 32.8 KiB (64 MiB) under data/, and a 100 MiB file .dockerignore leaves out.
fn big_context(ctx: &Path) {
    for i in 0..2000u64 {
        write(
            ctx,
            &format!("data/{:02}/f{i:04}", i % 40),
            &noise(i, (64 << 20) / 2000 + 1),
        );
    }
    write(ctx, "ignored.bin", &noise(99, 100 << 20));
    write(ctx, ".dockerignore", b"ignored.bin\n");
    write(ctx, "small.txt", b"version one\n");
    write(
        ctx,
        "Dockerfile",
        b"FROM busybox\nCOPY data /data\nRUN find /data -type f | wc -l > /count\nCOPY small.txt /small.txt\nRUN cat /small.txt > /seen\n",
    );
}

/// The `#N CACHED` lines.
fn cached(progress: &str) -> usize {
    progress.lines().filter(|l| l.ends_with(" CACHED")).count()
}

#[test]
fn a_remote_build_sends_only_what_changed_and_outputs_come_back() {
    let r = Remote::new(Strata::new(), Some("20mbit"));
    let ctx = tempfile::tempdir().unwrap();
    big_context(ctx.path());
    let out = tempfile::tempdir().unwrap();
    let local = format!("type=local,dest={}", out.path().display());

    let before = r.ns.sent();
    ok(r.build(ctx.path(), &["--output", &local], &[]));
    let cold = r.ns.sent() - before;
    assert!(cold > 64 * MIB, "the 64 MiB context crossed: {cold} bytes");
    assert!(
        cold < 72 * MIB,
        "only the context crossed, once, and not the ignored 100 MiB: {cold} bytes"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("count"))
            .unwrap()
            .trim(),
        "2000"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("seen")).unwrap(),
        "version one\n"
    );

    // One file edited: it alone crosses; the steps before its COPY are cached.
    write(ctx.path(), "small.txt", b"version two\n");
    let before = r.ns.sent();
    let p = ok(r.build(ctx.path(), &["--output", &local], &[]));
    let warm = r.ns.sent() - before;
    assert!(warm < MIB, "after one edit {warm} bytes crossed");
    assert!(
        cached(&p) >= 2,
        "COPY data and the RUN after it are cached:\n{p}"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("seen")).unwrap(),
        "version two\n"
    );

    // Edited with its size and mtime kept (BuildKit's hole): still sent, still seen.
    let small = ctx.path().join("small.txt");
    let mtime = std::fs::metadata(&small).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&small, b"version 3!!\n").unwrap();
    let f = std::fs::File::options().write(true).open(&small).unwrap();
    f.set_modified(mtime).unwrap();
    ok(r.build(ctx.path(), &["--output", &local], &[]));
    assert_eq!(
        std::fs::read_to_string(out.path().join("seen")).unwrap(),
        "version 3!!\n"
    );

    // Nothing changed: nothing but stats cross, every step is cached.
    let before = r.ns.sent();
    let p = ok(r.build(ctx.path(), &[], &[]));
    assert!(
        r.ns.sent() - before < MIB,
        "{} bytes for an unchanged context",
        r.ns.sent() - before
    );
    assert_eq!(cached(&p), 5, "{p}");
}

#[test]
fn secrets_and_ssh_agents_stay_on_the_client() {
    let r = Remote::new(Strata::with_image(&image::debian("python")), None);
    let ctx = tempfile::tempdir().unwrap();
    let value = format!("s3cr3t-{}", std::process::id());
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(value.as_bytes()));
    let secret = ctx.path().join("token");
    std::fs::write(&secret, &value).unwrap();
    write(ctx.path(), ".dockerignore", b"token\nkey*\n");
    let key = ctx.path().join("key");
    keygen(&key, "the-clients-key");
    write(
        ctx.path(),
        "Dockerfile",
        format!(
            "FROM localhost/strata-test/debian-python:bookworm\nRUN --mount=type=secret,id=token test \"$(sha256sum < /run/secrets/token)\" = '{hash}  -' && echo secret-ok\nRUN --mount=type=ssh ssh-add -l\n"
        )
        .as_bytes(),
    );
    let spec = format!("id=token,src={}", secret.display());
    let ssh = format!("default={}", key.display());
    let p = ok(r.build(ctx.path(), &["--secret", &spec, "--ssh", &ssh], &[]));
    assert!(p.contains("secret-ok"), "{p}");
    assert!(
        p.contains("the-clients-key"),
        "ssh-add -l lists the client's key:\n{p}"
    );
    let found = Command::new("grep")
        .args(["-rlsF", "--devices=skip", &value])
        .arg(r.store.root.path())
        .output()
        .unwrap();
    assert!(
        found.stdout.is_empty(),
        "the secret is on the builder's disk: {}",
        String::from_utf8_lossy(&found.stdout)
    );
    assert!(!p.contains(&value), "the secret reached the progress:\n{p}");
}

#[test]
fn a_dropped_ssh_connection_ends_the_session_and_the_next_build_works() {
    let r = Remote::new(Strata::new(), Some("20mbit"));
    let ctx = tempfile::tempdir().unwrap();
    big_context(ctx.path());
    let build = Command::new(strata_fs_tests::workspace_bin("strata"))
        .args(["build", "--progress", "plain", "--builder", &r.address()])
        .arg(ctx.path())
        .env("STRATA_SSH_COMMAND", r.sshd.ssh_command())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-transfer: some MiB of the 64 have crossed.
    let start = r.ns.sent();
    for _ in 0..600 {
        if r.ns.sent() - start > 8 * MIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ssh = Command::new("pkill")
        .args(["-KILL", "-P", &build.id().to_string(), "-x", "ssh"])
        .status()
        .unwrap();
    assert!(ssh.success(), "no ssh process under the client");
    let out = build.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("connection to the builder was lost") && err.contains("stderr="),
        "{err}"
    );
    let mut left = Vec::new();
    for _ in 0..100 {
        left =
            r.ns.processes()
                .into_iter()
                .filter(|p| p.contains("dial-stdio"))
                .collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    ok(r.build(ctx.path(), &[], &[]));
}

#[test]
fn a_remote_host_without_strata_is_an_error_in_sshs_words() {
    let r = Remote::new(Strata::new(), None);
    r.sshd.hide_strata();
    let ctx = tempfile::tempdir().unwrap();
    write(ctx.path(), "Dockerfile", b"FROM busybox\n");
    let o = r.build(ctx.path(), &[], &[]);
    assert!(!o.status.success());
    let err = text(&o);
    assert!(
        err.contains("exit status 127") && err.contains("strata: command not found"),
        "{err}"
    );
    let bad = client(
        &format!("ssh://root@{}", r.sshd.address),
        ctx.path(),
        &[],
        &[],
        "ssh -o BatchMode=yes -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes",
    );
    let err = text(&bad);
    assert!(
        !bad.status.success() && err.contains("Host key verification failed"),
        "{err}"
    );
}

#[test]
fn two_clients_on_one_builder_run_a_shared_step_once() {
    let store = Strata::new();
    let builder = Builder::start(None, store.root.path());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&builder.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the builder's socket is root's only");
    let contexts: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for c in &contexts {
        write(
            c.path(),
            "Dockerfile",
            b"FROM busybox\nCOPY a.txt /a.txt\nRUN sleep 3 && cat /a.txt > /b.txt\n",
        );
        write(c.path(), "a.txt", b"same in both\n");
    }
    let address = builder.unix_address();
    let runs: Vec<_> = contexts
        .iter()
        .map(|c| {
            let (a, p) = (address.clone(), c.path().to_path_buf());
            std::thread::spawn(move || client(&a, &p, &[], &[], "ssh"))
        })
        .collect();
    let outs: Vec<String> = runs.into_iter().map(|t| ok(t.join().unwrap())).collect();
    let mut ends: Vec<String> = outs.iter().map(|p| end_of(p, "RUN sleep 3")).collect();
    ends.sort();
    assert_eq!(
        ends,
        ["CACHED", "DONE"],
        "one build ran the shared step, the other waited for it:\n{outs:#?}"
    );
    // --load: the result also lands in the client's own store.
    let local = Strata::empty();
    let loaded = Command::new(strata_fs_tests::workspace_bin("strata"))
        .arg("--root")
        .arg(local.root.path())
        .args([
            "build",
            "--progress",
            "plain",
            "--builder",
            &address,
            "--load",
            "-t",
            "loaded:1",
            "-t",
            "loaded:also",
        ])
        .arg(contexts[0].path())
        .output()
        .unwrap();
    ok(loaded);
    let ls = local.run(&["images", "ls"]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.contains("loaded:1") && ls.contains("loaded:also"),
        "every -t name is loaded: {ls}"
    );
    assert_eq!(builder.stop(), Some(0), "SIGTERM stops the builder cleanly");
}

/// How the step whose header contains `step` ended: `DONE`, `CACHED` or `ERROR`.
fn end_of(progress: &str, step: &str) -> String {
    let header = progress
        .lines()
        .find(|l| l.contains(step))
        .unwrap_or_else(|| panic!("no step {step:?}:\n{progress}"));
    let id = header.split_whitespace().next().unwrap();
    progress
        .lines()
        .filter_map(|l| l.strip_prefix(id)?.strip_prefix(' '))
        .filter_map(|rest| {
            ["DONE", "CACHED", "ERROR"]
                .into_iter()
                .find(|w| rest.starts_with(w))
        })
        .next()
        .unwrap_or_else(|| panic!("step {step:?} did not end:\n{progress}"))
        .to_string()
}

#[test]
fn a_local_cache_lives_on_the_client_and_warms_another_builder() {
    let ctx = tempfile::tempdir().unwrap();
    write(
        ctx.path(),
        "Dockerfile",
        b"FROM busybox\nCOPY a.txt /a.txt\nRUN cat /a.txt > /b.txt\n",
    );
    write(ctx.path(), "a.txt", b"cached\n");
    let home = tempfile::tempdir().unwrap();
    // A relative directory is the client's, taken from where the client runs.
    let build = |builder: &Builder, args: &[&str]| {
        let out = Command::new(strata_fs_tests::workspace_bin("strata"))
            .current_dir(home.path())
            .args(["build", "--progress", "plain", "--builder"])
            .arg(builder.unix_address())
            .args(args)
            .arg(ctx.path())
            .output()
            .unwrap();
        ok(out)
    };
    let (one, two) = (Strata::new(), Strata::new());
    let first = Builder::start(None, one.root.path());
    build(&first, &["--cache-to", "type=local,dest=ci-cache"]);
    assert!(home.path().join("ci-cache/index.json").is_file());
    let second = Builder::start(None, two.root.path());
    let p = build(&second, &["--cache-from", "type=local,src=ci-cache"]);
    assert!(
        p.contains(", 0 run"),
        "warm from the client's directory:\n{p}"
    );
}

/// `strata build` against `address` in a thread; its output arrives on the receiver.
fn build_in_background(address: &str, ctx: &Path) -> std::sync::mpsc::Receiver<Output> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (a, p) = (address.to_string(), ctx.to_path_buf());
    std::thread::spawn(move || tx.send(client(&a, &p, &[], &[], "ssh")));
    rx
}

/// What the client said once it ended; a client still waiting after a minute is hung.
fn ended(rx: std::sync::mpsc::Receiver<Output>) -> String {
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the client hangs after its builder went away");
    assert!(!out.status.success(), "the build cannot have succeeded");
    text(&out)
}

#[test]
fn a_builder_that_dies_or_stops_mid_build_is_a_clear_error_and_the_next_one_builds() {
    let store = Strata::new();
    let ctx = tempfile::tempdir().unwrap();
    let slow = b"FROM busybox\nRUN echo started && sleep 40\n";
    write(ctx.path(), "Dockerfile", slow);
    let mut builder = Builder::start(None, store.root.path());
    let running = build_in_background(&builder.unix_address(), ctx.path());
    std::thread::sleep(Duration::from_secs(3));
    builder.kill();
    let said = ended(running);
    assert!(
        said.contains("connection to the builder was lost"),
        "a crash is named as one:\n{said}"
    );

    // A new builder on the same root removes the step the crash left running, and builds; then
    // SIGTERM mid-build tells the client why.
    let builder = Builder::start(None, store.root.path());
    let runtime = store.root.path().join("build/runtime");
    let listed = Command::new("runc")
        .arg("--root")
        .arg(&runtime)
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "",
        "the crashed builder's step is still running"
    );
    write(
        ctx.path(),
        "Dockerfile",
        b"FROM busybox\nRUN echo after the crash\n",
    );
    ok(client(&builder.unix_address(), ctx.path(), &[], &[], "ssh"));
    write(ctx.path(), "Dockerfile", slow);
    let running = build_in_background(&builder.unix_address(), ctx.path());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(builder.stop(), Some(0), "SIGTERM drains and stops");
    let said = ended(running);
    assert!(said.contains("shutting down"), "{said}");
}
