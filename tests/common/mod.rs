//! End-to-end test harness: a throw-away PKI (`pki.rs`), a real mosquitto
//! broker (`mosquitto.rs`), MQTT clients (mosquitto_sub / mosquitto_pub,
//! `mosquitto_clients.rs`), a fault-injecting TCP proxy (`proxy.rs`), the
//! daemon under test (`daemon.rs`), a scripted TLS mock broker for protocol
//! corners a real broker cannot produce (`mock_broker.rs`) and a core bus
//! client (`bus.rs`). What they share: child processes and their
//! directories and logs (`process.rs`), sockets on 127.0.0.1 (`net.rs`),
//! and here the bounds of every wait. Everything a test file needs is
//! re-exported here, so `use common::*;` finds it.
//!
//! Invariants:
//! - Everything listens on and connects to 127.0.0.1 only.
//! - Every wait is bounded; a helper that cannot reach its goal in time
//!   panics with the relevant log, or returns `false` / `None` for the test
//!   to assert on.
//! - Every process is stopped by its own pid when its guard drops (SIGTERM,
//!   SIGKILL after 2 s, then reaped); every thread is joined.
//! - Temporary files live in a per-guard directory under
//!   `CARGO_TARGET_TMPDIR`, removed on drop. When the test is already
//!   panicking, a guard prints the tail of its log to stderr first, so a
//!   failing test shows what the broker and the daemon saw.

// The harness makes raw syscalls (kill, setsockopt) the daemon never may:
// Cargo.toml denies `unsafe` for every target, the tests allow it here.
#![allow(unsafe_code)]
#![allow(dead_code)]

pub mod bus;
mod daemon;
mod holder;
mod mock_broker;
mod mosquitto;
mod mosquitto_clients;
mod net;
mod pki;
mod process;
mod proxy;
mod publisher;

use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

// Each test file uses some of these, the way it uses some of the items
// (hence `dead_code` above): the rest are unused imports there.
#[allow(unused_imports)]
pub use self::{
    daemon::{iotcored_args, mqtt5, mqtt_version, wakeups, Daemon, DaemonBuilder},
    holder::Holder,
    mock_broker::{
        connect_client_id, connect_level, publishes_in, Behaviour, MockBroker, CONNACK_ACCEPTED,
        CONNACK_ACCEPTED_V5,
    },
    mosquitto::{Mosquitto, MosquittoBuilder},
    mosquitto_clients::{publish, tls_args, Publish, PublishOutput, Subscriber, SubscriberBuilder},
    net::free_port,
    pki::Pki,
    process::{terminate, Logged, TestDir},
    proxy::{Cut, Proxy},
    publisher::LinePublisher,
};

/// How long a process gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long a broker or a subscriber gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one mosquitto_pub run may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period of the waiting helpers and of the proxy's threads.
const POLL: Duration = Duration::from_millis(10);
/// Lines of a log printed when a guard drops during a panic.
const LOG_TAIL_LINES: usize = 80;

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns
/// whether it held. `cond` is always evaluated at least once.
pub fn wait_until(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    wait_every(timeout, POLL, cond)
}

/// Polls `cond` every `period` until it holds or `timeout` passes.
pub fn wait_every(timeout: Duration, period: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(period);
    }
}

/// Locks a mutex, ignoring poisoning (a panicking test must still clean up).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
