//! Socket activation: a supervisor holds the listening socket the way systemd does (descriptor 3,
//! LISTEN_FDS=1, LISTEN_PID), so the snapshotter can die and come back without a caller ever
//! seeing "connection refused".

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command};

use rand::{Rng, SeedableRng};
use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::{spawn_activated, Snap};
use strata_fs_tests::require_root;

#[test]
fn calls_made_while_the_snapshotter_is_down_wait_for_the_next_one() {
    require_root();
    let mut s = Supervisor::start();
    let c = Containerd::start(&s.socket);
    c.wait_for_snapshotter("strata");
    c.ctr(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "prepare",
        "before",
        "",
    ]);
    assert!(
        !s.root.join("never-bound.sock").exists(),
        "it served the passed socket"
    );

    // Down for 300 ms, as a supervisor restarts it (the unit: RestartSec=100ms): a Prepare made
    // then waits in the backlog and is answered by the next process. containerd's proxy client
    // gives a reconnection about a second (its backoff's base delay) to complete the handshake.
    s.kill();
    let mut prepare = c.ctr_command(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "prepare",
        "while-down",
        "",
    ]);
    let prepare = std::thread::spawn(move || prepare.output().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(300));
    s.respawn();
    let out = prepare.join().unwrap();
    assert!(
        out.status.success(),
        "a call made while the snapshotter was down: {}{}",
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    let ls = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(ls.contains("before") && ls.contains("while-down"), "{ls}");

    // SIGTERM: the socket belongs to the supervisor and stays.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(s.daemon.0.wait().unwrap().success());
    assert!(
        s.socket.exists(),
        "the supervisor's socket is left in place"
    );
    drop(c);
}

const BUSYBOX: &str = "docker.io/strata/busybox:1";

/// A daemon process, killed when the test ends (however it ends).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A supervisor holding the snapshotter's listening socket as systemd does, and the daemon it
/// runs on it; when dropped, the daemon is killed and what it mounted detached.
struct Supervisor {
    dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    root: std::path::PathBuf,
    listener: OwnedFd,
    daemon: Guard,
}

impl Supervisor {
    fn start() -> Supervisor {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("strata.sock");
        let listener: OwnedFd = std::os::unix::net::UnixListener::bind(&socket)
            .unwrap()
            .into();
        let root = dir.path().join("root");
        let daemon = Guard(spawn_activated(
            &root,
            &listener,
            &dir.path().join("strata.log"),
        ));
        Supervisor {
            dir,
            socket,
            root,
            listener,
            daemon,
        }
    }

    /// SIGKILLs the daemon and waits for it.
    fn kill(&mut self) {
        self.daemon.0.kill().unwrap();
        self.daemon.0.wait().unwrap();
    }

    /// Starts the next daemon on the socket.
    fn respawn(&mut self) {
        let log = self.dir.path().join("strata.log");
        self.daemon = Guard(spawn_activated(&self.root, &self.listener, &log));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("strata.log")).unwrap_or_default()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let state = self.daemon.0.try_wait();
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!(
                "strata-snapshotter ({state:?}), its log's tail:\n{}",
                tail.join("\n")
            );
        }
        let _ = self.daemon.0.kill();
        let _ = self.daemon.0.wait();
        strata_fs_tests::detach_mounts_under(self.dir.path());
    }
}

/// Starts `n` containers at once (`ctr run --rm`, each printing its name); returns each one's
/// output, in order.
fn start_containers(
    c: &Containerd,
    n: usize,
) -> Vec<std::thread::JoinHandle<std::process::Output>> {
    start_named(c, n, "c")
}

/// [`start_containers`], named `PREFIX<i>`.
fn start_named(
    c: &Containerd,
    n: usize,
    prefix: &str,
) -> Vec<std::thread::JoinHandle<std::process::Output>> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}{i}");
            let mut cmd = c.ctr_command(&[
                "run",
                "--rm",
                "--snapshotter",
                "strata",
                BUSYBOX,
                &name,
                "/bin/echo",
                &name,
            ]);
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect()
}

/// The containers whose start failed, with why.
fn failed(runs: Vec<std::thread::JoinHandle<std::process::Output>>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, r) in runs.into_iter().enumerate() {
        let o = r.join().unwrap();
        let said = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !o.status.success() || !said.ends_with(&i.to_string()) {
            out.push(format!(
                "c{i}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    out
}

/// After the starts: no container and no active snapshot is left behind.
fn nothing_left(c: &Containerd) {
    let containers = c.ctr(&["containers", "ls", "-q"]);
    assert!(
        containers.trim().is_empty(),
        "containers left: {containers}"
    );
    let snaps = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(!snaps.contains("Active"), "active snapshots left:\n{snaps}");
}

#[test]
fn sigkill_in_the_middle_of_40_starts_fails_only_calls_in_flight() {
    require_root();
    let mut s = Supervisor::start();
    let c = Containerd::start(&s.socket);
    c.wait_for_snapshotter("strata");
    c.import(BUSYBOX, &[strata_fs_tests::image::busybox_layer().finish()]);

    // Killed 1.5 s into 40 starts and started again by its supervisor as the shipped unit does
    // (RestartSec=100ms).
    let runs = start_containers(&c, 40);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    s.kill();
    std::thread::sleep(std::time::Duration::from_millis(100));
    s.respawn();
    let failures = failed(runs);
    // Calls made while it is down wait in the backlog and are answered by the next process.
    // A call the kill cuts off in flight containerd reports as "transport is closing" (its proxy
    // client does not retry): that may fail, nothing else.
    let other: Vec<&String> = failures
        .iter()
        .filter(|f| !f.contains("transport is closing"))
        .collect();
    assert!(
        other.is_empty(),
        "starts failed for another reason than a call cut off in flight: {other:#?}"
    );
    nothing_left(&c);
    // Whatever was cut off works when tried again.
    assert!(failed(start_containers(&c, failures.len())).is_empty());
    println!(
        "sigkill during 40 starts: {} cut off in flight, 0 refused",
        failures.len()
    );
    drop(c);
}

#[test]
fn restart_hands_over_to_the_binary_on_disk_without_a_failed_start() {
    require_root();
    let mut d = Copied::start();
    let c = Containerd::start(&d.socket);
    c.wait_for_snapshotter("strata");
    c.import(BUSYBOX, &[strata_fs_tests::image::busybox_layer().finish()]);
    let old_pid = d.child.id();

    let runs = start_containers(&c, 40);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // The "second build": the same binary as a new file at the daemon's path.
    let staged = d.bin.with_extension("new");
    std::fs::copy(
        strata_fs_tests::workspace_bin("strata-snapshotter"),
        &staged,
    )
    .unwrap();
    std::fs::rename(&staged, &d.bin).unwrap();
    let out = d.restart();
    assert!(
        out.status.success(),
        "restart: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let failures = failed(runs);
    assert!(
        failures.is_empty(),
        "starts failed across the handover: {failures:#?}\n{}",
        d.log()
    );
    assert!(
        d.child.wait().unwrap().success(),
        "the old daemon exits cleanly"
    );

    // The successor is the binary now on disk, and serves.
    let pid: u32 = std::fs::read_to_string(d.root.join("snapshotter.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(pid, old_pid);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe, d.bin,
        "the successor runs the new file, not the replaced one"
    );
    nothing_left(&c);
    assert!(d.socket.exists(), "the socket stays");
    c.ctr(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "prepare",
        "after",
        "",
    ]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_gone(pid);
    assert!(
        !d.socket.exists(),
        "the last process removes the socket it was handed"
    );
}

/// A daemon run from a copy of the binary (which a test replaces), on a socket it binds itself;
/// killed when dropped, with any successor it handed over to.
struct Copied {
    child: Child,
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    root: std::path::PathBuf,
    socket: std::path::PathBuf,
}

impl Copied {
    fn start() -> Copied {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin/strata-snapshotter");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::copy(strata_fs_tests::workspace_bin("strata-snapshotter"), &bin).unwrap();
        let (root, socket) = (dir.path().join("root"), dir.path().join("strata.sock"));
        let log = std::fs::File::create(dir.path().join("strata.log")).unwrap();
        let child = Command::new(&bin)
            .arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(&socket)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Copied {
            child,
            dir,
            bin,
            root,
            socket,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("strata.log")).unwrap_or_default()
    }

    /// Puts `script` where the binary is, as a new file (an upgrade does the same).
    fn replace_binary(&self, script: &str) {
        let staged = self.bin.with_extension("new");
        std::fs::write(&staged, script).unwrap();
        std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::rename(&staged, &self.bin).unwrap();
    }

    /// `strata-snapshotter restart` for this daemon's root.
    fn restart(&self) -> std::process::Output {
        Command::new(strata_fs_tests::workspace_bin("strata-snapshotter"))
            .arg("--root")
            .arg(&self.root)
            .arg("restart")
            .output()
            .unwrap()
    }
}

impl Drop for Copied {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.root.join("snapshotter.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        strata_fs_tests::detach_mounts_under(self.dir.path());
    }
}

#[test]
fn a_successor_that_fails_leaves_or_puts_the_daemon_back() {
    require_root();
    let mut d = Copied::start();
    let c = Containerd::start(&d.socket);
    c.wait_for_snapshotter("strata");
    let prepare = |key: &str| c.ctr(&["snapshots", "--snapshotter", "strata", "prepare", key, ""]);
    prepare("before");
    // A "new binary" that fails at once: the daemon never stopped serving.
    d.replace_binary("#!/bin/sh\nexit 3\n");
    let out = d.restart();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("serves on"), "{err}");
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon still runs"
    );
    prepare("still");
    // One that says it is ready (the daemon lets go of its database) and then dies: the daemon
    // opens the database again and serves on.
    d.replace_binary("#!/bin/sh\nprintf r >&4\nsleep 0.2\nexit 3\n");
    let out = d.restart();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("exited before it served"),
        "{err}\n{}",
        d.log()
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the daemon still runs"
    );
    c.wait_for_snapshotter("strata");
    prepare("after");
    let ls = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(
        ["before", "still", "after"].iter().all(|k| ls.contains(k)),
        "{ls}"
    );
}

/// (committed, active) snapshots in containerd's view and in Strata's own records.
fn counts(c: &Containerd, socket: &Path) -> ((usize, usize), (usize, usize)) {
    let ls = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    let count = |kind: &str| ls.lines().filter(|l| l.trim_end().ends_with(kind)).count();
    let containerd = (count("Committed"), count("Active"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let records = rt.block_on(async { Snap::at(socket).await.try_list(&[]).await.unwrap() });
    let kind = |k: i32| records.iter().filter(|r| r.kind == k).count();
    (containerd, (kind(3), kind(2)))
}

/// Checks that Strata has every snapshot containerd has, and that what else it has is an
/// orphan (a Prepare cut off before containerd recorded it) that containerd's garbage
/// collector removes on its next pass — triggered here, as any later removal triggers it.
fn views_agree(c: &Containerd, socket: &Path, round: usize) {
    let (containerd, strata) = counts(c, socket);
    assert!(
        containerd.0 <= strata.0 && containerd.1 <= strata.1,
        "round {round}: containerd knows snapshots Strata lost: {containerd:?} vs {strata:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut last = (containerd, strata);
    while last.0 != last.1 && std::time::Instant::now() < deadline {
        let key = format!("gc-{round}");
        c.ctr(&["snapshots", "--snapshotter", "strata", "prepare", &key, ""]);
        c.ctr(&["snapshots", "--snapshotter", "strata", "rm", &key]);
        std::thread::sleep(std::time::Duration::from_millis(300));
        last = counts(c, socket);
    }
    assert_eq!(
        last.0, last.1,
        "round {round}: (committed, active) snapshots in containerd's view vs Strata's records after a garbage collection"
    );
}

#[test]
fn kill9_rounds_under_concurrent_starts_leave_containerd_and_strata_agreeing() {
    require_root();
    let mut s = Supervisor::start();
    let c = Containerd::start(&s.socket);
    c.wait_for_snapshotter("strata");
    c.import(BUSYBOX, &[strata_fs_tests::image::busybox_layer().finish()]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6c);
    let mut cut = 0;
    for round in 0..6 {
        let runs = start_named(&c, 16, &format!("r{round}c"));
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(100..1500)));
        s.kill();
        std::thread::sleep(std::time::Duration::from_millis(100));
        s.respawn();
        let failures = failed(runs);
        let other: Vec<&String> = failures
            .iter()
            .filter(|f| !f.contains("transport is closing"))
            .collect();
        assert!(other.is_empty(), "round {round}: {other:#?}");
        cut += failures.len();
        // A daemon slow to start (a loaded machine) puts containerd's client in its reconnect
        // back-off; the views are compared once containerd reaches the daemon again.
        c.wait_for_snapshotter("strata");
        views_agree(&c, &s.socket, round);
        assert_eq!(
            counts(&c, &s.socket).1 .1,
            0,
            "round {round}: active snapshots left behind"
        );
    }
    println!(
        "6 kill -9 rounds under 16 concurrent starts: {cut} starts cut off in flight; views agree"
    );
    drop(c);
}

/// Waits (10 s at most) until process `pid` is gone.
fn wait_gone(pid: u32) {
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("process {pid} did not exit");
}
