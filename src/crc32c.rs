//! CRC-32C (Castagnoli), the checksum of the disk spool's records and
//! headers: a table-driven software version. The spool checks a few
//! hundred records a second, so a dependency with hardware acceleration
//! would buy nothing that matters here.

/// The reflected polynomial 0x1EDC6F41.
const POLY: u32 = 0x82F6_3B78;

const TABLE: [u32; 256] = table();

const fn table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i: u32 = 0;
    while i < 256 {
        let mut c = i;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { POLY ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i as usize] = c;
        i += 1;
    }
    t
}

/// Extends a running CRC (start with 0) over `data`.
pub fn extend(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = TABLE[usize::from(c.to_le_bytes()[0] ^ b)] ^ (c >> 8);
    }
    !c
}

/// The CRC of `data`.
pub fn of(data: &[u8]) -> u32 {
    extend(0, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // RFC 3720 appendix B.4 and the usual check value.
        assert_eq!(of(b"123456789"), 0xE306_9283);
        assert_eq!(of(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(of(&[0xFFu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(of(&inc), 0x46DD_794E);
        assert_eq!(of(b""), 0);
    }

    #[test]
    fn extending_in_pieces_is_the_crc_of_the_whole() {
        let data = b"the quick brown fox jumps over the lazy dog";
        for cut in 0..data.len() {
            assert_eq!(extend(of(&data[..cut]), &data[cut..]), of(data));
        }
    }
}
