//! `type=local`: the cache as an OCI image layout directory on the client — `index.json` naming
//! the cache manifest by its tag, `blobs/sha256/` — as BuildKit's local cache. An export is a
//! layout tar without the blobs the directory has (the client stores each blob verified and
//! writes `index.json` once the build succeeded); an import reads the builder's copy of the
//! directory without following a symlink out of it.

use std::collections::HashSet;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use nix::fcntl::OFlag;
use strata_image::content::Digest;
use strata_image::fsutil::open_beneath;
use strata_image::oci::{self, Descriptor, Index, Manifest};

use super::config::CacheLayer;
use super::{described, read_config, Summary, MEDIA_CACHE_CONFIG};
use crate::worker::{Worker, WorkerError};

/// Writes the layout of cache `manifest`, tagged `tag`, to `to`, leaving out the blobs in `have`;
/// returns how many it left out.
pub fn write(
    worker: &Worker,
    manifest: &Descriptor,
    tag: &str,
    have: &HashSet<String>,
    to: Box<dyn Write + Send>,
) -> Result<usize, WorkerError> {
    let mut desc = manifest.clone();
    desc.annotations
        .insert(oci::ANNOTATION_REF_NAME.into(), tag.into());
    let mut w = BufWriter::with_capacity(1 << 18, to);
    let left_out = oci::write_layout(&worker.content, desc, have, 0, &mut w)?;
    w.flush().map_err(WorkerError::io("send the cache"))?;
    Ok(left_out)
}

/// Imports the cache tagged `tag` from `dir`, the builder's copy of a local cache directory.
pub fn import(
    worker: &Worker,
    dir: &Path,
    tag: &str,
    mounts: bool,
) -> Result<Summary, WorkerError> {
    let what = format!("local cache {tag}");
    let index: Index = serde_json::from_slice(&read_small(dir, "index.json")?)
        .map_err(|e| WorkerError::Image(format!("{what}: index.json: {e}")))?;
    let tagged = |m: &&Descriptor| m.annotations.get(oci::ANNOTATION_REF_NAME) == Some(&tag.into());
    let m = index.manifests.iter().find(tagged).ok_or_else(|| {
        WorkerError::Image(format!(
            "the local cache has no cache tagged {tag:?}; export one with --cache-to type=local,dest=DIR,tag={tag}"
        ))
    })?;
    blob(worker, dir, m)?;
    let manifest: Manifest = oci::read_json(&worker.content, &digest(m)?)?;
    if manifest.config.media_type != MEDIA_CACHE_CONFIG {
        return Err(WorkerError::Image(format!(
            "{what} is not a strata build cache (its config is {})",
            manifest.config.media_type
        )));
    }
    blob(worker, dir, &manifest.config)?;
    let config = read_config(worker, &manifest, &what)?;
    let fetch = |l: &CacheLayer| {
        let (desc, diff_id) = described(l, &what)?;
        blob(worker, dir, &desc)?;
        Ok((desc, diff_id))
    };
    config.apply(worker, &fetch, mounts, &what)
}

fn digest(d: &Descriptor) -> Result<Digest, WorkerError> {
    Digest::parse(&d.digest).map_err(|e| WorkerError::Image(format!("local cache: {e}")))
}

/// Copies blob `d` of the layout in `dir` into the store, verified, unless it is there.
fn blob(worker: &Worker, dir: &Path, d: &Descriptor) -> Result<(), WorkerError> {
    let digest = digest(d)?;
    if worker.content.has(&digest) {
        return Ok(());
    }
    let path = Path::new("blobs/sha256").join(digest.hex());
    let f = open_beneath(dir, &path, OFlag::O_RDONLY)
        .map_err(WorkerError::io(format!("local cache: {}", path.display())))?;
    worker
        .content
        .put_reader(std::fs::File::from(f), Some(&digest))?;
    Ok(())
}

/// A JSON file of the layout, at most [`oci::MAX_JSON_BLOB`] bytes.
fn read_small(dir: &Path, name: &str) -> Result<Vec<u8>, WorkerError> {
    let f = open_beneath(dir, Path::new(name), OFlag::O_RDONLY)
        .map_err(WorkerError::io(format!("local cache: {name}")))?;
    let mut buf = Vec::new();
    std::fs::File::from(f)
        .take(oci::MAX_JSON_BLOB + 1)
        .read_to_end(&mut buf)
        .map_err(WorkerError::io(format!("local cache: {name}")))?;
    if buf.len() as u64 > oci::MAX_JSON_BLOB {
        return Err(WorkerError::Image(format!(
            "local cache: {name} is larger than {} bytes",
            oci::MAX_JSON_BLOB
        )));
    }
    Ok(buf)
}
