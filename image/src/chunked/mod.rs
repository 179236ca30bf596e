//! zstd:chunked, the lazy-pullable layer format of containers/storage (podman): a `tar+zstd`
//! layer whose tar is cut into zstd frames so that each regular file's content (or each chunk of
//! a large file) is its own frame, followed by skippable frames holding the table of contents
//! (`toc`), the tar-split stream and a fixed footer. Whole, it decompresses to the layer tar, so
//! runtimes that know nothing of chunks pull it as an ordinary `tar+zstd` layer.
//!
//! - [`toc`]: the TOC entries (CRFS JSON, containers/storage field names) and their checks.
//! - [`write`]: layer tar → zstd:chunked blob + the descriptor annotations.
//! - [`read`]: the footer and annotations → the TOC, verified against its checksum; chunks.
//! - [`estargz`]: the same for eStargz (gzip) layers, which share the TOC format.
//! - [`lazy`]: either format: which one a descriptor is, and its TOC.
//! - [`convert`], [`reorder`]: whole images to zstd:chunked; files reordered for prefetch.

pub mod convert;
pub mod estargz;
pub mod lazy;
pub mod read;
pub mod reorder;
pub mod toc;
pub mod write;

/// Media type of zstd layers.
pub const MEDIA_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Descriptor annotations (containers/storage's current names; readers also accept the older
/// `io.containers.` prefix).
pub const ANNOTATION_TOC_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
pub const ANNOTATION_TOC_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
pub const ANNOTATION_TARSPLIT_CHECKSUM: &str =
    "io.github.containers.zstd-chunked.tarsplit-checksum";
pub const ANNOTATION_TARSPLIT_POSITION: &str =
    "io.github.containers.zstd-chunked.tarsplit-position";

/// The skippable-frame magic containers/storage writes (any of 0x184D2A50..=0x184D2A5F is valid).
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// The footer: a skippable frame of 64 bytes: TOC offset, compressed and uncompressed length,
/// TOC type (1), tar-split offset, compressed and uncompressed length, then `GNUlInUx`.
pub const FOOTER_SIZE: usize = 8 + 64;
pub const FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";
/// The TOC type of the footer and the position annotation: CRFS-style JSON.
pub const TOC_TYPE_CRFS: u64 = 1;

/// How a lazy layer's chunk frames are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Zstd,
    Gzip,
}

/// Where a compressed TOC or tar-split sits in the blob (not counting its skippable-frame header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub offset: u64,
    pub compressed: u64,
    pub uncompressed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    #[error("lazy layer: {0}")]
    Format(String),
    #[error("lazy layer: the TOC's digest is {actual}, not {expected} from the layer's annotation: the layer was altered; refusing it")]
    TocDigest { expected: String, actual: String },
    #[error("lazy layer: the chunk at byte {start} decompresses to {actual}, not {expected}: the blob was altered or damaged; not served")]
    ChunkDigest {
        start: u64,
        expected: String,
        actual: String,
    },
    #[error("lazy layer: unsafe TOC entry {name:?}: {why}")]
    Unsafe { name: String, why: String },
    #[error("lazy layer: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl ChunkedError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ChunkedError {
        let what = what.into();
        move |source| ChunkedError::Io { what, source }
    }
}
