//! The local image store: image names → manifests in the content store, loading OCI layout
//! archives, and unpacking an image's layers into a chain of committed snapshots (one per layer,
//! named by chain ID, shared by every image and build that has the same layers).

use std::collections::BTreeMap;
use std::path::Path;

use strata_image::content::{Digest, Hashing};
use strata_image::layer;
use strata_image::nonce;
use strata_image::oci::{self, Descriptor, ImageConfig, Index, Manifest};
use strata_image::registry::Reference;
use strata_image::transfer;

use super::{Worker, WorkerError};
use crate::db::{now, ImageRecord, LayerRecord};
use crate::dockerfile::convert::ImageResolver;
use crate::spec::InvalidSpec;

/// Docker's reference normalization: `busybox` → `docker.io/library/busybox:latest`.
pub fn normalize(reference: &str) -> String {
    let (name, suffix) = match reference.split_once('@') {
        Some((n, d)) => (n.to_string(), format!("@{d}")),
        None => {
            let slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
            match reference[slash..].rfind(':') {
                Some(c) => (
                    reference[..slash + c].to_string(),
                    format!(":{}", &reference[slash + c + 1..]),
                ),
                None => (reference.to_string(), ":latest".to_string()),
            }
        }
    };
    let first = name.split('/').next().unwrap_or("");
    let has_domain =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_domain {
        name
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}{suffix}")
}

/// `name` normalized (`docker.io/library/...:latest`), or why it is no image reference: names
/// from archives and flags are checked before they are stored or printed (no `..`, no control
/// characters, the distribution spec's grammar).
pub fn checked_name(name: &str) -> Result<String, InvalidSpec> {
    strata_image::registry::Reference::parse(name)
        .map(|r| r.to_string())
        .map_err(|_| {
            InvalidSpec(format!(
                "{:?} is not a valid image reference (lowercase name components, a tag of letters, digits, '_', '.', '-')",
                name.escape_debug().to_string()
            ))
        })
}

impl Worker {
    /// Loads an OCI image layout archive; returns the names it stored. An archive with a bad
    /// name, a missing blob or a wrong size is refused whole: no image and no blob of it is kept.
    pub fn load_archive(&self, path: &Path) -> Result<Vec<String>, WorkerError> {
        let f = std::fs::File::open(path)
            .map_err(|e| WorkerError::Image(format!("open {}: {e}", path.display())))?;
        let images = oci::read_layout_archive(&self.content, f)
            .map_err(|e| WorkerError::Image(format!("{}: {e}", path.display())))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let mut records = Vec::new();
        for img in images {
            let name = match img.name {
                Some(n) if n.contains('/') || n.contains(':') && !n.starts_with(':') => n,
                Some(tag) => format!("{stem}:{tag}"),
                None => continue,
            };
            records.push(ImageRecord {
                name: checked_name(&name)
                    .map_err(|e| WorkerError::Image(format!("{}: {e}", path.display())))?,
                manifest: img.manifest,
                created: now(),
            });
        }
        if records.is_empty() {
            return Err(WorkerError::Image(format!(
                "{}: no named image in the archive's index.json",
                path.display()
            )));
        }
        for r in &records {
            self.db.put_image(r)?;
        }
        Ok(records.into_iter().map(|r| r.name).collect())
    }

    /// Loads the image tagged `tag` (or the only one) of the OCI layout directory `dir` and names
    /// it `name` in the local store.
    pub fn load_layout_dir(
        &self,
        dir: &Path,
        tag: Option<&str>,
        name: &str,
    ) -> Result<String, WorkerError> {
        let images = oci::read_layout_dir(&self.content, dir)?;
        let chosen = match tag {
            Some(t) => images
                .into_iter()
                .find(|i| i.name.as_deref() == Some(t))
                .ok_or_else(|| WorkerError::Image(format!("no image tagged {t}")))?,
            None if images.len() == 1 => images.into_iter().next().expect("one"),
            None => {
                return Err(WorkerError::Image(format!(
                    "the layout holds {} images: name one with :TAG",
                    images.len()
                )))
            }
        };
        let name = normalize(name);
        self.db.put_image(&ImageRecord {
            name: name.clone(),
            manifest: chosen.manifest,
            created: now(),
        })?;
        Ok(name)
    }

    /// Downloads blob `blob` of repository `r` into the content store unless it is there,
    /// verified against its digest.
    pub fn fetch_blob(&self, r: &Reference, blob: &Descriptor) -> Result<(), WorkerError> {
        transfer::fetch_blob(&self.registry, r, &self.content, blob).map_err(image_error)
    }

    /// The linux/amd64 manifest `r` names (resolving an index), stored.
    pub fn fetch_manifest(&self, r: &Reference) -> Result<Manifest, WorkerError> {
        let (_, m) =
            transfer::fetch_manifest(&self.registry, r, &self.content).map_err(image_error)?;
        Ok(m)
    }

    /// Pulls `reference` from its registry into the local store (linux/amd64 of an index).
    pub fn pull(&self, reference: &str) -> Result<String, WorkerError> {
        let r = Reference::parse(reference)?;
        let (desc, _) = transfer::pull(&self.registry, &r, &self.content).map_err(image_error)?;
        let name = normalize(reference);
        self.db.put_image(&ImageRecord {
            name: name.clone(),
            manifest: desc,
            created: now(),
        })?;
        Ok(name)
    }

    /// Pushes the image `manifest` (from the local content store, in the form it is to have:
    /// see [`crate::form`]) to `reference`.
    pub fn push(&self, reference: &str, manifest: &Descriptor) -> Result<(), WorkerError> {
        let r = Reference::parse(reference)?;
        let d = Digest::parse(&manifest.digest).map_err(|e| WorkerError::Image(e.to_string()))?;
        let m: Manifest = serde_json::from_slice(&self.content.read(&d)?)
            .map_err(|e| WorkerError::Image(format!("manifest {d}: {e}")))?;
        transfer::push(&self.registry, &r, &self.content, &m).map_err(image_error)?;
        Ok(())
    }

    /// Base images as a build resolves them (pulled first when `pull`).
    pub fn resolver(&self, pull: bool) -> Resolver<'_> {
        Resolver { worker: self, pull }
    }

    /// The manifest of `reference` (for linux/amd64 when it names an index), pulled when the
    /// local store does not have it.
    pub fn manifest(&self, reference: &str) -> Result<(Descriptor, Manifest), WorkerError> {
        self.manifest_pulled(reference, false)
    }

    /// [`Worker::manifest`], pulled first when `pull` (`--pull`) even if the store has it.
    pub fn manifest_pulled(
        &self,
        reference: &str,
        pull: bool,
    ) -> Result<(Descriptor, Manifest), WorkerError> {
        let name = normalize(reference);
        if pull || self.db.image(&name)?.is_none() {
            if let Err(e) = self.pull(reference) {
                if self.db.image(&name)?.is_none() {
                    return Err(WorkerError::Image(format!(
                        "image {name} is not in the local store and pulling it failed: {e}; load it with `strata images load IMAGE.tar`, build it with -t, or check the registry"
                    )));
                }
            }
        }
        let record = self
            .db
            .image(&name)?
            .ok_or_else(|| WorkerError::Image(format!("image {name} is not in the local store")))?;
        let mut desc = record.manifest;
        let digest = Digest::parse(&desc.digest).map_err(|e| WorkerError::Image(e.to_string()))?;
        let bytes = self.content.read(&digest)?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| WorkerError::Image(format!("manifest of {name}: {e}")))?;
        if value.get("manifests").is_some() {
            let index: Index = serde_json::from_value(value)
                .map_err(|e| WorkerError::Image(format!("index of {name}: {e}")))?;
            desc = index
                .manifests
                .into_iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .ok_or_else(|| {
                    WorkerError::Image(format!("image {name} has no linux/amd64 manifest"))
                })?;
        }
        let manifest: Manifest = oci::read_json(
            &self.content,
            &Digest::parse(&desc.digest).map_err(|e| WorkerError::Image(e.to_string()))?,
        )?;
        Ok((desc, manifest))
    }

    pub fn config(&self, manifest: &Manifest) -> Result<ImageConfig, WorkerError> {
        let d = Digest::parse(&manifest.config.digest)
            .map_err(|e| WorkerError::Image(e.to_string()))?;
        Ok(oci::read_json(&self.content, &d)?)
    }

    /// Unpacks the image with manifest `manifest_digest` into snapshots; returns the top one (or
    /// `None` for an image without layers).
    pub fn unpack(&self, manifest_digest: &str) -> Result<Option<String>, WorkerError> {
        let d = Digest::parse(manifest_digest).map_err(|e| WorkerError::Image(e.to_string()))?;
        let manifest: Manifest = oci::read_json(&self.content, &d)?;
        let config = self.config(&manifest)?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(WorkerError::Image(format!(
                "image {manifest_digest}: {} layers but {} diff_ids in its config",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let layers: Vec<(Descriptor, String)> = manifest
            .layers
            .into_iter()
            .zip(config.rootfs.diff_ids)
            .collect();
        Ok(self.unpack_chain(&layers)?.pop())
    }

    /// Applies `layers` (blobs in the content store, with their diff_ids; lowest first) as the
    /// snapshots `layer/<chain ID>`, skipping those that exist; returns every snapshot's key.
    pub fn unpack_chain(
        &self,
        layers: &[(Descriptor, String)],
    ) -> Result<Vec<String>, WorkerError> {
        let mut chain = String::new();
        let mut keys: Vec<String> = Vec::new();
        for (layer, diff_id) in layers {
            chain = oci::chain_id(&chain, diff_id);
            let key = format!("layer/{chain}");
            if self.snapshots.stat(&key).is_err() {
                // Applied straight into the new snapshot's own directory: no mount needed.
                self.apply_layer(keys.last().map(String::as_str), &key, layer, diff_id)?;
                self.db.put_layer(
                    &key,
                    &LayerRecord {
                        diff_id: diff_id.clone(),
                        blob: layer.clone(),
                    },
                )?;
            }
            keys.push(key);
        }
        Ok(keys)
    }

    fn apply_layer(
        &self,
        parent: Option<&str>,
        key: &str,
        layer: &Descriptor,
        diff_id: &str,
    ) -> Result<(), WorkerError> {
        if self.snapshots.stat(key).is_ok() {
            return Ok(());
        }
        let active = format!("tmp/{}", nonce());
        self.snapshots
            .prepare(&active, parent.unwrap_or(""), BTreeMap::new())?;
        let result = (|| -> Result<(), WorkerError> {
            let dir = self.snapshots.dir(&active)?;
            let plain = crate::form::open_layer(self, layer)?;
            let mut reader = Hashing::new(plain);
            layer::apply(&mut reader, &dir)?;
            std::io::copy(&mut reader, &mut std::io::sink())
                .map_err(|e| WorkerError::Image(format!("read layer {}: {e}", layer.digest)))?;
            let actual = reader.digest();
            if actual.as_str() != diff_id {
                return Err(WorkerError::Image(format!(
                    "layer {} unpacks to {actual}, not its diff_id {diff_id}: the image is corrupt",
                    layer.digest
                )));
            }
            Ok(())
        })();
        match result.and_then(|()| {
            self.snapshots
                .commit(key, &active, BTreeMap::new())
                .map_err(Into::into)
        }) {
            Ok(()) => Ok(()),
            Err(WorkerError::Snapshot(strata_snapshotter::Error::AlreadyExists(_))) => {
                let _ = self.snapshots.remove(&active);
                Ok(())
            }
            Err(e) => {
                let _ = self.snapshots.remove(&active);
                Err(e)
            }
        }
    }
}

fn image_error(e: transfer::ImageError) -> WorkerError {
    match e {
        transfer::ImageError::Registry(r) => r.into(),
        other => WorkerError::Image(other.to_string()),
    }
}

impl Worker {
    /// The manifest digest of an image source: the pinned `REF@DIGEST`, or what `REF` names in
    /// the local store (pulled when missing).
    pub fn image_digest(&self, reference: &str) -> Result<String, WorkerError> {
        match reference.rsplit_once('@') {
            Some((_, d)) if d.starts_with("sha256:") => Ok(d.to_string()),
            _ => Ok(self.manifest(reference)?.0.digest),
        }
    }
}

/// Base images as a build resolves them: from the store, pulled when missing or when the
/// build asked to `pull`.
pub struct Resolver<'a> {
    pub worker: &'a Worker,
    pub pull: bool,
}

impl ImageResolver for Resolver<'_> {
    fn resolve(&self, reference: &str) -> Result<(String, ImageConfig), String> {
        let (desc, manifest) = self
            .worker
            .manifest_pulled(reference, self.pull)
            .map_err(|e| e.to_string())?;
        let config = self.worker.config(&manifest).map_err(|e| e.to_string())?;
        Ok((desc.digest, config))
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn docker_normalization() {
        assert_eq!(normalize("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(normalize("user/app:1"), "docker.io/user/app:1");
        assert_eq!(normalize("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(normalize("quay.io/a/b@sha256:00"), "quay.io/a/b@sha256:00");
        assert_eq!(
            normalize("docker.io/strata/busybox:1"),
            "docker.io/strata/busybox:1"
        );
    }
}
