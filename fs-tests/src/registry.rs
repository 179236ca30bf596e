//! Debian's `docker-registry` (the distribution server) on a free 127.0.0.1 port, with its
//! storage in a temp dir; stopped by PID on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Registry {
    pub dir: TempDir,
    /// `127.0.0.1:PORT`
    pub host: String,
    child: Child,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("registry-")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Self::spawn(dir.path());
        let r = Registry { dir, host, child };
        r.wait();
        r
    }

    fn spawn(dir: &std::path::Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("registry.log"))
            .unwrap();
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect(
                "docker-registry is missing: install Debian's docker-registry (scripts/test does)",
            )
    }

    fn wait(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {}",
                self.host
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (its storage stays).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and storage.
    pub fn start_again(&mut self) {
        self.child = Self::spawn(self.dir.path());
        self.wait();
    }

    /// The file holding blob `digest` in the registry's storage.
    pub fn blob_path(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Copies an OCI layout archive into the registry as `repo:tag` with skopeo.
    pub fn push_archive(&self, archive: &std::path::Path, repo_tag: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false", "--quiet"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host))
            .output()
            .expect("skopeo is missing: install Debian's skopeo (scripts/test does)");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
