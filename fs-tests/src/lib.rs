//! Support for Strata's integration suites: real daemons under temp dirs, real mounts, real images.
//!
//! Every daemon gets its own root, state and sockets under a temp dir and is stopped by PID when
//! its handle drops. The suites need root (mounts); they fail loudly, never skip, when a tool is
//! missing: `scripts/test` installs them.

pub mod attr_layer;
pub mod containerd;
pub mod daemon;
pub mod docker_roots;
pub mod dockerd;
pub mod image;
pub mod lazy_lowers;
pub mod mount;
pub mod registry;
pub mod remote;
pub mod strata;
pub mod tree;

use std::path::PathBuf;

/// A binary of this workspace, next to the test executable's `deps/` directory, or from
/// `STRATA_BIN_DIR`.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("STRATA_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`, as scripts/test does)",
        bin.display()
    );
    bin
}

/// Runs `strata-snapshotter ARGS`, which must succeed; returns its stdout.
pub fn snapshotter_cli(args: &[&str]) -> String {
    let out = std::process::Command::new(workspace_bin("strata-snapshotter"))
        .args(args)
        .output()
        .expect("run strata-snapshotter");
    assert!(
        out.status.success(),
        "strata-snapshotter {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics with a clear message unless running as root: these suites mount filesystems.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the fs-tests mount filesystems and start containerd: run them as root (scripts/test does)"
    );
}

/// SIGTERM, then SIGKILL after `grace`, and reap.
pub fn terminate(child: &mut std::process::Child, grace: std::time::Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = std::time::Instant::now() + grace;
    while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Lazily detaches every mount under `dir` (daemons killed mid-work leave theirs behind).
pub fn detach_mounts_under(dir: &std::path::Path) {
    let _ = strata_snapshotter::mounts::unmount_all_under(dir);
}
