//! The outputs a build streams back to the client: archives (`type=oci|docker,dest=FILE`) are
//! written to `FILE.partial` and renamed into place only when the build succeeded; a directory
//! (`type=local,dest=DIR`) is unpacked from the tar the builder sends; a build cache
//! (`--cache-to type=local,dest=DIR`) arrives as an OCI layout tar whose blobs are stored
//! verified, and whose `index.json` replaces the directory's only when the build succeeded.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::thread::JoinHandle;

use strata_image::content::ContentStore;
use strata_image::oci::{self, Index, OciError};

use super::ClientError;
use crate::export::Output;
use crate::service::proto::{OutputChunk, OutputPrefetch};

enum Dest {
    File(PathBuf),
    Dir(PathBuf),
    Cache(PathBuf),
}

enum Open {
    File {
        tmp: PathBuf,
        f: File,
    },
    Dir {
        tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
        unpack: JoinHandle<std::io::Result<()>>,
    },
    Cache {
        tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
        unpack: JoinHandle<Result<Index, OciError>>,
    },
}

#[derive(Default)]
pub struct Outputs {
    /// By the index of the request's `--output`s.
    dests: HashMap<u32, Dest>,
    open: HashMap<u32, (Open, bool)>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

impl Outputs {
    /// The destinations of the `--output`s that come back to this machine, and of the local
    /// caches (`caches`: `--cache-to` index to directory).
    pub fn new(specs: &[String], caches: &HashMap<u32, PathBuf>) -> Result<Outputs, ClientError> {
        let mut dests = HashMap::new();
        for (i, spec) in specs.iter().enumerate() {
            let d = match Output::parse(spec)? {
                Output::Oci { dest, .. } | Output::Docker { dest, .. } => Dest::File(dest.into()),
                Output::Local { dest } => Dest::Dir(dest.into()),
                _ => continue,
            };
            dests.insert(i as u32, d);
        }
        for (i, dir) in caches {
            dests.insert(specs.len() as u32 + i, Dest::Cache(dir.clone()));
        }
        Ok(Outputs {
            dests,
            open: HashMap::new(),
        })
    }

    pub fn chunk(&mut self, c: OutputChunk) -> Result<(), ClientError> {
        if !self.open.contains_key(&c.index) {
            let open = self.start(c.index)?;
            self.open.insert(c.index, (open, false));
        }
        let (open, done) = self.open.get_mut(&c.index).expect("opened above");
        match open {
            Open::File { tmp, f } => f
                .write_all(&c.data)
                .map_err(io(format!("write {}", tmp.display())))?,
            Open::Dir { tx, .. } | Open::Cache { tx, .. } => {
                if let Some(t) = tx {
                    // The unpacking thread stopped: its error is reported at the end.
                    if t.send(c.data).is_err() {
                        *tx = None;
                    }
                }
            }
        }
        if c.eof {
            *done = true;
            if let Open::Dir { tx, .. } | Open::Cache { tx, .. } = open {
                *tx = None;
            }
        }
        Ok(())
    }

    fn start(&self, index: u32) -> Result<Open, ClientError> {
        match self.dests.get(&index) {
            Some(Dest::File(dest)) => {
                let tmp = PathBuf::from(format!("{}.partial", dest.display()));
                let f = File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
                Ok(Open::File { tmp, f })
            }
            Some(Dest::Dir(dest)) => {
                std::fs::create_dir_all(dest).map_err(io(format!("create {}", dest.display())))?;
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
                let dest = dest.clone();
                let unpack = std::thread::spawn(move || unpack(rx, &dest));
                Ok(Open::Dir {
                    tx: Some(tx),
                    unpack,
                })
            }
            Some(Dest::Cache(dest)) => {
                let store = ContentStore::open(dest).map_err(|e| {
                    ClientError::Input(format!("--cache-to {}: {e}", dest.display()))
                })?;
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
                let unpack = std::thread::spawn(move || {
                    oci::read_archive_blobs(&store, ChannelReader::new(rx), &mut Vec::new())
                });
                Ok(Open::Cache {
                    tx: Some(tx),
                    unpack,
                })
            }
            None => Err(ClientError::Protocol(format!(
                "the builder sent output {index}, which is not one this client writes"
            ))),
        }
    }

    /// Puts the archives in place when the build `succeeded`, else removes them.
    pub fn finish(self, succeeded: bool) -> Result<(), ClientError> {
        let mut first_error = None;
        for (index, dest) in &self.dests {
            if succeeded && !self.open.get(index).is_some_and(|(_, done)| *done) {
                first_error.get_or_insert(ClientError::Protocol(format!(
                    "the builder did not send all of output {index}"
                )));
            }
            let _ = dest;
        }
        for (index, (open, _)) in self.open {
            let r = match (open, &self.dests[&index]) {
                (Open::File { tmp, f }, Dest::File(dest)) => {
                    drop(f);
                    if succeeded && first_error.is_none() {
                        std::fs::rename(&tmp, dest).map_err(io(format!(
                            "rename {} to {}",
                            tmp.display(),
                            dest.display()
                        )))
                    } else {
                        let _ = std::fs::remove_file(&tmp);
                        Ok(())
                    }
                }
                (Open::Dir { tx, unpack }, Dest::Dir(dest)) => {
                    drop(tx);
                    let joined = unpack
                        .join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("panicked")));
                    joined.map_err(io(format!("unpack the result into {}", dest.display())))
                }
                (Open::Cache { tx, unpack }, Dest::Cache(dest)) => {
                    drop(tx);
                    let joined = unpack
                        .join()
                        .unwrap_or_else(|_| Err(OciError::Archive("panicked".into())));
                    match joined {
                        Ok(index) if succeeded => write_index(dest, &index),
                        Ok(_) => Ok(()),
                        Err(e) => Err(ClientError::Input(format!(
                            "--cache-to {}: {e}",
                            dest.display()
                        ))),
                    }
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The paths each `--output ...,prefetch=FILE` lists, one per line (FILE is on this machine):
/// `strata-snapshotter status --prefetch-list IMAGE` writes such a file.
pub fn prefetch_lists(specs: &[String]) -> Result<Vec<OutputPrefetch>, ClientError> {
    let mut lists = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let form = match Output::parse(spec)? {
            Output::Image { form, .. } | Output::Oci { form, .. } | Output::Docker { form, .. } => {
                form
            }
            _ => continue,
        };
        let Some(file) = form.prefetch else { continue };
        let text = std::fs::read_to_string(&file)
            .map_err(io(format!("--output prefetch={file}: read the list")))?;
        let paths = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        lists.push(OutputPrefetch {
            index: i as u32,
            paths,
        });
    }
    Ok(lists)
}

/// Unpacks the tar arriving on `rx` into `dest`: owners, modes, times and xattrs kept; nothing
/// written outside `dest` (the tar crate refuses `..` and paths through symlinks it made).
fn unpack(rx: std::sync::mpsc::Receiver<Vec<u8>>, dest: &std::path::Path) -> std::io::Result<()> {
    let mut a = tar::Archive::new(ChannelReader::new(rx));
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    a.set_unpack_xattrs(true);
    a.set_overwrite(true);
    a.unpack(dest)
}

struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl ChannelReader {
    fn new(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> ChannelReader {
        ChannelReader {
            rx,
            buf: Vec::new(),
            at: 0,
        }
    }
}

/// Makes `dir` the layout `index` lists (its blobs are there): `oci-layout`, then `index.json`
/// replaced in one rename.
fn write_index(dir: &std::path::Path, index: &Index) -> Result<(), ClientError> {
    let put = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.partial"));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io(format!("write {}", path.display())))
    };
    put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put(
        "index.json",
        &serde_json::to_vec(index).expect("an index serializes"),
    )
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.recv() {
                Ok(b) => (self.buf, self.at) = (b, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
