//! Cache-mount volumes: persistent directories keyed by id that survive builds and restarts,
//! shared between steps in one of three ways:
//!
//! - `shared`: one directory, any number of concurrent users;
//! - `private`: a free instance is reused, else a new one is made;
//! - `locked`: one user at a time; waiters are served in arrival order (tickets), and a step that
//!   needs several locked volumes takes them in id order, so two steps can never deadlock.
//!
//! Layout: `<root>/<sha256(id)>/{meta.json, <instance>/}`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::db::now;
use strata_snapshotter::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

impl std::str::FromStr for Sharing {
    type Err = crate::spec::InvalidSpec;
    fn from_str(s: &str) -> std::result::Result<Sharing, Self::Err> {
        match s {
            "shared" => Ok(Sharing::Shared),
            "private" => Ok(Sharing::Private),
            "locked" => Ok(Sharing::Locked),
            other => Err(format!("sharing={other}: use shared, private or locked").into()),
        }
    }
}

/// What a volume is created with on first use.
#[derive(Debug, Clone, Copy)]
pub struct Init {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Init {
    /// root's, 0755: for a volume that is only read if it exists.
    pub const ROOT: Init = Init {
        mode: 0o755,
        uid: 0,
        gid: 0,
    };
}

/// A volume as listed by `strata cache ls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub last_used: u64,
    #[serde(default)]
    pub size: u64,
}

#[derive(Default)]
struct State {
    /// Locked volumes in use.
    held: HashSet<String>,
    /// Tickets waiting for a locked volume, in arrival order.
    queues: HashMap<String, VecDeque<u64>>,
    next_ticket: u64,
    /// Private instances in use, by volume.
    private: HashMap<String, HashSet<u32>>,
}

/// The volumes under one directory.
pub struct Volumes {
    root: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
}

/// A volume in use; dropping it releases it.
pub struct Lease {
    volumes: Arc<Volumes>,
    id: String,
    sharing: Sharing,
    instance: u32,
    pub path: PathBuf,
}

fn key(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

impl Volumes {
    pub fn open(root: &Path) -> Result<Arc<Volumes>> {
        fs::create_dir_all(root).map_err(Error::io(format!("create {}", root.display())))?;
        Ok(Arc::new(Volumes {
            root: root.to_path_buf(),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        }))
    }

    /// Takes volumes `requests` (id, sharing, init) for one step, in id order (see module docs).
    pub fn acquire_all(
        self: &Arc<Self>,
        requests: &[(String, Sharing, Init)],
    ) -> Result<Vec<Lease>> {
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by(|a, b| requests[*a].0.cmp(&requests[*b].0));
        let mut leases: BTreeMap<usize, Lease> = BTreeMap::new();
        for i in order {
            let (id, sharing, init) = &requests[i];
            // The same locked id twice in one step shares the first lease's directory.
            if *sharing == Sharing::Locked {
                if let Some(l) = leases
                    .values()
                    .find(|l| l.id == *id && l.sharing == Sharing::Locked)
                {
                    let path = l.path.clone();
                    leases.insert(
                        i,
                        Lease {
                            volumes: self.clone(),
                            id: id.clone(),
                            sharing: Sharing::Shared,
                            instance: 0,
                            path,
                        },
                    );
                    continue;
                }
            }
            leases.insert(i, self.acquire(id, *sharing, *init)?);
        }
        Ok(leases.into_values().collect())
    }

    /// Takes volume `id` with `sharing`, creating it with `init` on first use.
    pub fn acquire(self: &Arc<Self>, id: &str, sharing: Sharing, init: Init) -> Result<Lease> {
        let dir = self.root.join(key(id));
        let instance = {
            let mut st = self.state.lock();
            match sharing {
                Sharing::Shared => 0,
                Sharing::Locked => {
                    let ticket = st.next_ticket;
                    st.next_ticket += 1;
                    st.queues
                        .entry(id.to_string())
                        .or_default()
                        .push_back(ticket);
                    loop {
                        let first =
                            st.queues.get(id).and_then(|q| q.front().copied()) == Some(ticket);
                        if first && !st.held.contains(id) {
                            break;
                        }
                        self.wake.wait(&mut st);
                    }
                    st.queues.get_mut(id).map(|q| q.pop_front());
                    st.held.insert(id.to_string());
                    0
                }
                Sharing::Private => {
                    let used = st.private.entry(id.to_string()).or_default();
                    let free = (0..).find(|i| !used.contains(i)).expect("a free instance");
                    used.insert(free);
                    free
                }
            }
        };
        let lease = Lease {
            volumes: self.clone(),
            id: id.to_string(),
            sharing,
            instance,
            path: dir.join(instance.to_string()),
        };
        let meta_path = dir.join("meta.json");
        let created = fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
            .map(|m| m.created)
            .unwrap_or_else(now);
        if !lease.path.is_dir() {
            fs::create_dir_all(&lease.path)
                .map_err(Error::io(format!("create cache volume {id:?}")))?;
            lchown(&lease.path, Some(init.uid), Some(init.gid))
                .map_err(Error::io(format!("chown cache volume {id:?}")))?;
            fs::set_permissions(&lease.path, fs::Permissions::from_mode(init.mode & 0o7777))
                .map_err(Error::io(format!("chmod cache volume {id:?}")))?;
        }
        let meta = Meta {
            id: id.to_string(),
            created,
            last_used: now(),
            size: 0,
        };
        let _ = fs::write(
            &meta_path,
            serde_json::to_vec(&meta).expect("meta serializes"),
        );
        Ok(lease)
    }

    /// Every volume with its size.
    pub fn list(&self) -> Result<Vec<Meta>> {
        let mut out = Vec::new();
        let rd =
            fs::read_dir(&self.root).map_err(Error::io(format!("read {}", self.root.display())))?;
        for e in rd.flatten() {
            if let Ok(b) = fs::read(e.path().join("meta.json")) {
                if let Ok(mut m) = serde_json::from_slice::<Meta>(&b) {
                    m.size = strata_snapshotter::usage::measure(&e.path())
                        .map(|u| u.size as u64)
                        .unwrap_or(0);
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Removes volume `id` (refused while in use).
    pub fn remove(&self, id: &str) -> Result<()> {
        let st = self.state.lock();
        if st.held.contains(id) || st.private.get(id).is_some_and(|s| !s.is_empty()) {
            return Err(Error::FailedPrecondition(format!(
                "cache volume {id:?} is in use by a running step"
            )));
        }
        strata_snapshotter::layout::remove_tree(&self.root.join(key(id)))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.volumes.state.lock();
        match self.sharing {
            Sharing::Shared => return,
            Sharing::Locked => {
                st.held.remove(&self.id);
            }
            Sharing::Private => {
                if let Some(used) = st.private.get_mut(&self.id) {
                    used.remove(&self.instance);
                }
            }
        }
        drop(st);
        self.volumes.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const INIT: Init = Init {
        mode: 0o755,
        uid: 0,
        gid: 0,
    };

    #[test]
    fn sharing_modes() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::open(dir.path()).unwrap();
        let a = v.acquire("c", Sharing::Shared, INIT).unwrap();
        let b = v.acquire("c", Sharing::Shared, INIT).unwrap();
        assert_eq!(a.path, b.path);
        let p1 = v.acquire("p", Sharing::Private, INIT).unwrap();
        let p2 = v.acquire("p", Sharing::Private, INIT).unwrap();
        assert_ne!(p1.path, p2.path);
        let first = p1.path.clone();
        drop(p1);
        assert_eq!(
            v.acquire("p", Sharing::Private, INIT).unwrap().path,
            first,
            "a free instance is reused"
        );
        assert_eq!(v.list().unwrap().len(), 2);
    }

    #[test]
    fn locked_users_never_overlap_and_many_locks_never_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volumes::open(dir.path()).unwrap();
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let v = v.clone();
                let inside = inside.clone();
                std::thread::spawn(move || {
                    // Opposite orders in the requests: acquire_all sorts them.
                    let mut req = vec![
                        ("x".to_string(), Sharing::Locked, INIT),
                        ("y".to_string(), Sharing::Locked, INIT),
                    ];
                    if i % 2 == 1 {
                        req.reverse();
                    }
                    let _leases = v.acquire_all(&req).unwrap();
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders of a locked volume"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
