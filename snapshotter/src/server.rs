//! Serving the gRPC API on a unix socket until SIGTERM or SIGINT.

use std::os::unix::fs::FileTypeExt;
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
async fn bind(address: &Path) -> anyhow::Result<UnixListener> {
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
            std::fs::remove_file(address)
                .with_context(|| format!("remove stale socket {}", address.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket: remove it or pass another --address",
            address.display()
        ),
        Err(_) => {}
    }
    UnixListener::bind(address).with_context(|| format!("listen on {}", address.display()))
}

/// Serves `snapshots` on `address` until a termination signal, then removes the socket.
pub async fn serve(
    snapshots: Arc<Snapshots>,
    lazy: Option<Arc<crate::lazy::remote::Lazy>>,
    address: &Path,
) -> anyhow::Result<()> {
    let listener = bind(address).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    };
    info!(address = %address.display(), "serving containerd snapshots API");
    let result = tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(Service::new(
            snapshots, lazy,
        ))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(address);
    result.context("gRPC server failed")
}
