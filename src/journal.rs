//! The disk spool's file [spool-2..5] [spool-8], sans-I/O over `Storage`:
//! a file of fixed size (preallocated by the caller) holding a ring of
//! checksummed records, and two header slots written in turn
//! (checkpoints). Nothing here allocates after `open`, and memory does not
//! grow with the file: there is no per-record index.
//!
//! Layout, all integers little-endian:
//! - Header slots at 0 and `SLOT` (64 KiB each): magic `IOTCSPL1`, version,
//!   block size, file size, generation, head (offset, sequence number), tail
//!   (offset, sequence number), the length of the release bitmap, the
//!   bitmap, and a CRC-32C over all of it. Only the blocks the bitmap needs
//!   are written (usually one); the slot with the higher generation whose
//!   CRC holds is the checkpoint.
//! - Records from `DATA_START` to the end, in a ring: a 24-byte header
//!   (magic `REC1`, kind, payload length, sequence number, CRC-32C over
//!   the header's fields and the payload), the payload, zeros to a multiple
//!   of 8. A record starts only where 24 bytes are left in its 4 KiB block
//!   (`fix`), and never wraps: a pad record fills the rest of the ring.
//! - Writes go through a buffer and reach the file as whole, aligned 4 KiB
//!   blocks [spool-8]: a flush pads its last block with a pad record, so a
//!   block is written once per lap of the ring; only the header slots are
//!   rewritten in place.
//!
//! Sequence numbers grow by one per message record, for ever. The head is
//! the oldest record not released (acknowledged by the broker); records
//! released out of order are remembered in a bitmap relative to the head,
//! saved in every checkpoint, so they are not sent again after a restart.
//! Space behind the head is reused only once a checkpoint that moved the
//! head is synced (`durable_head`), so a crash never finds the checkpoint's
//! head overwritten.
//!
//! Recovery (`open`) reads the checkpoint, then scans forward from its tail
//! for the records written since: work proportional to what was written
//! since the last checkpoint, not to the file [spool-4]. A record whose
//! CRC fails is skipped and counted (`corrupt`), and the scan resumes at the
//! next intact record with a higher sequence number within reach (a torn
//! write at a power cut, a flipped bit on flash) [spool-5]. A file whose
//! header slots are both unreadable is `BadHeader`: the caller moves it
//! aside and starts a new one, never deletes it.

use std::fmt;
use std::io;

use crate::crc::{crc32c, crc32c_extend};

/// The unit of every write to the data region.
pub const BLOCK: u64 = BLOCK_U32 as u64;
const BLOCK_U32: u32 = 4096;
const BLOCK_BYTES: usize = BLOCK_U32 as usize;
/// One header slot: the fixed fields and a release bitmap.
const SLOT: u64 = 16 * BLOCK;
const SLOT_BYTES: usize = 16 * BLOCK_BYTES;
/// Where the ring of records starts: after the two header slots.
pub const DATA_START: u64 = 2 * SLOT;
/// The smallest file: the header slots and a ring of a few hundred blocks.
pub const MIN_SIZE: u64 = 1 << 20;
/// A record's header.
const REC_HEADER: u64 = 24;
const REC_HEADER_BYTES: usize = 24;
const MAGIC_HEADER: [u8; 8] = *b"IOTCSPL1";
const MAGIC_RECORD: [u8; 4] = *b"REC1";
const VERSION: u32 = 1;
const KIND_MESSAGE: u8 = 1;
const KIND_PAD: u8 = 2;
/// Where the bitmap starts in a header slot, and its largest size.
const BITMAP_AT: usize = 72;
const BITMAP_BYTES: usize = SLOT_BYTES - BITMAP_AT - 4;
/// Records after the head whose release can be remembered: the most
/// sequence numbers between the head and the tail.
pub const RELEASE_WINDOW: u64 = 8 * BITMAP_BYTES as u64;
/// The write buffer: the largest record (a 128 KiB AWS payload, its topic
/// and PUBLISH header) and a block to spare.
const WRITE_BUF: usize = 36 * BLOCK_BYTES;
/// The largest payload `append` takes.
pub const MAX_RECORD: usize = WRITE_BUF - BLOCK_BYTES - REC_HEADER_BYTES;
/// How far past a damaged record the scan looks for the next intact one:
/// one flush's worth, the most a torn write can span.
const RESYNC_REACH: u64 = WRITE_BUF as u64 + BLOCK;

/// The file underneath: positioned reads and writes of a fixed-size file.
pub trait Storage {
    /// The file's size.
    fn size(&self) -> u64;
    /// Fills `buf` from offset `off`.
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at offset `off`.
    fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// Why the journal cannot be opened or cannot take a record.
#[derive(Debug)]
pub enum Error {
    /// Neither header slot holds a checkpoint of this format and size.
    BadHeader,
    /// The file is smaller than `MIN_SIZE` or not a multiple of `BLOCK`.
    BadSize(u64),
    /// No room for the record until older ones are released.
    Full,
    /// The payload is larger than `MAX_RECORD`.
    TooLarge,
    /// The file could not be read or written.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadHeader => f.write_str("no valid header (not an iotcored spool, or damaged)"),
            Error::BadSize(n) => write!(
                f,
                "size {n} is not a multiple of {BLOCK} bytes of at least {MIN_SIZE}"
            ),
            Error::Full => f.write_str("spool file full"),
            Error::TooLarge => write!(f, "record larger than {MAX_RECORD} bytes"),
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// What `open` found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Message records written after the checkpoint and found intact.
    pub since_checkpoint: u64,
    /// Damaged records skipped by the scan.
    pub corrupt: u64,
}

/// A position in the ring for `read`: starts at the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pos: u64,
    /// The lowest sequence number the next record may have.
    seq: u64,
}

/// What `read` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// A message not released: its sequence number and length (the
    /// payload is in the caller's buffer).
    Record { seq: u64, len: usize },
    /// Nothing more before the tail.
    End,
}

/// One record's header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RecHeader {
    kind: u8,
    len: u64,
    seq: u64,
    crc: u32,
}

impl RecHeader {
    fn parse(b: &[u8; REC_HEADER_BYTES]) -> Option<RecHeader> {
        if b[..4] != MAGIC_RECORD {
            return None;
        }
        let kind = b[4];
        if kind != KIND_MESSAGE && kind != KIND_PAD {
            return None;
        }
        Some(RecHeader {
            kind,
            len: u64::from(le32(&b[8..12])),
            seq: le64(&b[12..20]),
            crc: le32(&b[20..24]),
        })
    }

    fn emit(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&MAGIC_RECORD);
        out[4] = self.kind;
        out[5..8].fill(0);
        out[8..12].copy_from_slice(&u32::try_from(self.len).unwrap_or(u32::MAX).to_le_bytes());
        out[12..20].copy_from_slice(&self.seq.to_le_bytes());
        out[20..24].copy_from_slice(&self.crc.to_le_bytes());
    }

    /// The CRC of the fields (bytes 4..20 as emitted) and `payload`.
    fn crc_of(kind: u8, len: u64, seq: u64, payload: &[u8]) -> u32 {
        crc32c_extend(RecHeader::fields_crc(kind, len, seq), payload)
    }

    /// The CRC of the fields alone, for a payload to extend it.
    fn fields_crc(kind: u8, len: u64, seq: u64) -> u32 {
        let mut f = [0u8; 16];
        f[0] = kind;
        f[4..8].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        f[8..16].copy_from_slice(&seq.to_le_bytes());
        crc32c(&f)
    }

    /// Bytes the record takes in the ring.
    fn size(&self) -> u64 {
        if self.kind == KIND_PAD {
            REC_HEADER + self.len
        } else {
            align8(REC_HEADER + self.len)
        }
    }
}

/// The checkpoint kept in a header slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Checkpoint {
    generation: u64,
    head: u64,
    head_seq: u64,
    tail: u64,
    tail_seq: u64,
}

/// The journal: the file, the checkpoint, the write buffer.
pub struct Journal<S: Storage> {
    store: S,
    size: u64,
    generation: u64,
    /// The oldest record not released, and its sequence number.
    head: u64,
    head_seq: u64,
    /// The head of the last synced checkpoint: space from here on is in use.
    durable_head: u64,
    /// Where the next record goes, and its sequence number.
    tail: u64,
    tail_seq: u64,
    /// The block the tail is in (from `buf_at`), as written so far: an
    /// append writes whole blocks. Room for the largest record.
    buf: Box<[u8]>,
    buf_at: u64,
    /// Bit `seq % RELEASE_WINDOW`: released, for seq in head_seq..tail_seq.
    released: Box<[u64]>,
    /// The highest sequence number released so far.
    max_released: u64,
    /// Records released after the head (their bits set).
    released_ahead: u64,
    /// The record `append` wrote last.
    last: Cursor,
    /// Something changed since the last checkpoint.
    dirty: bool,
    corrupt: u64,
    /// Scratch for a header slot.
    slot_buf: Box<[u8]>,
}

impl<S: Storage> fmt::Debug for Journal<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("size", &self.size)
            .field("head", &(self.head, self.head_seq))
            .field("tail", &(self.tail, self.tail_seq))
            .field("durable_head", &self.durable_head)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Journal<S> {
    /// Opens the journal in `store`: a file of zeros is formatted; a file
    /// with a checkpoint is recovered. `BadHeader` leaves the file as it
    /// is, for the caller to move aside.
    pub fn open(store: S) -> Result<(Journal<S>, Recovered), Error> {
        let size = store.size();
        if size < MIN_SIZE || size % BLOCK != 0 {
            return Err(Error::BadSize(size));
        }
        let mut j = Journal {
            store,
            size,
            generation: 0,
            head: DATA_START,
            head_seq: 1,
            durable_head: DATA_START,
            tail: DATA_START,
            tail_seq: 1,
            buf: vec![0; WRITE_BUF].into_boxed_slice(),
            buf_at: DATA_START,
            released: vec![0; BITMAP_BYTES / 8].into_boxed_slice(),
            max_released: 0,
            released_ahead: 0,
            last: Cursor {
                pos: DATA_START,
                seq: 1,
            },
            dirty: false,
            corrupt: 0,
            slot_buf: vec![0; SLOT_BYTES].into_boxed_slice(),
        };
        let Some(cp) = j.load_checkpoint()? else {
            if j.slots_blank()? {
                j.dirty = true;
                j.checkpoint()?;
                return Ok((j, Recovered::default()));
            }
            return Err(Error::BadHeader);
        };
        j.generation = cp.generation;
        j.head = cp.head;
        j.head_seq = cp.head_seq;
        j.durable_head = cp.head;
        j.tail = cp.tail;
        j.tail_seq = cp.tail_seq;
        let recovered = j.scan_since_checkpoint()?;
        Ok((j, recovered))
    }

    /// Appends a message record and writes it to the file (the kernel's
    /// page cache: the end of the process loses nothing appended); returns
    /// its sequence number. It survives a power cut after the next `sync`.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, Error> {
        if payload.len() > MAX_RECORD {
            return Err(Error::TooLarge);
        }
        let len = payload.len() as u64;
        let size = align8(REC_HEADER + len);
        if self.tail_seq - self.head_seq >= RELEASE_WINDOW {
            return Err(Error::Full);
        }
        let mut pos = self.fix(self.tail);
        // Room: what the ring's end costs if it wraps, the record, and the
        // pad of the next sync; one block always stays free, so a full
        // ring is never mistaken for an empty one.
        let skip = if pos + size > self.size {
            self.size - pos
        } else {
            0
        };
        let needed = self.ring_distance(self.durable_head, self.tail) + skip + size + 2 * BLOCK;
        if needed >= self.capacity() {
            return Err(Error::Full);
        }
        if skip > 0 {
            self.pad_to(pos, self.size)?;
            pos = DATA_START;
        }
        self.move_block_to(pos);
        let at = small(pos - self.buf_at);
        let seq = self.tail_seq;
        let h = RecHeader {
            kind: KIND_MESSAGE,
            len,
            seq,
            crc: RecHeader::crc_of(KIND_MESSAGE, len, seq, payload),
        };
        h.emit(&mut self.buf[at..at + REC_HEADER_BYTES]);
        let body = at + REC_HEADER_BYTES;
        self.buf[body..body + payload.len()].copy_from_slice(payload);
        let end = at + small(size);
        let blocks_end = end.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        self.buf[body + payload.len()..blocks_end].fill(0);
        // Whole blocks, from the one the record starts in: earlier records
        // in it are rewritten unchanged, and none of them was synced (a
        // sync ends its block with a pad).
        self.store.write_at(self.buf_at, &self.buf[..blocks_end])?;
        self.last = Cursor { pos, seq };
        self.tail = pos + size;
        self.tail_seq += 1;
        self.set_released(seq, false);
        self.dirty = true;
        // Keep only the block the tail is in.
        let last = end / BLOCK_BYTES * BLOCK_BYTES;
        if last > 0 {
            self.buf.copy_within(last..last + BLOCK_BYTES, 0);
            self.buf_at += last as u64;
        }
        if self.tail == self.size {
            self.tail = DATA_START;
            self.move_block_to(DATA_START);
        }
        Ok(seq)
    }

    /// Ends the tail's block with a pad, writes a checkpoint, and syncs the
    /// file: everything appended and released so far is durable, and no
    /// block holding a synced record is ever written again.
    pub fn sync(&mut self) -> Result<(), Error> {
        if !self.dirty {
            return Ok(());
        }
        let rest = (BLOCK - self.tail % BLOCK) % BLOCK;
        if rest > 0 {
            let end = self.tail + rest;
            // Fewer than a record header's bytes left: zeros already, and
            // `fix` skips them.
            if rest >= REC_HEADER {
                self.pad_to(self.tail, end)?;
            }
            self.tail = self.wrap(end);
            self.move_block_to(self.tail);
        }
        self.checkpoint()
    }

    /// The broker acknowledged record `seq`: its space is reused once the
    /// head passes it and a checkpoint is synced.
    pub fn release(&mut self, seq: u64) -> Result<(), Error> {
        if seq < self.head_seq || seq >= self.tail_seq {
            return Ok(());
        }
        self.set_released(seq, true);
        self.dirty = true;
        self.advance_head()
    }

    /// A cursor at the record `append` wrote last.
    pub fn last_cursor(&self) -> Cursor {
        self.last
    }

    /// A cursor at the oldest record not released.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            pos: self.head,
            seq: self.head_seq,
        }
    }

    /// The next message record at or after `cur` that is not released:
    /// its payload into `out` (at least `MAX_RECORD` bytes). Damaged
    /// records are skipped and counted.
    pub fn read(&mut self, cur: &mut Cursor, out: &mut [u8]) -> Result<Read, Error> {
        loop {
            if cur.seq >= self.tail_seq {
                return Ok(Read::End);
            }
            match self.record_at(cur.pos, cur.seq, out)? {
                Some((h, pos)) => {
                    cur.pos = self.after(pos, &h);
                    if h.kind == KIND_PAD {
                        continue;
                    }
                    cur.seq = h.seq + 1;
                    if !self.is_released(h.seq) {
                        return Ok(Read::Record {
                            seq: h.seq,
                            len: small(h.len),
                        });
                    }
                }
                None => match self.resync(cur.pos, cur.seq, self.tail)? {
                    Some(pos) => {
                        self.corrupt += 1;
                        cur.pos = pos;
                    }
                    None => return Ok(Read::End),
                },
            }
        }
    }

    /// Message records appended and not released.
    pub fn pending(&self) -> u64 {
        self.tail_seq - self.head_seq - self.released_ahead
    }

    /// The sequence number the next record gets.
    pub fn tail_seq(&self) -> u64 {
        self.tail_seq
    }

    /// Bytes of the ring in use, from the durable head to the tail.
    pub fn used(&self) -> u64 {
        self.ring_distance(self.durable_head, self.tail)
    }

    /// Bytes of the ring.
    pub fn capacity(&self) -> u64 {
        self.size - DATA_START
    }

    /// Damaged records skipped since `open` (by the scan and by `read`).
    pub fn corrupt(&self) -> u64 {
        self.corrupt
    }

    /// The storage, for tests and for closing.
    pub fn storage(&self) -> &S {
        &self.store
    }

    #[cfg(test)]
    fn storage_mut(&mut self) -> &mut S {
        &mut self.store
    }

    // ---- writing -----------------------------------------------------------

    /// Makes `buf` hold the block that `pos` is in, as the file has it
    /// up to `pos` and zeros after (nothing of this lap is there).
    fn move_block_to(&mut self, pos: u64) {
        let block = pos - pos % BLOCK;
        if block == self.buf_at {
            return;
        }
        // Only `append` and `sync` move on, always to a block they start.
        self.buf_at = block;
        self.buf.fill(0);
    }

    /// Fills `pos..end` (within the tail's block and the ring) with a pad
    /// record and writes its first block.
    fn pad_to(&mut self, pos: u64, end: u64) -> Result<(), Error> {
        self.move_block_to(pos);
        let at = small(pos - self.buf_at);
        let len = end - pos - REC_HEADER;
        let h = RecHeader {
            kind: KIND_PAD,
            len,
            seq: 0,
            crc: RecHeader::crc_of(KIND_PAD, len, 0, &[]),
        };
        h.emit(&mut self.buf[at..at + REC_HEADER_BYTES]);
        self.buf[at + REC_HEADER_BYTES..BLOCK_BYTES].fill(0);
        self.store.write_at(self.buf_at, &self.buf[..BLOCK_BYTES])?;
        Ok(())
    }

    /// Writes the checkpoint into the next slot and syncs.
    fn checkpoint(&mut self) -> Result<(), Error> {
        let cp = Checkpoint {
            generation: self.generation + 1,
            head: self.head,
            head_seq: self.head_seq,
            tail: self.tail,
            tail_seq: self.tail_seq,
        };
        // The bitmap from head_seq, as far as the last released bit.
        let span = (self.max_released + 1).saturating_sub(self.head_seq);
        let bitmap_len = small(span.div_ceil(8));
        let mut b = core::mem::take(&mut self.slot_buf);
        b.fill(0);
        b[..8].copy_from_slice(&MAGIC_HEADER);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&BLOCK_U32.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&cp.generation.to_le_bytes());
        b[32..40].copy_from_slice(&cp.head.to_le_bytes());
        b[40..48].copy_from_slice(&cp.head_seq.to_le_bytes());
        b[48..56].copy_from_slice(&cp.tail.to_le_bytes());
        b[56..64].copy_from_slice(&cp.tail_seq.to_le_bytes());
        b[64..72].copy_from_slice(&(bitmap_len as u64).to_le_bytes());
        for k in 0..span {
            if self.released_bit(self.head_seq + k) {
                b[BITMAP_AT + small(k / 8)] |= 1 << (k % 8);
            }
        }
        let crc_at = BITMAP_AT + bitmap_len;
        let crc = crc32c(&b[..crc_at]);
        b[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        let written = (crc_at + 4).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let slot = cp.generation % 2;
        let result = self.store.write_at(slot * SLOT, &b[..written]);
        self.slot_buf = b;
        result?;
        self.store.sync()?;
        self.generation = cp.generation;
        self.durable_head = cp.head;
        self.dirty = false;
        Ok(())
    }

    // ---- reading -------------------------------------------------------------

    /// The header slot with the newest valid checkpoint, with its bitmap
    /// loaded (each slot is read once).
    fn load_checkpoint(&mut self) -> Result<Option<Checkpoint>, Error> {
        let mut best: Option<Checkpoint> = None;
        for slot in 0..2 {
            self.store.read_at(slot * SLOT, &mut self.slot_buf)?;
            let Some(cp) = self.parse_slot() else {
                continue;
            };
            if best.is_some_and(|b| b.generation >= cp.generation) {
                continue;
            }
            best = Some(cp);
            self.released.fill(0);
            self.max_released = 0;
            self.released_ahead = 0;
            let bitmap_len = small(le64(&self.slot_buf[64..72]));
            for k in 0..(bitmap_len as u64 * 8).min(cp.tail_seq - cp.head_seq) {
                let byte = self.slot_buf[BITMAP_AT + small(k / 8)];
                if byte >> (k % 8) & 1 != 0 {
                    self.set_released(cp.head_seq + k, true);
                }
            }
        }
        Ok(best)
    }

    /// The checkpoint in `slot_buf`, if it is one of ours and intact.
    fn parse_slot(&self) -> Option<Checkpoint> {
        let b = &self.slot_buf;
        if b[..8] != MAGIC_HEADER
            || le32(&b[8..12]) != VERSION
            || u64::from(le32(&b[12..16])) != BLOCK
            || le64(&b[16..24]) != self.size
        {
            return None;
        }
        let bitmap_len = usize::try_from(le64(&b[64..72])).ok()?;
        if bitmap_len > BITMAP_BYTES {
            return None;
        }
        let crc_at = BITMAP_AT + bitmap_len;
        if crc32c(&b[..crc_at]) != le32(&b[crc_at..crc_at + 4]) {
            return None;
        }
        let cp = Checkpoint {
            generation: le64(&b[24..32]),
            head: le64(&b[32..40]),
            head_seq: le64(&b[40..48]),
            tail: le64(&b[48..56]),
            tail_seq: le64(&b[56..64]),
        };
        let in_ring = |p: u64| (DATA_START..self.size).contains(&p);
        let sane = in_ring(cp.head)
            && in_ring(cp.tail)
            && cp.head_seq >= 1
            && cp.head_seq <= cp.tail_seq
            && cp.tail_seq - cp.head_seq <= RELEASE_WINDOW;
        sane.then_some(cp)
    }

    /// Whether both header slots are all zeros: a new file.
    fn slots_blank(&mut self) -> Result<bool, Error> {
        for slot in 0..2 {
            self.store.read_at(slot * SLOT, &mut self.slot_buf)?;
            if self.slot_buf.iter().any(|&b| b != 0) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Finds the records written after the checkpoint: from its tail, every
    /// intact record in sequence, skipping damaged stretches.
    fn scan_since_checkpoint(&mut self) -> Result<Recovered, Error> {
        let mut r = Recovered::default();
        let start = self.tail;
        let mut pos = self.tail;
        let mut seq = self.tail_seq;
        // Scratch for payloads: the write buffer is empty now.
        let mut scratch = core::mem::take(&mut self.buf);
        let limit = self.durable_head;
        loop {
            if self.ring_distance(start, pos) + REC_HEADER > self.ring_distance(start, limit)
                && self.ring_distance(start, limit) != 0
            {
                break; // the ring is full up to the head
            }
            match self.record_at(pos, seq, &mut scratch)? {
                Some((h, at)) => {
                    pos = self.after(at, &h);
                    if h.kind == KIND_MESSAGE {
                        seq = h.seq + 1;
                        r.since_checkpoint += 1;
                    }
                }
                None => match self.resync(pos, seq, limit)? {
                    Some(next) => {
                        r.corrupt += 1;
                        pos = next;
                    }
                    None => break,
                },
            }
        }
        self.buf = scratch;
        self.tail = self.fix(pos);
        self.tail_seq = seq;
        self.corrupt += r.corrupt;
        // The tail's block as found, then (below) sealed with a pad: what
        // was there before the restart is never written again.
        self.buf_at = self.tail - self.tail % BLOCK;
        let keep = small(self.tail - self.buf_at);
        let block_at = self.buf_at;
        let mut block = core::mem::take(&mut self.buf);
        let read = self.read_bytes(block_at, &mut block[..BLOCK_BYTES]);
        block[keep..].fill(0);
        self.buf = block;
        read?;
        if r.since_checkpoint > 0 || r.corrupt > 0 || keep > 0 {
            self.dirty = true;
            self.sync()?;
        }
        Ok(r)
    }

    /// The intact record at `pos` (after `fix`) with a sequence number of
    /// at least `seq` (any, for a pad), its payload in `out`; `None` if
    /// there is none there.
    fn record_at(
        &mut self,
        pos: u64,
        seq: u64,
        out: &mut [u8],
    ) -> Result<Option<(RecHeader, u64)>, Error> {
        let pos = self.fix(pos);
        let mut hb = [0u8; REC_HEADER_BYTES];
        self.read_bytes(pos, &mut hb)?;
        let Some(h) = RecHeader::parse(&hb) else {
            return Ok(None);
        };
        if pos + h.size() > self.size {
            return Ok(None);
        }
        if h.kind == KIND_PAD {
            let ok = h.crc == RecHeader::crc_of(KIND_PAD, h.len, h.seq, &[]);
            return Ok(ok.then_some((h, pos)));
        }
        if h.seq < seq || small(h.len) > MAX_RECORD || small(h.len) > out.len() {
            return Ok(None);
        }
        let payload = &mut out[..small(h.len)];
        self.read_bytes(pos + REC_HEADER, payload)?;
        if RecHeader::crc_of(KIND_MESSAGE, h.len, h.seq, payload) != h.crc {
            return Ok(None);
        }
        Ok(Some((h, pos)))
    }

    /// After a damaged record at `pos`: the next intact message record with
    /// a sequence number of at least `seq`, within `RESYNC_REACH` and
    /// before `limit`. The ring is read a block at a time.
    fn resync(&mut self, pos: u64, seq: u64, limit: u64) -> Result<Option<u64>, Error> {
        let reach = RESYNC_REACH.min(self.ring_distance(pos, limit));
        let mut block = [0u8; BLOCK_BYTES];
        let mut travelled = 0;
        let mut at = self.wrap(pos);
        let mut first = true;
        while travelled < reach {
            let start = at - at % BLOCK;
            self.read_bytes(start, &mut block)?;
            // Record starts are 8-aligned, with a header's room in the block.
            let mut off = small(at - start);
            if first {
                off += 8; // not the damaged record itself
                first = false;
            }
            while off + REC_HEADER_BYTES <= BLOCK_BYTES {
                let mut hb = [0u8; REC_HEADER_BYTES];
                hb.copy_from_slice(&block[off..off + REC_HEADER_BYTES]);
                if let Some(h) = RecHeader::parse(&hb) {
                    let p = start + off as u64;
                    // Checked whole: a magic number alone can be stale.
                    if h.kind == KIND_MESSAGE
                        && h.seq >= seq
                        && p + h.size() <= self.size
                        && self.intact(p, &h)?
                    {
                        return Ok(Some(p));
                    }
                }
                off += 8;
            }
            travelled += start + BLOCK - at;
            at = self.wrap(start + BLOCK);
        }
        Ok(None)
    }

    /// Whether the message record with header `h` at `pos` checks out,
    /// reading its payload in pieces.
    fn intact(&mut self, pos: u64, h: &RecHeader) -> Result<bool, Error> {
        let mut crc = RecHeader::fields_crc(h.kind, h.len, h.seq);
        let mut piece = [0u8; 512];
        let mut done = 0u64;
        while done < h.len {
            let n = small((h.len - done).min(piece.len() as u64));
            self.read_bytes(pos + REC_HEADER + done, &mut piece[..n])?;
            crc = crc32c_extend(crc, &piece[..n]);
            done += n as u64;
        }
        Ok(crc == h.crc)
    }

    /// Reads file bytes (all of them were written: `append` writes
    /// through).
    fn read_bytes(&mut self, pos: u64, out: &mut [u8]) -> Result<(), Error> {
        if pos + out.len() as u64 > self.size {
            out.fill(0);
            return Ok(());
        }
        self.store.read_at(pos, out)?;
        Ok(())
    }

    // ---- the head ------------------------------------------------------------

    /// Moves the head past released records (and pads).
    fn advance_head(&mut self) -> Result<(), Error> {
        let mut hb = [0u8; REC_HEADER_BYTES];
        while self.head_seq < self.tail_seq {
            let pos = self.fix(self.head);
            self.read_bytes(pos, &mut hb)?;
            let Some(h) = RecHeader::parse(&hb) else {
                return self.skip_damaged_head(pos);
            };
            if h.kind == KIND_PAD {
                self.head = self.after(pos, &h);
                continue;
            }
            if h.seq != self.head_seq {
                // A damaged record was skipped before this one.
                if h.seq > self.head_seq && h.seq < self.tail_seq {
                    for s in self.head_seq..h.seq {
                        self.set_released(s, false);
                    }
                    self.head_seq = h.seq;
                    continue;
                }
                return self.skip_damaged_head(pos);
            }
            if !self.is_released(h.seq) {
                return Ok(());
            }
            self.set_released(h.seq, false);
            self.head = self.after(pos, &h);
            self.head_seq += 1;
        }
        Ok(())
    }

    /// The record at the head cannot be read: move the head to the next
    /// intact one (or the tail).
    fn skip_damaged_head(&mut self, pos: u64) -> Result<(), Error> {
        let next = self.resync(pos, self.head_seq, self.tail)?;
        let mut hb = [0u8; REC_HEADER_BYTES];
        match next {
            Some(p) => {
                self.read_bytes(p, &mut hb)?;
                let seq = RecHeader::parse(&hb).map_or(self.tail_seq, |h| h.seq);
                for s in self.head_seq..seq {
                    self.set_released(s, false);
                }
                self.head = p;
                self.head_seq = seq;
                self.corrupt += 1;
                self.advance_head()
            }
            None => {
                self.head = self.tail;
                self.head_seq = self.tail_seq;
                self.corrupt += 1;
                Ok(())
            }
        }
    }

    // ---- positions and bits ----------------------------------------------------

    /// Where a record at or after `pos` may start: 24 bytes must be left in
    /// its block, and the ring wraps at its end.
    fn fix(&self, pos: u64) -> u64 {
        let pos = self.wrap(pos);
        if BLOCK - pos % BLOCK < REC_HEADER {
            self.wrap(pos + (BLOCK - pos % BLOCK))
        } else {
            pos
        }
    }

    fn wrap(&self, pos: u64) -> u64 {
        if pos >= self.size {
            DATA_START + (pos - self.size)
        } else {
            pos
        }
    }

    /// The position after record `h` at `pos`.
    fn after(&self, pos: u64, h: &RecHeader) -> u64 {
        self.wrap(pos + h.size())
    }

    /// Bytes from `from` forward to `to` around the ring.
    fn ring_distance(&self, from: u64, to: u64) -> u64 {
        if to >= from {
            to - from
        } else {
            self.capacity() - (from - to)
        }
    }

    fn released_bit(&self, seq: u64) -> bool {
        let i = small(seq % RELEASE_WINDOW);
        self.released[i / 64] >> (i % 64) & 1 != 0
    }

    fn is_released(&self, seq: u64) -> bool {
        seq < self.head_seq || (seq < self.tail_seq && self.released_bit(seq))
    }

    fn set_released(&mut self, seq: u64, on: bool) {
        let i = small(seq % RELEASE_WINDOW);
        let was = self.released[i / 64] >> (i % 64) & 1 != 0;
        if on {
            self.max_released = self.max_released.max(seq);
            self.released[i / 64] |= 1 << (i % 64);
        } else {
            self.released[i / 64] &= !(1 << (i % 64));
        }
        match (was, on) {
            (false, true) => self.released_ahead += 1,
            (true, false) => self.released_ahead -= 1,
            _ => {}
        }
    }
}

/// A length or index bounded by the write buffer or a header slot, as a
/// buffer index.
fn small(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn align8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The journal's file on disk: positioned reads and writes, `fdatasync`.
pub struct FileStorage {
    file: std::fs::File,
    size: u64,
}

impl FileStorage {
    /// Wraps an open file of `size` bytes (allocated by the caller).
    pub fn new(file: std::fs::File, size: u64) -> FileStorage {
        FileStorage { file, size }
    }
}

impl Storage for FileStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, off)
    }

    fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, off)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;
    use std::collections::BTreeMap;

    /// A file in memory that keeps what was written since the last sync
    /// apart, so a test can crash it at any write boundary.
    #[derive(Clone)]
    struct CrashStore {
        durable: Vec<u8>,
        pending: Vec<(u64, Vec<u8>)>,
        /// Bytes read since created (recovery's work).
        read: u64,
        /// Every write: (offset, length).
        log: Vec<(u64, usize)>,
        /// A sync returns without making anything durable (the power goes
        /// before the disk is done).
        hold: bool,
    }

    impl CrashStore {
        fn new(size: u64) -> CrashStore {
            CrashStore {
                durable: vec![0; small(size)],
                pending: Vec::new(),
                read: 0,
                log: Vec::new(),
                hold: false,
            }
        }

        /// What a power cut leaves: the first `keep` pending writes, then
        /// the next one as `last` makes it (dropped, torn, garbled).
        fn crash(&self, keep: usize, last: Last) -> CrashStore {
            let mut c = CrashStore {
                durable: self.durable.clone(),
                pending: Vec::new(),
                read: 0,
                log: Vec::new(),
                hold: false,
            };
            for (off, data) in self.pending.iter().take(keep) {
                c.durable[small(*off)..small(*off) + data.len()].copy_from_slice(data);
            }
            if let Some((off, data)) = self.pending.get(keep) {
                let at = small(*off);
                match last {
                    Last::Dropped => {}
                    Last::Torn => {
                        // The first half of its blocks reached the disk.
                        let half = data.len() / BLOCK_BYTES / 2 * BLOCK_BYTES;
                        c.durable[at..at + half].copy_from_slice(&data[..half]);
                    }
                    Last::Garbled => {
                        for (k, b) in data.iter().enumerate() {
                            c.durable[at + k] = b ^ 0x5A;
                        }
                    }
                }
            }
            c
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Last {
        Dropped,
        Torn,
        Garbled,
    }

    impl Storage for CrashStore {
        fn size(&self) -> u64 {
            self.durable.len() as u64
        }

        fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
            let at = small(off);
            buf.copy_from_slice(&self.durable[at..at + buf.len()]);
            // The page cache: unsynced writes are read back.
            for (woff, data) in &self.pending {
                let (w0, w1) = (*woff, *woff + data.len() as u64);
                let (r0, r1) = (off, off + buf.len() as u64);
                let (lo, hi) = (w0.max(r0), w1.min(r1));
                if lo < hi {
                    buf[small(lo - r0)..small(hi - r0)]
                        .copy_from_slice(&data[small(lo - w0)..small(hi - w0)]);
                }
            }
            self.read += buf.len() as u64;
            Ok(())
        }

        fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
            assert!(off + data.len() as u64 <= self.size(), "write past the end");
            self.pending.push((off, data.to_vec()));
            self.log.push((off, data.len()));
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            if self.hold {
                return Ok(());
            }
            for (off, data) in self.pending.drain(..) {
                self.durable[small(off)..small(off) + data.len()].copy_from_slice(&data);
            }
            Ok(())
        }
    }

    fn open(store: CrashStore) -> (Journal<CrashStore>, Recovered) {
        Journal::open(store).expect("open")
    }

    /// Every record `read` gives from the head: (seq, payload).
    fn all(j: &mut Journal<CrashStore>) -> Vec<(u64, Vec<u8>)> {
        let mut out = vec![0u8; MAX_RECORD];
        let mut cur = j.cursor();
        let mut v = Vec::new();
        while let Read::Record { seq, len } = j.read(&mut cur, &mut out).unwrap() {
            v.push((seq, out[..len].to_vec()));
            assert!(v.len() < 10_000_000);
        }
        v
    }

    fn payload(seq: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                small(seq)
                    .wrapping_mul(31)
                    .wrapping_add(i * 7)
                    .to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn records_come_back_in_order_after_a_restart() {
        let (mut j, r) = open(CrashStore::new(MIN_SIZE));
        assert_eq!(r, Recovered::default());
        let mut want = Vec::new();
        for n in 0..50 {
            let p = payload(n, (n * 37 % 500) as usize);
            let seq = j.append(&p).unwrap();
            want.push((seq, p));
        }
        assert_eq!(all(&mut j), want, "readable before the sync too");
        j.sync().unwrap();
        let store = j.storage().clone();
        let (mut j, r) = open(store);
        assert_eq!(r.corrupt, 0);
        assert_eq!(all(&mut j), want);
        assert_eq!(j.pending(), 50);
    }

    #[test]
    fn start_up_reads_what_was_written_since_the_checkpoint_not_the_file() {
        // [spool-4]
        let size = 64 * MIN_SIZE;
        let (mut j, _) = open(CrashStore::new(size));
        let big = vec![7u8; 2000];
        let mut n = 0;
        while j.used() < size / 2 {
            j.append(&big).unwrap();
            n += 1;
        }
        j.sync().unwrap(); // the checkpoint
        for _ in 0..10 {
            j.append(&big).unwrap();
        }
        let mut store = j.storage().clone();
        store.sync().unwrap(); // written, not checkpointed
        store.read = 0;
        let (mut j, r) = open(store);
        assert_eq!(r.since_checkpoint, 10);
        let read = j.storage().read;
        // The two header slots, and a few blocks past the records found.
        assert!(
            read < 2 * SLOT + 16 * BLOCK + 10 * 2048 + RESYNC_REACH,
            "{read} bytes read"
        );
        assert_eq!(all(&mut j).len(), n + 10);
    }

    #[test]
    fn released_records_free_their_space_in_order_and_out_of_order() {
        let (mut j, _) = open(CrashStore::new(MIN_SIZE));
        let seqs: Vec<u64> = (0..10)
            .map(|n| j.append(&payload(n, 100)).unwrap())
            .collect();
        // Out of order: 3 and 5 go, the head stays at 1.
        j.release(seqs[2]).unwrap();
        j.release(seqs[4]).unwrap();
        assert_eq!(j.pending(), 8, "released out of order: no longer pending");
        let left: Vec<u64> = all(&mut j).iter().map(|r| r.0).collect();
        assert_eq!(left, [1, 2, 4, 6, 7, 8, 9, 10]);
        j.sync().unwrap();
        // Remembered through a restart: they are not sent again.
        let (mut j, _) = open(j.storage().clone());
        let left: Vec<u64> = all(&mut j).iter().map(|r| r.0).collect();
        assert_eq!(left, [1, 2, 4, 6, 7, 8, 9, 10]);
        for s in [1, 2, 4] {
            j.release(s).unwrap();
        }
        assert_eq!(j.pending(), 5, "the head moved past 1..=5");
        assert_eq!(
            all(&mut j).iter().map(|r| r.0).collect::<Vec<_>>(),
            [6, 7, 8, 9, 10]
        );
    }

    #[test]
    fn the_ring_fills_is_full_and_takes_more_once_records_are_released() {
        let (mut j, _) = open(CrashStore::new(MIN_SIZE));
        let p = vec![1u8; 1000];
        let mut seqs = Vec::new();
        loop {
            match j.append(&p) {
                Ok(s) => seqs.push(s),
                Err(Error::Full) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(seqs.len() > 800, "{} records in 1 MiB", seqs.len());
        assert!(matches!(j.append(&p), Err(Error::Full)));
        // Released but not checkpointed: the space is not reused yet.
        for &s in &seqs[..100] {
            j.release(s).unwrap();
        }
        assert!(matches!(j.append(&p), Err(Error::Full)));
        j.sync().unwrap();
        // Many laps of the ring.
        let mut live: std::collections::VecDeque<u64> = seqs[100..].iter().copied().collect();
        for lap in 0..5_000u64 {
            let s = j.append(&payload(lap, 1000)).unwrap();
            live.push_back(s);
            let old = live.pop_front().unwrap();
            j.release(old).unwrap();
            if lap % 50 == 0 {
                j.sync().unwrap();
            }
        }
        j.sync().unwrap();
        let (mut j, r) = open(j.storage().clone());
        assert_eq!(r.corrupt, 0);
        assert_eq!(
            all(&mut j).iter().map(|r| r.0).collect::<Vec<_>>(),
            Vec::from(live)
        );
        assert!(matches!(
            j.append(&vec![0; MAX_RECORD + 1]),
            Err(Error::TooLarge)
        ));
    }

    #[test]
    fn every_write_is_whole_aligned_blocks_except_the_header_slots() {
        // [spool-8]
        let (mut j, _) = open(CrashStore::new(MIN_SIZE));
        for n in 0..3000u64 {
            j.append(&payload(n, (n % 300) as usize)).unwrap();
            if n % 7 == 0 {
                j.sync().unwrap();
            }
            if n > 500 {
                j.release(n - 500).unwrap();
            }
        }
        let log = &j.storage().log;
        assert!(log.len() > 3000);
        for &(off, len) in log {
            assert_eq!(off % BLOCK, 0, "write at {off}");
            assert_eq!(len % BLOCK_BYTES, 0, "write of {len} bytes");
            if off < DATA_START {
                assert!(off == 0 || off == SLOT);
            }
        }
    }

    #[test]
    fn flipped_bits_skip_one_record_and_keep_the_others() {
        // [spool-5] Damage in checkpointed records (flash), found when read.
        let (mut j, _) = open(CrashStore::new(MIN_SIZE));
        let want: Vec<(u64, Vec<u8>)> = (0..40)
            .map(|n| {
                let p = payload(n, 300);
                (j.append(&p).unwrap(), p)
            })
            .collect();
        j.sync().unwrap();
        let mut store = j.storage().clone();
        // A bit in the payload of the 11th record, and the magic of the 31st.
        let rec = align8(REC_HEADER + 300);
        let fix = |p: u64| {
            if BLOCK - p % BLOCK < REC_HEADER {
                p + BLOCK - p % BLOCK
            } else {
                p
            }
        };
        let mut pos = DATA_START;
        let mut at = Vec::new();
        for _ in 0..40 {
            pos = fix(pos);
            at.push(pos);
            pos += rec;
        }
        store.durable[small(at[10] + REC_HEADER + 5)] ^= 0x10;
        store.durable[small(at[30])] ^= 0xFF;
        let (mut j, r) = open(store);
        assert_eq!(r.corrupt, 0, "nothing damaged after the checkpoint");
        let got = all(&mut j);
        let expect: Vec<_> = want
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != 10 && *k != 30)
            .map(|(_, r)| r.clone())
            .collect();
        assert_eq!(got, expect);
        assert_eq!(j.corrupt(), 2);
    }

    #[test]
    fn a_damaged_header_slot_falls_back_to_the_other_and_two_are_bad_header() {
        let (mut j, _) = open(CrashStore::new(MIN_SIZE));
        j.append(b"one").unwrap();
        j.sync().unwrap();
        j.append(b"two").unwrap();
        j.sync().unwrap();
        let mut store = j.storage().clone();
        let newest = j.generation % 2;
        store.durable[small(newest * SLOT + 30)] ^= 1;
        let (mut j2, r) = open(store.clone());
        // The older checkpoint, then the scan finds "two" after it.
        assert_eq!(r.since_checkpoint, 1);
        assert_eq!(all(&mut j2).len(), 2);
        let other = 1 - newest;
        store.durable[small(other * SLOT + 3)] ^= 1;
        assert!(matches!(Journal::open(store), Err(Error::BadHeader)));
        assert!(matches!(
            Journal::open(CrashStore::new(MIN_SIZE - BLOCK)),
            Err(Error::BadSize(_))
        ));
    }

    #[test]
    fn a_real_file_with_a_flipped_byte_and_one_cut_short() {
        use std::fs::OpenOptions;
        let dir = std::env::temp_dir().join(format!("iotcored-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spool");
        let file = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let f = file();
        f.set_len(MIN_SIZE).unwrap();
        let (mut j, _) = Journal::open(FileStorage::new(f, MIN_SIZE)).unwrap();
        let want: Vec<(u64, Vec<u8>)> = (0..20)
            .map(|n| {
                let p = payload(n, 200);
                (j.append(&p).unwrap(), p)
            })
            .collect();
        j.sync().unwrap();
        drop(j);
        // A flipped byte in the 5th record's payload (records of 232 bytes
        // from the start of the ring, none crossing a block here).
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[small(DATA_START + 4 * 232 + REC_HEADER + 10)] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let (mut j, _) = Journal::open(FileStorage::new(file(), MIN_SIZE)).unwrap();
        let mut out = vec![0u8; MAX_RECORD];
        let mut cur = j.cursor();
        let mut got = Vec::new();
        while let Read::Record { seq, len } = j.read(&mut cur, &mut out).unwrap() {
            got.push((seq, out[..len].to_vec()));
        }
        let mut expect = want.clone();
        expect.remove(4);
        assert_eq!(got, expect);
        assert_eq!(j.corrupt(), 1);
        drop(j);
        // Cut short: refused, and the file is left as it is.
        let f = file();
        f.set_len(MIN_SIZE - 1000).unwrap();
        assert!(matches!(
            Journal::open(FileStorage::new(f, MIN_SIZE - 1000)),
            Err(Error::BadSize(_))
        ));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), MIN_SIZE - 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What the workload of the crash test did, for the checks.
    #[derive(Default)]
    struct Model {
        /// Appended and not released: seq -> payload.
        live: BTreeMap<u64, Vec<u8>>,
        /// `live` at the last sync.
        synced_live: BTreeMap<u64, Vec<u8>>,
        /// Released before the last sync.
        synced_released: Vec<u64>,
        /// Every record appended.
        appended: BTreeMap<u64, Vec<u8>>,
    }

    impl Model {
        fn synced(&mut self) {
            self.synced_live = self.live.clone();
            self.synced_released = self
                .appended
                .keys()
                .filter(|s| !self.live.contains_key(s))
                .copied()
                .collect();
        }
    }

    /// A random workload, crashed at every write boundary of every sync
    /// (the power going before the disk finished it) and now and then
    /// between syncs: recovery keeps every record synced and not released
    /// since, brings back no record released before the last sync, and
    /// anything else it brings back is exactly what was written [spool-3]
    /// [spool-5].
    #[test]
    fn recovery_keeps_every_synced_record_at_every_crash_point() {
        let (mut crashes, mut wraps) = (0, 0);
        for seed in 1..=4u64 {
            let mut rng = XorShift::new(seed * 0x9E37_79B9);
            let (mut j, _) = open(CrashStore::new(MIN_SIZE));
            let mut m = Model::default();
            for step in 0..700 {
                let at = format!("seed {seed} step {step}");
                let tail_before = j.tail;
                match rng.below(10) {
                    0..=4 => {
                        let len = if rng.below(4) == 0 {
                            rng.below(30_000)
                        } else {
                            rng.below(400)
                        };
                        let p = payload(rng.below(1 << 20) as u64, len);
                        match j.append(&p) {
                            Ok(s) => {
                                m.live.insert(s, p.clone());
                                m.appended.insert(s, p);
                            }
                            Err(Error::Full) => {}
                            Err(e) => panic!("{at}: {e}"),
                        }
                    }
                    5..=8 if !m.live.is_empty() => {
                        // Mostly the oldest, sometimes any.
                        let keys: Vec<u64> = m.live.keys().copied().collect();
                        let k = if rng.below(3) == 0 {
                            keys[rng.below(keys.len())]
                        } else {
                            keys[0]
                        };
                        m.live.remove(&k);
                        j.release(k).unwrap();
                    }
                    _ => {
                        // The power goes during this sync: crash at every
                        // write boundary of it, then let it finish.
                        j.storage_mut().hold = true;
                        j.sync().unwrap();
                        crashes += check_crashes(&j, &at, &m);
                        j.storage_mut().hold = false;
                        j.storage_mut().sync().unwrap();
                        m.synced();
                    }
                }
                if j.tail < tail_before {
                    wraps += 1;
                }
                // Between syncs, a crash now and then (every write is
                // crashed at the next sync's points anyway).
                if step % 25 == 0 {
                    crashes += check_crashes(&j, &at, &m);
                }
            }
        }
        assert!(crashes > 2_000, "{crashes} crash points");
        assert!(wraps >= 4, "the ring wrapped {wraps} times");
    }

    /// Crashes a copy of `j`'s file at every boundary of its unsynced
    /// writes, checks what recovery finds, and says how many crashes.
    fn check_crashes(j: &Journal<CrashStore>, at: &str, m: &Model) -> usize {
        let store = j.storage();
        let n = store.pending.len();
        let mut crashes = 0;
        for keep in 0..=n {
            for last in [Last::Dropped, Last::Torn, Last::Garbled] {
                if keep == n && !matches!(last, Last::Dropped) {
                    continue;
                }
                crashes += 1;
                let at = format!("{at} keep {keep}/{n} {last:?}");
                let (mut r, _) =
                    Journal::open(store.crash(keep, last)).unwrap_or_else(|e| panic!("{at}: {e}"));
                let got: BTreeMap<u64, Vec<u8>> = all(&mut r).into_iter().collect();
                // Synced, and not released since (a release may be durable
                // with the checkpoint being written).
                for (s, p) in m.synced_live.iter().filter(|(s, _)| m.live.contains_key(s)) {
                    assert_eq!(got.get(s), Some(p), "{at}: synced record {s} lost");
                }
                for s in &m.synced_released {
                    assert!(!got.contains_key(s), "{at}: released {s} came back");
                }
                for (s, p) in &got {
                    assert_eq!(
                        m.appended.get(s),
                        Some(p),
                        "{at}: record {s} is not what was written"
                    );
                }
            }
        }
        crashes
    }
}
