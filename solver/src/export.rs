//! Exporting a build result: its snapshot chain as layers (each diffed once and remembered), the
//! image config and manifest in the content store, then the outputs the user asked for.

use std::io::{BufWriter, Write};
use std::path::Path;

use strata_image::content::Digest;
use strata_image::layer::{self, DiffOptions};
use strata_image::oci::{self, Descriptor, History, ImageConfig, Manifest};

use crate::db::{now, ImageRecord, LayerRecord};
use crate::form::{self, LayerForm};
use crate::spec::InvalidSpec;
use crate::worker::{Ref, Worker, WorkerError};

/// Where a build goes (`--output`, `-t`).
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// The local image store under a name (`-t`), and the registry when `push` (in `form`).
    Image {
        name: String,
        push: bool,
        form: LayerForm,
    },
    /// An OCI image layout archive (`type=oci,dest=FILE`).
    Oci {
        dest: String,
        name: Option<String>,
        form: LayerForm,
    },
    /// The final stage's files (`type=local,dest=DIR`).
    Local { dest: String },
    /// containerd's image store, through its API (`type=containerd,name=REF[,address=SOCK][,namespace=NS]`).
    Containerd {
        name: String,
        address: String,
        namespace: String,
    },
    /// A `docker save` archive that `docker load` takes (`type=docker,dest=FILE[,name=REF]`).
    Docker {
        dest: String,
        name: Option<String>,
        form: LayerForm,
    },
}

impl Output {
    /// Whether the output's bytes go to the client (a directory or an archive there).
    pub fn streamed(&self) -> bool {
        matches!(
            self,
            Output::Oci { .. } | Output::Docker { .. } | Output::Local { .. }
        )
    }

    /// Parses buildx's `--output` syntax: `type=oci,dest=out.tar[,name=REF]`, `type=local,dest=DIR`,
    /// `type=image,name=REF`, or a bare `DIR` (local).
    pub fn parse(spec: &str) -> Result<Output, InvalidSpec> {
        if !spec.contains('=') {
            return Ok(Output::Local {
                dest: spec.to_string(),
            });
        }
        let mut kind = None;
        let mut dest = None;
        let mut name = None;
        let mut push = false;
        let mut address = None;
        let mut namespace = None;
        let mut form_keys = Vec::new();
        for part in spec.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("--output {spec:?}: {part:?} is not key=value"))?;
            match k {
                "type" => kind = Some(v.to_string()),
                "dest" => dest = Some(v.to_string()),
                "name" => name = Some(v.to_string()),
                "push" => push = v == "true",
                "address" => address = Some(v.to_string()),
                "namespace" => namespace = Some(v.to_string()),
                // Applied below: the form's defaults depend on the type, which may come later.
                other if LayerForm::is_key(other) => form_keys.push((other, v)),
                other => {
                    return Err(format!(
                        "--output: unknown key {other:?} (known: type, dest, name, push, address, namespace, compression, compression-level, force-compression, oci-mediatypes, prefetch)"
                    ).into())
                }
            }
        }
        // Docker's types in a Docker archive unless asked otherwise, as BuildKit's docker exporter.
        let mut form = match kind.as_deref() {
            Some("docker") => LayerForm::DOCKER,
            _ => LayerForm::OCI,
        };
        for (k, v) in form_keys {
            form.set(k, v)?;
        }
        if form.prefetch.is_some() && form.compression != crate::form::Compression::ZstdChunked {
            return Err("--output prefetch=FILE orders the files of zstd:chunked layers: add compression=zstd:chunked".into());
        }
        if let Some(n) = &name {
            crate::worker::images::checked_name(n).map_err(|e| format!("--output name: {e}"))?;
        }
        match kind.as_deref() {
            Some("oci") => Ok(Output::Oci {
                dest: dest.ok_or("--output type=oci needs dest=FILE.tar")?,
                name,
                form,
            }),
            Some("containerd") => Ok(Output::Containerd {
                name: name.ok_or("--output type=containerd needs name=REF")?,
                // As ctr: the flags, else CONTAINERD_ADDRESS / CONTAINERD_NAMESPACE, else defaults.
                address: address
                    .or_else(|| std::env::var("CONTAINERD_ADDRESS").ok())
                    .unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
                namespace: namespace
                    .or_else(|| std::env::var("CONTAINERD_NAMESPACE").ok())
                    .unwrap_or_else(|| "default".into()),
            }),
            Some("docker") => Ok(Output::Docker {
                dest: dest.ok_or("--output type=docker needs dest=FILE.tar")?,
                name,
                form,
            }),
            Some("local") => Ok(Output::Local {
                dest: dest.ok_or("--output type=local needs dest=DIR")?,
            }),
            Some("image") | Some("registry") => Ok(Output::Image {
                name: name.ok_or("--output type=image needs name=REF")?,
                push: push || kind.as_deref() == Some("registry"),
                form,
            }),
            Some(other) => Err(format!(
                "--output type={other} is not supported (supported: oci, docker, local, image, registry, containerd)"
            ).into()),
            None => Err("--output needs type=oci|local|image".into()),
        }
    }
}

pub use strata_image::oci::rfc3339;

/// The layer of committed snapshot `key`, diffed and stored on first use.
pub(crate) fn layer_of(
    worker: &Worker,
    key: &str,
    epoch: Option<u64>,
) -> Result<LayerRecord, WorkerError> {
    // Base image layers keep their original blobs. Built layers diffed with a
    // SOURCE_DATE_EPOCH are remembered per epoch: their bytes differ.
    let record_key = match epoch {
        Some(e) if !key.starts_with("layer/") => format!("{key}@{e}"),
        _ => key.to_string(),
    };
    if let Some(r) = worker.db.layer(&record_key)? {
        return Ok(r);
    }
    let dir = worker.snapshots.dir(key)?;
    let mut w = worker.content.writer()?;
    layer::diff(&dir, &mut w, DiffOptions { mtime_max: epoch })
        .map_err(WorkerError::io(format!("diff {}", dir.display())))?;
    let digest = w.commit(None)?;
    let size = worker.content.size(&digest)?;
    let r = LayerRecord {
        diff_id: digest.to_string(),
        blob: Descriptor {
            media_type: oci::MEDIA_LAYER.into(),
            digest: digest.to_string(),
            size,
            annotations: Default::default(),
            platform: None,
        },
    };
    worker.db.put_layer(&record_key, &r)?;
    Ok(r)
}

/// Assembles the image of `result` with `config`; returns the manifest's descriptor.
pub fn image(
    worker: &Worker,
    result: &Ref,
    mut config: ImageConfig,
    epoch: Option<u64>,
) -> Result<Descriptor, WorkerError> {
    let chain = match result {
        Ref::Snapshot(top) => worker.chain(top)?,
        Ref::Scratch => Vec::new(),
        Ref::Context | Ref::Http { .. } => {
            return Err(WorkerError::Exec(
                "the build context is not an image".into(),
            ))
        }
    };
    let layers: Vec<LayerRecord> = chain
        .iter()
        .map(|k| layer_of(worker, k, epoch))
        .collect::<Result<_, _>>()?;
    let created = rfc3339(epoch.unwrap_or_else(now));
    // Base images without history get one entry per layer, so history and layers line up.
    let with_layer = config.history.iter().filter(|h| !h.empty_layer).count();
    if with_layer < layers.len() {
        let missing = layers.len() - with_layer;
        let filler = (0..missing).map(|_| History {
            created_by: "(base image layer)".into(),
            ..Default::default()
        });
        config.history.splice(0..0, filler);
    }
    for h in config.history.iter_mut().filter(|h| h.created.is_none()) {
        h.created = Some(created.clone());
    }
    config.created = Some(created);
    config.architecture = "amd64".into();
    config.os = "linux".into();
    config.rootfs = oci::RootFs {
        kind: "layers".into(),
        diff_ids: layers.iter().map(|l| l.diff_id.clone()).collect(),
    };
    let config_desc = oci::put_json(&worker.content, oci::MEDIA_CONFIG, &config)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: oci::MEDIA_MANIFEST.into(),
        config: config_desc,
        // One family: a Docker-format base image's layers are named as OCI's (same blobs).
        layers: layers
            .into_iter()
            .map(|l| form::oci_layer(l.blob))
            .collect(),
    };
    let mut desc = oci::put_json(&worker.content, oci::MEDIA_MANIFEST, &manifest)?;
    desc.platform = Some(oci::Platform {
        architecture: "amd64".into(),
        os: "linux".into(),
    });
    Ok(desc)
}

/// Writes `manifest` (the image of `result`) to `output`; an output that goes to the client
/// ([`Output::streamed`]) is written to `to`; `prefetch`: the paths of its `prefetch=FILE`.
pub fn write(
    worker: &Worker,
    output: &Output,
    result: &Ref,
    manifest: &Descriptor,
    epoch: Option<u64>,
    to: Option<Box<dyn Write + Send>>,
    prefetch: &[String],
) -> Result<String, WorkerError> {
    let stream = |to: Option<Box<dyn Write + Send>>| {
        to.map(|w| BufWriter::with_capacity(1 << 18, w))
            .ok_or_else(|| {
                WorkerError::Exec("this output goes to the client, which is not here".into())
            })
    };
    match output {
        Output::Image { name, push, form } => {
            let full = crate::worker::images::normalize(name);
            worker.db.put_image(&ImageRecord {
                name: full.clone(),
                manifest: manifest.clone(),
                created: now(),
            })?;
            if *push {
                worker.push(name, &form::apply(worker, manifest, form, prefetch)?)?;
                return Ok(format!("naming to {full}, pushed"));
            }
            Ok(format!("naming to {full}"))
        }
        Output::Oci { dest, name, form } => {
            let manifest = &form::apply(worker, manifest, form, prefetch)?;
            let name =
                crate::worker::images::normalize(name.as_deref().unwrap_or("strata-build:latest"));
            let mut w = stream(to)?;
            oci::write_layout_archive(
                &worker.content,
                manifest,
                &name,
                epoch.unwrap_or(0),
                &mut w,
            )?;
            w.flush().map_err(WorkerError::io(format!("send {dest}")))?;
            Ok(format!("exporting OCI archive {dest} ({name})"))
        }
        Output::Containerd {
            name,
            address,
            namespace,
        } => containerd(worker, manifest, name, address, namespace),
        Output::Docker { dest, name, form } => {
            let manifest = &form::apply(worker, manifest, form, prefetch)?;
            let name = name.as_deref().map(crate::worker::images::normalize);
            let mut w = stream(to)?;
            docker_archive(
                worker,
                manifest,
                name.as_deref(),
                epoch.unwrap_or(0),
                &mut w,
            )?;
            w.flush().map_err(WorkerError::io(format!("send {dest}")))?;
            Ok(format!("exporting docker archive {dest}"))
        }
        Output::Local { dest } => {
            let mut w = stream(to)?;
            local_tar(worker, result, &mut w)?;
            w.flush().map_err(WorkerError::io(format!("send {dest}")))?;
            Ok(format!("copying files to {dest}"))
        }
    }
}

/// `type=containerd`: the image imported into a containerd's content store and named there.
fn containerd(
    worker: &Worker,
    manifest: &Descriptor,
    name: &str,
    address: &str,
    namespace: &str,
) -> Result<String, WorkerError> {
    let full = crate::worker::images::normalize(name);
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| WorkerError::Exec("containerd export needs the async runtime".into()))?;
    handle
        .block_on(strata_image::containerd::import(
            &worker.content,
            manifest,
            &full,
            Path::new(address),
            namespace,
            None,
        ))
        .map_err(|e| WorkerError::Image(e.0))?;
    Ok(format!(
        "importing to containerd {address} as {full} (namespace {namespace})"
    ))
}

/// `type=local`: the result's files as a tar (owners, modes, times, links kept), which the client
/// unpacks into its directory.
fn local_tar(worker: &Worker, result: &Ref, w: &mut dyn Write) -> Result<(), WorkerError> {
    let mut tar = tar::Builder::new(w);
    tar.follow_symlinks(false);
    if let Ref::Snapshot(top) = result {
        worker.with_view(top, |root| {
            tar.append_dir_all(".", root)
                .map_err(WorkerError::io("the result's files"))
        })?;
    }
    tar.finish().map_err(WorkerError::io("the result's files"))
}

/// Writes the image as `docker save` does (manifest.json, the config, one tar per layer).
fn docker_archive(
    worker: &Worker,
    manifest: &Descriptor,
    name: Option<&str>,
    mtime: u64,
    out: impl std::io::Write,
) -> Result<(), WorkerError> {
    let m: Manifest = oci::read_json(&worker.content, &digest(manifest)?)?;
    let config = Digest::parse(&m.config.digest).map_err(|e| WorkerError::Image(e.to_string()))?;
    let mut tar = tar::Builder::new(out);
    let mut add =
        |path: &str, reader: &mut dyn std::io::Read, size: u64| -> Result<(), WorkerError> {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_mtime(mtime);
            h.set_size(size);
            tar.append_data(&mut h, path, reader)
                .map_err(WorkerError::io("write docker archive"))
        };
    let config_name = format!("{}.json", config.hex());
    add(
        &config_name,
        &mut worker.content.open_blob(&config)?,
        worker.content.size(&config)?,
    )?;
    let mut layers = Vec::new();
    for l in &m.layers {
        let d = Digest::parse(&l.digest).map_err(|e| WorkerError::Image(e.to_string()))?;
        let path = format!("{}/layer.tar", d.hex());
        add(
            &path,
            &mut worker.content.open_blob(&d)?,
            worker.content.size(&d)?,
        )?;
        layers.push(path);
    }
    // docker.io/library/app:1 is "app:1" to docker.
    let tag = name.map(|n| {
        n.trim_start_matches("docker.io/")
            .trim_start_matches("library/")
            .to_string()
    });
    let index = serde_json::json!([{ "Config": config_name, "RepoTags": tag.into_iter().collect::<Vec<_>>(), "Layers": layers }]);
    let bytes = serde_json::to_vec(&index).expect("json");
    add("manifest.json", &mut &bytes[..], bytes.len() as u64)?;
    tar.into_inner()
        .map_err(WorkerError::io("write docker archive"))?;
    Ok(())
}

/// The digest of a manifest descriptor, parsed.
pub fn digest(desc: &Descriptor) -> Result<Digest, WorkerError> {
    Digest::parse(&desc.digest).map_err(|e| WorkerError::Image(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_outputs() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(
            Output::parse("type=oci,dest=x.tar").unwrap(),
            Output::Oci {
                dest: "x.tar".into(),
                name: None,
                form: LayerForm::OCI,
            }
        );
        // Form keys may come before the type; a Docker archive defaults to Docker's types.
        let docker = Output::parse("compression=uncompressed,type=docker,dest=x").unwrap();
        let Output::Docker { form, .. } = docker else {
            panic!("{docker:?}")
        };
        assert_eq!(
            (form.compression, form.oci),
            (crate::form::Compression::Uncompressed, false)
        );
        assert_eq!(
            Output::parse("out").unwrap(),
            Output::Local { dest: "out".into() }
        );
        assert_eq!(
            Output::parse("type=docker,dest=x").unwrap(),
            Output::Docker {
                dest: "x".into(),
                name: None,
                form: LayerForm::DOCKER,
            }
        );
        assert!(Output::parse("type=tar,dest=x")
            .unwrap_err()
            .0
            .contains("not supported"));
        assert!(Output::parse("type=oci,dst=x")
            .unwrap_err()
            .0
            .contains("unknown key"));
    }
}
