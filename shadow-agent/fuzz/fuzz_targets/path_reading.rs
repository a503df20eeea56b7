//! Arbitrary bytes as a request-target: reading its path never panics, and a reading is final.
//! It is `*` or absolute, one `/` at a time, without a dot segment, an escape or a control
//! byte; read again it stays (unless it holds `?`, `#` or `;`, which a path spells only
//! escaped); and respelled as nginx still serves it (every byte escaped, a `./` and a detour
//! added, slashes doubled) it reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadow_agent::policy::path::RequestPath;

fuzz_target!(|input: &[u8]| {
    let Ok(target) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(path) = RequestPath::of_target(target) else {
        return;
    };
    let reading = path.as_str();
    if reading == "*" {
        return;
    }
    assert!(reading.starts_with('/'), "{target:?} -> {reading:?}");
    assert!(!reading.contains("//"), "{target:?} -> {reading:?}");
    assert!(
        !reading.contains(['%', '\\']) && !reading.bytes().any(|b| b.is_ascii_control()),
        "{target:?} -> {reading:?}"
    );
    assert!(
        !reading.split('/').any(|s| s == "." || s == ".."),
        "{target:?} -> {reading:?}"
    );
    if !reading.contains(['?', '#', ';']) {
        assert_eq!(
            RequestPath::of_target(reading).as_ref(),
            Ok(&path),
            "{target:?}"
        );
    }
    let mut spelled = String::from("/./fuzz/..//");
    for segment in reading[1..].split('/') {
        for b in segment.bytes() {
            spelled.push_str(&format!("%{b:02X}"));
        }
        spelled.push_str("//");
    }
    // `//` after the last segment: a directory; drop it where the reading names none.
    if !reading.ends_with('/') {
        spelled.truncate(spelled.len() - 2);
    }
    assert_eq!(
        RequestPath::of_target(&spelled).as_ref(),
        Ok(&path),
        "{target:?} respelled {spelled:?}"
    );
});
