//! The build cache in a registry (`--cache-to` / `--cache-from type=registry,ref=REF`), so that
//! another machine starts warm.
//!
//! The cache is an OCI image manifest whose config (media type [`MEDIA_CACHE_CONFIG`]) lists
//! cache records — a cache key, its step's description and its snapshot as a chain of the
//! manifest's layers — and, with `mounts=true`, cache-mount volumes as one layer each. Layers are
//! the same diffs (and blobs) images are made of, pushed gzipped.
//!
//! Importing applies the layers of every record this machine lacks as `layer/<chain ID>`
//! snapshots (shared with unpacked images) and writes its cache record; the keys match because
//! they are computed from the same ops, inputs and context files. Volumes that do not exist here
//! are created from their layer; existing ones are kept.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use crate::spec::InvalidSpec;
use crate::volumes::{Init, Sharing};
use serde::{Deserialize, Serialize};
use strata_image::content::Digest;
use strata_image::layer::{self, DiffOptions};
use strata_image::oci::{self, Descriptor, Manifest};
use strata_image::registry::Reference;

use crate::db::{now, CacheRecord};
use crate::export::layer_of;
use crate::worker::{Worker, WorkerError};

pub const MEDIA_CACHE_CONFIG: &str = "application/vnd.strata.buildcache.config.v1+json";

/// `type=registry,ref=REF[,mode=min|max][,mounts=true|false]`, or a bare `REF`.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSpec {
    pub reference: String,
    /// Every step's result (`max`), or only the final image's layers (`min`, the default).
    pub max: bool,
    /// Cache-mount volumes too.
    pub mounts: bool,
}

impl CacheSpec {
    pub fn parse(spec: &str, flag: &str) -> Result<CacheSpec, InvalidSpec> {
        if !spec.contains('=') {
            return Ok(CacheSpec {
                reference: spec.to_string(),
                max: false,
                mounts: false,
            });
        }
        let (mut kind, mut reference, mut max, mut mounts) = (None, None, false, false);
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{flag} {spec:?}: {part:?} is not key=value"))?;
            match (k, v) {
                ("type", v) => kind = Some(v.to_string()),
                ("ref", v) => reference = Some(v.to_string()),
                ("mode", "max") => max = true,
                ("mode", "min") => max = false,
                ("mounts", "true") => mounts = true,
                ("mounts", "false") => mounts = false,
                ("mode" | "mounts", v) => {
                    return Err(format!(
                        "{flag}: {k}={v} is not valid (mode=min|max, mounts=true|false)"
                    )
                    .into())
                }
                (other, _) => {
                    return Err(format!(
                        "{flag}: unknown key {other:?} (known: type, ref, mode, mounts)"
                    )
                    .into())
                }
            }
        }
        match kind.as_deref() {
            Some("registry") | None => {}
            Some(other) => {
                return Err(
                    format!("{flag} type={other} is not supported (supported: registry)").into(),
                )
            }
        }
        Ok(CacheSpec {
            reference: reference.ok_or_else(|| format!("{flag} {spec:?}: needs ref=REF"))?,
            max,
            mounts,
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheConfig {
    records: Vec<RecordEntry>,
    #[serde(default)]
    volumes: Vec<VolumeEntry>,
    /// The uncompressed digest of each manifest layer, in order.
    diff_ids: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RecordEntry {
    key: String,
    description: String,
    /// Indices into the manifest's layers, lowest first.
    chain: Vec<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
struct VolumeEntry {
    id: String,
    layer: usize,
    uid: u32,
    gid: u32,
    mode: u32,
}

/// What an export or import moved.
#[derive(Debug, Default)]
pub struct Summary {
    pub records: usize,
    pub layers: usize,
    pub volumes: usize,
    /// Records or volumes this machine already had.
    pub kept: usize,
}

/// Pushes the cache records `keys` (for `min`, only those whose snapshot is in `final_chain`)
/// and, with `mounts`, the volumes `volume_ids`, to `spec.reference`.
pub fn export(
    worker: &Worker,
    spec: &CacheSpec,
    keys: &[String],
    final_chain: &[String],
    volume_ids: &[String],
) -> Result<Summary, WorkerError> {
    let mut config = CacheConfig::default();
    let mut layers: Vec<Descriptor> = Vec::new();
    let mut index_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut add_layer = |blob: Descriptor, diff_id: String, config: &mut CacheConfig| -> usize {
        *index_of.entry(diff_id.clone()).or_insert_with(|| {
            layers.push(blob);
            config.diff_ids.push(diff_id);
            layers.len() - 1
        })
    };
    for key in keys {
        let Some(rec) = worker.db.cache(key)? else {
            continue;
        };
        if !spec.max && !final_chain.contains(&rec.snapshot) {
            continue;
        }
        let mut snapshots = worker.snapshots.parents(&rec.snapshot)?;
        snapshots.reverse();
        snapshots.push(rec.snapshot.clone());
        let mut chain = Vec::new();
        for s in &snapshots {
            let l = layer_of(worker, s, None)?;
            chain.push(add_layer(l.blob, l.diff_id, &mut config));
        }
        config.records.push(RecordEntry {
            key: key.clone(),
            description: rec.description.clone(),
            chain,
        });
    }
    if spec.mounts {
        let existing: Vec<String> = worker.volumes.list()?.into_iter().map(|m| m.id).collect();
        for id in volume_ids.iter().filter(|id| existing.contains(id)) {
            // Locked: no step writes while the volume is read.
            let lease = worker.volumes.acquire(
                id,
                Sharing::Locked,
                Init {
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
            )?;
            let meta = std::fs::metadata(&lease.path)
                .map_err(WorkerError::io(format!("cache volume {id}")))?;
            let mut w = worker.content.writer()?;
            layer::diff(&lease.path, &mut w, DiffOptions { mtime_max: None })
                .map_err(WorkerError::io(format!("cache volume {id}")))?;
            let digest = w.commit(None)?;
            drop(lease);
            let blob = Descriptor {
                media_type: oci::MEDIA_LAYER.into(),
                digest: digest.to_string(),
                size: worker.content.size(&digest)?,
                annotations: BTreeMap::from([("org.strata.cache.volume".to_string(), id.clone())]),
                platform: None,
            };
            let layer = add_layer(blob, digest.to_string(), &mut config);
            config.volumes.push(VolumeEntry {
                id: id.clone(),
                layer,
                uid: meta.uid(),
                gid: meta.gid(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    let summary = Summary {
        records: config.records.len(),
        layers: layers.len(),
        volumes: config.volumes.len(),
        kept: 0,
    };
    let config_desc = oci::put_json(&worker.content, MEDIA_CACHE_CONFIG, &config)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: oci::MEDIA_MANIFEST.into(),
        config: config_desc,
        // Registries get gzip layers, as BuildKit pushes them.
        layers: crate::form::layers(worker, &layers, &crate::form::LayerForm::OCI)?,
    };
    let desc = oci::put_json(&worker.content, oci::MEDIA_MANIFEST, &manifest)?;
    worker.push(&spec.reference, &desc)?;
    Ok(summary)
}

/// Fetches the cache at `spec.reference` and adds what this machine lacks.
pub fn import(worker: &Worker, spec: &CacheSpec) -> Result<Summary, WorkerError> {
    let r = Reference::parse(&spec.reference)?;
    let (bytes, _, digest) = worker.registry.manifest(&r)?;
    worker
        .content
        .put_reader(&bytes[..], Some(&parse_digest(&digest)?))?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| WorkerError::Image(format!("cache {r}: manifest: {e}")))?;
    if manifest.config.media_type != MEDIA_CACHE_CONFIG {
        return Err(WorkerError::Image(format!(
            "{r} is not a strata build cache (its config is {}); export one with --cache-to type=registry,ref={r}",
            manifest.config.media_type
        )));
    }
    worker.fetch_blob(&r, &manifest.config)?;
    let config: CacheConfig =
        oci::read_json(&worker.content, &parse_digest(&manifest.config.digest)?)?;
    let layer_at = |i: usize| -> Result<(Descriptor, String), WorkerError> {
        match (manifest.layers.get(i), config.diff_ids.get(i)) {
            (Some(l), Some(d)) => Ok((l.clone(), d.clone())),
            _ => Err(WorkerError::Image(format!(
                "cache {r}: layer {i} is missing: the cache is corrupt; export it again"
            ))),
        }
    };
    let mut summary = Summary::default();
    for rec in &config.records {
        if let Some(existing) = worker.db.cache(&rec.key)? {
            if worker.snapshots.stat(&existing.snapshot).is_ok() {
                summary.kept += 1;
                continue;
            }
        }
        let layers: Vec<(Descriptor, String)> = rec
            .chain
            .iter()
            .map(|i| layer_at(*i))
            .collect::<Result<_, _>>()?;
        for (blob, _) in &layers {
            worker.fetch_blob(&r, blob)?;
        }
        let keys = worker.unpack_chain(&layers)?;
        summary.layers += layers.len();
        let Some(top) = keys.last() else { continue };
        worker.db.put_cache(
            &rec.key,
            &CacheRecord {
                snapshot: top.clone(),
                created: now(),
                last_used: now(),
                description: rec.description.clone(),
            },
        )?;
        summary.records += 1;
    }
    if spec.mounts {
        let existing: Vec<String> = worker.volumes.list()?.into_iter().map(|m| m.id).collect();
        for v in &config.volumes {
            if existing.contains(&v.id) {
                summary.kept += 1;
                continue;
            }
            let (blob, diff_id) = layer_at(v.layer)?;
            worker.fetch_blob(&r, &blob)?;
            let lease = worker.volumes.acquire(
                &v.id,
                Sharing::Locked,
                Init {
                    mode: v.mode,
                    uid: v.uid,
                    gid: v.gid,
                },
            )?;
            let reader = worker.content.open_blob(&parse_digest(&blob.digest)?)?;
            let plain: Box<dyn std::io::Read> = if blob.media_type.ends_with("gzip") {
                Box::new(flate2::read::GzDecoder::new(reader))
            } else {
                Box::new(reader)
            };
            if let Err(e) = layer::apply(plain, &lease.path) {
                let path = lease.path.clone();
                drop(lease);
                let _ = worker.volumes.remove(&v.id);
                return Err(WorkerError::Image(format!(
                    "cache {r}: volume {} ({diff_id}) at {}: {e}",
                    v.id,
                    path.display()
                )));
            }
            summary.volumes += 1;
        }
    }
    Ok(summary)
}

fn parse_digest(d: &str) -> Result<Digest, WorkerError> {
    Digest::parse(d).map_err(|e| WorkerError::Image(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_buildx_cache_specs() {
        let s = CacheSpec::parse(
            "type=registry,ref=localhost:5000/app:cache,mode=max,mounts=true",
            "--cache-to",
        )
        .unwrap();
        assert_eq!(s.reference, "localhost:5000/app:cache");
        assert!(s.max && s.mounts);
        let bare = CacheSpec::parse("localhost:5000/app:cache", "--cache-from").unwrap();
        assert!(!bare.max && !bare.mounts);
        for bad in [
            "type=local,dest=x",
            "type=registry",
            "type=registry,ref=x,mode=all",
            "ref=x,colour=red",
        ] {
            assert!(CacheSpec::parse(bad, "--cache-to").is_err(), "{bad}");
        }
    }
}
