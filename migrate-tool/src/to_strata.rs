//! `migrate --to strata`: every tagged image of the (migrated) overlay2 store, imported into
//! containerd through its API and unpacked into the Strata snapshotter, so `ctr run --snapshotter
//! strata` starts them at once. Layers are the exact original tars, rebuilt from the overlay2 diffs
//! with tar-split and checked against their diffIDs; configs are dockerd's own bytes, so image IDs
//! stay the same.

use std::path::Path;

use strata_image::content::{ContentStore, Digest};
use strata_image::oci::{self, Descriptor, Manifest};

use crate::dataroot::{DataRoot, Driver};
use crate::error::MigrateError;
use crate::tarsplit;

fn refused(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Refused(e.to_string())
}

/// Docker's short names as containerd spells them: `app:1` is `docker.io/library/app:1`.
fn full_name(tag: &str) -> String {
    let first = tag.split('/').next().unwrap_or("");
    if tag.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost") {
        tag.to_string()
    } else if tag.contains('/') {
        format!("docker.io/{tag}")
    } else {
        format!("docker.io/library/{tag}")
    }
}

/// Imports the images of `data_root` (already on overlay2) into containerd at `address`,
/// unpacked into `snapshotter`. Returns the names imported.
pub fn import(
    data_root: &Path,
    address: &Path,
    namespace: &str,
    snapshotter: &str,
    work: &Path,
) -> Result<Vec<String>, MigrateError> {
    let root = DataRoot::open_driver(data_root, Driver::Overlay2)
        .map_err(|e| refused(format!("{e}: run migrate first")))?;
    let store = ContentStore::open(work).map_err(refused)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(refused)?;
    let mut names = Vec::new();
    for image in root.images.iter().filter(|i| !i.tags.is_empty()) {
        let config_path = root
            .store()
            .join("imagedb/content/sha256")
            .join(image.id.trim_start_matches("sha256:"));
        let config_bytes = std::fs::read(&config_path).map_err(refused)?;
        let config = store.put(&config_bytes).map_err(refused)?;
        let mut layers = Vec::new();
        let mut chain = String::new();
        for diff_id in &image.diff_ids {
            chain = oci::chain_id(&chain, diff_id);
            let layer = root
                .layer(&chain)
                .ok_or_else(|| refused(format!("image {}: layer {chain} is missing", image.id)))?;
            let split = root.tar_split(&chain);
            let entries = tarsplit::read(&split).map_err(refused)?;
            let mut w = store.writer().map_err(refused)?;
            let size = tarsplit::assemble(
                &entries,
                &data_root
                    .join("overlay2")
                    .join(&layer.cache_id)
                    .join("diff"),
                &mut w,
            )
            .map_err(refused)?;
            let expected = Digest::parse(diff_id).map_err(refused)?;
            w.commit(Some(&expected))
                .map_err(|e| refused(format!("layer {chain}: {e}")))?;
            layers.push(Descriptor {
                media_type: oci::DOCKER_LAYER.into(),
                digest: diff_id.clone(),
                size,
                annotations: Default::default(),
                platform: None,
            });
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: oci::DOCKER_MANIFEST.into(),
            config: Descriptor {
                media_type: "application/vnd.docker.container.image.v1+json".into(),
                digest: config.to_string(),
                size: config_bytes.len() as u64,
                annotations: Default::default(),
                platform: None,
            },
            layers,
        };
        let desc = oci::put_json(&store, oci::DOCKER_MANIFEST, &manifest).map_err(refused)?;
        for tag in &image.tags {
            let name = full_name(tag);
            runtime
                .block_on(strata_image::containerd::import(
                    &store,
                    &desc,
                    &name,
                    address,
                    namespace,
                    Some(snapshotter),
                ))
                .map_err(refused)?;
            names.push(name);
        }
    }
    Ok(names)
}
