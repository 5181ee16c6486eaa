//! The HTTP learning platforms (`[lms] kind = "moodle" | "canvas" | "xapi"`): the real binary
//! and a real slapd against fake platforms on loopback ([`fake`]) that answer in the documented
//! shapes and check the credentials the way the real ones do.
//!
//! For each platform: a pass grants with the platform's ids in the audit evidence, not passed
//! waits, and every failure mode holds — the pending user is not granted and, more to the point,
//! the granted one is not revoked. The access profile revokes on lapse with no grace, so a
//! failure misread as "not passed" would revoke at once; each test ends by showing that a real
//! "not passed" does.

mod fake;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::daemon::Running;
use crate::reconcile::{World, actions, describe, expect_exit, set};
use fake::*;

const CSV_LMS: &str = "[lms]\nkind = \"csv\"\npath = \"results.csv\"\n";
const ACTIVITY: &str = "https://lms.example.org/activities/wim-grund";
const PASSED: &str = "http://adlnet.gov/expapi/verbs/passed";
const COMPLETED: &str = "http://adlnet.gov/expapi/verbs/completed";
const SATISFIED: &str = "https://w3id.org/xapi/adl/verbs/satisfied";

const MOODLE: &str = "kind = \"moodle\"\nurl = \"{URL}\"\ntoken_file = \"moodle.token\"\ntimeout = \"300ms\"\nconcurrency = 2";
const CANVAS: &str = "kind = \"canvas\"\nurl = \"{URL}\"\ntoken_file = \"canvas.token\"\ntimeout = \"300ms\"\nconcurrency = 2\nbulk_threshold = 4";
const XAPI: &str = "kind = \"xapi\"\nurl = \"{URL}/xapi\"\nusername = \"coursegate\"\npassword_file = \"lrs-password\"\ntimeout = \"300ms\"\nconcurrency = 2";

/// A world whose course results come from a fake platform.
struct LmsWorld {
    w: World,
    fake: Fake,
    /// The config as `World` wrote it, with the csv `[lms]` section to replace.
    base: String,
}

impl LmsWorld {
    /// `lms` is the `[lms]` section without its header (`{URL}` is the fake's address);
    /// `course` the Wim course's `lms_id`.
    fn new(lms: &str, course: &str, daemon_extra: &str) -> LmsWorld {
        let profiles = format!(
            r#"
[courses.wim-grund]
title = "Wim – grundkurs"
lms_id = "{course}"

[access.wim]
title = "Wim (RIS)"
group = "{WIM_GROUP}"
courses = ["wim-grund"]
revoke_on_lapse = true
lapse_grace = "0s"
"#
        );
        let w = World::with(Slapd::start(), daemon_extra, "member", &profiles);
        for (name, secret) in [
            ("moodle.token", MOODLE_TOKEN),
            ("canvas.token", CANVAS_TOKEN),
            ("lrs-password", LRS_PASSWORD),
        ] {
            write_file(w.dir.path(), name, &format!("{secret}\n"));
        }
        let base = std::fs::read_to_string(&w.config).unwrap();
        assert!(base.contains(CSV_LMS), "World's config changed shape");
        let lw = LmsWorld {
            w,
            fake: Fake::start(),
            base,
        };
        lw.set_lms(lms);
        lw
    }

    fn set_lms(&self, lms: &str) {
        let section = format!("[lms]\n{}\n", lms.replace("{URL}", &self.fake.url()));
        std::fs::write(&self.w.config, self.base.replace(CSV_LMS, &section)).unwrap();
    }

    fn apply(&self) -> Output {
        self.w.run(&["apply"])
    }

    fn members(&self) -> BTreeSet<String> {
        self.w.members(WIM_GROUP)
    }

    fn explain(&self, user: &str) -> String {
        String::from_utf8_lossy(&self.w.run(&["explain", user]).stdout).into_owned()
    }

    /// The evidence of the one grant of `user`.
    fn evidence(&self, user: &str) -> Value {
        let grants: Vec<Value> = actions(&self.w.audit(), "grant")
            .into_iter()
            .filter(|g| g["user"] == user)
            .collect();
        assert_eq!(grants.len(), 1, "{grants:?}");
        grants[0]["evidence"][0].clone()
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `apply` once and checks that it held: exit 1, `granted` still a member, `pending` not
/// one, and the cause reported exactly once (one line for all the lookups it hit). Returns the
/// requests the platform received and how long the run took.
fn holds(
    lw: &LmsWorld,
    granted: &str,
    pending: &str,
    cause: &str,
    what: &str,
) -> (Vec<Seen>, Duration) {
    lw.fake.take_seen();
    let started = Instant::now();
    let out = lw.apply();
    let took = started.elapsed();
    let log = stderr(&out);
    let seen = lw.fake.take_seen();
    eprintln!("--- {what}: {took:?}, {} requests\n{log}", seen.len());
    assert_eq!(out.status.code(), Some(1), "{what}: {}", describe(&out));
    let members = lw.members();
    assert!(
        members.contains(granted),
        "{what}: a granted membership was revoked\n{}",
        describe(&out)
    );
    assert!(
        !members.contains(pending),
        "{what}: granted on an unknown answer\n{}",
        describe(&out)
    );
    let needle = format!("unknown ({cause})");
    assert_eq!(
        log.matches(&needle).count(),
        1,
        "{what}: `{needle}` should be reported once\n{log}"
    );
    (seen, took)
}

/// The requests to a path (or below it).
fn to<'a>(seen: &'a [Seen], path: &str) -> Vec<&'a Seen> {
    seen.iter().filter(|s| s.path.starts_with(path)).collect()
}

/// No output of a run may contain a secret, even at trace level.
fn assert_no_secret_in_trace_output(w: &World, secrets: &[&str]) {
    let mut cmd = coursegate_command(&w.config, &["plan"]);
    cmd.env("RUST_LOG", "trace");
    let out = run_with_timeout(cmd, COURSEGATE_TIMEOUT);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.len() > 1000, "trace output expected: {all}");
    for secret in secrets {
        assert!(
            !all.contains(secret),
            "a secret reached the output: {secret}"
        );
    }
}

fn utc(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

// === Moodle ===

#[test]
fn moodle_pass_grants_with_moodle_ids_in_the_evidence_and_the_rest_waits() {
    let lw = LmsWorld::new(MOODLE, "42", "");
    let f = &lw.fake;
    f.moodle_course(42);
    let anna = lw.w.slapd.add_user("anna", "Anna");
    for user in ["bertil", "cecilia", "dora"] {
        lw.w.slapd.add_user(user, user);
        lw.w.simple_order(&format!("O-{user}"), user, &["wim"]);
    }
    lw.w.simple_order("O-anna", "anna", &["wim"]);
    f.moodle_user("anna", 101);
    f.moodle_user("bertil", 102);
    f.moodle_user("cecilia", 103);
    // dora has no Moodle account; cecilia has one but is not enrolled.
    f.moodle_completion(
        42,
        101,
        MoodleCompletion::Completed(vec![Some(1_763_633_702), Some(1_763_720_102), None]),
    );
    f.moodle_completion(42, 102, MoodleCompletion::Incomplete);

    let out = lw.apply();
    expect_exit(&out, 0);
    assert_eq!(lw.members(), set(&[PLACEHOLDER_DN, &anna]));

    let evidence = lw.evidence("anna");
    assert_eq!(evidence["course"], "wim-grund");
    assert_eq!(evidence["source"], format!("moodle:{}", f.url()));
    // The latest timecompleted of the criteria.
    assert_eq!(evidence["passed_at"], utc(1_763_720_102));
    assert_eq!(
        evidence["platform_ref"],
        json!({"platform": "moodle", "course_id": "42", "user_id": "101", "completed_at": "1763720102"})
    );
    expect_exit(&lw.w.run(&["audit", "verify"]), 0);

    // The documented requests: POST, token and format in the form, never in the URL.
    let seen = f.take_seen();
    for s in &seen {
        assert_eq!(s.method, "POST", "{s:?}");
        assert_eq!(s.path, "/webservice/rest/server.php");
        assert!(s.query.is_empty(), "parameters in the URL: {s:?}");
        assert_eq!(s.param("wstoken"), Some(MOODLE_TOKEN));
        assert_eq!(s.param("moodlewsrestformat"), Some("json"));
    }
    let users: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.param("wsfunction") == Some("core_user_get_users_by_field"))
        .collect();
    assert_eq!(users.len(), 1, "one call resolves every user: {users:?}");
    assert_eq!(users[0].param("field"), Some("username"));
    let asked: BTreeSet<&str> = users[0]
        .form
        .iter()
        .filter(|(k, _)| k.starts_with("values["))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(asked, BTreeSet::from(["anna", "bertil", "cecilia", "dora"]));
    let completions: BTreeSet<(&str, &str)> = seen
        .iter()
        .filter(|s| s.param("wsfunction") == Some("core_completion_get_course_completion_status"))
        .map(|s| (s.param("courseid").unwrap(), s.param("userid").unwrap()))
        .collect();
    assert_eq!(
        completions,
        BTreeSet::from([("42", "101"), ("42", "102"), ("42", "103")]),
        "no completion call for a user Moodle does not have"
    );

    for user in ["bertil", "cecilia", "dora"] {
        let text = lw.explain(user);
        assert!(
            text.contains("wait — waiting for course: Wim – grundkurs"),
            "{user}: {text}"
        );
    }
    // explain asks about its user only: one user lookup each, a completion call for the two
    // Moodle has (none for dora).
    let seen = f.take_seen();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let completions: Vec<&str> = seen.iter().filter_map(|s| s.param("userid")).collect();
    assert_eq!(completions, ["102", "103"], "{seen:?}");
    assert!(lw.explain("anna").contains("wim (Wim (RIS)): grant"));
    assert_no_secret_in_trace_output(&lw.w, &[MOODLE_TOKEN]);
}

#[test]
fn moodle_failures_hold_and_revoke_nothing() {
    let lw = LmsWorld::new(MOODLE, "42", "");
    let f = &lw.fake;
    f.moodle_course(42);
    let anna = lw.w.slapd.add_user("anna", "Anna");
    let bertil = lw.w.slapd.add_user("bertil", "Bertil");
    f.moodle_user("anna", 101);
    f.moodle_user("bertil", 102);
    f.moodle_completion(
        42,
        101,
        MoodleCompletion::Completed(vec![Some(1_763_633_702)]),
    );
    f.moodle_completion(
        42,
        102,
        MoodleCompletion::Completed(vec![Some(1_763_633_702)]),
    );
    lw.w.simple_order("O-anna", "anna", &["wim"]);
    expect_exit(&lw.apply(), 0);
    assert!(lw.members().contains(&anna));
    lw.w.simple_order("O-bertil", "bertil", &["wim"]);

    for (fault, cause) in [
        (Fault::Status(500), "server_error"),
        (Fault::Status(503), "server_error"),
        (Fault::Status(401), "unauthorized"),
        (Fault::Status(403), "forbidden"),
        (Fault::Garbage, "malformed"),
        (Fault::WrongShape, "unexpected_shape"),
        (Fault::MoodleError("invalidtoken"), "unauthorized"),
        (Fault::MoodleError("accessexception"), "forbidden"),
        (Fault::MoodleError("nocriteriaset"), "platform_error"),
        (Fault::Slow(Duration::from_secs(10)), "timeout"),
        (Fault::Drip(Duration::from_secs(10)), "timeout"),
    ] {
        f.set_fault(fault.clone());
        let (seen, took) = holds(&lw, &anna, &bertil, cause, &format!("{fault:?}"));
        if matches!(fault, Fault::Slow(_) | Fault::Drip(_)) {
            assert!(
                took < Duration::from_secs(5),
                "a slow Moodle stalled the run for {took:?}"
            );
            assert_eq!(
                seen.len(),
                1,
                "the pass stops asking after a timeout: {seen:?}"
            );
        }
    }
    f.set_fault(Fault::None);

    // Moodle's own answer to a wrong token, and a token file that is gone.
    write_file(lw.w.dir.path(), "moodle.token", "not-the-token\n");
    let out = lw.apply();
    assert!(
        stderr(&out).contains("Moodle rejected the web service token (invalidtoken"),
        "{}",
        describe(&out)
    );
    holds(&lw, &anna, &bertil, "unauthorized", "wrong token");
    std::fs::remove_file(lw.w.path("moodle.token")).unwrap();
    let (seen, _) = holds(&lw, &anna, &bertil, "secret", "token file missing");
    assert!(seen.is_empty(), "asked without a token: {seen:?}");
    write_file(
        lw.w.dir.path(),
        "moodle.token",
        &format!("{MOODLE_TOKEN}\n"),
    );

    // Nothing listens there.
    lw.set_lms(&MOODLE.replace("{URL}", &format!("http://127.0.0.1:{}", closed_port())));
    let out = lw.apply();
    assert!(
        stderr(&out).contains("Connection refused"),
        "{}",
        describe(&out)
    );
    holds(&lw, &anna, &bertil, "connect", "connection refused");
    lw.set_lms(MOODLE);

    // A course id Moodle does not have: its error on the completion call, for both users.
    let config = std::fs::read_to_string(&lw.w.config).unwrap();
    std::fs::write(
        &lw.w.config,
        config.replace("lms_id = \"42\"", "lms_id = \"43\""),
    )
    .unwrap();
    let out = lw.apply();
    assert!(
        stderr(&out).contains("2 lookups unknown (platform_error): Moodle error invalidrecord"),
        "{}",
        describe(&out)
    );
    let (seen, _) = holds(&lw, &anna, &bertil, "platform_error", "unknown course");
    assert_eq!(
        seen.len(),
        3,
        "one user lookup, two completion calls: {seen:?}"
    );
    lw.set_lms(MOODLE);

    // The platform is back: the pending order converges.
    expect_exit(&lw.apply(), 0);
    assert_eq!(lw.members(), set(&[PLACEHOLDER_DN, &anna, &bertil]));
    // A positive "not passed" is what lapses (and, with revoke_on_lapse and no grace, revokes).
    f.moodle_completion(42, 101, MoodleCompletion::Incomplete);
    expect_exit(&lw.apply(), 0);
    assert_eq!(lw.members(), set(&[PLACEHOLDER_DN, &bertil]));
    expect_exit(&lw.w.run(&["audit", "verify"]), 0);
}

// === Canvas ===

fn canvas_user(id: u64, login: &str, completed_at: Option<&str>) -> CanvasUser {
    CanvasUser {
        id,
        login: login.to_string(),
        login_visible: true,
        completed_at: completed_at.map(str::to_string),
    }
}

#[test]
fn canvas_per_user_and_bulk_answers_agree_over_paginated_listings() {
    let lw = LmsWorld::new(CANVAS, "12", "");
    let f = &lw.fake;
    let users = ["anna", "bertil", "cecilia", "dora", "erik", "fredrik"];
    let dns: Vec<String> = users.iter().map(|u| lw.w.slapd.add_user(u, u)).collect();
    let [anna, _, _, dora, erik, _] = [0, 1, 2, 3, 4, 5].map(|i| dns[i].clone());
    f.canvas_user("12", canvas_user(1, "anna", Some("2026-11-20T10:15:02Z")));
    f.canvas_user("12", canvas_user(2, "bertil", None));
    // cecilia is not enrolled.
    f.canvas_user("12", canvas_user(4, "dora", Some("2026-11-21T08:00:00Z")));
    // erik is enrolled, but the listing does not show his login.
    f.canvas_user(
        "12",
        CanvasUser {
            login_visible: false,
            ..canvas_user(5, "erik", Some("2026-11-22T09:30:00Z"))
        },
    );
    f.canvas_user("12", canvas_user(6, "fredrik", None));
    for (id, login) in [(7, "other1"), (8, "other2"), (9, "other3")] {
        f.canvas_user("12", canvas_user(id, login, None));
    }

    // Three users: below bulk_threshold, one request each.
    for user in &users[..3] {
        lw.w.simple_order(&format!("O-{user}"), user, &["wim"]);
    }
    expect_exit(&lw.apply(), 0);
    assert_eq!(lw.members(), set(&[PLACEHOLDER_DN, &anna]));
    let evidence = lw.evidence("anna");
    assert_eq!(evidence["source"], format!("canvas:{}", f.url()));
    assert_eq!(evidence["passed_at"], "2026-11-20T10:15:02Z");
    assert_eq!(
        evidence["platform_ref"],
        json!({"platform": "canvas", "course_id": "12", "completed_at": "2026-11-20T10:15:02Z"})
    );
    let seen = f.take_seen();
    for s in &seen {
        assert_eq!(s.method, "GET");
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {CANVAS_TOKEN}").as_str())
        );
    }
    let progress: BTreeSet<&str> = seen
        .iter()
        .filter(|s| s.path.ends_with("/progress"))
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(
        progress,
        BTreeSet::from([
            "/api/v1/courses/12/users/sis_login_id:anna/progress",
            "/api/v1/courses/12/users/sis_login_id:bertil/progress",
            "/api/v1/courses/12/users/sis_login_id:cecilia/progress",
        ])
    );
    // cecilia's 404: does the course exist? Asked once.
    assert_eq!(
        seen.iter()
            .filter(|s| s.path == "/api/v1/courses/12")
            .count(),
        1
    );
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(lw.explain("cecilia").contains("wait — waiting for course"));

    // Six users: the course's listings, read page by page (two per page).
    for user in &users[3..] {
        lw.w.simple_order(&format!("O-{user}"), user, &["wim"]);
    }
    // (explain asked Canvas too.)
    f.take_seen();
    expect_exit(&lw.apply(), 0);
    assert_eq!(lw.members(), set(&[PLACEHOLDER_DN, &anna, &dora, &erik]));
    let seen = f.take_seen();
    let pages = |listing: &str| -> Vec<String> {
        let path = format!("/api/v1/courses/12/{listing}");
        seen.iter()
            .filter(|s| s.path == path)
            .map(|s| s.param("page").unwrap_or("1").to_string())
            .collect()
    };
    // Eight users enrolled, two per page.
    assert_eq!(pages("users"), ["1", "2", "3", "4"]);
    assert_eq!(pages("bulk_user_progress"), ["1", "2", "3", "4"]);
    // Asked one by one: only whom the listings cannot answer for.
    let per_user: BTreeSet<&str> = seen
        .iter()
        .filter(|s| s.path.ends_with("/progress"))
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(
        per_user,
        BTreeSet::from([
            "/api/v1/courses/12/users/sis_login_id:cecilia/progress",
            "/api/v1/courses/12/users/sis_login_id:erik/progress",
        ])
    );
    // From the bulk endpoint, with Canvas's id of the user.
    assert_eq!(lw.evidence("dora")["platform_ref"]["user_id"], "4");
    assert!(lw.evidence("erik")["platform_ref"].get("user_id").is_none());
    let plan = lw.w.plan_json();
    assert_eq!(plan["changes"].as_array().unwrap().len(), 0, "{plan}");
    assert_no_secret_in_trace_output(&lw.w, &[CANVAS_TOKEN]);
}

#[test]
fn canvas_failures_hold_and_revoke_nothing() {
    let lw = LmsWorld::new(CANVAS, "12", "");
    let f = &lw.fake;
    let anna = lw.w.slapd.add_user("anna", "Anna");
    let bertil = lw.w.slapd.add_user("bertil", "Bertil");
    f.canvas_user("12", canvas_user(1, "anna", Some("2026-11-20T10:15:02Z")));
    f.canvas_user("12", canvas_user(2, "bertil", Some("2026-11-20T10:15:02Z")));
    lw.w.simple_order("O-anna", "anna", &["wim"]);
    expect_exit(&lw.apply(), 0);
    assert!(lw.members().contains(&anna));
    // bertil and three more wait for answers: five lookups, two at a time.
    lw.w.simple_order("O-bertil", "bertil", &["wim"]);
    for (i, user) in ["c1", "c2", "c3"].iter().enumerate() {
        lw.w.slapd.add_user(user, user);
        f.canvas_user(
            "12",
            canvas_user(10 + i as u64, user, Some("2026-11-20T10:15:02Z")),
        );
        lw.w.simple_order(&format!("O-{user}"), user, &["wim"]);
    }

    let faults = [
        (Fault::Status(500), "server_error"),
        (Fault::Status(502), "server_error"),
        (Fault::Status(401), "unauthorized"),
        (Fault::Status(403), "forbidden"),
        (Fault::Garbage, "malformed"),
        (Fault::WrongShape, "unexpected_shape"),
        (
            Fault::Throttle {
                status: 429,
                retry_after: Some(30),
            },
            "throttled",
        ),
        (
            Fault::Throttle {
                status: 403,
                retry_after: None,
            },
            "throttled",
        ),
        (Fault::Slow(Duration::from_secs(10)), "timeout"),
    ];
    // Per user, and with the bulk listings.
    for (threshold, bulk) in [(100, false), (2, true)] {
        lw.set_lms(&CANVAS.replace(
            "bulk_threshold = 4",
            &format!("bulk_threshold = {threshold}"),
        ));
        for (fault, cause) in faults
            .iter()
            .cloned()
            .chain(bulk.then_some((Fault::ForeignNextLink, "unexpected_shape")))
        {
            f.set_fault(fault.clone());
            let what = format!("{fault:?}, bulk {bulk}");
            let (seen, took) = holds(&lw, &anna, &bertil, cause, &what);
            if cause != "malformed" && cause != "unexpected_shape" {
                // Platform-wide: no new request once one failed (two were in flight).
                assert!(seen.len() <= 2, "{what}: {} requests: {seen:?}", seen.len());
            }
            if matches!(fault, Fault::Slow(_)) {
                assert!(
                    took < Duration::from_secs(5),
                    "{what}: the run took {took:?}"
                );
            }
            if fault == Fault::ForeignNextLink {
                assert!(seen.iter().all(|s| s.param("page") != Some("2")));
            }
        }
    }
    f.set_fault(Fault::None);

    // A course that does not exist is unknown, not "not passed" for everyone.
    lw.set_lms(&CANVAS.replace("bulk_threshold = 4", "bulk_threshold = 100"));
    let config = std::fs::read_to_string(&lw.w.config).unwrap();
    std::fs::write(
        &lw.w.config,
        config.replace("lms_id = \"12\"", "lms_id = \"99\""),
    )
    .unwrap();
    let (seen, _) = holds(&lw, &anna, &bertil, "not_found", "unknown course");
    assert_eq!(
        seen.iter()
            .filter(|s| s.path == "/api/v1/courses/99")
            .count(),
        1,
        "{seen:?}"
    );

    lw.set_lms(&CANVAS.replace("{URL}", &format!("http://127.0.0.1:{}", closed_port())));
    holds(&lw, &anna, &bertil, "connect", "connection refused");

    lw.set_lms(CANVAS);
    expect_exit(&lw.apply(), 0);
    assert!(lw.members().contains(&bertil));
    f.canvas_user("12", canvas_user(1, "anna", None));
    expect_exit(&lw.apply(), 0);
    assert!(
        !lw.members().contains(&anna),
        "a positive not-passed lapses and revokes"
    );
    expect_exit(&lw.w.run(&["audit", "verify"]), 0);
}

// === xAPI ===

fn mbox(user: &str) -> Value {
    json!({"objectType": "Agent", "mbox": format!("mailto:{user}@example.org")})
}

fn account(user: &str) -> Value {
    json!({"objectType": "Agent", "account": {"homePage": "https://lms.example.org", "name": user}})
}

#[test]
fn xapi_statements_grant_by_mail_or_account_and_the_rest_waits() {
    let lw = LmsWorld::new(XAPI, ACTIVITY, "");
    let f = &lw.fake;
    let [anna, _, cecilia, _] = ["anna", "bertil", "cecilia", "dora"].map(|u| {
        let dn = lw.w.slapd.add_user(u, u);
        lw.w.simple_order(&format!("O-{u}"), u, &["wim"]);
        dn
    });
    // anna passed three times (two pages of two); the latest counts.
    f.statement(statement(
        "a-1",
        mbox("anna"),
        PASSED,
        ACTIVITY,
        "2026-10-01T09:00:00Z",
    ));
    f.statement(statement(
        "a-2",
        mbox("anna"),
        PASSED,
        ACTIVITY,
        "2026-11-20T10:15:02Z",
    ));
    f.statement(statement(
        "a-3",
        mbox("anna"),
        PASSED,
        ACTIVITY,
        "2026-09-01T09:00:00Z",
    ));
    // bertil completed without success, and passed another activity.
    let mut failed = statement(
        "b-1",
        mbox("bertil"),
        COMPLETED,
        ACTIVITY,
        "2026-11-20T10:00:00Z",
    );
    failed["result"]["success"] = json!(false);
    f.statement(failed);
    f.statement(statement(
        "b-2",
        mbox("bertil"),
        PASSED,
        "https://lms.example.org/activities/other",
        "2026-11-20T10:00:00Z",
    ));
    // cecilia satisfied the cmi5 course.
    f.statement(statement(
        "c-1",
        mbox("cecilia"),
        SATISFIED,
        ACTIVITY,
        "2026-11-21T08:00:00+01:00",
    ));
    // dora has nothing.

    expect_exit(&lw.apply(), 0);
    assert_eq!(lw.members(), set(&[PLACEHOLDER_DN, &anna, &cecilia]));
    let evidence = lw.evidence("anna");
    assert_eq!(evidence["source"], format!("xapi:{}/xapi", f.url()));
    assert_eq!(evidence["passed_at"], "2026-11-20T10:15:02Z");
    assert_eq!(
        evidence["platform_ref"],
        json!({"platform": "xapi", "course_id": ACTIVITY, "statement_id": "a-2", "verb": PASSED,
               "completed_at": "2026-11-20T10:15:02Z"})
    );
    assert_eq!(lw.evidence("cecilia")["platform_ref"]["verb"], SATISFIED);

    let seen = f.take_seen();
    let basic = format!(
        "Basic {}",
        base64_encode(format!("{LRS_USER}:{LRS_PASSWORD}").as_bytes())
    );
    for s in &seen {
        assert_eq!(s.method, "GET");
        assert_eq!(s.header("authorization"), Some(basic.as_str()));
        assert_eq!(s.header("x-experience-api-version"), Some("1.0.3"));
    }
    let queries: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == "/xapi/statements")
        .collect();
    // Four users, three verbs each.
    assert_eq!(queries.len(), 12, "{queries:?}");
    let verbs: BTreeSet<&str> = queries.iter().map(|s| s.param("verb").unwrap()).collect();
    assert_eq!(verbs, BTreeSet::from([PASSED, COMPLETED, SATISFIED]));
    for s in &queries {
        assert_eq!(s.param("activity"), Some(ACTIVITY));
        let agent: Value = serde_json::from_str(s.param("agent").unwrap()).unwrap();
        let mail = agent["mbox"].as_str().unwrap();
        assert!(
            mail.starts_with("mailto:") && mail.ends_with("@example.org"),
            "{agent}"
        );
    }
    assert_eq!(
        to(&seen, "/xapi/statements/more/").len(),
        1,
        "the second page of anna's passes"
    );
    for user in ["bertil", "dora"] {
        assert!(
            lw.explain(user).contains("wait — waiting for course"),
            "{user}"
        );
    }

    // Learners known by an account instead of a mailbox.
    lw.set_lms(&format!(
        "{XAPI}\nagent_account = {{ home_page = \"https://lms.example.org\", name = \"{{user}}\" }}"
    ));
    for user in ["anna", "cecilia", "erik"] {
        f.statement(statement(
            &format!("{user}-acct"),
            account(user),
            PASSED,
            ACTIVITY,
            "2026-11-25T12:00:00Z",
        ));
    }
    let erik = lw.w.slapd.add_user("erik", "Erik");
    lw.w.simple_order("O-erik", "erik", &["wim"]);
    expect_exit(&lw.apply(), 0);
    assert_eq!(lw.members(), set(&[PLACEHOLDER_DN, &anna, &cecilia, &erik]));
    assert_eq!(
        lw.evidence("erik")["platform_ref"]["statement_id"],
        "erik-acct"
    );
    let agents: BTreeSet<String> = f
        .take_seen()
        .iter()
        .filter_map(|s| s.param("agent").map(str::to_string))
        .collect();
    assert!(agents.contains(&account("erik").to_string()), "{agents:?}");
    assert_no_secret_in_trace_output(
        &lw.w,
        &[
            LRS_PASSWORD,
            &base64_encode(format!("{LRS_USER}:{LRS_PASSWORD}").as_bytes()),
        ],
    );
}

#[test]
fn xapi_failures_hold_and_revoke_nothing() {
    let lw = LmsWorld::new(XAPI, ACTIVITY, "");
    let f = &lw.fake;
    let anna = lw.w.slapd.add_user("anna", "Anna");
    let bertil = lw.w.slapd.add_user("bertil", "Bertil");
    // Three statements each: answers span pages.
    for user in ["anna", "bertil"] {
        for (i, day) in ["01", "02", "03"].iter().enumerate() {
            f.statement(statement(
                &format!("{user}-{i}"),
                mbox(user),
                PASSED,
                ACTIVITY,
                &format!("2026-11-{day}T10:00:00Z"),
            ));
        }
    }
    lw.w.simple_order("O-anna", "anna", &["wim"]);
    expect_exit(&lw.apply(), 0);
    assert!(lw.members().contains(&anna));
    lw.w.simple_order("O-bertil", "bertil", &["wim"]);

    for (fault, cause) in [
        (Fault::Status(500), "server_error"),
        (Fault::Status(401), "unauthorized"),
        (Fault::Status(403), "forbidden"),
        (Fault::Status(400), "http_status"),
        (Fault::Garbage, "malformed"),
        (Fault::WrongShape, "unexpected_shape"),
        (Fault::ForeignNextLink, "unexpected_shape"),
        (
            Fault::Throttle {
                status: 429,
                retry_after: Some(5),
            },
            "throttled",
        ),
        (Fault::Slow(Duration::from_secs(10)), "timeout"),
    ] {
        f.set_fault(fault.clone());
        let (seen, took) = holds(&lw, &anna, &bertil, cause, &format!("{fault:?}"));
        if matches!(fault, Fault::Slow(_)) {
            assert!(
                took < Duration::from_secs(5),
                "a slow LRS stalled the run for {took:?}"
            );
            assert!(seen.len() <= 2, "{seen:?}");
        }
    }
    f.set_fault(Fault::None);

    // A wrong password: the LRS says 401.
    write_file(lw.w.dir.path(), "lrs-password", "wrong\n");
    holds(&lw, &anna, &bertil, "unauthorized", "wrong password");
    write_file(
        lw.w.dir.path(),
        "lrs-password",
        &format!("{LRS_PASSWORD}\n"),
    );

    lw.set_lms(&XAPI.replace("{URL}", &format!("http://127.0.0.1:{}", closed_port())));
    holds(&lw, &anna, &bertil, "connect", "connection refused");
    lw.set_lms(XAPI);

    // A person without mail cannot be named to the LRS: unknown, and only for them.
    lw.w.slapd.add_ldif(&format!(
        "dn: uid=gustav,{PEOPLE_BASE}\nobjectClass: inetOrgPerson\nuid: gustav\ncn: Gustav\nsn: Gustav\n"
    ));
    lw.w.simple_order("O-gustav", "gustav", &["wim"]);
    let out = lw.apply();
    expect_exit(&out, 1);
    assert!(
        stderr(&out).contains("1 lookup unknown (no_agent)"),
        "{}",
        describe(&out)
    );
    assert!(lw.members().contains(&bertil), "the others converge");
    assert!(lw.explain("gustav").contains("hold"));

    // anna's passes are voided (an LRS no longer returns voided statements): a positive "not
    // passed", which lapses and, with revoke_on_lapse and no grace, revokes.
    lw.w.withdraw("O-gustav");
    f.retain_statements(|s| s["actor"] != mbox("anna"));
    expect_exit(&lw.apply(), 0);
    assert_eq!(lw.members(), set(&[PLACEHOLDER_DN, &bertil]));
    expect_exit(&lw.w.run(&["audit", "verify"]), 0);
}

// === the daemon: cache, TTL, throttling ===

#[test]
fn daemon_asks_each_pair_once_per_ttl_and_waits_out_throttling() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lw = LmsWorld::new(
        &CANVAS.replace(
            "timeout = \"300ms\"",
            "timeout = \"2s\"\ncache_ttl = \"1h\"",
        ),
        "12",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let f = &lw.fake;
    let w = &lw.w;
    let users = ["anna", "bertil", "cecilia", "dora", "erik"];
    let dns: Vec<String> = users.iter().map(|u| w.slapd.add_user(u, u)).collect();
    f.canvas_user("12", canvas_user(1, "anna", Some("2026-11-20T10:15:02Z")));
    f.canvas_user("12", canvas_user(2, "bertil", None));
    f.canvas_user(
        "12",
        canvas_user(3, "cecilia", Some("2026-11-20T10:15:02Z")),
    );
    f.canvas_user("12", canvas_user(4, "dora", Some("2026-11-20T10:15:02Z")));
    f.canvas_user("12", canvas_user(5, "erik", Some("2026-11-20T10:15:02Z")));
    w.simple_order("O-anna", "anna", &["wim"]);
    let mut d = Running::spawn(w, port);
    d.wait_for("anna granted", |_| w.members(WIM_GROUP).contains(&dns[0]));

    let asked_about = |seen: &[Seen], user: &str| {
        seen.iter()
            .filter(|s| s.path.contains(&format!("sis_login_id:{user}/")))
            .count()
    };
    let passes = |d: &Running| d.log().matches("reconcile finished").count();

    // Each new order: only the new pair is asked about (by the quick pass; the full pass that
    // follows finds it in the cache).
    for (i, user) in ["bertil", "cecilia"].iter().enumerate() {
        f.take_seen();
        let before = passes(&d);
        w.simple_order(&format!("O-{user}"), user, &["wim"]);
        d.wait_for("a pass for the new order", |d| passes(d) > before);
        let seen = f.take_seen();
        assert_eq!(asked_about(&seen, user), 1, "{seen:?}");
        assert_eq!(
            asked_about(&seen, "anna"),
            0,
            "anna asked again within the TTL: {seen:?}"
        );
        if i == 1 {
            assert_eq!(
                asked_about(&seen, "bertil"),
                0,
                "a pending answer asked again within the TTL"
            );
        }
    }
    d.wait_for("cecilia granted", |_| {
        w.members(WIM_GROUP).contains(&dns[2])
    });
    d.wait_for("ready", |d| d.http("/readyz").0 == 200);
    let (_, metrics) = d.http("/metrics");
    assert!(
        metrics.contains("coursegate_lms_requests_total{platform=\"canvas\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("coursegate_lms_cache_hits_total{platform=\"canvas\"}"),
        "{metrics}"
    );

    // Throttled: the one request that met it, then none until Retry-After has passed, while
    // the daemon keeps retrying the held order.
    f.set_fault(Fault::Throttle {
        status: 429,
        retry_after: Some(3600),
    });
    f.take_seen();
    w.simple_order("O-dora", "dora", &["wim"]);
    d.wait_for("not ready: throttled", |d| {
        let (code, body) = d.http("/readyz");
        code == 503 && body.contains("course results unavailable") && body.contains("throttl")
    });
    assert_eq!(f.requests(), 1);
    let before = passes(&d);
    w.simple_order("O-erik", "erik", &["wim"]);
    d.wait_for("two more passes", |d| passes(d) >= before + 2);
    assert_eq!(
        f.requests(),
        1,
        "asked a platform that said Retry-After: {:?}",
        f.take_seen()
    );
    let members = w.members(WIM_GROUP);
    assert!(
        members.contains(&dns[0]) && members.contains(&dns[2]),
        "nothing revoked"
    );
    assert!(!members.contains(&dns[3]) && !members.contains(&dns[4]));
    let (_, metrics) = d.http("/metrics");
    assert!(
        metrics.contains("coursegate_lms_errors_total{platform=\"canvas\",kind=\"throttled\"}"),
        "{metrics}"
    );
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    assert!(!d.log().contains(CANVAS_TOKEN));
}

#[test]
fn daemon_rechecks_pending_orders_at_every_resync_and_granted_ones_at_reverify_interval() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let lw = LmsWorld::new(
        &format!("{MOODLE}\ncache_ttl = \"1h\""),
        "42",
        &format!("listen = \"127.0.0.1:{port}\"\nresync_interval = \"1s\""),
    );
    let f = &lw.fake;
    let w = &lw.w;
    f.moodle_course(42);
    let anna = w.slapd.add_user("anna", "Anna");
    let bertil = w.slapd.add_user("bertil", "Bertil");
    f.moodle_user("anna", 101);
    f.moodle_user("bertil", 102);
    f.moodle_completion(
        42,
        101,
        MoodleCompletion::Completed(vec![Some(1_763_633_702)]),
    );
    f.moodle_completion(42, 102, MoodleCompletion::Incomplete);
    w.simple_order("O-anna", "anna", &["wim"]);
    w.simple_order("O-bertil", "bertil", &["wim"]);
    let mut d = Running::spawn(w, port);
    d.wait_for("anna granted", |_| w.members(WIM_GROUP).contains(&anna));

    let completions_of = |seen: &[Seen], user_id: &str| {
        seen.iter()
            .filter(|s| s.param("userid") == Some(user_id))
            .count()
    };
    // bertil's "not passed" is asked again at every resync although cache_ttl is an hour ...
    f.take_seen();
    let mut seen: Vec<Seen> = Vec::new();
    d.wait_for("bertil asked again at two resyncs", |_| {
        seen.extend(f.take_seen());
        completions_of(&seen, "102") >= 2
    });
    // ... anna's pass, which her membership rests on, only after reverify_interval (24h).
    assert_eq!(completions_of(&seen, "101"), 0, "{seen:?}");

    // bertil completes the course: granted within a resync, no file event needed.
    f.moodle_completion(
        42,
        102,
        MoodleCompletion::Completed(vec![Some(1_763_720_102)]),
    );
    d.wait_for("bertil granted at a resync", |_| {
        w.members(WIM_GROUP).contains(&bertil)
    });
    assert_eq!(completions_of(&f.take_seen(), "101"), 0);
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    expect_exit(&w.run(&["audit", "verify"]), 0);
}
