//! Pulling base images from and pushing results to a real registry (Debian's docker-registry).

use strata_fs_tests::containerd::Containerd;
use strata_fs_tests::daemon::Daemon;
use strata_fs_tests::image::{busybox_layer, write_oci_archive};
use strata_fs_tests::registry::Registry;
use strata_fs_tests::strata::Strata;
use strata_snapshotter::registry::{Client, Options, Reference};

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
