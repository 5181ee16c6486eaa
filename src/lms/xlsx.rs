//! The course-results report (SPEC §5) exported as an Excel workbook (`kind = "xlsx"`).
//!
//! Only the container differs from the CSV form: the first worksheet is read with `calamine`,
//! each cell is turned into the text a CSV export would have held (a date cell becomes
//! `YYYY-MM-DD`, a boolean `true`/`false`, a whole number its digits), and the rows go through the
//! same rules in [`super::csv`] — header recognition, `Passed` spellings, dates, retakes,
//! unreadable rows. Problems name the sheet row, as Excel numbers it.

use std::io::Cursor;
use std::path::Path;

use calamine::{Data, Reader, Xlsx};
use chrono::{NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat};

use super::CourseFacts;
use super::csv::{Columns, ReportBuilder};

/// Reads the xlsx report at `path`; `label` (e.g. `xlsx:lms/results.xlsx`) becomes the evidence
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

/// Parses the bytes of an xlsx report. Pure: [`load`] and the tests share it.
pub fn parse(bytes: &[u8], label: &str) -> CourseFacts {
    match read_report(bytes) {
        Ok(report) => report.finish(label),
        Err(why) => CourseFacts::unavailable(label, format!("course report: {why}")),
    }
}

fn read_report(bytes: &[u8]) -> Result<ReportBuilder, String> {
    let mut workbook = Xlsx::new(Cursor::new(bytes))
        .map_err(|e| format!("is not a readable xlsx workbook: {e}"))?;
    let sheet = workbook
        .worksheet_range_at(0)
        .ok_or_else(|| "the workbook has no worksheet".to_string())?
        .map_err(|e| format!("cannot read its first worksheet: {e}"))?;
    // The range starts at the first used cell, not necessarily A1.
    let first_row = sheet.start().map_or(0, |(row, _)| u64::from(row));
    let mut rows = sheet.rows().zip(1..).map(|(cells, offset)| {
        let texts: Vec<String> = cells.iter().map(cell_text).collect();
        (first_row + offset, texts)
    });
    let Some((_, header)) = rows.find(|(_, texts)| texts.iter().any(|t| !t.trim().is_empty()))
    else {
        return Err("no recognisable header: the first worksheet is empty".to_string());
    };
    let columns = Columns::find(&header).map_err(|why| format!("no recognisable header: {why}"))?;
    let mut report = ReportBuilder::new(columns, "row");
    for (number, texts) in rows {
        report.add_row(number, &texts);
    }
    Ok(report)
}

/// The text a CSV export would hold for this cell.
fn cell_text(cell: &Data) -> String {
    match cell {
        Data::Empty => String::new(),
        Data::String(text) | Data::DurationIso(text) => text.clone(),
        Data::Bool(value) => value.to_string(),
        Data::Int(value) => value.to_string(),
        // `Display` writes 1.0 as "1", so a numeric Passed of 1/0 reads like the CSV one.
        Data::Float(value) => value.to_string(),
        Data::DateTime(value) if value.is_datetime() => {
            let (y, mo, d, h, mi, s, ms) = value.to_ymd_hms_milli();
            NaiveDate::from_ymd_opt(i32::from(y), u32::from(mo), u32::from(d))
                .and_then(|day| {
                    day.and_hms_milli_opt(u32::from(h), u32::from(mi), u32::from(s), u32::from(ms))
                })
                .map_or_else(|| value.to_string(), date_text)
        }
        // A duration is no date; its serial number will be reported as a bad Date.
        Data::DateTime(value) => value.to_string(),
        Data::DateTimeIso(text) => NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
            .map_or_else(|_| text.clone(), date_text),
        Data::Error(error) => error.to_string(),
    }
}

/// An Excel date-time carries no time zone; it is taken as UTC, and a midnight as the plain date,
/// which SPEC §5 also reads as the start of that day in UTC.
fn date_text(at: NaiveDateTime) -> String {
    if at.time() == NaiveTime::MIN {
        at.date().format("%Y-%m-%d").to_string()
    } else {
        at.and_utc().to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lms::CourseResult;
    use chrono::{DateTime, TimeZone, Utc};
    use rust_xlsxwriter::{ExcelDateTime, Format, Workbook, Worksheet, XlsxError};

    const LABEL: &str = "xlsx:lms/results.xlsx";

    /// A cell to write into a test workbook.
    enum W {
        Text(&'static str),
        Bool(bool),
        Number(f64),
        Date(u16, u8, u8),
        DateTime(u16, u8, u8, u16, u8),
        Blank,
    }

    /// Writes `rows` starting at sheet row `top` (0-based) and column B.
    fn write_rows(sheet: &mut Worksheet, top: u32, rows: &[Vec<W>]) -> Result<(), XlsxError> {
        let date = Format::new().set_num_format("yyyy-mm-dd");
        let date_time = Format::new().set_num_format("yyyy-mm-dd hh:mm");
        for (r, row) in (top..).zip(rows) {
            for (c, cell) in (1..).zip(row) {
                match cell {
                    W::Text(text) => sheet.write_string(r, c, *text)?,
                    W::Bool(value) => sheet.write_boolean(r, c, *value)?,
                    W::Number(value) => sheet.write_number(r, c, *value)?,
                    W::Date(y, m, d) => sheet.write_datetime_with_format(
                        r,
                        c,
                        ExcelDateTime::from_ymd(*y, *m, *d)?,
                        &date,
                    )?,
                    W::DateTime(y, m, d, h, mi) => sheet.write_datetime_with_format(
                        r,
                        c,
                        ExcelDateTime::from_ymd(*y, *m, *d)?.and_hms(*h, *mi, 0)?,
                        &date_time,
                    )?,
                    W::Blank => sheet,
                };
            }
        }
        Ok(())
    }

    fn workbook(first: &[Vec<W>], second: &[Vec<W>]) -> Vec<u8> {
        let mut book = Workbook::new();
        write_rows(book.add_worksheet(), 1, first).unwrap();
        write_rows(book.add_worksheet(), 0, second).unwrap();
        book.save_to_buffer().unwrap()
    }

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

    #[test]
    fn reads_typed_cells_from_the_first_worksheet() {
        use W::*;
        let bytes = workbook(
            &[
                vec![
                    Text("Användarnamn"),
                    Text("Kurs"),
                    Text("GODKÄND"),
                    Text("Datum"),
                    Text("Note"),
                ],
                vec![
                    Text("anna"),
                    Text("Wim"),
                    Bool(true),
                    Date(2026, 11, 20),
                    Blank,
                ],
                vec![
                    Text("bertil"),
                    Text("Wim"),
                    Number(1.0),
                    Text("2026-11-21"),
                    Text("retake"),
                ],
                vec![
                    Text("cecilia"),
                    Text("Wim"),
                    Text("Godkänd"),
                    DateTime(2026, 11, 22, 10, 30),
                    Blank,
                ],
                vec![Text("david"), Text("Wim"), Bool(false), Blank, Blank],
                vec![
                    Number(12345.0),
                    Text("Wim"),
                    Number(1.0),
                    Date(2026, 11, 23),
                    Blank,
                ],
                vec![Blank, Blank, Blank, Blank, Blank],
                vec![
                    Text("erik"),
                    Text("Wim"),
                    Text("kanske"),
                    Date(2026, 11, 24),
                    Blank,
                ],
                vec![
                    Text("fredrik"),
                    Text("Wim"),
                    Number(2.0),
                    Date(2026, 11, 24),
                    Blank,
                ],
                vec![Text("gun"), Text("Wim"), Bool(true), Number(46346.0), Blank],
            ],
            &[
                vec![
                    Text("Username"),
                    Text("Course"),
                    Text("Passed"),
                    Text("Date"),
                ],
                vec![Text("david"), Text("Wim"), Bool(true), Date(2026, 1, 1)],
            ],
        );
        let facts = parse(&bytes, LABEL);
        assert!(!facts.is_unavailable(), "{:?}", facts.problems());
        assert_eq!(facts.result("Anna", "wim"), passed_at(day(2026, 11, 20)));
        assert_eq!(facts.result("bertil", "Wim"), passed_at(day(2026, 11, 21)));
        let cecilia = Utc
            .with_ymd_and_hms(2026, 11, 22, 10, 30, 0)
            .single()
            .unwrap();
        assert_eq!(facts.result("cecilia", "Wim"), passed_at(cecilia));
        // The second worksheet is not read.
        assert_eq!(facts.result("david", "Wim"), CourseResult::NotPassed);
        assert_eq!(facts.result("12345", "Wim"), passed_at(day(2026, 11, 23)));
        // Header on sheet row 2, so erik's row is row 9 as Excel shows it.
        let erik = unknown_reason(facts.result("erik", "Wim"));
        assert!(erik.contains("row 9") && erik.contains("kanske"), "{erik}");
        unknown_reason(facts.result("fredrik", "Wim"));
        // A plain number where a date belongs is not guessed to be a date.
        let gun = unknown_reason(facts.result("gun", "Wim"));
        assert!(gun.contains("46346"), "{gun}");
        assert_eq!(facts.problems().len(), 3, "{:?}", facts.problems());
    }

    #[test]
    fn an_unrecognisable_workbook_is_unavailable() {
        use W::*;
        let missing_date = workbook(
            &[
                vec![Text("Username"), Text("Course"), Text("Passed")],
                vec![Text("anna"), Text("Wim"), Bool(true)],
            ],
            &[],
        );
        let empty = workbook(&[], &[]);
        let not_xlsx = b"Username;Course;Passed;Date\nanna;Wim;true;2026-11-20\n".to_vec();
        for (bytes, needle) in [
            (missing_date, "Date (Datum)"),
            (empty, "no recognisable header"),
            (not_xlsx, "not a readable xlsx workbook"),
        ] {
            let facts = parse(&bytes, LABEL);
            assert!(facts.is_unavailable(), "{needle}");
            let reason = unknown_reason(facts.result("anna", "Wim"));
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
        }
    }

    #[test]
    fn load_reads_a_file_and_names_the_path_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.xlsx");
        let bytes = workbook(
            &[
                vec![
                    W::Text("Username"),
                    W::Text("Course"),
                    W::Text("Passed"),
                    W::Text("Date"),
                ],
                vec![
                    W::Text("anna"),
                    W::Text("Wim"),
                    W::Text("yes"),
                    W::Date(2026, 11, 20),
                ],
            ],
            &[],
        );
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(
            load(&path, LABEL).result("anna", "Wim"),
            passed_at(day(2026, 11, 20))
        );

        let missing = dir.path().join("missing.xlsx");
        let facts = load(&missing, LABEL);
        assert!(facts.is_unavailable());
        let reason = unknown_reason(facts.result("anna", "Wim"));
        assert!(reason.contains(&missing.display().to_string()), "{reason}");
    }
}
