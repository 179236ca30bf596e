//! Cache-mount benchmark: a C project of FILES generated files (default 300) is built in a Debian
//! image with gcc, then rebuilt after one source file changes, in the same run:
//! - with `RUN --mount=type=cache,target=/root/.ccache make CC="ccache gcc"` (the compiler cache
//!   survives the rebuild: one file recompiles);
//! - with a plain `RUN make` (every file recompiles).
//!
//! `cache-mount-bench [FILES] [REPEATS]` prints the medians in seconds and their ratio. The Debian
//! image is made once by scripts/debian-image (debootstrap) and cached.

use std::fmt::Write as _;
use std::time::Instant;
use strata_benches::Row;

use strata_fs_tests::image;
use strata_fs_tests::strata::Strata;

const IMAGE: &str = "localhost/strata-test/debian-gcc:bookworm";
const FUNCTIONS: usize = 60;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Source file `i`; `variant` changes its code (not just a comment, which ccache would ignore).
fn source(i: usize, variant: usize) -> String {
    let mut s = String::from("#include <stdint.h>\n");
    for k in 0..FUNCTIONS {
        writeln!(
            s,
            "uint64_t f{i}_{k}(uint64_t x) {{ uint64_t s = {variant}; for (uint64_t j = 0; j < x; j++) {{ s += (j * {k}u) ^ (s >> 3); s = (s << 7) | (s >> 57); }} return s + {i}u; }}"
        )
        .unwrap();
    }
    s
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("FILES and REPEATS are numbers"))
        .collect();
    let files = args.first().copied().unwrap_or(300);
    let repeats = args.get(1).copied().unwrap_or(3);
    let s = Strata::with_image(&image::debian("gcc"));

    let mut main_c = String::from("#include <stdio.h>\n#include <stdint.h>\n");
    for i in 0..files {
        s.file(&format!("src/f{i}.c"), &source(i, 0));
        writeln!(main_c, "uint64_t f{i}_0(uint64_t);").unwrap();
    }
    main_c.push_str("int main(void) { uint64_t t = 0;\n");
    for i in 0..files {
        writeln!(main_c, "t += f{i}_0(3);").unwrap();
    }
    main_c.push_str("printf(\"%llu\\n\", (unsigned long long)t); return 0; }\n");
    s.file("src/main.c", &main_c);
    s.file(
        "src/Makefile",
        "OBJS := $(patsubst %.c,%.o,$(wildcard *.c))\napp: $(OBJS)\n\t$(CC) -o $@ $^\n%.o: %.c\n\t$(CC) -O2 -c $< -o $@\n",
    );
    let head = format!("FROM {IMAGE}\nCOPY src /src\nWORKDIR /src\n");
    s.file(
        "cached.Dockerfile",
        &format!("{head}ENV CCACHE_DIR=/root/.ccache\nRUN --mount=type=cache,target=/root/.ccache make -j$(nproc) CC=\"ccache gcc\" && ./app\n"),
    );
    s.file(
        "plain.Dockerfile",
        &format!("{head}RUN make -j$(nproc) && ./app\n"),
    );
    let build = |name: &str| {
        let f = s.path().join(name);
        let t = Instant::now();
        s.build_ok(&["-f", f.to_str().unwrap()]);
        t.elapsed().as_secs_f64()
    };
    println!(
        "cache-mount-bench: {files} C files x {FUNCTIONS} functions, gcc -O2, {repeats} rebuilds"
    );
    let cold_cached = build("cached.Dockerfile");
    let cold_plain = build("plain.Dockerfile");
    println!("  first build: with cache mount {cold_cached:.2}s, without {cold_plain:.2}s");
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 1..=repeats {
        let changed = round * 7 % files;
        s.file(&format!("src/f{changed}.c"), &source(changed, round));
        with.push(build("cached.Dockerfile"));
        without.push(build("plain.Dockerfile"));
    }
    let (w, wo) = (median(with), median(without));
    println!(
        "  rebuild after changing one file (median): with cache mount {w:.2}s, without {wo:.2}s"
    );
    println!(
        "  ratio with/without: {:.3} ({:.1}x faster)",
        w / wo,
        wo / w
    );
    let case = format!("C rebuild, {files} files, one changed, ccache in a cache mount");
    Row::new("cache mount", &case, "s", w)
        .against("without the cache mount", wo)
        .report();
}
