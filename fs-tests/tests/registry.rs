//! Pulling base images from and pushing results to a real registry (Debian's docker-registry).

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::Daemon;
use strata_fs_tests::image::{busybox_layer, write_oci_archive};
use strata_fs_tests::registry::Registry;
use strata_fs_tests::strata::Strata;
use strata_image::registry::{Client, Options, Reference};

#[test]
fn build_pulls_its_base_and_pushes_the_result() {
    let reg = Registry::start();
    let s = Strata::empty();
    let archive = s.root.path().join("busybox.tar");
    write_oci_archive(
        &archive,
        "docker.io/library/busybox:latest",
        &[busybox_layer().finish()],
        &["/bin/sh"],
    );
    reg.push_archive(&archive, "library/busybox:latest");

    s.file("msg", "pushed and pulled");
    s.dockerfile(&format!(
        "FROM {}/library/busybox\nCOPY msg /msg\nCMD [\"cat\", \"/msg\"]\n",
        reg.host
    ));
    let target = format!("{}/team/app:1", reg.host);
    let spec = format!("type=image,name={target},push=true");
    let b = s.build_ok(&["--output", &spec]);
    assert!(b.progress.contains("pushed"), "{}", b.progress);

    // A real client pulls and runs what was pushed.
    let strata = Daemon::start();
    let c = Containerd::start(&strata.socket);
    c.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "strata",
        &target,
    ]);
    let out = c.ctr(&["run", "--rm", "--snapshotter", "strata", &target, "pushed"]);
    assert_eq!(out.trim(), "pushed and pulled");

    // Range reads of a blob are answered 206 with exactly those bytes.
    let client = Client::new(Options::default());
    let r = Reference::parse(&target).unwrap();
    let (bytes, _, _) = client.manifest(&r).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut whole = Vec::new();
    client.blob(&r, &layer, &mut whole).unwrap();
    assert_eq!(
        client.blob_range(&r, &layer, 100, 612).unwrap(),
        whole[100..612]
    );

    // A base image that is nowhere gets a clear error.
    s.dockerfile(&format!("FROM {}/library/nothere\n", reg.host));
    let b = s.build(&[]);
    assert!(
        !b.ok && b.progress.contains("nothere") && b.progress.contains("pulling it failed"),
        "{}",
        b.progress
    );
}

#[test]
fn build_cache_and_cache_mounts_travel_through_the_registry() {
    let reg = Registry::start();
    let cache = format!("{}/app/cache:1", reg.host);
    let dockerfile = "FROM busybox\n\
        COPY src.txt /src.txt\n\
        RUN --mount=type=cache,id=compiler,target=/cache,uid=7,mode=0750 echo run >> /cache/log && echo runs $(wc -l < /cache/log) owner $(stat -c '%u %a' /cache)\n\
        RUN echo second > /second\n";
    // Machine A builds and exports everything, cache mounts included.
    let a = Strata::new();
    a.dockerfile(dockerfile);
    a.file("src.txt", "v1");
    let to = format!("type=registry,ref={cache},mode=max,mounts=true");
    let b = a.build_ok(&["--cache-to", &to]);
    assert!(b.progress.contains("runs 1 owner 7 750"), "{}", b.progress);
    assert!(b.progress.contains("exporting cache to"), "{}", b.progress);

    // Machine B starts warm: nothing runs.
    let m = Strata::new();
    m.dockerfile(dockerfile);
    m.file("src.txt", "v1");
    let from = format!("type=registry,ref={cache},mounts=true");
    let b = m.build_ok(&["--cache-from", &from]);
    assert!(b.progress.contains("built in"), "{}", b.progress);
    assert!(
        b.progress.contains(", 0 run"),
        "everything cached on B:\n{}",
        b.progress
    );
    // A changed source reruns the step on B, with A's cache volume (ownership kept).
    m.file("src.txt", "v2");
    let b = m.build_ok(&["--cache-from", &from]);
    assert!(b.progress.contains("runs 2 owner 7 750"), "{}", b.progress);

    // mode=min exports the final image's chain: a third machine gets the last step cached.
    let min = format!("{}/app/cache:min", reg.host);
    a.build_ok(&["--cache-to", &format!("type=registry,ref={min}")]);
    let c = Strata::new();
    c.dockerfile(dockerfile);
    c.file("src.txt", "v1");
    let b = c.build_ok(&["--cache-from", &min]);
    assert!(b.progress.contains(", 0 run"), "{}", b.progress);
    let ls = String::from_utf8(c.run(&["cache", "ls"]).stdout).unwrap();
    assert!(
        !ls.contains("compiler"),
        "mounts=false imports no volume: {ls}"
    );

    // Not a cache, or no registry: the build goes on cold, saying why.
    let busybox = format!("{}/library/busybox:latest", reg.host);
    let archive = c.root.path().join("bb.tar");
    write_oci_archive(
        &archive,
        "docker.io/library/busybox:latest",
        &[busybox_layer().finish()],
        &["/bin/sh"],
    );
    reg.push_archive(&archive, "library/busybox:latest");
    let d = Strata::new();
    d.dockerfile(dockerfile);
    d.file("src.txt", "v1");
    let b = d.build_ok(&[
        "--cache-from",
        &busybox,
        "--cache-from",
        "127.0.0.1:1/nothing:here",
    ]);
    assert!(
        b.progress.contains("is not a strata build cache")
            && b.progress.contains("no inline cache"),
        "{}",
        b.progress
    );
    assert!(b.progress.contains("runs 1"), "{}", b.progress);
}

#[test]
fn build_caches_in_a_local_directory_and_inline_in_the_image() {
    let dockerfile = "FROM busybox\n\
        COPY src.txt /src.txt\n\
        RUN echo built from $(cat /src.txt) > /out\n\
        RUN echo second > /second\n";
    let a = Strata::new();
    a.dockerfile(dockerfile);
    a.file("src.txt", "v1");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("ci/cache");
    // A first CI run: no cache yet (a cold build that says so), one exported.
    let from = format!("type=local,src={}", cache.display());
    let to = format!("type=local,dest={},mode=max", cache.display());
    let b = a.build_ok(&["--cache-from", &from, "--cache-to", &to]);
    assert!(b.progress.contains("not imported"), "{}", b.progress);
    assert!(
        b.progress.contains("0 blobs already there"),
        "{}",
        b.progress
    );
    // An OCI layout, as BuildKit's local cache: the index names the cache by its tag.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.join("index.json")).unwrap()).unwrap();
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "latest"
    );
    let hex = entry["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    assert!(cache.join("blobs/sha256").join(hex).is_file());
    assert!(cache.join("oci-layout").is_file());
    let blobs = std::fs::read_dir(cache.join("blobs/sha256"))
        .unwrap()
        .count();

    // Exported again unchanged: every blob is already there, none is sent.
    let b = a.build_ok(&["--cache-to", &to]);
    assert!(
        b.progress.contains(&format!("{blobs} blobs already there")),
        "{blobs} blobs:\n{}",
        b.progress
    );

    // Another machine starts warm from the directory.
    let m = Strata::new();
    m.dockerfile(dockerfile);
    m.file("src.txt", "v1");
    let b = m.build_ok(&["--cache-from", &from]);
    assert!(b.progress.contains(", 0 run"), "{}", b.progress);
    // A blob altered in the directory (here the cache's config) is refused by its digest.
    let blob = |d: &serde_json::Value| {
        let hex = d["digest"].as_str().unwrap().trim_start_matches("sha256:");
        cache.join("blobs/sha256").join(hex)
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(entry)).unwrap()).unwrap();
    let config = blob(&manifest["config"]);
    let mut bytes = std::fs::read(&config).unwrap();
    bytes.push(b' ');
    std::fs::write(&config, bytes).unwrap();
    let n = Strata::new();
    n.dockerfile(dockerfile);
    n.file("src.txt", "v1");
    let b = n.build_ok(&["--cache-from", &from]);
    assert!(b.progress.contains("not imported"), "{}", b.progress);
    assert!(b.progress.contains(", 0 cached, 4 run"), "{}", b.progress);

    // Inline: the image carries the records of its own layers under BuildKit's key.
    let reg = Registry::start();
    let image = format!("{}/app/inline:1", reg.host);
    let push = format!("type=image,name={image},push=true");
    a.build_ok(&["--cache-to", "type=inline", "--output", &push]);
    let client = Client::new(Options::default());
    let r = Reference::parse(&image).unwrap();
    let (bytes, _, _) = client.manifest(&r).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut config = Vec::new();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    client.blob(&r, config_digest, &mut config).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert!(config["moby.buildkit.cache.v0"].is_string(), "{config:#}");
    let c = Strata::new();
    c.dockerfile(dockerfile);
    c.file("src.txt", "v1");
    let b = c.build_ok(&["--cache-from", &image]);
    assert!(b.progress.contains(", 0 run"), "{}", b.progress);
    // An image built FROM it does not carry its base's inline cache.
    c.dockerfile(&format!("FROM {image}\nRUN echo more > /more\n"));
    let derived = format!("{}/app/derived:1", reg.host);
    c.build_ok(&["--output", &format!("type=image,name={derived},push=true")]);
    let r = Reference::parse(&derived).unwrap();
    let (bytes, _, _) = client.manifest(&r).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut config = Vec::new();
    client
        .blob(
            &r,
            manifest["config"]["digest"].as_str().unwrap(),
            &mut config,
        )
        .unwrap();
    assert!(!String::from_utf8_lossy(&config).contains("moby.buildkit.cache"));
}

#[test]
fn large_blobs_upload_in_chunks_and_read_back_by_range() {
    let reg = Registry::start();
    let c = Client::new(Options::default());
    let r = Reference::parse(&format!("{}/strata/big:1", reg.host)).unwrap();
    let data: Vec<u8> = (0..40u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = strata_image::content::Digest::of(&data).to_string();
    c.push_blob(&r, &digest, &data).unwrap();
    let mut back = Vec::new();
    c.blob(&r, &digest, &mut back).unwrap();
    assert!(back == data, "the blob reads back whole");
    let part = c
        .blob_range(&r, &digest, 17 << 20, (17 << 20) + 1000)
        .unwrap();
    assert_eq!(part, &data[17 << 20..(17 << 20) + 1000]);
    // A second push of the same blob is a no-op.
    c.push_blob(&r, &digest, &data).unwrap();
}
