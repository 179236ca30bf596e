//! Importing an image into containerd through its gRPC API (content service writes, then the image
//! record), under a lease so containerd's garbage collector cannot take the blobs in between, with
//! the `gc.ref` labels that keep them afterwards, and optionally unpacked into a snapshotter the way
//! containerd's own unpacker does it (Snapshots Prepare, Diff Apply, Commit by chain ID). Used by
//! `strata build --output type=containerd` and `migrate-tool migrate --to strata`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient, ApplyRequest, CreateImageRequest, CreateRequest, DeleteRequest,
    Image, Info as ContentInfo, InfoRequest, UpdateImageRequest, UpdateRequest, WriteAction,
    WriteContentRequest,
};
use containerd_client::types::Descriptor as CtrDescriptor;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request};

use crate::content::{ContentStore, Digest};
use crate::oci::{self, Descriptor, ImageConfig, Manifest};

/// An import that failed, with what containerd said.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ImportError(pub String);

const CHUNK: usize = 1 << 20;

fn fail(what: &str) -> impl Fn(tonic::Status) -> ImportError + '_ {
    move |s| ImportError(format!("containerd {what}: {}", s.message()))
}

fn bad(e: impl std::fmt::Display) -> ImportError {
    ImportError(e.to_string())
}

async fn channel(address: &Path) -> Result<Channel, ImportError> {
    let path = address.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .expect("static URI")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(path.clone())
        }))
        .await
        .map_err(|e| {
            ImportError(format!(
                "cannot reach containerd at {}: {e}; is it running? pass its socket address",
                address.display()
            ))
        })
}

struct Session {
    namespace: String,
    lease: Option<String>,
}

impl Session {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "containerd-namespace",
            self.namespace.parse().expect("ascii namespace"),
        );
        if let Some(l) = &self.lease {
            r.metadata_mut()
                .insert("containerd-lease", l.parse().expect("ascii lease"));
        }
        r
    }
}

async fn write_blob(
    content: &mut ContentClient<Channel>,
    s: &Session,
    store: &ContentStore,
    digest: &str,
    labels: HashMap<String, String>,
) -> Result<(), ImportError> {
    if labels.is_empty()
        && content
            .info(s.req(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
            .is_ok()
    {
        return Ok(());
    }
    let d = Digest::parse(digest).map_err(bad)?;
    let data = store.read(&d).map_err(bad)?;
    let total = data.len() as i64;
    let reference = format!("strata-import-{}", d.hex());
    let mut msgs = Vec::new();
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        msgs.push(WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: reference.clone(),
            total,
            expected: digest.to_string(),
            offset: (i * CHUNK) as i64,
            data: chunk.to_vec(),
            labels: HashMap::new(),
        });
    }
    msgs.push(WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: reference,
        total,
        expected: digest.to_string(),
        offset: total,
        data: Vec::new(),
        labels: labels.clone(),
    });
    match content.write(s.req(tokio_stream::iter(msgs))).await {
        Ok(resp) => {
            let mut inbound = resp.into_inner();
            while inbound
                .message()
                .await
                .map_err(fail("content write"))?
                .is_some()
            {}
            Ok(())
        }
        Err(e) if e.code() == Code::AlreadyExists => {
            if !labels.is_empty() {
                let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
                let info = ContentInfo {
                    digest: digest.to_string(),
                    size: total,
                    created_at: None,
                    updated_at: None,
                    labels,
                };
                content
                    .update(s.req(UpdateRequest {
                        info: Some(info),
                        update_mask: Some(prost_types::FieldMask { paths }),
                    }))
                    .await
                    .map_err(fail("content labels"))?;
            }
            Ok(())
        }
        Err(e) => Err(fail("content write")(e)),
    }
}

/// What Prepare gave for one layer.
enum Prepared {
    /// The snapshotter mounted it remotely (it answered AlreadyExists for the target).
    Remote,
    /// An active snapshot to apply the layer into.
    Active {
        key: String,
        mounts: Vec<containerd_client::types::Mount>,
    },
}

/// Prepares the snapshot of layer `chain` on `parent`; `labels` may ask for a remote snapshot.
async fn prepare_layer(
    snaps: &mut SnapshotsClient<Channel>,
    s: &Session,
    snapshotter: &str,
    parent: &str,
    chain: &str,
    labels: HashMap<String, String>,
) -> Result<Prepared, ImportError> {
    let key = format!("extract-{} {chain}", crate::nonce());
    match snaps
        .prepare(s.req(PrepareSnapshotRequest {
            snapshotter: snapshotter.into(),
            key: key.clone(),
            parent: parent.to_string(),
            labels,
        }))
        .await
    {
        Ok(r) => Ok(Prepared::Active {
            key,
            mounts: r.into_inner().mounts,
        }),
        Err(e) if e.code() == Code::AlreadyExists => Ok(Prepared::Remote),
        Err(e) => Err(fail("snapshot prepare")(e)),
    }
}

/// Applies `layer` into the active snapshot `key` with containerd's diff service and commits
/// it as `chain` (the layer's blob must be in containerd's content store).
async fn apply_layer(
    ch: &Channel,
    s: &Session,
    snapshotter: &str,
    key: String,
    mounts: Vec<containerd_client::types::Mount>,
    layer: &Descriptor,
    chain: &str,
) -> Result<(), ImportError> {
    let mut snaps = SnapshotsClient::new(ch.clone());
    let mut diff = DiffClient::new(ch.clone());
    let desc = CtrDescriptor {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size as i64,
        annotations: HashMap::new(),
    };
    let applied = diff
        .apply(s.req(ApplyRequest {
            diff: Some(desc),
            mounts,
            payloads: HashMap::new(),
        }))
        .await;
    if let Err(e) = applied {
        let _ = snaps
            .remove(s.req(RemoveSnapshotRequest {
                snapshotter: snapshotter.into(),
                key,
            }))
            .await;
        return Err(fail("apply layer")(e));
    }
    match snaps
        .commit(s.req(CommitSnapshotRequest {
            snapshotter: snapshotter.into(),
            name: chain.to_string(),
            key: key.clone(),
            labels: HashMap::new(),
        }))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Code::AlreadyExists => {
            let _ = snaps
                .remove(s.req(RemoveSnapshotRequest {
                    snapshotter: snapshotter.into(),
                    key,
                }))
                .await;
            Ok(())
        }
        Err(e) => Err(fail("snapshot commit")(e)),
    }
}

async fn exists(
    snaps: &mut SnapshotsClient<Channel>,
    s: &Session,
    snapshotter: &str,
    key: &str,
) -> bool {
    snaps
        .stat(s.req(StatSnapshotRequest {
            snapshotter: snapshotter.into(),
            key: key.to_string(),
        }))
        .await
        .is_ok()
}

/// Unpacks `layers` (whose diff ids are `diff_ids`) into `snapshotter` through containerd, as its
/// own unpacker does; returns the chain ID of the top layer.
async fn unpack(
    ch: &Channel,
    s: &Session,
    snapshotter: &str,
    layers: &[Descriptor],
    diff_ids: &[String],
) -> Result<String, ImportError> {
    let mut snaps = SnapshotsClient::new(ch.clone());
    let mut chain = String::new();
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let parent = chain.clone();
        chain = crate::oci::chain_id(&chain, diff_id);
        if exists(&mut snaps, s, snapshotter, &chain).await {
            continue;
        }
        if let Prepared::Active { key, mounts } =
            prepare_layer(&mut snaps, s, snapshotter, &parent, &chain, HashMap::new()).await?
        {
            apply_layer(ch, s, snapshotter, key, mounts, layer, &chain).await?;
        }
    }
    Ok(chain)
}

/// A connection to containerd under a lease (expiring in an hour, deleted at the end), so that
/// its garbage collector cannot take what is written before the image record holds it.
struct Leased {
    ch: Channel,
    s: Session,
    namespace: String,
}

impl Leased {
    async fn start(address: &Path, namespace: &str) -> Result<Leased, ImportError> {
        let ch = channel(address).await?;
        let mut leases = LeasesClient::new(ch.clone());
        let mut s = Session {
            namespace: namespace.to_string(),
            lease: None,
        };
        let expire = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs()
            + 3600;
        s.lease = leases
            .create(
                s.req(CreateRequest {
                    id: format!("strata-{}", crate::nonce()),
                    labels: [(
                        "containerd.io/gc.expire".to_string(),
                        crate::oci::rfc3339(expire),
                    )]
                    .into(),
                }),
            )
            .await
            .map_err(fail("lease"))?
            .into_inner()
            .lease
            .map(|l| l.id);
        Ok(Leased {
            ch,
            s,
            namespace: namespace.to_string(),
        })
    }

    /// Writes the config (keeping snapshot `top` of `snapshotter` alive, when given) and the
    /// manifest (keeping config and layers), then names the image.
    async fn record(
        &self,
        store: &ContentStore,
        manifest: &Descriptor,
        m: &Manifest,
        name: &str,
        top: Option<(&str, &str)>,
    ) -> Result<(), ImportError> {
        let mut content = ContentClient::new(self.ch.clone());
        let mut config_labels = HashMap::new();
        if let Some((sn, chain)) = top {
            // What containerd's unpacker records: the config keeps the unpacked chain alive.
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{sn}"),
                chain.to_string(),
            );
        }
        write_blob(
            &mut content,
            &self.s,
            store,
            &m.config.digest,
            config_labels,
        )
        .await?;
        let mut refs = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            m.config.digest.clone(),
        )]);
        for (i, l) in m.layers.iter().enumerate() {
            refs.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        write_blob(&mut content, &self.s, store, &manifest.digest, refs).await?;
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(CtrDescriptor {
                media_type: manifest.media_type.clone(),
                digest: manifest.digest.clone(),
                size: manifest.size as i64,
                annotations: HashMap::new(),
            }),
            created_at: None,
            updated_at: None,
        };
        let mut images = ImagesClient::new(self.ch.clone());
        match images
            .create(self.s.req(CreateImageRequest {
                image: Some(image.clone()),
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Code::AlreadyExists => {
                images
                    .update(self.s.req(UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                    }))
                    .await
                    .map_err(fail("image update"))?;
                Ok(())
            }
            Err(e) => Err(fail("image create")(e)),
        }
    }

    async fn end(self) {
        if let Some(id) = self.s.lease.clone() {
            let mut leases = LeasesClient::new(self.ch.clone());
            let _ = leases
                .delete(
                    Session {
                        namespace: self.namespace.clone(),
                        lease: None,
                    }
                    .req(DeleteRequest { id, sync: false }),
                )
                .await;
        }
    }
}

/// Imports image `manifest` from `store` into the containerd at `address` as `name`, unpacked into
/// `snapshotter` when given.
pub async fn import(
    store: &ContentStore,
    manifest: &Descriptor,
    name: &str,
    address: &Path,
    namespace: &str,
    snapshotter: Option<&str>,
) -> Result<(), ImportError> {
    let l = Leased::start(address, namespace).await?;
    let m: Manifest =
        oci::read_json(store, &Digest::parse(&manifest.digest).map_err(bad)?).map_err(bad)?;
    let mut content = ContentClient::new(l.ch.clone());
    for layer in &m.layers {
        write_blob(&mut content, &l.s, store, &layer.digest, HashMap::new()).await?;
    }
    let mut top = None;
    if let Some(sn) = snapshotter {
        let config: ImageConfig =
            oci::read_json(store, &Digest::parse(&m.config.digest).map_err(bad)?).map_err(bad)?;
        top = Some((
            sn,
            unpack(&l.ch, &l.s, sn, &m.layers, &config.rootfs.diff_ids).await?,
        ));
    }
    l.record(
        store,
        manifest,
        &m,
        name,
        top.as_ref().map(|(a, b)| (*a, b.as_str())),
    )
    .await?;
    l.end().await;
    Ok(())
}

/// How one layer of a lazy pull went.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerPull {
    /// Already there.
    Present,
    /// Mounted from the registry by the snapshotter.
    Lazy,
    /// Neither zstd:chunked nor eStargz: downloaded (this many bytes) and applied.
    Pulled(u64),
}

/// `strata-snapshotter pull --lazy`: stores the manifest and config of `image` (already in
/// `store`) in containerd, prepares each layer in `snapshotter` with the remote-snapshot labels,
/// and names the image. Layers the snapshotter does not mount remotely are downloaded with
/// `fetch_layer` and applied. `report(i, how)` follows each layer.
/// Where a lazy pull goes.
pub struct Destination<'a> {
    /// containerd's socket.
    pub address: &'a Path,
    pub namespace: &'a str,
    pub snapshotter: &'a str,
}

pub async fn pull_lazy(
    store: &ContentStore,
    reference: &str,
    manifest: &Descriptor,
    name: &str,
    to: &Destination<'_>,
    fetch_layer: &(dyn Fn(&Descriptor) -> Result<(), ImportError> + Sync),
    report: &(dyn Fn(usize, &LayerPull) + Sync),
) -> Result<(), ImportError> {
    let (address, namespace, snapshotter) = (to.address, to.namespace, to.snapshotter);
    let l = Leased::start(address, namespace).await?;
    let m: Manifest =
        oci::read_json(store, &Digest::parse(&manifest.digest).map_err(bad)?).map_err(bad)?;
    let config: ImageConfig =
        oci::read_json(store, &Digest::parse(&m.config.digest).map_err(bad)?).map_err(bad)?;
    let mut snaps = SnapshotsClient::new(l.ch.clone());
    let mut content = ContentClient::new(l.ch.clone());
    let mut chain = String::new();
    for (i, (layer, diff_id)) in m.layers.iter().zip(&config.rootfs.diff_ids).enumerate() {
        let parent = chain.clone();
        chain = crate::oci::chain_id(&chain, diff_id);
        if exists(&mut snaps, &l.s, snapshotter, &chain).await {
            report(i, &LayerPull::Present);
            continue;
        }
        let labels = HashMap::from([
            (crate::labels::TARGET.to_string(), chain.clone()),
            (crate::labels::IMAGE_REF.to_string(), reference.to_string()),
            (crate::labels::MANIFEST.to_string(), manifest.digest.clone()),
            (crate::labels::LAYER.to_string(), layer.digest.clone()),
        ]);
        match prepare_layer(&mut snaps, &l.s, snapshotter, &parent, &chain, labels).await? {
            Prepared::Remote => report(i, &LayerPull::Lazy),
            Prepared::Active { key, mounts } => {
                fetch_layer(layer)?;
                write_blob(&mut content, &l.s, store, &layer.digest, HashMap::new()).await?;
                apply_layer(&l.ch, &l.s, snapshotter, key, mounts, layer, &chain).await?;
                report(i, &LayerPull::Pulled(layer.size));
            }
        }
    }
    l.record(store, manifest, &m, name, Some((snapshotter, &chain)))
        .await?;
    l.end().await;
    Ok(())
}
