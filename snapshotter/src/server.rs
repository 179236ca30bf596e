//! Serving the gRPC API on a unix socket until SIGTERM or SIGINT, or until a successor takes
//! over (SIGUSR2, [`crate::upgrade`]).

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info, warn};

use crate::service::Service;
use crate::snapshots::Snapshots;
use crate::upgrade::Successor;

/// Binds `address`, replacing a stale socket left by a dead daemon but never one that answers.
/// The socket is bound under a temporary name, given mode 0600 (0660 and the group `group` when
/// one is set) and then renamed into place, so its path is never open to other users, whatever
/// the umask.
pub async fn bind(address: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(address) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(address).await.is_ok() {
                bail!(
                    "{} is in use by a running process: stop the daemon serving it or pass another --address",
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

/// Why serving stopped.
pub enum Stop {
    /// SIGTERM or SIGINT.
    Terminate,
    /// SIGUSR2: a successor is ready to take over.
    Upgrade(Successor),
}

/// Serves `snapshots` on `listener` until `stop` resolves; then stops accepting, finishes the
/// calls in flight, and says why it stopped.
pub async fn serve(
    snapshots: Arc<Snapshots>,
    listener: std::os::unix::net::UnixListener,
    stop: impl Future<Output = Stop>,
) -> anyhow::Result<Stop> {
    let listener = UnixListener::from_std(listener).context("serve the socket")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        let _ = tx.send(stop.await);
    };
    tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(Service::new(
            snapshots,
        ))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("gRPC server failed")?;
    rx.await.context("the server stopped without a reason")
}

/// Resolves on SIGTERM or SIGINT, or on SIGUSR2 once `start_successor` has a successor ready; a
/// successor that fails to start is logged and this process serves on.
pub async fn signals(
    start_successor: impl Fn() -> anyhow::Result<Successor> + Send + Sync + Clone + 'static,
) -> Stop {
    let (Ok(mut term), Ok(mut int), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined2()),
    ) else {
        warn!("signal handlers could not be installed: serving until killed");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); return Stop::Terminate }
            _ = int.recv() => { info!("SIGINT: shutting down"); return Stop::Terminate }
            _ = usr2.recv() => {
                info!("SIGUSR2: starting the successor");
                let start = start_successor.clone();
                match tokio::task::spawn_blocking(start).await {
                    Ok(Ok(s)) => return Stop::Upgrade(s),
                    Ok(Err(e)) => error!(error = format!("{e:#}"), "the successor failed to start; serving on"),
                    Err(e) => error!(error = %e, "the successor failed to start; serving on"),
                }
            }
        }
    }
}
