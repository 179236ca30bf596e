//! LLB: the build graph as protobuf messages, one `Op` per vertex.
//!
//! Field numbers follow BuildKit's `solver/pb/ops.proto` wherever the concept is the same, so that
//! definitions are easy to compare. Maps are ordered (`btree_map`), so serialization is
//! deterministic and an op's digest — the sha256 of its bytes — identifies it. Metadata that must
//! not change the digest (descriptions, ignore-cache) travels beside the ops in the `Definition`.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use strata_image::content::Digest;

/// Metadata key of an op's progress name (BuildKit's).
pub const CUSTOM_NAME: &str = "llb.customname";

#[derive(Clone, PartialEq, Message)]
pub struct Op {
    #[prost(message, repeated, tag = "1")]
    pub inputs: Vec<Input>,
    #[prost(oneof = "op::Kind", tags = "2, 3, 4")]
    pub kind: Option<op::Kind>,
}

pub mod op {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "2")]
        Exec(super::ExecOp),
        #[prost(message, tag = "3")]
        Source(super::SourceOp),
        #[prost(message, tag = "4")]
        File(super::FileOp),
    }
}

/// An edge: output `index` of the op with `digest`.
#[derive(Clone, PartialEq, Message)]
pub struct Input {
    #[prost(string, tag = "1")]
    pub digest: String,
    #[prost(int64, tag = "2")]
    pub index: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ExecOp {
    #[prost(message, optional, tag = "1")]
    pub meta: Option<Meta>,
    #[prost(message, repeated, tag = "2")]
    pub mounts: Vec<Mount>,
    #[prost(enumeration = "NetMode", tag = "3")]
    pub network: i32,
    #[prost(message, repeated, tag = "5")]
    pub secretenv: Vec<SecretEnv>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Meta {
    #[prost(string, repeated, tag = "1")]
    pub args: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub env: Vec<String>,
    #[prost(string, tag = "3")]
    pub cwd: String,
    #[prost(string, tag = "4")]
    pub user: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
pub enum NetMode {
    Unset = 0,
    Host = 1,
    None = 2,
}

/// Marks "no input" (scratch) in `Mount::input` and file actions.
pub const NO_INPUT: i64 = -1;

#[derive(Clone, PartialEq, Message)]
pub struct Mount {
    #[prost(int64, tag = "1")]
    pub input: i64,
    #[prost(string, tag = "2")]
    pub selector: String,
    #[prost(string, tag = "3")]
    pub dest: String,
    #[prost(int64, tag = "4")]
    pub output: i64,
    #[prost(bool, tag = "5")]
    pub readonly: bool,
    #[prost(enumeration = "MountType", tag = "6")]
    pub mount_type: i32,
    #[prost(message, optional, tag = "19")]
    pub tmpfs_opt: Option<TmpfsOpt>,
    #[prost(message, optional, tag = "20")]
    pub cache_opt: Option<CacheOpt>,
    #[prost(message, optional, tag = "21")]
    pub secret_opt: Option<SecretOpt>,
    #[prost(message, optional, tag = "22")]
    pub ssh_opt: Option<SecretOpt>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
pub enum MountType {
    Bind = 0,
    Secret = 1,
    Ssh = 2,
    Cache = 3,
    Tmpfs = 4,
}

#[derive(Clone, PartialEq, Message)]
pub struct TmpfsOpt {
    /// Bytes; 0 for the kernel's default.
    #[prost(int64, tag = "1")]
    pub size: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
pub enum CacheSharing {
    Shared = 0,
    Private = 1,
    Locked = 2,
}

#[derive(Clone, PartialEq, Message)]
pub struct CacheOpt {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(enumeration = "CacheSharing", tag = "2")]
    pub sharing: i32,
    // Strata's own fields (BuildKit seeds ownership through a file op instead).
    #[prost(uint32, tag = "10")]
    pub uid: u32,
    #[prost(uint32, tag = "11")]
    pub gid: u32,
    #[prost(uint32, tag = "12")]
    pub mode: u32,
}

/// A secret or ssh mount: what to expose (by id, never by value) and how.
#[derive(Clone, PartialEq, Message)]
pub struct SecretOpt {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(uint32, tag = "2")]
    pub uid: u32,
    #[prost(uint32, tag = "3")]
    pub gid: u32,
    #[prost(uint32, tag = "4")]
    pub mode: u32,
    #[prost(bool, tag = "5")]
    pub optional: bool,
}

/// A secret exposed as an environment variable.
#[derive(Clone, PartialEq, Message)]
pub struct SecretEnv {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(bool, tag = "3")]
    pub optional: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct SourceOp {
    /// `docker-image://REF`, `local://NAME`, `oci-layout://PATH`.
    #[prost(string, tag = "1")]
    pub identifier: String,
    #[prost(btree_map = "string, string", tag = "2")]
    pub attrs: BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct FileOp {
    #[prost(message, repeated, tag = "2")]
    pub actions: Vec<FileAction>,
}

#[derive(Clone, PartialEq, Message)]
pub struct FileAction {
    /// The tree the action changes (index into the op's inputs, or -1 for scratch).
    #[prost(int64, tag = "1")]
    pub input: i64,
    /// The tree a copy reads from.
    #[prost(int64, tag = "2")]
    pub secondary_input: i64,
    #[prost(int64, tag = "3")]
    pub output: i64,
    #[prost(oneof = "file_action::Action", tags = "4, 5, 6")]
    pub action: Option<file_action::Action>,
}

pub mod file_action {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Action {
        #[prost(message, tag = "4")]
        Copy(super::FileActionCopy),
        #[prost(message, tag = "5")]
        Mkfile(super::FileActionMkFile),
        #[prost(message, tag = "6")]
        Mkdir(super::FileActionMkDir),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct ChownOpt {
    /// `uid[:gid]` or `name[:group]`, resolved against the destination's /etc/passwd and /etc/group.
    #[prost(string, tag = "1")]
    pub user: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct FileActionCopy {
    #[prost(string, tag = "1")]
    pub src: String,
    #[prost(string, tag = "2")]
    pub dest: String,
    #[prost(message, optional, tag = "3")]
    pub owner: Option<ChownOpt>,
    /// -1: keep the source's mode.
    #[prost(int32, tag = "4")]
    pub mode: i32,
    #[prost(bool, tag = "5")]
    pub follow_symlink: bool,
    #[prost(bool, tag = "6")]
    pub dir_copy_contents: bool,
    /// ADD: extract tar archives (plain or gzip) into the destination instead of copying them.
    #[prost(bool, tag = "7")]
    pub attempt_unpack: bool,
    #[prost(bool, tag = "8")]
    pub create_dest_path: bool,
    #[prost(bool, tag = "9")]
    pub allow_wildcard: bool,
    #[prost(bool, tag = "10")]
    pub allow_empty_wildcard: bool,
    /// Unix seconds, -1 to keep the source's times.
    #[prost(int64, tag = "11")]
    pub timestamp: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct FileActionMkFile {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(int32, tag = "2")]
    pub mode: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
    #[prost(message, optional, tag = "4")]
    pub owner: Option<ChownOpt>,
    #[prost(int64, tag = "5")]
    pub timestamp: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct FileActionMkDir {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(int32, tag = "2")]
    pub mode: i32,
    #[prost(bool, tag = "3")]
    pub make_parents: bool,
    #[prost(message, optional, tag = "4")]
    pub owner: Option<ChownOpt>,
    #[prost(int64, tag = "5")]
    pub timestamp: i64,
}

/// Per-op metadata, outside the digest.
#[derive(Clone, PartialEq, Message)]
pub struct OpMetadata {
    #[prost(bool, tag = "1")]
    pub ignore_cache: bool,
    #[prost(btree_map = "string, string", tag = "2")]
    pub description: BTreeMap<String, String>,
}

/// A serialized graph: ops (the last is the result) and their metadata by digest.
#[derive(Clone, PartialEq, Message)]
pub struct Definition {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub def: Vec<Vec<u8>>,
    #[prost(btree_map = "string, message", tag = "2")]
    pub metadata: BTreeMap<String, OpMetadata>,
}

/// The digest of serialized op bytes.
pub fn digest(bytes: &[u8]) -> String {
    Digest::of(bytes).to_string()
}

/// Builds a definition op by op, deduplicating equal ops.
#[derive(Default)]
pub struct Builder {
    def: Definition,
}

impl Builder {
    /// Adds `op` (with `meta`) and returns its output 0 as an input for later ops.
    pub fn add(&mut self, op: &Op, meta: OpMetadata) -> Input {
        let bytes = op.encode_to_vec();
        let digest = digest(&bytes);
        if !self.def.metadata.contains_key(&digest) {
            self.def.def.push(bytes);
        }
        let entry = self.def.metadata.entry(digest.clone()).or_default();
        entry.ignore_cache |= meta.ignore_cache;
        for (k, v) in meta.description {
            entry.description.entry(k).or_insert(v);
        }
        Input { digest, index: 0 }
    }

    /// Finishes with `result` as the graph's output (a terminal op that names it, like BuildKit).
    pub fn finish(mut self, result: Option<Input>) -> Definition {
        let terminal = Op {
            inputs: result.into_iter().collect(),
            kind: None,
        };
        self.def.def.push(terminal.encode_to_vec());
        self.def
    }
}

/// A parsed definition: ops by digest, and the result input.
#[derive(Debug)]
pub struct Graph {
    pub ops: BTreeMap<String, Op>,
    pub metadata: BTreeMap<String, OpMetadata>,
    pub result: Option<Input>,
}

#[derive(Debug, thiserror::Error)]
pub enum LlbError {
    #[error("LLB definition is malformed: {0}")]
    Malformed(String),
}

impl Graph {
    pub fn from_definition(def: &Definition) -> Result<Graph, LlbError> {
        let (last, ops) = def
            .def
            .split_last()
            .ok_or_else(|| LlbError::Malformed("no ops".into()))?;
        let terminal = Op::decode(&last[..]).map_err(|e| LlbError::Malformed(e.to_string()))?;
        let mut map = BTreeMap::new();
        for bytes in ops {
            let op = Op::decode(&bytes[..]).map_err(|e| LlbError::Malformed(e.to_string()))?;
            map.insert(digest(bytes), op);
        }
        for (d, op) in &map {
            for i in &op.inputs {
                if !map.contains_key(&i.digest) {
                    return Err(LlbError::Malformed(format!(
                        "op {d} names missing input {}",
                        i.digest
                    )));
                }
            }
        }
        let result = terminal.inputs.into_iter().next();
        if let Some(r) = &result {
            if !map.contains_key(&r.digest) {
                return Err(LlbError::Malformed(format!(
                    "result names missing op {}",
                    r.digest
                )));
            }
        }
        // Reject cycles: a digest graph cannot have one unless forged.
        let mut state: BTreeMap<&str, u8> = BTreeMap::new();
        fn visit<'a>(
            d: &'a str,
            map: &'a BTreeMap<String, Op>,
            state: &mut BTreeMap<&'a str, u8>,
        ) -> Result<(), LlbError> {
            match state.get(d) {
                Some(1) => return Err(LlbError::Malformed(format!("cycle through {d}"))),
                Some(_) => return Ok(()),
                None => {}
            }
            state.insert(d, 1);
            for i in &map[d].inputs {
                visit(&i.digest, map, state)?;
            }
            state.insert(d, 2);
            Ok(())
        }
        for d in map.keys() {
            visit(d, &map, &mut state)?;
        }
        Ok(Graph {
            ops: map,
            metadata: def.metadata.clone(),
            result,
        })
    }

    /// The ids of the cache mounts (`RUN --mount=type=cache`) the graph uses.
    pub fn cache_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .ops
            .values()
            .filter_map(|o| match &o.kind {
                Some(op::Kind::Exec(e)) => Some(e.mounts.iter()),
                _ => None,
            })
            .flatten()
            .filter_map(|m| m.cache_opt.as_ref().map(|c| c.id.clone()))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    fn execs(&self) -> impl Iterator<Item = &ExecOp> {
        self.ops.values().filter_map(|o| match &o.kind {
            Some(op::Kind::Exec(e)) => Some(e),
            _ => None,
        })
    }

    /// The ids of the secrets steps mount or take as environment variables.
    pub fn secret_ids(&self) -> BTreeSet<String> {
        let mounted = self
            .execs()
            .flat_map(|e| e.mounts.iter())
            .filter_map(|m| m.secret_opt.as_ref().map(|s| s.id.clone()));
        let env = self
            .execs()
            .flat_map(|e| e.secretenv.iter().map(|s| s.id.clone()));
        mounted.chain(env).collect()
    }

    /// The ids of the ssh agents steps mount.
    pub fn ssh_ids(&self) -> BTreeSet<String> {
        self.execs()
            .flat_map(|e| e.mounts.iter())
            .filter_map(|m| m.ssh_opt.as_ref().map(|s| s.id.clone()))
            .collect()
    }

    /// What the graph reads of the build context: the include patterns of its `local://`
    /// sources; None when a source takes the whole context.
    pub fn context_patterns(&self) -> Option<BTreeSet<String>> {
        let mut all = BTreeSet::new();
        for o in self.ops.values() {
            let Some(op::Kind::Source(s)) = &o.kind else {
                continue;
            };
            if !s.identifier.starts_with("local://") {
                continue;
            }
            let patterns: Vec<String> = s
                .attrs
                .get("includepatterns")
                .and_then(|p| serde_json::from_str(p).ok())?;
            if patterns.iter().any(|p| crate::pattern::clean(p).is_empty()) {
                return None;
            }
            all.extend(patterns);
        }
        Some(all)
    }

    /// A human-readable JSON rendering (for `strata debug dump-llb`).
    pub fn to_json(&self) -> serde_json::Value {
        let ops: Vec<serde_json::Value> = self
            .ops
            .iter()
            .map(|(d, op)| {
                serde_json::json!({
                    "digest": d,
                    "inputs": op.inputs.iter().map(|i| format!("{}:{}", i.digest, i.index)).collect::<Vec<_>>(),
                    "op": format!("{:?}", op.kind),
                    "description": self.metadata.get(d).map(|m| m.description.clone()).unwrap_or_default(),
                    "ignore_cache": self.metadata.get(d).is_some_and(|m| m.ignore_cache),
                })
            })
            .collect();
        serde_json::json!({ "ops": ops, "result": self.result.as_ref().map(|r| &r.digest) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(id: &str) -> Op {
        Op {
            inputs: vec![],
            kind: Some(op::Kind::Source(SourceOp {
                identifier: id.into(),
                attrs: [("b".to_string(), "2".to_string()), ("a".into(), "1".into())].into(),
            })),
        }
    }

    #[test]
    fn digests_are_deterministic_and_ops_dedup() {
        let a = source("docker-image://busybox").encode_to_vec();
        let b = source("docker-image://busybox").encode_to_vec();
        assert_eq!(a, b);
        let mut builder = Builder::default();
        let i1 = builder.add(&source("docker-image://busybox"), OpMetadata::default());
        let i2 = builder.add(&source("docker-image://busybox"), OpMetadata::default());
        assert_eq!(i1, i2);
        let def = builder.finish(Some(i1.clone()));
        assert_eq!(def.def.len(), 2);
        let g = Graph::from_definition(&def).unwrap();
        assert_eq!(g.result.unwrap().digest, i1.digest);
    }

    #[test]
    fn malformed_definitions_are_refused() {
        let def = Definition {
            def: vec![Op {
                inputs: vec![Input {
                    digest: "sha256:nope".into(),
                    index: 0,
                }],
                kind: None,
            }
            .encode_to_vec()],
            metadata: BTreeMap::new(),
        };
        assert!(Graph::from_definition(&def).is_err());
        assert!(Graph::from_definition(&Definition::default()).is_err());
    }
}
