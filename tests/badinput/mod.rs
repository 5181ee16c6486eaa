//! The bad input corpus (SPEC §2, §7): order files that must be rejected, each with its own
//! reason, and user names that mean something in LDAP filters or DNs.
//!
//! The small bad files are committed in `tests/corpus/orders/` (byte-exact: see its
//! `.gitattributes`) and listed in [`CORPUS`] with what `check` must say about them. What cannot
//! be committed — a 10 MB file, symbolic links, a directory and a FIFO named like orders — is
//! made at test time by [`make_special_cases`].
//!
//! For every bad file: `coursegate check FILE` exits 2 and names the file and the reason; in a
//! directory next to one valid order, `apply` grants exactly that order and nothing else, and
//! `plan --json` lists every bad file under `invalid_orders`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::common::*;
use crate::reconcile::{World, actions, describe, expect_exit, set};

/// Committed bad order files and the reasons `check` may give: any one of them must appear.
/// Every file names `bertil` (who passed every course) or `anna` and real profiles, so a file
/// that is wrongly accepted shows up as a membership.
const CORPUS: &[(&str, &[&str])] = &[
    // --- malformed TOML and JSON
    ("malformed.toml", &["expected `]`"]),
    ("unterminated-string.toml", &["invalid basic string"]),
    ("duplicate-key.toml", &["duplicate key `user`"]),
    ("duplicate-key.json", &["duplicate field `user`"]),
    ("trailing-comma.json", &["trailing comma"]),
    ("truncated.json", &["EOF while parsing a list"]),
    ("two-objects.json", &["trailing characters"]),
    ("toml-in.json", &["expected value", "object"]),
    ("top-level-null.json", &["invalid type: null", "object"]),
    // A JSON array is not an order object: it must not be read field by field, in order.
    (
        "top-level-array.json",
        &["invalid type: sequence", "array", "object"],
    ),
    (
        "top-level-array-positional.json",
        &["invalid type: sequence", "array", "object"],
    ),
    // --- empty files
    ("empty.toml", &["missing field `id`", "empty"]),
    (
        "empty.json",
        &["EOF while parsing a value", "empty", "object"],
    ),
    ("comment-only.toml", &["missing field `id`"]),
    // --- wrong types, unknown and missing keys
    ("wrong-type-integer.toml", &["invalid type: integer `42`"]),
    (
        "wrong-type-access-string.toml",
        &["invalid type: string \"wim\", expected a sequence"],
    ),
    (
        "wrong-type-date-string.toml",
        &["invalid type: string \"2027-06-30\""],
    ),
    ("wrong-type-id-number.json", &["invalid type: integer `7`"]),
    (
        "wrong-type-date-number.json",
        &["invalid type: integer `20270630`"],
    ),
    ("unknown-key.toml", &["unknown field `colour`"]),
    ("unknown-table.toml", &["unknown field `extra`"]),
    ("unknown-key.json", &["unknown field `valid_untill`"]),
    ("missing-ordered-by.toml", &["missing field `ordered_by`"]),
    // --- encodings and binary content
    ("not-utf8-latin1.toml", &["line 2, column 9: not UTF-8"]),
    ("utf16-bom.toml", &["not UTF-8", "UTF-16"]),
    // UTF-16 without a byte order mark is made of ASCII and NUL bytes, so it passes a UTF-8
    // check; the reason must still say what is wrong with the file, not a JSON detail.
    ("utf16le-no-bom.json", &["UTF-16", "not UTF-8", "NUL"]),
    ("binary-png.toml", &["not UTF-8"]),
    (
        "binary-nul-bytes.json",
        &["NUL", "binary", "UTF-16", "not UTF-8", "control character"],
    ),
    // --- dates
    ("date-impossible.toml", &["out of range"]),
    ("date-not-leap-year.toml", &["out of range"]),
    ("date-month-13.toml", &["out of range"]),
    // TOML allows only four-digit years and hours up to 23: the reason must be about the
    // date, not the parser's "expected newline, `#`".
    ("date-year-10000.toml", &["valid_until", "date", "year"]),
    (
        "datetime-hour-25.toml",
        &["valid_from", "date", "time", "hour"],
    ),
    ("date-local-datetime.toml", &["is a local date-time"]),
    ("date-time-only.toml", &["is a time of day without a date"]),
    ("date-until-before-from.toml", &["is before `valid_from`"]),
    (
        "datetime-until-before-from.toml",
        &["is before `valid_from`"],
    ),
    (
        "date-impossible.json",
        &["`valid_until`: \"2027-02-30\" is not a date"],
    ),
    (
        "date-local-datetime.json",
        &["`valid_from`: 2026-12-01T08:00:00 is a local date-time"],
    ),
    (
        "date-not-a-date.json",
        &["`valid_until`: \"next summer\" is not a date"],
    ),
    ("date-until-before-from.json", &["is before `valid_from`"]),
    // --- control characters, one string field each
    (
        "control-id.toml",
        &["`id` contains the control character U+0001"],
    ),
    (
        "control-user.toml",
        &["`user` contains the control character U+0000"],
    ),
    (
        "control-access.toml",
        &["`access` contains the control character U+001B"],
    ),
    (
        "control-ordered-by.toml",
        &["`ordered_by` contains the control character U+007F"],
    ),
    (
        "control-ticket.toml",
        &["`ticket` contains the control character U+000D"],
    ),
    (
        "control-note-newline.toml",
        &["`note` contains the control character U+000A"],
    ),
    (
        "control-note-raw-tab.toml",
        &["`note` contains the control character U+0009"],
    ),
    (
        "control-user.json",
        &["`user` contains the control character U+0008"],
    ),
    (
        "control-note.json",
        &["`note` contains the control character U+001F"],
    ),
    ("control-raw-in-string.json", &["control character"]),
    // --- ids, names, access lists
    ("id-slash.toml", &["`id` \"a/b\" must not contain"]),
    ("id-backslash.toml", &["`id` \"a\\b\" must not contain"]),
    ("id-dotdot.json", &["`id` \"../escape\" must not contain"]),
    (
        "id-leading-dot.toml",
        &["`id` \".hidden\" must not start with `.`"],
    ),
    ("id-empty.toml", &["`id` must be 1–128 characters, not 0"]),
    (
        "id-too-long.toml",
        &["`id` must be 1–128 characters, not 129"],
    ),
    (
        "user-empty.toml",
        &["`user` must be 1–256 characters, not 0"],
    ),
    (
        "user-too-long.toml",
        &["`user` must be 1–256 characters, not 257"],
    ),
    (
        "ordered-by-empty.toml",
        &["`ordered_by` must be 1–256 characters, not 0"],
    ),
    ("empty-access.toml", &["`access` is empty"]),
    (
        "unknown-profile.toml",
        &["\"ris\", which is not an access profile"],
    ),
    (
        "unknown-profile-case.json",
        &["\"WIM\", which is not an access profile"],
    ),
    // Invalid, and with the id of the valid order: it must not take that order down with it.
    (
        "unknown-profile-same-id-as-valid.toml",
        &["\"ris\", which is not an access profile"],
    ),
];

/// Committed files that are each valid on their own but share an id: together both are invalid.
const DUPLICATES: (&str, &str) = ("duplicate-id-a.toml", "duplicate-id-b.json");

/// The one valid order of the directory tests: anna, who passed, gets `wim`.
const VALID_ID: &str = "GOOD-1";

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/orders")
}

/// A valid order for bertil (who passed every course), as the symlinked, oversized and nested
/// cases carry it: only the kind of file makes them invalid.
fn bertil_order(id: &str) -> String {
    format!(
        "id = \"{id}\"\nuser = \"bertil\"\naccess = [\"wim\", \"pacs\"]\nordered_by = \"karin.chef\"\n"
    )
}

/// Writes the valid order `elsewhere/valid-elsewhere.toml` (outside any order directory) and
/// returns its path: the target of a symlink case.
fn make_elsewhere(world: &World) -> PathBuf {
    write_file(
        &world.path("elsewhere"),
        "valid-elsewhere.toml",
        &bertil_order("ELSEWHERE-1"),
    )
}

/// Creates, in `dir`, the bad cases that are not committed, and returns them with the reasons
/// `check` may give. `elsewhere` is a valid order outside `dir`.
fn make_special_cases(dir: &Path, elsewhere: &Path) -> Vec<(String, &'static [&'static str])> {
    std::fs::create_dir_all(dir).unwrap();
    // 10 MB: a valid order followed by a long comment.
    let mut huge = bertil_order("HUGE-1").into_bytes();
    huge.extend_from_slice(b"# ");
    huge.resize(10 * 1024 * 1024, b'x');
    huge.push(b'\n');
    std::fs::write(dir.join("huge.toml"), huge).unwrap();

    let symlink = |target: &Path, name: &str| {
        std::os::unix::fs::symlink(target, dir.join(name))
            .unwrap_or_else(|e| panic!("symlink {name} -> {}: {e}", target.display()));
    };
    symlink(Path::new("/etc/passwd"), "symlink-to-etc-passwd.toml");
    symlink(elsewhere, "symlink-to-valid-order.toml");
    symlink(
        &elsewhere.with_file_name("does-not-exist.json"),
        "symlink-dangling.json",
    );
    symlink(elsewhere.parent().unwrap(), "symlink-to-directory.toml");

    // A directory named like an order, with a valid order inside.
    write_file(
        &dir.join("directory.toml"),
        "inner.toml",
        &bertil_order("INNER-1"),
    );

    let fifo = dir.join("fifo.toml");
    let out = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .output()
        .expect("run mkfifo");
    assert!(out.status.success(), "mkfifo: {out:?}");

    vec![
        ("huge.toml".into(), &["may be at most"]),
        ("symlink-to-etc-passwd.toml".into(), &["symbolic link"]),
        ("symlink-to-valid-order.toml".into(), &["symbolic link"]),
        ("symlink-dangling.json".into(), &["symbolic link"]),
        ("symlink-to-directory.toml".into(), &["symbolic link"]),
        ("directory.toml".into(), &["is a directory"]),
        ("fifo.toml".into(), &["not a regular file"]),
    ]
}

/// Puts the whole corpus, the duplicate pair and the special cases into the world's order
/// directory; returns every bad file name with the reasons its message may give (for the
/// duplicates: naming the other file, which only a directory scan can).
fn fill_with_bad_files(world: &World) -> BTreeMap<String, Vec<String>> {
    let desired = world.path("desired");
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, reasons) in CORPUS {
        std::fs::copy(corpus_dir().join(name), desired.join(name))
            .unwrap_or_else(|e| panic!("copy {name}: {e}"));
        expected.insert(name.to_string(), strings(reasons));
    }
    let (a, b) = DUPLICATES;
    for (name, other) in [(a, b), (b, a)] {
        std::fs::copy(corpus_dir().join(name), desired.join(name)).unwrap();
        expected.insert(name.to_string(), vec![format!("also used by {other}")]);
    }
    let elsewhere = make_elsewhere(world);
    for (name, reasons) in make_special_cases(&desired, &elsewhere) {
        expected.insert(name, strings(reasons));
    }
    expected
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

fn has_any(text: &str, reasons: &[String]) -> bool {
    reasons.iter().any(|r| text.contains(r.as_str()))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Panics listing every problem, if there are any.
fn assert_no_problems(problems: &[String], what: &str) {
    assert!(
        problems.is_empty(),
        "{} problem(s) with {what}:\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}

#[test]
fn corpus_table_lists_every_committed_file() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut listed: BTreeSet<String> = CORPUS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(listed.len(), CORPUS.len(), "a file is listed twice");
    listed.insert(DUPLICATES.0.into());
    listed.insert(DUPLICATES.1.into());
    assert_eq!(
        on_disk, listed,
        "tests/corpus/orders/ and CORPUS must list the same files"
    );
    // Byte-level properties the cases rely on (an editor or a git filter could lose them).
    let bytes = |name: &str| std::fs::read(corpus_dir().join(name)).unwrap();
    assert!(bytes("empty.toml").is_empty() && bytes("empty.json").is_empty());
    assert!(std::str::from_utf8(&bytes("not-utf8-latin1.toml")).is_err());
    assert!(std::str::from_utf8(&bytes("binary-png.toml")).is_err());
    assert_eq!(bytes("utf16-bom.toml")[..4], *b"\xff\xfei\0");
    assert_eq!(bytes("utf16le-no-bom.json")[..4], *b"{\0\"\0");
    assert!(bytes("control-note-raw-tab.toml").contains(&b'\t'));
    assert!(bytes("control-raw-in-string.json").contains(&1));
}

/// `coursegate check FILE` on each bad file, one at a time: (file, reasons, output).
fn check_each_bad_file(w: &World) -> Vec<(PathBuf, Vec<String>, Output)> {
    let elsewhere = make_elsewhere(w);
    // The payload of the symlink, oversized and nested cases is valid on its own.
    expect_exit(&w.run(&["check", elsewhere.to_str().unwrap()]), 0);
    let special = w.path("special");
    let mut cases: Vec<(PathBuf, Vec<String>)> = CORPUS
        .iter()
        .map(|(name, reasons)| (corpus_dir().join(name), strings(reasons)))
        .collect();
    for (name, reasons) in make_special_cases(&special, &elsewhere) {
        cases.push((special.join(name), strings(reasons)));
    }
    cases
        .into_iter()
        .map(|(path, reasons)| {
            let out = w.run(&["check", path.to_str().unwrap()]);
            (path, reasons, out)
        })
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn check_rejects_each_bad_file_and_names_it() {
    let w = World::new();
    let results = check_each_bad_file(&w);
    let mut problems = Vec::new();
    for (path, _, out) in &results {
        let mut wrong = Vec::new();
        if out.status.code() != Some(2) {
            wrong.push(format!("exit {:?} instead of 2", out.status.code()));
        }
        if !stdout(out).contains("0 valid order file(s), 1 invalid") {
            wrong.push("not counted as the one invalid file".to_string());
        }
        if !stderr(out).contains(&format!("{}: ", path.display())) {
            wrong.push("stderr does not name the file".to_string());
        }
        if !wrong.is_empty() {
            problems.push(format!(
                "{}: {}\n{}",
                file_name(path),
                wrong.join("; "),
                describe(out)
            ));
        }
    }

    // Duplicate ids: each file is valid alone, both are invalid together.
    let (a, b) = (
        corpus_dir().join(DUPLICATES.0),
        corpus_dir().join(DUPLICATES.1),
    );
    for alone in [&a, &b] {
        let out = w.run(&["check", alone.to_str().unwrap()]);
        if out.status.code() != Some(0) {
            problems.push(format!(
                "{} alone should be valid\n{}",
                alone.display(),
                describe(&out)
            ));
        }
    }
    let out = w.run(&["check", a.to_str().unwrap(), b.to_str().unwrap()]);
    let err = stderr(&out);
    let named = |p: &Path| {
        err.lines()
            .any(|l| l.starts_with(&format!("{}: ", p.display())) && l.contains("\"DUP-1\""))
    };
    if out.status.code() != Some(2)
        || !named(&a)
        || !named(&b)
        || !err.contains("used by")
        || !stdout(&out).contains("0 valid order file(s), 2 invalid")
    {
        problems.push(format!(
            "duplicate ids: both files must be named as invalid\n{}",
            describe(&out)
        ));
    }
    assert_no_problems(
        &problems,
        &format!("`check FILE` on {} bad files", results.len() + 2),
    );
}

#[test]
fn check_gives_the_specific_reason_for_each_bad_file() {
    let w = World::new();
    let results = check_each_bad_file(&w);
    let mut problems = Vec::new();
    for (path, reasons, out) in &results {
        // The reason, not the file's name (`date-….toml`), must say what is wrong.
        let err = stderr(out).replace(&path.display().to_string(), "");
        if !has_any(&err, reasons) {
            problems.push(format!(
                "{}: none of the reasons {reasons:?}\n{}",
                file_name(path),
                describe(out)
            ));
        }
    }
    assert_no_problems(
        &problems,
        &format!(
            "the reasons `check FILE` gives for {} bad files",
            results.len()
        ),
    );
}

#[test]
fn a_directory_of_bad_files_changes_nothing_but_the_valid_order_is_granted() {
    let w = World::new();
    let anna = w.slapd.add_user("anna", "Anna");
    w.slapd.add_user("bertil", "Bertil");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "anna;PACS grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
        "bertil;PACS grundkurs;true;2026-11-01",
    ]);
    let expected = fill_with_bad_files(&w);
    w.simple_order(VALID_ID, "anna", &["wim"]);
    let mut problems = Vec::new();

    let out = w.run(&["apply"]);
    if out.status.code() != Some(0) {
        problems.push(format!(
            "apply must exit 0 despite bad files\n{}",
            describe(&out)
        ));
    }
    let err = stderr(&out);
    let unreported: Vec<&String> = expected.keys().filter(|f| !err.contains(*f)).collect();
    if !unreported.is_empty() {
        problems.push(format!(
            "apply's stderr does not report {unreported:?}\n{}",
            describe(&out)
        ));
    }
    let groups = [
        (WIM_GROUP, set(&[PLACEHOLDER_DN, &anna])),
        (PACS_GROUP, set(&[PLACEHOLDER_DN])),
        (KARDIOPACS_GROUP, set(&[PLACEHOLDER_DN])),
    ];
    for (group, want) in &groups {
        let have = w.members(group);
        if &have != want {
            problems.push(format!(
                "{group}: members {have:?}, expected {want:?}\n{}",
                describe(&out)
            ));
        }
    }
    let audit = w.audit();
    let grants: Vec<(Value, Value)> = actions(&audit, "grant")
        .iter()
        .map(|g| (g["user"].clone(), g["order"].clone()))
        .collect();
    if grants != [(Value::from("anna"), Value::from(VALID_ID))] {
        problems.push(format!("audited grants {grants:?}, expected only anna's"));
    }
    if !actions(&audit, "revoke").is_empty() {
        problems.push("something was revoked".to_string());
    }

    // plan --json: nothing more to do, and every bad file listed by name with its reason.
    let plan = w.plan_json();
    if plan["changes"].as_array().is_none_or(|c| !c.is_empty()) {
        problems.push(format!(
            "plan after apply is not empty: {}",
            plan["changes"]
        ));
    }
    for d in plan["decisions"].as_array().unwrap() {
        if d["user"] != "anna" || d["access"] != "wim" || d["decision"] != "grant" {
            problems.push(format!("decision from a bad file: {d}"));
        }
    }
    let listed: BTreeMap<String, &Value> = plan["invalid_orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["file"].as_str().unwrap().to_string(), i))
        .collect();
    for (file, reasons) in &expected {
        match listed.get(file) {
            None => problems.push(format!("invalid_orders does not list {file}")),
            Some(i) => {
                // The reasons are `check_gives_the_specific_reason_for_each_bad_file`'s job;
                // only the directory scan knows about duplicates.
                let message = i["message"].as_str().unwrap_or_default();
                if file.starts_with("duplicate-id-") && !has_any(message, reasons) {
                    problems.push(format!(
                        "invalid_orders: {file}: {message:?} gives none of {reasons:?}"
                    ));
                }
                if i["last_good_in_effect"] != false {
                    problems.push(format!("{file} was never valid, yet: {i}"));
                }
            }
        }
    }
    for extra in listed.keys().filter(|f| !expected.contains_key(*f)) {
        problems.push(format!(
            "invalid_orders lists {extra}, which is not a bad file"
        ));
    }

    // check without files reads the directory: exit 2, and every bad file named.
    let desired = w.path("desired");
    let out = w.run(&["check"]);
    let err = stderr(&out);
    if out.status.code() != Some(2)
        || !stdout(&out).contains(&format!(
            "1 valid order file(s), {} invalid",
            expected.len()
        ))
    {
        problems.push(format!("check of the directory\n{}", describe(&out)));
    }
    for file in expected.keys() {
        if !err.contains(&format!("{}: ", desired.join(file).display())) {
            problems.push(format!("check does not name {file}"));
        }
    }

    // A second pass is just as quiet.
    let out = w.run(&["apply"]);
    if out.status.code() != Some(0) || actions(&w.audit(), "grant").len() != grants.len() {
        problems.push(format!("second apply\n{}", describe(&out)));
    }
    assert_no_problems(
        &problems,
        &format!("{} bad files next to a valid order", expected.len()),
    );
}

/// Journald and log files take a line at a time: the reason for a bad file must be on the line
/// that names it, not on a line of its own.
#[test]
fn every_reason_is_on_the_line_that_names_the_file() {
    let w = World::new();
    let expected = fill_with_bad_files(&w);
    let desired = w.path("desired");
    let out = w.run(&["check"]);
    expect_exit(&out, 2);
    let err = stderr(&out);
    let orphans: Vec<&str> = err
        .lines()
        .filter(|line| {
            let named = line
                .strip_prefix(&format!("{}/", desired.display()))
                .and_then(|rest| rest.split_once(": "))
                .is_some_and(|(file, _)| expected.contains_key(file));
            !named && !line.starts_with("warning: ")
        })
        .collect();
    assert!(
        orphans.is_empty(),
        "lines of `check` that name no file:\n{}\n\nall of stderr:\n{err}",
        orphans.join("\n")
    );
}

/// User names with LDAP filter and DN syntax in them (SPEC §2: valid, and escaped). The
/// directory has decoys that an unescaped filter would match (`admin`, `administrator`, `a`,
/// everybody), with the plain `(uid={user})` filter and with one that names `{user}` twice, where
/// coursegate cannot sort search results by name and relies on escaping alone.
#[test]
fn ldap_injection_names_match_only_their_literal_account() {
    const NASTY: [&str; 6] = [
        "*",
        ")(",
        "a)(objectClass=*",
        "\\2a",
        ",ou=admins",
        "admin*",
    ];
    let w = World::new();
    w.slapd.add_users(&[
        ("anna", "Anna"),
        ("a", "A"),
        ("admin", "Admin"),
        ("administrator", "Administrator"),
    ]);
    let mut rows: Vec<String> = ["anna", "a", "admin", "administrator"]
        .iter()
        .map(|u| format!("{u};Wim grundkurs;true;2026-11-01"))
        .collect();
    for (i, user) in NASTY.iter().enumerate() {
        w.simple_order(&format!("N-{i}"), user, &["wim"]);
        rows.push(format!(
            "\"{}\";Wim grundkurs;true;2026-11-01",
            user.replace('"', "\"\"")
        ));
    }
    w.results(&rows.iter().map(String::as_str).collect::<Vec<_>>());
    let simple = std::fs::read_to_string(&w.config).unwrap();
    let twice = simple.replace("(uid={user})", "(|(uid={user})(cn={user}))");
    assert_ne!(simple, twice);

    // Names are data: every order is valid.
    let out = w.run(&["check"]);
    expect_exit(&out, 0);
    assert!(
        stdout(&out).contains(&format!("{} valid order file(s), 0 invalid", NASTY.len())),
        "{}",
        describe(&out)
    );

    // reason of each nasty user's decision in `plan --json`
    let reasons = |w: &World| -> BTreeMap<String, String> {
        let plan = w.plan_json();
        assert_eq!(plan["invalid_orders"], Value::Array(vec![]), "{plan}");
        plan["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["user"].as_str().unwrap().to_string(),
                    format!("{}: {}", d["decision"], d["reason"]),
                )
            })
            .collect()
    };
    let no_entry = "matches no directory entry";

    // No such accounts: nobody is granted, with either filter.
    for config in [&simple, &twice] {
        std::fs::write(&w.config, config).unwrap();
        let out = w.run(&["apply"]);
        expect_exit(&out, 0);
        assert_eq!(
            w.members(WIM_GROUP),
            set(&[PLACEHOLDER_DN]),
            "{}",
            describe(&out)
        );
        let why = reasons(&w);
        for user in NASTY {
            assert!(why[user].contains(no_entry), "{user}: {}", why[user]);
        }
    }

    // The account literally named `*`: only it, and only for the order naming `*` (not `\2a`,
    // which is `*` escaped in filter syntax).
    let star = w.slapd.add_user("*", "Literal star");
    for config in [&simple, &twice] {
        std::fs::write(&w.config, config).unwrap();
        let out = w.run(&["apply"]);
        expect_exit(&out, 0);
        assert_eq!(
            w.members(WIM_GROUP),
            set(&[PLACEHOLDER_DN, &star]),
            "{}",
            describe(&out)
        );
        let why = reasons(&w);
        assert!(why["*"].starts_with("\"grant\""), "{}", why["*"]);
        for user in &NASTY[1..] {
            assert!(why[*user].contains(no_entry), "{user}: {}", why[*user]);
        }
    }

    // Every literal account: each order resolves to exactly its own account.
    let literals: Vec<(&str, &str)> = NASTY[1..].iter().map(|u| (*u, "Literal")).collect();
    let mut dns = w.slapd.add_users(&literals);
    dns.push(star);
    dns.push(PLACEHOLDER_DN.to_string());
    let want: BTreeSet<String> = dns.into_iter().collect();
    assert!(want.contains(&format!("uid=\\2Cou\\3Dadmins,{PEOPLE_BASE}")));
    std::fs::write(&w.config, &twice).unwrap();
    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    assert_eq!(w.members(WIM_GROUP), want, "{}", describe(&out));
    let why = reasons(&w);
    for user in NASTY {
        assert!(why[user].starts_with("\"grant\""), "{user}: {}", why[user]);
    }
    // The plain filter finds the same accounts: nothing to change.
    std::fs::write(&w.config, &simple).unwrap();
    let plan = w.plan_json();
    assert_eq!(plan["changes"], Value::Array(vec![]), "{plan}");
    assert_eq!(actions(&w.audit(), "grant").len(), NASTY.len());
}
