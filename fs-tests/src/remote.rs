//! A remote machine for builder tests: a network namespace behind a veth pair (TEST-NET-2
//! addresses, a token-bucket rate on the link), Debian's `sshd` inside it with a temporary host
//! key and authorized key, and `strata serve` on its own root, reached as
//! `ssh://root@ADDRESS/PATH/buildd.sock` with the system `ssh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

static NEXT: AtomicU32 = AtomicU32::new(0);
/// Held while a namespace picks its addresses, so that two tests never pick the same.
static PICKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new unencrypted ed25519 key at `path` (and `path.pub`) with `comment`.
pub fn keygen(path: &Path, comment: &str) {
    let p = path.to_str().expect("UTF-8 path");
    run(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", p],
    );
}

/// A /30 of TEST-NET-2 (198.51.100.4k/30, k in 1..=62) that no interface here uses yet, from
/// `seed` on: a test killed earlier may have left its link behind.
fn free_slot(seed: u32) -> u32 {
    let out = Command::new("ip")
        .args(["-br", "addr"])
        .output()
        .expect("ip");
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    (0..62)
        .map(|i| (seed + i) % 62 + 1)
        .find(|k| !used.contains(&format!("198.51.100.{}/30", k * 4 + 1)))
        .expect("a free /30 in 198.51.100.0/24")
}

/// A network namespace joined to this one by a veth pair: `host` here, `remote` inside.
pub struct Netns {
    pub name: String,
    /// The veth end in this namespace; its tx bytes are what the client sent.
    pub veth: String,
    pub host: String,
    pub remote: String,
}

impl Netns {
    /// With the link shaped to `rate` (tc tbf, e.g. "20mbit") when given.
    pub fn new(rate: Option<&str>) -> Netns {
        crate::require_root();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let picking = PICKING.lock().unwrap_or_else(|e| e.into_inner());
        let slot = free_slot(std::process::id() * 7 + n);
        let ns = Netns {
            name: format!("strata-t{}-{n}", std::process::id()),
            veth: format!("st{}x{n}", std::process::id() % 100_000),
            host: format!("198.51.100.{}", slot * 4 + 1),
            remote: format!("198.51.100.{}", slot * 4 + 2),
        };
        let peer = format!("{}p", ns.veth);
        run("ip", &["netns", "add", &ns.name]);
        run(
            "ip",
            &[
                "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
            ],
        );
        run("ip", &["link", "set", &peer, "netns", &ns.name]);
        run(
            "ip",
            &["addr", "add", &format!("{}/30", ns.host), "dev", &ns.veth],
        );
        run("ip", &["link", "set", &ns.veth, "up"]);
        drop(picking);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        inside(&["addr", "add", &format!("{}/30", ns.remote), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        if let Some(rate) = rate {
            run(
                "tc",
                &[
                    "qdisc", "add", "dev", &ns.veth, "root", "tbf", "rate", rate, "burst", "64kb",
                    "latency", "400ms",
                ],
            );
        }
        ns
    }

    /// Bytes sent from this namespace into the remote one so far.
    pub fn sent(&self) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/tx_bytes", self.veth))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// `argv` run on the namespace's network (with this mount namespace: `ip netns exec` would
    /// remount /sys, and runc needs the cgroup mounts under it).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .args(argv);
        c
    }

    /// The command lines of the processes inside the namespace.
    pub fn processes(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
    }
}

/// `sshd` inside a namespace, letting in root with a temporary key; `strata` is on the PATH
/// its sessions get (from `bin`).
pub struct Sshd {
    pub dir: TempDir,
    child: Child,
    pub address: String,
}

impl Sshd {
    pub fn start(ns: &Netns) -> Sshd {
        Sshd::start_with(ns, &[])
    }

    /// With more environment for its sessions (e.g. DOCKER_HOST for `docker system dial-stdio`).
    pub fn start_with(ns: &Netns, env: &[(&str, &str)]) -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["host_key", "client_key"] {
            keygen(&d.join(key), key);
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        std::fs::write(d.join("known_hosts"), format!("{} {host_pub}", ns.remote)).unwrap();
        let bin = d.join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(crate::workspace_bin("strata"), bin.join("strata")).unwrap();
        let extra: String = env.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        let config = format!(
            "ListenAddress {}:22\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSetEnv PATH={}:/usr/sbin:/usr/bin:/sbin:/bin{extra}\n",
            ns.remote,
            bin.display(),
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = ns
            .command(&[
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                d.join("sshd_config").to_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        let sshd = Sshd {
            dir,
            child,
            address: ns.remote.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((ns.remote.as_str(), 22)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not start in {}",
                ns.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    /// `STRATA_SSH_COMMAND` for a client: this key, these known hosts, no prompts.
    pub fn ssh_command(&self) -> String {
        let d = self.dir.path().display();
        format!("ssh -i {d}/client_key -o UserKnownHostsFile={d}/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes")
    }

    /// A directory whose `ssh` is [`Sshd::ssh_command`]: put first on a client's PATH, it serves
    /// clients that run plain `ssh` (docker's CLI).
    pub fn client_path(&self) -> PathBuf {
        let dir = self.dir.path().join("client-bin");
        let _ = std::fs::create_dir(&dir);
        let cmd = self.ssh_command().replacen("ssh", "/usr/bin/ssh", 1);
        let script = dir.join("ssh");
        std::fs::write(&script, format!("#!/bin/sh\nexec {cmd} \"$@\"\n")).unwrap();
        let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
        std::fs::set_permissions(&script, mode).unwrap();
        dir
    }

    /// Takes `strata` off the sessions' PATH.
    pub fn hide_strata(&self) {
        std::fs::remove_file(self.dir.path().join("bin/strata")).unwrap();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        crate::terminate(&mut self.child, Duration::from_secs(2));
    }
}

/// `strata serve` on `root`, inside a namespace (or here, with None).
pub struct Builder {
    child: Child,
    pub socket: PathBuf,
    _dir: TempDir,
}

impl Builder {
    pub fn start(ns: Option<&Netns>, root: &Path) -> Builder {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("buildd.sock");
        let strata = crate::workspace_bin("strata");
        let address = format!("unix://{}", socket.display());
        let argv = [
            strata.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "serve",
            "--address",
            &address,
        ];
        let mut cmd = match ns {
            Some(ns) => ns.command(&argv),
            None => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        let child = cmd
            .stderr(Stdio::null())
            .spawn()
            .expect("start strata serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "strata serve did not listen on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Builder {
            child,
            socket,
            _dir: dir,
        }
    }

    pub fn unix_address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// SIGKILL, as a crash would end it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and how it ended.
    pub fn stop(mut self) -> Option<i32> {
        crate::terminate(&mut self.child, Duration::from_secs(30));
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        crate::terminate(&mut self.child, Duration::from_secs(10));
    }
}
