//! The builder's side of one client's session: what the build asks of the client (context files,
//! secrets, ssh agent connections) and what it sends back (outputs), over the build's stream.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::{Status, Streaming};

use super::context::{Copy, SyncError};
use super::proto::{self, builder_message::Msg, client_message, BuilderMessage, ClientMessage};
use super::{msg, Cancel, Service};
use crate::build::{BuildError, Client, Dir};
use crate::keylock::{KeyGuard, KeyLocks};
use crate::pattern::Ignore;
use crate::progress::{human_size, Progress};
use crate::secrets::MAX_SECRET_BYTES;
use crate::worker::mounts::Dialer;
use crate::worker::Context;

/// Most context entries one build takes: a bound on the builder's memory for a hostile client.
const MAX_ENTRIES: usize = 5_000_000;

pub struct Peer {
    client_id: String,
    context_path: String,
    contexts: PathBuf,
    context_locks: Arc<KeyLocks>,
    /// The copies (context, local caches) this build reads, held until the build ends.
    held: tokio::sync::Mutex<Vec<KeyGuard>>,
    /// Messages to the client, in order (the service forwards them).
    ctl: mpsc::UnboundedSender<BuilderMessage>,
    /// The stream itself, for output bytes (bounded: a slow client slows the export).
    out: mpsc::Sender<Result<BuilderMessage, Status>>,
    /// Senders are taken when the client leaves, so that whoever waits learns it.
    stats: StatsIn,
    files: FilesIn,
    /// Steps waiting for a secret's value; None once the client is gone.
    secrets: Arc<Mutex<Option<SecretWaits>>>,
    conns: Conns,
    next_conn: Arc<AtomicU32>,
}

/// The client's context stats: taken by the dispatcher, waited for by the build.
type StatsIn = (
    Mutex<Option<mpsc::UnboundedSender<proto::ContextStats>>>,
    tokio::sync::Mutex<mpsc::UnboundedReceiver<proto::ContextStats>>,
);

/// The client's context files, the same way (bounded: a slow disk slows the client).
type FilesIn = (
    Mutex<Option<mpsc::Sender<proto::FileChunk>>>,
    Arc<tokio::sync::Mutex<mpsc::Receiver<proto::FileChunk>>>,
);

type SecretWaits = HashMap<String, oneshot::Sender<proto::SecretValue>>;

/// Open ssh agent connections: where the client's bytes for each go.
type Conns = Arc<Mutex<HashMap<u32, std::sync::mpsc::Sender<proto::SshChunk>>>>;

impl Peer {
    pub fn new(
        service: &Service,
        hello: &proto::Hello,
        request: &proto::BuildRequest,
        ctl: mpsc::UnboundedSender<BuilderMessage>,
        out: mpsc::Sender<Result<BuilderMessage, Status>>,
    ) -> Peer {
        let stats = mpsc::unbounded_channel();
        let files = mpsc::channel(16);
        Peer {
            client_id: hello.client_id.clone(),
            context_path: request.context_path.clone(),
            contexts: service.contexts.clone(),
            context_locks: service.context_locks.clone(),
            held: Default::default(),
            ctl,
            out,
            stats: (Mutex::new(Some(stats.0)), tokio::sync::Mutex::new(stats.1)),
            files: (
                Mutex::new(Some(files.0)),
                Arc::new(tokio::sync::Mutex::new(files.1)),
            ),
            secrets: Arc::new(Mutex::new(Some(HashMap::new()))),
            conns: Default::default(),
            next_conn: Arc::new(AtomicU32::new(1)),
        }
    }

    fn send(&self, m: Msg) -> Result<(), BuildError> {
        self.ctl.send(msg(m)).map_err(|_| gone())
    }

    /// Routes what the client sends to whoever waits for it; the client leaving cancels the build.
    pub async fn dispatch(
        self: Arc<Self>,
        mut inbound: Streaming<ClientMessage>,
        cancel: Arc<Cancel>,
    ) {
        loop {
            let m = match inbound.message().await {
                Ok(Some(ClientMessage { msg: Some(m) })) => m,
                Ok(Some(_)) => continue,
                Ok(None) => {
                    cancel.cancel("the client closed its session");
                    break;
                }
                Err(e) => {
                    cancel.cancel(&format!(
                        "the connection to the client was lost ({})",
                        e.message()
                    ));
                    break;
                }
            };
            use client_message::Msg as C;
            match m {
                C::Stats(s) => {
                    if let Some(tx) = self.stats.0.lock().as_ref() {
                        let _ = tx.send(s);
                    }
                }
                C::File(f) => {
                    let tx = self.files.0.lock().clone();
                    let sent = match tx {
                        Some(tx) => tx.send(f).await.is_ok(),
                        None => false,
                    };
                    if !sent {
                        cancel.cancel("the client sent context files no one asked for");
                    }
                }
                C::Secret(v) => {
                    if let Some(w) = self.secrets.lock().as_mut().and_then(|m| m.remove(&v.id)) {
                        let _ = w.send(v);
                    }
                }
                C::Ssh(c) => self.ssh_in(c),
                C::Cancel(_) => cancel.cancel("the client cancelled the build"),
                C::Hello(_) | C::Request(_) => {
                    cancel.cancel("the client broke the protocol (a second request)")
                }
            }
        }
        // Waiters learn the client is gone: their senders drop.
        self.stats.0.lock().take();
        self.files.0.lock().take();
        self.secrets.lock().take();
        self.conns.lock().clear();
    }

    fn ssh_in(&self, c: proto::SshChunk) {
        let mut conns = self.conns.lock();
        if c.close {
            conns.remove(&c.conn);
        } else if let Some(w) = conns.get(&c.conn) {
            let _ = w.send(c);
        }
    }

    /// The client's walk of its context, as it sends it in batches.
    async fn stats(&self) -> Result<(Vec<proto::Stat>, i64), BuildError> {
        let mut rx = self.stats.1.lock().await;
        let mut all = Vec::new();
        loop {
            let batch = rx.recv().await.ok_or_else(gone)?;
            if !batch.error.is_empty() {
                return Err(BuildError::Session(format!(
                    "the client's build context: {}",
                    batch.error
                )));
            }
            all.extend(batch.entries);
            if all.len() > MAX_ENTRIES {
                return Err(BuildError::Session(format!("the build context has more than {MAX_ENTRIES} entries; list what the build does not need in .dockerignore")));
            }
            if batch.done {
                return Ok((all, batch.walk_started_ns));
            }
        }
    }
}

impl Peer {
    /// Brings the builder's copy of the client's directory at `path` up to date (`request` says
    /// which and how much); the copy stays held until the build ends. Returns the copy and its
    /// files' content digests.
    async fn sync(
        &self,
        request: proto::ContextRequest,
        path: &str,
        v: crate::progress::Vertex<'_>,
    ) -> Result<(PathBuf, BTreeMap<String, String>), BuildError> {
        self.send(Msg::Context(request))?;
        let (stats, started) = self.stats().await?;
        let copy = Copy::new(&self.contexts, &self.client_id, path);
        let tree = copy.tree();
        let key = tree.display().to_string();
        let guard = self.context_locks.lock(&key).await;
        self.held.lock().await.push(guard);
        let mut rx = self.files.1.clone().lock_owned().await;
        let ctl = self.ctl.clone();
        let synced = tokio::task::spawn_blocking(move || {
            let mut fetch = |ids: Vec<u32>| {
                ctl.send(msg(Msg::Files(proto::FileRequest { ids, done: true })))
                    .map_err(|_| SyncError::Client("it went away".into()))
            };
            let mut chunks = std::iter::from_fn(|| rx.blocking_recv());
            copy.sync(stats, started, &mut fetch, &mut chunks)
        })
        .await?;
        match synced {
            Ok(s) => {
                v.log(&format!(
                    "transferring context: {} entries, {} files changed, {} sent, {} removed",
                    s.entries,
                    s.files_sent,
                    human_size(s.bytes_sent),
                    s.removed
                ));
                v.done();
                Ok((tree, s.digests))
            }
            Err(e) => {
                v.error(&e.to_string());
                Err(BuildError::Session(e.to_string()))
            }
        }
    }
}

fn gone() -> BuildError {
    BuildError::Session("the client went away".into())
}

#[tonic::async_trait]
impl Client for Peer {
    async fn context(
        &self,
        patterns: Option<Vec<String>>,
        ignore: &Ignore,
        progress: &Progress,
    ) -> Result<Context, BuildError> {
        let request = proto::ContextRequest {
            all: patterns.is_none(),
            include_patterns: patterns.unwrap_or_default(),
            ..Default::default()
        };
        let v = progress.vertex("[internal] load build context");
        let (dir, digests) = self.sync(request, &self.context_path, v).await?;
        Ok(Context {
            dir,
            ignore: ignore.clone(),
            digests: Arc::new(digests),
        })
    }

    async fn directory(
        &self,
        dir: Dir,
        path: &str,
        progress: &Progress,
    ) -> Result<PathBuf, BuildError> {
        let mut request = proto::ContextRequest {
            all: true,
            ..Default::default()
        };
        let label = match dir {
            Dir::CacheFrom(i) => {
                request.cache_from = Some(i as u32);
                format!("[internal] load build cache from {path}")
            }
            Dir::BuildContext(i) => {
                request.build_context = Some(i as u32);
                format!("[internal] load build context {path}")
            }
        };
        let v = progress.vertex(&label);
        Ok(self.sync(request, path, v).await?.0)
    }

    fn secrets(&self) -> crate::secrets::Ask {
        let (waiting, ctl) = (self.secrets.clone(), self.ctl.clone());
        Arc::new(move |id: &str| {
            let (tx, rx) = oneshot::channel();
            match waiting.lock().as_mut() {
                Some(m) => m.insert(id.to_string(), tx),
                None => return Err("the client went away".into()),
            };
            let ask = msg(Msg::Secret(proto::SecretRequest { id: id.into() }));
            ctl.send(ask)
                .map_err(|_| "the client went away".to_string())?;
            let v = rx
                .blocking_recv()
                .map_err(|_| "the client went away".to_string())?;
            if v.value.len() as u64 > MAX_SECRET_BYTES {
                let e = crate::secrets::SecretError::TooLarge {
                    id: id.into(),
                    what: "the value the client sent".into(),
                };
                return Err(e.to_string());
            }
            Ok((!v.missing).then_some(v.value))
        })
    }

    fn ssh(&self, id: &str) -> Dialer {
        let dial = Dial {
            ctl: self.ctl.clone(),
            conns: self.conns.clone(),
            next: self.next_conn.clone(),
            id: id.to_string(),
        };
        Arc::new(move || dial.open())
    }

    fn output(&self, index: usize) -> Box<dyn Write + Send> {
        Box::new(OutputWriter {
            out: self.out.clone(),
            index: index as u32,
        })
    }
}

/// Opens connections to one of the client's ssh agents.
struct Dial {
    ctl: mpsc::UnboundedSender<BuilderMessage>,
    conns: Conns,
    next: Arc<AtomicU32>,
    id: String,
}

impl Dial {
    /// One end of a socket pair whose other end is relayed to the client's agent.
    fn open(&self) -> std::io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        let conn = self.next.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel::<proto::SshChunk>();
        self.conns.lock().insert(conn, tx);
        let chunk = |data: Vec<u8>, close| {
            msg(Msg::Ssh(proto::SshChunk {
                conn,
                id: self.id.clone(),
                data,
                close,
            }))
        };
        self.ctl.send(chunk(Vec::new(), false)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })?;
        let mut w = ours.try_clone()?;
        std::thread::spawn(move || {
            for c in rx {
                if w.write_all(&c.data).is_err() {
                    break;
                }
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let (ctl, conns, mut r) = (self.ctl.clone(), self.conns.clone(), ours);
        let id = self.id.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0; 16 << 10];
            let send = |data: Vec<u8>, close| {
                let c = proto::SshChunk {
                    conn,
                    id: id.clone(),
                    data,
                    close,
                };
                ctl.send(msg(Msg::Ssh(c))).is_ok()
            };
            while let Ok(n @ 1..) = r.read(&mut buf) {
                if !send(buf[..n].to_vec(), false) {
                    break;
                }
            }
            send(Vec::new(), true);
            conns.lock().remove(&conn);
        });
        Ok(theirs)
    }
}

/// Output bytes to the client, in the stream's order; dropping it ends the output.
struct OutputWriter {
    out: mpsc::Sender<Result<BuilderMessage, Status>>,
    index: u32,
}

impl OutputWriter {
    fn chunk(&self, data: Vec<u8>, eof: bool) -> BuilderMessage {
        msg(Msg::Output(proto::OutputChunk {
            index: self.index,
            data,
            eof,
        }))
    }
}

impl Write for OutputWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out
            .blocking_send(Ok(self.chunk(buf.to_vec(), false)))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for OutputWriter {
    fn drop(&mut self) {
        // On a thread of its own: a blocking send may not run on the async runtime's threads.
        let eof = Ok(self.chunk(Vec::new(), true));
        let out = &self.out;
        std::thread::scope(|s| {
            s.spawn(|| drop(out.blocking_send(eof)));
        });
    }
}
