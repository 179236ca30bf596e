//! Build caches kept outside this builder (`--cache-to` / `--cache-from`), so that another
//! machine or the next CI run starts warm: in a registry (`type=registry,ref=REF`), in an OCI
//! image layout directory on the client (`type=local,dest=DIR|src=DIR`), or in the image's own
//! config (`type=inline`, imported as `type=registry,ref=IMAGE`).
//!
//! All three write one [`config::CacheConfig`]: cache records (a cache key, its step, the layer
//! its result ends at) over a chain of layers — the same diffs (and blobs) images are made of —
//! and, with `mounts=true`, cache-mount volumes as one layer each. Registry and local caches are
//! an OCI manifest whose config has the media type [`MEDIA_CACHE_CONFIG`], layers gzipped as
//! BuildKit pushes them. Importing applies the layers of every record this machine lacks as
//! `layer/<chain ID>` snapshots (shared with unpacked images) and writes its cache record; the
//! keys match because they are computed from the same ops, inputs and context files.

pub mod config;
mod inline;
mod local;
mod registry;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;

use strata_image::oci::{self, Descriptor, Manifest};

use crate::spec::InvalidSpec;
use crate::worker::{Worker, WorkerError};
use config::Gathered;

pub use inline::config as inline_config;

pub const MEDIA_CACHE_CONFIG: &str = "application/vnd.strata.buildcache.config.v2+json";

/// One `--cache-to` or `--cache-from`, in buildx's syntax.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheSpec {
    /// `type=registry,ref=REF`, or a bare `REF`.
    Registry { reference: String, scope: Scope },
    /// `type=local,dest=DIR` (export) or `src=DIR` (import): an OCI layout on the client; `tag`
    /// names the cache in its index.
    Local {
        dir: String,
        tag: String,
        scope: Scope,
    },
    /// `type=inline` (export only): the records of the image's own layers, in its config.
    Inline,
}

/// What a cache holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scope {
    /// Every step's result (`mode=max`), or only the final image's chain (`min`, the default).
    pub max: bool,
    /// Cache-mount volumes too (`mounts=true`).
    pub mounts: bool,
}

const KEYS: &str = "type, ref, dest, src, tag, mode, mounts";

impl CacheSpec {
    pub fn parse(spec: &str, flag: &str) -> Result<CacheSpec, InvalidSpec> {
        if !spec.contains('=') {
            return Ok(CacheSpec::Registry {
                reference: spec.to_string(),
                scope: Scope::default(),
            });
        }
        let mut keys = BTreeMap::new();
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{flag} {spec:?}: {part:?} is not key=value"))?;
            if !KEYS.split(", ").any(|known| known == k) {
                return Err(format!("{flag}: unknown key {k:?} (known: {KEYS})").into());
            }
            keys.insert(k, v);
        }
        let scope = Scope {
            max: flag_value(&keys, "mode", ("min", "max"), flag)?,
            mounts: flag_value(&keys, "mounts", ("false", "true"), flag)?,
        };
        let export = flag == "--cache-to";
        let dir_key = if export { "dest" } else { "src" };
        let kind = keys.get("type").copied().unwrap_or("registry");
        match kind {
            "registry" => Ok(CacheSpec::Registry {
                reference: keys
                    .get("ref")
                    .ok_or_else(|| format!("{flag} {spec:?}: needs ref=REF"))?
                    .to_string(),
                scope,
            }),
            "local" => Ok(CacheSpec::Local {
                dir: keys
                    .get(dir_key)
                    .ok_or_else(|| format!("{flag} type=local needs {dir_key}=DIR"))?
                    .to_string(),
                tag: keys.get("tag").unwrap_or(&"latest").to_string(),
                scope,
            }),
            "inline" if !export => Err(format!(
                "{flag} type=inline: import an image's inline cache with {flag} type=registry,ref=IMAGE"
            )
            .into()),
            "inline" if scope != Scope::default() => Err(format!(
                "{flag} type=inline holds the image's own layers only: leave out mode=max and mounts=true, or use type=registry or type=local"
            )
            .into()),
            "inline" => Ok(CacheSpec::Inline),
            other => Err(format!(
                "{flag} type={other} is not supported (supported: registry, local, inline)"
            )
            .into()),
        }
    }

    /// The spec with a local cache's directory made absolute against `cwd` (the client's): the
    /// builder keys what it keeps of the directory by its full path.
    pub fn absolute(spec: &str, flag: &str, cwd: &Path) -> Result<String, InvalidSpec> {
        let CacheSpec::Local { dir, .. } = CacheSpec::parse(spec, flag)? else {
            return Ok(spec.to_string());
        };
        let full = cwd.join(&dir);
        let parts = spec.split(',').map(|part| match part.split_once('=') {
            Some((k @ ("dest" | "src"), _)) => format!("{k}={}", full.display()),
            _ => part.to_string(),
        });
        Ok(parts.collect::<Vec<_>>().join(","))
    }

    /// How progress names it.
    pub fn describe(&self) -> String {
        match self {
            CacheSpec::Registry { reference, .. } => reference.clone(),
            CacheSpec::Local { dir, .. } => format!("local directory {dir}"),
            CacheSpec::Inline => "the image config (inline)".into(),
        }
    }
}

/// `key`'s value as a bool: `no` or `yes` of `(no, yes)`, absent = no.
fn flag_value(
    keys: &BTreeMap<&str, &str>,
    key: &str,
    (no, yes): (&str, &str),
    flag: &str,
) -> Result<bool, InvalidSpec> {
    match keys.get(key) {
        None => Ok(false),
        Some(v) if *v == no => Ok(false),
        Some(v) if *v == yes => Ok(true),
        Some(v) => Err(format!("{flag}: {key}={v} is not valid ({key}={no}|{yes})").into()),
    }
}

/// What an export or import moved.
#[derive(Debug, Default)]
pub struct Summary {
    pub records: usize,
    pub layers: usize,
    pub volumes: usize,
    /// Imports: records or volumes this machine already had. Local exports: blobs the
    /// directory had.
    pub kept: usize,
}

/// What a build leaves for its cache exports.
pub struct Built {
    /// The cache keys of its steps.
    pub keys: Vec<String>,
    /// The snapshots of the final image, lowest first.
    pub final_chain: Vec<String>,
    /// The cache-mount volumes its steps use.
    pub volume_ids: Vec<String>,
    /// `SOURCE_DATE_EPOCH`, as the image's layers were made.
    pub epoch: Option<u64>,
}

/// Exports `built` as `spec` says; a local cache is written to `to` (the client), leaving out the
/// blobs in `have` (those the directory holds).
pub fn export(
    worker: &Worker,
    spec: &CacheSpec,
    built: &Built,
    to: Option<Box<dyn Write + Send>>,
    have: &HashSet<String>,
) -> Result<Summary, WorkerError> {
    let (CacheSpec::Registry { scope, .. } | CacheSpec::Local { scope, .. }) = spec else {
        // Inline: written into the image's config as the image was exported.
        return Ok(Summary::default());
    };
    let g = gather(worker, *scope, built)?;
    let mut summary = g.summary();
    let manifest = manifest(worker, g)?;
    match spec {
        CacheSpec::Local { dir, tag, .. } => {
            let to = to.ok_or_else(|| {
                WorkerError::Exec(format!(
                    "the cache for {dir} goes to the client, which is not here"
                ))
            })?;
            summary.kept = local::write(worker, &manifest, tag, have, to)?;
        }
        CacheSpec::Registry { reference, .. } => worker.push(reference, &manifest)?,
        CacheSpec::Inline => {}
    }
    Ok(summary)
}

/// The records (and volumes) `scope` selects of `built`.
fn gather(worker: &Worker, scope: Scope, built: &Built) -> Result<Gathered, WorkerError> {
    let only_in = (!scope.max).then_some(&built.final_chain[..]);
    let mut g = Gathered::records(worker, &built.keys, only_in, built.epoch)?;
    if scope.mounts {
        let existing: HashSet<String> = worker.volumes.list()?.into_iter().map(|m| m.id).collect();
        for id in built.volume_ids.iter().filter(|id| existing.contains(*id)) {
            g.volume(worker, id)?;
        }
    }
    Ok(g)
}

/// The cache as an OCI manifest in the store: gzip layers (as BuildKit pushes them), the config.
fn manifest(worker: &Worker, g: Gathered) -> Result<Descriptor, WorkerError> {
    let plain: Vec<Descriptor> = g.layers.iter().map(|l| l.blob.clone()).collect();
    let layers = crate::form::layers(worker, &plain, &crate::form::LayerForm::OCI)?;
    let config = g.finish(&layers);
    let manifest = Manifest {
        schema_version: 2,
        media_type: oci::MEDIA_MANIFEST.into(),
        config: oci::put_json(&worker.content, MEDIA_CACHE_CONFIG, &config)?,
        layers,
    };
    Ok(oci::put_json(
        &worker.content,
        oci::MEDIA_MANIFEST,
        &manifest,
    )?)
}

/// Imports the cache `spec` names; `dir` is the builder's copy of a local cache's directory.
pub fn import(
    worker: &Worker,
    spec: &CacheSpec,
    dir: Option<&Path>,
) -> Result<Summary, WorkerError> {
    match (spec, dir) {
        (CacheSpec::Registry { reference, scope }, _) => {
            registry::import(worker, reference, scope.mounts)
        }
        (CacheSpec::Local { tag, scope, .. }, Some(dir)) => {
            local::import(worker, dir, tag, scope.mounts)
        }
        _ => Err(WorkerError::Exec(format!(
            "{} cannot be imported here",
            spec.describe()
        ))),
    }
}

/// The cache config a cache manifest names, once its blob is in the store.
fn read_config(
    worker: &Worker,
    manifest: &Manifest,
    what: &str,
) -> Result<config::CacheConfig, WorkerError> {
    let digest = strata_image::content::Digest::parse(&manifest.config.digest)
        .map_err(|e| WorkerError::Image(format!("cache {what}: {e}")))?;
    Ok(oci::read_json(&worker.content, &digest)?)
}

/// A layer's descriptor and diff_id as the cache config describes it.
fn described(layer: &config::CacheLayer, what: &str) -> Result<(Descriptor, String), WorkerError> {
    let a = layer.annotations.as_ref().ok_or_else(|| {
        WorkerError::Image(format!(
            "cache {what}: layer {} has no media type or diff ID; export the cache again",
            layer.blob
        ))
    })?;
    let desc = Descriptor {
        media_type: a.media_type.clone(),
        digest: layer.blob.clone(),
        size: a.size,
        annotations: Default::default(),
        platform: None,
    };
    Ok((desc, a.diff_id.clone()))
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
        let max = Scope {
            max: true,
            mounts: true,
        };
        assert_eq!(
            s,
            CacheSpec::Registry {
                reference: "localhost:5000/app:cache".into(),
                scope: max
            }
        );
        let bare = CacheSpec::parse("localhost:5000/app:cache", "--cache-from").unwrap();
        assert!(matches!(bare, CacheSpec::Registry { scope, .. } if scope == Scope::default()));
        let local = CacheSpec::parse("type=local,dest=ci/cache,mode=max", "--cache-to").unwrap();
        assert!(
            matches!(local, CacheSpec::Local { ref dir, ref tag, scope } if dir == "ci/cache" && tag == "latest" && scope.max)
        );
        let from = CacheSpec::parse("type=local,src=ci/cache,tag=v2", "--cache-from").unwrap();
        assert!(matches!(from, CacheSpec::Local { ref tag, .. } if tag == "v2"));
        assert_eq!(
            CacheSpec::parse("type=inline", "--cache-to").unwrap(),
            CacheSpec::Inline
        );
        for (bad, flag) in [
            ("type=local,src=x", "--cache-to"),
            ("type=local,dest=x", "--cache-from"),
            ("type=inline", "--cache-from"),
            ("type=inline,mode=max", "--cache-to"),
            ("type=gha", "--cache-to"),
            ("type=registry", "--cache-to"),
            ("type=registry,ref=x,mode=all", "--cache-to"),
            ("ref=x,colour=red", "--cache-to"),
        ] {
            assert!(CacheSpec::parse(bad, flag).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_directories_become_absolute() {
        let cwd = Path::new("/work/app");
        let spec = "type=local,dest=ci/cache,mode=max";
        assert_eq!(
            CacheSpec::absolute(spec, "--cache-to", cwd).unwrap(),
            "type=local,dest=/work/app/ci/cache,mode=max"
        );
        let abs = "type=local,src=/var/cache/app";
        assert_eq!(CacheSpec::absolute(abs, "--cache-from", cwd).unwrap(), abs);
        assert_eq!(
            CacheSpec::absolute("reg/app:cache", "--cache-from", cwd).unwrap(),
            "reg/app:cache"
        );
    }

    #[test]
    fn configs_are_buildkits_v0_and_broken_chains_are_refused() {
        // BuildKit leaves out a parent of 0; -1 is "no parent".
        let json = r#"{"layers":[{"blob":"sha256:a","parent":-1},{"blob":"sha256:b"},{"blob":"sha256:c","parent":1}],
            "records":[{"digest":"sha256:k","layers":[{"layer":2}]}]}"#;
        let c: config::CacheConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.layers[1].parent, 0);
        assert_eq!(c.records[0].results[0].layer, 2);
        let back = serde_json::to_string(&c).unwrap();
        assert!(back.contains(r#"{"blob":"sha256:b"}"#), "{back}");
        let cycle = r#"{"layers":[{"blob":"sha256:a","parent":1},{"blob":"sha256:b"}]}"#;
        let c: config::CacheConfig = serde_json::from_str(cycle).unwrap();
        assert!(c.chain(1).is_err());
        let out_of_range = r#"{"layers":[{"blob":"sha256:a","parent":7}]}"#;
        let c: config::CacheConfig = serde_json::from_str(out_of_range).unwrap();
        assert!(c.chain(0).is_err());
        assert!(c.chain(3).is_err());
    }
}
