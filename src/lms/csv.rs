//! The course-results report (SPEC §5) and its CSV form.
//!
//! The learning platform exports one row per (user, course) saying whether the course was passed
//! and when. This module owns the report's rules — which headers are recognised, how `Passed` and
//! `Date` are spelled, how retakes and unreadable rows combine — in `Columns` and
//! `ReportBuilder`, and reads the CSV form of the report with them. Other forms of the same report
//! (the xlsx adapter) turn their cells into text and feed the rows to the same two types, so a rule
//! lives in exactly one place.
//!
//! Reading never fails: a file that cannot be read as a whole becomes
//! [`CourseFacts::unavailable`] (everything unknown, so nothing is granted or revoked), and a row
//! that cannot be read makes only its own (user, course) unknown.

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};

use super::{CourseFacts, Passes, course_key};

/// Reads the CSV report at `path`; `label` (e.g. `csv:lms/results.csv`) becomes the evidence
/// source. A whole-file failure names the path in its reason.
pub fn load(path: &Path, label: &str) -> CourseFacts {
    let report = std::fs::read(path)
        .map_err(|e| format!("cannot read it: {e}"))
        .and_then(|bytes| read_report(&bytes));
    match report {
        Ok(report) => report.finish(label),
        Err(why) => {
            CourseFacts::unavailable(label, format!("course report {}: {why}", path.display()))
        }
    }
}

/// Parses the bytes of a CSV report. Pure: [`load`] and the tests share it.
pub fn parse(bytes: &[u8], label: &str) -> CourseFacts {
    match read_report(bytes) {
        Ok(report) => report.finish(label),
        Err(why) => CourseFacts::unavailable(label, format!("course report: {why}")),
    }
}

/// The delimiters SPEC §5 allows, in the order they are tried on the header line.
const DELIMITERS: [u8; 2] = [b';', b','];

fn read_report(bytes: &[u8]) -> Result<ReportBuilder, String> {
    let text = decode(bytes)?;
    let (delimiter, columns) = detect_header(text)?;
    let mut reader = csv_reader(text, delimiter);
    let mut records = reader.records();
    // The first record is the header that `detect_header` already understood.
    records.next();
    let mut report = ReportBuilder::new(columns, "line");
    for record in records {
        // With the text already checked to be UTF-8 and `flexible` on, the csv crate has nothing
        // left to reject; should it still fail, the row it hid could be anyone's, so nothing from
        // this file can be trusted.
        let record = record.map_err(|e| format!("cannot be parsed as CSV: {e}"))?;
        let line = record.position().map_or(0, |p| p.line());
        let fields: Vec<&str> = record.iter().collect();
        report.add_row(line, &fields);
    }
    Ok(report)
}

/// UTF-8, with or without a byte order mark.
fn decode(bytes: &[u8]) -> Result<&str, String> {
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err("is UTF-16, not UTF-8 (export the report as \"CSV UTF-8\")".to_string());
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        format!("is not UTF-8 (invalid byte on line {line})")
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

/// Finds the delimiter under which the first record is a recognisable header.
fn detect_header(text: &str) -> Result<(u8, Columns), String> {
    // (number of header fields, why not) for the delimiter that split the line the most: its
    // complaint is the one most likely to help.
    let mut best_failure: Option<(usize, String)> = None;
    for delimiter in DELIMITERS {
        let record = match csv_reader(text, delimiter).records().next() {
            None => return Err("no recognisable header: the file is empty".to_string()),
            Some(record) => record.map_err(|e| format!("cannot be parsed as CSV: {e}"))?,
        };
        let fields: Vec<&str> = record.iter().collect();
        match Columns::find(&fields) {
            Ok(columns) => return Ok((delimiter, columns)),
            Err(why) if best_failure.as_ref().is_none_or(|(n, _)| fields.len() > *n) => {
                best_failure = Some((fields.len(), why));
            }
            Err(_) => {}
        }
    }
    let why = best_failure.map_or_else(String::new, |(_, why)| why);
    Err(format!("no recognisable header: {why}"))
}

fn csv_reader(text: &str, delimiter: u8) -> ::csv::Reader<&[u8]> {
    ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(text.as_bytes())
}

// === impl Columns ===

/// Where the four columns of the report are, found from its header row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Columns {
    user: usize,
    course: usize,
    passed: usize,
    date: usize,
    /// Fields in the header; a row with another count is unreadable.
    width: usize,
}

/// Header names (English, Swedish), compared after [`fold`].
const USER: (&str, &str) = ("Username", "Användarnamn");
const COURSE: (&str, &str) = ("Course", "Kurs");
const PASSED: (&str, &str) = ("Passed", "Godkänd");
const DATE: (&str, &str) = ("Date", "Datum");

impl Columns {
    /// Recognises a header row: all four columns, each in English or Swedish, in any order and
    /// case; other columns are ignored. The error says what is missing or ambiguous.
    pub(super) fn find<S: AsRef<str>>(header: &[S]) -> Result<Self, String> {
        let names: Vec<String> = header.iter().map(|h| fold(h.as_ref())).collect();
        let mut missing = Vec::new();
        let mut position = |(english, swedish): (&str, &str)| -> Result<Option<usize>, String> {
            let wanted = [fold(english), fold(swedish)];
            let found: Vec<usize> = (0..names.len())
                .filter(|&i| wanted.contains(&names[i]))
                .collect();
            match found[..] {
                [i] => Ok(Some(i)),
                [] => {
                    missing.push(format!("{english} ({swedish})"));
                    Ok(None)
                }
                _ => Err(format!(
                    "column {english} ({swedish}) appears {} times in the header",
                    found.len()
                )),
            }
        };
        let found = (
            position(USER)?,
            position(COURSE)?,
            position(PASSED)?,
            position(DATE)?,
        );
        if let (Some(user), Some(course), Some(passed), Some(date)) = found {
            return Ok(Columns {
                user,
                course,
                passed,
                date,
                width: header.len(),
            });
        }
        let shown: Vec<&str> = header.iter().map(|h| h.as_ref().trim()).collect();
        Err(format!(
            "the first row lacks the column(s) {} (found \"{}\"; expected \
             Username;Course;Passed;Date or Användarnamn;Kurs;Godkänd;Datum)",
            missing.join(", "),
            shown.join("\", \"")
        ))
    }

    /// What one row says, or why it cannot be read. Trimmed fields; user and course not empty.
    fn interpret(&self, fields: &[&str]) -> Result<Outcome, String> {
        if fields.len() != self.width {
            return Err(format!(
                "{} fields where the header has {}",
                fields.len(),
                self.width
            ));
        }
        let passed = fields[self.passed];
        let passed = parse_passed(passed).ok_or_else(|| {
            format!(
                "Passed value \"{passed}\" is not one of true/false, yes/no, ja/nej, 1/0, \
                 godkänd/ej godkänd"
            )
        })?;
        if !passed {
            // The date of a failed attempt is not evidence of anything; it is not checked.
            return Ok(Outcome::NotPassed);
        }
        match fields[self.date] {
            "" => Err("passed, but has no Date".to_string()),
            date => parse_date(date).map(Outcome::Passed).ok_or_else(|| {
                format!("Date \"{date}\" is neither YYYY-MM-DD nor an RFC 3339 date-time")
            }),
        }
    }
}

/// What a readable row says.
enum Outcome {
    Passed(DateTime<Utc>),
    NotPassed,
}

/// SPEC §5 spellings of `Passed`, case-insensitive.
fn parse_passed(value: &str) -> Option<bool> {
    match fold(value).as_str() {
        "true" | "yes" | "ja" | "1" | "godkänd" => Some(true),
        "false" | "no" | "nej" | "0" | "ej godkänd" => Some(false),
        _ => None,
    }
}

/// `YYYY-MM-DD` (the start of that day in UTC, as everywhere in coursegate) or RFC 3339.
fn parse_date(value: &str) -> Option<DateTime<Utc>> {
    if value.len() == 10
        && let Ok(day) = NaiveDate::parse_from_str(value, "%Y-%m-%d")
    {
        return Some(day.and_time(NaiveTime::MIN).and_utc());
    }
    DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|at| at.to_utc())
}

/// Normalizes a header name or `Passed` value for comparison: trimmed, lower-case, inner
/// whitespace collapsed, and the Swedish letters composed — exports made on macOS may write `ä`
/// as `a` followed by a combining diaeresis.
fn fold(value: &str) -> String {
    value
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
        .replace("a\u{308}", "ä")
        .replace("o\u{308}", "ö")
        .replace("a\u{30a}", "å")
}

// === impl ReportBuilder ===

/// Collects the rows of one report into [`CourseFacts`].
#[derive(Debug)]
pub(super) struct ReportBuilder {
    columns: Columns,
    /// How a row's number is introduced in messages: "line" in a CSV file, "row" in a sheet.
    row_word: &'static str,
    passed: Passes,
    unreadable: HashMap<(String, String), String>,
    problems: Vec<String>,
}

impl ReportBuilder {
    pub(super) fn new(columns: Columns, row_word: &'static str) -> Self {
        ReportBuilder {
            columns,
            row_word,
            passed: Passes::default(),
            unreadable: HashMap::new(),
            problems: Vec::new(),
        }
    }

    /// Takes one data row; `number` is its line (or sheet row) number for messages.
    pub(super) fn add_row<S: AsRef<str>>(&mut self, number: u64, fields: &[S]) {
        let fields: Vec<&str> = fields.iter().map(|f| f.as_ref().trim()).collect();
        if fields.iter().all(|f| f.is_empty()) {
            // Spreadsheets export empty rows as ";;;": nothing is said, nothing to report.
            return;
        }
        let at = || format!("{} {number}", self.row_word);
        let user = fields.get(self.columns.user).copied().unwrap_or_default();
        let course = fields.get(self.columns.course).copied().unwrap_or_default();
        if user.is_empty() || course.is_empty() {
            let which = if user.is_empty() {
                "user name"
            } else {
                "course"
            };
            self.problems
                .push(format!("{}: no {which}; row ignored", at()));
            return;
        }
        match self.columns.interpret(&fields) {
            Ok(Outcome::Passed(date)) => self.passed.record(user, course, date),
            Ok(Outcome::NotPassed) => {}
            Err(why) => {
                let reason = format!("{} ({user}, {course}): {why}", at());
                self.problems.push(format!("{reason}; result unknown"));
                // The first bad row is named; every one of them is in `problems`.
                self.unreadable
                    .entry(course_key(user, course))
                    .or_insert(reason);
            }
        }
    }

    pub(super) fn finish(self, label: &str) -> CourseFacts {
        CourseFacts::from_report(label, self.passed, self.unreadable, self.problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lms::CourseResult;
    use chrono::TimeZone;

    const LABEL: &str = "csv:lms/results.csv";

    fn day(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).single().unwrap()
    }

    fn passed_at(at: DateTime<Utc>) -> CourseResult {
        CourseResult::Passed {
            at,
            source: LABEL.to_string(),
            reference: None,
        }
    }

    fn unknown_reason(result: CourseResult) -> String {
        match result {
            CourseResult::Unknown { reason } => reason,
            other => panic!("expected Unknown, got {other:?}"),
        }
    }

    fn parse_str(text: &str) -> CourseFacts {
        parse(text.as_bytes(), LABEL)
    }

    #[test]
    fn reads_the_spec_example() {
        let facts = parse_str(
            "Username;Course;Passed;Date\n\
             anna.andersson;Wim grundkurs;true;2026-11-20\n\
             bertil.berg;PACS grundkurs;false;\n",
        );
        assert!(!facts.is_unavailable());
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        assert_eq!(facts.source(), LABEL);
        assert_eq!(
            facts.result("anna.andersson", "Wim grundkurs"),
            passed_at(day(2026, 11, 20))
        );
        assert_eq!(
            facts.result("bertil.berg", "PACS grundkurs"),
            CourseResult::NotPassed
        );
        // Missing user, and a known user's missing course: not passed.
        assert_eq!(
            facts.result("cecilia.cedersund", "Wim grundkurs"),
            CourseResult::NotPassed
        );
        assert_eq!(
            facts.result("anna.andersson", "PACS grundkurs"),
            CourseResult::NotPassed
        );
    }

    #[test]
    fn reads_swedish_headers_with_commas() {
        let facts = parse_str(
            "Användarnamn,Kurs,Godkänd,Datum\n\
             anna.andersson,Wim grundkurs,ja,2026-11-20\n\
             bertil.berg,Wim grundkurs,nej,\n",
        );
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        assert_eq!(
            facts.result("anna.andersson", "Wim grundkurs"),
            passed_at(day(2026, 11, 20))
        );
        assert_eq!(
            facts.result("bertil.berg", "Wim grundkurs"),
            CourseResult::NotPassed
        );
    }

    #[test]
    fn header_names_ignore_case_spaces_order_and_extra_columns() {
        for header in [
            "USERNAME;course; Passed ;DaTe",
            "ANVÄNDARNAMN;KURS;GODKÄND;DATUM",
            "användarnamn ; kurs ; godkänd ; datum",
            // macOS-style decomposed ä
            "Anva\u{308}ndarnamn;Kurs;Godka\u{308}nd;Datum",
        ] {
            let facts = parse_str(&format!("{header}\nanna;Wim;true;2026-11-20\n"));
            assert_eq!(
                facts.result("anna", "Wim"),
                passed_at(day(2026, 11, 20)),
                "header {header:?}: {:?}",
                facts.problems()
            );
        }
        let facts = parse_str(
            "Date;Name;Passed;Score;Username;Course\n\
             2026-11-20;Anna Andersson;yes;97;anna;Wim\n",
        );
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        assert_eq!(facts.result("anna", "Wim"), passed_at(day(2026, 11, 20)));
    }

    #[test]
    fn detects_the_delimiter_from_the_header() {
        // A comma inside a field of a ';' file, and a quoted ';' in a ',' file.
        let semi = parse_str("Username;Course;Passed;Date\nanna;Wim, grund;1;2026-11-20\n");
        assert_eq!(
            semi.result("anna", "Wim, grund"),
            passed_at(day(2026, 11, 20))
        );
        let comma =
            parse_str("Username,Course,Passed,Date\nanna,\"Wim; grund, del 1\",1,2026-11-20\n");
        assert_eq!(
            comma.result("anna", "Wim; grund, del 1"),
            passed_at(day(2026, 11, 20))
        );
    }

    #[test]
    fn accepts_bom_and_crlf() {
        let facts = parse(
            b"\xEF\xBB\xBFUsername;Course;Passed;Date\r\n\
              anna;Wim;true;2026-11-20\r\n\
              bertil;Wim;false;\r\n",
            LABEL,
        );
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        assert_eq!(facts.result("anna", "Wim"), passed_at(day(2026, 11, 20)));
        assert_eq!(facts.result("bertil", "Wim"), CourseResult::NotPassed);
    }

    #[test]
    fn every_passed_spelling() {
        let spellings = [
            ("true", true),
            ("TRUE", true),
            ("yes", true),
            ("Yes", true),
            ("ja", true),
            ("JA", true),
            ("1", true),
            ("godkänd", true),
            (" GODKÄND ", true),
            ("false", false),
            ("False", false),
            ("no", false),
            ("NO", false),
            ("nej", false),
            ("Nej", false),
            ("0", false),
            ("ej godkänd", false),
            ("Ej Godkänd", false),
            ("EJ  GODKÄND", false),
        ];
        let mut text = String::from("Username;Course;Passed;Date\n");
        for (i, (spelling, _)) in spellings.iter().enumerate() {
            text.push_str(&format!("user{i};Wim;{spelling};2026-11-20\n"));
        }
        let facts = parse_str(&text);
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        for (i, (spelling, passed)) in spellings.iter().enumerate() {
            let expected = if *passed {
                passed_at(day(2026, 11, 20))
            } else {
                CourseResult::NotPassed
            };
            assert_eq!(
                facts.result(&format!("user{i}"), "Wim"),
                expected,
                "{spelling:?}"
            );
        }
    }

    #[test]
    fn rfc3339_dates_are_exact() {
        let facts = parse_str(
            "Username;Course;Passed;Date\n\
             anna;Wim;true;2026-11-20T10:15:30+01:00\n\
             bertil;Wim;true;2026-11-20T23:59:59Z\n",
        );
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        let anna = Utc
            .with_ymd_and_hms(2026, 11, 20, 9, 15, 30)
            .single()
            .unwrap();
        let bertil = Utc
            .with_ymd_and_hms(2026, 11, 20, 23, 59, 59)
            .single()
            .unwrap();
        assert_eq!(facts.result("anna", "Wim"), passed_at(anna));
        assert_eq!(facts.result("bertil", "Wim"), passed_at(bertil));
    }

    #[test]
    fn retakes_count_the_latest_pass_and_any_pass_wins() {
        let facts = parse_str(
            "Username;Course;Passed;Date\n\
             anna;Wim;true;2025-01-10\n\
             anna;Wim;false;2025-06-01\n\
             anna;Wim;true;2026-11-20\n\
             anna;Wim;true;2026-02-01\n\
             bertil;Wim;false;2026-01-01\n\
             bertil;Wim;ja;2026-03-03\n\
             bertil;Wim;nej;2026-09-09\n",
        );
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        assert_eq!(facts.result("anna", "Wim"), passed_at(day(2026, 11, 20)));
        assert_eq!(facts.result("bertil", "Wim"), passed_at(day(2026, 3, 3)));
    }

    #[test]
    fn bad_passed_value_makes_only_that_pair_unknown() {
        let facts = parse_str(
            "Username;Course;Passed;Date\n\
             anna;Wim;true;2026-11-20\n\
             anna;PACS;kanske;2026-11-21\n\
             bertil;PACS;true;2026-11-22\n",
        );
        assert!(!facts.is_unavailable());
        let reason = unknown_reason(facts.result("anna", "PACS"));
        assert!(reason.contains("line 3"), "{reason}");
        assert!(reason.contains("kanske"), "{reason}");
        assert!(reason.starts_with(LABEL), "{reason}");
        assert_eq!(facts.result("anna", "Wim"), passed_at(day(2026, 11, 20)));
        assert_eq!(facts.result("bertil", "PACS"), passed_at(day(2026, 11, 22)));
        assert_eq!(facts.problems().len(), 1, "{:?}", facts.problems());
        assert!(facts.problems()[0].contains("line 3"));
    }

    #[test]
    fn an_unreadable_row_wins_over_a_passed_one() {
        // Whether the unreadable row is before or after the passed one.
        for rows in [
            "anna;Wim;true;2026-11-20\nanna;Wim;?;\n",
            "anna;Wim;?;\nanna;Wim;true;2026-11-20\n",
        ] {
            let facts = parse_str(&format!("Username;Course;Passed;Date\n{rows}"));
            unknown_reason(facts.result("ANNA", "wim"));
        }
    }

    #[test]
    fn a_pass_needs_a_readable_date() {
        let facts = parse_str(
            "Username;Course;Passed;Date\n\
             anna;Wim;true;\n\
             bertil;Wim;true;20/11/2026\n\
             cecilia;Wim;true;2026-11-20T10:00:00\n\
             david;Wim;false;not a date\n\
             erik;Wim;true;2026-02-30\n",
        );
        let anna = unknown_reason(facts.result("anna", "Wim"));
        assert!(
            anna.contains("line 2") && anna.contains("no Date"),
            "{anna}"
        );
        let bertil = unknown_reason(facts.result("bertil", "Wim"));
        assert!(
            bertil.contains("line 3") && bertil.contains("20/11/2026"),
            "{bertil}"
        );
        // A date-time without an offset is ambiguous, as in orders.
        unknown_reason(facts.result("cecilia", "Wim"));
        // A failed attempt's date is not looked at.
        assert_eq!(facts.result("david", "Wim"), CourseResult::NotPassed);
        unknown_reason(facts.result("erik", "Wim"));
        assert_eq!(facts.problems().len(), 4, "{:?}", facts.problems());
    }

    #[test]
    fn wrong_field_count_makes_the_pair_unknown() {
        let facts = parse_str(
            "Username;Course;Passed;Date\n\
             anna;Wim;true;2026-11-20;extra\n\
             bertil;Wim;false\n\
             cecilia;Wim;true;2026-11-20\n",
        );
        let anna = unknown_reason(facts.result("anna", "Wim"));
        assert!(
            anna.contains("line 2") && anna.contains("5 fields"),
            "{anna}"
        );
        let bertil = unknown_reason(facts.result("bertil", "Wim"));
        assert!(
            bertil.contains("line 3") && bertil.contains("3 fields"),
            "{bertil}"
        );
        assert_eq!(facts.result("cecilia", "Wim"), passed_at(day(2026, 11, 20)));
    }

    #[test]
    fn rows_without_user_or_course_are_reported_and_ignored() {
        let facts = parse_str(
            "Username;Course;Passed;Date\n\
             ;Wim;true;2026-11-20\n\
             anna; ;true;2026-11-20\n\
             bertil\n\
             cecilia;Wim;true;2026-11-20\n",
        );
        assert!(!facts.is_unavailable());
        let problems = facts.problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("line 2") && problems[0].contains("user name"));
        assert!(problems[1].contains("line 3") && problems[1].contains("course"));
        assert!(problems[2].contains("line 4"));
        assert_eq!(facts.result("anna", ""), CourseResult::NotPassed);
        assert_eq!(facts.result("bertil", "Wim"), CourseResult::NotPassed);
        assert_eq!(facts.result("cecilia", "Wim"), passed_at(day(2026, 11, 20)));
    }

    #[test]
    fn blank_rows_are_skipped_silently() {
        let facts =
            parse_str("\nUsername;Course;Passed;Date\n\n;;;\n  ; ;;\nanna;Wim;true;2026-11-20\n\n");
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        assert_eq!(facts.result("anna", "Wim"), passed_at(day(2026, 11, 20)));
    }

    #[test]
    fn names_compare_case_insensitively_after_trimming() {
        let facts = parse_str(
            "Username;Course;Passed;Date\n  Anna.Andersson ; WIM Grundkurs ;true; 2026-11-20 \n",
        );
        assert!(facts.problems().is_empty(), "{:?}", facts.problems());
        for (user, course) in [
            ("anna.andersson", "wim grundkurs"),
            ("ANNA.ANDERSSON", "Wim grundkurs"),
            (" anna.andersson\t", "  wim GRUNDKURS "),
        ] {
            assert_eq!(
                facts.result(user, course),
                passed_at(day(2026, 11, 20)),
                "{user:?} {course:?}"
            );
        }
        assert_eq!(
            facts.result("anna.anderson", "wim grundkurs"),
            CourseResult::NotPassed
        );
    }

    #[test]
    fn a_header_only_report_is_readable() {
        for text in [
            "Username;Course;Passed;Date",
            "Username;Course;Passed;Date\r\n",
        ] {
            let facts = parse_str(text);
            assert!(!facts.is_unavailable());
            assert!(facts.problems().is_empty());
            assert_eq!(facts.result("anna", "Wim"), CourseResult::NotPassed);
        }
    }

    fn assert_unavailable(facts: &CourseFacts, needle: &str) {
        assert!(facts.is_unavailable(), "{:?}", facts.problems());
        let reason = unknown_reason(facts.result("anna", "Wim"));
        assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
        assert!(reason.starts_with(LABEL), "{reason}");
        assert_eq!(facts.problems().len(), 1);
        assert!(facts.problems()[0].contains(needle));
    }

    #[test]
    fn a_file_that_is_not_utf8_is_unavailable() {
        // Latin-1 "Godkänd" on line 2.
        let facts = parse(
            b"Username;Course;Passed;Date\nanna;Wim;godk\xE4nd;2026-11-20\n",
            LABEL,
        );
        assert_unavailable(&facts, "not UTF-8 (invalid byte on line 2)");
        let facts = parse(b"\xFF\xFEU\0s\0e\0r\0", LABEL);
        assert_unavailable(&facts, "UTF-16");
    }

    #[test]
    fn a_missing_or_doubled_column_is_unavailable() {
        let facts = parse_str("Username;Course;Passed\nanna;Wim;true\n");
        assert_unavailable(&facts, "no recognisable header");
        assert_unavailable(&facts, "Date (Datum)");
        let facts = parse_str("Username,Course,Result,Datum\nanna,Wim,true,2026-11-20\n");
        assert_unavailable(&facts, "Passed (Godkänd)");
        let facts = parse_str("Username;Course;Passed;Date;Datum\n");
        assert_unavailable(&facts, "appears 2 times");
        // A data row where the header should be.
        let facts = parse_str("anna;Wim;true;2026-11-20\n");
        assert_unavailable(&facts, "no recognisable header");
    }

    #[test]
    fn an_empty_file_is_unavailable() {
        for text in ["", "\n\r\n", "\u{feff}"] {
            assert_unavailable(&parse_str(text), "no recognisable header");
        }
        assert_unavailable(&parse_str("   \n"), "no recognisable header");
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.csv");
        std::fs::write(
            &path,
            "Username;Course;Passed;Date\nanna;Wim;true;2026-11-20\n",
        )
        .unwrap();
        let facts = load(&path, LABEL);
        assert_eq!(facts.result("anna", "Wim"), passed_at(day(2026, 11, 20)));
    }

    #[test]
    fn load_names_the_path_when_the_file_is_missing_or_bad() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-report.csv");
        let facts = load(&missing, LABEL);
        assert_unavailable(&facts, &missing.display().to_string());
        assert_unavailable(&facts, "cannot read");

        let empty = dir.path().join("empty.csv");
        std::fs::write(&empty, "").unwrap();
        let facts = load(&empty, LABEL);
        assert_unavailable(&facts, &empty.display().to_string());
        assert_unavailable(&facts, "no recognisable header");
    }
}
