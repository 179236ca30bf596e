//! Reaching a builder: in this process (a daemonless build), on a unix socket, or over ssh as
//! docker's CLI does — the system `ssh` runs `strata dial-stdio` on the far side, so the user's
//! ssh config (ProxyJump, ControlMaster, IdentityFile, known hosts) applies as it is.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tonic::transport::{Channel, Endpoint, Uri};

use super::ClientError;

/// The builder socket `strata serve` listens on by default.
pub const DEFAULT_SOCKET: &str = "/run/strata/buildd.sock";

/// Where a builder is (`--builder`, `STRATA_BUILDER`).
#[derive(Debug, Clone, PartialEq)]
pub enum Address {
    Unix(PathBuf),
    Ssh {
        user: Option<String>,
        host: String,
        port: Option<u16>,
        /// The builder's socket on the remote machine (default: dial-stdio's).
        socket: Option<String>,
    },
}

impl Address {
    /// `unix:///path/to/buildd.sock` or `ssh://[user@]host[:port][/path/to/buildd.sock]`.
    pub fn parse(s: &str) -> Result<Address, ClientError> {
        let bad = |why: &str| {
            ClientError::Input(format!("--builder {s:?}: {why}; use unix:///run/strata/buildd.sock or ssh://[user@]host[:port][/path/to/buildd.sock]"))
        };
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("the socket path must be absolute"));
            }
            return Ok(Address::Unix(path.into()));
        }
        let rest = s
            .strip_prefix("ssh://")
            .ok_or_else(|| bad("unknown scheme"))?;
        let (authority, socket) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(rest[i..].to_string())),
            None => (rest, None),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => (
                h,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| bad("the port is not a number"))?,
                ),
            ),
            _ => (hostport, None),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.starts_with('-') {
            return Err(bad("no host"));
        }
        if user
            .as_deref()
            .is_some_and(|u| u.is_empty() || u.starts_with('-'))
        {
            return Err(bad("the user name is not valid"));
        }
        Ok(Address::Ssh {
            user,
            host: host.to_string(),
            port,
            socket: socket.filter(|s| s != "/"),
        })
    }
}

/// A connection to a builder; for ssh, the process that carries it.
pub struct Connection {
    pub channel: Channel,
    pub ssh: Option<Ssh>,
}

/// The `ssh` process behind a connection: its stderr, kept for errors.
#[derive(Clone)]
pub struct Ssh {
    pub command: String,
    stderr: Arc<Mutex<Vec<u8>>>,
    child: Arc<Mutex<Option<Child>>>,
}

impl Ssh {
    /// What ssh said and how it ended, for an error message (waits a little for it to exit).
    pub async fn diagnose(&self) -> String {
        let mut status = None;
        for _ in 0..40 {
            if let Some(c) = self.child.lock().as_mut() {
                status = c.try_wait().ok().flatten();
            }
            if status.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let stderr = String::from_utf8_lossy(&self.stderr.lock())
            .trim()
            .to_string();
        let ended = match status.and_then(|s| s.code()) {
            Some(code) => format!("exited with exit status {code}"),
            None => "stopped".to_string(),
        };
        format!("command [{}] {ended}; make sure the address is right and strata is installed on the remote host (on its PATH for ssh's non-interactive shell): stderr={stderr}", self.command)
    }
}

fn endpoint() -> Endpoint {
    Endpoint::from_static("http://strata.builder")
}

/// The builder serving in this process.
pub async fn in_process(io: tokio::io::DuplexStream) -> Result<Connection, ClientError> {
    let io = Arc::new(Mutex::new(Some(io)));
    let channel = endpoint()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = io.lock().take();
            async move { io.ok_or_else(|| std::io::Error::other("the in-process builder is gone")) }
        }))
        .await
        .map_err(|e| ClientError::Connect(format!("the in-process builder: {e}")))?;
    Ok(Connection { channel, ssh: None })
}

/// The builder at `addr`.
pub async fn connect(addr: &Address) -> Result<Connection, ClientError> {
    match addr {
        Address::Unix(path) => {
            let p = path.clone();
            let channel = endpoint()
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    tokio::net::UnixStream::connect(p.clone())
                }))
                .await
                .map_err(|e| {
                    ClientError::Connect(format!(
                        "cannot reach the builder at unix://{}: {}; start it with `strata serve` (or systemctl start strata-buildd)",
                        path.display(),
                        source_text(&e)
                    ))
                })?;
            Ok(Connection { channel, ssh: None })
        }
        Address::Ssh { .. } => over_ssh(addr).await,
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s = format!("{s}: {c}");
        cur = c.source();
    }
    s
}

/// The `ssh` command line: `STRATA_SSH_COMMAND` (as git's `GIT_SSH_COMMAND`) or `ssh`, then
/// docker's arguments, with the remote command quoted for the remote shell.
pub fn ssh_argv(addr: &Address) -> Vec<String> {
    let Address::Ssh {
        user,
        host,
        port,
        socket,
    } = addr
    else {
        return Vec::new();
    };
    let mut argv: Vec<String> = std::env::var("STRATA_SSH_COMMAND")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.split_whitespace().map(String::from).collect())
        .unwrap_or_else(|| vec!["ssh".into()]);
    if let Some(u) = user {
        argv.extend(["-l".into(), u.clone()]);
    }
    if let Some(p) = port {
        argv.extend(["-p".into(), p.to_string()]);
    }
    argv.extend(["-o", "ConnectTimeout=30", "-T", "--"].map(String::from));
    argv.push(host.clone());
    let mut remote = "strata dial-stdio".to_string();
    if let Some(s) = socket {
        remote.push_str(&format!(" --addr {}", quote(&format!("unix://{s}"))));
    }
    argv.push(remote);
    argv
}

/// `s` single-quoted for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

async fn over_ssh(addr: &Address) -> Result<Connection, ClientError> {
    let argv = ssh_argv(addr);
    let ssh = Ssh {
        command: argv.join(" "),
        stderr: Default::default(),
        child: Default::default(),
    };
    let s = ssh.clone();
    let connected = endpoint()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (argv, s) = (argv.clone(), s.clone());
            async move { spawn_ssh(&argv, &s) }
        }))
        .await;
    match connected {
        Ok(channel) => Ok(Connection {
            channel,
            ssh: Some(ssh),
        }),
        Err(e) => Err(ClientError::Connect(format!(
            "cannot reach the builder over ssh: {}; {}",
            source_text(&e),
            ssh.diagnose().await
        ))),
    }
}

fn spawn_ssh(argv: &[String], s: &Ssh) -> std::io::Result<SshIo> {
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("run {}: {e}", argv[0])))?;
    let (stdin, stdout) = (
        child.stdin.take().expect("piped"),
        child.stdout.take().expect("piped"),
    );
    if let Some(mut err) = child.stderr.take() {
        let keep = s.stderr.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf).await {
                let mut k = keep.lock();
                if k.len() < 64 << 10 {
                    k.extend_from_slice(&buf[..n]);
                }
            }
        });
    }
    *s.child.lock() = Some(child);
    Ok(SshIo { stdin, stdout })
}

/// ssh's stdin and stdout as one connection.
pub struct SshIo {
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl AsyncRead for SshIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for SshIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_docker_reads_them() {
        assert_eq!(
            Address::parse("ssh://root@198.51.100.2:2222/run/b.sock").unwrap(),
            Address::Ssh {
                user: Some("root".into()),
                host: "198.51.100.2".into(),
                port: Some(2222),
                socket: Some("/run/b.sock".into())
            }
        );
        assert_eq!(
            Address::parse("ssh://host").unwrap(),
            Address::Ssh {
                user: None,
                host: "host".into(),
                port: None,
                socket: None
            }
        );
        assert_eq!(
            Address::parse("unix:///run/x.sock").unwrap(),
            Address::Unix("/run/x.sock".into())
        );
        for bad in [
            "tcp://x",
            "ssh://",
            "ssh://-oProxyCommand=x",
            "ssh://h:port",
            "unix://rel",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_remote_command_is_quoted() {
        std::env::remove_var("STRATA_SSH_COMMAND");
        let a = Address::parse("ssh://u@h:22/tmp/it's.sock").unwrap();
        let argv = ssh_argv(&a);
        assert_eq!(
            argv[..8],
            [
                "ssh",
                "-l",
                "u",
                "-p",
                "22",
                "-o",
                "ConnectTimeout=30",
                "-T"
            ]
        );
        assert_eq!(
            argv[8..],
            [
                "--",
                "h",
                r"strata dial-stdio --addr 'unix:///tmp/it'\''s.sock'"
            ]
        );
    }
}
