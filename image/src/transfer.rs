//! Whole images between a registry and a content store: pull (an index resolves to its
//! linux/amd64 manifest; every blob verified by digest) and push (blobs, then the manifest).
//! Shared by `strata images pull|push`, `strata-snapshotter convert` and lazy pulls.

use crate::content::{ContentStore, Digest};
use crate::oci::{self, Descriptor, Index, Manifest};
use crate::registry::{Client, Reference, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Content(#[from] crate::content::ContentError),
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error("{0}")]
    Invalid(String),
}

/// The linux/amd64 manifest of `r` (resolving an index): its bytes and descriptor, stored.
pub fn fetch_manifest(
    client: &Client,
    r: &Reference,
    store: &ContentStore,
) -> Result<(Descriptor, Manifest), ImageError> {
    let (bytes, media, digest) = client.manifest(r)?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::Invalid(format!("manifest of {r}: {e}")))?;
    let (bytes, media, digest) = if value.get("manifests").is_some() {
        let index: Index = serde_json::from_value(value)
            .map_err(|e| ImageError::Invalid(format!("index of {r}: {e}")))?;
        let m = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| ImageError::Invalid(format!("{r} has no linux/amd64 image")))?;
        client.manifest(&r.with_digest(&m.digest))?
    } else {
        (bytes, media, digest)
    };
    let d = Digest::parse(&digest).map_err(|e| ImageError::Invalid(e.to_string()))?;
    store.put_reader(&bytes[..], Some(&d))?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::Invalid(format!("manifest of {r}: {e}")))?;
    let desc = Descriptor {
        media_type: if media.is_empty() {
            oci::MEDIA_MANIFEST.to_string()
        } else {
            media
        },
        digest,
        size: bytes.len() as u64,
        annotations: Default::default(),
        platform: None,
    };
    Ok((desc, manifest))
}

/// Downloads blob `blob` of `r` into `store` unless it is there, verified against its digest.
pub fn fetch_blob(
    client: &Client,
    r: &Reference,
    store: &ContentStore,
    blob: &Descriptor,
) -> Result<(), ImageError> {
    let d = Digest::parse(&blob.digest).map_err(|e| ImageError::Invalid(e.to_string()))?;
    if store.has(&d) {
        return Ok(());
    }
    let mut w = store.writer()?;
    client.blob(r, &blob.digest, &mut w)?;
    w.commit(Some(&d))?;
    Ok(())
}

/// Pulls the image `r` (manifest, config, layers) into `store`.
pub fn pull(
    client: &Client,
    r: &Reference,
    store: &ContentStore,
) -> Result<(Descriptor, Manifest), ImageError> {
    let (desc, manifest) = fetch_manifest(client, r, store)?;
    for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
        fetch_blob(client, r, store, blob)?;
    }
    Ok((desc, manifest))
}

/// Pushes `manifest` (as its media type) and every blob it names from `store` to `r`.
pub fn push(
    client: &Client,
    r: &Reference,
    store: &ContentStore,
    manifest: &Manifest,
) -> Result<String, ImageError> {
    for blob in manifest
        .layers
        .iter()
        .chain(std::iter::once(&manifest.config))
    {
        let d = Digest::parse(&blob.digest).map_err(|e| ImageError::Invalid(e.to_string()))?;
        client.push_blob(r, &blob.digest, &store.read(&d)?)?;
    }
    let bytes = serde_json::to_vec(manifest).expect("manifest serializes");
    let d = Digest::of(&bytes);
    store.put_reader(&bytes[..], Some(&d))?;
    // Sent as what it is: a registry refuses a Docker manifest sent as OCI's.
    let media_type = match manifest.media_type.as_str() {
        "" => oci::MEDIA_MANIFEST,
        m => m,
    };
    Ok(client.push_manifest(r, &bytes, media_type)?)
}
