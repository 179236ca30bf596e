//! `--output type=containerd`: an image imported into containerd through its gRPC API (content
//! service writes, then the image record), under a lease so containerd's garbage collector cannot
//! take the blobs in between, and with the `gc.ref` labels that keep them afterwards.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient, leases_client::LeasesClient,
    CreateImageRequest, CreateRequest, DeleteRequest, Image, InfoRequest, UpdateImageRequest,
    WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor as CtrDescriptor;
use strata_snapshotter::content::{ContentStore, Digest};
use strata_snapshotter::oci::{self, Descriptor, Manifest};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request};

use crate::worker::WorkerError;

const CHUNK: usize = 1 << 20;

fn fail(what: &str) -> impl Fn(tonic::Status) -> WorkerError + '_ {
    move |s| WorkerError::Image(format!("containerd {what}: {}", s.message()))
}

async fn channel(address: &Path) -> Result<Channel, WorkerError> {
    let path = address.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .expect("static URI")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(path.clone())
        }))
        .await
        .map_err(|e| {
            WorkerError::Image(format!(
                "cannot reach containerd at {}: {e}; is it running? pass address=SOCKET",
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
) -> Result<(), WorkerError> {
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
    let d = Digest::parse(digest).map_err(|e| WorkerError::Image(e.to_string()))?;
    let data = store.read(&d)?;
    let total = data.len() as i64;
    let reference = format!("strata-export-{}", d.hex());
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
        labels,
    });
    let stream = tokio_stream::iter(msgs);
    match content.write(s.req(stream)).await {
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
        Err(e) if e.code() == Code::AlreadyExists => Ok(()),
        Err(e) => Err(fail("content write")(e)),
    }
}

/// Imports image `manifest` from `store` into the containerd at `address` as `name`.
pub async fn import(
    store: &ContentStore,
    manifest: &Descriptor,
    name: &str,
    address: &Path,
    namespace: &str,
) -> Result<(), WorkerError> {
    let ch = channel(address).await?;
    let mut leases = LeasesClient::new(ch.clone());
    let mut s = Session {
        namespace: namespace.to_string(),
        lease: None,
    };
    let expire = crate::export::rfc3339(crate::db::now() + 3600);
    let lease = leases
        .create(s.req(CreateRequest {
            id: format!("strata-{}", crate::worker::nonce()),
            labels: [("containerd.io/gc.expire".to_string(), expire)].into(),
        }))
        .await
        .map_err(fail("lease"))?
        .into_inner()
        .lease
        .map(|l| l.id);
    s.lease = lease.clone();
    let m: Manifest = oci::read_json(
        store,
        &Digest::parse(&manifest.digest).map_err(|e| WorkerError::Image(e.to_string()))?,
    )?;
    let mut content = ContentClient::new(ch.clone());
    let mut refs = HashMap::new();
    write_blob(&mut content, &s, store, &m.config.digest, HashMap::new()).await?;
    refs.insert(
        "containerd.io/gc.ref.content.config".to_string(),
        m.config.digest.clone(),
    );
    for (i, l) in m.layers.iter().enumerate() {
        write_blob(&mut content, &s, store, &l.digest, HashMap::new()).await?;
        refs.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    write_blob(&mut content, &s, store, &manifest.digest, refs).await?;
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
    let mut images = ImagesClient::new(ch);
    match images
        .create(s.req(CreateImageRequest {
            image: Some(image.clone()),
        }))
        .await
    {
        Ok(_) => {}
        Err(e) if e.code() == Code::AlreadyExists => {
            images
                .update(s.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                }))
                .await
                .map_err(fail("image update"))?;
        }
        Err(e) => return Err(fail("image create")(e)),
    }
    if let Some(id) = lease {
        let _ = leases
            .delete(
                Session {
                    namespace: namespace.to_string(),
                    lease: None,
                }
                .req(DeleteRequest { id, sync: false }),
            )
            .await;
    }
    Ok(())
}
