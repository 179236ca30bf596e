//! Serving the gRPC API on a unix socket until SIGTERM or SIGINT.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::info;

use crate::service::Service;
use crate::snapshots::Snapshots;

/// Binds `address`, replacing a stale socket left by a dead daemon but never one that answers.
/// The socket is bound under a temporary name, given mode 0600 (0660 and the group `group` when
/// one is set) and then renamed into place, so its path is never open to other users, whatever
/// the umask.
async fn bind(address: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(address) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(address).await.is_ok() {
                bail!(
                    "{} is in use by a running process: stop the other strata-snapshotter or pass another --address",
                    address.display()
                );
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a socket: remove it or pass another --address",
            address.display()
        ),
        Err(_) => {}
    }
    let staged = address.with_file_name(format!(
        ".{}.{}",
        address.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staged);
    let listener =
        UnixListener::bind(&staged).with_context(|| format!("listen on {}", staged.display()))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    let restricted = std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::os::unix::fs::chown(&staged, None, group))
        .and_then(|()| std::fs::rename(&staged, address));
    if let Err(e) = restricted {
        let _ = std::fs::remove_file(&staged);
        return Err(e).with_context(|| format!("set up socket {}", address.display()));
    }
    Ok(listener)
}

/// The gid of `group` (a name or a number); `None` for "".
pub fn socket_group(group: &str) -> anyhow::Result<Option<u32>> {
    if group.is_empty() {
        return Ok(None);
    }
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(Some(gid));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(Some(g.gid.as_raw())),
        _ => bail!("socket group {group:?} does not exist: create it (groupadd {group}) or leave `group` empty for a root-only socket"),
    }
}

/// Where to serve: a socket to bind at `address`, or one the service manager passed
/// ([`crate::activation`]), which it keeps across restarts.
pub enum Listen<'a> {
    Bind {
        address: &'a Path,
        group: Option<u32>,
    },
    Inherited(std::os::unix::net::UnixListener),
}

/// Serves `snapshots` until a termination signal; a socket it bound is removed then.
pub async fn serve(snapshots: Arc<Snapshots>, listen: Listen<'_>) -> anyhow::Result<()> {
    let (listener, address) = match listen {
        Listen::Bind { address, group } => (bind(address, group).await?, Some(address)),
        Listen::Inherited(l) => (
            UnixListener::from_std(l).context("serve the inherited socket")?,
            None,
        ),
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    };
    match address {
        Some(a) => info!(address = %a.display(), "serving containerd snapshots API"),
        None => info!("serving containerd snapshots API on the socket the service manager passed"),
    }
    let result = tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(Service::new(
            snapshots,
        ))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    if let Some(a) = address {
        let _ = std::fs::remove_file(a);
    }
    result.context("gRPC server failed")
}
