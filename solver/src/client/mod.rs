//! The client side of a build (what `strata build` runs): it reads the Dockerfile, keeps the
//! context, secrets, ssh agents and output files on this machine, and reaches a builder — in this
//! process, on a unix socket, or over ssh ([`connect`]) — with one stream per build
//! (`proto/builder.proto`). The builder asks; the client answers and shows the progress.

pub mod agents;
pub mod connect;
pub mod dirs;
pub mod outputs;
pub mod session;
pub mod source;
pub mod walk;

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::pattern::Ignore;
use crate::progress::Printer;
use crate::service::proto::{
    builder_client::BuilderClient, builder_message::Msg, client_message, BuilderMessage,
    ClientMessage, ContextStats,
};
use crate::service::{serve::MAX_MESSAGE, PROTOCOL, VERSION};

/// Why a build failed, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A flag or file the user gave.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Spec(#[from] crate::spec::InvalidSpec),
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    /// The builder could not be reached.
    #[error("{0}")]
    Connect(String),
    /// The builder refused the client, or the conversation broke.
    #[error("{0}")]
    Protocol(String),
    /// The connection to the builder broke during the build.
    #[error("the connection to the builder was lost: {0}")]
    Lost(String),
    /// The build failed on the builder.
    #[error("{0}")]
    Build(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// `strata build`'s flags, as the client holds them.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The Dockerfile (default: `<context>/Dockerfile`).
    pub file: Option<PathBuf>,
    pub context: PathBuf,
    pub build_args: Vec<String>,
    pub target: Option<String>,
    pub frontend_paths: Vec<String>,
    pub tags: Vec<String>,
    pub outputs: Vec<String>,
    pub no_cache: bool,
    pub no_cache_filter: Vec<String>,
    pub build_contexts: Vec<String>,
    /// `--secret` and `--ssh` specs.
    pub secrets: Vec<String>,
    pub ssh: Vec<String>,
    pub cache_to: Vec<String>,
    pub cache_from: Vec<String>,
    pub pull: bool,
    pub max_parallelism: Option<usize>,
    pub epoch: Option<u64>,
}

/// A stable identity of this user on this machine: the builder keys its copy of a context by it.
pub fn client_id() -> String {
    let machine = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .unwrap_or_default();
    let uid = nix::unistd::getuid();
    let d = strata_image::content::Digest::of(format!("{}\0{uid}", machine.trim()).as_bytes());
    d.to_string()
}

/// The build's opening messages: Hello and the request.
fn opening(
    req: &Request,
    context: &std::path::Path,
    loaded: &source::Loaded,
    held: &session::Held,
    dirs: &dirs::Dirs,
    prefetch: Vec<crate::service::proto::OutputPrefetch>,
) -> [ClientMessage; 2] {
    use crate::service::proto::{BuildRequest, Hello};
    let hello = Hello {
        protocol: PROTOCOL,
        version: VERSION.into(),
        client_id: client_id(),
    };
    let request = BuildRequest {
        source_text: loaded.text.clone(),
        source_name: loaded.path.display().to_string(),
        ignore: loaded.ignore_text.clone(),
        context_path: context.display().to_string(),
        build_args: source::build_args(&req.build_args),
        target: req.target.clone().unwrap_or_default(),
        frontend_paths: req.frontend_paths.clone(),
        tags: req.tags.clone(),
        outputs: req.outputs.clone(),
        no_cache: req.no_cache,
        no_cache_filter: req.no_cache_filter.clone(),
        build_contexts: dirs.build_contexts.clone(),
        secret_ids: held.secrets.keys().cloned().collect(),
        ssh_ids: held.agents.keys().cloned().collect(),
        cache_to: dirs.cache_to.clone(),
        cache_from: dirs.cache_from.clone(),
        cache_have: dirs.have.clone(),
        prefetch,
        pull: req.pull,
        max_parallelism: req.max_parallelism.unwrap_or(0) as u32,
        source_date_epoch: req.epoch,
    };
    [
        ClientMessage {
            msg: Some(client_message::Msg::Hello(hello)),
        },
        ClientMessage {
            msg: Some(client_message::Msg::Request(request)),
        },
    ]
}

/// Runs `req` on the builder behind `conn`, showing its progress with `printer`.
pub async fn build(
    conn: connect::Connection,
    req: &Request,
    printer: Arc<Printer>,
) -> Result<(), ClientError> {
    let held = session::hold(&req.secrets, &req.ssh)?;
    let context = req
        .context
        .canonicalize()
        .map_err(|e| ClientError::Input(format!("build context {}: {e}", req.context.display())))?;
    let loaded = source::load(req.file.as_deref(), &context)?;
    let dirs = dirs::Dirs::new(&req.cache_to, &req.cache_from, &req.build_contexts)?;
    let outputs = outputs::Outputs::new(&req.outputs, &dirs.cache_to_dirs)?;
    let (tx, rx) = mpsc::channel(64);
    let prefetch = outputs::prefetch_lists(&req.outputs)?;
    for m in opening(req, &context, &loaded, &held, &dirs, prefetch) {
        let _ = tx.send(m).await;
    }
    let talk = Talk {
        agents: agents::Agents::new(held.agents, tx.clone()),
        secrets: held.secrets,
        context,
        ignore: loaded.ignore,
        dirs,
        walked: Default::default(),
        outputs: Some(outputs),
        printer,
        tx,
    };
    match (talk.run(&conn, rx).await, &conn.ssh) {
        (Err(ClientError::Lost(m)), Some(ssh)) => {
            Err(ClientError::Lost(format!("{m}; {}", ssh.diagnose().await)))
        }
        (r, _) => r,
    }
}

/// One build's conversation with the builder.
struct Talk {
    agents: agents::Agents,
    secrets: std::collections::HashMap<String, Vec<u8>>,
    context: PathBuf,
    ignore: Ignore,
    /// The other directories the request names.
    dirs: dirs::Dirs,
    /// Where the entries of the last stats sent are on this machine, by index.
    walked: Arc<Mutex<Vec<PathBuf>>>,
    outputs: Option<outputs::Outputs>,
    printer: Arc<Printer>,
    tx: mpsc::Sender<ClientMessage>,
}

impl Talk {
    /// Opens the build's stream with the messages queued on `rx`, then converses.
    async fn run(
        mut self,
        conn: &connect::Connection,
        rx: mpsc::Receiver<ClientMessage>,
    ) -> Result<(), ClientError> {
        let mut api = BuilderClient::new(conn.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        match api.build(ReceiverStream::new(rx)).await {
            Ok(r) => self.converse(r.into_inner()).await,
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                Err(ClientError::Protocol(s.message().to_string()))
            }
            Err(s) => Err(ClientError::Lost(s.message().to_string())),
        }
    }

    /// Answers the builder until it says Finished; Ctrl-C asks it to cancel (a second one quits).
    async fn converse(
        &mut self,
        mut inbound: tonic::Streaming<BuilderMessage>,
    ) -> Result<(), ClientError> {
        let mut interrupted = false;
        loop {
            let m = tokio::select! {
                m = inbound.message() => m,
                _ = tokio::signal::ctrl_c() => {
                    if interrupted {
                        std::process::exit(130);
                    }
                    interrupted = true;
                    self.printer.show(&crate::progress::Event::Note("cancelling the build (Ctrl-C again to quit at once)".into()));
                    let cancel = client_message::Msg::Cancel(Default::default());
                    let _ = self.tx.send(ClientMessage { msg: Some(cancel) }).await;
                    continue;
                }
            };
            let msg = match m {
                Ok(Some(BuilderMessage { msg: Some(m) })) => m,
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(ClientError::Lost(
                        "the builder ended the build without a result".into(),
                    ))
                }
                Err(s) => return Err(ClientError::Lost(s.message().to_string())),
            };
            if let Some(done) = self.answer(msg).await? {
                return done;
            }
        }
    }

    /// Handles one message; Some(result) when the build is over.
    async fn answer(&mut self, m: Msg) -> Result<Option<Result<(), ClientError>>, ClientError> {
        match m {
            Msg::Hello(h) if h.protocol != PROTOCOL => {
                return Err(ClientError::Protocol(format!("the builder (strata {}) speaks builder protocol {}; this client (strata {VERSION}) speaks {PROTOCOL}: use the same strata release on both sides", h.version, h.protocol)));
            }
            Msg::Hello(_) => {}
            Msg::Event(e) => {
                if let Some(e) = crate::service::event_of(e) {
                    self.printer.show(&e);
                }
            }
            Msg::Context(c) => {
                let other = match (c.cache_from, c.build_context) {
                    (Some(i), _) => Some(self.dirs.cache_from_dirs.get(&i)),
                    (_, Some(i)) => Some(self.dirs.build_context_dirs.get(&i)),
                    _ => None,
                };
                let (root, ignore) = match other {
                    None => (self.context.clone(), self.ignore.clone()),
                    // Not one the user named: the walk of an empty path fails, and says so.
                    Some(dir) => (dir.cloned().unwrap_or_default(), Ignore::default()),
                };
                self.send_stats(root, ignore, (!c.all).then_some(c.include_patterns))
            }
            Msg::Files(f) => self.send_files(f.ids),
            Msg::Secret(s) => {
                let value = self.secrets.get(&s.id).cloned();
                let v = crate::service::proto::SecretValue {
                    id: s.id,
                    missing: value.is_none(),
                    value: value.unwrap_or_default(),
                };
                let _ = self
                    .tx
                    .send(ClientMessage {
                        msg: Some(client_message::Msg::Secret(v)),
                    })
                    .await;
            }
            Msg::Ssh(c) => self.agents.chunk(c),
            Msg::Output(c) => self.outputs.as_mut().expect("until finished").chunk(c)?,
            Msg::Finished(f) => {
                let ok = f.error.is_empty();
                let written = self.outputs.take().expect("finished once").finish(ok);
                let built = if ok {
                    Ok(())
                } else {
                    Err(ClientError::Build(f.error))
                };
                return Ok(Some(built.and(written)));
            }
        }
        Ok(None)
    }

    /// Walks `root` (the context, or a local cache's directory) on a blocking thread and sends
    /// its stats in batches.
    fn send_stats(&self, root: PathBuf, ignore: Ignore, include: Option<Vec<String>>) {
        let (tx, walked) = (self.tx.clone(), self.walked.clone());
        tokio::task::spawn_blocking(move || {
            let started = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
            let (w, error) = match walk::walk(&root, &ignore, include.as_deref()) {
                Ok(w) => (w, String::new()),
                Err(e) => (
                    walk::Walked::default(),
                    format!("walk {}: {e}", root.display()),
                ),
            };
            *walked.lock() = w.paths;
            let send = |entries: Vec<_>, done| {
                let s = ContextStats {
                    entries,
                    done,
                    walk_started_ns: started,
                    error: error.clone(),
                };
                tx.blocking_send(ClientMessage {
                    msg: Some(client_message::Msg::Stats(s)),
                })
                .is_ok()
            };
            let mut batches = w.stats.chunks(1000).peekable();
            if batches.peek().is_none() {
                send(Vec::new(), true);
            }
            while let Some(b) = batches.next() {
                if !send(b.to_vec(), batches.peek().is_none()) {
                    return;
                }
            }
        });
    }

    /// Sends the files the builder asked for (on a blocking thread), chunk by chunk.
    fn send_files(&self, ids: Vec<u32>) {
        let (tx, walked) = (self.tx.clone(), self.walked.clone());
        tokio::task::spawn_blocking(move || {
            let paths = walked.lock().clone();
            for id in ids {
                let path = paths.get(id as usize).cloned().unwrap_or_default();
                walk::chunks(id, &path, |c| {
                    tx.blocking_send(ClientMessage {
                        msg: Some(client_message::Msg::File(c)),
                    })
                    .is_ok()
                });
            }
        });
    }
}
