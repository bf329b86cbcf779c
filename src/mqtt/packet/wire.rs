//! Cursors over a packet: `Reader` checks every length before it reads;
//! `Writer` writes across a ring's end when asked to.

use super::*;

/// A cursor over a packet body; every read checks the length first.
#[derive(Clone, Debug)]
pub(super) struct Reader<'a> {
    pub(super) rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { rest: buf }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(super) fn u8(&mut self) -> Result<u8, Error> {
        let (&b, rest) = self.rest.split_first().ok_or(Error::Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    pub(super) fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    pub(super) fn packet_id(&mut self) -> Result<u16, Error> {
        let id = self.u16()?;
        check_packet_id(id)?;
        Ok(id)
    }

    pub(super) fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.rest.len() {
            return Err(Error::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// Two-byte length, then that many bytes [1.5.3].
    pub(super) fn binary(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    /// A UTF-8 string without U+0000 [MQTT-1.5.3-1], [MQTT-1.5.3-2].
    pub(super) fn string(&mut self) -> Result<&'a str, Error> {
        let s = str::from_utf8(self.binary()?).map_err(|_| Error::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(Error::InvalidUtf8);
        }
        Ok(s)
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.rest)
    }

    /// An MQTT 5 property block of a packet of type `ptype`: its length (a
    /// Variable Byte Integer), then the properties [MQTT5-2.2.2].
    pub(super) fn properties(&mut self, ptype: u8) -> Result<Props<'a>, Error> {
        let (len, used) = props::read_varint(self.rest).ok_or(if self.rest.len() < 4 {
            Error::Truncated
        } else {
            Error::BadRemainingLength
        })?;
        self.bytes(used)?;
        let len = usize::try_from(len).map_err(|_| Error::Truncated)?;
        let bytes = self.bytes(len)?;
        Ok(Props::parse(bytes, Context(ptype))?)
    }

    /// The reason code and property block that end a PUBACK or
    /// DISCONNECT, each of which MQTT 5 lets the sender leave out (reason
    /// 0x00, no properties) [MQTT5-3.4.2.1]; nothing in 3.1.1.
    pub(super) fn optional_reason(
        &mut self,
        ptype: u8,
        version: Version,
    ) -> Result<(u8, Option<Props<'a>>), Error> {
        if version == Version::V311 {
            return Ok((0, None));
        }
        if self.is_empty() {
            return Ok((0, Some(Props::EMPTY)));
        }
        let reason = self.u8()?;
        if self.is_empty() {
            return Ok((reason, Some(Props::EMPTY)));
        }
        Ok((reason, Some(self.properties(ptype)?)))
    }

    pub(super) fn finish(&self) -> Result<(), Error> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::TrailingBytes)
        }
    }
}

/// A cursor over an output buffer; every write checks the length first.
/// Writes into `first`, then on into `second` (empty unless the caller
/// writes across a ring's end); `pos` counts over both.
pub(super) struct Writer<'b> {
    first: &'b mut [u8],
    second: &'b mut [u8],
    pub(super) pos: usize,
}

impl<'b> Writer<'b> {
    pub(super) fn new(buf: &'b mut [u8]) -> Self {
        Self::split(buf, &mut [])
    }

    pub(super) fn split(first: &'b mut [u8], second: &'b mut [u8]) -> Self {
        Self {
            first,
            second,
            pos: 0,
        }
    }

    pub(super) fn bytes(&mut self, b: &[u8]) -> Result<(), Error> {
        let end = self.pos.checked_add(b.len()).ok_or(Error::BufferTooSmall)?;
        // Almost always: `first` has room.
        if let Some(dst) = self.first.get_mut(self.pos..end) {
            dst.copy_from_slice(b);
            self.pos = end;
            return Ok(());
        }
        self.bytes_across(b, end)
    }

    /// `bytes` for what goes past `first`'s end: on into `second`.
    #[cold]
    pub(super) fn bytes_across(&mut self, b: &[u8], end: usize) -> Result<(), Error> {
        if end > self.first.len().saturating_add(self.second.len()) {
            return Err(Error::BufferTooSmall);
        }
        // Cannot panic: `end` fits the two slices together.
        let in_first = self.first.len().saturating_sub(self.pos).min(b.len());
        let (a, rest) = b.split_at(in_first);
        if let Some(dst) = self.first.get_mut(self.pos..self.pos + in_first) {
            dst.copy_from_slice(a);
        }
        let at = (self.pos + in_first).saturating_sub(self.first.len());
        if let Some(dst) = self.second.get_mut(at..at + rest.len()) {
            dst.copy_from_slice(rest);
        }
        self.pos = end;
        Ok(())
    }

    pub(super) fn u8(&mut self, b: u8) -> Result<(), Error> {
        self.bytes(&[b])
    }

    pub(super) fn u16(&mut self, v: u16) -> Result<(), Error> {
        self.bytes(&v.to_be_bytes())
    }

    pub(super) fn binary(&mut self, b: &[u8]) -> Result<(), Error> {
        let n = u16::try_from(b.len()).map_err(|_| Error::TooLong)?;
        self.u16(n)?;
        self.bytes(b)
    }

    pub(super) fn string(&mut self, s: &str) -> Result<(), Error> {
        self.binary(s.as_bytes())
    }

    /// A property block with its length; nothing for `None` (3.1.1).
    pub(super) fn properties(&mut self, properties: Option<Props<'_>>) -> Result<(), Error> {
        if let Some(p) = properties {
            self.remaining_len(p.bytes().len())?;
            self.bytes(p.bytes())?;
        }
        Ok(())
    }

    /// The shortest form of an optional reason code and property block.
    pub(super) fn optional_reason(
        &mut self,
        reason: u8,
        properties: Option<Props<'_>>,
    ) -> Result<(), Error> {
        match properties {
            None => Ok(()),
            Some(p) if p.is_empty() => {
                if reason != 0 {
                    self.u8(reason)?;
                }
                Ok(())
            }
            Some(p) => {
                self.u8(reason)?;
                self.properties(Some(p))
            }
        }
    }

    /// Seven bits per byte, least significant first, bit 7 = more [2.2.3].
    pub(super) fn remaining_len(&mut self, mut rl: usize) -> Result<(), Error> {
        loop {
            // The low seven bits, taken without a truncating cast.
            let [low, ..] = rl.to_le_bytes();
            let mut byte = low & 0x7F;
            rl >>= 7;
            if rl != 0 {
                byte |= 0x80;
            }
            self.u8(byte)?;
            if rl == 0 {
                return Ok(());
            }
        }
    }
}
