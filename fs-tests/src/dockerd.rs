//! A private dockerd (Debian's docker.io 20.10) with its own data root and sockets, no bridge and
//! no iptables, stopped by PID on drop. Always driven with Debian's `/usr/bin/docker` client.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const DOCKER: &str = "/usr/bin/docker";

pub struct Dockerd {
    pub dir: TempDir,
    child: Child,
}

impl Dockerd {
    /// Starts dockerd with `--storage-driver driver` and `extra` flags.
    pub fn start(driver: &str, extra: &[&str]) -> Dockerd {
        let dir = tempfile::Builder::new()
            .prefix("dockerd-")
            .tempdir()
            .unwrap();
        let child = Dockerd::spawn(dir.path(), driver, extra);
        let mut dd = Dockerd { dir, child };
        dd.wait_ready();
        dd
    }

    fn spawn(d: &Path, driver: &str, extra: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("dockerd.log"))
            .unwrap();
        Command::new("dockerd")
            .arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver",
                driver,
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd is missing: install Debian's docker.io (scripts/test does)")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.try_docker(&["version"]).status.success() {
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("dockerd exited with {s}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops dockerd and starts it again on the same data root with another storage driver.
    pub fn restart(&mut self, driver: &str) {
        self.stop();
        self.child = Dockerd::spawn(self.dir.path(), driver, &[]);
        self.wait_ready();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    pub fn socket(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    pub fn try_docker(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .arg("-H")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("Debian's docker client")
    }

    /// Runs the docker client, panicking with its output unless it succeeds; returns stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self.try_docker(args);
        assert!(
            out.status.success(),
            "docker {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn load(&self, archive: &Path) {
        self.docker(&["load", "-i", archive.to_str().unwrap()]);
    }
}

impl Dockerd {
    /// Stops dockerd (it stops its containers) and keeps its data root.
    pub fn stop(&mut self) {
        crate::terminate(&mut self.child, Duration::from_secs(15));
        crate::detach_mounts_under(self.dir.path());
    }

    /// The data root (`--data-root`).
    pub fn data_root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}
