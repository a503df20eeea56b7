//! An HPACK decoder (RFC 7541) for one direction of an HTTP/2 connection: the static table, the
//! dynamic table with its size updates and evictions, and Huffman-coded strings.
//!
//! Passive: it decodes what an encoder on the wire sent, and has no say in the table size. A
//! size update above the cap the caller sets is refused (the connection stops being read)
//! rather than letting one peer make the agent hold a large table. Bad input is an error, never
//! a panic; once a block fails, the table no longer matches the peer's and the caller must stop
//! decoding this direction.

use std::collections::VecDeque;

use super::huffman;

/// Per-entry overhead that RFC 7541 section 4.1 counts in a table's size.
const ENTRY_OVERHEAD: usize = 32;

/// The dynamic table size both ends start with (RFC 9113 section 6.5.2).
pub(crate) const INITIAL_TABLE_SIZE: usize = 4096;

/// Why a header block could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HpackError {
    /// An index outside the tables, a truncated or oversized integer or string, invalid
    /// Huffman, or a size update after a field.
    Invalid,
    /// A dynamic table size update above the cap.
    TableSizeTooLarge,
}

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// One direction's decoding context.
#[derive(Debug)]
pub(crate) struct Decoder {
    /// Newest entry first: dynamic index 62 is `entries[0]`.
    entries: VecDeque<Entry>,
    /// The table size as RFC 7541 counts it (lengths plus 32 per entry).
    size: usize,
    max_size: usize,
    cap: usize,
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Decoder {
    /// `cap`: the largest dynamic table size accepted in a size update.
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size: INITIAL_TABLE_SIZE.min(cap),
            cap,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Bytes held by the dynamic table and the scratch buffers.
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.size + self.name_buf.capacity() + self.value_buf.capacity()
    }

    /// Decodes one complete header block, calling `field` with each name and value in order.
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut fields_seen = false;
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                // Indexed field (section 6.1).
                let index = read_int(block, &mut pos, 7)?;
                let (name, value) = lookup(&self.entries, index)?;
                field(name, value);
                fields_seen = true;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (section 6.3): only before the block's fields.
                let size = read_int(block, &mut pos, 5)?;
                if fields_seen {
                    return Err(HpackError::Invalid);
                }
                if size > self.cap {
                    return Err(HpackError::TableSizeTooLarge);
                }
                self.max_size = size;
                self.evict_to(size);
            } else {
                // Literal with incremental indexing (6.2.1), without indexing (6.2.2) or never
                // indexed (6.2.3).
                let indexing = first & 0xc0 == 0x40;
                let prefix = if indexing { 6 } else { 4 };
                let index = read_int(block, &mut pos, prefix)?;
                let Self {
                    entries,
                    name_buf,
                    value_buf,
                    ..
                } = self;
                let literal_name = if index == 0 {
                    Some(read_string(block, &mut pos, name_buf)?)
                } else {
                    None
                };
                let value = read_string(block, &mut pos, value_buf)?;
                let name = match literal_name {
                    Some(name) => name,
                    None => lookup(entries, index)?.0,
                };
                field(name, value);
                if indexing {
                    let entry = (Box::<[u8]>::from(name), Box::<[u8]>::from(value));
                    self.insert(entry);
                }
                fields_seen = true;
            }
        }
        Ok(())
    }

    fn insert(&mut self, entry: Entry) {
        let entry_size = entry.0.len() + entry.1.len() + ENTRY_OVERHEAD;
        if entry_size > self.max_size {
            // Not an error: the table is emptied (section 4.4).
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max_size - entry_size);
        self.size += entry_size;
        self.entries.push_front(entry);
    }

    fn evict_to(&mut self, size: usize) {
        while self.size > size {
            let Some((name, value)) = self.entries.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }

    #[cfg(test)]
    pub(crate) fn table(&self) -> (Vec<(String, String)>, usize) {
        let entries = self
            .entries
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        (entries, self.size)
    }
}

/// The field at `index` of the static table followed by the dynamic one (section 2.3.3).
fn lookup(entries: &VecDeque<Entry>, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
    if index == 0 {
        return Err(HpackError::Invalid);
    }
    if let Some(&(name, value)) = STATIC_TABLE.get(index - 1) {
        return Ok((name.as_bytes(), value.as_bytes()));
    }
    entries
        .get(index - STATIC_TABLE.len() - 1)
        .map(|(name, value)| (&name[..], &value[..]))
        .ok_or(HpackError::Invalid)
}

/// An integer with an N-bit prefix (section 5.1), at most 2^32 - 1.
fn read_int(block: &[u8], pos: &mut usize, prefix_bits: u8) -> Result<usize, HpackError> {
    let mask = (1u8 << prefix_bits) - 1;
    let first = *block.get(*pos).ok_or(HpackError::Invalid)? & mask;
    *pos += 1;
    if first < mask {
        return Ok(usize::from(first));
    }
    let mut value = u64::from(mask);
    let mut shift = 0u32;
    loop {
        let byte = *block.get(*pos).ok_or(HpackError::Invalid)?;
        *pos += 1;
        value += u64::from(byte & 0x7f) << shift;
        if value > u64::from(u32::MAX) {
            return Err(HpackError::Invalid);
        }
        if byte & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| HpackError::Invalid);
        }
        shift += 7;
        if shift > 28 {
            return Err(HpackError::Invalid);
        }
    }
}

/// A string literal (section 5.2): raw strings are borrowed from the block, Huffman-coded ones
/// decoded into `buf`.
fn read_string<'b>(
    block: &'b [u8],
    pos: &mut usize,
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8], HpackError> {
    let huffman = *block.get(*pos).ok_or(HpackError::Invalid)? & 0x80 != 0;
    let len = read_int(block, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Invalid)?;
    let raw = block.get(*pos..end).ok_or(HpackError::Invalid)?;
    *pos = end;
    if !huffman {
        return Ok(raw);
    }
    buf.clear();
    huffman::decode(raw, buf).map_err(|_| HpackError::Invalid)?;
    Ok(&buf[..])
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// A small HPACK encoder for tests: it uses the static and dynamic tables the way real encoders
/// do, so that decoding is tested against blocks that depend on earlier ones.
#[cfg(test)]
pub(crate) mod test_encoder {
    use std::collections::VecDeque;

    use super::{ENTRY_OVERHEAD, STATIC_TABLE, huffman};

    #[derive(Debug)]
    pub(crate) struct Encoder {
        entries: VecDeque<(Vec<u8>, Vec<u8>)>,
        size: usize,
        max_size: usize,
        pub(crate) huffman: bool,
        pending_update: Option<usize>,
    }

    impl Default for Encoder {
        fn default() -> Self {
            Self {
                entries: VecDeque::new(),
                size: 0,
                max_size: super::INITIAL_TABLE_SIZE,
                huffman: true,
                pending_update: None,
            }
        }
    }

    pub(crate) fn int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut value: usize) {
        let mask = (1usize << prefix_bits) - 1;
        if value < mask {
            out.push(first | value as u8);
            return;
        }
        out.push(first | mask as u8);
        value -= mask;
        while value >= 0x80 {
            out.push((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    impl Encoder {
        /// The next block starts with a size update to `size`.
        pub(crate) fn resize(&mut self, size: usize) {
            self.pending_update = Some(size);
        }

        fn string(&self, out: &mut Vec<u8>, s: &[u8]) {
            if self.huffman {
                let coded = huffman::encode(s);
                int(out, 0x80, 7, coded.len());
                out.extend_from_slice(&coded);
            } else {
                int(out, 0, 7, s.len());
                out.extend_from_slice(s);
            }
        }

        fn find(&self, name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
            let mut name_index = None;
            let dynamic = self
                .entries
                .iter()
                .map(|(n, v)| (&n[..], &v[..]))
                .enumerate()
                .map(|(i, e)| (i + STATIC_TABLE.len() + 1, e));
            let fixed = STATIC_TABLE
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                .enumerate()
                .map(|(i, e)| (i + 1, e));
            for (index, (n, v)) in fixed.chain(dynamic) {
                if n == name {
                    if v == value {
                        return (Some(index), Some(index));
                    }
                    name_index.get_or_insert(index);
                }
            }
            (None, name_index)
        }

        /// Encodes fields; each is indexed when possible, else added to the table
        /// (`sensitive` fields are never indexed).
        pub(crate) fn encode(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
            let mut out = Vec::new();
            if let Some(size) = self.pending_update.take() {
                int(&mut out, 0x20, 5, size);
                self.max_size = size;
                self.evict_to(size);
            }
            for &(name, value) in fields {
                let (name, value) = (name.as_bytes(), value.as_bytes());
                match self.find(name, value) {
                    (Some(index), _) => int(&mut out, 0x80, 7, index),
                    (None, name_index) if name == b"authorization" => {
                        int(&mut out, 0x10, 4, name_index.unwrap_or(0));
                        if name_index.is_none() {
                            self.string(&mut out, name);
                        }
                        self.string(&mut out, value);
                    }
                    (None, name_index) => {
                        int(&mut out, 0x40, 6, name_index.unwrap_or(0));
                        if name_index.is_none() {
                            self.string(&mut out, name);
                        }
                        self.string(&mut out, value);
                        let entry_size = name.len() + value.len() + ENTRY_OVERHEAD;
                        if entry_size > self.max_size {
                            self.evict_to(0);
                        } else {
                            self.evict_to(self.max_size - entry_size);
                            self.size += entry_size;
                            self.entries.push_front((name.to_vec(), value.to_vec()));
                        }
                    }
                }
            }
            out
        }

        fn evict_to(&mut self, size: usize) {
            while self.size > size {
                let Some((n, v)) = self.entries.pop_back() else {
                    break;
                };
                self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{test_encoder::Encoder, *};

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| {
                u8::from_str_radix(std::str::from_utf8(pair).expect("test data"), 16)
                    .expect("test data")
            })
            .collect()
    }

    fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut fields = Vec::new();
        decoder.decode(block, |n, v| {
            fields.push((
                String::from_utf8(n.to_vec()).expect("test data"),
                String::from_utf8(v.to_vec()).expect("test data"),
            ));
        })?;
        Ok(fields)
    }

    fn owned(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rfc_7541_c2_literal_representations() {
        // C.2.1: literal with indexing, new name.
        let mut d = Decoder::new(65536);
        let got = decode(
            &mut d,
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
        )
        .expect("test data");
        assert_eq!(got, owned(&[("custom-key", "custom-header")]));
        assert_eq!(d.table().1, 55);
        // C.2.2: literal without indexing, indexed name.
        let mut d = Decoder::new(65536);
        let got = decode(&mut d, &hex("040c 2f73 616d 706c 652f 7061 7468")).expect("test data");
        assert_eq!(got, owned(&[(":path", "/sample/path")]));
        assert_eq!(d.table().1, 0);
        // C.2.3: never indexed, new name.
        let got =
            decode(&mut d, &hex("1008 7061 7373 776f 7264 0673 6563 7265 74")).expect("test data");
        assert_eq!(got, owned(&[("password", "secret")]));
        assert_eq!(d.table().1, 0);
        // C.2.4: indexed field.
        assert_eq!(
            decode(&mut d, &hex("82")).expect("test data"),
            owned(&[(":method", "GET")])
        );
    }

    /// C.3 (raw strings) and C.4 (Huffman): three requests on one connection.
    #[test]
    fn rfc_7541_c3_c4_requests() {
        let blocks = [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            ],
            [
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8286 84be 5886 a8eb 1064 9cbf",
            ],
            [
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ];
        let first = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        let mut second = first.to_vec();
        second.push(("cache-control", "no-cache"));
        let third = [
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ];
        let sizes = [57, 110, 164];
        for coding in 0..2 {
            let mut d = Decoder::new(65536);
            let want: [Vec<(&str, &str)>; 3] = [first.to_vec(), second.clone(), third.to_vec()];
            for (i, block) in blocks.iter().enumerate() {
                let got = decode(&mut d, &hex(block[coding])).expect("test data");
                assert_eq!(got, owned(&want[i]), "C.{}.{}", 3 + coding, i + 1);
                assert_eq!(d.table().1, sizes[i]);
            }
            assert_eq!(
                d.table().0,
                owned(&[
                    ("custom-key", "custom-value"),
                    ("cache-control", "no-cache"),
                    (":authority", "www.example.com"),
                ])
            );
        }
    }

    /// C.5 (raw) and C.6 (Huffman): three responses with a 256-byte table, so entries are
    /// evicted.
    #[test]
    fn rfc_7541_c5_c6_responses_with_eviction() {
        let blocks = [
            [
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
                 6c65 2e63 6f6d",
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
                 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            ],
            ["4803 3330 37c1 c0bf", "4883 640e ffc1 c0bf"],
            [
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
                 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
                 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
                 3d31",
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
                 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
                 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ],
        ];
        let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
        let date2 = "Mon, 21 Oct 2013 20:13:22 GMT";
        let location = "https://www.example.com";
        let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
        let want = [
            owned(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", date1),
                ("location", location),
            ]),
            owned(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", date1),
                ("location", location),
            ]),
            owned(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", date2),
                ("location", location),
                ("content-encoding", "gzip"),
                ("set-cookie", cookie),
            ]),
        ];
        let sizes = [222, 222, 215];
        for coding in 0..2 {
            let mut d = Decoder::new(65536);
            d.max_size = 256;
            for (i, block) in blocks.iter().enumerate() {
                let got = decode(&mut d, &hex(block[coding])).expect("test data");
                assert_eq!(got, want[i], "C.{}.{}", 5 + coding, i + 1);
                assert_eq!(d.table().1, sizes[i], "C.{}.{}", 5 + coding, i + 1);
            }
            assert_eq!(
                d.table().0,
                owned(&[
                    ("set-cookie", cookie),
                    ("content-encoding", "gzip"),
                    ("date", date2),
                ])
            );
        }
    }

    #[test]
    fn size_updates_and_errors() {
        let mut d = Decoder::new(8192);
        // Index 62 with an empty dynamic table.
        assert_eq!(decode(&mut d, &hex("be")), Err(HpackError::Invalid));
        assert_eq!(decode(&mut d, &hex("80")), Err(HpackError::Invalid));
        // A truncated literal.
        assert_eq!(decode(&mut d, &hex("4005 6162")), Err(HpackError::Invalid));
        // An integer that does not end.
        assert_eq!(
            decode(&mut d, &hex("ffff ffff ffff ff")),
            Err(HpackError::Invalid)
        );
        // Size updates: within the cap, then above it, then after a field.
        assert_eq!(decode(&mut d, &hex("3fe1 3f")).expect("test data"), vec![]);
        assert_eq!(d.max_size, 8192);
        assert_eq!(
            decode(&mut d, &hex("3fe2 3f")),
            Err(HpackError::TableSizeTooLarge)
        );
        assert_eq!(decode(&mut d, &hex("8220")), Err(HpackError::Invalid));
        // A size update to 0 empties the table.
        let mut e = Encoder::default();
        let block = e.encode(&[("x-a", "1")]);
        decode(&mut d, &block).expect("test data");
        assert_eq!(d.table().0.len(), 1);
        decode(&mut d, &hex("20")).expect("test data");
        assert_eq!(d.table(), (vec![], 0));
    }

    proptest! {
        #[test]
        fn encoder_round_trip(
            lists in proptest::collection::vec(
                proptest::collection::vec(("[a-e]{1,3}", "[a-z0-9 ]{0,40}"), 0..8), 1..20),
            huffman in any::<bool>(),
            resize in proptest::option::of(0usize..600),
        ) {
            let mut e = Encoder::default();
            e.huffman = huffman;
            let mut d = Decoder::new(65536);
            for (i, list) in lists.iter().enumerate() {
                if i == 1 && let Some(size) = resize {
                    e.resize(size);
                }
                let fields: Vec<(&str, &str)> =
                    list.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                let block = e.encode(&fields);
                prop_assert_eq!(decode(&mut d, &block).expect("test data"), owned(&fields));
            }
        }

        #[test]
        fn random_blocks_never_panic_and_stay_bounded(
            blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..10)
        ) {
            let mut d = Decoder::new(4096);
            for block in blocks {
                let _ = d.decode(&block, |_, _| {});
                prop_assert!(d.size <= d.max_size && d.max_size <= 4096);
            }
        }
    }
}
