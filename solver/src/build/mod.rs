//! One build on the builder, from a request to its outputs: compile the source with its
//! frontend ([`source`]), fetch from the client what the graph reads (context files, secrets,
//! ssh agents: [`Client`]), import caches, solve the graph in parallel, export the result (the
//! outputs that belong to the client are streamed to it), export the cache, trim the cache.

pub mod source;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use strata_image::oci::ImageConfig;

use crate::db::DbError;
use crate::dockerfile::DockerfileError;
use crate::export::{self, Output};
use crate::frontend::Frontend;
use crate::llb::{Graph, LlbError};
use crate::pattern::Ignore;
use crate::progress::Progress;
use crate::remote_cache::{self, CacheSpec};
use crate::secrets::SecretError;
use crate::solver::{SolveError, Solver};
use crate::spec::InvalidSpec;
use crate::worker::mounts::{Dialer, Session};
use crate::worker::{Context, Ref, Worker, WorkerError};

/// Steps that run at once unless `--max-parallelism` says otherwise. Not the CPU count: a step
/// that waits (a download, a sleep, a remote service) should not wait for a core as well, and
/// CPU-bound steps share the cores through the kernel's scheduler, as in BuildKit, which has no
/// cap at all. The bound keeps a graph of thousands of stages from starting thousands of
/// containers at once.
pub const DEFAULT_PARALLELISM: usize = 64;

/// Why a build stopped. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A flag or input the user gave (`--output`, `--ssh`, the Dockerfile's path, ...).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Spec(#[from] InvalidSpec),
    #[error(transparent)]
    Dockerfile(#[from] DockerfileError),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Llb(#[from] LlbError),
    #[error("failed to solve: {0}")]
    Solve(#[from] Arc<SolveError>),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Export(String),
    /// The client went away or broke the protocol.
    #[error("{0}")]
    Session(String),
    #[error("a build task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What to build and where the result goes: `strata build`'s flags, in BuildKit's terms, as the
/// builder gets them (the client keeps the context, secret values and agents).
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub source: source::Source,
    /// Names in the builder's image store (`-t`).
    pub tags: Vec<String>,
    /// `--output` specs.
    pub outputs: Vec<String>,
    pub no_cache: bool,
    pub no_cache_filter: Vec<String>,
    /// `--build-context NAME=SOURCE`.
    pub build_contexts: Vec<String>,
    /// The ids of the `--secret`s and `--ssh` agents the client holds.
    pub secret_ids: Vec<String>,
    pub ssh_ids: Vec<String>,
    /// `--cache-to` / `--cache-from` specs (a local cache's directory absolute, on the client).
    pub cache_to: Vec<String>,
    pub cache_from: Vec<String>,
    /// For each `--cache-to type=local`, by its index: the blobs its directory holds already.
    pub cache_have: HashMap<usize, HashSet<String>>,
    /// For each `--output` with `prefetch=FILE`, by its index: the paths FILE lists (the client
    /// read it).
    pub prefetch: HashMap<usize, Vec<String>>,
    /// Steps run at once (default: [`DEFAULT_PARALLELISM`]).
    pub max_parallelism: Option<usize>,
    /// `SOURCE_DATE_EPOCH`: timestamps for reproducible digests.
    pub epoch: Option<u64>,
}

/// A directory of the client's that the request names, besides the context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dir {
    /// `--cache-from` number N: a `type=local` cache.
    CacheFrom(usize),
    /// `--build-context` number N: `NAME=oci-layout://DIR`.
    BuildContext(usize),
}

/// The client's side of a build, as the builder reaches it.
#[tonic::async_trait]
pub trait Client: Send + Sync {
    /// The builder's copy of the client's context, up to date for what `patterns` select (None:
    /// all of it), `ignore` applied.
    async fn context(
        &self,
        patterns: Option<Vec<String>>,
        ignore: &Ignore,
        progress: &Progress,
    ) -> Result<Context, BuildError>;
    /// How a running step asks the client for a secret's value (blocking).
    fn secrets(&self) -> crate::secrets::Ask;
    /// Connections to the client's ssh agent `id`.
    fn ssh(&self, id: &str) -> Dialer;
    /// Where output `index` (a `type=local|oci|docker` output) goes: to the client. The caches
    /// of `--cache-to type=local` follow the `--output`s: cache `i` is output `outputs.len() + i`.
    fn output(&self, index: usize) -> Box<dyn Write + Send>;
    /// The builder's copy of the client's directory `dir` (at `path` there), up to date.
    async fn directory(
        &self,
        dir: Dir,
        path: &str,
        progress: &Progress,
    ) -> Result<PathBuf, BuildError>;
}

/// Runs `req` on `worker`, reporting to `progress`; `cancel` stops it.
pub async fn build(
    worker: Arc<Worker>,
    req: &Request,
    client: Arc<dyn Client>,
    progress: Arc<Progress>,
    cancel: Arc<AtomicBool>,
) -> Result<(), BuildError> {
    let outputs = outputs(req)?;
    show_source(&req.source, &progress);
    let mut opts = req.source.convert_options();
    opts.no_cache = req.no_cache;
    opts.no_cache_filter = req.no_cache_filter.clone();
    opts.contexts =
        source::named_contexts(&worker, client.as_ref(), &req.build_contexts, &progress).await?;
    let cache_to = cache_specs(&req.cache_to, "--cache-to")?;
    let cache_from = cache_specs(&req.cache_from, "--cache-from")?;
    let fe = req.source.frontend()?;
    let ignore = &req.source.ignore;
    // An external frontend may read any of the context; the Dockerfile's steps say what they read.
    let early = match fe {
        Frontend::Dockerfile => None,
        _ => Some(client.context(None, ignore, &progress).await?),
    };
    let (definition, config) = source::compile(
        &worker,
        &req.source,
        fe,
        early.as_ref().map(|c| c.dir.as_path()),
        opts,
        &progress,
        &cancel,
    )
    .await?;
    let graph = Graph::from_definition(&definition)?;
    let context = match early {
        Some(c) => Some(c),
        None => context_for(&graph, client.as_ref(), ignore, &progress).await?,
    };
    let session = session(&graph, req, client.as_ref(), cancel)?;
    let volume_ids = graph.cache_ids();
    for (i, spec) in cache_from.into_iter().enumerate() {
        let dir = match &spec {
            // A directory that is not there yet (a first CI run) makes a cold build.
            CacheSpec::Local { dir, .. } => {
                match client.directory(Dir::CacheFrom(i), dir, &progress).await {
                    Ok(copy) => Some(copy),
                    Err(e) => {
                        progress.note(&format!("--cache-from {dir}: not imported: {e}"));
                        continue;
                    }
                }
            }
            _ => None,
        };
        import_cache(&worker, spec, dir, &progress).await?;
    }
    let parallel = req.max_parallelism.unwrap_or(DEFAULT_PARALLELISM);
    let solver = Solver::new(
        worker.clone(),
        graph,
        context,
        session,
        progress.clone(),
        parallel,
    );
    let done = solver.solve().await?;
    let result = done.map(|d| d.result.clone()).unwrap_or(Ref::Scratch);
    let built = Arc::new(remote_cache::Built {
        keys: solver.keys(),
        final_chain: final_chain(&worker, &result)?,
        volume_ids,
        epoch: req.epoch,
    });
    let mut config = config;
    // A base image's inline cache names its layers only: never carried into this image.
    config.inline_cache = None;
    if cache_to.contains(&CacheSpec::Inline) {
        config.inline_cache = Some(inline_cache(&worker, &built, &progress).await?);
    }
    let targets = outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let to = o.streamed().then(|| client.output(i));
            let prefetch = req.prefetch.get(&i).cloned().unwrap_or_default();
            (o, to, prefetch)
        })
        .collect();
    export_image(&worker, &result, config, targets, req.epoch, &progress).await?;
    for (i, spec) in cache_to.into_iter().enumerate() {
        let to =
            matches!(spec, CacheSpec::Local { .. }).then(|| client.output(req.outputs.len() + i));
        let have = req.cache_have.get(&i).cloned().unwrap_or_default();
        export_cache(&worker, spec, &built, to, have, &progress).await?;
    }
    trim_cache(&worker, &progress).await?;
    let s = solver.stats();
    progress.note(&format!(
        "built in {:.1}s: {} steps, {} cached, {} run",
        progress.started.elapsed().as_secs_f64(),
        s.vertices,
        s.cached,
        s.executed
    ));
    Ok(())
}

/// The source as BuildKit shows it arriving.
fn show_source(source: &source::Source, progress: &Progress) {
    let file = std::path::Path::new(&source.name)
        .file_name()
        .map_or_else(|| "Dockerfile".into(), |n| n.to_string_lossy());
    let v = progress.vertex(&format!("[internal] load build definition from {file}"));
    v.log(&format!(
        "transferring dockerfile: {}B done",
        source.text.len()
    ));
    v.done();
    progress.vertex("[internal] load .dockerignore").done();
}

/// The context, synced for what the graph's sources select; None when nothing reads it.
async fn context_for(
    graph: &Graph,
    client: &dyn Client,
    ignore: &Ignore,
    progress: &Progress,
) -> Result<Option<Context>, BuildError> {
    let reads = graph.ops.values().any(|o| {
        matches!(&o.kind, Some(crate::llb::op::Kind::Source(s)) if s.identifier.starts_with("local://"))
    });
    if !reads {
        return Ok(None);
    }
    let patterns = graph.context_patterns().map(|p| p.into_iter().collect());
    Ok(Some(client.context(patterns, ignore, progress).await?))
}

/// The secrets and agents the graph's steps use, of those the client holds; a secret's value
/// crosses only when a running step mounts it.
fn session(
    graph: &Graph,
    req: &Request,
    client: &dyn Client,
    cancel: Arc<AtomicBool>,
) -> Result<Session, BuildError> {
    let ids = graph
        .secret_ids()
        .into_iter()
        .filter(|id| req.secret_ids.contains(id))
        .collect();
    let secrets = crate::secrets::Secrets::new(ids, client.secrets());
    let ssh = graph
        .ssh_ids()
        .into_iter()
        .filter(|id| req.ssh_ids.contains(id))
        .map(|id| {
            let d = client.ssh(&id);
            (id, d)
        })
        .collect();
    Ok(Session {
        secrets,
        ssh,
        cancel,
    })
}

/// The `--output`s and `-t` names; an archive without `name=` is named like the first `-t`.
fn outputs(req: &Request) -> Result<Vec<Output>, BuildError> {
    let mut outputs: Vec<Output> = req
        .outputs
        .iter()
        .map(|o| Output::parse(o).map_err(BuildError::from))
        .collect::<Result<_, _>>()?;
    for t in &req.tags {
        crate::worker::images::checked_name(t).map_err(|e| BuildError::Input(format!("-t {e}")))?;
    }
    for o in &mut outputs {
        if let Output::Oci {
            name: name @ None, ..
        }
        | Output::Docker {
            name: name @ None, ..
        } = o
        {
            *name = req.tags.first().cloned();
        }
    }
    let images = req.tags.iter().map(|t| Output::Image {
        name: t.clone(),
        push: false,
        form: crate::form::LayerForm::OCI,
    });
    outputs.extend(images);
    Ok(outputs)
}

fn cache_specs(specs: &[String], flag: &str) -> Result<Vec<CacheSpec>, BuildError> {
    let parse = |s: &String| CacheSpec::parse(s, flag).map_err(BuildError::from);
    specs.iter().map(parse).collect()
}

/// `--cache-from`: a missing or unreachable cache makes a cold build, as in BuildKit. `dir`: the
/// builder's copy of a local cache.
async fn import_cache(
    worker: &Arc<Worker>,
    spec: CacheSpec,
    dir: Option<PathBuf>,
    progress: &Arc<Progress>,
) -> Result<(), BuildError> {
    let (w, p) = (worker.clone(), progress.clone());
    tokio::task::spawn_blocking(move || {
        let v = p.vertex(&format!(
            "importing cache manifest from {}",
            spec.describe()
        ));
        match remote_cache::import(&w, &spec, dir.as_deref()) {
            Ok(s) => v.log(&format!(
                "{} records ({} layers), {} cache volumes imported; {} already here",
                s.records, s.layers, s.volumes, s.kept
            )),
            Err(e) => v.log(&format!("not imported: {e}")),
        }
        v.done();
    })
    .await?;
    Ok(())
}

/// An output, where its bytes go when they go to the client, and its prefetch list.
type Target = (Output, Option<Box<dyn Write + Send>>, Vec<String>);

/// The image of `result` with `config`, written to every output of `targets`.
async fn export_image(
    worker: &Arc<Worker>,
    result: &Ref,
    config: ImageConfig,
    targets: Vec<Target>,
    epoch: Option<u64>,
    progress: &Arc<Progress>,
) -> Result<(), BuildError> {
    let v = progress.vertex("exporting to image");
    let (w, r) = (worker.clone(), result.clone());
    let lines = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let manifest = export::image(&w, &r, config, epoch)?;
        let mut lines = vec![format!("writing image {}", manifest.digest)];
        for (o, to, prefetch) in targets {
            lines.push(export::write(&w, &o, &r, &manifest, epoch, to, &prefetch)?);
        }
        Ok(lines)
    })
    .await?
    .map_err(|e| BuildError::Export(format!("{e:#}")))?;
    for l in &lines {
        v.log(l);
    }
    v.done();
    Ok(())
}

/// The snapshots of the image of `result`, lowest first.
fn final_chain(worker: &Worker, result: &Ref) -> Result<Vec<String>, BuildError> {
    match result {
        Ref::Snapshot(top) => Ok(worker.chain(top)?),
        _ => Ok(Vec::new()),
    }
}

/// `--cache-to type=inline`: the cache config that goes into the image's config.
async fn inline_cache(
    worker: &Arc<Worker>,
    built: &Arc<remote_cache::Built>,
    progress: &Arc<Progress>,
) -> Result<String, BuildError> {
    let (w, b, p) = (worker.clone(), built.clone(), progress.clone());
    tokio::task::spawn_blocking(move || {
        let v = p.vertex("preparing build cache for export (inline)");
        match remote_cache::inline_config(&w, &b) {
            Ok((config, s)) => {
                v.log(&format!("{} records, {} layers", s.records, s.layers));
                v.done();
                Ok(config)
            }
            Err(e) => {
                v.error(&e.to_string());
                Err(BuildError::Export(format!("--cache-to type=inline: {e}")))
            }
        }
    })
    .await?
}

/// `--cache-to`: the records of this build (and their layers) to a registry or the client.
async fn export_cache(
    worker: &Arc<Worker>,
    spec: CacheSpec,
    built: &Arc<remote_cache::Built>,
    to: Option<Box<dyn Write + Send>>,
    have: HashSet<String>,
    progress: &Arc<Progress>,
) -> Result<(), BuildError> {
    if spec == CacheSpec::Inline {
        return Ok(());
    }
    let (w, b, p) = (worker.clone(), built.clone(), progress.clone());
    tokio::task::spawn_blocking(move || {
        let v = p.vertex(&format!("exporting cache to {}", spec.describe()));
        match remote_cache::export(&w, &spec, &b, to, &have) {
            Ok(s) => {
                v.log(&format!(
                    "{} records, {} layers, {} cache volumes; {} blobs already there",
                    s.records, s.layers, s.volumes, s.kept
                ));
                v.done();
                Ok(())
            }
            Err(e) => {
                v.error(&e.to_string());
                Err(BuildError::Export(format!(
                    "--cache-to {}: {e}",
                    spec.describe()
                )))
            }
        }
    })
    .await?
}

/// The default GC policy, after every build.
async fn trim_cache(worker: &Arc<Worker>, progress: &Arc<Progress>) -> Result<(), BuildError> {
    let w = worker.clone();
    let trimmed =
        tokio::task::spawn_blocking(move || crate::gc::prune(&w, &crate::gc::DEFAULT)).await??;
    if trimmed.records > 0 {
        progress.note(&format!(
            "trimmed the build cache to 10GB: {} records, {} freed",
            trimmed.records,
            crate::progress::human_size(trimmed.freed)
        ));
    }
    Ok(())
}
