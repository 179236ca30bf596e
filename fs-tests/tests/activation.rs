//! Socket activation: a supervisor holds the listening socket the way systemd does (descriptor 3,
//! LISTEN_FDS=1, LISTEN_PID), so the snapshotter can die and come back without a caller ever
//! seeing "connection refused".

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::require_root;

/// Starts strata-snapshotter on `root` serving the supervisor's `listener` as descriptor 3.
fn spawn_activated(root: &Path, listener: &OwnedFd, log: &Path) -> Child {
    // A copy above 3, so that dup2 onto 3 in the child always makes a new, inheritable descriptor.
    let high = nix::fcntl::fcntl(
        listener.as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10),
    )
    .unwrap();
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    let high = unsafe { OwnedFd::from_raw_fd(high) };
    let raw = high.as_raw_fd();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(strata_fs_tests::workspace_bin("strata-snapshotter"))
        .arg("--root")
        .arg(root)
        .arg("--address")
        .arg(root.join("never-bound.sock"))
        .args(["--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: dup2 is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(high);
    child
}

#[test]
fn calls_made_while_the_snapshotter_is_down_wait_for_the_next_one() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("strata.sock");
    let listener: OwnedFd = std::os::unix::net::UnixListener::bind(&socket)
        .unwrap()
        .into();
    let (root, log) = (dir.path().join("root"), dir.path().join("strata.log"));
    let mut d = spawn_activated(&root, &listener, &log);
    let c = Containerd::start(&socket);
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
        !root.join("never-bound.sock").exists(),
        "it served the passed socket"
    );

    // Down for 300 ms, as a supervisor restarts it (the unit: RestartSec=100ms): a Prepare made
    // then waits in the backlog and is answered by the next process. containerd's proxy client
    // gives a reconnection about a second (its backoff's base delay) to complete the handshake.
    d.kill().unwrap();
    d.wait().unwrap();
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
    let mut d = spawn_activated(&root, &listener, &log);
    let out = prepare.join().unwrap();
    assert!(
        out.status.success(),
        "a call made while the snapshotter was down: {}{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let ls = c.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert!(ls.contains("before") && ls.contains("while-down"), "{ls}");

    // SIGTERM: the socket belongs to the supervisor and stays.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(d.wait().unwrap().success());
    assert!(socket.exists(), "the supervisor's socket is left in place");
    drop(c);
    strata_fs_tests::detach_mounts_under(dir.path());
}
