//! `make-test-image OUT.tar NAME [LAYER.tar]`: writes an OCI layout tar holding image NAME: the
//! offline busybox test image, or one layer from LAYER.tar (how scripts/debian-image packs a
//! debootstrap root).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(3..=4).contains(&args.len()) {
        eprintln!("usage: make-test-image OUT.tar NAME [LAYER.tar]   (e.g. docker.io/strata/busybox:demo)");
        std::process::exit(2);
    }
    let layer = match args.get(3) {
        Some(path) => std::fs::read(path).unwrap_or_else(|e| {
            eprintln!("read {path}: {e}");
            std::process::exit(1)
        }),
        None => strata_fs_tests::image::busybox_layer().finish(),
    };
    strata_fs_tests::image::write_oci_archive(args[1].as_ref(), &args[2], &[layer], &["/bin/sh"]);
}
