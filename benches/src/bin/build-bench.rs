//! Build benchmarks, each against a peer in the same run:
//! (a) four independent ~2 s stages: default parallelism vs `--max-parallelism 1`;
//! (b) a fully cached rebuild of a 20-step Dockerfile vs its uncached build;
//! (c) a rebuild after changing the file copied at step 10 of 20 vs the uncached build.
//!
//! `build-bench [REPEATS]` (default 3) prints medians in seconds and the ratios.

use std::time::Instant;

use strata_fs_tests::strata::Strata;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn timed(s: &Strata, args: &[&str]) -> f64 {
    let t = Instant::now();
    s.build_ok(args);
    t.elapsed().as_secs_f64()
}

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPEATS is a number"))
        .unwrap_or(3);

    let s = Strata::new();
    let mut df = String::new();
    for i in 0..4 {
        df.push_str(&format!(
            "FROM busybox AS s{i}\nRUN sleep 2; echo {i} > /out{i}\n"
        ));
    }
    df.push_str("FROM busybox\n");
    for i in 0..4 {
        df.push_str(&format!("COPY --from=s{i} /out{i} /\n"));
    }
    s.dockerfile(&df);
    let par = median((0..repeats).map(|_| timed(&s, &["--no-cache"])).collect());
    let seq = median(
        (0..repeats)
            .map(|_| timed(&s, &["--no-cache", "--max-parallelism", "1"]))
            .collect(),
    );

    let s = Strata::new();
    let mut df = String::from("FROM busybox\n");
    for i in 1..20 {
        if i == 10 {
            s.file("step10.txt", "v0");
            df.push_str("COPY step10.txt /step10.txt\n");
        } else {
            df.push_str(&format!(
                "RUN echo step {i} > /f{i} && cat /proc/loadavg > /dev/null\n"
            ));
        }
    }
    s.dockerfile(&df);
    let cold = median((0..repeats).map(|_| timed(&s, &["--no-cache"])).collect());
    let cached = median((0..repeats).map(|_| timed(&s, &[])).collect());
    let changed = median(
        (0..repeats)
            .map(|r| {
                s.file("step10.txt", &format!("v{}", r + 1));
                timed(&s, &[])
            })
            .collect(),
    );
    println!("strata build benchmarks, median of {repeats} (seconds)");
    println!("(a) 4 parallel stages of 2 s      default {par:>7.2}   --max-parallelism 1 {seq:>7.2}   ratio {:.2}", par / seq);
    println!("(b) 20 steps, fully cached         cached  {cached:>7.2}   uncached             {cold:>7.2}   ratio {:.3}", cached / cold);
    println!("(c) 20 steps, step 10 changed      rebuild {changed:>7.2}   uncached             {cold:>7.2}   ratio {:.2}", changed / cold);
}
