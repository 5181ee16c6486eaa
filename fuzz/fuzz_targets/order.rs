//! Access orders (SPEC §2) come from whoever can write to `desired_dir`: `order::parse` must
//! return an error, never panic, on any bytes, as TOML and as JSON.
#![no_main]

use coursegate::order::{self, FileKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let is_profile = |name: &str| matches!(name, "wim" | "pacs");
    for kind in [FileKind::Toml, FileKind::Json] {
        if let Ok(o) = order::parse(bytes, kind, &is_profile) {
            // What parse promises of a valid order.
            assert!(!o.access.is_empty());
            assert!(o.access.iter().all(|a| is_profile(a)));
            if let (Some(from), Some(until)) = (o.valid_from, o.valid_until) {
                assert!(from <= until);
            }
        }
    }
});
