//! The build caches this client keeps in directories (`--cache-to type=local,dest=DIR`,
//! `--cache-from type=local,src=DIR`): their specs with absolute paths (the builder keys its
//! copy of a directory by its full path), where each is, and the blobs a destination holds
//! already, which the builder then leaves out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::ClientError;
use crate::remote_cache::CacheSpec;
use crate::service::proto::CacheBlobs;

#[derive(Debug, Default)]
pub struct Caches {
    /// The `--cache-to` and `--cache-from` specs as the builder gets them.
    pub to: Vec<String>,
    pub from: Vec<String>,
    /// The directories of the `--cache-from type=local`s, by index.
    pub from_dirs: HashMap<u32, PathBuf>,
    /// The directories of the `--cache-to type=local`s, by index.
    pub to_dirs: HashMap<u32, PathBuf>,
    pub have: Vec<CacheBlobs>,
}

impl Caches {
    pub fn new(cache_to: &[String], cache_from: &[String]) -> Result<Caches, ClientError> {
        let cwd = std::env::current_dir().map_err(|source| ClientError::Io {
            what: "the current directory".into(),
            source,
        })?;
        let mut c = Caches::default();
        for (i, spec) in cache_to.iter().enumerate() {
            let spec = CacheSpec::absolute(spec, "--cache-to", &cwd)?;
            if let CacheSpec::Local { dir, .. } = CacheSpec::parse(&spec, "--cache-to")? {
                c.have.push(CacheBlobs {
                    index: i as u32,
                    digests: blobs(Path::new(&dir)),
                });
                c.to_dirs.insert(i as u32, dir.into());
            }
            c.to.push(spec);
        }
        for (i, spec) in cache_from.iter().enumerate() {
            let spec = CacheSpec::absolute(spec, "--cache-from", &cwd)?;
            if let CacheSpec::Local { dir, .. } = CacheSpec::parse(&spec, "--cache-from")? {
                c.from_dirs.insert(i as u32, dir.into());
            }
            c.from.push(spec);
        }
        Ok(c)
    }
}

/// The digests of the blobs in the layout at `dir` (none if it is not one yet).
fn blobs(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join("blobs/sha256")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|n| format!("sha256:{n}"))
        .collect()
}
