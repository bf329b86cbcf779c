//! The resolver thread: DNS lookups run here, off the event loop, so a slow
//! or dead DNS server never stalls it. A lookup goes in over a channel; the
//! answer comes back over another and a `Waker` wakes the loop. Answers carry
//! the link's attempt generation, so the loop drops one that arrives after
//! its attempt timed out.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{mpsc, Arc};

use mio::Waker;

/// Addresses kept from one DNS answer.
pub const MAX_ADDRS: usize = 8;

/// The addresses of one answer, in the resolver's order.
pub type Addrs = heapless::Vec<SocketAddr, MAX_ADDRS>;

/// A lookup for link `link`'s attempt `generation`.
pub struct Lookup {
    pub link: usize,
    pub generation: u64,
    pub host: String,
    pub port: u16,
}

/// A DNS answer from the resolver thread.
pub struct Resolved {
    pub link: usize,
    pub generation: u64,
    pub result: Result<Addrs, String>,
}

/// Starts the resolver thread: lookups in, answers out, the loop woken.
pub fn spawn(waker: Arc<Waker>) -> io::Result<(mpsc::Sender<Lookup>, mpsc::Receiver<Resolved>)> {
    let (req_tx, req_rx) = mpsc::channel::<Lookup>();
    let (res_tx, res_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            for Lookup {
                link,
                generation,
                host,
                port,
            } in req_rx
            {
                let result = (host.as_str(), port)
                    .to_socket_addrs()
                    .map(|it| it.take(MAX_ADDRS).collect::<Addrs>())
                    .map_err(|e| e.to_string());
                if res_tx
                    .send(Resolved {
                        link,
                        generation,
                        result,
                    })
                    .is_err()
                {
                    break;
                }
                let _ = waker.wake();
            }
        })?;
    Ok((req_tx, res_rx))
}
