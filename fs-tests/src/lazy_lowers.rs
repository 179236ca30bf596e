//! `STRATA_LAZY_LOWERS=1`: the lower layers the conformance suite builds with [`Snap::layer`]
//! become lazy layers — each diffed, written as zstd:chunked, pushed to a private registry and
//! prepared as a remote snapshot — so every check that reads them reads through FUSE.
//!
//! [`Snap::layer`]: crate::daemon::Snap::layer

use std::collections::HashMap;
use std::path::PathBuf;

use strata_image::chunked::{write, MEDIA_LAYER_ZSTD};
use strata_image::content::Digest;
use strata_image::labels;
use strata_image::layer::{self, DiffOptions};
use strata_image::oci::{self, Descriptor, ImageConfig, Manifest, RootFs};
use strata_image::registry::{Client, Options, Reference};
use strata_snapshotter::api::types::Mount;

use crate::registry::Registry;

pub struct LazyLowers {
    registry: Registry,
    client: Client,
    pushed: usize,
}

/// Whether this run asks for lazy lowers.
pub fn wanted() -> bool {
    std::env::var_os("STRATA_LAZY_LOWERS").is_some_and(|v| v != "0")
}

/// The directory an active snapshot's changes land in: the overlay upper, or a bind's source.
fn upper(mounts: &[Mount]) -> PathBuf {
    let m = &mounts[0];
    m.options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(&m.source))
}

impl LazyLowers {
    pub fn new() -> LazyLowers {
        LazyLowers {
            registry: Registry::start(),
            client: Client::new(Options::default()),
            pushed: 0,
        }
    }

    /// Pushes the changes of the active snapshot mounted by `mounts` as a one-layer
    /// zstd:chunked image; returns the labels that prepare it remotely as `target`.
    pub fn push(&mut self, mounts: &[Mount], target: &str) -> HashMap<String, String> {
        let mut tar = Vec::new();
        layer::diff(&upper(mounts), &mut tar, DiffOptions { mtime_max: None }).unwrap();
        let mut blob = Vec::new();
        let opts = write::Options {
            chunk_size: 64 << 10,
            ..Default::default()
        };
        let w = write::write(&tar[..], &mut blob, opts).unwrap();
        self.pushed += 1;
        let r = Reference::parse(&format!(
            "{}/strata/lower:{}",
            self.registry.host, self.pushed
        ))
        .unwrap();
        self.client.push_blob(&r, &w.digest, &blob).unwrap();
        let config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: vec![w.diff_id.clone()],
            },
            ..Default::default()
        };
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = Digest::of(&config_bytes).to_string();
        self.client
            .push_blob(&r, &config_digest, &config_bytes)
            .unwrap();
        let manifest = Manifest {
            schema_version: 2,
            media_type: oci::MEDIA_MANIFEST.into(),
            config: Descriptor {
                media_type: oci::MEDIA_CONFIG.into(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                annotations: Default::default(),
                platform: None,
            },
            layers: vec![Descriptor {
                media_type: MEDIA_LAYER_ZSTD.into(),
                digest: w.digest.clone(),
                size: w.size,
                annotations: w.annotations,
                platform: None,
            }],
        };
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = self
            .client
            .push_manifest(&r, &bytes, oci::MEDIA_MANIFEST)
            .unwrap();
        HashMap::from([
            (labels::TARGET.to_string(), target.to_string()),
            (labels::IMAGE_REF.to_string(), r.to_string()),
            (labels::MANIFEST.to_string(), manifest_digest),
            (labels::LAYER.to_string(), w.digest),
        ])
    }
}

impl Default for LazyLowers {
    fn default() -> Self {
        LazyLowers::new()
    }
}
