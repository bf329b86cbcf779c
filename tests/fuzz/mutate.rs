//! The seeded mutator: a copy of a corpus entry with one to four byte-level
//! mutations, sometimes spliced with another entry.

/// xorshift64*: small, fast, and the same sequence for the same seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    pub fn byte(&mut self) -> u8 {
        (self.next() >> 32) as u8
    }
}

/// Values that sit on the edges decoders check.
const INTERESTING: [u8; 10] = [0x00, 0x01, 0x02, 0x7f, 0x80, 0x81, 0xfe, 0xff, 0x20, 0x2f];
const INTERESTING_32: [u32; 8] = [0, 1, 0x7f, 0x80, 0xffff, 0x1_0000, 0x7fff_ffff, 0xffff_ffff];

pub struct Mutator {
    pub rng: Rng,
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator {
            rng: Rng::new(seed),
        }
    }

    /// Writes the next input into `out`.
    pub fn next_input(&mut self, corpus: &[Vec<u8>], out: &mut Vec<u8>) {
        let r = &mut self.rng;
        out.clear();
        out.extend_from_slice(&corpus[r.below(corpus.len())]);
        let rounds = 1 + r.below(4);
        for _ in 0..rounds {
            let len = out.len();
            match r.below(11) {
                0 if len > 0 => {
                    let i = r.below(len);
                    out[i] ^= 1 << r.below(8);
                }
                1 if len > 0 => {
                    let i = r.below(len);
                    out[i] = r.byte();
                }
                2 if len > 0 => {
                    let i = r.below(len);
                    out[i] = INTERESTING[r.below(INTERESTING.len())];
                }
                3 => {
                    let i = r.below(len + 1);
                    let n = 1 + r.below(8);
                    for _ in 0..n {
                        let b = r.byte();
                        out.insert(i.min(out.len()), b);
                    }
                }
                4 if len > 0 => {
                    let i = r.below(len);
                    let n = 1 + r.below((len - i).min(16));
                    out.drain(i..i + n);
                }
                5 if len > 0 => {
                    // Duplicate a range in place.
                    let i = r.below(len);
                    let n = 1 + r.below((len - i).min(32));
                    let chunk: Vec<u8> = out[i..i + n].to_vec();
                    let at = r.below(out.len() + 1);
                    out.splice(at..at, chunk);
                }
                6 if len > 0 => out.truncate(r.below(len)),
                7 if len >= 4 => {
                    // A 16- or 32-bit edge value, either byte order.
                    let v = INTERESTING_32[r.below(INTERESTING_32.len())];
                    let bytes = if r.below(2) == 0 {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    };
                    let width = if r.below(2) == 0 { 2 } else { 4 };
                    let i = r.below(len - width + 1);
                    out[i..i + width].copy_from_slice(&bytes[4 - width..]);
                }
                8 => {
                    // Splice: this entry's head, another's tail.
                    let other = &corpus[r.below(corpus.len())];
                    let cut = r.below(out.len() + 1);
                    let from = r.below(other.len() + 1);
                    out.truncate(cut);
                    out.extend_from_slice(&other[from..]);
                }
                9 => {
                    let n = 1 + r.below(16);
                    for _ in 0..n {
                        let b = r.byte();
                        out.push(b);
                    }
                }
                _ if len > 1 => {
                    // Swap two bytes.
                    let (i, j) = (r.below(len), r.below(len));
                    out.swap(i, j);
                }
                _ => out.push(r.byte()),
            }
            if out.len() > 1 << 16 {
                out.truncate(1 << 16);
            }
        }
    }
}
