//! The HPACK Huffman code (RFC 7541 section 5.2, Appendix B), decoded four bits at a time.
//!
//! The decoder is a state machine over the internal nodes of the code tree, built once from the
//! code table: for each state and each nibble of input it knows the next state and the symbol
//! completed on the way, if any (codes are at least 5 bits long, so a nibble completes at most
//! one). Invalid input (the EOS symbol, or padding that is not a short run of 1 bits) is an
//! error, never a panic.

use std::sync::LazyLock;

use super::huffman_codes::CODES;

/// A step of the nibble machine.
#[derive(Debug, Clone, Copy, Default)]
struct Transition {
    next: u16,
    /// The symbol completed by this nibble, or `NONE`.
    symbol: u16,
}

const NONE: u16 = u16::MAX;
/// A transition that reaches EOS: a decoding error.
const FAIL: u16 = u16::MAX - 1;

struct Machine {
    transitions: Vec<[Transition; 16]>,
    /// Whether input may end in this state: at the root, or after at most 7 bits that are all 1
    /// (a prefix of EOS, the only valid padding).
    accepting: Vec<bool>,
}

static MACHINE: LazyLock<Machine> = LazyLock::new(Machine::build);

impl Machine {
    fn build() -> Self {
        // The code tree: children of internal nodes; a child is a node index or a leaf symbol.
        #[derive(Clone, Copy)]
        enum Child {
            Empty,
            Node(u16),
            Leaf(u16),
        }
        let mut nodes: Vec<[Child; 2]> = vec![[Child::Empty; 2]];
        let mut depth_ones: Vec<(u8, bool)> = vec![(0, true)];
        for (symbol, &(code, len)) in CODES.iter().enumerate() {
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    nodes[node][bit] = Child::Leaf(symbol as u16);
                } else {
                    node = match nodes[node][bit] {
                        Child::Node(next) => usize::from(next),
                        _ => {
                            let (depth, ones) = depth_ones[node];
                            nodes.push([Child::Empty; 2]);
                            depth_ones.push((depth + 1, ones && bit == 1));
                            let next = nodes.len() - 1;
                            nodes[node][bit] = Child::Node(next as u16);
                            next
                        }
                    };
                }
            }
        }
        let mut transitions = vec![[Transition::default(); 16]; nodes.len()];
        for (state, row) in transitions.iter_mut().enumerate() {
            for (nibble, transition) in row.iter_mut().enumerate() {
                let mut node = state;
                let mut symbol = NONE;
                for i in (0..4).rev() {
                    let bit = (nibble >> i) & 1;
                    match nodes[node][bit] {
                        Child::Node(next) => node = usize::from(next),
                        Child::Leaf(256) | Child::Empty => {
                            symbol = FAIL;
                            break;
                        }
                        Child::Leaf(leaf) => {
                            symbol = leaf;
                            node = 0;
                        }
                    }
                }
                *transition = Transition {
                    next: node as u16,
                    symbol,
                };
            }
        }
        let accepting = depth_ones
            .iter()
            .map(|&(depth, ones)| depth == 0 || (ones && depth <= 7))
            .collect();
        Self {
            transitions,
            accepting,
        }
    }
}

/// The input was not a valid Huffman-coded string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct InvalidHuffman;

/// Appends the decoding of `input` to `out`.
pub(super) fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), InvalidHuffman> {
    let machine = &*MACHINE;
    let mut state = 0usize;
    // Decoded strings are at most 8/5 of the input.
    out.reserve(input.len() * 8 / 5 + 1);
    for &byte in input {
        for nibble in [byte >> 4, byte & 0x0f] {
            let Transition { next, symbol } = machine.transitions[state][usize::from(nibble)];
            match symbol {
                NONE => {}
                FAIL => return Err(InvalidHuffman),
                symbol => out.push(symbol as u8),
            }
            state = usize::from(next);
        }
    }
    if machine.accepting[state] {
        Ok(())
    } else {
        Err(InvalidHuffman)
    }
}

/// The Huffman coding of `input`, for tests that build HPACK blocks.
#[cfg(test)]
pub(super) fn encode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for &byte in input {
        let (code, len) = CODES[usize::from(byte)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        // Padded with the most significant bits of EOS (all 1).
        out.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn rfc_7541_examples() {
        // C.4.1: "www.example.com".
        let coded = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        let mut out = Vec::new();
        decode(&coded, &mut out).expect("test data");
        assert_eq!(out, b"www.example.com");
        assert_eq!(encode(b"www.example.com"), coded);
        // C.4.2: "no-cache".
        out.clear();
        decode(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], &mut out).expect("test data");
        assert_eq!(out, b"no-cache");
    }

    #[test]
    fn invalid_padding_and_eos_are_errors() {
        let mut out = Vec::new();
        // 8 bits of padding (a whole 0xff byte after a complete string).
        let mut coded = encode(b"a");
        coded.push(0xff);
        assert_eq!(decode(&coded, &mut out), Err(InvalidHuffman));
        // Padding made of 0 bits: 'a' is 00011 (5 bits), then 000.
        assert_eq!(decode(&[0x18], &mut out), Err(InvalidHuffman));
        // EOS itself (30 ones) inside the string.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
            Err(InvalidHuffman)
        );
        assert!(decode(&[], &mut out).is_ok());
    }

    proptest! {
        #[test]
        fn round_trip(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut out = Vec::new();
            decode(&encode(&input), &mut out).expect("test data");
            prop_assert_eq!(out, input);
        }

        #[test]
        fn random_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut out = Vec::new();
            let _ = decode(&input, &mut out);
            prop_assert!(out.len() <= input.len() * 8 / 5 + 1);
        }
    }
}
