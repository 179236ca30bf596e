//! Deletes retired snapshot directories on a thread of its own, so that `Remove` answers once the
//! record is gone and the directory renamed (`rm-<id>`), not after a walk of the whole tree. A
//! crash before a deletion finishes leaves the `rm-*` name to start-up cleanup.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use tracing::warn;

use crate::layout::remove_tree;

pub struct Reaper {
    queue: Mutex<Option<Sender<PathBuf>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Reaper {
    pub fn start() -> Reaper {
        let (tx, rx) = channel::<PathBuf>();
        let thread = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                for path in rx {
                    if let Err(e) = remove_tree(&path) {
                        warn!(path = %path.display(), error = %e, "removing a retired snapshot directory failed; cleanup will retry");
                    }
                }
            })
            .ok();
        Reaper {
            queue: Mutex::new(thread.as_ref().map(|_| tx)),
            thread: Mutex::new(thread),
        }
    }

    /// Deletes `path` in the background (here and now when the thread could not start).
    pub fn delete(&self, path: PathBuf) {
        let rejected = match &*self.queue.lock() {
            Some(tx) => tx.send(path).err().map(|e| e.0),
            None => Some(path),
        };
        if let Some(path) = rejected {
            if let Err(e) = remove_tree(&path) {
                warn!(path = %path.display(), error = %e, "removing a retired snapshot directory failed; cleanup will retry");
            }
        }
    }

    /// Waits for every deletion handed over so far.
    fn finish(&self) {
        drop(self.queue.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_in_the_background_and_finishes_before_drop() {
        let root = tempfile::tempdir().unwrap();
        let reaper = Reaper::start();
        let mut doomed = Vec::new();
        for i in 0..20 {
            let dir = root.path().join(format!("rm-{i}"));
            std::fs::create_dir_all(dir.join("fs/a/b")).unwrap();
            std::fs::write(dir.join("fs/a/b/file"), b"x").unwrap();
            doomed.push(dir.clone());
            reaper.delete(dir);
        }
        drop(reaper);
        assert!(doomed.iter().all(|d| !d.exists()));
        // Once finished, a delete happens in the caller.
        let reaper = Reaper::start();
        reaper.finish();
        let late = root.path().join("rm-late");
        std::fs::create_dir(&late).unwrap();
        reaper.delete(late.clone());
        assert!(!late.exists());
    }
}
