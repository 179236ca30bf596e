//! BuildKit-style progress: `plain` lines (`#N [stage 2/3] RUN ...`, output with elapsed seconds,
//! `#N CACHED`, `#N DONE 0.3s`, `#N ERROR: ...`), or live `tty` lines, or nothing (`quiet`).
//!
//! A build reports [`Event`]s to its [`Progress`]; a [`Printer`] shows them. The builder and the
//! printer may be in different processes: the builder service sends the events to the client,
//! whose printer shows them as a local build's.

use parking_lot::Mutex;
use std::collections::HashMap;
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

/// What happened in a build, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started {
        vertex: usize,
        name: String,
    },
    Log {
        vertex: usize,
        elapsed: f64,
        line: String,
    },
    /// `DONE 0.3s`, `CACHED` or `ERROR: ...`.
    Ended {
        vertex: usize,
        elapsed: f64,
        status: String,
    },
    /// A line outside any vertex (the summary).
    Note(String),
}

/// Where a build's events go.
enum Sink {
    Print(Printer),
    Send(Box<dyn Fn(Event) + Send + Sync>),
}

/// The progress of one build.
pub struct Progress {
    next: AtomicUsize,
    sink: Sink,
    pub started: Instant,
}

/// The progress of one vertex.
pub struct Vertex<'a> {
    p: &'a Progress,
    id: usize,
    started: Instant,
}

impl Progress {
    /// Progress shown in this process.
    pub fn new(mode: Mode) -> Progress {
        Progress::with(Sink::Print(Printer::new(mode)))
    }

    /// Progress given as events to `to` (which sends them to a client that shows them).
    pub fn sending(to: impl Fn(Event) + Send + Sync + 'static) -> Progress {
        Progress::with(Sink::Send(Box::new(to)))
    }

    fn with(sink: Sink) -> Progress {
        Progress {
            next: AtomicUsize::new(1),
            sink,
            started: Instant::now(),
        }
    }

    fn emit(&self, e: Event) {
        match &self.sink {
            Sink::Print(p) => p.show(&e),
            Sink::Send(to) => to(e),
        }
    }

    /// Starts vertex `name`.
    pub fn vertex(&self, name: &str) -> Vertex<'_> {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        self.emit(Event::Started {
            vertex: id,
            name: name.to_string(),
        });
        Vertex {
            p: self,
            id,
            started: Instant::now(),
        }
    }

    /// A line outside any vertex (the summary).
    pub fn note(&self, s: &str) {
        self.emit(Event::Note(s.to_string()));
    }
}

impl Vertex<'_> {
    /// One line of the step's output.
    pub fn log(&self, line: &str) {
        self.p.emit(Event::Log {
            vertex: self.id,
            elapsed: self.started.elapsed().as_secs_f64(),
            line: line.to_string(),
        });
    }

    fn end(self, status: String) {
        self.p.emit(Event::Ended {
            vertex: self.id,
            elapsed: self.started.elapsed().as_secs_f64(),
            status,
        });
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

/// Shows events on stderr in one of the [`Mode`]s.
pub struct Printer {
    mode: Mode,
    out: Mutex<std::io::Stderr>,
    multi: MultiProgress,
    /// tty mode: the spinner and name of each running vertex.
    bars: Mutex<HashMap<usize, (ProgressBar, String)>>,
}

impl Printer {
    pub fn new(mode: Mode) -> Printer {
        let mode = match mode {
            Mode::Auto if std::io::IsTerminal::is_terminal(&std::io::stderr()) => Mode::Tty,
            Mode::Auto => Mode::Plain,
            m => m,
        };
        Printer {
            mode,
            out: Mutex::new(std::io::stderr()),
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
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

    pub fn show(&self, e: &Event) {
        if self.mode == Mode::Rawjson {
            return self.line(&json(e).to_string());
        }
        match e {
            Event::Started { vertex, name } if self.mode == Mode::Tty => {
                let b = self.multi.add(ProgressBar::new_spinner());
                b.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                        .expect("static template"),
                );
                b.set_message(format!("[+] #{vertex} {name}"));
                b.enable_steady_tick(std::time::Duration::from_millis(120));
                self.bars.lock().insert(*vertex, (b, name.clone()));
            }
            Event::Started { vertex, name } => self.line(&format!("#{vertex} {name}")),
            Event::Log {
                vertex,
                elapsed,
                line,
            } => self.line(&format!("#{vertex} {elapsed:.3} {line}")),
            Event::Ended { vertex, status, .. } => match self.bars.lock().remove(vertex) {
                Some((bar, name)) => {
                    bar.finish_and_clear();
                    self.line(&format!("#{vertex} {name} {status}"));
                }
                None => self.line(&format!("#{vertex} {status}")),
            },
            Event::Note(s) => self.line(s),
        }
    }
}

/// An event as a `rawjson` line.
fn json(e: &Event) -> serde_json::Value {
    match e {
        Event::Started { vertex, name } => serde_json::json!({ "vertex": vertex, "name": name }),
        Event::Log {
            vertex,
            elapsed,
            line,
        } => serde_json::json!({ "vertex": vertex, "elapsed": elapsed, "log": line }),
        Event::Ended {
            vertex,
            elapsed,
            status,
        } => {
            let (word, rest) = status.split_once(' ').unwrap_or((status.as_str(), ""));
            serde_json::json!({ "vertex": vertex, "status": word.trim_end_matches(':'), "detail": rest, "elapsed": elapsed })
        }
        Event::Note(s) => serde_json::json!({ "summary": s }),
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
