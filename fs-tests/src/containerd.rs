//! A private containerd (Debian's 1.6) with Strata as proxy snapshotter `strata`, and `ctr` on it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running containerd under a temp dir; dropping it stops containerd and its shims.
pub struct Containerd {
    pub dir: TempDir,
    pub address: PathBuf,
    pub namespace: String,
    child: Option<Child>,
}

static INSTANCES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Containerd {
    /// Starts containerd with proxy plugin `strata` at `strata_socket`.
    pub fn start(strata_socket: &Path) -> Containerd {
        let dir = tempfile::Builder::new().prefix("ctrd-").tempdir().unwrap();
        let address = dir.path().join("c.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  address = "{debug}"
[proxy_plugins.strata]
  type = "snapshot"
  address = "{strata}"
# Collect garbage after every deletion, so tests see containerd's GC remove backend snapshots.
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
"#,
            root = dir.path().join("root").display(),
            state = dir.path().join("state").display(),
            address = address.display(),
            debug = dir.path().join("debug.sock").display(),
            strata = strata_socket.display(),
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let mut c = Containerd {
            address,
            // One namespace per instance: runc keeps its state under /run/containerd/runc/NS,
            // shared by every containerd, so equal container ids in parallel tests would collide.
            namespace: format!(
                "strata-test-{}-{}",
                std::process::id(),
                INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            child: None,
            dir,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect(
                "containerd is missing: install Debian's containerd and runc (scripts/test does)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.address.exists() && self.try_ctr(&["version"]).status.success() {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr ARGS` against this containerd, not yet run (to run in another thread, or piped).
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr` against this containerd and returns its output whatever the exit status.
    pub fn try_ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args)
            .output()
            .expect("ctr is missing: install Debian's containerd (scripts/test does)")
    }

    /// Waits (30 s at most) until containerd reaches the proxy snapshotter `name` again: after a
    /// snapshotter restart its client backs off for up to 3 s.
    pub fn wait_for_snapshotter(&self, name: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let out = self.try_ctr(&["snapshots", "--snapshotter", name, "ls"]);
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "containerd does not reach snapshotter {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Runs `ctr`, panicking with its output unless it succeeds; returns stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = self.try_ctr(args);
        assert!(
            out.status.success(),
            "ctr {} failed: {}{}\ncontainerd log tail:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Writes image `name` with `layers` as an OCI archive and imports it with `ctr images import
    /// --snapshotter strata`.
    pub fn import(&self, name: &str, layers: &[Vec<u8>]) {
        let archive = self
            .dir
            .path()
            .join(format!("{}.tar", name.replace(['/', ':'], "_")));
        crate::image::write_oci_archive(&archive, name, layers, &["/bin/sh"]);
        self.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "strata",
            archive.to_str().unwrap(),
        ]);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Running tasks first, so no shim outlives the test.
            for line in self
                .try_ctr(&["tasks", "ls", "-q"])
                .stdout
                .split(|b| *b == b'\n')
            {
                let id = String::from_utf8_lossy(line).trim().to_string();
                if !id.is_empty() {
                    let _ = self.try_ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
                    std::thread::sleep(Duration::from_millis(100));
                    let _ = self.try_ctr(&["tasks", "delete", "-f", &id]);
                }
            }
            crate::terminate(&mut child, Duration::from_secs(10));
            // containerd leaves its state mounts behind when killed; lazily detach what is left.
            crate::detach_mounts_under(self.dir.path());
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
