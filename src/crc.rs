//! The CRC-32s: IEEE (zlib's), which frames the core bus [bus-frame-1],
//! and Castagnoli's (CRC-32C), which checks the disk spool's records and
//! headers. One table-driven implementation, a table per polynomial: at a
//! few hundred records a second a dependency with hardware acceleration
//! would buy nothing that matters here.

/// The reflected polynomials.
const IEEE: [u32; 256] = table(0xEDB8_8320);
const CASTAGNOLI: [u32; 256] = table(0x82F6_3B78);

const fn table(poly: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i: u32 = 0;
    while i < 256 {
        let mut c = i;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { poly ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i as usize] = c;
        i += 1;
    }
    t
}

/// Extends a running CRC (start with 0) over `data`.
fn extend(table: &[u32; 256], crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = table[usize::from(c.to_le_bytes()[0] ^ b)] ^ (c >> 8);
    }
    !c
}

/// CRC-32 (IEEE, zlib) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    extend(&IEEE, 0, data)
}

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    extend(&CASTAGNOLI, 0, data)
}

/// Extends a running CRC-32C (start with 0) over `data`.
pub fn crc32c_extend(crc: u32, data: &[u8]) -> u32 {
    extend(&CASTAGNOLI, crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // The usual check values, and RFC 3720 appendix B.4 for CRC-32C.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        assert_eq!((crc32(b""), crc32c(b"")), (0, 0));
    }

    #[test]
    fn extending_in_pieces_is_the_crc_of_the_whole() {
        let data = b"the quick brown fox jumps over the lazy dog";
        for cut in 0..data.len() {
            assert_eq!(
                crc32c_extend(crc32c(&data[..cut]), &data[cut..]),
                crc32c(data)
            );
        }
    }
}
