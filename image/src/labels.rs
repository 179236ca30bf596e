//! Snapshot labels of containerd's remote-snapshot protocol: a Prepare carrying them asks the
//! snapshotter to mount the layer from the registry instead of waiting for an unpack. containerd's
//! CRI plugin and `strata-snapshotter pull --lazy` set them; the snapshotter's lazy layers read them.

/// The chain ID the prepared snapshot is to be committed as.
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// The image reference the layer comes from.
pub const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the manifest naming the layer.
pub const MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer's (compressed) blob digest.
pub const LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
