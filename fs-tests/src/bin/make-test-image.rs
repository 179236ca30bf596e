//! `make-test-image OUT.tar NAME`: writes the offline busybox test image as an OCI layout tar.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: make-test-image OUT.tar NAME   (e.g. docker.io/strata/busybox:demo)");
        std::process::exit(2);
    }
    let layer = strata_fs_tests::image::busybox_layer().finish();
    strata_fs_tests::image::write_oci_archive(args[1].as_ref(), &args[2], &[layer], &["/bin/sh"]);
}
