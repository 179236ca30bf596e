//! Where the builder service listens: a unix socket (`strata serve`), or an in-memory pipe in
//! this process (a daemonless `strata build`).

use std::path::Path;

use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;

use super::proto::builder_server::BuilderServer;
use super::Service;

/// The largest message either side takes (context stat batches, file requests).
pub const MAX_MESSAGE: usize = 64 << 20;

fn server(service: Service) -> BuilderServer<Service> {
    BuilderServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Serves on the unix socket `path` (mode 0600, or 0660 for `group`) until SIGTERM or SIGINT;
/// then running builds are cancelled, their clients told why, and it returns once they ended.
pub async fn unix(service: Service, path: &Path, group: Option<u32>) -> anyhow::Result<()> {
    let listener = strata_snapshotter::server::bind(path, group).await?;
    tracing::info!(socket = %path.display(), "strata builder serving");
    let s = service.clone();
    let stop = async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!(running = s.running(), "stopping: cancelling running builds");
        s.cancel_all("the builder is shutting down (SIGTERM); run the build again when it is back");
    };
    let served = tonic::transport::Server::builder()
        .add_service(server(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        .await;
    let _ = std::fs::remove_file(path);
    Ok(served?)
}

/// The builder in this process, reached over an in-memory pipe: the client's end.
pub fn in_process(service: Service) -> tokio::io::DuplexStream {
    let (client, ours) = tokio::io::duplex(1 << 20);
    let incoming = tokio_stream::once(Ok::<_, std::io::Error>(ours));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server(service))
            .serve_with_incoming(incoming),
    );
    client
}

/// `strata dial-stdio`: the far end of an ssh connection — copies stdin to the builder's socket
/// and the socket to stdout, passing on each side's end (half-close) so that a client that goes
/// away ends its session on the builder.
pub async fn dial_stdio(path: &Path) -> std::io::Result<()> {
    let sock = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "connect to the builder at unix://{}: {e}; is `strata serve` running there?",
                path.display()
            ),
        )
    })?;
    let (mut from_sock, mut to_sock) = sock.into_split();
    let up = async {
        let r = tokio::io::copy(&mut tokio::io::stdin(), &mut to_sock).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_sock).await;
        r
    };
    let down = async {
        let mut out = tokio::io::stdout();
        let r = tokio::io::copy(&mut from_sock, &mut out).await;
        let _ = tokio::io::AsyncWriteExt::flush(&mut out).await;
        r
    };
    // The builder closing its side ends the session; stdin's end alone only half-closes it.
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut down => r.map(drop),
        r = &mut up => {
            r?;
            down.await.map(drop)
        }
    }
}
