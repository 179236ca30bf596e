//! Reading a Docker data root as dockerd lays it out, whatever its storage driver: the layer store
//! (`image/<driver>/layerdb`), the image store (`imagedb`, `repositories.json`) and containers
//! (`containers/<id>/config.v2.json`, `layerdb/mounts/<id>`). Never writes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The storage drivers this tool knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Aufs,
    Overlay,
    Devicemapper,
    Overlay2,
}

impl Driver {
    pub fn dir_name(self) -> &'static str {
        match self {
            Driver::Aufs => "aufs",
            Driver::Overlay => "overlay",
            Driver::Devicemapper => "devicemapper",
            Driver::Overlay2 => "overlay2",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataRootError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a Docker data root: it has no image/<driver>/layerdb; pass the directory dockerd uses (--data-root, /var/lib/docker by default)")]
    NotDataRoot(PathBuf),
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn read(path: &Path) -> Result<String, DataRootError> {
    fs::read_to_string(path).map_err(|source| DataRootError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// One image layer of the layer store.
#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    pub chain_id: String,
    pub diff_id: String,
    pub parent: Option<String>,
    /// The driver's directory id.
    pub cache_id: String,
    pub size: u64,
    pub has_tar_split: bool,
}

/// A container's read-write layer and its config.
#[derive(Debug, Clone, Serialize)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
    pub driver: String,
    pub running: bool,
    pub mount_id: Option<String>,
    pub init_id: Option<String>,
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Image {
    pub id: String,
    pub tags: Vec<String>,
    pub diff_ids: Vec<String>,
}

/// What a data root holds.
#[derive(Debug, Clone, Serialize)]
pub struct DataRoot {
    pub path: PathBuf,
    pub driver: Driver,
    pub layers: Vec<Layer>,
    pub images: Vec<Image>,
    pub containers: Vec<Container>,
}

fn sha_dirs(dir: &Path) -> Result<Vec<String>, DataRootError> {
    let mut out = Vec::new();
    match fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd.flatten() {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(DataRootError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    out.sort();
    Ok(out)
}

fn opt(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl DataRoot {
    /// Reads the data root at `path`.
    pub fn open(path: &Path) -> Result<DataRoot, DataRootError> {
        let image_dir = path.join("image");
        let driver = [
            Driver::Aufs,
            Driver::Overlay,
            Driver::Devicemapper,
            Driver::Overlay2,
        ]
        .into_iter()
        .find(|d| image_dir.join(d.dir_name()).join("layerdb").is_dir())
        .ok_or_else(|| DataRootError::NotDataRoot(path.to_path_buf()))?;
        DataRoot::open_driver(path, driver)
    }

    /// Reads the stores of `driver` in the data root at `path`.
    pub fn open_driver(path: &Path, driver: Driver) -> Result<DataRoot, DataRootError> {
        let store = path.join("image").join(driver.dir_name());
        if !store.join("layerdb").is_dir() {
            return Err(DataRootError::NotDataRoot(path.to_path_buf()));
        }
        let mut layers = Vec::new();
        let layerdb = store.join("layerdb/sha256");
        for chain in sha_dirs(&layerdb)? {
            let d = layerdb.join(&chain);
            let diff_id = read(&d.join("diff"))?.trim().to_string();
            let cache_id = read(&d.join("cache-id"))?.trim().to_string();
            let size = opt(&d.join("size"))
                .map(|s| {
                    s.parse().map_err(|_| DataRootError::Corrupt {
                        path: d.join("size"),
                        reason: format!("{s:?} is not a number"),
                    })
                })
                .transpose()?
                .unwrap_or(0);
            layers.push(Layer {
                chain_id: format!("sha256:{chain}"),
                diff_id,
                parent: opt(&d.join("parent")),
                cache_id,
                size,
                has_tar_split: d.join("tar-split.json.gz").is_file(),
            });
        }
        let repos: serde_json::Value = match fs::read(store.join("repositories.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| DataRootError::Corrupt {
                path: store.join("repositories.json"),
                reason: e.to_string(),
            })?,
            Err(_) => serde_json::json!({}),
        };
        let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Some(repos) = repos.get("Repositories").and_then(|r| r.as_object()) {
            for refs in repos.values().filter_map(|v| v.as_object()) {
                for (name, id) in refs {
                    if let Some(id) = id.as_str() {
                        tags.entry(id.to_string()).or_default().push(name.clone());
                    }
                }
            }
        }
        let mut images = Vec::new();
        let content = store.join("imagedb/content/sha256");
        for id in sha_dirs(&content)? {
            let p = content.join(&id);
            let config: serde_json::Value =
                serde_json::from_str(&read(&p)?).map_err(|e| DataRootError::Corrupt {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
            let diff_ids = config["rootfs"]["diff_ids"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let id = format!("sha256:{id}");
            images.push(Image {
                tags: tags.remove(&id).unwrap_or_default(),
                id,
                diff_ids,
            });
        }
        let mut containers = Vec::new();
        let cdir = path.join("containers");
        for id in sha_dirs(&cdir)? {
            let p = cdir.join(&id).join("config.v2.json");
            let Ok(text) = fs::read_to_string(&p) else {
                continue;
            };
            let c: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| DataRootError::Corrupt {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
            let mounts = store.join("layerdb/mounts").join(&id);
            containers.push(Container {
                name: c["Name"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches('/')
                    .to_string(),
                image: c["Image"].as_str().unwrap_or("").to_string(),
                driver: c["Driver"].as_str().unwrap_or("").to_string(),
                running: c["State"]["Running"].as_bool().unwrap_or(false),
                mount_id: opt(&mounts.join("mount-id")),
                init_id: opt(&mounts.join("init-id")),
                parent: opt(&mounts.join("parent")),
                id,
            });
        }
        Ok(DataRoot {
            path: path.to_path_buf(),
            driver,
            layers,
            images,
            containers,
        })
    }

    /// The layer store directory of this driver.
    pub fn store(&self) -> PathBuf {
        self.path.join("image").join(self.driver.dir_name())
    }

    /// The tar-split file dockerd keeps for layer `chain`, to rebuild its original tar.
    pub fn tar_split(&self, chain: &str) -> PathBuf {
        self.store()
            .join("layerdb/sha256")
            .join(chain.trim_start_matches("sha256:"))
            .join("tar-split.json.gz")
    }

    /// Layers ordered so that every parent comes before its children.
    pub fn layers_parents_first(&self) -> Vec<&Layer> {
        let mut out: Vec<&Layer> = Vec::new();
        let mut placed = std::collections::HashSet::new();
        while out.len() < self.layers.len() {
            let before = out.len();
            for l in &self.layers {
                if !placed.contains(&l.chain_id)
                    && l.parent
                        .as_ref()
                        .is_none_or(|p| placed.contains(p) || self.layer(p).is_none())
                {
                    placed.insert(l.chain_id.clone());
                    out.push(l);
                }
            }
            if out.len() == before {
                break;
            }
        }
        out
    }

    /// Whether `chain` is in the layer store.
    pub fn layer(&self, chain: &str) -> Option<&Layer> {
        self.layers.iter().find(|l| l.chain_id == chain)
    }
}
