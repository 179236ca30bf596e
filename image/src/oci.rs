//! OCI image types (manifest, index, config) and OCI image layout archives.
//!
//! Field names follow the image spec; the config keeps Docker's capitalised names so `docker load`
//! and containerd read it unchanged.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::content::{ContentError, ContentStore, Digest};

pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

/// The runtime part of an image config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    /// ONBUILD triggers, run by builds that use this image as their base.
    #[serde(default, rename = "OnBuild", skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created_by: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub config: RunConfig,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    /// A build cache of the image's own layers, in BuildKit's key (base64 of its JSON).
    #[serde(
        rename = "moby.buildkit.cache.v0",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub inline_cache: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("OCI layout archive: {0}")]
    Archive(String),
    #[error("image refused: {0}")]
    Invalid(String),
}

/// The largest manifest, index or config read into memory (containerd's limit for manifests).
pub const MAX_JSON_BLOB: u64 = 4 << 20;

/// Reads a JSON blob of type `T` from the store.
pub fn read_json<T: serde::de::DeserializeOwned>(
    store: &ContentStore,
    digest: &Digest,
) -> Result<T, OciError> {
    let size = store.size(digest)?;
    if size > MAX_JSON_BLOB {
        return Err(OciError::Invalid(format!(
            "blob {digest} is {size} bytes, more than the {} MiB a manifest, index or config may have",
            MAX_JSON_BLOB >> 20
        )));
    }
    let bytes = store.read(digest)?;
    serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
        what: format!("blob {digest}"),
        source,
    })
}

/// Stores `value` as JSON and returns its descriptor.
pub fn put_json<T: Serialize>(
    store: &ContentStore,
    media_type: &str,
    value: &T,
) -> Result<Descriptor, OciError> {
    let bytes = serde_json::to_vec(value).expect("OCI types always serialize");
    let digest = store.put(&bytes)?;
    Ok(Descriptor {
        media_type: media_type.into(),
        digest: digest.to_string(),
        size: bytes.len() as u64,
        annotations: BTreeMap::new(),
        platform: None,
    })
}

/// Writes an OCI image layout archive holding `manifest` (and every blob it names, from `store`)
/// under the name `name` (e.g. `docker.io/library/app:latest`). `mtime` stamps the tar entries.
pub fn write_layout_archive(
    store: &ContentStore,
    manifest: &Descriptor,
    name: &str,
    mtime: u64,
    out: impl Write,
) -> Result<(), OciError> {
    let tag = name
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let mut desc = manifest.clone();
    desc.annotations
        .insert(ANNOTATION_IMAGE_NAME.into(), name.into());
    desc.annotations
        .insert(ANNOTATION_REF_NAME.into(), tag.into());
    write_layout(store, desc, &HashSet::new(), mtime, out)?;
    Ok(())
}

/// An OCI image layout tar whose index lists `manifest` (with its annotations), holding the
/// blobs it reaches except those in `skip`; `index.json` comes last, once its blobs are there.
/// Returns how many blobs it left out.
pub fn write_layout(
    store: &ContentStore,
    manifest: Descriptor,
    skip: &HashSet<String>,
    mtime: u64,
    out: impl Write,
) -> Result<usize, OciError> {
    let m: Manifest = read_json(store, &Digest::parse(&manifest.digest)?)?;
    let mut tar = tar::Builder::new(out);
    let mut add = |path: &str, reader: &mut dyn Read, size: u64| -> Result<(), OciError> {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_size(size);
        tar.append_data(&mut h, path, reader)
            .map_err(|e| OciError::Archive(e.to_string()))
    };
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    add("oci-layout", &mut &layout[..], layout.len() as u64)?;
    let mut blobs = vec![manifest.digest.clone(), m.config.digest.clone()];
    blobs.extend(m.layers.iter().map(|l| l.digest.clone()));
    blobs.dedup();
    let all = blobs.len();
    blobs.retain(|b| !skip.contains(b));
    let left_out = all - blobs.len();
    for blob in blobs {
        let digest = Digest::parse(&blob)?;
        let size = store.size(&digest)?;
        let mut f = store.open_blob(&digest)?;
        add(&format!("blobs/sha256/{}", digest.hex()), &mut f, size)?;
    }
    let index = Index {
        schema_version: 2,
        media_type: MEDIA_INDEX.into(),
        manifests: vec![manifest],
    };
    let index = serde_json::to_vec(&index).expect("index serializes");
    add("index.json", &mut &index[..], index.len() as u64)?;
    tar.into_inner()
        .map_err(|e| OciError::Archive(e.to_string()))?;
    Ok(left_out)
}

/// An image found in a layout archive.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    pub name: Option<String>,
    pub manifest: Descriptor,
}

/// Reads an OCI image layout archive into `store` (verifying every blob against its name) and
/// returns the images its index lists.
pub fn read_layout_archive(
    store: &ContentStore,
    input: impl Read,
) -> Result<Vec<LayoutImage>, OciError> {
    let mut added = Vec::new();
    let result = read_archive_blobs(store, input, &mut added).and_then(|index| {
        for m in &index.manifests {
            check_name(m)?;
            walk_image(store, m, &mut |d| check_blob(store, d))?;
        }
        Ok(index)
    });
    let index = match result {
        Ok(index) => index,
        Err(e) => {
            // Refused: leave the store as it was.
            for d in &added {
                let _ = store.remove(d);
            }
            return Err(e);
        }
    };
    Ok(index
        .manifests
        .into_iter()
        .map(|m| LayoutImage {
            name: m
                .annotations
                .get(ANNOTATION_IMAGE_NAME)
                .or_else(|| m.annotations.get(ANNOTATION_REF_NAME))
                .cloned(),
            manifest: m,
        })
        .collect())
}

/// Stores every `blobs/sha256/*` of the archive (each checked against its name), recording the
/// ones that were not in the store before in `added`; returns the archive's `index.json`.
pub fn read_archive_blobs(
    store: &ContentStore,
    input: impl Read,
    added: &mut Vec<Digest>,
) -> Result<Index, OciError> {
    let mut archive = tar::Archive::new(input);
    let mut index: Option<Index> = None;
    let bad = |e: std::io::Error| OciError::Archive(e.to_string());
    for entry in archive.entries().map_err(bad)? {
        let mut e = entry.map_err(bad)?;
        let path = e.path().map_err(bad)?.display().to_string();
        let path = path.trim_start_matches("./").to_string();
        if path == "index.json" {
            let mut buf = Vec::new();
            (&mut e)
                .take(MAX_JSON_BLOB + 1)
                .read_to_end(&mut buf)
                .map_err(bad)?;
            index = Some(
                serde_json::from_slice(&buf).map_err(|source| OciError::Json {
                    what: "index.json".into(),
                    source,
                })?,
            );
        } else if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            if hex.is_empty() {
                continue;
            }
            let digest = Digest::parse(&format!("sha256:{hex}"))?;
            if !store.has(&digest) {
                added.push(digest.clone());
            }
            store.put_reader(&mut e, Some(&digest))?;
        }
    }
    index.ok_or_else(|| OciError::Archive("no index.json: not an OCI image layout".into()))
}

/// The image name an index entry carries (a reference, or a bare tag) is one: never a path trick
/// or control characters that would reach a terminal.
fn check_name(m: &Descriptor) -> Result<(), OciError> {
    for key in [ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME] {
        if let Some(n) = m.annotations.get(key) {
            if !crate::registry::valid_tag(n) && crate::registry::Reference::parse(n).is_err() {
                return Err(OciError::Invalid(format!(
                    "its name {:?} is not a valid image reference",
                    n.escape_debug().to_string()
                )));
            }
        }
    }
    Ok(())
}

/// The blob `d` describes is in the store with the size `d` gives.
fn check_blob(store: &ContentStore, d: &Descriptor) -> Result<(), OciError> {
    let digest = Digest::parse(&d.digest)?;
    let size = store.size(&digest).map_err(|_| {
        OciError::Invalid(format!(
            "it names blob {} ({}), which it does not contain",
            d.digest, d.media_type
        ))
    })?;
    if size != d.size {
        return Err(OciError::Invalid(format!(
            "its descriptor of blob {} says {} bytes, the blob has {size}",
            d.digest, d.size
        )));
    }
    Ok(())
}

/// Visits every descriptor the image `m` reaches (an index's manifests, each manifest's config
/// and layers), calling `blob` on each before reading it.
fn walk_image(
    store: &ContentStore,
    m: &Descriptor,
    blob: &mut dyn FnMut(&Descriptor) -> Result<(), OciError>,
) -> Result<(), OciError> {
    blob(m)?;
    let value: serde_json::Value = read_json(store, &Digest::parse(&m.digest)?)?;
    let manifests: Vec<Descriptor> = match value.get("manifests") {
        Some(list) => serde_json::from_value(list.clone()).map_err(|source| OciError::Json {
            what: format!("index {}", m.digest),
            source,
        })?,
        None => vec![m.clone()],
    };
    // An index may list platforms whose manifests were left out (`ctr export` without
    // --all-platforms): those are skipped, but one at least must be there, and whole.
    let mut missing = None;
    let mut whole = 0;
    for child in &manifests {
        if child.digest != m.digest {
            if let Err(e) = blob(child) {
                missing = Some(e);
                continue;
            }
        }
        let man: Manifest = read_json(store, &Digest::parse(&child.digest)?)?;
        blob(&man.config)?;
        for l in &man.layers {
            blob(l)?;
        }
        whole += 1;
    }
    match missing {
        Some(e) if whole == 0 => Err(e),
        _ => Ok(()),
    }
}

/// Reads an OCI image layout directory (`oci-layout`, `index.json`, `blobs/`) into `store`,
/// verifying every blob the index reaches, and returns the images its index lists.
pub fn read_layout_dir(
    store: &ContentStore,
    dir: &std::path::Path,
) -> Result<Vec<LayoutImage>, OciError> {
    // Never through a symlink: the directory may be a copy of someone else's.
    let open = |rel: &std::path::Path| {
        crate::fsutil::open_beneath(dir, rel, nix::fcntl::OFlag::O_RDONLY).map(std::fs::File::from)
    };
    let index_path = dir.join("index.json");
    let mut bytes = Vec::new();
    open(std::path::Path::new("index.json"))
        .and_then(|f| f.take(MAX_JSON_BLOB + 1).read_to_end(&mut bytes))
        .map_err(|e| {
            OciError::Archive(format!(
                "{}: {e}: not an OCI image layout",
                index_path.display()
            ))
        })?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
        what: index_path.display().to_string(),
        source,
    })?;
    let mut blob = |d: &Descriptor| -> Result<(), OciError> {
        let digest = Digest::parse(&d.digest)?;
        if !store.has(&digest) {
            let f = open(&std::path::Path::new("blobs/sha256").join(digest.hex()))
                .map_err(|e| OciError::Archive(format!("blob {}: {e}", d.digest)))?;
            store.put_reader(f, Some(&digest))?;
        }
        check_blob(store, d)
    };
    let mut images = Vec::new();
    for m in index.manifests {
        walk_image(store, &m, &mut blob)?;
        images.push(LayoutImage {
            name: m
                .annotations
                .get(ANNOTATION_REF_NAME)
                .or_else(|| m.annotations.get(ANNOTATION_IMAGE_NAME))
                .cloned(),
            manifest: m,
        });
    }
    Ok(images)
}

/// RFC 3339 (UTC) of unix seconds, as image configs and containerd labels write times.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The chain ID of a layer whose parent chain is `parent` ("" for the first layer): the diffID
/// itself for the first, else sha256 of "<parent> <diff_id>", as the image spec defines it.
pub fn chain_id(parent: &str, diff_id: &str) -> String {
    if parent.is_empty() {
        diff_id.to_string()
    } else {
        Digest::of(format!("{parent} {diff_id}").as_bytes()).to_string()
    }
}
