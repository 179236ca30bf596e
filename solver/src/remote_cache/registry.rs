//! A cache in a registry: pushed as its manifest; imported from a cache manifest, or from an
//! image whose config carries an inline cache (`--cache-from IMAGE`, as BuildKit).

use strata_image::registry::Reference;

use super::config::CacheLayer;
use super::{described, inline, read_config, Summary, MEDIA_CACHE_CONFIG};
use crate::worker::{Worker, WorkerError};

pub fn import(worker: &Worker, reference: &str, mounts: bool) -> Result<Summary, WorkerError> {
    let r = Reference::parse(reference)?;
    let manifest = worker.fetch_manifest(&r)?;
    worker.fetch_blob(&r, &manifest.config)?;
    if manifest.config.media_type != MEDIA_CACHE_CONFIG {
        return inline::import(worker, &manifest, &|d| worker.fetch_blob(&r, d), reference);
    }
    let config = read_config(worker, &manifest, reference)?;
    let fetch = |l: &CacheLayer| {
        let (desc, diff_id) = described(l, reference)?;
        worker.fetch_blob(&r, &desc)?;
        Ok((desc, diff_id))
    };
    config.apply(worker, &fetch, mounts, reference)
}
