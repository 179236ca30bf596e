//! The cache config every export writes (registry, local directory, inline in an image): BuildKit's
//! v0 format — layers linked by their parent's index, records naming a cache key and the layer
//! its result ends at — with two fields BuildKit ignores: a record's step description and the
//! cache-mount volumes (one layer each).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};
use strata_image::layer::{self, DiffOptions};
use strata_image::oci::{self, Descriptor};

use super::Summary;
use crate::db::{now, CacheRecord, LayerRecord};
use crate::export::layer_of;
use crate::volumes::{Init, Sharing};
use crate::worker::{Worker, WorkerError};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CacheConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<CacheLayer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<Record>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheLayer {
    pub blob: String,
    /// The layer below, -1 for none (BuildKit writes 0 by leaving it out).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub parent: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<LayerAnnotations>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerAnnotations {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    #[serde(rename = "diffID")]
    pub diff_id: String,
    pub size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub digest: String,
    /// Where the result ends (BuildKit calls them layers).
    #[serde(rename = "layers", default)]
    pub results: Vec<RecordResult>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RecordResult {
    pub layer: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub id: String,
    pub layer: usize,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A config being made: `layers[i]` is config layer i as this store holds it.
#[derive(Default)]
pub struct Gathered {
    pub config: CacheConfig,
    pub layers: Vec<LayerRecord>,
    index_of: BTreeMap<(i64, String), usize>,
}

impl Gathered {
    /// The records of `keys`; with `only_in`, those whose snapshot is in it (mode=min).
    pub fn records(
        worker: &Worker,
        keys: &[String],
        only_in: Option<&[String]>,
        epoch: Option<u64>,
    ) -> Result<Gathered, WorkerError> {
        let mut g = Gathered::default();
        for key in keys {
            let Some(rec) = worker.db.cache(key)? else {
                continue;
            };
            if only_in.is_some_and(|chain| !chain.contains(&rec.snapshot)) {
                continue;
            }
            let mut top = -1;
            for s in &worker.chain(&rec.snapshot)? {
                top = g.add(top, layer_of(worker, s, epoch)?) as i64;
            }
            g.config.records.push(Record {
                digest: key.clone(),
                results: vec![RecordResult {
                    layer: top as usize,
                }],
                description: rec.description,
            });
        }
        Ok(g)
    }

    fn add(&mut self, parent: i64, l: LayerRecord) -> usize {
        let next = self.layers.len();
        let i = *self
            .index_of
            .entry((parent, l.diff_id.clone()))
            .or_insert(next);
        if i == next {
            self.config.layers.push(CacheLayer {
                blob: l.blob.digest.clone(),
                parent,
                annotations: None,
            });
            self.layers.push(l);
        }
        i
    }

    /// Adds cache-mount volume `id` as a layer of its own.
    pub fn volume(&mut self, worker: &Worker, id: &str) -> Result<(), WorkerError> {
        let io = |what: &str| WorkerError::io(format!("cache volume {id}: {what}"));
        // Locked: no step writes while the volume is read.
        let lease = worker.volumes.acquire(id, Sharing::Locked, Init::ROOT)?;
        let meta = std::fs::metadata(&lease.path).map_err(io("stat"))?;
        let mut w = worker.content.writer()?;
        layer::diff(&lease.path, &mut w, DiffOptions { mtime_max: None }).map_err(io("diff"))?;
        let digest = w.commit(None)?;
        drop(lease);
        let blob = Descriptor {
            media_type: oci::MEDIA_LAYER.into(),
            digest: digest.to_string(),
            size: worker.content.size(&digest)?,
            annotations: Default::default(),
            platform: None,
        };
        let layer = self.add(
            -1,
            LayerRecord {
                diff_id: digest.to_string(),
                blob,
            },
        );
        self.config.volumes.push(VolumeEntry {
            id: id.to_string(),
            layer,
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode() & 0o7777,
        });
        Ok(())
    }

    /// The config, its layers named by `blobs` (the gathered layers as they are shipped).
    pub fn finish(mut self, blobs: &[Descriptor]) -> CacheConfig {
        for ((layer, blob), rec) in self.config.layers.iter_mut().zip(blobs).zip(&self.layers) {
            layer.blob = blob.digest.clone();
            layer.annotations = Some(LayerAnnotations {
                media_type: blob.media_type.clone(),
                diff_id: rec.diff_id.clone(),
                size: blob.size,
            });
        }
        self.config
    }

    pub fn summary(&self) -> Summary {
        Summary {
            records: self.config.records.len(),
            layers: self.layers.len(),
            volumes: self.config.volumes.len(),
            kept: 0,
        }
    }
}

/// Where an import's layers come from: makes config layer `l` present in the content store and
/// returns its descriptor and diff_id.
pub type Fetch<'a> = dyn Fn(&CacheLayer) -> Result<(Descriptor, String), WorkerError> + 'a;

impl CacheConfig {
    /// Config layer `top` and those below it, lowest first.
    pub(super) fn chain(&self, top: usize) -> Result<Vec<&CacheLayer>, String> {
        let mut chain = Vec::new();
        let mut at = top as i64;
        while at != -1 {
            let layer = usize::try_from(at)
                .ok()
                .and_then(|i| self.layers.get(i))
                .filter(|_| chain.len() < self.layers.len())
                .ok_or_else(|| format!("layer {top}'s chain is broken at {at}"))?;
            chain.push(layer);
            at = layer.parent;
        }
        chain.reverse();
        Ok(chain)
    }

    /// Adds the records (and with `mounts`, the volumes) this machine lacks.
    pub fn apply(
        &self,
        worker: &Worker,
        fetch: &Fetch,
        mounts: bool,
        what: &str,
    ) -> Result<Summary, WorkerError> {
        let corrupt = |e: String| {
            WorkerError::Image(format!(
                "cache {what}: {e}: the cache is corrupt; export it again"
            ))
        };
        let mut summary = Summary::default();
        for rec in &self.records {
            if let Some(existing) = worker.db.cache(&rec.digest)? {
                if worker.snapshots.stat(&existing.snapshot).is_ok() {
                    summary.kept += 1;
                    continue;
                }
            }
            let Some(top) = rec.results.first() else {
                continue;
            };
            let layers: Vec<(Descriptor, String)> = self
                .chain(top.layer)
                .map_err(corrupt)?
                .into_iter()
                .map(fetch)
                .collect::<Result<_, _>>()?;
            let keys = worker.unpack_chain(&layers)?;
            summary.layers += layers.len();
            let Some(top) = keys.last() else { continue };
            worker.db.put_cache(
                &rec.digest,
                &CacheRecord {
                    snapshot: top.clone(),
                    created: now(),
                    last_used: now(),
                    description: rec.description.clone(),
                },
            )?;
            summary.records += 1;
        }
        if mounts {
            self.apply_volumes(worker, fetch, what, &mut summary)?;
        }
        Ok(summary)
    }

    fn apply_volumes(
        &self,
        worker: &Worker,
        fetch: &Fetch,
        what: &str,
        summary: &mut Summary,
    ) -> Result<(), WorkerError> {
        let existing: Vec<String> = worker.volumes.list()?.into_iter().map(|m| m.id).collect();
        for v in &self.volumes {
            if existing.contains(&v.id) {
                summary.kept += 1;
                continue;
            }
            let layer = self.layers.get(v.layer).ok_or_else(|| {
                WorkerError::Image(format!("cache {what}: volume {} has no layer", v.id))
            })?;
            let (blob, diff_id) = fetch(layer)?;
            let init = Init {
                mode: v.mode,
                uid: v.uid,
                gid: v.gid,
            };
            let lease = worker.volumes.acquire(&v.id, Sharing::Locked, init)?;
            let applied = crate::form::open_layer(worker, &blob)
                .and_then(|r| layer::apply(r, &lease.path).map_err(WorkerError::from));
            if let Err(e) = applied {
                let path = lease.path.clone();
                drop(lease);
                let _ = worker.volumes.remove(&v.id);
                return Err(WorkerError::Image(format!(
                    "cache {what}: volume {} ({diff_id}) at {}: {e}",
                    v.id,
                    path.display()
                )));
            }
            summary.volumes += 1;
        }
        Ok(())
    }
}
