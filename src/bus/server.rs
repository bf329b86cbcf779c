//! The core bus socket: the Unix listener and a fixed table of client slots,
//! each with a receive buffer for one whole frame and a bounded output
//! backlog. Bytes in, frames out; frames in, bytes out. What a request means
//! is decided by the caller.
//!
//! [bus-sock-1] one socket per interface; [bus-sock-2] parents created,
//! stale socket removed, mode 0660; [bus-sock-3] systemd socket activation.
//! Every socket is non-blocking: a slow, silent or hostile client costs its
//! own slot and nothing else. Outbound connections (deliveries to a
//! `response_endpoint` [iotcored-bus-subscribe-3]) use slots of the same
//! table.
//!
//! Each slot also holds the caller's per-connection state `S` (what the
//! connection is doing, in the service's terms), reset with the slot, so a
//! connection's state has one owner.

use std::cell::Cell;
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use super::frame::{self, FrameLen};
use crate::consts;
use crate::time::Instant;

/// How long the bytes of an oversized frame are read and discarded before
/// NOMEM is sent anyway [bus-err-2].
pub const DISCARD_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(3);

/// How long a closing slot may take to hand its last bytes to a peer that
/// does not read them before it is closed anyway.
pub const CLOSE_LINGER: core::time::Duration = core::time::Duration::from_secs(5);

/// How long a connection may hold part of a frame before it is closed
/// [bus-iso-3]: a client stuck mid-frame (or trickling one byte at a time)
/// must not keep its slot for ever.
pub const PARTIAL_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(10);

/// How long a connection with output waiting may go without reading any of
/// it before it is closed [bus-iso-6]: a subscriber that reads, however
/// slowly, is never cut off for a burst (what does not fit its backlog is
/// dropped for it alone); one that has stopped reading is.
pub const STALL_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(10);

/// Bytes `Server::read` takes from one peer per call.
const READ_BUDGET: usize = 64 * 1024;

/// Bytes of a Unix socket's send buffer a write may use beyond its data
/// (the kernel's per-buffer bookkeeping), with `total / 16` more.
const SKB_SLACK: usize = 4096;

/// The first token of the client slots; slot `i` is `Token(CLIENT_TOKEN_BASE + i)`.
pub const CLIENT_TOKEN_BASE: usize = 1 << 16;

/// A start-up error of the bus socket; names the path.
#[derive(Debug)]
pub struct BindError {
    /// The socket path.
    pub path: PathBuf,
    /// What went wrong.
    pub what: String,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bus socket {}: {}", self.path.display(), self.what)
    }
}

/// Why a slot must be closed now [bus-iso-3] [bus-iso-6].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overdue {
    /// Closing, and its peer has not taken the last bytes in `CLOSE_LINGER`.
    Linger,
    /// Output waiting and nothing taken for `STALL_TIMEOUT`.
    Stall,
    /// Part of a frame held for `PARTIAL_TIMEOUT`.
    Partial,
}

/// Who opened a slot's connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A local client connected to us.
    Client,
    /// We connected to `<socket-dir>/<name>` to deliver messages.
    Endpoint(heapless::String<{ super::MAX_INTERFACE_NAME_LEN }>),
}

/// What the caller should do with a slot after reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// A complete frame of this many bytes is at the start of `frame()`.
    Frame(usize),
    /// Nothing complete yet.
    Idle,
    /// A framing error: answer with this code, then close [bus-err-1/2].
    Malformed(frame::ErrorCode),
    /// The peer closed (or reset) its side.
    Closed,
}

/// One connection.
pub struct Slot<S> {
    stream: Option<UnixStream>,
    /// The caller's state of this connection; `S::default()` when free.
    state: S,
    /// The peer's pid (`SO_PEERCRED`), asked only when a rule needs it
    /// (`Slot::peer_pid`) and kept: `None` until then; 0 for our own
    /// outbound connections or when the kernel gave none.
    pid: Cell<Option<u32>>,
    /// When the peer last sent anything (or connected).
    last_active: Instant,
    /// When the first byte of the frame being received arrived.
    frame_since: Option<Instant>,
    /// Since when the backlog has waited without the peer taking any of it
    /// (set by `Server::stalled`, restarted by progress).
    stall_since: Option<Instant>,
    /// The peer took some output since `stall_since` was set.
    tx_progress: bool,
    /// A frame was refused (`SendError::Full`) since the peer last took
    /// anything: it has output waiting even with an empty backlog.
    behind: bool,
    generation: u32,
    peer: Peer,
    /// The slot's own receive buffer (`SLOT_BUFFER` bytes).
    rx: &'static mut [u8],
    /// A large buffer lent from the pool while a frame larger than `rx`
    /// is received; the received bytes are then there.
    lent: Option<&'static mut [u8]>,
    /// Waits for a large buffer: nothing more is read until one is lent.
    wants_large: bool,
    /// A large buffer was lent while it waited: the frame's partial
    /// timeout starts again at the next read.
    granted: bool,
    rx_len: usize,
    /// Bytes of an oversized frame still to discard, and until when.
    discard: Option<(usize, Instant)>,
    /// Input after a subscribe is read and thrown away [bus-req-4.2].
    ignore_input: bool,
    read_closed: bool,
    /// Registered for writability too: only once output had to wait
    /// (a backlog, a refused frame) or for an outbound connect, so that a
    /// client whose answers fit the socket costs no writable wake-ups.
    write_interest: bool,
    /// More input may be waiting (edge-triggered readiness).
    readable: bool,
    /// The readiness event said the peer shut its side: its end of file
    /// waits behind the data, so a short read does not mean drained (the
    /// edge that announced both will not come again).
    peer_shut: bool,
    tx: &'static mut [u8],
    tx_head: usize,
    tx_len: usize,
    /// Close once the backlog is written.
    close_after_flush: bool,
    /// When the slot was first seen closing with its backlog unwritten: it
    /// is closed `CLOSE_LINGER` later whatever is left.
    closing_since: Option<Instant>,
}

impl<S: Copy + Default> Slot<S> {
    fn new(rx: &'static mut [u8], tx: &'static mut [u8]) -> Self {
        Self {
            stream: None,
            state: S::default(),
            pid: Cell::new(None),
            last_active: Instant::default(),
            frame_since: None,
            stall_since: None,
            tx_progress: false,
            behind: false,
            generation: 0,
            peer: Peer::Client,
            rx,
            lent: None,
            wants_large: false,
            granted: false,
            rx_len: 0,
            discard: None,
            ignore_input: false,
            read_closed: false,
            readable: false,
            peer_shut: false,
            write_interest: false,
            tx,
            tx_head: 0,
            tx_len: 0,
            close_after_flush: false,
            closing_since: None,
        }
    }

    fn reset(&mut self) {
        self.stream = None;
        self.state = S::default();
        self.closing_since = None;
        self.pid.set(None);
        self.frame_since = None;
        self.stall_since = None;
        self.behind = false;
        self.tx_progress = false;
        self.rx_len = 0;
        self.wants_large = false;
        self.granted = false;
        self.discard = None;
        self.ignore_input = false;
        self.read_closed = false;
        self.write_interest = false;
        self.readable = false;
        self.peer_shut = false;
        self.tx_head = 0;
        self.tx_len = 0;
        self.close_after_flush = false;
        self.peer = Peer::Client;
    }

    /// Whether the slot holds a connection.
    pub fn is_open(&self) -> bool {
        self.stream.is_some()
    }

    /// Changes every time the slot gets a new connection.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The caller's state of this connection.
    pub fn state(&self) -> S {
        self.state
    }

    /// The peer's pid: the one kept, else asked of the kernel now
    /// (`SO_PEERCRED`) and kept for the connection's life; 0 if it gives
    /// none.
    pub fn peer_pid(&self) -> u32 {
        if let Some(pid) = self.pid.get() {
            return pid;
        }
        let pid = self
            .stream
            .as_ref()
            .and_then(|s| crate::sys::peer_pid(s.as_raw_fd()))
            .unwrap_or(0);
        self.pid.set(Some(pid));
        pid
    }

    /// When a frame begun but not complete must be complete, else the
    /// connection is closed [bus-iso-3].
    /// A slot waiting for a large buffer is not timed: the wait is not
    /// its doing.
    pub fn partial_deadline(&self) -> Option<Instant> {
        let since = self.frame_since?;
        let complete = matches!(frame::frame_len(self.received(), consts::BUS_MAX_FRAME),
            FrameLen::Len(n) if n <= self.rx_len);
        (!complete && self.rx_len > 0 && !self.wants_large && !self.granted)
            .then(|| since + PARTIAL_TIMEOUT)
    }

    /// The buffer receiving now: the lent one, else the slot's own.
    fn buffer(&self) -> &[u8] {
        self.lent.as_deref().unwrap_or(self.rx)
    }

    /// The bytes received and not yet consumed.
    fn received(&self) -> &[u8] {
        &self.buffer()[..self.rx_len]
    }

    /// When the connection must have taken some of its waiting output, else
    /// it is closed [bus-iso-6]; due at once when `Server::stalled` has a
    /// mark to set or to restart.
    pub fn stall_deadline(&self) -> Option<Instant> {
        if !self.may_stall() {
            return None;
        }
        match self.stall_since {
            Some(since) if !self.tx_progress => Some(since + STALL_TIMEOUT),
            _ => Some(Instant::default()),
        }
    }

    /// Whether the stall rule applies: open, not closing (the linger's
    /// then), and output waits for the peer, in the backlog or refused for
    /// want of room since it last took anything.
    fn may_stall(&self) -> bool {
        self.is_open() && !self.close_after_flush && (self.tx_len > 0 || self.behind)
    }

    /// The peer took some output (written, or a writable edge: it read).
    fn progressed(&mut self) {
        self.tx_progress = true;
        self.behind = false;
    }

    /// Whether the connection may be closed to make room: open, not
    /// closing, nothing buffered either way, `evictable` says its state
    /// holds nothing (no request in progress, no subscription), and the
    /// kernel holds nothing unread: bytes that arrived since the last read
    /// (their readiness event not yet served) are a request in progress.
    fn is_idle(&self, evictable: &impl Fn(S) -> bool) -> bool {
        self.is_open()
            && !self.close_after_flush
            && self.rx_len == 0
            && self.tx_len == 0
            && self.discard.is_none()
            && evictable(self.state)
            && self
                .stream
                .as_ref()
                .is_some_and(|s| crate::sys::unread_bytes(s.as_raw_fd()) == 0)
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Whether output is waiting in the backlog.
    pub fn has_backlog(&self) -> bool {
        self.tx_len > 0
    }

    /// Whether the slot will close once its backlog is written.
    pub fn is_closing(&self) -> bool {
        self.close_after_flush
    }

    /// Whether input can be handled without waiting for a readiness
    /// event: the socket may hold more, or a whole frame is buffered
    /// already (one read can bring several pipelined requests).
    pub fn has_input(&self) -> bool {
        if self.close_after_flush {
            return false;
        }
        (self.readable && !self.wants_large)
            || matches!(frame::frame_len(self.received(), consts::BUS_MAX_FRAME),
                FrameLen::Len(n) if n <= self.rx_len)
    }

    /// The received bytes (a complete frame first, after `Input::Frame`).
    pub fn frame(&self, len: usize) -> &[u8] {
        &self.buffer()[..len.min(self.rx_len)]
    }

    /// When an oversized frame's discarding ends.
    pub fn discard_deadline(&self) -> Option<Instant> {
        self.discard.map(|(_, until)| until)
    }

    /// When the slot must be closed whatever its peer does, if closing.
    /// A closing slot not yet marked by `Server::lingered` is due at once,
    /// so that the next turn marks it.
    pub fn linger_deadline(&self) -> Option<Instant> {
        if !(self.is_open() && self.close_after_flush) {
            return None;
        }
        Some(
            self.closing_since
                .map_or(Instant::default(), |t| t + CLOSE_LINGER),
        )
    }

    fn tx_free(&self) -> usize {
        self.tx.len() - self.tx_len
    }

    fn push_tx(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let cap = self.tx.len();
            let tail = (self.tx_head + self.tx_len) % cap;
            let run = (cap - tail).min(bytes.len()).min(self.tx_free());
            if run == 0 {
                return;
            }
            self.tx[tail..tail + run].copy_from_slice(&bytes[..run]);
            self.tx_len += run;
            bytes = &bytes[run..];
        }
    }
}

/// The listener and the slot table; `S` is the caller's per-connection
/// state.
pub struct Server<S> {
    listener: UnixListener,
    /// The loop's registry (a clone), where connections are registered and
    /// a slot whose output has to wait asks for writability; set by
    /// `register`.
    registry: Option<Registry>,
    path: Option<PathBuf>,
    socket_dir: PathBuf,
    slots: Vec<Slot<S>>,
    /// The large receive buffers lent to slots for frames their own
    /// buffer cannot hold.
    pool: Pool,
    refused: u64,
    last_refusal_log: Option<Instant>,
}

/// Why a frame could not be queued for a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The slot is closed.
    Closed,
    /// The kernel buffer and the backlog are full: the peer is not reading.
    Full,
    /// The frame cannot fit the socket's send buffer (this many bytes)
    /// even empty, with the backlog.
    TooLarge(usize),
}

impl<S: Copy + Default> Server<S> {
    /// Binds `<socket_dir>/<name>` or takes it from systemd [bus-sock-3].
    pub fn bind(socket_dir: &Path, name: &str) -> Result<Self, BindError> {
        let path = socket_dir.join(name);
        let err = |what: String| BindError {
            path: path.clone(),
            what,
        };
        let (listener, owned_path) = match crate::sys::activated_listener(name) {
            Some(std_listener) => {
                std_listener
                    .set_nonblocking(true)
                    .map_err(|e| err(format!("socket from systemd unusable: {e}")))?;
                log::info!("bus: serving {} (socket from systemd)", path.display());
                (UnixListener::from_std(std_listener), None)
            }
            None => {
                prepare_path(&path).map_err(err)?;
                let listener =
                    UnixListener::bind(&path).map_err(|e| err(format!("cannot bind: {e}")))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
                    .map_err(|e| err(format!("cannot set mode 0660: {e}")))?;
                log::info!("bus: serving {}", path.display());
                (listener, Some(path.clone()))
            }
        };
        Ok(Self {
            listener,
            registry: None,
            path: owned_path,
            socket_dir: socket_dir.to_path_buf(),
            slots: slot_table(),
            pool: Pool::new(),
            refused: 0,
            last_refusal_log: None,
        })
    }

    /// Registers the listener, and keeps `registry` for the connections.
    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        self.registry = Some(registry.try_clone()?);
        registry.register(&mut self.listener, token, Interest::READABLE)
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slot `i`.
    pub fn slot(&self, i: usize) -> &Slot<S> {
        &self.slots[i]
    }

    /// The pid of slot `i`'s peer (`SO_PEERCRED`, asked once and kept); 0
    /// if the kernel gives none, or for our own outbound connections.
    pub fn pid(&self, i: usize) -> u32 {
        self.slots[i].peer_pid()
    }

    /// Sets the caller's state of slot `i`'s connection.
    pub fn set_state(&mut self, i: usize, state: S) {
        self.slots[i].state = state;
    }

    /// Whether slot `i` must be closed now, and why: the first of its
    /// timeouts that has passed (the linger and stall marks are set here).
    pub fn overdue(&mut self, i: usize, now: Instant) -> Option<Overdue> {
        if self.lingered(i, now) {
            Some(Overdue::Linger)
        } else if self.stalled(i, now) {
            Some(Overdue::Stall)
        } else if self.slots[i].partial_deadline().is_some_and(|d| now >= d) {
            Some(Overdue::Partial)
        } else {
            None
        }
    }

    /// Whether slot `i` has had output waiting for `STALL_TIMEOUT` without
    /// its peer taking any of it [bus-iso-6]. The first call with output
    /// waiting, and the first after the peer took some, start that time.
    /// A closing slot is the linger's to end.
    pub fn stalled(&mut self, i: usize, now: Instant) -> bool {
        let slot = &mut self.slots[i];
        if !slot.may_stall() {
            slot.stall_since = None;
            slot.tx_progress = false;
            return false;
        }
        match slot.stall_since {
            Some(since) if !slot.tx_progress => now >= since + STALL_TIMEOUT,
            _ => {
                slot.stall_since = Some(now);
                slot.tx_progress = false;
                false
            }
        }
    }

    /// Whether slot `i`, closing, has had `CLOSE_LINGER` to hand its last
    /// bytes to its peer. The first call for a closing slot starts that
    /// time.
    pub fn lingered(&mut self, i: usize, now: Instant) -> bool {
        let slot = &mut self.slots[i];
        if !(slot.is_open() && slot.close_after_flush) {
            return false;
        }
        let since = *slot.closing_since.get_or_insert(now);
        now >= since + CLOSE_LINGER
    }

    /// Open connections now.
    pub fn open_count(&self) -> usize {
        self.slots.iter().filter(|s| s.is_open()).count()
    }

    /// Connections refused because the table was full.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The most connections one process may hold [bus-iso-3]: half the
    /// table, so that others are always served.
    pub fn per_process_limit(&self) -> usize {
        (self.slots.len() / 2).max(1)
    }

    /// Accepts every pending connection [bus-iso-3]. A process that holds
    /// `per_process_limit` connections already is refused; when the table
    /// is full, the connection idle the longest (`evictable` says which
    /// states hold nothing) is closed to make room, and only if none is
    /// idle is the new one refused. Refusals are closed at once and logged
    /// at most once a second. Returns the slots that were filled.
    pub fn accept(
        &mut self,
        now: Instant,
        evictable: impl Fn(S) -> bool,
    ) -> heapless::Vec<usize, 16> {
        let mut filled = heapless::Vec::new();
        while !filled.is_full() {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog.
                    log::warn!("bus: accept failed: {e}");
                    break;
                }
            };
            // One process may hold at most half the table: only a table at
            // least half full can hold such a process, so the pids (one
            // getsockopt each) are asked only then, and kept.
            let mut pid = None;
            if self.open_count() >= self.per_process_limit() {
                let newcomer = crate::sys::peer_pid(stream.as_raw_fd()).unwrap_or(0);
                pid = Some(newcomer);
                let held = if newcomer == 0 {
                    0
                } else {
                    (0..self.slots.len())
                        .filter(|&i| self.slots[i].is_open() && self.pid(i) == newcomer)
                        .count()
                };
                if held >= self.per_process_limit() {
                    self.refuse(now, |n| {
                        format!("process {newcomer} holds {held} of the {n} client slots, the most one process may; connection refused")
                    });
                    continue;
                }
            }
            if !self.slots.iter().any(|s| !s.is_open()) {
                let idle = (0..self.slots.len())
                    .filter(|&i| self.slots[i].is_idle(&evictable))
                    .min_by_key(|&i| self.slots[i].last_active);
                match idle {
                    Some(i) => {
                        log::info!(
                            "bus: all {} client slots busy; closing the connection idle the longest (slot {i}, pid {}) to make room",
                            self.slots.len(),
                            self.pid(i)
                        );
                        self.close(i);
                    }
                    None => {
                        self.refuse(now, |n| {
                            format!("all {n} client slots busy and none idle; connection refused")
                        });
                        continue;
                    }
                }
            }
            match self.install(stream, Peer::Client, pid, now) {
                Some(i) => {
                    log::debug!("bus: client connected (slot {i})");
                    // `filled` has room: checked by the loop condition.
                    let _ = filled.push(i);
                }
                None => self.refuse(now, |n| {
                    format!("all {n} client slots busy; connection refused")
                }),
            }
        }
        filled
    }

    /// Counts a refused connection (already dropped) and logs `why`, at
    /// most once a second.
    fn refuse(&mut self, now: Instant, why: impl FnOnce(usize) -> String) {
        self.refused += 1;
        let quiet = self
            .last_refusal_log
            .is_some_and(|t| now.saturating_since(t).as_secs() < 1);
        if !quiet {
            log::warn!(
                "bus: {} ({} refused so far)",
                why(self.slots.len()),
                self.refused
            );
            self.last_refusal_log = Some(now);
        }
    }

    /// Whether `<socket-dir>/<endpoint>` accepts connections now: a
    /// non-blocking connect, closed at once (a full listen backlog counts as
    /// there) [bus-iso-4].
    pub fn endpoint_reachable(&self, endpoint: &str) -> bool {
        match UnixStream::connect(self.socket_dir.join(endpoint)) {
            Ok(_) => true,
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        }
    }

    /// Opens a connection to `<socket-dir>/<endpoint>` in a free slot.
    pub fn connect_endpoint(&mut self, endpoint: &str) -> io::Result<usize> {
        let name = heapless::String::try_from(endpoint)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "endpoint name too long"))?;
        let stream = UnixStream::connect(self.socket_dir.join(endpoint))?;
        self.install(stream, Peer::Endpoint(name), Some(0), Instant::default())
            .ok_or_else(|| io::Error::other("no free bus slot"))
    }

    fn install(
        &mut self,
        mut stream: UnixStream,
        peer: Peer,
        pid: Option<u32>,
        now: Instant,
    ) -> Option<usize> {
        let i = self.slots.iter().position(|s| !s.is_open())?;
        let token = Token(CLIENT_TOKEN_BASE + i);
        // A client's answers usually fit the socket: writability is asked
        // for only once one has to wait (`want_writable`). An outbound
        // connect completes by becoming writable.
        let write_interest = !matches!(peer, Peer::Client);
        let interest = if write_interest {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let registered = match &self.registry {
            Some(registry) => registry.register(&mut stream, token, interest),
            None => Err(io::Error::other("the server is not registered")),
        };
        if let Err(e) = registered {
            log::warn!("bus: cannot register a connection: {e}");
            return None;
        }
        let slot = &mut self.slots[i];
        slot.reset();
        slot.write_interest = write_interest;
        slot.generation = slot.generation.wrapping_add(1);
        slot.stream = Some(stream);
        slot.peer = peer;
        slot.pid.set(pid);
        slot.last_active = now;
        slot.readable = true;
        Some(i)
    }

    /// Reads what slot `i` has and reports the first complete frame.
    pub fn read(&mut self, i: usize, now: Instant) -> Input {
        if self.slots[i].wants_large {
            return Input::Idle; // until a large buffer is lent
        }
        if core::mem::take(&mut self.slots[i].granted) {
            // Its wait for the buffer does not count against the frame.
            self.slots[i].frame_since = Some(now);
        }
        // Bytes one call may read: a peer that writes without pause gets
        // its turn again later instead of holding the loop.
        let mut budget = READ_BUDGET;
        loop {
            let slot = &mut self.slots[i];
            if slot.stream.is_none() {
                return Input::Closed;
            }
            if budget == 0 {
                return Input::Idle; // `readable` stays set: more to read
            }
            // An oversized frame: read and drop its bytes, then NOMEM.
            if let (Some((remaining, until)), Some(stream)) = (slot.discard, slot.stream.as_mut()) {
                if remaining == 0 || now >= until {
                    slot.discard = None;
                    slot.rx_len = 0;
                    return Input::Malformed(frame::ErrorCode::NoMem);
                }
                let take = remaining.min(slot.rx.len());
                match stream.read(&mut slot.rx[..take]) {
                    Ok(0) => {
                        slot.read_closed = true;
                        slot.discard = None;
                        return Input::Malformed(frame::ErrorCode::NoMem);
                    }
                    Ok(n) => {
                        budget = budget.saturating_sub(n);
                        slot.discard = Some((remaining - n, until));
                        slot.last_active = now;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        slot.readable = false;
                        return Input::Idle;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Input::Closed,
                }
                continue;
            }
            if let (true, Some(stream)) = (slot.ignore_input, slot.stream.as_mut()) {
                let mut sink = [0u8; 512];
                match stream.read(&mut sink) {
                    Ok(0) => return Input::Closed,
                    Ok(n) => {
                        budget = budget.saturating_sub(n);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        slot.readable = false;
                        return Input::Idle;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return Input::Closed,
                }
            }
            // A complete frame already buffered? Else where the frame
            // being received ends, if its prelude is in.
            let frame_end = match frame::frame_len(slot.received(), consts::BUS_MAX_FRAME) {
                FrameLen::Invalid(e) => return Input::Malformed(e.code()),
                FrameLen::Oversized { total_len } => {
                    let remaining = total_len - slot.rx_len;
                    slot.rx_len = 0;
                    slot.discard = Some((remaining, now + DISCARD_TIMEOUT));
                    self.give_back(i);
                    continue;
                }
                FrameLen::Len(n) if n <= slot.rx_len => return Input::Frame(n),
                // Larger than the slot's own buffer: a large one is lent,
                // or the slot waits for one, reading nothing meanwhile.
                FrameLen::Len(n) if n > slot.buffer().len() => {
                    if !self.lend(i) {
                        return Input::Idle;
                    }
                    continue;
                }
                FrameLen::Len(n) => Some(n),
                FrameLen::NeedPrelude => None,
            };
            if slot.read_closed {
                return Input::Closed;
            }
            // A short read drained the socket: wait for the next readiness
            // edge rather than read again only to hear "would block".
            if !slot.readable {
                return Input::Idle;
            }
            // Whatever the peer has sent, up to the buffer's end: a request
            // usually arrives whole in one read. What follows the first
            // frame stays buffered for the next one (bounded by the buffer).
            // Into a lent buffer, no further than its frame's end: it then
            // holds one frame, and goes back as soon as that is handled,
            // even if the caller stops reading from the slot for a while
            // (a call waiting for its answer).
            let end = frame_end
                .filter(|_| slot.lent.is_some())
                .unwrap_or(usize::MAX);
            let buf = match slot.lent.as_deref_mut() {
                Some(large) => large,
                None => &mut *slot.rx,
            };
            let end = end.min(buf.len());
            let Some(stream) = slot.stream.as_mut() else {
                return Input::Closed;
            };
            let free = end - slot.rx_len;
            match stream.read(&mut buf[slot.rx_len..end]) {
                Ok(0) => {
                    slot.read_closed = true;
                    if slot.rx_len > 0 {
                        // A truncated frame [bus-err-1]: PARSE, then close.
                        return Input::Malformed(frame::ErrorCode::Parse);
                    }
                    return Input::Closed;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if slot.rx_len == 0 {
                        slot.frame_since = Some(now);
                    }
                    slot.rx_len += n;
                    slot.last_active = now;
                    if n < free && !slot.peer_shut {
                        slot.readable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    slot.readable = false;
                    return Input::Idle;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Input::Closed,
            }
        }
    }

    /// Lends slot `i` a large buffer, its received bytes moved there, if
    /// one is free and its process holds fewer than `large_per_process`;
    /// else queues it to wait (nothing more is read from it meanwhile).
    fn lend(&mut self, i: usize) -> bool {
        let within_share = || {
            let pid = self.slots[i].peer_pid();
            let held = self
                .slots
                .iter()
                .filter(|s| s.lent.is_some() && s.peer_pid() == pid)
                .count();
            // A pid the kernel cannot give (0: another pid namespace) is
            // one process here, so such peers share one share.
            held < large_per_process()
        };
        let large = if !self.pool.free.is_empty() && within_share() {
            self.pool.free.pop()
        } else {
            None
        };
        let slot = &mut self.slots[i];
        let Some(large) = large else {
            if !slot.wants_large {
                slot.wants_large = true;
                // At most one entry per slot: the queue has room.
                self.pool.waiting.push_back((i, slot.generation));
                log::debug!("bus: slot {i}: waits for a large frame buffer");
            }
            return false;
        };
        large[..slot.rx_len].copy_from_slice(&slot.rx[..slot.rx_len]);
        slot.lent = Some(large);
        slot.wants_large = false;
        true
    }

    /// Takes back slot `i`'s large buffer if what it holds now fits its
    /// own (moved there), and lends freed buffers to the slots waiting,
    /// in the order they came.
    fn give_back(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.rx_len > slot.rx.len() {
            return;
        }
        let Some(large) = slot.lent.take() else {
            return;
        };
        slot.rx[..slot.rx_len].copy_from_slice(&large[..slot.rx_len]);
        self.pool.free.push(large);
        // Each waiter is looked at once: lent a buffer, or (its process
        // holding its share) queued again; a closed or reused slot's
        // entry is dropped.
        for _ in 0..self.pool.waiting.len() {
            if self.pool.free.is_empty() {
                break;
            }
            let Some((w, generation)) = self.pool.waiting.pop_front() else {
                break;
            };
            let waiter = &mut self.slots[w];
            if !(waiter.is_open() && waiter.generation == generation && waiter.wants_large) {
                continue;
            }
            waiter.wants_large = false;
            if self.lend(w) {
                let waiter = &mut self.slots[w];
                waiter.granted = true;
                waiter.readable = true;
            }
        }
    }

    /// Drops the first `len` received bytes (a handled frame).
    pub fn consume(&mut self, i: usize, len: usize, now: Instant) {
        let slot = &mut self.slots[i];
        let len = len.min(slot.rx_len);
        let rx_len = slot.rx_len;
        match slot.lent.as_deref_mut() {
            Some(large) => large.copy_within(len..rx_len, 0),
            None => slot.rx.copy_within(len..rx_len, 0),
        }
        slot.rx_len -= len;
        // What is left is the start of the next frame.
        slot.frame_since = (slot.rx_len > 0).then_some(now);
        self.give_back(i);
    }

    /// Slot `i`'s input is not read now by the caller's choice: the part
    /// of a frame it holds is not its peer's delay, so the partial
    /// timeout [bus-iso-3] starts again from `now`.
    pub fn hold_partial(&mut self, i: usize, now: Instant) {
        let slot = &mut self.slots[i];
        if slot.rx_len > 0 {
            slot.frame_since = Some(now);
        }
    }

    /// From now on, slot `i`'s input is read and discarded [bus-req-4.2].
    pub fn ignore_input(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.ignore_input = true;
        slot.rx_len = 0;
        slot.frame_since = None;
        self.give_back(i);
    }

    /// Marks that slot `i` may have input again (a readiness event);
    /// `peer_shut` when the event also reported the peer's half-close.
    pub fn set_readable(&mut self, i: usize, peer_shut: bool) {
        let slot = &mut self.slots[i];
        slot.readable = true;
        slot.peer_shut |= peer_shut;
    }

    /// Slot `i`'s socket has room again (a writable edge): its peer read.
    pub fn set_writable(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.behind {
            slot.progressed();
        }
    }

    /// Sends a frame given as parts (written with one `writev` when the
    /// backlog is empty; what the kernel does not take goes to the backlog).
    /// A frame is never partly queued: if it does not fit, nothing is sent.
    pub fn send(&mut self, i: usize, parts: &[&[u8]]) -> Result<(), SendError> {
        let slot = &mut self.slots[i];
        let Some(stream) = slot.stream.as_mut() else {
            return Err(SendError::Closed);
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut written = 0;
        // A frame the backlog could not hold the rest of (a large message)
        // is written only if the kernel's buffer and the backlog have room
        // for all of it: a torn frame would cost the connection, a frame
        // not sent costs only this message for this peer. One that could
        // not fit even an empty buffer is not the peer's doing.
        let tx_free = slot.tx.len() - slot.tx_len;
        if slot.tx_len == 0 && total > tx_free {
            if let Some((size, queued)) = crate::sys::send_buffer(stream.as_raw_fd()) {
                let need = total + total / 16 + SKB_SLACK;
                if size.saturating_sub(queued) + tx_free < need {
                    if queued == 0 {
                        return Err(SendError::TooLarge(size));
                    }
                    slot.behind = true;
                    self.want_writable(i);
                    return Err(SendError::Full);
                }
            }
        }
        if slot.tx_len == 0 {
            let slices: heapless::Vec<IoSlice<'_>, 4> =
                parts.iter().take(4).map(|p| IoSlice::new(p)).collect();
            loop {
                match stream.write_vectored(&slices) {
                    Ok(n) => {
                        written = n;
                        if n > 0 {
                            slot.tx_progress = true;
                            slot.behind = false;
                        }
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        slot.read_closed = true;
                        return Err(SendError::Closed);
                    }
                }
            }
        }
        if total - written > slot.tx_free() {
            if written > 0 {
                // Part of the frame is out; the peer would see a torn frame.
                // Nothing sensible can follow it: close after what we have.
                slot.close_after_flush = true;
            }
            slot.behind = true;
            self.want_writable(i);
            return Err(SendError::Full);
        }
        let mut skip = written;
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            slot.push_tx(&part[skip..]);
            skip = 0;
        }
        if written < total {
            self.want_writable(i);
        }
        Ok(())
    }

    /// Asks for slot `i`'s writable edges from now on (kept until it
    /// closes): its output has to wait for the peer to read.
    fn want_writable(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.write_interest {
            return;
        }
        let (Some(registry), Some(stream)) = (self.registry.as_ref(), slot.stream.as_mut()) else {
            return;
        };
        let token = Token(CLIENT_TOKEN_BASE + i);
        match registry.reregister(stream, token, Interest::READABLE | Interest::WRITABLE) {
            Ok(()) => slot.write_interest = true,
            // The backlog then waits for the next readable event, and a
            // peer that reads nothing meets the stall timeout.
            Err(e) => log::warn!("bus: slot {i}: cannot ask for writability: {e}"),
        }
    }

    /// Writes slot `i`'s backlog until the kernel stops taking it. Returns
    /// whether the slot should now be closed (done closing, or failed).
    pub fn flush(&mut self, i: usize) -> bool {
        let slot = &mut self.slots[i];
        let Some(stream) = slot.stream.as_mut() else {
            return false;
        };
        while slot.tx_len > 0 {
            let cap = slot.tx.len();
            let run = (cap - slot.tx_head).min(slot.tx_len);
            match stream.write(&slot.tx[slot.tx_head..slot.tx_head + run]) {
                Ok(0) => return true,
                Ok(n) => {
                    slot.tx_head = (slot.tx_head + n) % cap;
                    slot.tx_len -= n;
                    // The peer took some: as `progressed`, field by field
                    // (the stream is borrowed from the slot).
                    slot.tx_progress = true;
                    slot.behind = false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        slot.tx_head = 0;
        slot.close_after_flush
    }

    /// Closes slot `i` once its backlog is written.
    pub fn close_after_flush(&mut self, i: usize) {
        self.slots[i].close_after_flush = true;
    }

    /// Closes slot `i` now.
    pub fn close(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        // Closing the descriptor takes it out of epoll: no deregister call.
        if slot.stream.take().is_some() {
            log::debug!("bus: slot {i} closed");
        }
        slot.rx_len = 0;
        if slot.wants_large {
            // Its place in the queue goes with it: at most one entry per
            // slot, so the queue never outgrows the table.
            self.pool.waiting.retain(|&(w, _)| w != i);
        }
        self.give_back(i);
        self.slots[i].reset();
    }
}

impl<S> Drop for Server<S> {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The slot table with its buffers. Each buffer pool is one allocation,
/// made once and kept for the daemon's life: large enough to be mapped
/// on demand, so a slot's pages cost memory only once it is used.
fn slot_table<S: Copy + Default>() -> Vec<Slot<S>> {
    let n = consts::MAX_BUS_CLIENTS;
    let rx_pool: &'static mut [u8] = Box::leak(vec![0u8; n * SLOT_BUFFER].into_boxed_slice());
    let tx_pool: &'static mut [u8] =
        Box::leak(vec![0u8; n * consts::BUS_CLIENT_TX].into_boxed_slice());
    rx_pool
        .chunks_mut(SLOT_BUFFER)
        .zip(tx_pool.chunks_mut(consts::BUS_CLIENT_TX))
        .map(|(rx, tx)| Slot::new(rx, tx))
        .collect()
}

/// Each slot's own receive buffer: frames up to this size need nothing
/// else (every frame of a Greengrass Lite client, at the default).
pub const SLOT_BUFFER: usize = if consts::BUS_SLOT_BUFFER < consts::BUS_MAX_FRAME {
    consts::BUS_SLOT_BUFFER
} else {
    consts::BUS_MAX_FRAME
};

/// The most large buffers one process may hold at once: half the pool
/// (at least one), so that one process alone never keeps another's large
/// frame waiting.
fn large_per_process() -> usize {
    (consts::BUS_LARGE_BUFFERS / 2).max(1)
}

/// The large buffers (`BUS_LARGE_BUFFERS` of `BUS_MAX_FRAME` bytes, one
/// allocation made at start-up and mapped on use) and the slots waiting
/// for one. A frame larger than its slot's own buffer borrows one until
/// what the slot holds fits its own again; a slot that finds none free
/// waits, reading nothing (its peer's writes block), and is never refused
/// for it. No frame is larger than `BUS_MAX_FRAME`, so a lent buffer
/// always holds it.
struct Pool {
    free: Vec<&'static mut [u8]>,
    /// Slots (and their connection's generation) waiting, first come
    /// first served; at most one entry per slot.
    waiting: std::collections::VecDeque<(usize, u32)>,
}

impl Pool {
    fn new() -> Self {
        let n = if consts::BUS_MAX_FRAME > SLOT_BUFFER {
            consts::BUS_LARGE_BUFFERS
        } else {
            0
        };
        let all: &'static mut [u8] =
            Box::leak(vec![0u8; n * consts::BUS_MAX_FRAME].into_boxed_slice());
        let mut free = Vec::with_capacity(n);
        free.extend(all.chunks_mut(consts::BUS_MAX_FRAME));
        Self {
            free,
            waiting: std::collections::VecDeque::with_capacity(consts::MAX_BUS_CLIENTS),
        }
    }
}

/// [bus-sock-2] Creates missing parents (0755) and removes a stale socket;
/// refuses to remove anything that is not a socket, or a socket another
/// daemon still serves.
fn prepare_path(path: &Path) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err("another process is serving it".into());
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket: {e}"))
        }
        Ok(_) => Err("exists and is not a socket".into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect: {e}")),
    }
}

#[cfg(test)]
mod tests {
    //! The server over real Unix sockets: a listener in a temporary
    //! directory, a plain blocking client on the other side.

    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdStream;
    use std::time::Duration;

    use mio::Poll;

    use super::*;
    use crate::bus::frame::{emit_error, ErrorCode, ERROR_FRAME_LEN};

    struct Fixture {
        poll: Poll,
        server: Server<u8>,
        dir: PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("iotcored-srv-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let poll = Poll::new().unwrap();
        let mut server = Server::bind(&dir, "bus").unwrap();
        server.register(poll.registry(), Token(0)).unwrap();
        Fixture { poll, server, dir }
    }

    impl Fixture {
        /// A client connected to the server, and its slot.
        fn connect(&mut self) -> (StdStream, usize) {
            let client = StdStream::connect(self.dir.join("bus")).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let filled = self.server.accept(t(0), |s| s == 0);
            assert_eq!(filled.len(), 1);
            (client, filled[0])
        }
    }

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn error_frame(code: ErrorCode) -> [u8; ERROR_FRAME_LEN] {
        let mut buf = [0u8; ERROR_FRAME_LEN];
        emit_error(&mut buf, code).unwrap();
        buf
    }

    /// Reads from `client` until `n` bytes came (or the timeout).
    fn read_n(client: &mut StdStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        client.read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn sends_reach_the_peer_whole_and_in_order_through_the_backlog() {
        let mut f = fixture("order");
        let (mut client, i) = f.connect();
        let codes = [ErrorCode::Busy, ErrorCode::Range, ErrorCode::NoMem];
        // Send until neither the kernel nor the backlog takes more.
        let mut sent = 0usize;
        while f.server.send(i, &[&error_frame(codes[sent % 3])]) == Ok(()) {
            sent += 1;
            assert!(sent < 1_000_000, "the socket never filled");
        }
        assert!(f.server.slot(i).has_backlog());
        // The refused frame was not partly queued: the peer gets exactly
        // `sent` whole frames once it reads and the backlog drains.
        let mut got = Vec::new();
        while got.len() < sent * ERROR_FRAME_LEN {
            assert!(!f.server.flush(i));
            let mut buf = [0u8; 65536];
            let n = client.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert!(!f.server.flush(i));
        assert!(!f.server.slot(i).has_backlog());
        assert_eq!(got.len(), sent * ERROR_FRAME_LEN);
        for (k, frame) in got.chunks(ERROR_FRAME_LEN).enumerate() {
            assert_eq!(frame, error_frame(codes[k % 3]), "frame {k}");
        }
    }

    /// The events of slot `i` that arrive within 100 ms: (readable,
    /// writable) of each.
    fn events_of(f: &mut Fixture, i: usize) -> Vec<(bool, bool)> {
        let mut events = mio::Events::with_capacity(16);
        f.poll
            .poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        events
            .iter()
            .filter(|e| e.token() == Token(CLIENT_TOKEN_BASE + i))
            .map(|e| (e.is_readable(), e.is_writable()))
            .collect()
    }

    #[test]
    fn a_client_is_woken_for_writability_only_once_its_output_waits() {
        let mut f = fixture("wr-interest");
        let (mut client, i) = f.connect();
        // An answer the socket takes whole: reading it wakes nobody.
        f.server.send(i, &[&error_frame(ErrorCode::Busy)]).unwrap();
        assert_eq!(read_n(&mut client, ERROR_FRAME_LEN).len(), ERROR_FRAME_LEN);
        assert_eq!(events_of(&mut f, i), []);
        // Output that has to wait: the peer reading it is an event, so the
        // backlog can be written.
        while f.server.send(i, &[&error_frame(ErrorCode::Busy)]) == Ok(()) {}
        assert!(f.server.slot(i).has_backlog());
        let _ = events_of(&mut f, i); // the edge of asking, if any
        let mut buf = [0u8; 65536];
        assert!(client.read(&mut buf).unwrap() > 0);
        let woken = events_of(&mut f, i);
        assert!(woken.iter().any(|&(_, w)| w), "{woken:?}");
    }

    #[test]
    fn a_frame_sent_in_parts_arrives_as_one() {
        let mut f = fixture("parts");
        let (mut client, i) = f.connect();
        let whole = error_frame(ErrorCode::Remote);
        let (a, b) = whole.split_at(10);
        f.server.send(i, &[a, b, &[]]).unwrap();
        assert_eq!(read_n(&mut client, whole.len()), whole);
    }

    #[test]
    fn close_after_flush_closes_once_the_backlog_is_written() {
        let mut f = fixture("close");
        let (mut client, i) = f.connect();
        f.server.send(i, &[&error_frame(ErrorCode::Parse)]).unwrap();
        f.server.close_after_flush(i);
        assert!(f.server.slot(i).is_closing());
        assert!(!f.server.slot(i).has_input(), "no more input once closing");
        assert!(f.server.flush(i), "nothing left: close now");
        f.server.close(i);
        assert_eq!(
            read_n(&mut client, ERROR_FRAME_LEN),
            error_frame(ErrorCode::Parse)
        );
        let mut rest = Vec::new();
        assert_eq!(
            client.read_to_end(&mut rest).unwrap(),
            0,
            "then end of stream"
        );
        assert_eq!(f.server.send(i, &[b"x"]), Err(SendError::Closed));
    }

    #[test]
    fn a_closing_slot_lingers_at_most_close_linger() {
        let mut f = fixture("linger");
        let (_client, i) = f.connect();
        assert_eq!(f.server.slot(i).linger_deadline(), None);
        f.server.close_after_flush(i);
        // Unmarked: due at once, so the next turn marks it.
        assert_eq!(f.server.slot(i).linger_deadline(), Some(Instant::default()));
        assert!(!f.server.lingered(i, t(1000)));
        let limit = t(1000) + CLOSE_LINGER;
        assert_eq!(f.server.slot(i).linger_deadline(), Some(limit));
        assert!(!f.server.lingered(i, t(1000 + 4999)));
        assert!(f.server.lingered(i, limit));
    }

    #[test]
    fn a_complete_frame_is_reported_and_consumed_and_a_truncated_one_is_parse() {
        let mut f = fixture("read");
        let (mut client, i) = f.connect();
        let frame = error_frame(ErrorCode::Busy);
        client.write_all(&frame).unwrap();
        client.write_all(&frame[..5]).unwrap();
        assert_eq!(f.server.read(i, t(0)), Input::Frame(frame.len()));
        assert_eq!(f.server.slot(i).frame(frame.len()), frame);
        f.server.consume(i, frame.len(), t(0));
        // One read took both (a short read: nothing more until an edge).
        assert_eq!(f.server.read(i, t(0)), Input::Idle);
        drop(client);
        // [bus-err-1] a frame cut by the end of the stream, seen on the
        // next readiness event.
        f.server.set_readable(i, false);
        assert_eq!(f.server.read(i, t(0)), Input::Malformed(ErrorCode::Parse));
    }

    #[test]
    fn a_half_close_announced_with_the_data_is_read_to_the_end_of_file() {
        // The CI race: part of a frame and the peer's shutdown arrive
        // before the daemon reads, so one edge announces both. The short
        // read must not end the reading: no edge would come for the EOF.
        let mut f = fixture("halfclose");
        let (mut client, i) = f.connect();
        let frame = error_frame(ErrorCode::Busy);
        client.write_all(&frame[..frame.len() - 3]).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        f.server.set_readable(i, true);
        assert_eq!(f.server.read(i, t(0)), Input::Malformed(ErrorCode::Parse));
    }

    /// A prelude announcing `total_len` bytes, with a valid CRC.
    fn prelude(total_len: u32) -> [u8; 12] {
        let mut p = [0u8; 12];
        p[..4].copy_from_slice(&total_len.to_be_bytes());
        let crc = frame::crc32(&p[..8]);
        p[8..].copy_from_slice(&crc.to_be_bytes());
        p
    }

    #[test]
    fn an_oversized_frame_is_read_and_discarded_before_nomem() {
        // [bus-err-2]
        let mut f = fixture("discard");
        let (mut client, i) = f.connect();
        let total = consts::BUS_MAX_FRAME + 5000;
        client
            .write_all(&prelude(u32::try_from(total).unwrap()))
            .unwrap();
        assert_eq!(f.server.read(i, t(0)), Input::Idle);
        assert_eq!(
            f.server.slot(i).discard_deadline(),
            Some(t(0) + DISCARD_TIMEOUT)
        );
        client.write_all(&vec![0u8; total - 12]).unwrap();
        let mut input = Input::Idle;
        for _ in 0..100 {
            input = f.server.read(i, t(10));
            if input != Input::Idle {
                break;
            }
        }
        assert_eq!(input, Input::Malformed(ErrorCode::NoMem));
        assert_eq!(f.server.slot(i).discard_deadline(), None);
    }

    #[test]
    fn a_client_that_stops_writing_an_oversized_frame_gets_nomem_at_the_deadline() {
        let mut f = fixture("discard-timeout");
        let (mut client, i) = f.connect();
        client.write_all(&prelude(1_000_000)).unwrap();
        assert_eq!(f.server.read(i, t(0)), Input::Idle);
        let deadline = t(0) + DISCARD_TIMEOUT;
        assert_eq!(f.server.read(i, t(1)), Input::Idle);
        assert_eq!(
            f.server.read(i, deadline),
            Input::Malformed(ErrorCode::NoMem)
        );
    }

    #[test]
    fn ignored_input_is_read_and_thrown_away() {
        // [bus-req-4.2]
        let mut f = fixture("ignore");
        let (mut client, i) = f.connect();
        f.server.ignore_input(i);
        client.write_all(&[0xff; 4096]).unwrap();
        assert_eq!(f.server.read(i, t(0)), Input::Idle);
        drop(client);
        assert_eq!(f.server.read(i, t(0)), Input::Closed);
    }

    #[test]
    fn a_reused_slot_starts_with_a_new_generation_and_the_default_state() {
        let mut f = fixture("reuse");
        let (_c1, i) = f.connect();
        let first = f.server.slot(i).generation();
        f.server.set_state(i, 7);
        f.server.close(i);
        assert_eq!(f.server.slot(i).state(), 0);
        let (_c2, j) = f.connect();
        assert_eq!(j, i);
        assert_ne!(f.server.slot(j).generation(), first);
        assert_eq!(f.server.slot(j).state(), 0);
    }

    #[test]
    fn a_connection_whose_bytes_are_not_yet_read_is_not_idle() {
        // [bus-iso-3] Only a connection holding nothing may make room; bytes
        // the kernel holds for it (their readiness event not yet served)
        // are a request in progress.
        let mut f = fixture("unread");
        let (mut client, i) = f.connect();
        assert!(f.server.slots[i].is_idle(&|_| true));
        client.write_all(&[0x00]).unwrap();
        assert!(!f.server.slots[i].is_idle(&|_| true));
        assert!(!f.server.slots[i].is_idle(&|_| false));
    }

    #[test]
    fn one_process_gets_at_most_half_the_slots_and_the_rest_are_refused() {
        // [bus-iso-3] Every connection here comes from this test's pid.
        let mut f = fixture("per-pid");
        let limit = f.server.per_process_limit();
        assert_eq!(limit, consts::MAX_BUS_CLIENTS / 2);
        let clients: Vec<_> = (0..limit).map(|_| f.connect()).collect();
        let me = std::process::id();
        assert!(clients.iter().all(|(_, i)| f.server.pid(*i) == me));
        let mut extra = StdStream::connect(f.dir.join("bus")).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(f.server.accept(t(0), |_| true).is_empty());
        assert_eq!(f.server.refused(), 1);
        let mut buf = [0u8; 1];
        assert_eq!(extra.read(&mut buf).unwrap(), 0, "closed at once");
        assert_eq!(f.server.open_count(), limit);
        // Once one of ours closes, the process may connect again.
        f.server.close(clients[0].1);
        let (_again, _) = f.connect();
    }

    #[test]
    fn a_frame_left_incomplete_for_ten_seconds_has_a_deadline_and_a_complete_one_none() {
        // [bus-iso-3]
        let mut f = fixture("partial");
        let (mut client, i) = f.connect();
        assert_eq!(f.server.slot(i).partial_deadline(), None);
        let frame = error_frame(ErrorCode::Busy);
        client.write_all(&frame[..7]).unwrap();
        assert_eq!(f.server.read(i, t(1000)), Input::Idle);
        assert_eq!(
            f.server.slot(i).partial_deadline(),
            Some(t(1000) + PARTIAL_TIMEOUT)
        );
        // More bytes of the same frame (each a readiness event) do not
        // move the deadline.
        client.write_all(&frame[7..20]).unwrap();
        f.server.set_readable(i, false);
        assert_eq!(f.server.read(i, t(5000)), Input::Idle);
        assert_eq!(
            f.server.slot(i).partial_deadline(),
            Some(t(1000) + PARTIAL_TIMEOUT)
        );
        // Complete (even if not handled yet, e.g. behind a waiting call):
        // no deadline.
        client.write_all(&frame[20..]).unwrap();
        client.write_all(&frame[..3]).unwrap();
        f.server.set_readable(i, false);
        assert_eq!(f.server.read(i, t(6000)), Input::Frame(frame.len()));
        assert_eq!(f.server.slot(i).partial_deadline(), None);
        // The next frame's first bytes, read with it, start a deadline of
        // their own once the first is consumed.
        f.server.consume(i, frame.len(), t(7000));
        assert_eq!(
            f.server.slot(i).partial_deadline(),
            Some(t(7000) + PARTIAL_TIMEOUT)
        );
    }

    #[test]
    fn a_peer_that_takes_nothing_for_ten_seconds_is_stalled_and_one_that_reads_is_not() {
        // [bus-iso-6]
        let mut f = fixture("stall");
        let (mut client, i) = f.connect();
        assert!(!f.server.stalled(i, t(0)));
        assert_eq!(f.server.slot(i).stall_deadline(), None, "nothing waiting");
        while f.server.send(i, &[&error_frame(ErrorCode::Busy)]) == Ok(()) {}
        assert!(f.server.slot(i).has_backlog());
        // Unmarked: due at once; marked by the first look.
        assert_eq!(f.server.slot(i).stall_deadline(), Some(Instant::default()));
        assert!(!f.server.stalled(i, t(1000)));
        assert_eq!(
            f.server.slot(i).stall_deadline(),
            Some(t(1000) + STALL_TIMEOUT)
        );
        assert!(!f.server.stalled(i, t(10_999)));
        // The peer reads a little: the backlog moves, the time starts again.
        let mut buf = [0u8; 4096];
        let _ = client.read(&mut buf).unwrap();
        assert!(!f.server.flush(i));
        while f.server.send(i, &[&error_frame(ErrorCode::Busy)]) == Ok(()) {}
        assert!(f.server.slot(i).has_backlog());
        assert!(!f.server.stalled(i, t(10_999)));
        assert!(!f.server.stalled(i, t(20_998)));
        assert!(f.server.stalled(i, t(20_999)), "10 s without taking any");
        // Once everything is taken, nothing is waiting: never stalled.
        let mut rest = Vec::new();
        while f.server.slot(i).has_backlog() {
            let n = client.read(&mut buf).unwrap();
            rest.extend_from_slice(&buf[..n]);
            f.server.flush(i);
        }
        assert!(!f.server.stalled(i, t(100_000)));
        assert_eq!(f.server.slot(i).stall_deadline(), None);
    }

    /// A request frame of exactly `len` bytes whose payload bytes are `fill`.
    fn frame_of(len: usize, fill: u8) -> Vec<u8> {
        let overhead = frame::request_len(b"publish", 0);
        let mut buf = vec![0u8; len];
        let mut e = frame::begin_request(&mut buf, b"publish", frame::RequestType::Call).unwrap();
        e.payload_mut().fill(fill);
        assert_eq!(e.finish(len - overhead).unwrap(), len);
        buf
    }

    /// Reads slot `i` until it reports something other than `Idle`, at most
    /// `tries` times (the peer's bytes may take a moment).
    fn read_until(f: &mut Fixture, i: usize, tries: usize) -> Input {
        for _ in 0..tries {
            f.server.set_readable(i, false);
            match f.server.read(i, t(0)) {
                Input::Idle => std::thread::sleep(Duration::from_millis(5)),
                other => return other,
            }
        }
        Input::Idle
    }

    #[test]
    fn a_frame_larger_than_the_slot_buffer_borrows_a_large_one_and_gives_it_back() {
        // Issue 14: frames up to BUS_MAX_FRAME whatever the slot's own buffer.
        let mut f = fixture("large");
        let (mut client, i) = f.connect();
        let big = frame_of(consts::BUS_MAX_FRAME, 0xA5);
        // Pipelined behind it, another larger than the slot's own buffer.
        let small = frame_of(8000, 0x5A);
        client.write_all(&big).unwrap();
        client.write_all(&small).unwrap();
        let mut input = read_until(&mut f, i, 200);
        // The whole frame, read in several turns (the budget) if need be.
        for _ in 0..10 {
            if input != Input::Idle {
                break;
            }
            input = read_until(&mut f, i, 200);
        }
        assert_eq!(input, Input::Frame(big.len()));
        assert_eq!(f.server.slot(i).frame(big.len()), &big[..]);
        assert_eq!(f.server.pool.free.len(), consts::BUS_LARGE_BUFFERS - 1);
        // Nothing past the frame was read into the lent buffer, so it is
        // back once the frame is handled, whether or not the caller reads
        // the slot again soon (a call waiting for its answer).
        assert_eq!(f.server.slot(i).rx_len, big.len());
        f.server.consume(i, big.len(), t(0));
        assert_eq!(f.server.pool.free.len(), consts::BUS_LARGE_BUFFERS);
        assert_eq!(read_until(&mut f, i, 200), Input::Frame(small.len()));
        assert_eq!(f.server.slot(i).frame(small.len()), &small[..]);
        f.server.consume(i, small.len(), t(0));
        assert_eq!(f.server.pool.free.len(), consts::BUS_LARGE_BUFFERS);
    }

    #[test]
    fn with_no_large_buffer_for_it_a_client_waits_unread_and_untimed_then_is_served() {
        // One process holds at most half the pool: the test's two clients
        // are one process, so the second waits for the first's buffer
        // although another is free; it is never refused for it.
        let mut f = fixture("large-wait");
        let (mut a, i) = f.connect();
        let (mut b, j) = f.connect();
        let frame_a = frame_of(8000, 1);
        let frame_b = frame_of(9000, 2);
        a.write_all(&frame_a).unwrap();
        assert_eq!(read_until(&mut f, i, 200), Input::Frame(frame_a.len()));
        b.write_all(&frame_b).unwrap();
        assert_eq!(read_until(&mut f, j, 50), Input::Idle);
        let waiting = f.server.slot(j);
        assert!(waiting.wants_large && !waiting.has_input());
        assert_eq!(
            waiting.partial_deadline(),
            None,
            "its wait is not its fault"
        );
        assert_eq!(f.server.overdue(j, t(60_000)), None);
        // The first frame handled: its buffer goes to the one waiting.
        f.server.consume(i, frame_a.len(), t(0));
        assert!(f.server.slot(j).has_input());
        assert!(f.server.slot(j).granted);
        assert_eq!(f.server.slot(j).partial_deadline(), None);
        assert_eq!(read_until(&mut f, j, 200), Input::Frame(frame_b.len()));
        assert_eq!(f.server.slot(j).frame(frame_b.len()), &frame_b[..]);
        // Its frame's time started again when it was served (at t(0)).
        assert_eq!(f.server.slot(j).frame_since, Some(t(0)));
        f.server.consume(j, frame_b.len(), t(0));
        assert_eq!(f.server.pool.free.len(), consts::BUS_LARGE_BUFFERS);
    }

    #[test]
    fn a_closed_holder_or_waiter_returns_its_buffer_and_leaves_the_queue() {
        // The test's process may hold two slots (half the table).
        let mut f = fixture("large-close");
        let (mut a, i) = f.connect();
        let (mut b, j) = f.connect();
        // a holds a buffer with part of a frame; b waits for one.
        let frame_a = frame_of(8000, 1);
        a.write_all(&frame_a[..6000]).unwrap();
        assert_eq!(read_until(&mut f, i, 20), Input::Idle);
        assert_eq!(f.server.pool.free.len(), consts::BUS_LARGE_BUFFERS - 1);
        b.write_all(&frame_of(7000, 2)).unwrap();
        assert_eq!(read_until(&mut f, j, 20), Input::Idle);
        assert!(f.server.slot(j).wants_large);
        // b goes away while waiting, and its place in the queue with it;
        // c takes its slot and waits in turn.
        f.server.close(j);
        drop(b);
        assert!(f.server.pool.waiting.is_empty());
        let (mut c, k) = f.connect();
        assert_eq!(k, j, "the freed slot is reused");
        let frame_c = frame_of(7000, 3);
        c.write_all(&frame_c).unwrap();
        assert_eq!(read_until(&mut f, k, 20), Input::Idle);
        assert_eq!(f.server.pool.waiting.len(), 1);
        // a is closed mid-frame: its buffer goes to c.
        f.server.close(i);
        assert!(f.server.pool.waiting.is_empty());
        assert_eq!(read_until(&mut f, k, 200), Input::Frame(frame_c.len()));
        assert_eq!(f.server.slot(k).frame(frame_c.len()), &frame_c[..]);
        f.server.close(k);
        assert_eq!(f.server.pool.free.len(), consts::BUS_LARGE_BUFFERS);
        drop((a, c));
    }

    #[test]
    fn a_large_frame_goes_whole_or_not_at_all_and_never_costs_the_connection() {
        // Messages far larger than the backlog (AWS's 128 KiB): written
        // only while the kernel has room for all of it.
        let mut f = fixture("large-send");
        let (mut client, i) = f.connect();
        let big = frame_of(100 * 1024, 7);
        let mut sent = 0;
        while f.server.send(i, &[&big]) == Ok(()) {
            sent += 1;
            assert!(sent < 100, "the socket never filled");
        }
        assert!(sent >= 1, "an empty socket takes one");
        assert!(!f.server.slot(i).is_closing(), "nothing torn");
        assert!(!f.server.slot(i).has_backlog());
        for _ in 0..sent {
            assert_eq!(read_n(&mut client, big.len()), big);
        }
        // Read out, the next one goes again.
        assert_eq!(f.server.send(i, &[&big]), Ok(()));
        assert_eq!(read_n(&mut client, big.len()), big);
    }

    #[test]
    fn a_frame_no_empty_socket_buffer_can_hold_is_refused_without_blaming_the_peer() {
        // Larger than the kernel's default Unix send buffer (208 KiB) and
        // the backlog together: it could only ever go torn.
        let mut f = fixture("too-large");
        let (mut client, i) = f.connect();
        let huge = frame_of(400 * 1024, 3);
        assert!(matches!(
            f.server.send(i, &[&huge]),
            Err(SendError::TooLarge(_))
        ));
        let slot = f.server.slot(i);
        assert!(!slot.behind && !slot.is_closing() && !slot.has_backlog());
        assert!(!f.server.stalled(i, t(0)));
        assert!(!f.server.stalled(i, t(60_000)), "not counted as a stall");
        // The connection goes on.
        f.server.send(i, &[&error_frame(ErrorCode::Busy)]).unwrap();
        assert_eq!(
            read_n(&mut client, ERROR_FRAME_LEN),
            error_frame(ErrorCode::Busy)
        );
    }

    #[test]
    fn random_mixes_of_small_and_large_frames_arrive_whole_and_the_pool_comes_back() {
        // Two clients (one process: one large buffer at a time between
        // them) pipeline random frames, small and larger than a slot's own
        // buffer, written in random pieces between the server's reads, in
        // random turns. Every frame arrives whole and in order, the one
        // without a buffer waits and is served, and every large buffer is
        // back at the end.
        let mut rng = crate::test_rng::XorShift::new(0x5EED_F00D);
        let mut f = fixture("large-random");
        let (a, i) = f.connect();
        let (b, j) = f.connect();
        let mut clients = [a, b];
        let slots = [i, j];
        let mut waits = 0;
        for round in 0..300 {
            let mut sent: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
            let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
            for k in 0..2 {
                for _ in 0..1 + rng.below(4) {
                    let len = if rng.chance(40) {
                        SLOT_BUFFER + 1 + rng.below(consts::BUS_MAX_FRAME - SLOT_BUFFER)
                    } else {
                        frame::request_len(b"publish", 0) + rng.below(2000)
                    };
                    let fr = frame_of(len, rng.byte());
                    pending[k].extend_from_slice(&fr);
                    sent[k].push(fr);
                }
            }
            let mut got: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..100_000 {
                if got == sent {
                    break;
                }
                let k = rng.below(2);
                if !pending[k].is_empty() && rng.chance(50) {
                    let n = (1 + rng.below(6000)).min(pending[k].len());
                    clients[k].write_all(&pending[k][..n]).unwrap();
                    pending[k].drain(..n);
                    continue;
                }
                let slot = slots[k];
                f.server.set_readable(slot, false);
                match f.server.read(slot, t(0)) {
                    Input::Frame(n) => {
                        got[k].push(f.server.slot(slot).frame(n).to_vec());
                        f.server.consume(slot, n, t(0));
                    }
                    Input::Idle => waits += usize::from(f.server.slot(slot).wants_large),
                    other => panic!("round {round}: {other:?}"),
                }
            }
            assert_eq!(got, sent, "round {round}");
            assert_eq!(
                f.server.pool.free.len(),
                consts::BUS_LARGE_BUFFERS,
                "round {round}"
            );
            assert!(f.server.pool.waiting.is_empty(), "round {round}");
        }
        assert!(waits > 0, "the waiting path was never taken");
    }
}
