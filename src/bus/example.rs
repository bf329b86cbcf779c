//! The worked example of `spec/core-bus.md` section 5, written out once:
//! call `publish` with `{topic: "a/b", payload: "hi", qos: 1}`, 99 bytes.
//!
//! A test fixture, hidden from the documentation and not an API: the codecs'
//! unit tests (`frame`, `object`), iotcorectl's and the end-to-end tests
//! (`tests/bus.rs`) all check against these bytes. They are the spec's, byte
//! for byte; a change here is a change of the spec.

/// The whole frame: prelude, headers `method` and `type`, params, CRC.
pub const PUBLISH_CALL: [u8; 99] = [
    0x00, 0x00, 0x00, 0x63, // total_len = 99
    0x00, 0x00, 0x00, 0x1b, // headers_len = 27
    0x31, 0xd5, 0x1b, 0x18, // prelude CRC
    0x06, b'm', b'e', b't', b'h', b'o', b'd', // name "method"
    0x07, 0x00, 0x07, b'p', b'u', b'b', b'l', b'i', b's', b'h', // string "publish"
    0x04, b't', b'y', b'p', b'e', // name "type"
    0x04, 0x00, 0x00, 0x00, 0x01, // int32 1 = call
    0x06, 0x03, 0x00, 0x00, 0x00, // map, 3 entries
    0x05, 0x00, 0x00, 0x00, b't', b'o', b'p', b'i', b'c', // key "topic"
    0x04, 0x03, 0x00, 0x00, 0x00, b'a', b'/', b'b', // buffer "a/b"
    0x07, 0x00, 0x00, 0x00, b'p', b'a', b'y', b'l', b'o', b'a', b'd', // key "payload"
    0x04, 0x02, 0x00, 0x00, 0x00, b'h', b'i', // buffer "hi"
    0x03, 0x00, 0x00, 0x00, b'q', b'o', b's', // key "qos"
    0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // i64 1
    0x66, 0xdd, 0xcd, 0x27, // message CRC
];

/// The params map alone (56 bytes): what follows the 12-byte prelude and the
/// 27 bytes of headers, up to the 4-byte message CRC.
pub const PUBLISH_PARAMS: &[u8] = PUBLISH_CALL.split_at(12 + 27).1.split_at(56).0;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::frame::crc32;

    #[test]
    fn the_params_lie_between_the_headers_and_the_message_crc() {
        assert_eq!(PUBLISH_PARAMS, &PUBLISH_CALL[39..95]);
        assert_eq!(PUBLISH_PARAMS.first(), Some(&0x06));
        assert_eq!(crc32(&PUBLISH_CALL[..8]).to_be_bytes(), PUBLISH_CALL[8..12]);
        assert_eq!(crc32(&PUBLISH_CALL[..95]).to_be_bytes(), PUBLISH_CALL[95..]);
    }
}
