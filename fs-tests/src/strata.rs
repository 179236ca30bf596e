//! The `strata` build CLI on a private root, with a busybox base image loaded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use crate::image::{busybox_layer, write_oci_archive};

pub struct Strata {
    pub root: TempDir,
    pub ctx: TempDir,
}

/// A build killed mid-step (the kill -9 tests) leaves its container running and its mounts in
/// place until the next build on the root removes them; at the end of a test nothing may stay.
impl Drop for Strata {
    fn drop(&mut self) {
        let runtime = self.root.path().join("build/runtime");
        if let Ok(out) = Command::new("runc")
            .arg("--root")
            .arg(&runtime)
            .args(["list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runtime)
                    .args(["delete", "-f", id])
                    .output();
            }
        }
        crate::detach_mounts_under(self.root.path());
    }
}

/// What a build printed, split up.
pub struct Build {
    pub ok: bool,
    pub progress: String,
}

impl Build {
    /// The `built in ...: N steps, C cached, R run` numbers.
    pub fn counts(&self) -> (usize, usize, usize) {
        let line = self
            .progress
            .lines()
            .rev()
            .find(|l| l.starts_with("built in"))
            .unwrap_or_else(|| panic!("no summary in:\n{}", self.progress));
        let nums: Vec<usize> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect();
        let n = nums.len();
        (nums[n - 3], nums[n - 2], nums[n - 1])
    }

    /// The manifest digest from `writing image sha256:...`.
    pub fn digest(&self) -> String {
        self.progress
            .lines()
            .find_map(|l| l.split("writing image ").nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("no image digest in:\n{}", self.progress))
    }
}

impl Strata {
    /// A fresh root with `docker.io/library/busybox:latest` loaded, and an empty context.
    pub fn new() -> Strata {
        crate::require_root();
        let s = Strata {
            root: tempfile::Builder::new()
                .prefix("strata-build-")
                .tempdir()
                .unwrap(),
            ctx: tempfile::tempdir().unwrap(),
        };
        let archive = s.root.path().join("busybox.tar");
        write_oci_archive(
            &archive,
            "docker.io/library/busybox:latest",
            &[busybox_layer().finish()],
            &["/bin/sh"],
        );
        let out = s.run(&["images", "load", archive.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "images load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    /// A fresh root with the OCI archive `archive` loaded, and an empty context.
    pub fn with_image(archive: &Path) -> Strata {
        let s = Strata::empty();
        let out = s.run(&["images", "load", archive.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "images load {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    /// A fresh root with no images, and an empty context.
    pub fn empty() -> Strata {
        crate::require_root();
        Strata {
            root: tempfile::Builder::new()
                .prefix("strata-build-")
                .tempdir()
                .unwrap(),
            ctx: tempfile::tempdir().unwrap(),
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(crate::workspace_bin("strata"))
            .arg("--root")
            .arg(self.root.path())
            .args(args)
            .output()
            .expect("run strata")
    }

    /// Writes a context file (creating parents).
    pub fn file(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.ctx.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn dockerfile(&self, text: &str) {
        self.file("Dockerfile", text);
    }

    /// `strata build --progress plain ARGS CONTEXT`.
    pub fn build(&self, args: &[&str]) -> Build {
        self.build_env(args, &[])
    }

    pub fn build_env(&self, args: &[&str], env: &[(&str, &str)]) -> Build {
        let out = Command::new(crate::workspace_bin("strata"))
            .arg("--root")
            .arg(self.root.path())
            .args(["build", "--progress", "plain"])
            .args(args)
            .arg(self.ctx.path())
            .envs(env.iter().copied())
            .output()
            .expect("run strata build");
        Build {
            ok: out.status.success(),
            progress: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// [`Strata::build`] that fails instead of hanging: a build still running after `limit` is
    /// killed and reported as hung (a deadlock guard, not a speed check: pick a generous limit).
    pub fn build_or_hang(&self, args: &[&str], limit: std::time::Duration) -> Build {
        let mut child = Command::new(crate::workspace_bin("strata"))
            .arg("--root")
            .arg(self.root.path())
            .args(["build", "--progress", "plain"])
            .args(args)
            .arg(self.ctx.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run strata build");
        let stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut text);
            text
        });
        let deadline = std::time::Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let progress = reader.join().unwrap();
        assert!(
            status.is_some(),
            "the build hung for {limit:?}:\n{progress}"
        );
        Build {
            ok: status.is_some_and(|s| s.success()),
            progress,
        }
    }

    /// Builds and panics with the progress unless it succeeds.
    pub fn build_ok(&self, args: &[&str]) -> Build {
        let b = self.build(args);
        assert!(b.ok, "build failed:\n{}", b.progress);
        b
    }

    /// Builds and exports the final stage's files to a new directory.
    pub fn build_local(&self, args: &[&str]) -> (Build, TempDir) {
        let out = tempfile::tempdir().unwrap();
        let spec = format!("type=local,dest={}", out.path().display());
        let mut all = vec!["--output", spec.as_str()];
        all.extend_from_slice(args);
        let b = self.build_ok(&all);
        (b, out)
    }

    pub fn path(&self) -> &Path {
        self.ctx.path()
    }
}

impl Default for Strata {
    fn default() -> Self {
        Strata::new()
    }
}
