//! OCI layout archives (index.json, manifests, configs, blobs) loaded into a content store.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_image::content::ContentStore;
use strata_image::oci;

fuzz_target!(|archive: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let store = ContentStore::open(dir.path()).unwrap();
    let _ = oci::read_layout_archive(&store, archive);
});
