//! CRC32C (Castagnoli), as required for `PP2_TYPE_CRC32C` (spec section 2.2.3).
//!
//! A byte-at-a-time table implementation: PROXY headers are at most a few hundred bytes in
//! practice, so the hardware instruction or slicing-by-8 would buy nothing worth a
//! dependency or `unsafe`.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

/// The Castagnoli polynomial 0x1EDC6F41, bit-reversed because CRC32C is a reflected CRC.
const POLY: u32 = 0x82F6_3B78;

static TABLE: [u32; 256] = make_table();

#[allow(
    clippy::indexing_slicing,
    reason = "evaluated at compile time, where an out-of-bounds index is a build error"
)]
const fn make_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// Incremental CRC32C state, so the checksum field can be fed as zeros without copying
/// the header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crc32c(u32);

impl Crc32c {
    pub(crate) const fn new() -> Self {
        Self(!0)
    }

    pub(crate) fn update(mut self, data: &[u8]) -> Self {
        for &byte in data {
            #[allow(
                clippy::indexing_slicing,
                reason = "a u8 index is always below the table's 256 entries"
            )]
            let entry = TABLE[usize::from(self.0 as u8 ^ byte)];
            self.0 = entry ^ (self.0 >> 8);
        }
        self
    }

    pub(crate) const fn finish(self) -> u32 {
        !self.0
    }
}

/// CRC32C of `data` in one call.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    Crc32c::new().update(data).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn rfc3720_vectors() {
        // iSCSI (RFC 3720, B.4) test patterns, the other widely published CRC32C vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
    }

    #[test]
    fn incremental_matches_one_shot() {
        let data = b"The quick brown fox jumps over the lazy dog";
        let (a, b) = data.split_at(17);
        assert_eq!(Crc32c::new().update(a).update(b).finish(), crc32c(data));
        assert_eq!(crc32c(b""), 0);
    }
}
