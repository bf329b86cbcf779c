//! Core bus objects: the tagged, little-endian encoding of
//! `spec/core-bus.md` section 4 ([bus-obj-1], [bus-obj-2], [bus-req-2]).
//!
//! [`Object::parse`] and [`parse_params`] validate a whole tree once — tags,
//! lengths, counts against the bytes left, nesting depth — and yield a view
//! that borrows from the buffer. A [`List`] or [`Map`] can only come from
//! that validation, so iterating one afterwards cannot fail. A count is
//! only ever compared with the bytes left, never used to reserve anything.
//! [`Encoder`] writes objects into a caller's slice; the `*_LEN` constants,
//! [`buf_len`], [`key_len`] and [`Object::encoded_len`] size them beforehand.
//! Nothing here allocates; validation recurses at most [`MAX_DEPTH`] deep.

use core::fmt;

use super::frame::ErrorCode;

/// Tag of a null: no body.
pub const TAG_NULL: u8 = 0x00;
/// Tag of a bool: 1 byte, non-zero is true.
pub const TAG_BOOL: u8 = 0x01;
/// Tag of an i64: 8 bytes.
pub const TAG_I64: u8 = 0x02;
/// Tag of an f64: 8 bytes.
pub const TAG_F64: u8 = 0x03;
/// Tag of a buffer: `len: u32`, then bytes.
pub const TAG_BUF: u8 = 0x04;
/// Tag of a list: `count: u32`, then `count` tagged objects.
pub const TAG_LIST: u8 = 0x05;
/// Tag of a map: `count: u32`, then `count` × (`key_len: u32`, key, tagged value).
pub const TAG_MAP: u8 = 0x06;

/// Most nested non-empty containers, the top-level one included [bus-obj-1].
pub const MAX_DEPTH: usize = 14;

/// Encoded length of a null.
pub const NULL_LEN: usize = 1;
/// Encoded length of a bool.
pub const BOOL_LEN: usize = 2;
/// Encoded length of an i64.
pub const I64_LEN: usize = 9;
/// Encoded length of an f64.
pub const F64_LEN: usize = 9;
/// Encoded length of a list's tag and count (its items follow).
pub const LIST_HEADER_LEN: usize = 5;
/// Encoded length of a map's tag and count (its entries follow).
pub const MAP_HEADER_LEN: usize = 5;

/// Encoded length of a buffer of `len` bytes.
pub const fn buf_len(len: usize) -> usize {
    len.saturating_add(5)
}

/// Encoded length of a map key of `len` bytes (the value follows).
pub const fn key_len(len: usize) -> usize {
    len.saturating_add(4)
}

/// What can go wrong reading or writing an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Ran out of bytes inside an object.
    Truncated,
    /// A list or map count larger than the bytes left.
    CountTooLarge,
    /// Bytes after the top-level object.
    TrailingBytes,
    /// A tag other than 0 to 6.
    UnknownTag(u8),
    /// More than `MAX_DEPTH` nested non-empty containers.
    TooDeep,
    /// The request payload's top level is not a map.
    NotAMap,
    /// The output buffer is too short.
    BufferTooSmall,
    /// A length or count over u32::MAX.
    TooLong,
}

impl Error {
    /// The code a server answers this error with (sections 3 and 4).
    pub fn code(self) -> ErrorCode {
        match self {
            Error::Truncated | Error::CountTooLarge | Error::TrailingBytes => ErrorCode::Parse,
            Error::UnknownTag(_) | Error::NotAMap => ErrorCode::Invalid,
            Error::TooDeep | Error::TooLong => ErrorCode::Range,
            Error::BufferTooSmall => ErrorCode::NoMem,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("object truncated"),
            Error::CountTooLarge => f.write_str("list or map count exceeds the bytes left"),
            Error::TrailingBytes => f.write_str("bytes after the object"),
            Error::UnknownTag(t) => write!(f, "unknown object tag {t}"),
            Error::TooDeep => write!(f, "objects nested more than {MAX_DEPTH} deep"),
            Error::NotAMap => f.write_str("parameters are not a map"),
            Error::BufferTooSmall => f.write_str("output buffer too small"),
            Error::TooLong => f.write_str("length too large to encode"),
        }
    }
}

impl std::error::Error for Error {}

/// A validated object borrowing from the buffer it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Object<'a> {
    Null,
    Bool(bool),
    I64(i64),
    F64(f64),
    Buf(&'a [u8]),
    List(List<'a>),
    Map(Map<'a>),
}

/// A validated list: its count and the encoded items. Two lists are equal
/// when their encodings are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct List<'a> {
    count: u32,
    body: &'a [u8],
}

/// A validated map: its count and the encoded entries, in wire order. Two
/// maps are equal when their encodings are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Map<'a> {
    count: u32,
    body: &'a [u8],
}

fn to_usize(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Validating reader over the bytes left.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.rest.len() {
            return Err(Error::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        self.take(N)?.try_into().map_err(|_| Error::Truncated)
    }

    fn u32(&mut self) -> Result<u32, Error> {
        self.array().map(u32::from_le_bytes)
    }

    /// A container's count: checked against the bytes left before anything
    /// else, then against the depth if the container is not empty.
    fn count(&mut self, depth: usize) -> Result<u32, Error> {
        let count = self.u32()?;
        if to_usize(count) > self.rest.len() {
            return Err(Error::CountTooLarge);
        }
        if count > 0 && depth >= MAX_DEPTH {
            return Err(Error::TooDeep);
        }
        Ok(count)
    }

    /// Reads one object; `depth` counts the non-empty containers around it.
    fn object(&mut self, depth: usize) -> Result<Object<'a>, Error> {
        let [tag] = self.array()?;
        Ok(match tag {
            TAG_NULL => Object::Null,
            TAG_BOOL => Object::Bool(self.array::<1>()? != [0]),
            TAG_I64 => Object::I64(i64::from_le_bytes(self.array()?)),
            TAG_F64 => Object::F64(f64::from_le_bytes(self.array()?)),
            TAG_BUF => {
                let len = self.u32()?;
                Object::Buf(self.take(to_usize(len))?)
            }
            TAG_LIST => {
                let count = self.count(depth)?;
                let start = self.rest;
                for _ in 0..count {
                    self.object(depth + 1)?;
                }
                Object::List(List {
                    count,
                    body: self.consumed_since(start),
                })
            }
            TAG_MAP => {
                let count = self.count(depth)?;
                let start = self.rest;
                for _ in 0..count {
                    let len = self.u32()?;
                    self.take(to_usize(len))?;
                    self.object(depth + 1)?;
                }
                Object::Map(Map {
                    count,
                    body: self.consumed_since(start),
                })
            }
            other => return Err(Error::UnknownTag(other)),
        })
    }

    fn map_entry(&mut self) -> Result<(&'a [u8], Object<'a>), Error> {
        let len = self.u32()?;
        let key = self.take(to_usize(len))?;
        Ok((key, self.object(0)?))
    }

    /// The bytes read since the reader was at `start`.
    fn consumed_since(&self, start: &'a [u8]) -> &'a [u8] {
        let n = start.len().saturating_sub(self.rest.len());
        start.get(..n).unwrap_or(&[])
    }
}

impl<'a> Object<'a> {
    /// Parses `bytes`, which must hold exactly one object [bus-obj-2].
    pub fn parse(bytes: &'a [u8]) -> Result<Object<'a>, Error> {
        let mut r = Reader { rest: bytes };
        let obj = r.object(0)?;
        if !r.rest.is_empty() {
            return Err(Error::TrailingBytes);
        }
        Ok(obj)
    }

    /// Bytes `Encoder::object` writes for this object.
    pub fn encoded_len(&self) -> usize {
        match self {
            Object::Null => NULL_LEN,
            Object::Bool(_) => BOOL_LEN,
            Object::I64(_) => I64_LEN,
            Object::F64(_) => F64_LEN,
            Object::Buf(b) => buf_len(b.len()),
            Object::List(l) => LIST_HEADER_LEN.saturating_add(l.body.len()),
            Object::Map(m) => MAP_HEADER_LEN.saturating_add(m.body.len()),
        }
    }

    /// True if this is null.
    pub fn is_null(&self) -> bool {
        matches!(self, Object::Null)
    }

    /// The bool, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Object::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The i64, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Object::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The f64, if this is one.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Object::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The buffer, if this is one.
    pub fn as_buf(&self) -> Option<&'a [u8]> {
        match *self {
            Object::Buf(b) => Some(b),
            _ => None,
        }
    }

    /// The list, if this is one.
    pub fn as_list(&self) -> Option<List<'a>> {
        match *self {
            Object::List(l) => Some(l),
            _ => None,
        }
    }

    /// The map, if this is one.
    pub fn as_map(&self) -> Option<Map<'a>> {
        match *self {
            Object::Map(m) => Some(m),
            _ => None,
        }
    }
}

/// Parses a request payload as its parameter map [bus-req-2]: empty means
/// an empty map; otherwise one object, which must be a map. Parse errors of
/// the object come first, as in GGL; then a non-map top level is INVALID.
pub fn parse_params(payload: &[u8]) -> Result<Map<'_>, Error> {
    if payload.is_empty() {
        return Ok(Map::default());
    }
    match Object::parse(payload)? {
        Object::Map(m) => Ok(m),
        _ => Err(Error::NotAMap),
    }
}

impl<'a> List<'a> {
    /// Number of items.
    pub fn len(&self) -> usize {
        to_usize(self.count)
    }

    /// True if the list has no items.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The items, in order.
    pub fn iter(&self) -> ListIter<'a> {
        ListIter(Items {
            rest: self.body,
            left: self.count,
        })
    }
}

impl<'a> IntoIterator for List<'a> {
    type Item = Object<'a>;
    type IntoIter = ListIter<'a>;

    fn into_iter(self) -> ListIter<'a> {
        self.iter()
    }
}

impl<'a> Map<'a> {
    /// Number of entries, duplicates included.
    pub fn len(&self) -> usize {
        to_usize(self.count)
    }

    /// True if the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries, in wire order.
    pub fn iter(&self) -> MapIter<'a> {
        MapIter(Items {
            rest: self.body,
            left: self.count,
        })
    }

    /// The value of the first entry with this key [bus-obj-1].
    pub fn get(&self, key: &[u8]) -> Option<Object<'a>> {
        self.iter().find(|&(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<'a> IntoIterator for Map<'a> {
    type Item = (&'a [u8], Object<'a>);
    type IntoIter = MapIter<'a>;

    fn into_iter(self) -> MapIter<'a> {
        self.iter()
    }
}

/// What is left of a validated container: its bytes and item count.
#[derive(Clone, Debug)]
struct Items<'a> {
    rest: &'a [u8],
    left: u32,
}

impl<'a> Items<'a> {
    /// The next item, read by `read`. The bytes were validated when the
    /// container was made, so this cannot fail; if it somehow did,
    /// iteration just ends.
    fn next_with<T>(
        &mut self,
        read: impl FnOnce(&mut Reader<'a>) -> Result<T, Error>,
    ) -> Option<T> {
        if self.left == 0 {
            return None;
        }
        let mut r = Reader { rest: self.rest };
        match read(&mut r) {
            Ok(item) => {
                self.rest = r.rest;
                self.left -= 1;
                Some(item)
            }
            Err(_) => {
                self.left = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (to_usize(self.left), Some(to_usize(self.left)))
    }
}

/// Iterator over a validated list's items.
#[derive(Clone, Debug)]
pub struct ListIter<'a>(Items<'a>);

impl<'a> Iterator for ListIter<'a> {
    type Item = Object<'a>;

    fn next(&mut self) -> Option<Object<'a>> {
        self.0.next_with(|r| r.object(0))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for ListIter<'_> {}

/// Iterator over a validated map's entries: (key, value).
#[derive(Clone, Debug)]
pub struct MapIter<'a>(Items<'a>);

impl<'a> Iterator for MapIter<'a> {
    type Item = (&'a [u8], Object<'a>);

    fn next(&mut self) -> Option<(&'a [u8], Object<'a>)> {
        self.0.next_with(Reader::map_entry)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for MapIter<'_> {}

/// Writes objects into a caller's slice. Each call writes one object, or a
/// list or map header (its `count` items or key/value pairs must follow),
/// or a map key. A call that fails writes nothing.
#[derive(Debug)]
pub struct Encoder<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl<'b> Encoder<'b> {
    /// An encoder writing from the start of `buf`.
    pub fn new(buf: &'b mut [u8]) -> Encoder<'b> {
        Encoder { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.pos
    }

    /// Claims the next `n` bytes, or fails without claiming any.
    fn claim(&mut self, n: usize) -> Result<&mut [u8], Error> {
        let end = self.pos.checked_add(n).ok_or(Error::BufferTooSmall)?;
        let out = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(Error::BufferTooSmall)?;
        self.pos = end;
        Ok(out)
    }

    /// Writes `tag`, then `fixed`, then `tail`, all or nothing.
    fn put(&mut self, tag: Option<u8>, fixed: &[u8], tail: &[u8]) -> Result<&mut Self, Error> {
        let tag_len = usize::from(tag.is_some());
        let n = tag_len
            .saturating_add(fixed.len())
            .saturating_add(tail.len());
        let out = self.claim(n)?;
        let (head, rest) = out.split_at_mut(tag_len);
        if let Some(t) = tag {
            head.copy_from_slice(&[t]);
        }
        let (mid, end) = rest.split_at_mut(fixed.len());
        mid.copy_from_slice(fixed);
        end.copy_from_slice(tail);
        Ok(self)
    }

    fn len_u32(len: usize) -> Result<[u8; 4], Error> {
        u32::try_from(len)
            .map(u32::to_le_bytes)
            .map_err(|_| Error::TooLong)
    }

    /// Writes a null.
    pub fn null(&mut self) -> Result<&mut Self, Error> {
        self.put(Some(TAG_NULL), &[], &[])
    }

    /// Writes a bool as 0 or 1.
    pub fn bool(&mut self, v: bool) -> Result<&mut Self, Error> {
        self.put(Some(TAG_BOOL), &[u8::from(v)], &[])
    }

    /// Writes an i64.
    pub fn i64(&mut self, v: i64) -> Result<&mut Self, Error> {
        self.put(Some(TAG_I64), &v.to_le_bytes(), &[])
    }

    /// Writes an f64.
    pub fn f64(&mut self, v: f64) -> Result<&mut Self, Error> {
        self.put(Some(TAG_F64), &v.to_le_bytes(), &[])
    }

    /// Writes a buffer.
    pub fn buf(&mut self, bytes: &[u8]) -> Result<&mut Self, Error> {
        self.put(Some(TAG_BUF), &Self::len_u32(bytes.len())?, bytes)
    }

    /// Writes a list header; `count` objects must follow.
    pub fn list(&mut self, count: usize) -> Result<&mut Self, Error> {
        self.put(Some(TAG_LIST), &Self::len_u32(count)?, &[])
    }

    /// Writes a map header; `count` times a key and an object must follow.
    pub fn map(&mut self, count: usize) -> Result<&mut Self, Error> {
        self.put(Some(TAG_MAP), &Self::len_u32(count)?, &[])
    }

    /// Writes a map key (no tag); its value must follow.
    pub fn key(&mut self, key: &[u8]) -> Result<&mut Self, Error> {
        self.put(None, &Self::len_u32(key.len())?, key)
    }

    /// Writes a parsed object again, byte for byte (a bool as 0 or 1).
    pub fn object(&mut self, obj: &Object<'_>) -> Result<&mut Self, Error> {
        match *obj {
            Object::Null => self.null(),
            Object::Bool(v) => self.bool(v),
            Object::I64(v) => self.i64(v),
            Object::F64(v) => self.f64(v),
            Object::Buf(b) => self.buf(b),
            Object::List(l) => self.put(Some(TAG_LIST), &l.count.to_le_bytes(), l.body),
            Object::Map(m) => self.put(Some(TAG_MAP), &m.count.to_le_bytes(), m.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::example::{PUBLISH_CALL, PUBLISH_PARAMS};
    use crate::bus::frame::{self, RequestType};

    /// `levels` nested lists around a null: `[[...[null]...]]`.
    fn nested_lists(levels: usize, innermost: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..levels {
            v.extend_from_slice(&[TAG_LIST, 1, 0, 0, 0]);
        }
        v.extend_from_slice(innermost);
        v
    }

    /// Walks a validated tree fully; returns the number of objects in it.
    fn walk(obj: &Object<'_>) -> usize {
        1 + match obj {
            Object::List(l) => {
                assert_eq!(l.iter().len(), l.len());
                let n: usize = l.iter().map(|o| walk(&o)).sum();
                assert_eq!(l.iter().count(), l.len());
                n
            }
            Object::Map(m) => {
                assert_eq!(m.iter().count(), m.len());
                m.iter().map(|(_, v)| walk(&v)).sum()
            }
            _ => 0,
        }
    }

    #[test]
    fn the_worked_example_params_parse_in_order() {
        let params = parse_params(PUBLISH_PARAMS).unwrap();
        assert_eq!(params.len(), 3);
        assert_eq!(params.get(b"topic"), Some(Object::Buf(b"a/b")));
        assert_eq!(
            params.get(b"payload").and_then(|o| o.as_buf()),
            Some(&b"hi"[..])
        );
        assert_eq!(params.get(b"qos").and_then(|o| o.as_i64()), Some(1));
        assert_eq!(params.get(b"retain"), None);
        let keys: Vec<&[u8]> = params.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, [&b"topic"[..], b"payload", b"qos"]);
        assert_eq!(Object::Map(params).encoded_len(), PUBLISH_PARAMS.len());
    }

    #[test]
    fn the_worked_example_is_built_in_one_pass_with_the_encoder() {
        let len = MAP_HEADER_LEN
            + key_len(5)
            + buf_len(3)
            + key_len(7)
            + buf_len(2)
            + key_len(3)
            + I64_LEN;
        assert_eq!(len, PUBLISH_PARAMS.len());
        assert_eq!(frame::request_len(b"publish", len), 99);
        let mut buf = [0u8; 99];
        let mut e = frame::begin_request(&mut buf, b"publish", RequestType::Call).unwrap();
        let mut enc = Encoder::new(e.payload_mut());
        enc.map(3)
            .and_then(|enc| enc.key(b"topic"))
            .and_then(|enc| enc.buf(b"a/b"))
            .and_then(|enc| enc.key(b"payload"))
            .and_then(|enc| enc.buf(b"hi"))
            .and_then(|enc| enc.key(b"qos"))
            .and_then(|enc| enc.i64(1))
            .unwrap();
        let n = enc.written();
        assert_eq!(e.finish(n), Ok(99));
        assert_eq!(buf[..], PUBLISH_CALL[..]);
        // And back: frame, request, params.
        let request = frame::parse(&buf).unwrap().request().unwrap();
        let params = parse_params(request.payload).unwrap();
        assert_eq!(params.get(b"topic"), Some(Object::Buf(b"a/b")));
    }

    #[test]
    fn the_golden_result_and_message_payloads_round_trip() {
        assert_eq!(Object::parse(&[0x00]), Ok(Object::Null));
        assert_eq!(Object::parse(&[0x01, 0x01]), Ok(Object::Bool(true)));
        let mut buf = [0u8; 3];
        let mut enc = Encoder::new(&mut buf);
        enc.null().unwrap().bool(true).unwrap();
        assert_eq!(enc.written(), NULL_LEN + BOOL_LEN);
        assert_eq!(buf, [0x00, 0x01, 0x01]);
    }

    #[test]
    fn every_type_round_trips_through_the_encoder() {
        let mut buf = [0u8; 512];
        let mut enc = Encoder::new(&mut buf);
        enc.map(9).unwrap();
        enc.key(b"null").unwrap().null().unwrap();
        enc.key(b"false").unwrap().bool(false).unwrap();
        enc.key(b"min").unwrap().i64(i64::MIN).unwrap();
        enc.key(b"pi").unwrap().f64(core::f64::consts::PI).unwrap();
        enc.key(b"").unwrap().buf(b"").unwrap();
        enc.key(b"empty list").unwrap().list(0).unwrap();
        enc.key(b"empty map").unwrap().map(0).unwrap();
        enc.key(b"list").unwrap().list(3).unwrap();
        enc.i64(-1)
            .unwrap()
            .buf(b"\xff\x00")
            .unwrap()
            .map(1)
            .unwrap();
        enc.key(b"inner").unwrap().bool(true).unwrap();
        enc.key(b"connections")
            .unwrap()
            .list(1)
            .unwrap()
            .map(2)
            .unwrap();
        enc.key(b"id").unwrap().buf(b"thing").unwrap();
        enc.key(b"connected").unwrap().bool(true).unwrap();
        let n = enc.written();
        let bytes = &buf[..n];

        let obj = Object::parse(bytes).unwrap();
        assert_eq!(obj.encoded_len(), n);
        assert_eq!(walk(&obj), 17);
        let map = obj.as_map().unwrap();
        assert!(map.get(b"null").unwrap().is_null());
        assert_eq!(map.get(b"false").unwrap().as_bool(), Some(false));
        assert_eq!(map.get(b"min").unwrap().as_i64(), Some(i64::MIN));
        assert_eq!(
            map.get(b"pi").unwrap().as_f64(),
            Some(core::f64::consts::PI)
        );
        assert_eq!(map.get(b"").unwrap().as_buf(), Some(&b""[..]));
        assert!(map
            .get(b"empty list")
            .unwrap()
            .as_list()
            .unwrap()
            .is_empty());
        assert!(map.get(b"empty map").unwrap().as_map().unwrap().is_empty());
        let list: Vec<Object<'_>> = map
            .get(b"list")
            .unwrap()
            .as_list()
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(list[0], Object::I64(-1));
        assert_eq!(list[1], Object::Buf(b"\xff\x00"));
        assert_eq!(
            list[2].as_map().unwrap().get(b"inner"),
            Some(Object::Bool(true))
        );
        let conn = map
            .get(b"connections")
            .unwrap()
            .as_list()
            .unwrap()
            .iter()
            .next()
            .unwrap();
        assert_eq!(
            conn.as_map().unwrap().get(b"id"),
            Some(Object::Buf(b"thing"))
        );

        // Re-encoding the parsed tree gives the same bytes.
        let mut again = [0u8; 512];
        let mut enc = Encoder::new(&mut again);
        let m = enc.object(&obj).unwrap().written();
        assert_eq!(&again[..m], bytes);
        // And each entry re-encodes to its own length.
        for (_, v) in map {
            let mut one = [0u8; 128];
            let mut enc = Encoder::new(&mut one);
            let m = enc.object(&v).unwrap().written();
            assert_eq!(m, v.encoded_len());
            assert_eq!(Object::parse(&one[..m]), Ok(v));
        }
    }

    #[test]
    fn a_map_lookup_takes_the_first_of_duplicate_keys_and_keeps_order() {
        let mut buf = [0u8; 64];
        let mut enc = Encoder::new(&mut buf);
        enc.map(3).unwrap();
        enc.key(b"qos").unwrap().i64(1).unwrap();
        enc.key(b"topic").unwrap().buf(b"t").unwrap();
        enc.key(b"qos").unwrap().i64(2).unwrap();
        let n = enc.written();
        let map = parse_params(&buf[..n]).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map.get(b"qos"), Some(Object::I64(1)));
        let values: Vec<Object<'_>> = map.iter().map(|(_, v)| v).collect();
        assert_eq!(values, [Object::I64(1), Object::Buf(b"t"), Object::I64(2)]);
    }

    #[test]
    fn a_nonzero_bool_byte_reads_as_true() {
        assert_eq!(Object::parse(&[TAG_BOOL, 0x00]), Ok(Object::Bool(false)));
        assert_eq!(Object::parse(&[TAG_BOOL, 0x02]), Ok(Object::Bool(true)));
        assert_eq!(Object::parse(&[TAG_BOOL, 0xFF]), Ok(Object::Bool(true)));
    }

    #[test]
    fn an_empty_payload_is_an_empty_map() {
        let map = parse_params(&[]).unwrap();
        assert!(map.is_empty());
        assert_eq!(map.iter().next(), None);
        assert_eq!(map.get(b"topic"), None);
        assert_eq!(parse_params(&[TAG_MAP, 0, 0, 0, 0]), Ok(Map::default()));
    }

    #[test]
    fn a_top_level_that_is_not_a_map_is_invalid() {
        let others: [&[u8]; 6] = [
            &[TAG_NULL],
            &[TAG_BOOL, 1],
            &[TAG_I64, 0, 0, 0, 0, 0, 0, 0, 0],
            &[TAG_F64, 0, 0, 0, 0, 0, 0, 0, 0],
            &[TAG_BUF, 1, 0, 0, 0, b'x'],
            &[TAG_LIST, 0, 0, 0, 0],
        ];
        for bytes in others {
            assert!(Object::parse(bytes).is_ok());
            assert_eq!(parse_params(bytes), Err(Error::NotAMap));
        }
        assert_eq!(Error::NotAMap.code(), ErrorCode::Invalid);
        // A parse error inside still wins over the type of the top level.
        assert_eq!(
            parse_params(&[TAG_LIST, 1, 0, 0, 0, 9]),
            Err(Error::UnknownTag(9))
        );
        assert_eq!(parse_params(&[TAG_NULL, 0]), Err(Error::TrailingBytes));
    }

    #[test]
    fn trailing_bytes_after_the_object_are_parse() {
        let mut bytes = PUBLISH_PARAMS.to_vec();
        bytes.push(0x00);
        assert_eq!(parse_params(&bytes), Err(Error::TrailingBytes));
        assert_eq!(Error::TrailingBytes.code(), ErrorCode::Parse);
    }

    #[test]
    fn running_out_of_bytes_anywhere_is_parse() {
        for n in 1..PUBLISH_PARAMS.len() {
            let e = parse_params(&PUBLISH_PARAMS[..n]).unwrap_err();
            assert_eq!(e.code(), ErrorCode::Parse, "{n} bytes: {e}");
        }
        for bytes in [
            &[TAG_BOOL][..],
            &[TAG_I64, 0, 0],
            &[TAG_F64],
            &[TAG_BUF, 0, 0],
            &[TAG_BUF, 2, 0, 0, 0, 1],
        ] {
            assert_eq!(Object::parse(bytes), Err(Error::Truncated));
        }
        assert_eq!(Object::parse(&[]), Err(Error::Truncated));
    }

    #[test]
    fn an_unknown_tag_is_invalid() {
        for tag in [7u8, 8, 0x7F, 0xFF] {
            assert_eq!(Object::parse(&[tag]), Err(Error::UnknownTag(tag)));
            let nested = [TAG_MAP, 1, 0, 0, 0, 1, 0, 0, 0, b'k', tag];
            assert_eq!(parse_params(&nested), Err(Error::UnknownTag(tag)));
        }
        assert_eq!(Error::UnknownTag(7).code(), ErrorCode::Invalid);
    }

    #[test]
    fn a_list_claiming_4_billion_entries_in_10_bytes_is_parse_without_allocating() {
        let list = [TAG_LIST, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0];
        assert_eq!(Object::parse(&list), Err(Error::CountTooLarge));
        assert_eq!(parse_params(&list), Err(Error::CountTooLarge));
        let map = [TAG_MAP, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0];
        assert_eq!(parse_params(&map), Err(Error::CountTooLarge));
        assert_eq!(Error::CountTooLarge.code(), ErrorCode::Parse);
        // The count is checked before the items: not INVALID for the bad tag.
        assert_eq!(
            Object::parse(&[TAG_LIST, 4, 0, 0, 0, 9, 9, 9]),
            Err(Error::CountTooLarge)
        );
        // Nor RANGE for the depth.
        let deep = nested_lists(14, &[TAG_LIST, 2, 0, 0, 0, 0]);
        assert_eq!(Object::parse(&deep), Err(Error::CountTooLarge));
        // A count equal to the bytes left is fine when they hold the items.
        assert_eq!(
            Object::parse(&[TAG_LIST, 2, 0, 0, 0, 0, 0]).map(|o| walk(&o)),
            Ok(3)
        );
        // A buffer claiming more than is there runs out of bytes.
        assert_eq!(
            Object::parse(&[TAG_BUF, 0xFF, 0xFF, 0xFF, 0xFF, 0]),
            Err(Error::Truncated)
        );
    }

    #[test]
    fn fourteen_nested_containers_are_accepted_and_a_fifteenth_is_range() {
        // Top-level map (the first) holding 13 nested lists: 14 in all.
        let mut params = vec![TAG_MAP, 1, 0, 0, 0, 1, 0, 0, 0, b'k'];
        params.extend(nested_lists(13, &[TAG_NULL]));
        let map = parse_params(&params).unwrap();
        assert_eq!(walk(&Object::Map(map)), 15);
        // Empty containers do not count, even below the 14th.
        let mut with_empty = vec![TAG_MAP, 1, 0, 0, 0, 1, 0, 0, 0, b'k'];
        with_empty.extend(nested_lists(13, &[TAG_MAP, 0, 0, 0, 0]));
        assert!(parse_params(&with_empty).is_ok());
        // One more non-empty list is the 15th.
        let mut too_deep = vec![TAG_MAP, 1, 0, 0, 0, 1, 0, 0, 0, b'k'];
        too_deep.extend(nested_lists(14, &[TAG_NULL]));
        assert_eq!(parse_params(&too_deep), Err(Error::TooDeep));
        assert_eq!(Error::TooDeep.code(), ErrorCode::Range);
        // The same for a bare object.
        assert!(Object::parse(&nested_lists(14, &[TAG_NULL])).is_ok());
        assert_eq!(
            Object::parse(&nested_lists(15, &[TAG_NULL])),
            Err(Error::TooDeep)
        );
        assert_eq!(
            Object::parse(&nested_lists(1000, &[TAG_NULL])),
            Err(Error::TooDeep)
        );
    }

    #[test]
    fn depth_counts_nesting_not_siblings() {
        let mut bytes = vec![TAG_LIST, 100, 0, 0, 0];
        for _ in 0..100 {
            bytes.extend(nested_lists(13, &[TAG_NULL]));
        }
        let obj = Object::parse(&bytes).unwrap();
        assert_eq!(walk(&obj), 1 + 100 * 14);
    }

    #[test]
    fn the_encoder_refuses_a_short_buffer_and_writes_nothing() {
        let mut buf = [0xAAu8; 8];
        let mut enc = Encoder::new(&mut buf);
        assert_eq!(enc.i64(1).err(), Some(Error::BufferTooSmall));
        assert_eq!(enc.buf(b"abcd").err(), Some(Error::BufferTooSmall));
        assert_eq!(enc.key(b"abcde").err(), Some(Error::BufferTooSmall));
        assert_eq!(enc.written(), 0);
        enc.bool(false).unwrap().map(0).unwrap();
        assert_eq!(enc.list(0).err(), Some(Error::BufferTooSmall));
        enc.null().unwrap();
        assert_eq!(enc.null().err(), Some(Error::BufferTooSmall));
        assert_eq!(enc.written(), 8);
        assert_eq!(buf, [TAG_BOOL, 0, TAG_MAP, 0, 0, 0, 0, TAG_NULL]);
        assert_eq!(Error::BufferTooSmall.code(), ErrorCode::NoMem);
        assert_eq!(Error::TooLong.code(), ErrorCode::Range);
        let mut buf = [0u8; 8];
        // A count the u32 length cannot hold exists only where usize is
        // wider than 32 bits (`1 << 32` would not even compile on armv7).
        if let Ok(count) = usize::try_from(1u64 << 32) {
            assert_eq!(
                Encoder::new(&mut buf).list(count).err(),
                Some(Error::TooLong)
            );
        }
        assert_eq!(buf_len(usize::MAX), usize::MAX);
    }

    #[test]
    fn errors_display_one_clear_line() {
        assert_eq!(Error::UnknownTag(7).to_string(), "unknown object tag 7");
        assert_eq!(
            Error::TooDeep.to_string(),
            "objects nested more than 14 deep"
        );
    }

    /// xorshift64: deterministic noise without a crate.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn random_mutations_never_panic() {
        let mut seed = [0u8; 512];
        let mut enc = Encoder::new(&mut seed);
        enc.map(4).unwrap();
        enc.key(b"topic_filter")
            .unwrap()
            .list(2)
            .unwrap()
            .buf(b"a/#")
            .unwrap()
            .buf(b"b/+")
            .unwrap();
        enc.key(b"qos").unwrap().i64(1).unwrap();
        enc.key(b"x").unwrap().f64(1.5).unwrap();
        enc.key(b"deep").unwrap();
        for _ in 0..12 {
            enc.list(2).unwrap().bool(true).unwrap();
        }
        enc.null().unwrap();
        let n = enc.written();
        let seeds: [&[u8]; 3] = [&seed[..n], PUBLISH_PARAMS, &[TAG_MAP, 0, 0, 0, 0]];

        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let (mut ok, mut failed) = (0, 0);
        let mut out = [0u8; 1024];
        for round in 0..200_000 {
            let mut bytes = seeds[round % seeds.len()].to_vec();
            for _ in 0..1 + xorshift(&mut rng) % 3 {
                let r = xorshift(&mut rng);
                let at = (r >> 8) as usize % bytes.len().max(1);
                match r % 4 {
                    0 if !bytes.is_empty() => bytes[at] ^= 1 << ((r >> 32) % 8),
                    1 if !bytes.is_empty() => bytes[at] = r.to_le_bytes()[5] % 9,
                    2 => bytes.truncate(at),
                    _ => bytes.insert(at.min(bytes.len()), r.to_le_bytes()[3] % 9),
                }
            }
            match parse_params(&bytes) {
                Ok(map) => {
                    ok += 1;
                    let obj = Object::Map(map);
                    walk(&obj);
                    let _ = map.get(b"qos");
                    if !bytes.is_empty() {
                        let mut enc = Encoder::new(&mut out);
                        let m = enc.object(&obj).unwrap().written();
                        assert_eq!(&out[..m], &bytes[..]);
                    }
                }
                Err(e) => {
                    failed += 1;
                    let _ = e.code();
                }
            }
            if let Ok(obj) = Object::parse(&bytes) {
                assert_eq!(obj.encoded_len(), bytes.len());
            }
        }
        assert!(ok > 1_000 && failed > 1_000, "ok {ok}, failed {failed}");
    }
}
