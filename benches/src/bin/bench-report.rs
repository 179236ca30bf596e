//! Renders the rows a `scripts/bench` run reported into README.md's performance table, between
//! the `<!-- bench:begin -->` and `<!-- bench:end -->` lines, so the table is one run's numbers.
//!
//! `bench-report REPORT README`

use std::fmt::Write;

use strata_benches::Row;

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

fn number(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

fn with_unit(v: f64, unit: &str) -> String {
    match unit {
        "" => format!("{v:.0}"),
        "%" => format!("{}%", number(v)),
        _ => format!("{} {unit}", number(v)),
    }
}

fn table(rows: &[Row], machine: &str) -> String {
    let mut t = format!("{machine}\n\n| bench | case | Strata | peer | peer's | ratio |\n");
    t.push_str("|---|---|---:|---|---:|---:|\n");
    for r in rows {
        let peer = r.peer_value.map(|v| with_unit(v, &r.unit));
        let ratio = r.ratio().map(|x| format!("{x:.2}"));
        let dash = || "—".to_string();
        writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} |",
            r.bench,
            r.case,
            with_unit(r.strata, &r.unit),
            if r.peer.is_empty() { "—" } else { &r.peer },
            peer.unwrap_or_else(dash),
            ratio.unwrap_or_else(dash)
        )
        .unwrap();
    }
    t
}

/// Where and when: the table's numbers only mean something next to the machine they came from.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "One `scripts/bench` run on {date}, {cpus} CPUs, Linux {}, release build. \
         Ratio = Strata / peer: below 1 Strata takes less (for MB/s rows, above 1 it is faster).",
        kernel.trim()
    )
}

fn splice(readme: &str, table: &str) -> Result<String, String> {
    let (Some(b), Some(e)) = (readme.find(BEGIN), readme.find(END)) else {
        return Err(format!(
            "the README has no {BEGIN} ... {END} lines to put the table between"
        ));
    };
    if e < b {
        return Err(format!("the README has {END} before {BEGIN}"));
    }
    Ok(format!("{}{BEGIN}\n{table}{}", &readme[..b], &readme[e..]))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [report, readme] = &args[..] else {
        eprintln!("usage: bench-report REPORT README");
        std::process::exit(2);
    };
    let lines = std::fs::read_to_string(report)
        .unwrap_or_else(|e| panic!("reading the bench report {report}: {e}"));
    let rows: Vec<Row> = lines.lines().filter_map(Row::parse).collect();
    if rows.is_empty() {
        eprintln!("{report} has no rows: did the benches run with STRATA_BENCH_REPORT set?");
        std::process::exit(1);
    }
    let text = std::fs::read_to_string(readme).expect("reading the README");
    match splice(&text, &table(&rows, &machine())) {
        Ok(new) => std::fs::write(readme, new).expect("writing the README"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
    println!(
        "{readme}: performance table regenerated from {} rows",
        rows.len()
    );
}
