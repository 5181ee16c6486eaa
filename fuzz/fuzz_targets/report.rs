//! The course results report (SPEC §5) is an export from another system: `lms::csv::parse` must
//! turn any bytes into facts (or "unavailable"), never panic, and so must asking them.
#![no_main]

use coursegate::lms::csv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let facts = csv::parse(bytes, "csv:fuzz");
    for user in ["anna.andersson", "ANNA.Andersson ", "örjan.åström", "", " "] {
        for course in ["Wim grundkurs", "pacs grundkurs", "", "ä"] {
            let _ = facts.result(user, course);
        }
    }
    let _ = (facts.is_unavailable(), facts.problems(), facts.source());
});
