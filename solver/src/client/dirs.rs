//! The client's directories a build names besides its context — local caches
//! (`--cache-to type=local,dest=DIR`, `--cache-from type=local,src=DIR`) and OCI-layout build
//! contexts (`--build-context NAME=oci-layout://DIR`): their specs with absolute paths (the
//! builder keys its copy of a directory by its full path), where each is, and the blobs a cache
//! destination holds already, which the builder then leaves out. The builder can ask only for
//! these, by index.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::ClientError;
use crate::build::source::{parse_named, Named};
use crate::remote_cache::CacheSpec;
use crate::service::proto::CacheBlobs;

#[derive(Debug, Default)]
pub struct Dirs {
    /// The `--cache-to`, `--cache-from` and `--build-context` specs as the builder gets them.
    pub cache_to: Vec<String>,
    pub cache_from: Vec<String>,
    pub build_contexts: Vec<String>,
    /// Directories by the index of their spec.
    pub cache_to_dirs: HashMap<u32, PathBuf>,
    pub cache_from_dirs: HashMap<u32, PathBuf>,
    pub build_context_dirs: HashMap<u32, PathBuf>,
    pub have: Vec<CacheBlobs>,
}

impl Dirs {
    pub fn new(
        cache_to: &[String],
        cache_from: &[String],
        build_contexts: &[String],
    ) -> Result<Dirs, ClientError> {
        let cwd = std::env::current_dir().map_err(|source| ClientError::Io {
            what: "the current directory".into(),
            source,
        })?;
        let mut d = Dirs::default();
        for (i, spec) in cache_to.iter().enumerate() {
            let spec = CacheSpec::absolute(spec, "--cache-to", &cwd)?;
            if let CacheSpec::Local { dir, .. } = CacheSpec::parse(&spec, "--cache-to")? {
                d.have.push(CacheBlobs {
                    index: i as u32,
                    digests: blobs(Path::new(&dir)),
                });
                d.cache_to_dirs.insert(i as u32, dir.into());
            }
            d.cache_to.push(spec);
        }
        for (i, spec) in cache_from.iter().enumerate() {
            let spec = CacheSpec::absolute(spec, "--cache-from", &cwd)?;
            if let CacheSpec::Local { dir, .. } = CacheSpec::parse(&spec, "--cache-from")? {
                d.cache_from_dirs.insert(i as u32, dir.into());
            }
            d.cache_from.push(spec);
        }
        for (i, spec) in build_contexts.iter().enumerate() {
            let (name, named) = parse_named(spec).map_err(|e| ClientError::Input(e.to_string()))?;
            let Named::Layout { dir, tag } = named else {
                d.build_contexts.push(spec.clone());
                continue;
            };
            let full = cwd.join(dir);
            let tag = tag.map(|t| format!(":{t}")).unwrap_or_default();
            d.build_contexts
                .push(format!("{name}=oci-layout://{}{tag}", full.display()));
            d.build_context_dirs.insert(i as u32, full);
        }
        Ok(d)
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
