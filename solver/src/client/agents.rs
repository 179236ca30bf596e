//! The client's end of the ssh agent relay: each connection a step opens to its agent socket on
//! the builder arrives here as a connection number, and is joined to the user's agent (or to the
//! keys this process serves). Private keys never leave this machine; only agent protocol bytes
//! (public keys, signatures) cross.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::session::Agent;
use crate::service::proto::{client_message::Msg, ClientMessage, SshChunk};

pub struct Agents {
    agents: HashMap<String, Agent>,
    /// Open connections: where the builder's bytes for each go.
    open: Mutex<HashMap<u32, std::sync::mpsc::Sender<Vec<u8>>>>,
    tx: mpsc::Sender<ClientMessage>,
}

fn message(conn: u32, id: &str, data: Vec<u8>, close: bool) -> ClientMessage {
    ClientMessage {
        msg: Some(Msg::Ssh(SshChunk {
            conn,
            id: id.to_string(),
            data,
            close,
        })),
    }
}

impl Agents {
    pub fn new(agents: HashMap<String, Agent>, tx: mpsc::Sender<ClientMessage>) -> Agents {
        Agents {
            agents,
            open: Default::default(),
            tx,
        }
    }

    /// Bytes (or the opening, or the end) of connection `c.conn`.
    pub fn chunk(&self, c: SshChunk) {
        let mut open = self.open.lock();
        if c.close {
            open.remove(&c.conn);
            return;
        }
        if let Some(w) = open.get(&c.conn) {
            let _ = w.send(c.data);
            return;
        }
        match self.connect(&c.id) {
            Ok(stream) => {
                let w = self.relay(c.conn, c.id, stream);
                let _ = w.send(c.data);
                open.insert(c.conn, w);
            }
            Err(e) => {
                tracing::warn!(agent = %c.id, "cannot reach the ssh agent: {e}");
                let _ = self.tx.try_send(message(c.conn, &c.id, Vec::new(), true));
            }
        }
    }

    fn connect(&self, id: &str) -> std::io::Result<UnixStream> {
        match self.agents.get(id) {
            Some(Agent::Socket(path)) => UnixStream::connect(path),
            Some(Agent::Keys(keys)) => {
                let (ours, theirs) = UnixStream::pair()?;
                let keys = keys.clone();
                std::thread::spawn(move || keys.serve(theirs));
                Ok(ours)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such --ssh id",
            )),
        }
    }

    /// Threads that copy the agent's bytes to the builder and the builder's to the agent.
    fn relay(&self, conn: u32, id: String, stream: UnixStream) -> std::sync::mpsc::Sender<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        if let Ok(mut w) = stream.try_clone() {
            std::thread::spawn(move || {
                for data in rx {
                    if w.write_all(&data).is_err() {
                        break;
                    }
                }
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
        let (out, mut r) = (self.tx.clone(), stream);
        std::thread::spawn(move || {
            let mut buf = vec![0; 16 << 10];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                if out
                    .blocking_send(message(conn, &id, buf[..n].to_vec(), false))
                    .is_err()
                {
                    return;
                }
            }
            let _ = out.blocking_send(message(conn, &id, Vec::new(), true));
        });
        tx
    }
}
