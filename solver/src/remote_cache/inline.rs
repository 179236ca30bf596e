//! `--cache-to type=inline`: the records of the image's own layers in its config, under
//! BuildKit's key, so that `--cache-from IMAGE` starts warm from the image alone.

use std::collections::HashMap;

use base64::Engine;
use strata_image::content::Digest;
use strata_image::oci::{self, Descriptor, Manifest};

use super::config::{CacheConfig, CacheLayer, Gathered};
use super::{described, Built, Summary};
use crate::worker::{Worker, WorkerError};

/// The config key BuildKit reads an inline cache from.
pub const KEY: &str = "moby.buildkit.cache.v0";

/// The inline cache of the image made of `built.final_chain`: the value of [`KEY`].
pub fn config(worker: &Worker, built: &Built) -> Result<(String, Summary), WorkerError> {
    let g = Gathered::records(worker, &built.keys, Some(&built.final_chain), built.epoch)?;
    let summary = g.summary();
    // Named as this store holds them; an import finds them in the image by diff ID, whatever
    // compression the image was pushed with.
    let blobs: Vec<Descriptor> = g.layers.iter().map(|l| l.blob.clone()).collect();
    let json = serde_json::to_vec(&g.finish(&blobs)).expect("a cache config serializes");
    Ok((
        base64::engine::general_purpose::STANDARD.encode(json),
        summary,
    ))
}

/// Imports the inline cache of the image `manifest` (its config in the store); `fetch` brings
/// one of its layers into the store.
pub fn import(
    worker: &Worker,
    manifest: &Manifest,
    fetch: &dyn Fn(&Descriptor) -> Result<(), WorkerError>,
    what: &str,
) -> Result<Summary, WorkerError> {
    let digest = Digest::parse(&manifest.config.digest)
        .map_err(|e| WorkerError::Image(format!("cache {what}: {e}")))?;
    let image: serde_json::Value = oci::read_json(&worker.content, &digest)?;
    let Some(encoded) = image.get(KEY).and_then(|v| v.as_str()) else {
        return Err(WorkerError::Image(format!(
            "{what} is not a strata build cache (its config is {}) and has no inline cache: export one with --cache-to type=registry,ref={what}, or build the image with --cache-to type=inline",
            manifest.config.media_type
        )));
    };
    let bad = |e: String| WorkerError::Image(format!("{what}: its inline cache: {e}"));
    let json = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| bad(e.to_string()))?;
    let config: CacheConfig = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    let diff_ids = image["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let layers: HashMap<&str, &Descriptor> = diff_ids
        .iter()
        .filter_map(|d| d.as_str())
        .zip(&manifest.layers)
        .collect();
    let resolve = |l: &CacheLayer| {
        let (_, diff_id) = described(l, what)?;
        let desc = layers.get(diff_id.as_str()).ok_or_else(|| {
            bad(format!(
                "it names layer {diff_id}, which the image does not have"
            ))
        })?;
        fetch(desc)?;
        Ok(((*desc).clone(), diff_id))
    };
    config.apply(worker, &resolve, false, what)
}
