//! One build, from a request to its outputs — the flow `strata build` runs: read the source
//! ([`source`]), compile it with its frontend, import caches, solve the graph in parallel, export
//! the result, export the cache, trim the cache. The client-side pieces of a build (secrets, ssh
//! agents) are in [`session`].

pub mod session;
pub mod source;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use strata_image::oci::ImageConfig;

use crate::db::DbError;
use crate::dockerfile::DockerfileError;
use crate::export::{self, Output};
use crate::llb::{Graph, LlbError};
use crate::progress::Progress;
use crate::remote_cache::{self, CacheSpec};
use crate::secrets::SecretError;
use crate::solver::{SolveError, Solver};
use crate::spec::InvalidSpec;
use crate::worker::{Context, Ref, Worker, WorkerError, CANCELLED};

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
    #[error("a build task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What to build and where the result goes: `strata build`'s flags, in BuildKit's terms.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub source: source::Source,
    /// Names in the local image store (`-t`).
    pub tags: Vec<String>,
    /// `--output` specs.
    pub outputs: Vec<String>,
    pub no_cache: bool,
    pub no_cache_filter: Vec<String>,
    /// `--build-context NAME=SOURCE`.
    pub build_contexts: Vec<String>,
    /// `--secret` and `--ssh` specs.
    pub secrets: Vec<String>,
    pub ssh: Vec<String>,
    /// `--cache-to` / `--cache-from` specs.
    pub cache_to: Vec<String>,
    pub cache_from: Vec<String>,
    /// Check the registry for newer base images.
    pub pull: bool,
    /// Steps run at once (default: the number of CPUs).
    pub max_parallelism: Option<usize>,
    /// `SOURCE_DATE_EPOCH`: timestamps for reproducible digests.
    pub epoch: Option<u64>,
}

/// Runs `req` on `worker` (its `always_pull` set from the request), reporting to `progress`.
pub async fn build(
    mut worker: Arc<Worker>,
    req: &Request,
    progress: Arc<Progress>,
) -> Result<(), BuildError> {
    if let Some(w) = Arc::get_mut(&mut worker) {
        w.always_pull = req.pull;
    }
    let outputs = outputs(req)?;
    let loaded = source::load(&req.source, &progress)?;
    let mut opts = source::convert_options(&req.source, loaded.ignore.clone());
    opts.no_cache = req.no_cache;
    opts.no_cache_filter = req.no_cache_filter.clone();
    opts.contexts = source::named_contexts(&worker, &req.build_contexts)?;
    let cache_to = cache_specs(&req.cache_to, "--cache-to")?;
    let cache_from = cache_specs(&req.cache_from, "--cache-from")?;
    let (definition, config) =
        source::compile(&worker, &req.source, &loaded, opts, &progress).await?;
    let graph = Graph::from_definition(&definition)?;
    let volume_ids = graph.cache_ids();
    for spec in cache_from {
        import_cache(&worker, spec, &progress).await?;
    }
    let context = Context {
        dir: req.source.context.canonicalize().map_err(|e| {
            BuildError::Input(format!(
                "build context {}: {e}",
                req.source.context.display()
            ))
        })?,
        ignore: loaded.ignore,
    };
    let parallel = req
        .max_parallelism
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let session = session::session(&req.secrets, &req.ssh)?;
    let solver = Solver::new(
        worker.clone(),
        graph,
        Some(context),
        session,
        progress.clone(),
        parallel,
    );
    cancel_on_ctrl_c();
    let done = solver.solve().await?;
    let result = done.map(|d| d.result.clone()).unwrap_or(Ref::Scratch);
    export_image(&worker, &result, config, outputs, req.epoch, &progress).await?;
    for spec in cache_to {
        export_cache(&worker, &solver, spec, &result, &volume_ids, &progress).await?;
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

/// Ctrl-C: running steps are killed, mounts undone, no cache record written for them.
fn cancel_on_ctrl_c() {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            CANCELLED.store(true, Ordering::SeqCst);
        }
    });
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

/// `--cache-from`: a missing or unreachable cache makes a cold build, as in BuildKit.
async fn import_cache(
    worker: &Arc<Worker>,
    spec: CacheSpec,
    progress: &Arc<Progress>,
) -> Result<(), BuildError> {
    let (w, p) = (worker.clone(), progress.clone());
    tokio::task::spawn_blocking(move || {
        let v = p.vertex(&format!("importing cache manifest from {}", spec.reference));
        match remote_cache::import(&w, &spec) {
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

/// The image of `result` with `config`, written to every output.
async fn export_image(
    worker: &Arc<Worker>,
    result: &Ref,
    config: ImageConfig,
    outputs: Vec<Output>,
    epoch: Option<u64>,
    progress: &Arc<Progress>,
) -> Result<(), BuildError> {
    let v = progress.vertex("exporting to image");
    let (w, r) = (worker.clone(), result.clone());
    let lines = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let manifest = export::image(&w, &r, config, epoch)?;
        let mut lines = vec![format!("writing image {}", manifest.digest)];
        for o in &outputs {
            lines.push(export::write(&w, o, &r, &manifest, epoch)?);
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

/// `--cache-to`: the records of this build (and the result's layers) to a registry.
async fn export_cache(
    worker: &Arc<Worker>,
    solver: &Arc<Solver>,
    spec: CacheSpec,
    result: &Ref,
    volume_ids: &[String],
    progress: &Arc<Progress>,
) -> Result<(), BuildError> {
    let final_chain = match result {
        Ref::Snapshot(top) => {
            let mut c = worker.snapshots.parents(top).map_err(WorkerError::from)?;
            c.push(top.clone());
            c
        }
        _ => Vec::new(),
    };
    let (w, p, keys, ids) = (
        worker.clone(),
        progress.clone(),
        solver.keys(),
        volume_ids.to_vec(),
    );
    tokio::task::spawn_blocking(move || {
        let v = p.vertex(&format!("exporting cache to {}", spec.reference));
        match remote_cache::export(&w, &spec, &keys, &final_chain, &ids) {
            Ok(s) => {
                v.log(&format!(
                    "{} records, {} layers, {} cache volumes",
                    s.records, s.layers, s.volumes
                ));
                v.done();
                Ok(())
            }
            Err(e) => {
                v.error(&e.to_string());
                Err(BuildError::Export(format!(
                    "--cache-to {}: {e}",
                    spec.reference
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
