//! Converting an image's layers to zstd:chunked (`strata-snapshotter convert`, and a library
//! call for exporters): each layer is decompressed and rewritten frame by frame; its tar bytes
//! stay the same, so the config (diff_ids) is unchanged and only the manifest is new.

use std::io::{BufReader, Read, Seek};

use super::read::is_chunked_descriptor;
use super::write::{write, Options};
use super::MEDIA_LAYER_ZSTD;
use crate::content::{ContentStore, Digest};
use crate::oci::{self, Descriptor, ImageConfig, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("layer {digest}: {reason}")]
    Layer { digest: String, reason: String },
    #[error(transparent)]
    Content(#[from] crate::content::ContentError),
    #[error(transparent)]
    Oci(#[from] oci::OciError),
}

/// Converts every layer of `manifest` (with its blobs in `store`) that is not zstd:chunked yet;
/// with a `prefetch` list (paths in the order a workload reads them), those files go first in
/// their layers (the layers' diff_ids, and so the config, change). `progress(i, n, digest)` is
/// called before layer `i` of `n`. Returns the new manifest.
pub fn convert(
    store: &ContentStore,
    manifest: &Manifest,
    opts: Options,
    prefetch: &[String],
    progress: &dyn Fn(usize, usize, &str),
) -> Result<Manifest, ConvertError> {
    let mut config: ImageConfig = oci::read_json(store, &Digest::parse(&manifest.config.digest)?)?;
    let original_diff_ids = config.rootfs.diff_ids.clone();
    let mut out = manifest.clone();
    out.media_type = oci::MEDIA_MANIFEST.into();
    for (i, layer) in out.layers.iter_mut().enumerate() {
        progress(i, manifest.layers.len(), &layer.digest);
        if is_chunked_descriptor(layer) {
            continue;
        }
        let bad = |reason: String| ConvertError::Layer {
            digest: layer.digest.clone(),
            reason,
        };
        let blob = BufReader::new(store.open_blob(&Digest::parse(&layer.digest)?)?);
        let plain: Box<dyn Read> = match layer.media_type.as_str() {
            m if m.ends_with("gzip") => Box::new(flate2::read::GzDecoder::new(blob)),
            m if m.ends_with("zstd") => {
                Box::new(zstd::stream::read::Decoder::new(blob).map_err(|e| bad(e.to_string()))?)
            }
            m if m.ends_with("tar") || m == oci::DOCKER_LAYER => Box::new(blob),
            m => {
                return Err(bad(format!(
                    "media type {m} is not a layer this converter reads"
                )))
            }
        };
        let mut w = store.writer()?;
        let (written, reordered) = if prefetch.is_empty() {
            (
                write(plain, &mut w, opts).map_err(|e| bad(e.to_string()))?,
                false,
            )
        } else {
            // The tar is spooled to disk once to be read in the new order.
            let mut plain = plain;
            let mut spool = tempfile::tempfile().map_err(|e| bad(e.to_string()))?;
            std::io::copy(&mut plain, &mut spool).map_err(|e| bad(e.to_string()))?;
            let mut ordered = tempfile::tempfile().map_err(|e| bad(e.to_string()))?;
            let moved = super::reorder::reorder(&mut spool, &mut ordered, prefetch)
                .map_err(|e| bad(e.to_string()))?;
            ordered
                .seek(std::io::SeekFrom::Start(0))
                .map_err(|e| bad(e.to_string()))?;
            let w2 =
                write(BufReader::new(ordered), &mut w, opts).map_err(|e| bad(e.to_string()))?;
            (w2, moved > 0)
        };
        let digest = w.commit(None)?;
        if reordered {
            config.rootfs.diff_ids[i] = written.diff_id.clone();
        } else if original_diff_ids.get(i) != Some(&written.diff_id) {
            return Err(bad(format!(
                "its tar hashes to {}, not the config's diff_id {:?}: the image is corrupt",
                written.diff_id,
                original_diff_ids.get(i)
            )));
        }
        *layer = Descriptor {
            media_type: MEDIA_LAYER_ZSTD.into(),
            digest: digest.to_string(),
            size: written.size,
            annotations: written.annotations,
            platform: None,
        };
    }
    if config.rootfs.diff_ids != original_diff_ids {
        out.config = oci::put_json(store, &manifest.config.media_type, &config)?;
    }
    Ok(out)
}
