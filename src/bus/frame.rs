//! Core bus framing: the AWS EventStream subset of `spec/core-bus.md`
//! sections 2 and 3 ([bus-frame-1] to [bus-frame-4], [bus-req-1],
//! [bus-err-1], [bus-err-2]).
//!
//! [`frame_len`] looks at the start of a receive buffer and tells how long
//! the first frame is, applying the prelude checks and the size limit in the
//! order [bus-frame-3] gives. [`parse`] checks one whole frame and yields a
//! [`Frame`] that borrows its header block and payload; once a frame exists,
//! iterating or looking up its headers cannot fail. [`Emitter`] builds a
//! frame in one pass in a caller's buffer: headers first, then the caller
//! writes the payload in place (usually with `object::Encoder`), then
//! `finish` back-fills the prelude and both CRCs. Nothing here allocates or
//! panics on input.
//!
//! A server checks a request in this order, as GGL does: the frame
//! ([`Error::code`], PARSE or NOMEM), then its headers ([`Frame::request`],
//! INVALID), then its payload (`object::parse_params`).

use core::fmt;
use core::ops::Range;

/// Length of the prelude: total_len, headers_len, prelude_crc.
pub const PRELUDE_LEN: usize = 12;
/// Length of the smallest frame: prelude and message CRC only.
pub const MIN_FRAME_LEN: usize = 16;
/// Largest frame GGL accepts; iotcored's limit is at least this [bus-frame-4].
pub const GGL_MAX_FRAME_LEN: usize = 10_012;
/// Header value type tag of an int32.
pub const TYPE_INT32: u8 = 4;
/// Header value type tag of a string (u16 length, then bytes).
pub const TYPE_STRING: u8 = 7;
/// Length of the frame [`emit_error`] writes.
pub const ERROR_FRAME_LEN: usize = 27;
/// Length of the frame [`emit_accepted`] writes.
pub const ACCEPTED_FRAME_LEN: usize = 30;

/// Byte layout of a frame; all integers big-endian.
mod field {
    use core::ops::Range;

    pub const TOTAL_LEN: Range<usize> = 0..4;
    pub const HEADERS_LEN: Range<usize> = 4..8;
    pub const PRELUDE_CRC: Range<usize> = 8..12;
    /// Bytes the prelude CRC covers.
    pub const PRELUDE_CRC_COVERS: Range<usize> = 0..8;
    /// The header block starts right after the prelude.
    pub const HEADERS: usize = 12;
    /// The message CRC takes the last 4 bytes.
    pub const MESSAGE_CRC_LEN: usize = 4;
}

/// CRC-32 (IEEE, zlib), the frame's checksum [bus-frame-1].
pub use crate::crc::crc32;

/// Declares `ErrorCode` from one table: variant, wire value, GGL's name
/// (as smoltcp's `enum_with_unknown!` does for its protocol numbers).
macro_rules! error_codes {
    ($($variant:ident = $value:literal, $name:literal;)*) => {
        /// Core bus error codes, as int32 on the wire (section 3).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(i32)]
        pub enum ErrorCode {
            $($variant = $value,)*
        }

        impl ErrorCode {
            const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code's name as GGL spells it, e.g. `NOENTRY`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)*
                }
            }
        }
    };
}

error_codes! {
    Failure = 1, "FAILURE";
    Retry = 2, "RETRY";
    Busy = 3, "BUSY";
    Fatal = 4, "FATAL";
    Invalid = 5, "INVALID";
    Unsupported = 6, "UNSUPPORTED";
    Parse = 7, "PARSE";
    Range = 8, "RANGE";
    NoMem = 9, "NOMEM";
    NoConn = 10, "NOCONN";
    NoData = 11, "NODATA";
    NoEntry = 12, "NOENTRY";
    Config = 13, "CONFIG";
    Remote = 14, "REMOTE";
    Expected = 15, "EXPECTED";
    Timeout = 16, "TIMEOUT";
    Unauthorized = 17, "UNAUTHORIZED";
    Conflict = 18, "CONFLICT";
}

impl ErrorCode {
    /// The code's value on the wire.
    pub const fn as_i32(self) -> i32 {
        self as i32
    }

    /// The code with this wire value, if it is one of the 18.
    pub fn from_i32(value: i32) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_i32() == value)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What can go wrong reading or writing a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Fewer bytes than a prelude, or than the frame's total_len.
    Truncated,
    /// More bytes than the frame's total_len.
    TrailingBytes,
    /// The prelude CRC does not match.
    PreludeCrc,
    /// total_len is below 16.
    ShortFrame,
    /// headers_len is more than total_len - 16.
    HeadersLen,
    /// The frame is longer than the receiver's size limit.
    Oversized,
    /// The message CRC does not match.
    MessageCrc,
    /// A header does not end inside the header block.
    HeaderLayout,
    /// A header value type other than int32 (4) or string (7).
    HeaderType(u8),
    /// A request lacks this header.
    MissingHeader(&'static str),
    /// A request header has the wrong value type or an unknown value.
    BadHeader(&'static str),
    /// The output buffer is too short.
    BufferTooSmall,
    /// A header name over 255 bytes, a string over 65535, or a frame over 4 GiB.
    TooLong,
}

impl Error {
    /// The code a server answers this error with (section 3).
    pub fn code(self) -> ErrorCode {
        match self {
            Error::Truncated
            | Error::TrailingBytes
            | Error::PreludeCrc
            | Error::ShortFrame
            | Error::HeadersLen
            | Error::MessageCrc
            | Error::HeaderLayout
            | Error::HeaderType(_) => ErrorCode::Parse,
            Error::Oversized | Error::BufferTooSmall => ErrorCode::NoMem,
            Error::MissingHeader(_) | Error::BadHeader(_) => ErrorCode::Invalid,
            Error::TooLong => ErrorCode::Range,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated => f.write_str("frame truncated"),
            Error::TrailingBytes => f.write_str("bytes after the end of the frame"),
            Error::PreludeCrc => f.write_str("bad prelude CRC"),
            Error::ShortFrame => f.write_str("frame length below 16 bytes"),
            Error::HeadersLen => f.write_str("headers length exceeds frame length"),
            Error::Oversized => f.write_str("frame over the size limit"),
            Error::MessageCrc => f.write_str("bad message CRC"),
            Error::HeaderLayout => f.write_str("header runs past the header block"),
            Error::HeaderType(t) => write!(f, "unsupported header value type {t}"),
            Error::MissingHeader(name) => write!(f, "missing {name} header"),
            Error::BadHeader(name) => write!(f, "bad {name} header"),
            Error::BufferTooSmall => f.write_str("output buffer too small"),
            Error::TooLong => f.write_str("header or frame too long to encode"),
        }
    }
}

impl std::error::Error for Error {}

/// Length of the first frame in a receive buffer, as far as it is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameLen {
    /// Fewer than 12 bytes: the prelude is not complete yet.
    NeedPrelude,
    /// The prelude is bad (always a PARSE error); the stream cannot be resynchronised.
    Invalid(Error),
    /// The prelude is sound but the frame exceeds the limit; its remaining
    /// `total_len - buffered` bytes should be discarded before NOMEM [bus-err-2].
    Oversized { total_len: usize },
    /// The first frame is this many bytes long; it is complete once the
    /// buffer holds that many.
    Len(usize),
}

struct Prelude {
    total_len: usize,
    headers_len: usize,
}

fn be_u32(buf: &[u8], range: Range<usize>) -> Option<u32> {
    buf.get(range)?.try_into().ok().map(u32::from_be_bytes)
}

fn to_usize(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// The prelude checks of [bus-frame-3], in order, before the size limit.
fn prelude(buf: &[u8]) -> Result<Prelude, Error> {
    let (Some(total_len), Some(headers_len), Some(crc), Some(covered)) = (
        be_u32(buf, field::TOTAL_LEN),
        be_u32(buf, field::HEADERS_LEN),
        be_u32(buf, field::PRELUDE_CRC),
        buf.get(field::PRELUDE_CRC_COVERS),
    ) else {
        return Err(Error::Truncated);
    };
    if crc32(covered) != crc {
        return Err(Error::PreludeCrc);
    }
    let (total_len, headers_len) = (to_usize(total_len), to_usize(headers_len));
    if total_len < MIN_FRAME_LEN {
        return Err(Error::ShortFrame);
    }
    if headers_len > total_len - MIN_FRAME_LEN {
        return Err(Error::HeadersLen);
    }
    Ok(Prelude {
        total_len,
        headers_len,
    })
}

/// Framer: how long the first frame of `buf` is, given a size limit of `max`
/// bytes per frame. Checks run in the order of [bus-frame-3].
pub fn frame_len(buf: &[u8], max: usize) -> FrameLen {
    if buf.len() < PRELUDE_LEN {
        return FrameLen::NeedPrelude;
    }
    match prelude(buf) {
        Err(e) => FrameLen::Invalid(e),
        Ok(p) if p.total_len > max => FrameLen::Oversized {
            total_len: p.total_len,
        },
        Ok(p) => FrameLen::Len(p.total_len),
    }
}

/// A header value: this bus uses only int32 and string [bus-frame-2].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    I32(i32),
    Str(&'a [u8]),
}

/// One header of a parsed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    pub name: &'a [u8],
    pub value: HeaderValue<'a>,
}

/// Splits `n` bytes off the front of a header block.
fn split(bytes: &[u8], n: usize) -> Result<(&[u8], &[u8]), Error> {
    if n > bytes.len() {
        return Err(Error::HeaderLayout);
    }
    Ok(bytes.split_at(n))
}

/// Reads the header at the start of `block`; returns it and the rest.
fn next_header(block: &[u8]) -> Result<(Header<'_>, &[u8]), Error> {
    let (&name_len, rest) = block.split_first().ok_or(Error::HeaderLayout)?;
    let (name, rest) = split(rest, usize::from(name_len))?;
    let (&kind, rest) = rest.split_first().ok_or(Error::HeaderLayout)?;
    let (value, rest) = match kind {
        TYPE_INT32 => {
            let (v, rest) = split(rest, 4)?;
            let v = v.try_into().map_err(|_| Error::HeaderLayout)?;
            (HeaderValue::I32(i32::from_be_bytes(v)), rest)
        }
        TYPE_STRING => {
            let (len, rest) = split(rest, 2)?;
            let len = len.try_into().map_err(|_| Error::HeaderLayout)?;
            let (s, rest) = split(rest, usize::from(u16::from_be_bytes(len)))?;
            (HeaderValue::Str(s), rest)
        }
        other => return Err(Error::HeaderType(other)),
    };
    Ok((Header { name, value }, rest))
}

/// Iterator over the headers of a parsed frame, in wire order.
#[derive(Clone, Debug)]
pub struct Headers<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Headers<'a> {
    type Item = Header<'a>;

    fn next(&mut self) -> Option<Header<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        // The block was validated by `parse`, so this cannot fail; if it
        // somehow did, iteration just ends.
        match next_header(self.rest) {
            Ok((h, rest)) => {
                self.rest = rest;
                Some(h)
            }
            Err(_) => {
                self.rest = &[];
                None
            }
        }
    }
}

/// Request type, the `type` header [bus-req-1].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum RequestType {
    Notify = 0,
    Call = 1,
    Subscribe = 2,
}

impl RequestType {
    /// The request type with this wire value.
    pub fn from_i32(value: i32) -> Option<RequestType> {
        match value {
            0 => Some(RequestType::Notify),
            1 => Some(RequestType::Call),
            2 => Some(RequestType::Subscribe),
            _ => None,
        }
    }
}

/// The headers and payload of a request frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a [u8],
    pub kind: RequestType,
    /// One serialized object, or empty (see `object::parse_params`).
    pub payload: &'a [u8],
}

/// What a response frame says. A call result and a subscription message
/// look the same on the wire; the client knows which it is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response<'a> {
    /// A serialized object: a call's result or a subscription message.
    Payload(&'a [u8]),
    /// An `error` header with this code (FAILURE if it is not an int32).
    Error(i32),
    /// An `accepted` header equal to 1.
    Accepted,
}

/// A validated frame borrowing its header block and payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    headers: &'a [u8],
    payload: &'a [u8],
}

/// Parses `buf`, which must hold exactly one complete frame.
pub fn parse(buf: &[u8]) -> Result<Frame<'_>, Error> {
    Frame::parse(buf)
}

impl<'a> Frame<'a> {
    /// Parses `buf`, which must hold exactly one complete frame. The size
    /// limit is the framer's business, not checked here.
    pub fn parse(buf: &'a [u8]) -> Result<Frame<'a>, Error> {
        let p = prelude(buf)?;
        if buf.len() < p.total_len {
            return Err(Error::Truncated);
        }
        if buf.len() > p.total_len {
            return Err(Error::TrailingBytes);
        }
        let crc_at = p.total_len - field::MESSAGE_CRC_LEN;
        let crc = be_u32(buf, crc_at..p.total_len).ok_or(Error::Truncated)?;
        let covered = buf.get(..crc_at).ok_or(Error::Truncated)?;
        if crc32(covered) != crc {
            return Err(Error::MessageCrc);
        }
        let headers_end = field::HEADERS + p.headers_len;
        let headers = buf
            .get(field::HEADERS..headers_end)
            .ok_or(Error::HeadersLen)?;
        let payload = buf.get(headers_end..crc_at).ok_or(Error::HeadersLen)?;
        let mut rest = headers;
        while !rest.is_empty() {
            rest = next_header(rest)?.1;
        }
        Ok(Frame { headers, payload })
    }

    /// The headers, in wire order.
    pub fn headers(&self) -> Headers<'a> {
        Headers { rest: self.headers }
    }

    /// The raw header block.
    pub fn header_block(&self) -> &'a [u8] {
        self.headers
    }

    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The value of the last header called `name` [bus-frame-2].
    pub fn header(&self, name: &str) -> Option<HeaderValue<'a>> {
        self.headers()
            .filter(|h| h.name == name.as_bytes())
            .last()
            .map(|h| h.value)
    }

    /// The last header called `name`, if it is a string.
    pub fn header_str(&self, name: &str) -> Option<&'a [u8]> {
        match self.header(name)? {
            HeaderValue::Str(s) => Some(s),
            HeaderValue::I32(_) => None,
        }
    }

    /// The last header called `name`, if it is an int32.
    pub fn header_i32(&self, name: &str) -> Option<i32> {
        match self.header(name)? {
            HeaderValue::I32(v) => Some(v),
            HeaderValue::Str(_) => None,
        }
    }

    /// Reads the frame as a request [bus-req-1]: `method` (string) and
    /// `type` (0, 1 or 2) are required. Like GGL, any `method` or `type`
    /// header of the wrong kind is an error even if a later one is good;
    /// among good ones the last wins.
    pub fn request(&self) -> Result<Request<'a>, Error> {
        let mut method = None;
        let mut kind = None;
        for h in self.headers() {
            match (h.name, h.value) {
                (b"method", HeaderValue::Str(s)) => method = Some(s),
                (b"method", HeaderValue::I32(_)) => return Err(Error::BadHeader("method")),
                (b"type", HeaderValue::I32(v)) => {
                    kind = Some(RequestType::from_i32(v).ok_or(Error::BadHeader("type"))?);
                }
                (b"type", HeaderValue::Str(_)) => return Err(Error::BadHeader("type")),
                _ => {}
            }
        }
        Ok(Request {
            method: method.ok_or(Error::MissingHeader("method"))?,
            kind: kind.ok_or(Error::MissingHeader("type"))?,
            payload: self.payload,
        })
    }

    /// Reads the frame as a response: an `error` header wins, then
    /// `accepted` = 1, else the payload.
    pub fn response(&self) -> Response<'a> {
        match self.header("error") {
            Some(HeaderValue::I32(code)) => Response::Error(code),
            Some(HeaderValue::Str(_)) => Response::Error(ErrorCode::Failure.as_i32()),
            None if self.header_i32("accepted") == Some(1) => Response::Accepted,
            None => Response::Payload(self.payload),
        }
    }

    /// Bytes `emit` writes.
    pub fn buffer_len(&self) -> usize {
        MIN_FRAME_LEN + self.headers.len() + self.payload.len()
    }

    /// Writes the frame again, byte for byte; returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, Error> {
        let mut e = Emitter::with_block(buf, self.headers)?;
        copy_payload(&mut e, self.payload)?;
        e.finish(self.payload.len())
    }
}

/// Writes `bytes` at `at`; returns the offset after them.
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> Result<usize, Error> {
    let end = at.checked_add(bytes.len()).ok_or(Error::BufferTooSmall)?;
    buf.get_mut(at..end)
        .ok_or(Error::BufferTooSmall)?
        .copy_from_slice(bytes);
    Ok(end)
}

fn header_len(name: &str, value: HeaderValue<'_>) -> usize {
    let value_len = match value {
        HeaderValue::I32(_) => 4,
        HeaderValue::Str(s) => 2usize.saturating_add(s.len()),
    };
    name.len().saturating_add(2).saturating_add(value_len)
}

/// Writes one header at `at`; returns the offset after it.
fn put_header(
    buf: &mut [u8],
    at: usize,
    name: &str,
    value: HeaderValue<'_>,
) -> Result<usize, Error> {
    let name_len = u8::try_from(name.len()).map_err(|_| Error::TooLong)?;
    let at = put(buf, at, &[name_len])?;
    let at = put(buf, at, name.as_bytes())?;
    match value {
        HeaderValue::I32(v) => {
            let at = put(buf, at, &[TYPE_INT32])?;
            put(buf, at, &v.to_be_bytes())
        }
        HeaderValue::Str(s) => {
            let len = u16::try_from(s.len()).map_err(|_| Error::TooLong)?;
            let at = put(buf, at, &[TYPE_STRING])?;
            let at = put(buf, at, &len.to_be_bytes())?;
            put(buf, at, s)
        }
    }
}

/// Length of a frame with these headers and `payload_len` payload bytes.
pub fn buffer_len(headers: &[(&str, HeaderValue<'_>)], payload_len: usize) -> usize {
    headers.iter().fold(
        MIN_FRAME_LEN.saturating_add(payload_len),
        |n, &(name, value)| n.saturating_add(header_len(name, value)),
    )
}

/// Builds one frame in a caller's buffer without a copy: [`Emitter::new`]
/// writes the headers, the caller writes the payload into
/// [`Emitter::payload_mut`], and [`Emitter::finish`] fills in the prelude
/// and both CRCs.
#[derive(Debug)]
pub struct Emitter<'b> {
    buf: &'b mut [u8],
    headers_end: usize,
}

impl<'b> Emitter<'b> {
    /// Starts a frame with these headers, in this order.
    pub fn new(
        buf: &'b mut [u8],
        headers: &[(&str, HeaderValue<'_>)],
    ) -> Result<Emitter<'b>, Error> {
        let mut at = field::HEADERS;
        for &(name, value) in headers {
            at = put_header(buf, at, name, value)?;
        }
        Emitter::started(buf, at)
    }

    /// Starts a frame with an already encoded header block.
    fn with_block(buf: &'b mut [u8], block: &[u8]) -> Result<Emitter<'b>, Error> {
        let at = put(buf, field::HEADERS, block)?;
        Emitter::started(buf, at)
    }

    fn started(buf: &'b mut [u8], headers_end: usize) -> Result<Emitter<'b>, Error> {
        if buf.len() < headers_end.saturating_add(field::MESSAGE_CRC_LEN) {
            return Err(Error::BufferTooSmall);
        }
        Ok(Emitter { buf, headers_end })
    }

    /// Room for the payload: the buffer after the headers, less the 4
    /// bytes of the message CRC.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.buf.len().saturating_sub(field::MESSAGE_CRC_LEN);
        match self.buf.get_mut(self.headers_end..end) {
            Some(room) => room,
            None => &mut [],
        }
    }

    /// Completes the frame for a payload of `payload_len` bytes already
    /// written at the start of `payload_mut()`; returns the frame's length.
    pub fn finish(self, payload_len: usize) -> Result<usize, Error> {
        let crc_at = self
            .headers_end
            .checked_add(payload_len)
            .ok_or(Error::BufferTooSmall)?;
        let total_len = crc_at.saturating_add(field::MESSAGE_CRC_LEN);
        if total_len > self.buf.len() {
            return Err(Error::BufferTooSmall);
        }
        let total = u32::try_from(total_len).map_err(|_| Error::TooLong)?;
        let headers = u32::try_from(self.headers_end.saturating_sub(field::HEADERS))
            .map_err(|_| Error::TooLong)?;
        put(self.buf, field::TOTAL_LEN.start, &total.to_be_bytes())?;
        put(self.buf, field::HEADERS_LEN.start, &headers.to_be_bytes())?;
        let crc = crc32(
            self.buf
                .get(field::PRELUDE_CRC_COVERS)
                .ok_or(Error::BufferTooSmall)?,
        );
        put(self.buf, field::PRELUDE_CRC.start, &crc.to_be_bytes())?;
        let crc = crc32(self.buf.get(..crc_at).ok_or(Error::BufferTooSmall)?);
        put(self.buf, crc_at, &crc.to_be_bytes())
    }
}

fn copy_payload(e: &mut Emitter<'_>, payload: &[u8]) -> Result<(), Error> {
    put(e.payload_mut(), 0, payload).map(|_| ())
}

/// Writes a whole frame; returns its length.
pub fn emit(
    buf: &mut [u8],
    headers: &[(&str, HeaderValue<'_>)],
    payload: &[u8],
) -> Result<usize, Error> {
    let mut e = Emitter::new(buf, headers)?;
    copy_payload(&mut e, payload)?;
    e.finish(payload.len())
}

/// Writes an error frame: header `error` = `code`, no payload.
pub fn emit_error(buf: &mut [u8], code: ErrorCode) -> Result<usize, Error> {
    emit(buf, &[("error", HeaderValue::I32(code.as_i32()))], &[])
}

/// Writes a subscription-accepted frame: header `accepted` = 1, no payload.
pub fn emit_accepted(buf: &mut [u8]) -> Result<usize, Error> {
    emit(buf, &[("accepted", HeaderValue::I32(1))], &[])
}

/// Starts a call result frame: no headers; the payload is one object.
pub fn begin_result(buf: &mut [u8]) -> Result<Emitter<'_>, Error> {
    Emitter::new(buf, &[])
}

/// Starts a subscription message frame: no headers; the payload is one object.
pub fn begin_message(buf: &mut [u8]) -> Result<Emitter<'_>, Error> {
    Emitter::new(buf, &[])
}

/// Starts a request frame (headers `method`, then `type`); the payload is
/// the parameter map.
pub fn begin_request<'b>(
    buf: &'b mut [u8],
    method: &[u8],
    kind: RequestType,
) -> Result<Emitter<'b>, Error> {
    Emitter::new(
        buf,
        &[
            ("method", HeaderValue::Str(method)),
            ("type", HeaderValue::I32(kind as i32)),
        ],
    )
}

/// Length of a request frame for `method` with `payload_len` payload bytes.
pub fn request_len(method: &[u8], payload_len: usize) -> usize {
    buffer_len(
        &[
            ("method", HeaderValue::Str(method)),
            ("type", HeaderValue::I32(0)),
        ],
        payload_len,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::example::{PUBLISH_CALL, PUBLISH_PARAMS};

    /// Call result null.
    const NULL_RESULT: [u8; 17] = [
        0x00, 0x00, 0x00, 0x11, // total_len = 17
        0x00, 0x00, 0x00, 0x00, // headers_len = 0
        0x38, 0xa2, 0x61, 0x5b, // prelude CRC
        0x00, // null
        0xa1, 0x71, 0xab, 0x15, // message CRC
    ];

    /// Error NOENTRY.
    const ERROR_NOENTRY: [u8; 27] = [
        0x00, 0x00, 0x00, 0x1b, // total_len = 27
        0x00, 0x00, 0x00, 0x0b, // headers_len = 11
        0xe5, 0xc0, 0xa0, 0x72, // prelude CRC
        0x05, b'e', b'r', b'r', b'o', b'r', // name "error"
        0x04, 0x00, 0x00, 0x00, 0x0c, // int32 12 = NOENTRY
        0x6d, 0xc5, 0x39, 0x08, // message CRC
    ];

    /// Subscription accepted.
    const ACCEPTED: [u8; 30] = [
        0x00, 0x00, 0x00, 0x1e, // total_len = 30
        0x00, 0x00, 0x00, 0x0e, // headers_len = 14
        0x5d, 0x4a, 0xdb, 0x8d, // prelude CRC
        0x08, b'a', b'c', b'c', b'e', b'p', b't', b'e', b'd', // name "accepted"
        0x04, 0x00, 0x00, 0x00, 0x01, // int32 1
        0xf2, 0x54, 0xb2, 0xef, // message CRC
    ];

    /// Subscription message `true`.
    const MESSAGE_TRUE: [u8; 18] = [
        0x00, 0x00, 0x00, 0x12, // total_len = 18
        0x00, 0x00, 0x00, 0x00, // headers_len = 0
        0x7f, 0x02, 0x1b, 0x8b, // prelude CRC
        0x01, 0x01, // bool true
        0xa3, 0xf1, 0xcd, 0x91, // message CRC
    ];

    const GOLDEN: [&[u8]; 5] = [
        &PUBLISH_CALL,
        &NULL_RESULT,
        &ERROR_NOENTRY,
        &ACCEPTED,
        &MESSAGE_TRUE,
    ];

    /// Recomputes both CRCs of `frame` in place, whatever its prelude says.
    fn fix_crcs(frame: &mut [u8]) {
        let crc = crc32(&frame[0..8]);
        frame[8..12].copy_from_slice(&crc.to_be_bytes());
        let end = frame.len() - 4;
        let crc = crc32(&frame[..end]);
        frame[end..].copy_from_slice(&crc.to_be_bytes());
    }

    /// A frame with a raw header block and payload and correct lengths and CRCs.
    fn raw_frame(headers: &[u8], payload: &[u8]) -> Vec<u8> {
        let total = 16 + headers.len() + payload.len();
        let mut f = Vec::new();
        f.extend_from_slice(&u32::try_from(total).unwrap().to_be_bytes());
        f.extend_from_slice(&u32::try_from(headers.len()).unwrap().to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(headers);
        f.extend_from_slice(payload);
        f.extend_from_slice(&[0; 4]);
        fix_crcs(&mut f);
        f
    }

    /// A prelude with a valid CRC for these lengths.
    fn prelude_bytes(total_len: u32, headers_len: u32) -> [u8; 12] {
        let mut p = [0; 12];
        p[0..4].copy_from_slice(&total_len.to_be_bytes());
        p[4..8].copy_from_slice(&headers_len.to_be_bytes());
        let crc = crc32(&p[0..8]);
        p[8..12].copy_from_slice(&crc.to_be_bytes());
        p
    }

    #[test]
    fn crc32_is_the_ieee_zlib_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn the_worked_example_parses_as_a_publish_call() {
        let frame = parse(&PUBLISH_CALL).unwrap();
        let request = frame.request().unwrap();
        assert_eq!(request.method, b"publish");
        assert_eq!(request.kind, RequestType::Call);
        assert_eq!(request.payload, PUBLISH_PARAMS);
        assert_eq!(frame.header_str("method"), Some(&b"publish"[..]));
        assert_eq!(frame.header_i32("type"), Some(1));
        assert_eq!(frame.header_i32("method"), None);
        assert_eq!(frame.header("nothing"), None);
        let names: Vec<&[u8]> = frame.headers().map(|h| h.name).collect();
        assert_eq!(names, [&b"method"[..], b"type"]);
        assert_eq!(
            frame_len(&PUBLISH_CALL, GGL_MAX_FRAME_LEN),
            FrameLen::Len(99)
        );
    }

    #[test]
    fn the_worked_example_is_emitted_byte_for_byte() {
        let params = PUBLISH_PARAMS;
        assert_eq!(request_len(b"publish", params.len()), 99);
        let mut buf = [0xAA; 128];
        let mut e = begin_request(&mut buf, b"publish", RequestType::Call).unwrap();
        e.payload_mut()[..params.len()].copy_from_slice(params);
        assert_eq!(e.finish(params.len()), Ok(99));
        assert_eq!(buf[..99], PUBLISH_CALL);
    }

    #[test]
    fn a_null_call_result_is_parsed_and_emitted_byte_for_byte() {
        let frame = parse(&NULL_RESULT).unwrap();
        assert_eq!(frame.response(), Response::Payload(&[0x00]));
        let mut buf = [0; 17];
        let mut e = begin_result(&mut buf).unwrap();
        e.payload_mut()[0] = 0x00;
        assert_eq!(e.finish(1), Ok(17));
        assert_eq!(buf, NULL_RESULT);
    }

    #[test]
    fn an_error_frame_is_parsed_and_emitted_byte_for_byte() {
        let frame = parse(&ERROR_NOENTRY).unwrap();
        assert_eq!(frame.response(), Response::Error(12));
        assert_eq!(frame.payload(), b"");
        let mut buf = [0; ERROR_FRAME_LEN];
        assert_eq!(emit_error(&mut buf, ErrorCode::NoEntry), Ok(27));
        assert_eq!(buf, ERROR_NOENTRY);
    }

    #[test]
    fn an_accepted_frame_is_parsed_and_emitted_byte_for_byte() {
        let frame = parse(&ACCEPTED).unwrap();
        assert_eq!(frame.response(), Response::Accepted);
        let mut buf = [0; ACCEPTED_FRAME_LEN];
        assert_eq!(emit_accepted(&mut buf), Ok(30));
        assert_eq!(buf, ACCEPTED);
    }

    #[test]
    fn a_stream_message_is_parsed_and_emitted_byte_for_byte() {
        let frame = parse(&MESSAGE_TRUE).unwrap();
        assert_eq!(frame.response(), Response::Payload(&[0x01, 0x01]));
        let mut buf = [0; 64];
        let mut e = begin_message(&mut buf).unwrap();
        e.payload_mut()[..2].copy_from_slice(&[0x01, 0x01]);
        assert_eq!(e.finish(2), Ok(18));
        assert_eq!(buf[..18], MESSAGE_TRUE);
    }

    #[test]
    fn every_golden_frame_is_emitted_again_byte_for_byte() {
        for golden in GOLDEN {
            let frame = parse(golden).unwrap();
            assert_eq!(frame.buffer_len(), golden.len());
            let mut buf = vec![0; golden.len()];
            assert_eq!(frame.emit(&mut buf), Ok(golden.len()));
            assert_eq!(buf, golden);
            assert_eq!(
                frame.emit(&mut buf[..golden.len() - 1]),
                Err(Error::BufferTooSmall)
            );
        }
    }

    #[test]
    fn emitted_headers_and_payload_parse_back() {
        let long_name = "n".repeat(255);
        let long_str = vec![b's'; 65_535];
        let headers = [
            ("method", HeaderValue::Str(b"first")),
            ("x-unknown", HeaderValue::I32(-7)),
            ("", HeaderValue::Str(b"")),
            (long_name.as_str(), HeaderValue::Str(&long_str)),
            ("type", HeaderValue::I32(0)),
            ("method", HeaderValue::Str(b"second")),
            ("type", HeaderValue::I32(2)),
        ];
        let payload = b"\x06\x00\x00\x00\x00";
        let len = buffer_len(&headers, payload.len());
        let mut buf = vec![0; len + 10];
        assert_eq!(emit(&mut buf, &headers, payload), Ok(len));
        let frame = parse(&buf[..len]).unwrap();
        let parsed: Vec<(&[u8], HeaderValue<'_>)> =
            frame.headers().map(|h| (h.name, h.value)).collect();
        let expected: Vec<(&[u8], HeaderValue<'_>)> =
            headers.iter().map(|&(n, v)| (n.as_bytes(), v)).collect();
        assert_eq!(parsed, expected);
        assert_eq!(frame.payload(), payload);
        // Repeated names: the last one wins.
        let request = frame.request().unwrap();
        assert_eq!(request.method, b"second");
        assert_eq!(request.kind, RequestType::Subscribe);
        assert_eq!(frame.header_i32("x-unknown"), Some(-7));
    }

    #[test]
    fn the_framer_fed_one_byte_at_a_time_yields_every_frame_once() {
        let stream: Vec<u8> = GOLDEN
            .iter()
            .chain(GOLDEN.iter().rev())
            .flat_map(|f| f.iter().copied())
            .collect();
        let mut rx = Vec::new();
        let mut seen = Vec::new();
        for &b in &stream {
            rx.push(b);
            loop {
                match frame_len(&rx, GGL_MAX_FRAME_LEN) {
                    FrameLen::NeedPrelude => break,
                    FrameLen::Len(n) if rx.len() < n => break,
                    FrameLen::Len(n) => {
                        let frame = parse(&rx[..n]).unwrap();
                        seen.push(frame.buffer_len());
                        rx.drain(..n);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert!(rx.is_empty());
        let expected: Vec<usize> = GOLDEN
            .iter()
            .chain(GOLDEN.iter().rev())
            .map(|f| f.len())
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn the_framer_waits_for_a_whole_prelude() {
        for n in 0..PRELUDE_LEN {
            assert_eq!(frame_len(&PUBLISH_CALL[..n], 10_012), FrameLen::NeedPrelude);
        }
        assert_eq!(frame_len(&PUBLISH_CALL[..12], 10_012), FrameLen::Len(99));
    }

    #[test]
    fn a_bad_prelude_crc_is_parse_and_is_checked_first() {
        let mut f = PUBLISH_CALL;
        f[8] ^= 1;
        assert_eq!(frame_len(&f, 10_012), FrameLen::Invalid(Error::PreludeCrc));
        assert_eq!(parse(&f), Err(Error::PreludeCrc));
        // Every later check would fail too; the CRC still comes first.
        let mut p = prelude_bytes(4, 0xFFFF_FFFF);
        p[11] ^= 1;
        assert_eq!(frame_len(&p, 10), FrameLen::Invalid(Error::PreludeCrc));
        assert_eq!(Error::PreludeCrc.code(), ErrorCode::Parse);
    }

    #[test]
    fn a_total_len_below_16_is_a_short_frame() {
        for total in [0, 12, 15] {
            let p = prelude_bytes(total, 0);
            assert_eq!(frame_len(&p, 10_012), FrameLen::Invalid(Error::ShortFrame));
            assert_eq!(parse(&p), Err(Error::ShortFrame));
        }
        assert_eq!(frame_len(&prelude_bytes(16, 0), 10_012), FrameLen::Len(16));
        assert_eq!(Error::ShortFrame.code(), ErrorCode::Parse);
    }

    #[test]
    fn a_headers_len_over_total_len_minus_16_is_parse_even_when_oversized() {
        let p = prelude_bytes(99, 84);
        assert_eq!(frame_len(&p, 10_012), FrameLen::Invalid(Error::HeadersLen));
        assert_eq!(frame_len(&prelude_bytes(99, 83), 10_012), FrameLen::Len(99));
        let p = prelude_bytes(1_000_000, 999_985);
        assert_eq!(frame_len(&p, 10_012), FrameLen::Invalid(Error::HeadersLen));
        let mut f = PUBLISH_CALL;
        f[4..8].copy_from_slice(&84u32.to_be_bytes());
        fix_crcs(&mut f);
        assert_eq!(parse(&f), Err(Error::HeadersLen));
        assert_eq!(Error::HeadersLen.code(), ErrorCode::Parse);
    }

    #[test]
    fn an_oversized_frame_with_a_valid_prelude_reports_its_length() {
        let p = prelude_bytes(20_000, 10);
        assert_eq!(
            frame_len(&p, 10_012),
            FrameLen::Oversized { total_len: 20_000 }
        );
        let p = prelude_bytes(u32::MAX, 0);
        assert_eq!(
            frame_len(&p, 1 << 20),
            FrameLen::Oversized {
                total_len: u32::MAX as usize
            }
        );
        // Exactly at the limit is fine.
        assert_eq!(
            frame_len(&prelude_bytes(10_012, 0), 10_012),
            FrameLen::Len(10_012)
        );
        assert_eq!(
            frame_len(&prelude_bytes(10_013, 0), 10_012),
            FrameLen::Oversized { total_len: 10_013 }
        );
        assert_eq!(Error::Oversized.code(), ErrorCode::NoMem);
    }

    #[test]
    fn a_bad_message_crc_is_parse() {
        for at in [12, 50, 94, 95, 98] {
            let mut f = PUBLISH_CALL;
            f[at] ^= 0x80;
            assert_eq!(parse(&f), Err(Error::MessageCrc), "byte {at}");
        }
        assert_eq!(Error::MessageCrc.code(), ErrorCode::Parse);
    }

    #[test]
    fn a_truncated_or_overlong_buffer_is_parse() {
        for n in 0..PUBLISH_CALL.len() {
            let e = parse(&PUBLISH_CALL[..n]).unwrap_err();
            assert_eq!(e, Error::Truncated, "{n} bytes");
            assert_eq!(e.code(), ErrorCode::Parse);
        }
        let mut long = PUBLISH_CALL.to_vec();
        long.push(0);
        assert_eq!(parse(&long), Err(Error::TrailingBytes));
        assert_eq!(Error::TrailingBytes.code(), ErrorCode::Parse);
    }

    #[test]
    fn a_header_type_other_than_int32_or_string_is_parse() {
        for kind in [0u8, 1, 2, 3, 5, 6, 8, 9, 0xFF] {
            let f = raw_frame(&[1, b'x', kind, 0, 0, 0, 0, 0, 0, 0, 0], b"");
            assert_eq!(parse(&f), Err(Error::HeaderType(kind)));
        }
        assert_eq!(Error::HeaderType(6).code(), ErrorCode::Parse);
    }

    #[test]
    fn a_header_block_not_ending_exactly_at_headers_len_is_parse() {
        // One byte short: the `type` value runs past the block.
        let mut f = PUBLISH_CALL;
        f[4..8].copy_from_slice(&26u32.to_be_bytes());
        fix_crcs(&mut f);
        assert_eq!(parse(&f), Err(Error::HeaderLayout));
        // One byte long: the map tag 0x06 is read as a name length.
        f[4..8].copy_from_slice(&28u32.to_be_bytes());
        fix_crcs(&mut f);
        assert_eq!(parse(&f), Err(Error::HeaderLayout));
        // Each way a header can stop short.
        let cuts: [&[u8]; 6] = [
            &[3, b'a', b'b'],
            &[1, b'a'],
            &[1, b'a', 4, 0, 0, 0],
            &[1, b'a', 7, 0],
            &[1, b'a', 7, 0, 2, b'x'],
            &[0, 4, 0, 0, 0, 1, 2],
        ];
        for block in cuts {
            assert_eq!(
                parse(&raw_frame(block, b"")),
                Err(Error::HeaderLayout),
                "{block:?}"
            );
        }
        assert_eq!(Error::HeaderLayout.code(), ErrorCode::Parse);
    }

    #[test]
    fn a_request_without_good_method_and_type_headers_is_invalid() {
        let mut buf = [0; 128];
        let cases: [(&[(&str, HeaderValue<'_>)], Error); 6] = [
            (
                &[("type", HeaderValue::I32(1))],
                Error::MissingHeader("method"),
            ),
            (
                &[("method", HeaderValue::Str(b"publish"))],
                Error::MissingHeader("type"),
            ),
            (
                &[
                    ("method", HeaderValue::I32(1)),
                    ("type", HeaderValue::I32(1)),
                ],
                Error::BadHeader("method"),
            ),
            (
                &[
                    ("method", HeaderValue::Str(b"p")),
                    ("type", HeaderValue::Str(b"1")),
                ],
                Error::BadHeader("type"),
            ),
            (
                &[
                    ("method", HeaderValue::Str(b"p")),
                    ("type", HeaderValue::I32(3)),
                ],
                Error::BadHeader("type"),
            ),
            // A bad header is not rescued by a later good one (GGL refuses it too).
            (
                &[
                    ("type", HeaderValue::I32(-1)),
                    ("method", HeaderValue::Str(b"p")),
                    ("type", HeaderValue::I32(1)),
                ],
                Error::BadHeader("type"),
            ),
        ];
        for (headers, expected) in cases {
            let n = emit(&mut buf, headers, b"").unwrap();
            let frame = parse(&buf[..n]).unwrap();
            assert_eq!(frame.request(), Err(expected));
            assert_eq!(expected.code(), ErrorCode::Invalid);
        }
    }

    #[test]
    fn a_response_is_read_the_way_ggl_clients_read_it() {
        let mut buf = [0; 64];
        let n = emit(&mut buf, &[("error", HeaderValue::Str(b"x"))], b"").unwrap();
        assert_eq!(parse(&buf[..n]).unwrap().response(), Response::Error(1));
        let n = emit(&mut buf, &[("accepted", HeaderValue::I32(0))], b"\x00").unwrap();
        assert_eq!(
            parse(&buf[..n]).unwrap().response(),
            Response::Payload(b"\x00")
        );
        let n = emit(
            &mut buf,
            &[
                ("accepted", HeaderValue::I32(1)),
                ("error", HeaderValue::I32(3)),
            ],
            b"",
        )
        .unwrap();
        assert_eq!(parse(&buf[..n]).unwrap().response(), Response::Error(3));
    }

    #[test]
    fn error_codes_have_their_wire_values_and_names() {
        let names = [
            "FAILURE",
            "RETRY",
            "BUSY",
            "FATAL",
            "INVALID",
            "UNSUPPORTED",
            "PARSE",
            "RANGE",
            "NOMEM",
            "NOCONN",
            "NODATA",
            "NOENTRY",
            "CONFIG",
            "REMOTE",
            "EXPECTED",
            "TIMEOUT",
            "UNAUTHORIZED",
            "CONFLICT",
        ];
        for (i, name) in (1..).zip(names) {
            let code = ErrorCode::from_i32(i).unwrap();
            assert_eq!(code.as_i32(), i);
            assert_eq!(code.name(), name);
            assert_eq!(code.to_string(), name);
        }
        assert_eq!(ErrorCode::from_i32(0), None);
        assert_eq!(ErrorCode::from_i32(19), None);
        assert_eq!(ErrorCode::from_i32(-1), None);
    }

    #[test]
    fn emitting_into_a_short_buffer_or_with_oversized_fields_fails_cleanly() {
        for n in 0..ERROR_FRAME_LEN {
            assert_eq!(
                emit_error(&mut vec![0; n], ErrorCode::Busy),
                Err(Error::BufferTooSmall)
            );
        }
        for n in 0..ACCEPTED_FRAME_LEN {
            assert_eq!(emit_accepted(&mut vec![0; n]), Err(Error::BufferTooSmall));
        }
        for n in 0..99 {
            let mut buf = vec![0; n];
            let result =
                begin_request(&mut buf, b"publish", RequestType::Call).and_then(|e| e.finish(56));
            assert_eq!(result, Err(Error::BufferTooSmall), "{n} bytes");
        }
        let mut buf = vec![0; 70_000];
        let long_name = "n".repeat(256);
        assert_eq!(
            Emitter::new(&mut buf, &[(&long_name, HeaderValue::I32(0))]).err(),
            Some(Error::TooLong)
        );
        let long_str = vec![0; 65_536];
        assert_eq!(
            Emitter::new(&mut buf, &[("s", HeaderValue::Str(&long_str))]).err(),
            Some(Error::TooLong)
        );
        let e = begin_result(&mut buf).unwrap();
        assert_eq!(e.finish(usize::MAX), Err(Error::BufferTooSmall));
        assert_eq!(Error::BufferTooSmall.code(), ErrorCode::NoMem);
        assert_eq!(Error::TooLong.code(), ErrorCode::Range);
    }

    #[test]
    fn errors_display_one_clear_line() {
        assert_eq!(
            Error::HeaderType(9).to_string(),
            "unsupported header value type 9"
        );
        assert_eq!(
            Error::MissingHeader("method").to_string(),
            "missing method header"
        );
        assert_eq!(Error::PreludeCrc.to_string(), "bad prelude CRC");
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
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut buf = vec![0u8; 256];
        let (mut ok, mut failed) = (0, 0);
        for round in 0..200_000 {
            let golden = GOLDEN[round % GOLDEN.len()];
            let mut f = golden.to_vec();
            for _ in 0..1 + xorshift(&mut rng) % 4 {
                let r = xorshift(&mut rng);
                let at = (r >> 8) as usize % f.len().max(1);
                match r % 5 {
                    0 if !f.is_empty() => f[at] ^= 1 << ((r >> 32) % 8),
                    1 if !f.is_empty() => f[at] = r.to_le_bytes()[5],
                    2 => f.truncate(at),
                    3 => f.insert(at.min(f.len()), r.to_le_bytes()[3]),
                    _ => f.push(r.to_le_bytes()[2]),
                }
            }
            // Half the time, make the CRCs right so later checks are reached.
            if round % 2 == 0 && f.len() >= 16 {
                fix_crcs(&mut f);
            }
            let _ = frame_len(&f, 10_012);
            let Ok(frame) = parse(&f) else {
                failed += 1;
                continue;
            };
            ok += 1;
            assert_eq!(frame_len(&f, usize::MAX), FrameLen::Len(f.len()));
            for h in frame.headers() {
                let _ = (h.name, h.value);
            }
            let _ = frame.request();
            let _ = frame.response();
            let _ = frame.header_str("method");
            let _ = frame.header_i32("type");
            let n = frame.emit(&mut buf).unwrap();
            assert_eq!(&buf[..n], &f[..]);
        }
        assert!(ok > 1_000 && failed > 1_000, "ok {ok}, failed {failed}");
    }
}
