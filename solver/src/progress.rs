//! BuildKit-style progress: `plain` lines (`#N [stage 2/3] RUN ...`, output with elapsed seconds,
//! `#N CACHED`, `#N DONE 0.3s`, `#N ERROR: ...`), or live `tty` lines, or nothing (`quiet`).

use parking_lot::Mutex;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// tty when stderr is a terminal, else plain
    Auto,
    Plain,
    Tty,
    /// One JSON object a line: {"vertex", "name"} on start, {"vertex", "log"} per output line,
    /// {"vertex", "status": "DONE"|"CACHED"|"ERROR", ...} at the end
    Rawjson,
    Quiet,
}

/// The progress of one build.
pub struct Progress {
    mode: Mode,
    next: AtomicUsize,
    out: Mutex<std::io::Stderr>,
    multi: MultiProgress,
    pub started: Instant,
}

/// The progress of one vertex.
pub struct Vertex<'a> {
    p: &'a Progress,
    id: usize,
    started: Instant,
    bar: Option<ProgressBar>,
    name: String,
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        let mode = match mode {
            Mode::Auto if std::io::IsTerminal::is_terminal(&std::io::stderr()) => Mode::Tty,
            Mode::Auto => Mode::Plain,
            m => m,
        };
        Progress {
            mode,
            next: AtomicUsize::new(1),
            out: Mutex::new(std::io::stderr()),
            multi: MultiProgress::new(),
            started: Instant::now(),
        }
    }

    fn line(&self, s: &str) {
        match self.mode {
            Mode::Quiet => {}
            Mode::Tty => {
                let _ = self.multi.println(s);
            }
            _ => {
                let mut out = self.out.lock();
                let _ = writeln!(out, "{s}");
            }
        }
    }

    /// Starts vertex `name` and prints its header.
    pub fn vertex(&self, name: &str) -> Vertex<'_> {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let bar = (self.mode == Mode::Tty).then(|| {
            let b = self.multi.add(ProgressBar::new_spinner());
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("static template"),
            );
            b.set_message(format!("[+] #{id} {name}"));
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        match self.mode {
            Mode::Rawjson => {
                self.line(&serde_json::json!({ "vertex": id, "name": name }).to_string())
            }
            _ if bar.is_none() => self.line(&format!("#{id} {name}")),
            _ => {}
        }
        Vertex {
            p: self,
            id,
            started: Instant::now(),
            bar,
            name: name.to_string(),
        }
    }

    /// A line outside any vertex (the summary).
    pub fn note(&self, s: &str) {
        if self.mode == Mode::Rawjson {
            self.line(&serde_json::json!({ "summary": s }).to_string());
        } else {
            self.line(s);
        }
    }
}

impl Vertex<'_> {
    /// One line of the step's output.
    pub fn log(&self, line: &str) {
        let t = self.started.elapsed().as_secs_f64();
        if self.p.mode == Mode::Rawjson {
            self.p.line(
                &serde_json::json!({ "vertex": self.id, "elapsed": t, "log": line }).to_string(),
            );
        } else {
            self.p.line(&format!("#{} {t:.3} {line}", self.id));
        }
    }

    fn end(self, status: String) {
        if self.p.mode == Mode::Rawjson {
            let (word, rest) = status.split_once(' ').unwrap_or((status.as_str(), ""));
            let v = serde_json::json!({ "vertex": self.id, "status": word.trim_end_matches(':'), "detail": rest, "elapsed": self.started.elapsed().as_secs_f64() });
            self.p.line(&v.to_string());
        } else if let Some(b) = &self.bar {
            b.finish_and_clear();
            self.p.line(&format!("#{} {} {status}", self.id, self.name));
        } else {
            self.p.line(&format!("#{} {status}", self.id));
        }
    }

    pub fn cached(self) {
        self.end("CACHED".into());
    }

    pub fn done(self) {
        let secs = self.started.elapsed().as_secs_f64();
        self.end(format!("DONE {secs:.1}s"));
    }

    pub fn error(self, msg: &str) {
        self.end(format!("ERROR: {msg}"));
    }
}
/// A byte count as people read it: `512B`, `1.5MB`, `10.0GB` (powers of 1000, as BuildKit).
pub fn human_size(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", units[i])
    }
}
