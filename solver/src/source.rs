//! Source ops, by kind: what each puts in its cache key and what it yields. The scheduler asks
//! these questions of an op and never looks at its identifier.
//!
//! - `docker-image://REF`: keyed by the op (a pinned digest) or, unpinned (from an external
//!   frontend), by the digest the tag names now; runs by unpacking the image.
//! - `local://NAME`: the build context, keyed by the checksum of the files its include patterns
//!   select; yields the context without running.
//! - `http(s)://URL`: keyed by the downloaded content (fetched once into the content store);
//!   yields the file without running.

use std::collections::BTreeMap;

use crate::llb::SourceOp;
use crate::worker::{tree, Context, Ref, Worker, WorkerError};

/// A source op, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Image(String),
    Local {
        patterns: Vec<String>,
    },
    Http {
        url: String,
        checksum: Option<String>,
    },
}

/// What a source contributes to its cache key, and its result when it needs no run.
pub struct Keyed {
    pub checksum: String,
    pub ready: Option<Ref>,
}

impl Source {
    pub fn of(op: &SourceOp) -> Result<Source, WorkerError> {
        let id = op.identifier.as_str();
        if let Some(r) = id.strip_prefix("docker-image://") {
            return Ok(Source::Image(r.to_string()));
        }
        if id.starts_with("local://") {
            return Ok(Source::Local {
                patterns: patterns(&op.attrs),
            });
        }
        if id.starts_with("http://") || id.starts_with("https://") {
            let checksum = op.attrs.get("checksum").cloned();
            return Ok(Source::Http {
                url: id.to_string(),
                checksum,
            });
        }
        Err(WorkerError::Image(format!(
            "source {id} is not supported by this version"
        )))
    }

    /// Whether finding its key is work worth showing (a download).
    pub fn fetches(&self) -> bool {
        matches!(self, Source::Http { .. })
    }

    /// Its cache key's content part (blocking: may read the context or download).
    pub fn key(&self, worker: &Worker, context: Option<&Context>) -> Result<Keyed, WorkerError> {
        Ok(match self {
            Source::Image(r) if !r.contains('@') => Keyed {
                checksum: worker.image_digest(r)?,
                ready: None,
            },
            Source::Image(_) => Keyed {
                checksum: String::new(),
                ready: None,
            },
            Source::Local { patterns } => {
                let ctx =
                    context.ok_or_else(|| WorkerError::Copy("this build has no context".into()))?;
                let src = tree::Source {
                    root: &ctx.dir,
                    ignore: Some(&ctx.ignore),
                };
                let checksum = src
                    .checksum(patterns, &ctx.digests)
                    .map_err(|e| WorkerError::Copy(format!("read build context: {e}")))?;
                Keyed {
                    checksum,
                    ready: Some(Ref::Context),
                }
            }
            Source::Http { url, checksum } => {
                let digest = worker.fetch_url(url, checksum.as_deref())?;
                let ready = Some(Ref::Http {
                    digest: digest.clone(),
                    name: file_name(url),
                });
                Keyed {
                    checksum: digest,
                    ready,
                }
            }
        })
    }

    /// Runs it (only images need to: their layers are unpacked into snapshots).
    pub fn run(&self, worker: &Worker) -> Result<Ref, WorkerError> {
        let Source::Image(r) = self else {
            return Err(WorkerError::Exec(
                "this source yields without running".into(),
            ));
        };
        let digest = worker.image_digest(r)?;
        Ok(match worker.unpack(&digest)? {
            Some(top) => Ref::Snapshot(top),
            None => Ref::Scratch,
        })
    }
}

/// The include patterns of a local source; none means the whole context, as in BuildKit.
fn patterns(attrs: &BTreeMap<String, String>) -> Vec<String> {
    attrs
        .get("includepatterns")
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or_else(|| vec![String::new()])
}

/// The name a download gets from its URL (query and fragment left out).
fn file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or("");
    path.rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("index.html")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_by_kind() {
        let op = |id: &str| SourceOp {
            identifier: id.into(),
            attrs: Default::default(),
        };
        assert_eq!(
            Source::of(&op("docker-image://busybox")).unwrap(),
            Source::Image("busybox".into())
        );
        assert_eq!(
            Source::of(&op("local://context")).unwrap(),
            Source::Local {
                patterns: vec![String::new()]
            }
        );
        assert!(Source::of(&op("git://example.com/repo")).is_err());
        assert_eq!(
            file_name("https://example.com/a/b.tar.gz?x=1#f"),
            "b.tar.gz"
        );
        assert_eq!(file_name("https://example.com/"), "index.html");
    }
}
