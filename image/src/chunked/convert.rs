//! Converting an image's layers to zstd:chunked or eStargz (`strata-snapshotter convert`, and
//! build outputs): each layer is decompressed and rewritten frame by frame (member by member).
//! zstd:chunked keeps the tar bytes, so the config (diff_ids) is unchanged and only the manifest
//! is new; eStargz adds its TOC to the tar, so the config is new too.

use std::io::{BufReader, Read, Seek};

use super::estargz::is_estargz;
use super::read::is_chunked_descriptor;
use super::reorder::reorder;
use super::write::{write, Format, Options, Written};
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

/// Converts the layers of `manifest` (with their blobs in `store`) to `opts.format`: every layer
/// with `all`, else only the uncompressed ones (new layers; base layers keep their blobs); a
/// layer already in the format is kept. With a `prefetch` list (paths in the order a workload
/// reads them), those files go first in their layers. zstd:chunked keeps a layer's diff_id
/// unless its files were reordered; eStargz always changes it (its TOC is in the tar); a changed
/// diff_id makes a new config. `progress(i, n, digest)` is called before layer `i` of `n`.
/// Returns the new manifest.
pub fn convert(
    store: &ContentStore,
    manifest: &Manifest,
    opts: Options,
    prefetch: &[String],
    all: bool,
    progress: &dyn Fn(usize, usize, &str),
) -> Result<Manifest, ConvertError> {
    let mut config: ImageConfig = oci::read_json(store, &Digest::parse(&manifest.config.digest)?)?;
    let original_diff_ids = config.rootfs.diff_ids.clone();
    let mut out = manifest.clone();
    out.media_type = oci::MEDIA_MANIFEST.into();
    for (i, layer) in out.layers.iter_mut().enumerate() {
        progress(i, manifest.layers.len(), &layer.digest);
        let done = match opts.format {
            Format::ZstdChunked => is_chunked_descriptor(layer),
            Format::Estargz => is_estargz(&layer.annotations),
        };
        let plain = layer.media_type.ends_with(".tar") || layer.media_type == oci::DOCKER_LAYER;
        if done || !(all || plain) {
            continue;
        }
        let bad = |reason: String| ConvertError::Layer {
            digest: layer.digest.clone(),
            reason,
        };
        let tar = open_tar(store, layer).map_err(|e| bad(e.to_string()))?;
        let mut w = store.writer()?;
        let (written, reordered) = write_layer(tar, &mut w, opts, prefetch).map_err(bad)?;
        let digest = w.commit(None)?;
        if reordered || opts.format == Format::Estargz {
            config.rootfs.diff_ids[i] = written.diff_id.clone();
        } else if original_diff_ids.get(i) != Some(&written.diff_id) {
            return Err(bad(format!(
                "its tar hashes to {}, not the config's diff_id {:?}: the image is corrupt",
                written.diff_id,
                original_diff_ids.get(i)
            )));
        }
        *layer = Descriptor {
            media_type: match opts.format {
                Format::ZstdChunked => MEDIA_LAYER_ZSTD.into(),
                Format::Estargz => oci::MEDIA_LAYER_GZIP.into(),
            },
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

/// The tar of `layer`, decompressed as it is read.
fn open_tar(store: &ContentStore, layer: &Descriptor) -> Result<Box<dyn Read>, String> {
    let blob = BufReader::new(
        store
            .open_blob(&Digest::parse(&layer.digest).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?,
    );
    Ok(match layer.media_type.as_str() {
        m if m.ends_with("gzip") => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        m if m.ends_with("zstd") => {
            Box::new(zstd::stream::read::Decoder::new(blob).map_err(|e| e.to_string())?)
        }
        m if m.ends_with("tar") || m == oci::DOCKER_LAYER => Box::new(blob),
        m => {
            return Err(format!(
                "media type {m} is not a layer this converter reads"
            ))
        }
    })
}

/// Writes `tar` in `opts.format` to `w`, the files `prefetch` lists first (the tar is spooled to
/// disk once to be read in the new order); whether any moved.
fn write_layer(
    tar: Box<dyn Read>,
    w: &mut impl std::io::Write,
    mut opts: Options,
    prefetch: &[String],
) -> Result<(Written, bool), String> {
    if prefetch.is_empty() {
        return Ok((write(tar, w, opts).map_err(|e| e.to_string())?, false));
    }
    let e = |e: std::io::Error| e.to_string();
    let mut tar = tar;
    let mut spool = tempfile::tempfile().map_err(e)?;
    std::io::copy(&mut tar, &mut spool).map_err(e)?;
    let mut ordered = tempfile::tempfile().map_err(e)?;
    let moved = reorder(&mut spool, &mut ordered, prefetch).map_err(|e| e.to_string())?;
    ordered.seek(std::io::SeekFrom::Start(0)).map_err(e)?;
    opts.prefetched = moved.bytes;
    let written = write(BufReader::new(ordered), w, opts).map_err(|e| e.to_string())?;
    Ok((written, moved.entries > 0))
}
