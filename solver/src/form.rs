//! The form an image takes in an output: how its layers are compressed and which media-type
//! family its manifest uses. A manifest uses one family — OCI types in an OCI manifest, Docker
//! types in a Docker v2 schema 2 manifest — as skopeo, docker and containerd expect; a base
//! layer's blob stays the same bytes whatever its descriptor is called.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use strata_image::chunked;
use strata_image::content::Digest;
use strata_image::oci::{self, Descriptor, Manifest};

use crate::db::LayerRecord;
use crate::spec::InvalidSpec;
use crate::worker::{Worker, WorkerError};

const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const MEDIA_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Uncompressed,
    Gzip,
    Zstd,
    /// zstd:chunked: zstd frames per file and a TOC, which lazy pulls mount from the registry
    /// (its media type is plain zstd's; only an output asks for it).
    ZstdChunked,
    /// eStargz: gzip members per file and a TOC inside the tar (a gzip media type; only an
    /// output asks for it).
    Estargz,
}

impl Compression {
    /// The compression a layer media type names (either family).
    pub fn of(media_type: &str) -> Option<Compression> {
        match media_type {
            oci::MEDIA_LAYER | oci::DOCKER_LAYER => Some(Compression::Uncompressed),
            oci::MEDIA_LAYER_GZIP | DOCKER_LAYER_GZIP => Some(Compression::Gzip),
            MEDIA_LAYER_ZSTD => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// The form of an output's image: BuildKit's `compression`, `compression-level` and
/// `oci-mediatypes` keys, and `prefetch=FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerForm {
    /// What new (uncompressed) layers become; base layers keep their blobs.
    pub compression: Compression,
    /// The compressor's level (default: gzip 1, chosen for speed as most of an export's time is
    /// gzip; zstd 3).
    pub level: Option<u32>,
    /// OCI media types (else Docker's).
    pub oci: bool,
    /// Recompress base layers too (`force-compression=true`).
    pub force: bool,
    /// `prefetch=FILE` (zstd:chunked): every layer, base layers too, rewritten with the files
    /// FILE lists first, so that a lazy pull fetches them first. The client reads FILE.
    pub prefetch: Option<String>,
}

impl LayerForm {
    /// gzip layers in an OCI manifest: archives, the local store's pushes, registries.
    pub const OCI: LayerForm = LayerForm {
        compression: Compression::Gzip,
        level: None,
        oci: true,
        force: false,
        prefetch: None,
    };
    /// gzip layers in a Docker manifest: what `docker load` gets.
    pub const DOCKER: LayerForm = LayerForm {
        oci: false,
        ..LayerForm::OCI
    };

    /// Whether `key` is one of this form's `--output` keys.
    pub fn is_key(key: &str) -> bool {
        matches!(
            key,
            "compression"
                | "compression-level"
                | "oci-mediatypes"
                | "force-compression"
                | "prefetch"
        )
    }

    /// Takes `key=value` when it is one of this form's keys; false when it is not.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, InvalidSpec> {
        match key {
            "compression" => {
                self.compression = match value {
                    "gzip" => Compression::Gzip,
                    "uncompressed" => Compression::Uncompressed,
                    "zstd" => Compression::Zstd,
                    "zstd:chunked" => Compression::ZstdChunked,
                    "estargz" => Compression::Estargz,
                    other => return Err(format!("--output compression={other}: use gzip, zstd, zstd:chunked, estargz or uncompressed").into()),
                }
            }
            "compression-level" => {
                let level = value.parse().ok().filter(|l| *l <= 22);
                let fix = || format!("--output compression-level={value}: use 0-9 for gzip, 1-22 for zstd");
                self.level = Some(level.ok_or_else(fix)?);
            }
            "force-compression" => {
                self.force = match value {
                    "true" => true,
                    "false" => false,
                    other => return Err(format!("--output force-compression={other}: use true or false").into()),
                }
            }
            "prefetch" => self.prefetch = Some(value.to_string()),
            "oci-mediatypes" => {
                self.oci = match value {
                    "true" => true,
                    "false" => false,
                    other => return Err(format!("--output oci-mediatypes={other}: use true or false").into()),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The media type of a layer compressed as `c`, in this form's family.
    fn layer_type(&self, c: Compression) -> Result<&'static str, String> {
        Ok(match (c, self.oci) {
            (Compression::Uncompressed, true) => oci::MEDIA_LAYER,
            (Compression::Uncompressed, false) => oci::DOCKER_LAYER,
            (Compression::Gzip | Compression::Estargz, true) => oci::MEDIA_LAYER_GZIP,
            (Compression::Gzip | Compression::Estargz, false) => DOCKER_LAYER_GZIP,
            (Compression::Zstd | Compression::ZstdChunked, true) => MEDIA_LAYER_ZSTD,
            (Compression::Zstd | Compression::ZstdChunked, false) => {
                return Err("a zstd layer has no Docker media type: use oci-mediatypes=true".into())
            }
        })
    }
}

/// The image of `manifest` in `form`: new layers compressed (in parallel, each once per level
/// and remembered), every descriptor in the form's family; with a `prefetch` list (the paths of
/// `form.prefetch`), every layer rewritten as zstd:chunked with those files first.
pub fn apply(
    worker: &Worker,
    manifest: &Descriptor,
    form: &LayerForm,
    prefetch: &[String],
) -> Result<Descriptor, WorkerError> {
    let digest = Digest::parse(&manifest.digest).map_err(|e| WorkerError::Image(e.to_string()))?;
    let mut m: Manifest = oci::read_json(&worker.content, &digest)?;
    let estargz = form.compression == Compression::Estargz;
    if estargz || !prefetch.is_empty() {
        m = lazy_layers(worker, &m, form, prefetch)?;
    }
    m.layers = layers(worker, &m.layers, form)?;
    let (manifest_type, config_type) = match form.oci {
        true => (oci::MEDIA_MANIFEST, oci::MEDIA_CONFIG),
        false => (oci::DOCKER_MANIFEST, DOCKER_CONFIG),
    };
    m.media_type = manifest_type.into();
    m.config.media_type = config_type.into();
    let mut desc = oci::put_json(&worker.content, manifest_type, &m)?;
    desc.platform = manifest.platform.clone();
    Ok(desc)
}

/// The layers of `m` rewritten by the lazy-pull writer: eStargz (new layers, or every layer
/// with `force-compression`), or zstd:chunked with `prefetch`'s files first (every layer: each
/// puts the listed files it holds first).
fn lazy_layers(
    worker: &Worker,
    m: &Manifest,
    form: &LayerForm,
    prefetch: &[String],
) -> Result<Manifest, WorkerError> {
    use strata_image::chunked::{convert, write};
    let (format, default_level) = match form.compression {
        Compression::Estargz => (write::Format::Estargz, 1),
        _ => (write::Format::ZstdChunked, 3),
    };
    let opts = write::Options {
        level: form.level.map_or(default_level, |l| l as i32),
        format,
        ..Default::default()
    };
    let all = form.force || !prefetch.is_empty();
    convert::convert(&worker.content, m, opts, prefetch, all, &|_, _, _| {}).map_err(|e| {
        let what = form.prefetch.as_deref().map(|p| format!("prefetch={p}: "));
        WorkerError::Image(format!("{}{e}", what.unwrap_or_default()))
    })
}

/// `layers` in `form`.
pub(crate) fn layers(
    worker: &Worker,
    layers: &[Descriptor],
    form: &LayerForm,
) -> Result<Vec<Descriptor>, WorkerError> {
    let compress = |l: &Descriptor| -> Result<Descriptor, WorkerError> {
        let unknown = || {
            WorkerError::Image(format!(
                "layer {} has media type {}, which this version cannot export",
                l.digest, l.media_type
            ))
        };
        let have = Compression::of(&l.media_type).ok_or_else(unknown)?;
        let mut out = if needs_recompression(have, form) {
            recompress(worker, l, have, form)?
        } else {
            l.clone()
        };
        let now = Compression::of(&out.media_type).ok_or_else(unknown)?;
        let named = form.layer_type(now);
        out.media_type = named
            .map_err(|e| WorkerError::Image(format!("layer {}: {e}", l.digest)))?
            .into();
        Ok(out)
    };
    // gzip is the slow part of an export: one thread per layer, as many at once as there are CPUs.
    let width = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut out = Vec::with_capacity(layers.len());
    for batch in layers.chunks(width) {
        let done: Vec<_> = std::thread::scope(|s| {
            let running: Vec<_> = batch.iter().map(|l| s.spawn(|| compress(l))).collect();
            running.into_iter().map(|t| t.join()).collect()
        });
        for d in done {
            out.push(
                d.map_err(|_| WorkerError::Image("a layer compression thread panicked".into()))??,
            );
        }
    }
    Ok(out)
}

/// The tar of `layer` (a blob in the store, compressed as `have`), decompressed as it is read.
pub(crate) fn open_tar(
    worker: &Worker,
    layer: &Descriptor,
    have: Compression,
) -> Result<Box<dyn Read + Send>, WorkerError> {
    let digest = Digest::parse(&layer.digest).map_err(|e| WorkerError::Image(e.to_string()))?;
    let src = std::io::BufReader::new(worker.content.open_blob(&digest)?);
    Ok(match have {
        Compression::Uncompressed => Box::new(src),
        // Every member: an eStargz layer is one gzip member per file.
        Compression::Gzip | Compression::Estargz => {
            Box::new(flate2::read::MultiGzDecoder::new(src))
        }
        Compression::Zstd | Compression::ZstdChunked => Box::new(
            zstd::Decoder::with_buffer(src)
                .map_err(|e| WorkerError::Image(format!("layer {}: {e}", layer.digest)))?,
        ),
    })
}

/// [`open_tar`] for a layer named by its media type.
pub(crate) fn open_layer(
    worker: &Worker,
    layer: &Descriptor,
) -> Result<Box<dyn Read + Send>, WorkerError> {
    let have = Compression::of(&layer.media_type).ok_or_else(|| {
        WorkerError::Image(format!(
            "layer {} has media type {}, which this version cannot unpack",
            layer.digest, layer.media_type
        ))
    })?;
    open_tar(worker, layer, have)
}

/// Whether a layer compressed as `have` is written anew: new (uncompressed) layers always take
/// the output's compression; base layers only with `force-compression=true`.
fn needs_recompression(have: Compression, form: &LayerForm) -> bool {
    let same = match form.compression {
        // A zstd:chunked base layer is zstd too, an eStargz one gzip: kept unless forced.
        Compression::ZstdChunked => have == Compression::Zstd,
        Compression::Estargz => have == Compression::Gzip,
        c => have == c,
    };
    !same && (have == Compression::Uncompressed || form.force)
}

/// Layer `layer` (compressed as `have`) in the form's compression, made once per compression and
/// level and remembered. The uncompressed tar, and so the diff ID, stays the same.
fn recompress(
    worker: &Worker,
    layer: &Descriptor,
    have: Compression,
    form: &LayerForm,
) -> Result<Descriptor, WorkerError> {
    let target = form.compression;
    let level = form.level.unwrap_or(match target {
        Compression::Gzip => 1,
        _ => 3,
    });
    let key = format!("{target:?}{level}:{}", layer.digest);
    let parse = |d: &str| Digest::parse(d).map_err(|e| WorkerError::Image(e.to_string()));
    if let Some(rec) = worker.db.layer(&key)? {
        if worker.content.has(&parse(&rec.blob.digest)?) {
            return Ok(rec.blob);
        }
    }
    let fail =
        |e: std::io::Error| WorkerError::Image(format!("compress layer {}: {e}", layer.digest));
    let tar = open_tar(worker, layer, have)?;
    let mut w = worker.content.writer()?;
    let annotations = encode(tar, &mut w, target, level).map_err(fail)?;
    let digest = w.commit(None)?;
    let media = LayerForm::OCI
        .layer_type(target)
        .expect("OCI names every compression");
    let blob = Descriptor {
        media_type: media.into(),
        digest: digest.to_string(),
        size: worker.content.size(&digest)?,
        annotations,
        platform: None,
    };
    let record = LayerRecord {
        diff_id: layer.digest.clone(),
        blob: blob.clone(),
    };
    worker.db.put_layer(&key, &record)?;
    Ok(blob)
}

/// Writes the layer tar `tar` to `out` compressed as `target`; returns the descriptor
/// annotations the format needs (zstd:chunked's TOC position and checksums).
fn encode(
    mut tar: Box<dyn Read>,
    out: &mut impl Write,
    target: Compression,
    level: u32,
) -> std::io::Result<BTreeMap<String, String>> {
    match target {
        Compression::Uncompressed => {
            std::io::copy(&mut tar, out)?;
        }
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(level.min(9)));
            std::io::copy(&mut tar, &mut gz)?;
            gz.finish()?;
        }
        Compression::Zstd => {
            let mut z = zstd::Encoder::new(out, level as i32)?;
            std::io::copy(&mut tar, &mut z)?;
            z.finish()?;
        }
        Compression::ZstdChunked => {
            let opts = chunked::write::Options {
                level: level as i32,
                ..Default::default()
            };
            let written = chunked::write::write(tar, out, opts).map_err(std::io::Error::other)?;
            return Ok(written.annotations);
        }
        // Its diff_id differs from the tar's: written by the converter, with the config.
        Compression::Estargz => {
            return Err(std::io::Error::other(
                "eStargz layers are written with the image (lazy_layers), not one by one",
            ))
        }
    }
    Ok(BTreeMap::new())
}

/// `desc` named in the OCI family (the same blob): how the local store keeps every image.
pub fn oci_layer(mut desc: Descriptor) -> Descriptor {
    let oci = LayerForm::OCI;
    if let Some(name) = Compression::of(&desc.media_type).and_then(|c| oci.layer_type(c).ok()) {
        desc.media_type = name.into();
    }
    desc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_families() {
        let mut f = LayerForm::OCI;
        assert!(f.set("compression", "uncompressed").unwrap());
        assert!(f.set("compression-level", "9").unwrap());
        assert!(f.set("oci-mediatypes", "false").unwrap());
        assert!(!f.set("dest", "x").unwrap());
        assert_eq!(
            (f.compression, f.level, f.oci),
            (Compression::Uncompressed, Some(9), false)
        );
        let e = f.set("compression", "lz4").unwrap_err();
        assert!(
            e.0.contains("use gzip, zstd, zstd:chunked, estargz or uncompressed"),
            "{e}"
        );
        assert!(f.set("compression-level", "23").is_err());
        assert_eq!(
            LayerForm::DOCKER.layer_type(Compression::Gzip).unwrap(),
            DOCKER_LAYER_GZIP
        );
        assert!(LayerForm::DOCKER.layer_type(Compression::Zstd).is_err());
        let docker = Descriptor {
            media_type: DOCKER_LAYER_GZIP.into(),
            digest: "sha256:x".into(),
            size: 1,
            annotations: Default::default(),
            platform: None,
        };
        assert_eq!(oci_layer(docker).media_type, oci::MEDIA_LAYER_GZIP);
    }
}
