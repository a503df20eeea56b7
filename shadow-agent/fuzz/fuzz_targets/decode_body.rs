//! Arbitrary bytes as a body under arbitrary content codings: decoding never panics and never
//! returns more than its caps, whatever the header says and whatever the stream holds.
//!
//! The first byte picks up to three codings (two bits each, applied in that order), the second
//! the ratio cap; the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadow_agent::compare::encoding::{Coding, DecodeLimits, codings, decode};

const ALL: [Coding; 4] = [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd];
const MAX_BYTES: usize = 64 * 1024;

fuzz_target!(|input: &[u8]| {
    let Some((&[picks, ratio], body)) = input.split_first_chunk::<2>() else {
        return;
    };
    let chain: Vec<Coding> = (0..1 + usize::from(picks >> 6).min(2))
        .map(|i| ALL[usize::from(picks >> (2 * i)) & 3])
        .collect();
    let limits = DecodeLimits {
        max_bytes: MAX_BYTES,
        max_ratio: u32::from(ratio).max(1),
    };
    if let Ok(out) = decode(&chain, body, limits) {
        assert!(out.len() <= MAX_BYTES);
        assert!(out.len() <= body.len() * limits.max_ratio as usize);
    }
    // The header reader takes any text.
    let _ = codings(&String::from_utf8_lossy(body));
});
