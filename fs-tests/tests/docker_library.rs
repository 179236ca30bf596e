//! docker-library's `buildpack-deps` images (bookworm `curl`, and `scm` on top of it), built by
//! `strata build` and by BuildKit in dockerd 20.10 from the same Debian base pushed in Docker's
//! format: both results, exported from a container of each, are equal entry by entry. Their RUN
//! steps `apt-get install` from Debian's mirror, as the public Dockerfiles do.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use strata_fs_tests::dockerd::{Dockerd, DOCKER};
use strata_fs_tests::image::{archive_files, debian};
use strata_fs_tests::registry::Registry;
use strata_fs_tests::strata::Strata;

/// docker-library/buildpack-deps `debian/bookworm/curl/Dockerfile` (FROM line pointed at the test
/// registry's copy of the base).
const CURL: &str = "RUN set -eux; \\
\tapt-get update; \\
\tapt-get install -y --no-install-recommends \\
\t\tca-certificates \\
\t\tcurl \\
\t\tgnupg \\
\t\tnetbase \\
\t\tsq \\
\t\twget \\
\t; \\
\trm -rf /var/lib/apt/lists/*
";

/// docker-library/buildpack-deps `debian/bookworm/scm/Dockerfile` (FROM line as above).
const SCM: &str = "# procps is very common in build systems, and is a reasonably small package
RUN apt-get update && apt-get install -y --no-install-recommends \\
\t\tgit \\
\t\tgit-lfs \\
\t\tmercurial \\
\t\topenssh-client \\
\t\tsubversion \\
\t\t\\
\t\tprocps \\
\t&& rm -rf /var/lib/apt/lists/*
";

/// What is compared of an entry: type, mode, owner, size, link target, file capabilities. A hard
/// link counts as the file it links to: which of its names a walk meets first is not the image's.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    owner: (u64, u64),
    size: u64,
    link: String,
    capability: Option<Vec<u8>>,
}

/// Every entry of `docker export` of a container made from `image`, by path.
fn exported(docker: &Dockerd, image: &str) -> BTreeMap<String, Entry> {
    let id = docker.docker(&["create", image, "true"]);
    let mut child = Command::new(DOCKER)
        .args(["-H", &docker.socket(), "export", id.trim()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut entries = BTreeMap::new();
    let mut hardlinks = Vec::new();
    let mut tar = tar::Archive::new(child.stdout.take().unwrap());
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let h = e.header().clone();
        let link = h
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut entry = Entry {
            kind: kind(h.entry_type()),
            mode: h.mode().unwrap(),
            owner: (h.uid().unwrap(), h.gid().unwrap()),
            size: h.size().unwrap(),
            link: link.clone().unwrap_or_default(),
            capability: capability(&mut e),
        };
        if h.entry_type() == tar::EntryType::Link {
            hardlinks.push((path.clone(), link.unwrap()));
            entry.link.clear();
        }
        entries.insert(path, entry);
    }
    assert!(child.wait().unwrap().success(), "docker export {image}");
    for (path, target) in hardlinks {
        let target = entries[target.trim_end_matches('/')].clone();
        entries.insert(path, target);
    }
    docker.docker(&["rm", id.trim()]);
    entries
}

fn kind(t: tar::EntryType) -> char {
    match t {
        tar::EntryType::Regular | tar::EntryType::Link => 'f',
        tar::EntryType::Directory => 'd',
        tar::EntryType::Symlink => 'l',
        tar::EntryType::Char => 'c',
        tar::EntryType::Block => 'b',
        tar::EntryType::Fifo => 'p',
        other => panic!("unexpected entry type {other:?} in docker export"),
    }
}

fn capability<R: Read>(e: &mut tar::Entry<R>) -> Option<Vec<u8>> {
    let exts = e.pax_extensions().unwrap()?;
    exts.map(|x| x.unwrap())
        .find(|x| x.key() == Ok("SCHILY.xattr.security.capability"))
        .map(|x| x.value_bytes().to_vec())
}

/// The differences between two exports, one line each (at most 40 shown).
fn differences(a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut out = Vec::new();
    for (path, x) in a {
        match b.get(path) {
            None => out.push(format!("only strata: {path}")),
            Some(y) if x != y => out.push(format!("{path}: strata {x:?}, BuildKit {y:?}")),
            _ => {}
        }
    }
    out.extend(
        b.keys()
            .filter(|p| !a.contains_key(*p))
            .map(|p| format!("only BuildKit: {p}")),
    );
    out
}

/// Builds `dockerfile` with BuildKit in dockerd, tagged `tag`, on the host's network as strata's
/// RUN steps are.
fn buildkit(docker: &Dockerd, dir: &Path, dockerfile: &str, tag: &str) {
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    let out = Command::new(DOCKER)
        .args([
            "-H",
            &docker.socket(),
            "build",
            "-q",
            "--network",
            "host",
            "-t",
            tag,
        ])
        .arg(dir)
        .env("DOCKER_BUILDKIT", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "BuildKit build of {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks an OCI archive's layers: gzip media types, and each one's uncompressed digest is its
/// diff_id in the config. Returns the archive's size.
fn gzip_layers_verify(archive: &Path) -> u64 {
    let blobs = archive_files(archive);
    let json = |path: &str| -> serde_json::Value { serde_json::from_slice(&blobs[path]).unwrap() };
    let blob = |d: &serde_json::Value| format!("blobs/sha256/{}", &d.as_str().unwrap()[7..]);
    let index = json("index.json");
    let manifest = json(&blob(&index["manifests"][0]["digest"]));
    let config = json(&blob(&manifest["config"]["digest"]));
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(
        layers.len(),
        config["rootfs"]["diff_ids"].as_array().unwrap().len()
    );
    for (layer, diff_id) in layers
        .iter()
        .zip(config["rootfs"]["diff_ids"].as_array().unwrap())
    {
        assert_eq!(
            layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
            "{manifest:#}"
        );
        let mut hash = Sha256::new();
        let gz = flate2::read::MultiGzDecoder::new(&blobs[&blob(&layer["digest"])][..]);
        std::io::copy(&mut std::io::BufReader::new(gz), &mut hash).unwrap();
        assert_eq!(
            format!("sha256:{:x}", hash.finalize()),
            diff_id.as_str().unwrap()
        );
    }
    std::fs::metadata(archive).unwrap().len()
}

#[test]
fn buildpack_deps_curl_and_scm_equal_buildkits_entry_by_entry() {
    let reg = Registry::start();
    let s = Strata::empty();
    // The base, pushed in Docker's format as Docker Hub's debian:bookworm is (which these machines
    // do not reach): the tests' bookworm minbase, made once by scripts/debian-image.
    let base = format!("{}/library/debian:bookworm", reg.host);
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--format",
            "v2s2",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci-archive:{}", debian("python").display()))
        .arg(format!("docker://{base}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // strata: curl pushed to the registry, scm built FROM it and written as OCI and docker archives.
    let curl = format!("{}/library/buildpack-deps:bookworm-curl", reg.host);
    s.dockerfile(&format!("FROM {base}\n\n{CURL}"));
    s.build_ok(&["--output", &format!("type=registry,name={curl}")]);
    s.dockerfile(&format!("FROM {curl}\n\n{SCM}"));
    let oci = s.root.path().join("scm-oci.tar");
    let saved = s.root.path().join("scm.tar");
    s.build_ok(&[
        "--output",
        &format!("type=oci,dest={},name=strata/scm", oci.display()),
        "--output",
        &format!("type=docker,dest={},name=strata/scm", saved.display()),
    ]);
    let size = gzip_layers_verify(&oci);
    eprintln!("scm OCI archive: {size} bytes");

    // BuildKit: the same two Dockerfiles from the same base.
    let docker = Dockerd::start("overlay2", &[]);
    let dir = tempfile::tempdir().unwrap();
    buildkit(
        &docker,
        dir.path(),
        &format!("FROM {base}\n\n{CURL}"),
        "bk/curl",
    );
    buildkit(
        &docker,
        dir.path(),
        &format!("FROM bk/curl\n\n{SCM}"),
        "bk/scm",
    );

    docker.docker(&["pull", &curl]);
    docker.load(&saved);
    for (ours, theirs) in [(curl.as_str(), "bk/curl"), ("strata/scm", "bk/scm")] {
        let (a, b) = (exported(&docker, ours), exported(&docker, theirs));
        let diff = differences(&a, &b);
        assert!(
            diff.is_empty(),
            "{ours} differs from BuildKit's {theirs} in {} of {} entries:\n{}",
            diff.len(),
            a.len(),
            diff[..diff.len().min(40)].join("\n")
        );
        assert!(a.len() > 5000, "{ours} has only {} entries", a.len());
    }
    // Both run the tools they installed.
    let run = |image: &str| {
        docker.docker(&[
            "run",
            "--rm",
            "--network",
            "host",
            image,
            "sh",
            "-c",
            "git --version && hg --version -q && svn --version --quiet",
        ])
    };
    assert_eq!(run("strata/scm"), run("bk/scm"));
}
