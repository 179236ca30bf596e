//! The inode tree of a lazy layer, built from its TOC: directories (implicit parents included),
//! hard links sharing one inode, and overlay's form of whiteouts (`.wh.NAME` becomes a 0/0
//! character device `NAME`; `.wh..wh..opq` marks its directory opaque).

use std::collections::BTreeMap;

use strata_image::chunked::toc::{clean, Chunk, Toc};

pub const ROOT: u64 = 1;
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Node {
    pub kind: Kind,
    pub name: String,
    pub parent: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub rdev: u32,
    pub nlink: u32,
    pub link: String,
    pub opaque: bool,
    /// Extended attributes, decoded.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Only while building: the persisted tree keeps children as keys of their own.
    #[serde(skip)]
    pub children: BTreeMap<String, u64>,
    /// Content chunks of a regular file, in file order.
    pub chunks: Vec<Chunk>,
    /// sha256 of a regular file's content (`sha256:...`); empty in indexes older than it.
    #[serde(default)]
    pub digest: String,
    /// The TOC name, for access-order records.
    pub path: String,
}

impl Node {
    /// A directory with default metadata (an implicit parent until its entry names it).
    fn dir(name: &str, parent: u64, path: &str) -> Node {
        Node {
            kind: Kind::Dir,
            name: name.to_string(),
            parent,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            rdev: 0,
            nlink: 2,
            link: String::new(),
            opaque: false,
            xattrs: BTreeMap::new(),
            children: BTreeMap::new(),
            chunks: Vec::new(),
            digest: String::new(),
            path: path.to_string(),
        }
    }
}

/// Inodes by number (`ino - 1` is the index).
#[derive(Debug)]
pub struct Index {
    pub nodes: Vec<Node>,
    pub total_bytes: u64,
}

fn parse_time(s: Option<&str>) -> i64 {
    s.and_then(rfc3339_seconds).unwrap_or(0)
}

/// Seconds of an RFC 3339 UTC time (`2024-01-02T03:04:05Z`, fractions and offsets tolerated).
fn rfc3339_seconds(t: &str) -> Option<i64> {
    let (date, rest) = t.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time: String = rest.chars().take(8).collect();
    let mut tp = time.split(':').map(|p| p.parse::<i64>());
    let (hh, mm, ss) = (tp.next()?.ok()?, tp.next()?.ok()?, tp.next()?.ok()?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

impl Index {
    pub fn build(toc: &Toc) -> Index {
        let mut nodes = vec![Node::dir("", ROOT, "")];
        let mut by_path: BTreeMap<String, u64> = BTreeMap::from([(String::new(), ROOT)]);
        let chunks = toc.chunks();
        let mut total = 0u64;

        fn dir_of(nodes: &mut Vec<Node>, by_path: &mut BTreeMap<String, u64>, path: &str) -> u64 {
            if let Some(i) = by_path.get(path) {
                return *i;
            }
            let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path));
            let parent = dir_of(nodes, by_path, parent_path);
            let ino = nodes.len() as u64 + 1;
            nodes.push(Node::dir(name, parent, path));
            nodes[parent as usize - 1]
                .children
                .insert(name.to_string(), ino);
            by_path.insert(path.to_string(), ino);
            ino
        }

        for (i, e) in toc.entries.iter().enumerate() {
            if e.kind == "chunk" {
                continue;
            }
            let path = clean(&e.name);
            if path.is_empty() || path == "." {
                // The layer's root directory itself.
                let root = &mut nodes[0];
                root.mode = e.mode;
                root.uid = e.uid;
                root.gid = e.gid;
                root.mtime = parse_time(e.modtime.as_deref());
                continue;
            }
            let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            let parent = dir_of(&mut nodes, &mut by_path, parent_path);
            if name == OPAQUE {
                nodes[parent as usize - 1].opaque = true;
                continue;
            }
            if e.kind == "hardlink" {
                let Some(&target) = by_path.get(&clean(&e.link_name)) else {
                    continue; // Checked before: cannot happen for a checked TOC.
                };
                nodes[target as usize - 1].nlink += 1;
                nodes[parent as usize - 1]
                    .children
                    .insert(name.to_string(), target);
                by_path.insert(path.clone(), target);
                continue;
            }
            let (name, kind, rdev) = match (name.strip_prefix(WHITEOUT_PREFIX), e.kind.as_str()) {
                (Some(hidden), _) => (hidden.to_string(), Kind::Char, 0),
                (None, "dir") => (name.to_string(), Kind::Dir, 0),
                (None, "reg") => (name.to_string(), Kind::File, 0),
                (None, "symlink") => (name.to_string(), Kind::Symlink, 0),
                (None, "char") => (
                    name.to_string(),
                    Kind::Char,
                    libc::makedev(e.dev_major, e.dev_minor) as u32,
                ),
                (None, "block") => (
                    name.to_string(),
                    Kind::Block,
                    libc::makedev(e.dev_major, e.dev_minor) as u32,
                ),
                (None, _) => (name.to_string(), Kind::Fifo, 0),
            };
            let xattrs = e
                .xattrs
                .iter()
                .filter_map(|(k, v)| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(v)
                        .ok()
                        .map(|b| (k.clone(), b))
                })
                .collect();
            let node_chunks = chunks.get(&i).cloned().unwrap_or_default();
            if kind == Kind::File {
                total += e.size;
            }
            let fields = |n: &mut Node| {
                n.mode = e.mode;
                n.uid = e.uid;
                n.gid = e.gid;
                n.mtime = parse_time(e.modtime.as_deref());
                n.xattrs = xattrs;
            };
            // A directory named again (implicit first, explicit later): keep its inode.
            if kind == Kind::Dir {
                let ino = dir_of(&mut nodes, &mut by_path, &path);
                fields(&mut nodes[ino as usize - 1]);
                continue;
            }
            let ino = nodes.len() as u64 + 1;
            let mut node = Node {
                kind,
                name: name.clone(),
                parent,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                size: if kind == Kind::File {
                    e.size
                } else if kind == Kind::Symlink {
                    e.link_name.len() as u64
                } else {
                    0
                },
                rdev,
                nlink: 1,
                link: if kind == Kind::Symlink {
                    e.link_name.clone()
                } else {
                    String::new()
                },
                opaque: false,
                xattrs: BTreeMap::new(),
                children: BTreeMap::new(),
                chunks: node_chunks,
                digest: if kind == Kind::File {
                    e.digest.clone()
                } else {
                    String::new()
                },
                path: path.clone(),
            };
            fields(&mut node);
            if rdev == 0 && kind == Kind::Char {
                node.mode = 0;
            }
            nodes.push(node);
            nodes[parent as usize - 1].children.insert(name, ino);
            by_path.insert(path, ino);
        }
        // Subdirectory counts for nlink, as on disk.
        let subdirs: Vec<(u64, u32)> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.kind == Kind::Dir)
            .map(|(i, n)| {
                let count = n
                    .children
                    .values()
                    .filter(|c| nodes[**c as usize - 1].kind == Kind::Dir)
                    .count() as u32;
                (i as u64 + 1, count)
            })
            .collect();
        for (ino, count) in subdirs {
            nodes[ino as usize - 1].nlink = 2 + count;
        }
        Index {
            nodes,
            total_bytes: total,
        }
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_image::chunked::toc::Entry;

    #[test]
    fn builds_dirs_links_and_overlay_whiteouts() {
        let e = |kind: &str, name: &str, link: &str| Entry {
            kind: kind.into(),
            name: name.into(),
            link_name: link.into(),
            mode: 0o644,
            modtime: Some("2023-11-14T22:13:20Z".into()),
            ..Default::default()
        };
        let toc = Toc {
            version: 1,
            entries: vec![
                e("reg", "a/b/file", ""),
                e("dir", "a/", ""),
                e("hardlink", "a/again", "a/b/file"),
                e("reg", "a/.wh.gone", ""),
                e("reg", "a/b/.wh..wh..opq", ""),
                e("symlink", "link", "a/b/file"),
            ],
        };
        let idx = Index::build(&toc);
        let root = idx.node(ROOT).unwrap();
        let a = idx.node(root.children["a"]).unwrap();
        assert_eq!(a.kind, Kind::Dir);
        assert_eq!(
            a.mode, 0o644,
            "the explicit entry's mode applies to the implicit dir"
        );
        assert_eq!(a.mtime, 1_700_000_000);
        let b = idx.node(a.children["b"]).unwrap();
        assert!(b.opaque);
        assert!(!b.children.contains_key(".wh..wh..opq"));
        assert_eq!(a.children["again"], b.children["file"]);
        assert_eq!(idx.node(b.children["file"]).unwrap().nlink, 2);
        let gone = idx.node(a.children["gone"]).unwrap();
        assert_eq!((gone.kind, gone.rdev), (Kind::Char, 0));
        assert_eq!(idx.node(root.children["link"]).unwrap().link, "a/b/file");
    }
}
