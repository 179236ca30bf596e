//! The inode tree of a lazy layer, built from its TOC: directories (implicit parents included),
//! hard links sharing one inode, and overlay's form of whiteouts (`.wh.NAME` becomes a 0/0
//! character device `NAME`; `.wh..wh..opq` marks its directory opaque).

use std::collections::BTreeMap;

use strata_image::chunked::toc::{clean, Chunk, Entry, Toc};

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
        let mut b = IndexBuilder {
            nodes: vec![Node::dir("", ROOT, "")],
            by_path: BTreeMap::from([(String::new(), ROOT)]),
            total: 0,
        };
        let mut chunks = toc.chunks();
        for (i, e) in toc.entries.iter().enumerate() {
            if e.kind != "chunk" {
                b.add(e, chunks.remove(&i).unwrap_or_default());
            }
        }
        count_subdirs(&mut b.nodes);
        Index {
            nodes: b.nodes,
            total_bytes: b.total,
        }
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }
}

/// The inode table as the TOC's entries fill it.
struct IndexBuilder {
    nodes: Vec<Node>,
    by_path: BTreeMap<String, u64>,
    total: u64,
}

impl IndexBuilder {
    fn node_mut(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[ino as usize - 1]
    }

    /// The inode of directory `path`, made (with its parents) when the TOC names it only
    /// implicitly.
    fn dir_of(&mut self, path: &str) -> u64 {
        if let Some(i) = self.by_path.get(path) {
            return *i;
        }
        let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = self.dir_of(parent_path);
        let ino = self.nodes.len() as u64 + 1;
        self.nodes.push(Node::dir(name, parent, path));
        self.node_mut(parent).children.insert(name.to_string(), ino);
        self.by_path.insert(path.to_string(), ino);
        ino
    }

    /// Adds TOC entry `e` (a file's `chunks` with it).
    fn add(&mut self, e: &Entry, chunks: Vec<Chunk>) {
        let path = clean(&e.name);
        if path.is_empty() || path == "." {
            // The layer's root directory itself (its xattrs are the mountpoint's business).
            set_owner(&mut self.nodes[0], e);
            return;
        }
        let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
        let parent = self.dir_of(parent_path);
        if name == OPAQUE {
            self.node_mut(parent).opaque = true;
            return;
        }
        if e.kind == "hardlink" {
            // A checked TOC links only to entries before it.
            if let Some(&target) = self.by_path.get(&clean(&e.link_name)) {
                self.node_mut(target).nlink += 1;
                self.node_mut(parent)
                    .children
                    .insert(name.to_string(), target);
                self.by_path.insert(path.clone(), target);
            }
            return;
        }
        let (name, kind, rdev) = kind_of(name, e);
        if kind == Kind::Dir {
            // A directory named again (implicit first, explicit later): keep its inode.
            let ino = self.dir_of(&path);
            set_attrs(self.node_mut(ino), e);
            return;
        }
        if kind == Kind::File {
            self.total += e.size;
        }
        let ino = self.nodes.len() as u64 + 1;
        self.nodes
            .push(leaf(e, &name, kind, rdev, parent, &path, chunks));
        self.node_mut(parent).children.insert(name, ino);
        self.by_path.insert(path, ino);
    }
}

/// The name, kind and device number of a non-directory entry; a whiteout (`.wh.NAME`) is the
/// 0/0 character device overlayfs knows.
fn kind_of(name: &str, e: &Entry) -> (String, Kind, u32) {
    let dev = || libc::makedev(e.dev_major, e.dev_minor) as u32;
    match (name.strip_prefix(WHITEOUT_PREFIX), e.kind.as_str()) {
        (Some(hidden), _) => (hidden.to_string(), Kind::Char, 0),
        (None, "dir") => (name.to_string(), Kind::Dir, 0),
        (None, "reg") => (name.to_string(), Kind::File, 0),
        (None, "symlink") => (name.to_string(), Kind::Symlink, 0),
        (None, "char") => (name.to_string(), Kind::Char, dev()),
        (None, "block") => (name.to_string(), Kind::Block, dev()),
        (None, _) => (name.to_string(), Kind::Fifo, 0),
    }
}

/// Owner, mode and mtime from the entry.
fn set_owner(n: &mut Node, e: &Entry) {
    n.mode = e.mode;
    n.uid = e.uid;
    n.gid = e.gid;
    n.mtime = parse_time(e.modtime.as_deref());
}

/// Owner, mode, mtime and extended attributes from the entry.
fn set_attrs(n: &mut Node, e: &Entry) {
    use base64::Engine;
    set_owner(n, e);
    let decode = |(k, v): (&String, &String)| {
        let value = base64::engine::general_purpose::STANDARD.decode(v).ok()?;
        Some((k.clone(), value))
    };
    n.xattrs = e.xattrs.iter().filter_map(decode).collect();
}

/// The node of a non-directory entry.
fn leaf(
    e: &Entry,
    name: &str,
    kind: Kind,
    rdev: u32,
    parent: u64,
    path: &str,
    chunks: Vec<Chunk>,
) -> Node {
    let (size, link, digest) = match kind {
        Kind::File => (e.size, String::new(), e.digest.clone()),
        Kind::Symlink => (e.link_name.len() as u64, e.link_name.clone(), String::new()),
        _ => (0, String::new(), String::new()),
    };
    let mut node = Node {
        kind,
        name: name.to_string(),
        parent,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: 0,
        size,
        rdev,
        nlink: 1,
        link,
        opaque: false,
        xattrs: BTreeMap::new(),
        children: BTreeMap::new(),
        chunks,
        digest,
        path: path.to_string(),
    };
    set_attrs(&mut node, e);
    if rdev == 0 && kind == Kind::Char {
        node.mode = 0;
    }
    node
}

/// Each directory's link count, as on disk: 2 and one per subdirectory.
fn count_subdirs(nodes: &mut [Node]) {
    let is_dir = |nodes: &[Node], c: u64| nodes[c as usize - 1].kind == Kind::Dir;
    let counts: Vec<Option<u32>> = nodes
        .iter()
        .map(|n| {
            (n.kind == Kind::Dir)
                .then(|| n.children.values().filter(|c| is_dir(nodes, **c)).count() as u32)
        })
        .collect();
    for (n, count) in nodes.iter_mut().zip(counts) {
        if let Some(c) = count {
            n.nlink = 2 + c;
        }
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
            prefetch_end: None,
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
