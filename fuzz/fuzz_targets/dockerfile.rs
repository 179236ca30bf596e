//! Dockerfile parse + convert (variable expansion, stages, mounts, COPY): any text gives a
//! definition or an error, never a panic, abort or unbounded work.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_image::oci::ImageConfig;
use strata_solver::dockerfile::convert::{convert, ConvertOptions, ImageResolver};

struct Base;

impl ImageResolver for Base {
    fn resolve(&self, reference: &str) -> Result<(String, ImageConfig), String> {
        if reference.len() > 200 {
            return Err("no such image".into());
        }
        let mut c = ImageConfig::default();
        c.config.env = vec!["PATH=/bin".into(), "HOME=/root".into()];
        c.config.on_build = Some(vec!["RUN echo onbuild".into()]);
        Ok((format!("sha256:{}", "0".repeat(64)), c))
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut opts = ConvertOptions::default();
        opts.build_args.insert("A".into(), "${B:-x}".into());
        let _ = convert(text, &opts, &Base);
    }
});
