//! The inode tree of a lazy layer, persisted in a RocksDB of the layer's own
//! (`lazy/index/`), so that the serving process holds none of it whole in memory and a
//! restarted server opens it without reading the TOC again. Built once from the TOC
//! ([`Index::build`]); the `meta` key is written last, so an interrupted build starts over.
//!
//! Keys: `n` + ino (u64, big-endian) → the node (JSON, without children); `c` + parent ino +
//! name → child ino; `p` + path → ino; `meta` → counts.

use std::path::Path;

use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::index::{Index, Kind, Node};
use strata_image::chunked::toc::Toc;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Meta {
    nodes: u64,
    total_bytes: u64,
    #[serde(default)]
    prefetch_end: Option<u64>,
}

pub struct Nodes {
    db: DB,
    pub count: u64,
    pub total_bytes: u64,
    /// Where the layer's prefetch area (files put first for this) ends in the blob.
    pub prefetch_end: Option<u64>,
}

fn node_key(ino: u64) -> Vec<u8> {
    let mut k = vec![b'n'];
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

fn child_prefix(parent: u64) -> Vec<u8> {
    let mut k = vec![b'c'];
    k.extend_from_slice(&parent.to_be_bytes());
    k
}

fn path_key(path: &str) -> Vec<u8> {
    let mut k = vec![b'p'];
    k.extend_from_slice(path.as_bytes());
    k
}

fn ino_of(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

impl Nodes {
    /// Opens the tree under `dir`, building it from `toc` first when it is not complete.
    pub fn open_or_build(
        dir: &Path,
        toc: impl FnOnce() -> anyhow::Result<Toc>,
    ) -> anyhow::Result<Nodes> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, dir)?;
        let meta: Option<Meta> = db
            .get(b"meta")?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let meta = match meta {
            Some(m) => m,
            None => {
                let toc = toc()?;
                let index = Index::build(&toc);
                let mut batch = WriteBatch::default();
                for (i, n) in index.nodes.iter().enumerate() {
                    let ino = i as u64 + 1;
                    batch.put(node_key(ino), serde_json::to_vec(n)?);
                    for (name, child) in &n.children {
                        let mut k = child_prefix(ino);
                        k.extend_from_slice(name.as_bytes());
                        batch.put(k, child.to_be_bytes());
                    }
                    if n.kind == Kind::File {
                        batch.put(path_key(&n.path), ino.to_be_bytes());
                    }
                }
                let meta = Meta {
                    nodes: index.nodes.len() as u64,
                    total_bytes: index.total_bytes,
                    prefetch_end: toc.prefetch_end,
                };
                batch.put(b"meta", serde_json::to_vec(&meta)?);
                // No WAL and no flush here: the build is repeated if it is lost (no `meta`), and
                // a server's start waits for this. [`Nodes::persist`] flushes it later.
                let mut quick = WriteOptions::default();
                quick.disable_wal(true);
                db.write_opt(batch, &quick)?;
                meta
            }
        };
        Ok(Nodes {
            db,
            count: meta.nodes,
            total_bytes: meta.total_bytes,
            prefetch_end: meta.prefetch_end,
        })
    }

    /// Writes a fresh build to disk (it is in memory until then, or until RocksDB flushes).
    pub fn persist(&self) -> anyhow::Result<()> {
        Ok(self.db.flush()?)
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        let v = self.db.get(node_key(ino)).ok()??;
        serde_json::from_slice(&v).ok()
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        let mut k = child_prefix(parent);
        k.extend_from_slice(name.as_bytes());
        ino_of(&self.db.get(k).ok()??)
    }

    /// The entries of directory `ino`, by name.
    pub fn children(&self, ino: u64) -> Vec<(String, u64)> {
        let prefix = child_prefix(ino);
        self.db
            .iterator(IteratorMode::From(&prefix, Direction::Forward))
            .map_while(|kv| kv.ok())
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, v)| {
                Some((
                    String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                    ino_of(&v)?,
                ))
            })
            .collect()
    }

    /// The inode of the regular file at `path`.
    pub fn file(&self, path: &str) -> Option<u64> {
        ino_of(&self.db.get(path_key(path)).ok()??)
    }

    /// Every regular file's inode, in TOC order.
    pub fn files(&self) -> Vec<u64> {
        self.db
            .iterator(IteratorMode::From(b"n", Direction::Forward))
            .map_while(|kv| kv.ok())
            .take_while(|(k, _)| k.first() == Some(&b'n'))
            .filter_map(|(k, v)| {
                let n: Node = serde_json::from_slice(&v).ok()?;
                (n.kind == Kind::File).then(|| ino_of(&k[1..]))?
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_image::chunked::toc::Entry;

    #[test]
    fn persisted_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let e = |kind: &str, name: &str| Entry {
            kind: kind.into(),
            name: name.into(),
            mode: 0o644,
            ..Default::default()
        };
        let toc = Toc {
            version: 1,
            prefetch_end: None,
            entries: vec![
                e("dir", "a/"),
                e("reg", "a/x"),
                e("reg", "a/y"),
                e("symlink", "l"),
            ],
        };
        let built = Nodes::open_or_build(dir.path(), || Ok(toc.clone())).unwrap();
        let a = built.child(super::super::index::ROOT, "a").unwrap();
        let names: Vec<String> = built.children(a).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["x", "y"]);
        assert_eq!(built.files().len(), 2);
        assert_eq!(built.node(built.file("a/y").unwrap()).unwrap().name, "y");
        drop(built);
        // A second open does not read the TOC.
        let again = Nodes::open_or_build(dir.path(), || anyhow::bail!("TOC read again")).unwrap();
        assert_eq!(again.count, 5, "root, a, x, y, l");
    }
}
