//! The solver: walks the LLB graph with tokio, running independent vertices in parallel (at most
//! `max_parallelism` at once), each vertex once per digest and each cache key once, and looking
//! every vertex up by its cache key before running it.
//!
//! cache key = sha256(op digest, the input vertices' cache keys, the content checksum of the
//! context files the op selects). An unrelated context change keeps the key; an edited or
//! renamed selected file changes it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use futures::future::{BoxFuture, FutureExt, Shared};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use crate::db::{now, CacheRecord};
use crate::llb::CUSTOM_NAME;
use crate::llb::{op, Graph, Op};
use crate::progress::Progress;
use crate::source::Keyed;
use crate::worker::mounts::Session;
use crate::worker::{Context, Ref, Worker, WorkerError};
use strata_image::content::Digest;
use strata_image::nonce;

/// A vertex that failed, named as the user wrote it.
#[derive(Debug, thiserror::Error)]
#[error("{vertex}: {source}")]
pub struct SolveError {
    pub vertex: String,
    #[source]
    pub source: WorkerError,
}

type Outcome = Result<Arc<Done>, Arc<SolveError>>;
type SharedVertex = Shared<BoxFuture<'static, Outcome>>;

/// A solved vertex.
#[derive(Debug)]
pub struct Done {
    pub key: String,
    pub result: Ref,
}

/// What a solve did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub vertices: usize,
    pub cached: usize,
    pub executed: usize,
}

pub struct Solver {
    worker: Arc<Worker>,
    graph: Arc<Graph>,
    context: Option<Arc<Context>>,
    session: Arc<Session>,
    progress: Arc<Progress>,
    permits: Arc<Semaphore>,
    by_digest: Mutex<HashMap<String, SharedVertex>>,
    by_key: Mutex<HashMap<String, SharedVertex>>,
    stats: Mutex<Stats>,
    /// Cache keys of the snapshots this solve produced or found, in completion order.
    keys: Mutex<Vec<String>>,
}

impl Solver {
    pub fn new(
        worker: Arc<Worker>,
        graph: Graph,
        context: Option<Context>,
        session: Session,
        progress: Arc<Progress>,
        max_parallelism: usize,
    ) -> Arc<Solver> {
        Arc::new(Solver {
            worker,
            graph: Arc::new(graph),
            context: context.map(Arc::new),
            session: Arc::new(session),
            progress,
            permits: Arc::new(Semaphore::new(max_parallelism.max(1))),
            by_digest: Mutex::new(HashMap::new()),
            by_key: Mutex::new(HashMap::new()),
            stats: Mutex::new(Stats::default()),
            keys: Mutex::new(Vec::new()),
        })
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock()
    }

    /// Cache keys of every snapshot this solve produced or found in the cache.
    pub fn keys(&self) -> Vec<String> {
        self.keys.lock().clone()
    }

    /// Solves the graph's result.
    pub async fn solve(self: &Arc<Self>) -> Result<Option<Arc<Done>>, Arc<SolveError>> {
        match self.graph.result.clone() {
            None => Ok(None),
            Some(r) => self.vertex(r.digest).await.map(Some),
        }
    }

    fn vertex(self: &Arc<Self>, digest: String) -> SharedVertex {
        let mut map = self.by_digest.lock();
        if let Some(f) = map.get(&digest) {
            return f.clone();
        }
        let this = self.clone();
        let d = digest.clone();
        let fut = async move { this.run_vertex(d).await }.boxed().shared();
        map.insert(digest, fut.clone());
        fut
    }

    fn name(&self, digest: &str) -> String {
        self.graph
            .metadata
            .get(digest)
            .and_then(|m| m.description.get(CUSTOM_NAME).cloned())
            .unwrap_or_else(|| digest.to_string())
    }

    /// A source op's key content (on the blocking pool), shown as a step when it downloads.
    async fn source_key(
        &self,
        op: &crate::llb::SourceOp,
        name: &str,
    ) -> Result<Keyed, WorkerError> {
        let source = crate::source::Source::of(op)?;
        let shown = source.fetches().then(|| self.progress.clone());
        let (worker, context, name) = (self.worker.clone(), self.context.clone(), name.to_string());
        tokio::task::spawn_blocking(move || {
            let v = shown.as_ref().map(|p| p.vertex(&name));
            let keyed = source.key(&worker, context.as_deref());
            match (v, &keyed) {
                (Some(v), Ok(_)) => v.done(),
                (Some(v), Err(e)) => v.error(&e.to_string()),
                (None, _) => {}
            }
            keyed
        })
        .await
        .map_err(|e| WorkerError::Exec(e.to_string()))?
    }

    async fn run_vertex(self: Arc<Self>, digest: String) -> Outcome {
        let op = self.graph.ops[&digest].clone();
        let name = self.name(&digest);
        let fail = |source: WorkerError| {
            Arc::new(SolveError {
                vertex: name.clone(),
                source,
            })
        };
        let inputs =
            futures::future::join_all(op.inputs.iter().map(|i| self.vertex(i.digest.clone())))
                .await;
        let inputs: Vec<Arc<Done>> = inputs.into_iter().collect::<Result<_, _>>()?;

        // A source's content (context files, a download, what a tag names) is part of its key.
        let (checksum, ready) = match &op.kind {
            Some(op::Kind::Source(s)) => {
                let keyed = self.source_key(s, &name).await.map_err(fail)?;
                (keyed.checksum, keyed.ready)
            }
            _ => (String::new(), None),
        };
        let mut h = Sha256::new();
        h.update(&digest);
        for i in &inputs {
            h.update(b"\n");
            h.update(&i.key);
        }
        h.update(b"\n");
        h.update(&checksum);
        let key = Digest::from_hasher(h).to_string();

        // Equal cache keys run once, whatever their digests.
        let shared = {
            let mut by_key = self.by_key.lock();
            match by_key.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let this = self.clone();
                    let (d, k) = (digest.clone(), key.clone());
                    let f = async move { this.execute(d, k, op, inputs, ready).await }
                        .boxed()
                        .shared();
                    by_key.insert(key.clone(), f.clone());
                    f
                }
            }
        };
        shared.await
    }

    async fn execute(
        self: Arc<Self>,
        digest: String,
        key: String,
        op: Op,
        inputs: Vec<Arc<Done>>,
        ready: Option<Ref>,
    ) -> Outcome {
        let name = self.name(&digest);
        let fail = |source: WorkerError| {
            Arc::new(SolveError {
                vertex: name.clone(),
                source,
            })
        };
        self.stats.lock().vertices += 1;
        let ignore_cache = self
            .graph
            .metadata
            .get(&digest)
            .is_some_and(|m| m.ignore_cache);
        let done = |result: Ref| {
            if matches!(result, Ref::Snapshot(_)) {
                self.keys.lock().push(key.clone());
            }
            Ok(Arc::new(Done {
                key: key.clone(),
                result,
            }))
        };

        if let Some(result) = ready {
            return done(result);
        }
        if op.kind.is_none() {
            return Err(fail(WorkerError::Exec("empty op".into())));
        }
        // Another build of this builder running the same step finishes it first.
        let _step = self.worker.steps.lock(&key).await;
        if !ignore_cache {
            let worker = self.worker.clone();
            let k = key.clone();
            let hit =
                tokio::task::spawn_blocking(move || -> Result<Option<String>, WorkerError> {
                    match worker.db.cache(&k)? {
                        Some(mut rec) if worker.snapshots.stat(&rec.snapshot).is_ok() => {
                            rec.last_used = now();
                            worker.db.put_cache(&k, &rec)?;
                            Ok(Some(rec.snapshot))
                        }
                        _ => Ok(None),
                    }
                })
                .await
                .map_err(|e| fail(WorkerError::Exec(e.to_string())))?
                .map_err(fail)?;
            if let Some(snapshot) = hit {
                self.progress.vertex(&name).cached();
                self.stats.lock().cached += 1;
                return done(Ref::Snapshot(snapshot));
            }
        }

        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| fail(WorkerError::Exec(e.to_string())))?;
        let progress = self.progress.clone();
        let worker = self.worker.clone();
        let context = self.context.clone();
        let session = self.session.clone();
        let vname = name.clone();
        let k = key.clone();
        let outcome = tokio::task::spawn_blocking(move || -> Result<Ref, WorkerError> {
            let v = progress.vertex(&vname);
            let result = run_op(
                &worker,
                &op,
                &inputs,
                context.as_deref(),
                &session,
                ignore_cache,
                &k,
                &|line| v.log(line),
            );
            match &result {
                Ok(_) => v.done(),
                Err(e) => v.error(&e.to_string()),
            }
            let result = result?;
            if let Ref::Snapshot(snapshot) = &result {
                worker.db.put_cache(
                    &k,
                    &CacheRecord {
                        snapshot: snapshot.clone(),
                        created: now(),
                        last_used: now(),
                        description: vname,
                    },
                )?;
            }
            Ok(result)
        })
        .await
        .map_err(|e| fail(WorkerError::Exec(e.to_string())))?;
        let result = outcome.map_err(fail)?;
        self.stats.lock().executed += 1;
        done(result)
    }
}

/// The snapshot name of a result: `result/<key>`, or a fresh one when a rerun (--no-cache)
/// replaces a result that exists.
fn result_name(worker: &Worker, key: &str) -> String {
    let name = format!("result/{key}");
    if worker.snapshots.stat(&name).is_ok() {
        format!("{name}/{}", nonce())
    } else {
        name
    }
}

fn input(inputs: &[Arc<Done>], idx: i64) -> Ref {
    usize::try_from(idx)
        .ok()
        .and_then(|i| inputs.get(i))
        .map(|d| d.result.clone())
        .unwrap_or(Ref::Scratch)
}

#[allow(clippy::too_many_arguments)]
fn run_op(
    worker: &Worker,
    op: &Op,
    inputs: &[Arc<Done>],
    context: Option<&Context>,
    session: &Session,
    reset_caches: bool,
    key: &str,
    log: &(dyn Fn(&str) + Sync),
) -> Result<Ref, WorkerError> {
    match op.kind.as_ref().expect("checked") {
        op::Kind::Source(s) => crate::source::Source::of(s)?.run(worker),
        op::Kind::Exec(e) => {
            let refs: Vec<Ref> = inputs.iter().map(|d| d.result.clone()).collect();
            let name = result_name(worker, key);
            worker.exec(&refs, e, &name, context, session, reset_caches, log)?;
            Ok(Ref::Snapshot(name))
        }
        op::Kind::File(f) => {
            let base = f
                .actions
                .first()
                .map(|a| input(inputs, a.input))
                .unwrap_or(Ref::Scratch);
            let actions: Vec<_> = f
                .actions
                .iter()
                .map(|a| {
                    (
                        a.clone(),
                        (a.secondary_input >= 0).then(|| input(inputs, a.secondary_input)),
                    )
                })
                .collect();
            let name = result_name(worker, key);
            worker.file(&base, &actions, context, &name)?;
            Ok(Ref::Snapshot(name))
        }
    }
}
