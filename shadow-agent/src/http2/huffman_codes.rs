//! The HPACK Huffman code (RFC 7541 Appendix B).
//!
//! The code is canonical: ordered by length, then by symbol, each code is the previous one plus
//! one, shifted left by the growth in length. So the bit lengths alone define it, and the codes
//! are derived from them at compile time; the tests check the derived codes against values the
//! RFC lists.

/// Code length in bits of each symbol 0..=255 and of EOS (256), sixteen to a row.
#[rustfmt::skip]
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
];

/// For each symbol 0..=255 and EOS (256): its code (right-aligned) and its length in bits.
pub(super) const CODES: [(u32, u8); 257] = canonical(&LENGTHS);

/// The canonical code of `lengths` (RFC 7541's assignment: shorter codes first, ties by symbol).
const fn canonical(lengths: &[u8; 257]) -> [(u32, u8); 257] {
    let mut codes = [(0u32, 0u8); 257];
    // The code the next symbol gets; one longer is this one shifted left.
    let mut next: u32 = 0;
    let mut len: u8 = 1;
    // Lengths run from 5 to 30 bits; visit symbols length by length, in symbol order.
    while len <= 30 {
        let mut symbol = 0;
        while symbol < 257 {
            if lengths[symbol] == len {
                codes[symbol] = (next, len);
                next += 1;
            }
            symbol += 1;
        }
        next <<= 1;
        len += 1;
    }
    codes
}

#[cfg(test)]
mod tests {
    use super::CODES;

    #[test]
    fn derived_codes_are_those_rfc_7541_lists() {
        // (symbol, code, length) rows of RFC 7541 Appendix B.
        let listed: &[(usize, u32, u8)] = &[
            (0, 0x1ff8, 13),
            (b' ' as usize, 0x14, 6),
            (b'0' as usize, 0x0, 5),
            (b'a' as usize, 0x3, 5),
            (b't' as usize, 0x9, 5),
            (b'A' as usize, 0x21, 6),
            (b'{' as usize, 0x7ffe, 15),
            (b'|' as usize, 0x7fc, 11),
            (10, 0x3ffffffc, 30),
            (255, 0x3ffffee, 26),
            (256, 0x3fffffff, 30),
        ];
        for &(symbol, code, len) in listed {
            assert_eq!(CODES[symbol], (code, len), "symbol {symbol}");
        }
    }

    #[test]
    fn the_code_is_prefix_free_and_complete() {
        // Kraft's sum of a complete prefix code is exactly 1: in units of 2^-30, 2^30.
        let kraft: u64 = CODES.iter().map(|&(_, len)| 1u64 << (30 - len)).sum();
        assert_eq!(kraft, 1 << 30);
        for (a, &(code_a, len_a)) in CODES.iter().enumerate() {
            for &(code_b, len_b) in &CODES[a + 1..] {
                let len = len_a.min(len_b);
                assert_ne!(
                    code_a >> (len_a - len),
                    code_b >> (len_b - len),
                    "one code is a prefix of another"
                );
            }
        }
    }
}
