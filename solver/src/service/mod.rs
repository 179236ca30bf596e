//! The builder service: builds for clients over one gRPC stream per build
//! (`proto/builder.proto`, docs/builder-protocol.md). `strata serve` runs it on a unix socket;
//! a daemonless `strata build` runs it in-process, over an in-memory pipe, so that both take the
//! same path: the client keeps its context, secrets, agents and output files, and the builder
//! asks for them ([`peer`]).

pub mod context;
mod peer;
pub mod serve;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::build;
use crate::keylock::KeyLocks;
use crate::progress::{Event, Progress};
use crate::worker::Worker;
use peer::Peer;
use proto::{builder_message::Msg, client_message, BuilderMessage, ClientMessage};

#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("strata.builder.v1");
}

/// The protocol version both sides announce; a builder refuses a client that speaks another.
pub const PROTOCOL: u32 = 1;

/// This program's version, as it introduces itself.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a build stops early, and the flag its steps watch.
#[derive(Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    reason: Mutex<Option<String>>,
}

impl Cancel {
    /// Stops the build; the first reason given is the one the client hears.
    pub fn cancel(&self, reason: &str) {
        self.reason.lock().get_or_insert_with(|| reason.to_string());
        self.flag.store(true, Ordering::SeqCst);
    }

    fn reason(&self) -> Option<String> {
        self.reason.lock().clone()
    }
}

/// The builder: one store, shared by every build it runs.
#[derive(Clone)]
pub struct Service {
    worker: Arc<Worker>,
    /// Where clients' contexts are kept (`<root>/contexts`).
    contexts: PathBuf,
    context_locks: Arc<KeyLocks>,
    running: Arc<Mutex<HashMap<u64, Arc<Cancel>>>>,
    next: Arc<AtomicU64>,
}

impl Service {
    pub fn new(worker: Arc<Worker>, root: &std::path::Path) -> Service {
        Service {
            worker,
            contexts: root.join("contexts"),
            context_locks: Default::default(),
            running: Default::default(),
            next: Default::default(),
        }
    }

    /// Cancels every running build with `reason` (the builder is stopping).
    pub fn cancel_all(&self, reason: &str) {
        for c in self.running.lock().values() {
            c.cancel(reason);
        }
    }

    /// How many builds are running.
    pub fn running(&self) -> usize {
        self.running.lock().len()
    }

    /// Runs one build to its end, then says Finished.
    async fn run(
        self,
        hello: proto::Hello,
        request: proto::BuildRequest,
        inbound: Streaming<ClientMessage>,
        out: mpsc::Sender<Result<BuilderMessage, Status>>,
    ) {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let cancel = Arc::new(Cancel::default());
        self.running.lock().insert(id, cancel.clone());
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        tokio::spawn(forward(ctl_rx, out.clone()));
        let peer = Arc::new(Peer::new(&self, &hello, &request, ctl.clone(), out));
        tokio::spawn(peer.clone().dispatch(inbound, cancel.clone()));
        let events = ctl.clone();
        let progress = Arc::new(Progress::sending(move |e| {
            let _ = events.send(msg(Msg::Event(event(e))));
        }));
        let req = request_of(request);
        tracing::info!(build = id, client = %hello.client_id, "build started");
        let r = build::build(
            self.worker.clone(),
            &req,
            peer,
            progress,
            cancel.flag.clone(),
        )
        .await;
        let error = match (r, cancel.reason()) {
            (Ok(()), _) => String::new(),
            (Err(_), Some(reason)) => format!("cancelled: {reason}"),
            (Err(e), None) => e.to_string(),
        };
        tracing::info!(build = id, error = %error, "build finished");
        self.running.lock().remove(&id);
        let _ = ctl.send(msg(Msg::Finished(proto::Finished { error })));
    }
}

/// Sends the builder's messages in the order they were made, up to and including Finished.
async fn forward(
    mut ctl: mpsc::UnboundedReceiver<BuilderMessage>,
    out: mpsc::Sender<Result<BuilderMessage, Status>>,
) {
    while let Some(m) = ctl.recv().await {
        let last = matches!(m.msg, Some(Msg::Finished(_)));
        if out.send(Ok(m)).await.is_err() || last {
            break;
        }
    }
}

fn msg(m: Msg) -> BuilderMessage {
    BuilderMessage { msg: Some(m) }
}

fn event(e: Event) -> proto::Event {
    use proto::event::Kind;
    let (vertex, kind, elapsed) = match e {
        Event::Started { vertex, name } => (vertex, Kind::Started(name), 0.0),
        Event::Log {
            vertex,
            elapsed,
            line,
        } => (vertex, Kind::Log(line), elapsed),
        Event::Ended {
            vertex,
            elapsed,
            status,
        } => (vertex, Kind::Ended(status), elapsed),
        Event::Note(s) => (0, Kind::Note(s), 0.0),
    };
    proto::Event {
        vertex: vertex as u32,
        kind: Some(kind),
        elapsed,
    }
}

/// A progress event as the client's printer takes it.
pub fn event_of(e: proto::Event) -> Option<Event> {
    use proto::event::Kind;
    let vertex = e.vertex as usize;
    Some(match e.kind? {
        Kind::Started(name) => Event::Started { vertex, name },
        Kind::Log(line) => Event::Log {
            vertex,
            elapsed: e.elapsed,
            line,
        },
        Kind::Ended(status) => Event::Ended {
            vertex,
            elapsed: e.elapsed,
            status,
        },
        Kind::Note(s) => Event::Note(s),
    })
}

fn request_of(r: proto::BuildRequest) -> build::Request {
    let build_args = r
        .build_args
        .iter()
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    build::Request {
        source: build::source::Source {
            name: r.source_name,
            text: r.source_text,
            ignore: crate::pattern::Ignore::parse(&r.ignore),
            build_args,
            target: Some(r.target).filter(|t| !t.is_empty()),
            frontend_paths: r.frontend_paths,
            pull: r.pull,
        },
        tags: r.tags,
        outputs: r.outputs,
        no_cache: r.no_cache,
        no_cache_filter: r.no_cache_filter,
        build_contexts: r.build_contexts,
        secret_ids: r.secret_ids,
        ssh_ids: r.ssh_ids,
        cache_to: r.cache_to,
        cache_from: r.cache_from,
        cache_have: r
            .cache_have
            .into_iter()
            .map(|h| (h.index as usize, h.digests.into_iter().collect()))
            .collect(),
        prefetch: r
            .prefetch
            .into_iter()
            .map(|p| (p.index as usize, p.paths))
            .collect(),
        max_parallelism: Some(r.max_parallelism as usize).filter(|n| *n > 0),
        epoch: r.source_date_epoch,
    }
}

async fn next(inbound: &mut Streaming<ClientMessage>) -> Result<client_message::Msg, Status> {
    match inbound.message().await? {
        Some(ClientMessage { msg: Some(m) }) => Ok(m),
        _ => Err(Status::invalid_argument(
            "the client closed the build before its request",
        )),
    }
}

/// The first two messages of a build: Hello, then the request.
async fn opening(
    inbound: &mut Streaming<ClientMessage>,
) -> Result<(proto::Hello, proto::BuildRequest), Status> {
    let client_message::Msg::Hello(hello) = next(inbound).await? else {
        return Err(Status::invalid_argument("a build begins with Hello"));
    };
    if hello.protocol != PROTOCOL {
        return Err(Status::failed_precondition(format!(
            "this builder (strata {VERSION}) speaks builder protocol {PROTOCOL}; the client (strata {}) speaks {}: use the same strata release on both sides",
            hello.version, hello.protocol
        )));
    }
    let client_message::Msg::Request(request) = next(inbound).await? else {
        return Err(Status::invalid_argument(
            "Hello is followed by the build request",
        ));
    };
    Ok((hello, request))
}

#[tonic::async_trait]
impl proto::builder_server::Builder for Service {
    type BuildStream = ReceiverStream<Result<BuilderMessage, Status>>;

    async fn build(
        &self,
        request: Request<Streaming<ClientMessage>>,
    ) -> Result<Response<Self::BuildStream>, Status> {
        let mut inbound = request.into_inner();
        let (hello, req) = opening(&mut inbound).await?;
        let (out, rx) = mpsc::channel(64);
        let ours = proto::Hello {
            protocol: PROTOCOL,
            version: VERSION.into(),
            client_id: String::new(),
        };
        let _ = out.send(Ok(msg(Msg::Hello(ours)))).await;
        tokio::spawn(self.clone().run(hello, req, inbound, out));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
