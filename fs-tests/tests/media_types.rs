//! Image outputs use one media-type family per manifest and gzip layers by default, so that every
//! tool takes them: skopeo (oci-archive → docker-daemon), `docker load`, containerd, registries.
//! The base image is in Docker's format (as `skopeo copy --format v2s2` and `docker save` write).

use std::path::Path;
use std::process::Command;

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::Daemon;
use strata_fs_tests::dockerd::Dockerd;
use strata_fs_tests::image::{archive_files, busybox_layer, write_oci_archive};
use strata_fs_tests::registry::Registry;
use strata_fs_tests::strata::Strata;

const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The manifest `reference` (`host/repo:tag`) has in the registry, as skopeo reads it.
fn registry_manifest(reference: &str) -> serde_json::Value {
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]);
    serde_json::from_str(&raw).unwrap()
}

/// The manifest inside an OCI layout archive.
fn archive_manifest(archive: &Path) -> serde_json::Value {
    let files = archive_files(archive);
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let blob = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    serde_json::from_slice(&files[&blob]).unwrap()
}

/// The manifest's own media type and its layers', checked to be of one family (`manifest_type`
/// and `layer_type`, every layer gzip).
fn one_family(m: &serde_json::Value, manifest_type: &str, layer_type: &str) {
    assert_eq!(m["mediaType"], manifest_type, "{m:#}");
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{m:#}");
    for l in layers {
        assert_eq!(l["mediaType"], layer_type, "{m:#}");
    }
}

#[test]
fn outputs_from_a_docker_format_base_use_one_family_and_gzip() {
    let reg = Registry::start();
    let s = Strata::empty();
    let base = s.root.path().join("busybox.tar");
    write_oci_archive(
        &base,
        "docker.io/library/busybox:latest",
        &[busybox_layer().finish()],
        &["/bin/sh"],
    );
    let base_ref = format!("{}/library/busybox-v2s2:latest", reg.host);
    skopeo(&[
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}", base.display()),
        &format!("docker://{base_ref}"),
    ]);
    s.dockerfile(&format!(
        "FROM {base_ref}\nRUN echo built > /built\nCMD [\"cat\", \"/built\"]\n"
    ));

    // type=oci: an OCI manifest with OCI gzip layers; skopeo puts it into dockerd.
    let oci = s.root.path().join("app-oci.tar");
    s.build_ok(&[
        "--output",
        &format!("type=oci,dest={},name=app:oci", oci.display()),
    ]);
    let m = archive_manifest(&oci);
    one_family(&m, OCI_MANIFEST, OCI_LAYER_GZIP);
    // The base layer, gzip already, keeps its blob: only its descriptor's type changed.
    let base_manifest = registry_manifest(&base_ref);
    assert_eq!(base_manifest["layers"][0]["mediaType"], DOCKER_LAYER_GZIP);
    assert_eq!(
        m["layers"][0]["digest"],
        base_manifest["layers"][0]["digest"]
    );
    let docker = Dockerd::start("overlay2", &[]);
    skopeo(&[
        "copy",
        "--dest-daemon-host",
        &docker.socket(),
        &format!("oci-archive:{}", oci.display()),
        "docker-daemon:app:oci",
    ]);
    assert_eq!(docker.docker(&["run", "--rm", "app:oci"]).trim(), "built");

    // type=docker: gzip layer tars that docker load takes.
    let saved = s.root.path().join("app-docker.tar");
    s.build_ok(&[
        "--output",
        &format!("type=docker,dest={},name=app:docker", saved.display()),
    ]);
    docker.load(&saved);
    assert_eq!(
        docker.docker(&["run", "--rm", "app:docker"]).trim(),
        "built"
    );

    // type=registry: OCI by default, Docker's family with oci-mediatypes=false; both pull.
    let strata = Daemon::start();
    let c = Containerd::start(&strata.socket);
    c.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "strata",
        oci.to_str().unwrap(),
    ]);
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        "docker.io/library/app:oci",
        "imported",
    ]);
    assert_eq!(out.trim(), "built");
    for (tag, extra, manifest_type, layer_type) in [
        ("oci", "", OCI_MANIFEST, OCI_LAYER_GZIP),
        (
            "v2s2",
            ",oci-mediatypes=false",
            DOCKER_MANIFEST,
            DOCKER_LAYER_GZIP,
        ),
    ] {
        let target = format!("{}/team/app:{tag}", reg.host);
        s.build_ok(&["--output", &format!("type=registry,name={target}{extra}")]);
        one_family(&registry_manifest(&target), manifest_type, layer_type);
        c.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "strata",
            &target,
        ]);
        let name = format!("pulled-{tag}");
        let out = c.ctr(&["run", "--rm", "--snapshotter", "strata", &target, &name]);
        assert_eq!(out.trim(), "built");
    }

    // An OCI base with oci-mediatypes=false: its layer's descriptor turns Docker's, blob kept.
    let oci_base = format!("{}/library/busybox-oci:latest", reg.host);
    skopeo(&[
        "copy",
        "--dest-compress-format",
        "gzip",
        "--dest-tls-verify=false",
        &format!("oci-archive:{}", base.display()),
        &format!("docker://{oci_base}"),
    ]);
    let s2 = Strata::empty();
    s2.dockerfile(&format!(
        "FROM {oci_base}\nRUN echo built > /built\nCMD [\"cat\", \"/built\"]\n"
    ));
    let target = format!("{}/team/app:from-oci", reg.host);
    let spec = format!("type=registry,name={target},oci-mediatypes=false");
    s2.build_ok(&["--output", &spec]);
    let m = registry_manifest(&target);
    one_family(&m, DOCKER_MANIFEST, DOCKER_LAYER_GZIP);
    let oci_manifest = registry_manifest(&oci_base);
    assert_eq!(oci_manifest["layers"][0]["mediaType"], OCI_LAYER_GZIP);
    assert_eq!(
        m["layers"][0]["digest"],
        oci_manifest["layers"][0]["digest"]
    );
    let pull = [
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "strata",
        &target,
    ];
    c.ctr(&pull);
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &target,
        "from-oci",
    ]);
    assert_eq!(out.trim(), "built");

    // zstd:chunked leaves the gzip base layer's blob alone unless forced; recompressed, every
    // digest still verifies (skopeo checks them all when it copies).
    let base_digest = base_manifest["layers"][0]["digest"].clone();
    for (tag, force) in [("chunked", false), ("forced", true)] {
        let target = format!("{}/team/app:{tag}", reg.host);
        let spec = format!(
            "type=registry,name={target},compression=zstd:chunked,force-compression={force}"
        );
        s.build_ok(&["--output", &spec]);
        let src = format!("docker://{target}");
        let m = registry_manifest(&target);
        assert_eq!(m["layers"][0]["digest"] == base_digest, !force, "{m:#}");
        assert_eq!(
            m["layers"][1]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let dest = format!("oci:{}:{tag}", s.root.path().join("copied").display());
        skopeo(&["copy", "--src-tls-verify=false", &src, &dest]);
    }

    // Keys with the values that work.
    let b = s.build(&["--output", "type=oci,dest=x.tar,compression=lz4"]);
    assert!(
        !b.ok
            && b.progress
                .contains("use gzip, zstd, zstd:chunked, estargz or uncompressed"),
        "{}",
        b.progress
    );
}
