//! The one-shot commands: `convert` and `pull --lazy`.

use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use strata_image::chunked::{convert, write};
use strata_image::containerd::{
    pull_lazy as containerd_pull_lazy, Destination, ImportError, LayerPull,
};
use strata_image::content::{ContentStore, Digest};
use strata_image::oci::{self, Descriptor, Manifest};
use strata_image::registry::{Client, Options, Reference};
use strata_image::transfer;

fn client(insecure: Vec<String>) -> Client {
    Client::new(Options {
        insecure,
        ..Default::default()
    })
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// Reads SRC (`oci-archive:FILE`, `oci:DIR`, or a registry reference) into `store`.
fn read_source(
    store: &ContentStore,
    src: &str,
    c: &Client,
) -> anyhow::Result<(Descriptor, Manifest)> {
    let from_layout = |images: Vec<oci::LayoutImage>| -> anyhow::Result<(Descriptor, Manifest)> {
        let first = images
            .into_iter()
            .next()
            .context("the layout lists no image")?;
        let m: Manifest = oci::read_json(store, &Digest::parse(&first.manifest.digest)?)?;
        Ok((first.manifest, m))
    };
    if let Some(path) = src.strip_prefix("oci-archive:") {
        let f = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
        from_layout(oci::read_layout_archive(store, f)?)
    } else if let Some(dir) = src.strip_prefix("oci:") {
        from_layout(oci::read_layout_dir(store, Path::new(dir))?)
    } else {
        let r = Reference::parse(src.trim_start_matches("docker://"))?;
        Ok(transfer::pull(c, &r, store)?)
    }
}

pub fn convert(
    src: &str,
    dst: &str,
    (chunk_size, format): (u64, write::Format),
    prefetch: Option<&Path>,
    insecure: Vec<String>,
) -> anyhow::Result<()> {
    let order: Vec<String> = match prefetch {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("read the prefetch list {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect(),
        None => Vec::new(),
    };
    let c = client(insecure);
    let tmp = tempfile::Builder::new()
        .prefix("strata-convert-")
        .tempdir()
        .context("create a work directory")?;
    let store = ContentStore::open(tmp.path())?;
    let (_, manifest) = read_source(&store, src, &c).with_context(|| format!("read {src}"))?;
    let (name, level) = match format {
        write::Format::ZstdChunked => ("zstd:chunked", 3),
        write::Format::Estargz => ("eStargz", 6),
    };
    let b = bar(
        manifest.layers.len() as u64,
        &format!("converting to {name}"),
    );
    let opts = write::Options {
        chunk_size,
        format,
        level,
        ..Default::default()
    };
    let out = convert::convert(&store, &manifest, opts, &order, true, &|i, _, _| {
        b.set_position(i as u64)
    })?;
    b.finish_and_clear();
    let before: u64 = manifest.layers.iter().map(|l| l.size).sum();
    let after: u64 = out.layers.iter().map(|l| l.size).sum();
    if let Some(path) = dst.strip_prefix("oci-archive:") {
        let desc = oci::put_json(&store, oci::MEDIA_MANIFEST, &out)?;
        let f = std::fs::File::create(path).with_context(|| format!("create {path}"))?;
        oci::write_layout_archive(&store, &desc, "localhost/converted:latest", 0, f)?;
    } else {
        let r = Reference::parse(dst.trim_start_matches("docker://"))?;
        transfer::push(&c, &r, &store, &out)?;
    }
    println!(
        "converted {} layers: {before} -> {after} bytes; wrote {dst}",
        out.layers.len()
    );
    Ok(())
}

/// An image's manifest from its registry, in a content store under a temporary directory.
struct Fetched {
    client: Client,
    reference: Reference,
    store: ContentStore,
    desc: Descriptor,
    manifest: strata_image::oci::Manifest,
    _dir: tempfile::TempDir,
}

fn fetch_manifest(reference: &str, insecure: Vec<String>) -> anyhow::Result<Fetched> {
    let client = client(insecure);
    let reference = Reference::parse(reference.trim_start_matches("docker://"))?;
    let dir = tempfile::Builder::new()
        .prefix("strata-manifest-")
        .tempdir()
        .context("create a work directory")?;
    let store = ContentStore::open(dir.path())?;
    let (desc, manifest) = transfer::fetch_manifest(&client, &reference, &store)?;
    Ok(Fetched {
        client,
        reference,
        store,
        desc,
        manifest,
        _dir: dir,
    })
}

/// `status --prefetch-list IMAGE`: the files containers of IMAGE read on this machine, in order.
pub fn prefetch_list(root: &Path, reference: &str, insecure: Vec<String>) -> anyhow::Result<()> {
    let f = fetch_manifest(reference, insecure)?;
    let (r, manifest) = (&f.reference, &f.manifest);
    let layers: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
    let list = strata_snapshotter::lazy::prefetch_list(root, &layers);
    if list.is_empty() {
        anyhow::bail!("no container of {r} has read a lazy layer of it here yet: run one (strata-snapshotter pull --lazy, then ctr run) and ask again");
    }
    for path in list {
        println!("{path}");
    }
    Ok(())
}

pub fn pull_lazy(
    reference: &str,
    address: &Path,
    namespace: &str,
    snapshotter: &str,
    insecure: Vec<String>,
) -> anyhow::Result<()> {
    let f = fetch_manifest(reference, insecure)?;
    let (c, r, store, desc, manifest) = (&f.client, &f.reference, &f.store, &f.desc, &f.manifest);
    transfer::fetch_blob(c, r, store, &manifest.config)?;
    let total: u64 = manifest.layers.iter().map(|l| l.size).sum();
    let b = bar(manifest.layers.len() as u64, &format!("pulling {r} lazily"));
    let fetched = std::sync::atomic::AtomicU64::new(0);
    let fetch_layer = |l: &Descriptor| -> Result<(), ImportError> {
        transfer::fetch_blob(c, r, store, l).map_err(|e| ImportError(e.to_string()))
    };
    let report = |i: usize, how: &LayerPull| {
        b.set_position(i as u64 + 1);
        let line = match how {
            LayerPull::Present => "already present".to_string(),
            LayerPull::Lazy => "mounted lazily".to_string(),
            LayerPull::Pulled(n) => {
                fetched.fetch_add(*n, std::sync::atomic::Ordering::Relaxed);
                format!("neither zstd:chunked nor eStargz: pulled whole ({n} bytes)")
            }
        };
        // Printed even when the bar is hidden (no terminal).
        b.suspend(|| {
            eprintln!(
                "layer {}/{}: {}: {line}",
                i + 1,
                manifest.layers.len(),
                manifest.layers[i].digest
            )
        });
    };
    let name = r.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(containerd_pull_lazy(
        store,
        &name,
        desc,
        &name,
        &Destination {
            address,
            namespace,
            snapshotter,
        },
        &fetch_layer,
        &report,
    ))?;
    b.finish_and_clear();
    println!(
        "pulled {name}: {} of {total} layer bytes downloaded; the rest is fetched on demand (see `strata-snapshotter status`)",
        fetched.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
