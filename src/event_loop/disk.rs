//! The disk spool as the loop owns it [spool-2] [spool-3] [spool-7]: the
//! directory and its lock, the file (`journal`), the periodic sync, the
//! loading of stored records into the memory spool, and the
//! response-endpoint subscriptions kept across a restart (`subscriptions`,
//! a small text file replaced whole when they change).
//!
//! A QoS 1 publish is written to the file (the kernel's page cache) before
//! it is answered, so the end of the process loses nothing answered; a sync
//! every `--spool-sync` ms makes it survive a power cut. The broker's
//! PUBACK (or a quarantine) releases its record. The file can hold more
//! than the memory spool: when memory is full, QoS 1 messages wait on disk
//! only (`unloaded`), every later one behind them, and move into memory
//! in order as room frees (`load`, after every PUBACK and in the pump).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::journal::{self, Cursor, FileStorage, Journal, Read, Recovered, MAX_RECORD};
use crate::mqtt::packet::QoS;
use crate::mqtt::props::{Context, Props};
use crate::router::{Dest, Router, MAX_FILTERS_PER_REQUEST};
use crate::service::Store;
use crate::spool::{Message, Spool};
use crate::sys;
use crate::time::Instant;

/// The file's name in the spool directory, its lock's, and the kept
/// response-endpoint subscriptions' [spool-7].
const FILE: &str = "spool";
const LOCK: &str = "lock";
const SUBSCRIPTIONS: &str = "subscriptions";
/// A record, version 2: version, retain, pid, topic length, properties
/// length, expiry (Unix time in ms, 0 for none), topic, MQTT 5 properties,
/// payload; all integers little-endian. Version 1 (no properties, no
/// expiry) is still read.
const RECORD_VERSION: u8 = 2;
const RECORD_V1: u8 = 1;
const RECORD_HEAD_V1: usize = 8;
const RECORD_HEAD: usize = 18;

/// A stored message's fields.
pub(super) struct Stored<'a> {
    pid: u32,
    retain: bool,
    topic: &'a str,
    properties: &'a [u8],
    /// Unix time in ms after which it is not worth sending; 0 for never.
    expires_ms: u64,
    payload: &'a [u8],
}

/// The disk spool: open for the daemon's life.
pub struct DiskSpool {
    journal: Journal<FileStorage>,
    /// Held for the daemon's life: the `flock` on the lock file.
    _lock: File,
    dir: PathBuf,
    /// `Router::endpoint_changes` when the subscriptions were last saved.
    saved: u64,
    every: Duration,
    /// When the last sync was; a sync is due `every` after it once
    /// something changed.
    last_sync: Instant,
    dirty: bool,
    /// A call waits for the next sync: it is due now.
    urgent: bool,
    /// Stored records not yet in the memory spool (found at start-up, or
    /// kept on disk for want of room): from this cursor to the tail.
    unloaded: Option<Cursor>,
    /// Records below this were stored before the start: they go before
    /// anything new [spool-6].
    restore_below: u64,
    scratch: Box<[u8]>,
    /// Stored messages found expired when loaded (counted `expired`).
    pub expired: u64,
}

impl DiskSpool {
    /// Opens (creating, allocating, recovering) the spool in `dir`. The
    /// error names the directory and the cause.
    pub fn open(dir: &Path, size: u64, sync_ms: u32, now: Instant) -> Result<DiskSpool, String> {
        let shown = dir.display();
        // Past RLIMIT_FSIZE, an error to report rather than a signal.
        sys::ignore_file_size_signal();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("spool directory {shown}: cannot create it: {e}"))?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK))
            .map_err(|e| format!("spool directory {shown}: cannot write in it: {e}"))?;
        sys::lock_exclusive(lock.as_raw_fd()).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                format!("spool directory {shown} is in use by another iotcored")
            } else {
                format!("spool directory {shown}: cannot lock it: {e}")
            }
        })?;
        let path = dir.join(FILE);
        let (journal, recovered) = match open_file(&path, size)? {
            Ok(opened) => opened,
            Err(why) => {
                // Moved aside, never deleted [spool-5].
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let aside = dir.join(format!("{FILE}.corrupt-{secs}"));
                fs::rename(&path, &aside).map_err(|e| {
                    format!(
                        "spool file {}: {why}, and it cannot be moved aside: {e}",
                        path.display()
                    )
                })?;
                log::error!(
                    "spool file {}: {why}; moved aside to {} and started anew",
                    path.display(),
                    aside.display()
                );
                open_file(&path, size)?
                    .map_err(|why| format!("spool file {}: {why}", path.display()))?
            }
        };
        let pending = journal.pending();
        log::info!(
            "disk spool {}: {} bytes, {pending} stored message(s) ({} found after the last checkpoint, {} damaged record(s) skipped)",
            path.display(),
            journal.capacity(),
            recovered.since_checkpoint,
            recovered.corrupt
        );
        let unloaded = (pending > 0).then(|| journal.cursor());
        let restore_below = journal.tail_seq();
        Ok(DiskSpool {
            journal,
            _lock: lock,
            dir: dir.to_path_buf(),
            saved: 0,
            every: Duration::from_millis(u64::from(sync_ms)),
            last_sync: now,
            dirty: false,
            urgent: false,
            unloaded,
            restore_below,
            scratch: vec![0; MAX_RECORD].into_boxed_slice(),
            expired: 0,
        })
    }

    /// Moves stored records into the memory spool while it has room, in
    /// their order; returns how many. Done once every stored record is in.
    pub fn load(&mut self, spool: &mut Spool, now: Instant) -> usize {
        let mut moved = 0;
        while let Some(mut cur) = self.unloaded {
            let before = cur;
            let (seq, len) = match self.journal.read(&mut cur, &mut self.scratch) {
                Ok(Read::Record { seq, len }) => (seq, len),
                Ok(Read::End) => {
                    self.unloaded = None;
                    break;
                }
                Err(e) => {
                    log::error!("disk spool: cannot read: {e}");
                    self.unloaded = None;
                    break;
                }
            };
            let Some(m) = decode(&self.scratch[..len]) else {
                log::warn!("disk spool: record {seq} is not a message; dropped");
                self.release(seq);
                self.unloaded = Some(cur);
                continue;
            };
            // The time it has left, from the wall clock: the monotonic one
            // starts anew with the process.
            let expires = match m.expires_ms {
                0 => None,
                at => {
                    let left = at.saturating_sub(unix_ms());
                    if left == 0 {
                        log::info!("disk spool: record {seq} on {:?} expired; dropped", m.topic);
                        self.expired += 1;
                        self.release(seq);
                        self.unloaded = Some(cur);
                        continue;
                    }
                    Some(now + Duration::from_millis(left))
                }
            };
            let message = Message {
                topic: m.topic,
                payload: m.payload,
                qos: QoS::AtLeastOnce,
                retain: m.retain,
                properties: Props::trusted(m.properties),
                expires,
            };
            if !spool.fits(&message) {
                // No room now: again once messages leave.
                self.unloaded = Some(before);
                break;
            }
            match spool.push_message(now, m.pid, &message) {
                Ok(_) => {
                    spool.store_last(seq);
                    if seq < self.restore_below {
                        spool.restored_last();
                    }
                    moved += 1;
                    self.unloaded = Some(cur);
                }
                Err(_) => {
                    // No room now: again once messages leave.
                    self.unloaded = Some(before);
                    break;
                }
            }
        }
        moved
    }

    /// Subscribes again, for their response endpoints, the subscriptions
    /// kept from before the start [spool-7]; returns how many.
    pub fn restore_subscriptions(&mut self, router: &mut Router) -> usize {
        let path = self.dir.join(SUBSCRIPTIONS);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
            Err(e) => {
                log::error!("{}: cannot read: {e}", path.display());
                return 0;
            }
        };
        let mut restored = 0;
        for line in text.lines() {
            let mut fields = line.split('\t');
            // The flags: 1 virtual, 2 properties (a file of an older build
            // has 0 or 1).
            let (Some(qos), Some(flags), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let filters: heapless::Vec<&str, MAX_FILTERS_PER_REQUEST> =
                fields.take(MAX_FILTERS_PER_REQUEST).collect();
            let qos = if qos == "1" {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            let Some(dest) = Dest::endpoint(name) else {
                continue;
            };
            let flags: u8 = flags.parse().unwrap_or(0);
            match router.subscribe(dest, &filters, qos, flags & 1 != 0) {
                Ok(id) => {
                    router.set_properties(id, flags & 2 != 0);
                    restored += 1;
                }
                Err(e) => log::warn!(
                    "{}: a subscription for {name:?} not restored: {e}",
                    path.display()
                ),
            }
        }
        self.saved = router.endpoint_changes();
        restored
    }

    /// Saves the response-endpoint subscriptions if they changed since
    /// the last save: a new file, synced, then renamed over the old one.
    pub fn save_subscriptions(&mut self, router: &Router) {
        if router.endpoint_changes() == self.saved {
            return;
        }
        self.saved = router.endpoint_changes();
        let mut text = String::new();
        for (name, filters, qos, virt, props) in router.endpoint_subscriptions() {
            let qos = u8::from(qos == QoS::AtLeastOnce);
            let flags = u8::from(virt) | u8::from(props) << 1;
            text.push_str(&format!("{qos}\t{flags}\t{name}"));
            for f in filters {
                text.push('\t');
                text.push_str(f);
            }
            text.push('\n');
        }
        let path = self.dir.join(SUBSCRIPTIONS);
        let tmp = self.dir.join(format!("{SUBSCRIPTIONS}.new"));
        let written = File::create(&tmp)
            .and_then(|mut f| {
                io::Write::write_all(&mut f, text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            log::error!("{}: cannot save the subscriptions: {e}", path.display());
        }
    }

    /// When the next sync is due, if one is.
    pub fn deadline(&self) -> Option<Instant> {
        if self.urgent {
            return Some(self.last_sync);
        }
        self.dirty.then(|| self.last_sync + self.every)
    }

    /// Syncs if one is due; returns, if it did, the record number below
    /// which every record is now durable.
    pub fn sync_if_due(&mut self, now: Instant) -> Option<u64> {
        let due = self.deadline().is_some_and(|at| now >= at);
        due.then(|| self.sync(now))
    }

    /// Syncs now (at a deadline, and when stopping); returns the record
    /// number below which every record is durable (on a failed sync, the
    /// error is logged and nothing is claimed durable).
    pub fn sync(&mut self, now: Instant) -> u64 {
        self.last_sync = now;
        self.dirty = false;
        self.urgent = false;
        match self.journal.sync() {
            Ok(()) => self.journal.tail_seq(),
            Err(e) => {
                log::error!("disk spool: sync failed: {e}");
                0
            }
        }
    }
}

impl Store for DiskSpool {
    fn append(&mut self, pid: u32, m: &Message<'_>, expiry: Option<u32>) -> Option<u64> {
        let (topic, props, payload) = (m.topic, m.properties.bytes(), m.payload);
        let total = RECORD_HEAD + topic.len() + props.len() + payload.len();
        let (Some(record), Ok(topic_len), Ok(props_len)) = (
            self.scratch.get_mut(..total),
            u16::try_from(topic.len()),
            u16::try_from(props.len()),
        ) else {
            return None;
        };
        let expires_ms = expiry.map_or(0, |secs| unix_ms() + 1000 * u64::from(secs));
        record[0] = RECORD_VERSION;
        record[1] = u8::from(m.retain);
        record[2..6].copy_from_slice(&pid.to_le_bytes());
        record[6..8].copy_from_slice(&topic_len.to_le_bytes());
        record[8..10].copy_from_slice(&props_len.to_le_bytes());
        record[10..18].copy_from_slice(&expires_ms.to_le_bytes());
        let (t, rest) = record[RECORD_HEAD..].split_at_mut(topic.len());
        t.copy_from_slice(topic.as_bytes());
        let (p, rest) = rest.split_at_mut(props.len());
        p.copy_from_slice(props);
        rest.copy_from_slice(payload);
        match self.journal.append(record) {
            Ok(seq) => {
                self.dirty = true;
                Some(seq)
            }
            Err(journal::Error::Full) => None,
            Err(e) => {
                log::error!("disk spool: cannot store a message: {e}");
                None
            }
        }
    }

    fn sync_soon(&mut self) {
        self.urgent = true;
    }

    fn backlogged(&self) -> bool {
        self.unloaded.is_some()
    }

    fn keep_on_disk(&mut self, seq: u64) {
        // The first one kept starts the backlog; later ones follow it.
        if self.unloaded.is_none() {
            let last = self.journal.last_cursor();
            debug_assert_eq!(self.journal.tail_seq(), seq + 1);
            self.unloaded = Some(last);
        }
    }

    fn stats(&self) -> (u64, u64, u64) {
        (
            self.journal.pending(),
            self.journal.used(),
            self.journal.corrupt(),
        )
    }

    fn release(&mut self, seq: u64) {
        if seq == 0 {
            return;
        }
        if let Err(e) = self.journal.release(seq) {
            log::error!("disk spool: cannot release record {seq}: {e}");
        }
        self.dirty = true;
    }
}

/// Now as Unix time in ms (0 if the clock is before 1970).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A record's fields, `None` if it is not a message record (its
/// properties are checked again: the CRC guards against damage, not
/// against a record of another build).
pub(super) fn decode(record: &[u8]) -> Option<Stored<'_>> {
    let head = match *record.first()? {
        RECORD_V1 => RECORD_HEAD_V1,
        RECORD_VERSION => RECORD_HEAD,
        _ => return None,
    };
    let fields = record.get(..head)?;
    let pid = u32::from_le_bytes(fields[2..6].try_into().ok()?);
    let topic_len = usize::from(u16::from_le_bytes([fields[6], fields[7]]));
    let (props_len, expires_ms) = if head == RECORD_HEAD {
        (
            usize::from(u16::from_le_bytes([fields[8], fields[9]])),
            u64::from_le_bytes(fields[10..18].try_into().ok()?),
        )
    } else {
        (0, 0)
    };
    let rest = &record[head..];
    let topic = core::str::from_utf8(rest.get(..topic_len)?).ok()?;
    let rest = &rest[topic_len..];
    let properties = rest.get(..props_len)?;
    Props::parse(properties, Context(3)).ok()?;
    Some(Stored {
        pid,
        retain: fields[1] != 0,
        topic,
        properties,
        expires_ms,
        payload: &rest[props_len..],
    })
}

/// Opens `path` as a journal, creating and allocating it if it is new.
/// The outer error is fatal (I/O, no space); the inner one means the file
/// is not a usable spool and should be moved aside.
#[allow(clippy::type_complexity)]
fn open_file(
    path: &PathBuf,
    size: u64,
) -> Result<Result<(Journal<FileStorage>, Recovered), String>, String> {
    let shown = path.display();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("spool file {shown}: cannot open it: {e}"))?;
    let mut len = file
        .metadata()
        .map_err(|e| format!("spool file {shown}: {e}"))?
        .len();
    if len == 0 {
        sys::allocate(file.as_raw_fd(), size)
            .map_err(|e| format!("spool file {shown}: cannot allocate {size} bytes: {e}"))?;
        len = size;
    } else if len != size {
        log::warn!(
            "spool file {shown} is {len} bytes: kept at that size (--spool-size {size} applies to a new file)"
        );
    }
    Ok(match Journal::open(FileStorage::new(file, len)) {
        Ok(opened) => Ok(opened),
        Err(journal::Error::Io(e)) => return Err(format!("spool file {shown}: {e}")),
        Err(e) => Err(e.to_string()),
    })
}
