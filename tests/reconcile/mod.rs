//! End-to-end reconcile tests: the real `coursegate` binary against a real slapd, with order
//! files, a results report and config written into a temp dir. Directory state is always read
//! back with `ldapsearch` (the harness), never through coursegate's own LDAP code.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;
use tempfile::TempDir;

use crate::common::*;

/// A test world: a slapd, a config, an order directory and a results report.
pub struct World {
    pub slapd: Slapd,
    pub dir: TempDir,
    pub config: PathBuf,
}

pub const COURSES: &str = r#"
[courses.wim-grund]
title = "Wim – grundkurs"
lms_id = "Wim grundkurs"
url = "https://pingpong.example.org/courseId/1"

[courses.pacs-grund]
title = "PACS – grundkurs"
lms_id = "PACS grundkurs"

[access.wim]
title = "Wim (RIS)"
group = "cn=wim-users,ou=groups,dc=example,dc=org"
courses = ["wim-grund"]

[access.pacs]
group = "cn=pacs-users,ou=groups,dc=example,dc=org"
courses = ["pacs-grund"]
"#;

impl World {
    pub fn new() -> World {
        World::with(Slapd::start(), "", "member", COURSES)
    }

    /// `daemon_extra` goes into `[daemon]`, `ldap_extra` sets `member_attribute` etc.
    pub fn with(slapd: Slapd, daemon_extra: &str, member_attribute: &str, profiles: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("desired")).unwrap();
        write_file(
            dir.path(),
            "ldap-password",
            &format!("{SERVICE_PASSWORD}\n"),
        );
        write_file(dir.path(), "results.csv", "Username;Course;Passed;Date\n");
        let config = write_file(
            dir.path(),
            "coursegate.toml",
            &format!(
                r#"
[daemon]
desired_dir = "desired"
state_dir = "state"
audit_log = "audit.jsonl"
{daemon_extra}

[ldap]
url = "{url}"
bind_dn = "{SERVICE_DN}"
bind_password_file = "ldap-password"
user_base = "{PEOPLE_BASE}"
user_filter = "(uid={{user}})"
member_attribute = "{member_attribute}"
placeholder_member = "{PLACEHOLDER_DN}"

[lms]
kind = "csv"
path = "results.csv"
{profiles}
"#,
                url = slapd.url()
            ),
        );
        World { slapd, dir, config }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn order(&self, name: &str, text: &str) {
        write_file(&self.path("desired"), name, text);
    }

    pub fn simple_order(&self, id: &str, user: &str, access: &[&str]) {
        let access: Vec<String> = access.iter().map(|a| format!("\"{a}\"")).collect();
        self.order(
            &format!("{id}.toml"),
            &format!(
                "id = \"{id}\"\nuser = {}\naccess = [{}]\nordered_by = \"karin.chef\"\n",
                toml_string(user),
                access.join(", ")
            ),
        );
    }

    /// Adds `n` accounts `<prefix>00000…` who all passed the Wim course (the report lists only
    /// them). Returns their names and DNs.
    pub fn passed_users(&self, prefix: &str, n: usize) -> (Vec<String>, Vec<String>) {
        let users: Vec<String> = (0..n).map(|i| format!("{prefix}{i:05}")).collect();
        let pairs: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), u.as_str())).collect();
        let dns = self.slapd.add_users(&pairs);
        let rows: Vec<String> = users
            .iter()
            .map(|u| format!("{u};Wim grundkurs;true;2026-11-01"))
            .collect();
        self.results(&rows.iter().map(String::as_str).collect::<Vec<_>>());
        (users, dns)
    }

    pub fn withdraw(&self, id: &str) {
        std::fs::remove_file(self.path("desired").join(format!("{id}.toml"))).unwrap();
    }

    pub fn results(&self, rows: &[&str]) {
        let mut text = "Username;Course;Passed;Date\n".to_string();
        for r in rows {
            text.push_str(r);
            text.push('\n');
        }
        write_file(self.dir.path(), "results.csv", &text);
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run_coursegate(&self.config, args)
    }

    pub fn members(&self, group: &str) -> BTreeSet<String> {
        self.slapd.members(group, "member")
    }

    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn plan_json(&self) -> Value {
        let out = self.run(&["plan", "--json"]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("plan --json printed no JSON ({e}):\n{}", describe(&out)))
    }
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn expect_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "{}", describe(out));
}

pub fn set(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|v| v.to_string()).collect()
}

pub fn actions(audit: &[Value], action: &str) -> Vec<Value> {
    audit
        .iter()
        .filter(|r| r["action"] == action)
        .cloned()
        .collect()
}

#[test]
fn grant_wait_and_a_second_plan_is_empty() {
    let w = World::new();
    let anna = w.slapd.add_user("anna.andersson", "Anna Andersson");
    w.results(&["anna.andersson;Wim grundkurs;true;2026-11-20"]);
    w.order(
        "BEST-2026-0042.toml",
        "id = \"BEST-2026-0042\"\nuser = \"anna.andersson\"\naccess = [\"wim\", \"pacs\"]\nordered_by = \"karin.chef\"\nticket = \"EASIT-123456\"\n",
    );

    let plan = w.plan_json();
    assert_eq!(plan["brake"], false);
    let changes = plan["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{plan}");
    assert_eq!(changes[0]["action"], "grant");
    assert_eq!(changes[0]["user"], "anna.andersson");
    assert_eq!(changes[0]["access"], "wim");
    assert_eq!(changes[0]["group"], WIM_GROUP);
    assert_eq!(changes[0]["order"], "BEST-2026-0042");
    assert_eq!(
        w.members(WIM_GROUP),
        set(&[PLACEHOLDER_DN]),
        "plan changed the directory"
    );

    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &anna]));
    assert_eq!(w.members(PACS_GROUP), set(&[PLACEHOLDER_DN]));

    let grants = actions(&w.audit(), "grant");
    assert_eq!(grants.len(), 1);
    let g = &grants[0];
    assert_eq!(g["user_dn"], anna);
    assert_eq!(g["ticket"], "EASIT-123456");
    assert_eq!(g["evidence"][0]["course"], "wim-grund");
    assert_eq!(g["evidence"][0]["passed_at"], "2026-11-20");
    assert_eq!(g["evidence"][0]["source"], "csv:results.csv");

    let plan = w.plan_json();
    assert_eq!(plan["changes"].as_array().unwrap().len(), 0, "{plan}");
    let out = w.run(&["plan"]);
    expect_exit(&out, 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("No changes."));

    let out = w.run(&["explain", "anna.andersson"]);
    expect_exit(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("wim (Wim (RIS)): grant"), "{text}");
    assert!(
        text.contains("pacs (pacs): wait — waiting for course: PACS – grundkurs"),
        "{text}"
    );

    expect_exit(&w.run(&["audit", "verify"]), 0);
    // Applying again changes nothing and writes no new change record.
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(actions(&w.audit(), "grant").len(), 1);
}

#[test]
fn withdrawal_revokes_but_hand_added_members_stay() {
    let w = World::new();
    let anna = w.slapd.add_user("anna.andersson", "Anna");
    let bertil = w.slapd.add_user("bertil.berg", "Bertil");
    w.slapd.add_member(WIM_GROUP, "member", &bertil);
    w.results(&[
        "anna.andersson;Wim grundkurs;ja;2026-11-20",
        "bertil.berg;Wim grundkurs;ja;2026-11-20",
    ]);
    w.simple_order("O-1", "anna.andersson", &["wim"]);
    // An order for a user who is already a member by hand: coursegate does not take ownership.
    w.simple_order("O-2", "bertil.berg", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &anna, &bertil]));

    w.withdraw("O-1");
    w.withdraw("O-2");
    let plan = w.plan_json();
    let changes = plan["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{plan}");
    assert_eq!(changes[0]["action"], "revoke");
    assert_eq!(changes[0]["user"], "anna.andersson");

    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &bertil]));
    let revokes = actions(&w.audit(), "revoke");
    assert_eq!(revokes.len(), 1);
    assert_eq!(revokes[0]["order"], "O-1");
    expect_exit(&w.run(&["audit", "verify"]), 0);
}

#[test]
fn validity_window_expiry_and_valid_from() {
    let w = World::new();
    let anna = w.slapd.add_user("anna", "Anna");
    w.slapd.add_user("bertil", "Bertil");
    w.results(&[
        "anna;Wim grundkurs;true;2026-01-01",
        "bertil;Wim grundkurs;true;2026-01-01",
    ]);
    w.order(
        "a.toml",
        "id = \"A\"\nuser = \"anna\"\naccess = [\"wim\"]\nordered_by = \"m\"\nvalid_until = 2999-12-31\n",
    );
    w.order(
        "b.toml",
        "id = \"B\"\nuser = \"bertil\"\naccess = [\"wim\"]\nordered_by = \"m\"\nvalid_from = 2999-01-01\n",
    );
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &anna]));
    let text = String::from_utf8_lossy(&w.run(&["explain", "bertil"]).stdout).to_string();
    assert!(text.contains("valid from 2999-01-01"), "{text}");

    // The order expires (the file now says yesterday): revoked.
    w.order(
        "a.toml",
        "id = \"A\"\nuser = \"anna\"\naccess = [\"wim\"]\nordered_by = \"m\"\nvalid_until = 2020-01-01T00:00:00Z\n",
    );
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN]));
    let revoke = &actions(&w.audit(), "revoke")[0];
    assert!(
        revoke["reason"].as_str().unwrap().contains("expired"),
        "{revoke}"
    );
}

#[test]
fn revocation_brake_then_allow_revocations() {
    let w = World::with(
        Slapd::start(),
        "max_revocations_per_run = 2",
        "member",
        COURSES,
    );
    let users = ["u1", "u2", "u3"];
    let dns: Vec<String> = users.iter().map(|u| w.slapd.add_user(u, u)).collect();
    let rows: Vec<String> = users
        .iter()
        .map(|u| format!("{u};Wim grundkurs;1;2026-11-01"))
        .collect();
    w.results(&rows.iter().map(String::as_str).collect::<Vec<_>>());
    for u in users {
        w.simple_order(&format!("O-{u}"), u, &["wim"]);
    }
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP).len(), 4);

    for u in users {
        w.withdraw(&format!("O-{u}"));
    }
    let plan = w.plan_json();
    assert_eq!(plan["brake"], true, "{plan}");
    assert_eq!(
        plan["changes"].as_array().unwrap().len(),
        3,
        "plan lists every revocation"
    );
    expect_exit(&w.run(&["plan"]), 3);

    // New grants still go through while the brake holds every revocation: to pacs (the group
    // whose DN sorts first, whose grants go out while the rest of the plan is made) and to wim.
    let dora = w.slapd.add_user("dora", "Dora");
    let mut rows = rows.clone();
    rows.push("dora;Wim grundkurs;1;2026-11-01".into());
    rows.push("dora;PACS grundkurs;1;2026-11-01".into());
    w.results(&rows.iter().map(String::as_str).collect::<Vec<_>>());
    w.simple_order("O-dora", "dora", &["wim", "pacs"]);

    let out = w.run(&["apply"]);
    expect_exit(&out, 3);
    let members = w.members(WIM_GROUP);
    assert!(
        dns.iter().all(|d| members.contains(d)),
        "brake must hold revocations"
    );
    assert!(members.contains(&dora), "grants go through under the brake");
    let audit = w.audit();
    assert_eq!(actions(&audit, "brake").len(), 1);
    assert!(w.members(PACS_GROUP).contains(&dora));
    // The pacs grant went out while the rest of the plan was made, so its record comes before
    // the brake's, and the wim grant's after; the ledger reflects the whole log.
    let seq = |r: &Value| r["seq"].as_u64().unwrap();
    let grant_seq = |access: &str| {
        actions(&audit, "grant")
            .iter()
            .find(|r| r["user"] == "dora" && r["access"] == access)
            .map(seq)
            .unwrap_or_else(|| panic!("no grant of {access} to dora: {audit:?}"))
    };
    let brake_seq = seq(&actions(&audit, "brake")[0]);
    assert!(grant_seq("pacs") < brake_seq, "{audit:?}");
    assert!(brake_seq < grant_seq("wim"), "{audit:?}");
    let ledger: Value =
        serde_json::from_str(&std::fs::read_to_string(w.path("state/ledger.json")).unwrap())
            .unwrap();
    assert_eq!(
        ledger["applied_seq"].as_u64(),
        Some(seq(audit.last().unwrap()))
    );
    let owned: Vec<&Value> = ledger["owned"].as_object().unwrap().values().collect();
    for access in ["pacs", "wim"] {
        assert!(
            owned
                .iter()
                .any(|o| o["user"] == "dora" && o["access"] == access),
            "{ledger}"
        );
    }
    let status = w.run(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("REVOCATION BRAKE: 3 revocations"),
        "{}",
        describe(&status)
    );

    expect_exit(&w.run(&["apply", "--allow-revocations", "2"]), 3);
    assert_eq!(w.members(WIM_GROUP).len(), 5);
    expect_exit(&w.run(&["apply", "--allow-revocations", "3"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &dora]));
    expect_exit(&w.run(&["audit", "verify"]), 0);
}

/// The modifies of different groups are with the directory at the same time. One the directory
/// refuses (here: the pacs group became a posixGroup, which takes no `member`) holds back no
/// other group: its values get `not-applied` outcomes, the other group's grants are made, and
/// the ledger reflects the whole log. Once the group is mended, the next run makes the rest.
#[test]
fn a_group_the_directory_refuses_holds_back_no_other_group() {
    let w = World::new();
    let users = ["u1", "u2"];
    let dns: Vec<String> = users.iter().map(|u| w.slapd.add_user(u, u)).collect();
    let mut rows = Vec::new();
    for u in users {
        rows.push(format!("{u};Wim grundkurs;1;2026-11-01"));
        rows.push(format!("{u};PACS grundkurs;1;2026-11-01"));
        w.simple_order(&format!("O-{u}"), u, &["wim", "pacs"]);
    }
    w.results(&rows.iter().map(String::as_str).collect::<Vec<_>>());
    let group_of = |class: &str, extra: &str| {
        format!(
            "dn: {PACS_GROUP}\nchangetype: delete\n\ndn: {PACS_GROUP}\nchangetype: add\nobjectClass: {class}\ncn: pacs-users\n{extra}\n"
        )
    };
    w.slapd
        .modify_ldif(&group_of("posixGroup", "gidNumber: 5001"));

    let out = w.run(&["apply"]);
    expect_exit(&out, 1);
    assert_eq!(
        w.members(WIM_GROUP),
        set(&[PLACEHOLDER_DN, &dns[0], &dns[1]])
    );
    let audit = w.audit();
    let pacs_grants: BTreeSet<u64> = actions(&audit, "grant")
        .iter()
        .filter(|r| r["access"] == "pacs")
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(pacs_grants.len(), 2, "{audit:?}");
    let refused: BTreeSet<u64> = actions(&audit, "outcome")
        .iter()
        .filter(|o| o["outcome"] == "not-applied")
        .map(|o| o["ref_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(refused, pacs_grants, "{audit:?}");
    let ledger: Value =
        serde_json::from_str(&std::fs::read_to_string(w.path("state/ledger.json")).unwrap())
            .unwrap();
    assert_eq!(
        ledger["applied_seq"].as_u64(),
        audit.last().and_then(|r| r["seq"].as_u64())
    );
    let owned: BTreeSet<&str> = ledger["owned"]
        .as_object()
        .unwrap()
        .values()
        .map(|o| o["access"].as_str().unwrap())
        .collect();
    assert_eq!(owned, BTreeSet::from(["wim"]), "{ledger}");
    expect_exit(&w.run(&["audit", "verify"]), 0);

    w.slapd.modify_ldif(&group_of(
        "groupOfNames",
        &format!("member: {PLACEHOLDER_DN}"),
    ));
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(
        w.members(PACS_GROUP),
        set(&[PLACEHOLDER_DN, &dns[0], &dns[1]])
    );
    let second_run: Vec<Value> = actions(&w.audit(), "grant")
        .into_iter()
        .filter(|r| r["seq"].as_u64().unwrap() > ledger["applied_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(second_run.len(), 2, "{second_run:?}");
    assert!(
        second_run.iter().all(|r| r["access"] == "pacs"),
        "{second_run:?}"
    );
}

#[test]
fn a_typo_keeps_access_and_check_names_the_file() {
    let w = World::new();
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("O-1", "anna", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);
    assert!(w.members(WIM_GROUP).contains(&anna));

    w.order(
        "O-1.toml",
        "id = \"O-1\"\nuser = \"anna\"\naccess = [\"wim\"\nordered_by = \"m\"\n",
    );
    // A file that was never valid, next to it, changes nothing either.
    w.order("never.json", "{\"id\": \"N\", \"user\": \"anna\"");
    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    assert!(
        w.members(WIM_GROUP).contains(&anna),
        "a typo must not revoke"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("O-1.toml") && stdout.contains("last valid version"),
        "{stdout}"
    );

    let out = w.run(&["check"]);
    expect_exit(&out, 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("O-1.toml: line"), "{stderr}");
    assert!(stderr.contains("never.json: line"), "{stderr}");

    // Fixed by deleting the file: the order is withdrawn.
    w.withdraw("O-1");
    expect_exit(&w.run(&["apply"]), 0);
    assert!(!w.members(WIM_GROUP).contains(&anna));
}

#[test]
fn unreadable_report_holds_everything() {
    let w = World::new();
    let anna = w.slapd.add_user("anna", "Anna");
    w.slapd.add_user("bertil", "Bertil");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("O-1", "anna", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);

    // The report disappears; bertil is ordered and anna's pass can no longer be seen.
    std::fs::remove_file(w.path("results.csv")).unwrap();
    w.simple_order("O-2", "bertil", &["wim"]);
    let out = w.run(&["apply"]);
    expect_exit(&out, 1);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &anna]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("results.csv"),
        "{}",
        describe(&out)
    );

    // Garbage instead of a report: the same.
    write_file(
        w.dir.path(),
        "results.csv",
        "\u{0}\u{1}garbage without header\n",
    );
    expect_exit(&w.run(&["apply"]), 1);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &anna]));
    let text = String::from_utf8_lossy(&w.run(&["explain", "bertil"]).stdout).to_string();
    assert!(text.contains("hold"), "{text}");
}

#[test]
fn filter_injection_grants_nobody() {
    let w = World::new();
    w.slapd.add_users(&[("anna", "Anna"), ("bertil", "Bertil")]);
    let nasty = [
        "*",
        "a)(uid=*",
        "*)(|(uid=*",
        "\\",
        "\\2a",
        "anna)(uid=anna",
        ",ou=admins",
    ];
    let mut rows = vec!["anna;Wim grundkurs;true;2026-11-01".to_string()];
    for (i, user) in nasty.iter().enumerate() {
        w.simple_order(&format!("N-{i}"), user, &["wim"]);
        rows.push(format!(
            "\"{}\";Wim grundkurs;true;2026-11-01",
            user.replace('"', "\"\"")
        ));
    }
    w.results(&rows.iter().map(String::as_str).collect::<Vec<_>>());
    // NUL is a control character: the order file is invalid (SPEC §2) and grants nothing.
    w.order(
        "nul.toml",
        "id = \"NUL\"\nuser = \"anna\\u0000\"\naccess = [\"wim\"]\nordered_by = \"m\"\n",
    );

    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    assert_eq!(
        w.members(WIM_GROUP),
        set(&[PLACEHOLDER_DN]),
        "{}",
        describe(&out)
    );
    let plan = w.plan_json();
    let decisions = plan["decisions"].as_array().unwrap();
    for user in nasty {
        let d = decisions.iter().find(|d| d["user"] == user).unwrap();
        assert!(
            d["reason"]
                .as_str()
                .unwrap()
                .contains("matches no directory entry"),
            "{user}: {d}"
        );
    }
    assert!(
        plan["invalid_orders"][0]["message"]
            .as_str()
            .unwrap()
            .contains("U+0000")
    );

    // A user whose name really is `a)(uid=*` resolves to exactly that entry.
    let literal = w.slapd.add_user("a)(uid=*", "Literal");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &literal]));
}

#[test]
fn non_ascii_names_converge() {
    let w = World::new();
    let orjan = w.slapd.add_user("örjan.åström", "Örjan Åström");
    let komma = w.slapd.add_user("andersson, anna", "Anna Andersson");
    w.results(&[
        "Örjan.Åström;wim GRUNDKURS;Godkänd;2026-11-01",
        "andersson, anna;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("O-1", "örjan.åström", &["wim"]);
    w.simple_order("O-2", "andersson, anna", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &orjan, &komma]));
    let plan = w.plan_json();
    assert_eq!(plan["changes"].as_array().unwrap().len(), 0, "{plan}");
    w.withdraw("O-1");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &komma]));
    let audit = w.audit();
    assert_eq!(actions(&audit, "revoke")[0]["user"], "örjan.åström");
    let raw = std::fs::read_to_string(w.path("audit.jsonl")).unwrap();
    assert!(
        raw.contains("örjan.åström"),
        "non-ASCII is written as UTF-8, not escaped"
    );
}

#[test]
fn ambiguous_user_is_held() {
    let w = World::new();
    w.slapd.add_user("anna", "Anna");
    w.slapd.add_ldif(
        "dn: ou=contractors,ou=people,dc=example,dc=org\nobjectClass: organizationalUnit\nou: contractors\n\n\
         dn: uid=anna,ou=contractors,ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: anna\ncn: Anna 2\nsn: Two\n",
    );
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("O-1", "anna", &["wim"]);
    expect_exit(&w.run(&["apply"]), 1);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN]));
    let text = String::from_utf8_lossy(&w.run(&["explain", "anna"]).stdout).to_string();
    assert!(
        text.contains("hold") && text.contains("matches 2 directory entries"),
        "{text}"
    );
}

#[test]
fn many_orders_cost_few_ldap_operations() {
    let w = World::with(Slapd::start(), "", "member", COURSES);
    let (users, _) = w.passed_users("user", 600);
    for u in &users {
        w.simple_order(u, u, &["wim", "pacs"]);
    }
    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    assert_eq!(w.members(WIM_GROUP).len(), 601);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ops: u64 = stderr
        .split("ldap_operations=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no operation count in:\n{stderr}"));
    // bind + 2 user searches (500 per search) + 2 group reads + 1 modify, plus a few pages.
    assert!(ops <= 15, "{ops} LDAP operations for 600 orders");
}

/// One profile on the `posixGroup` (`memberUid`), needing the Wim course.
const POSIX_PROFILE: &str = r#"
[courses.wim-grund]
lms_id = "Wim grundkurs"
[access.posix]
group = "cn=posix-users,ou=groups,dc=example,dc=org"
courses = ["wim-grund"]
"#;

#[test]
fn member_uid_and_unique_member_groups() {
    let w = World::with(Slapd::start(), "", "memberUid", POSIX_PROFILE);
    w.slapd.add_users(&[("anna", "Anna"), ("bertil", "Bertil")]);
    w.slapd.add_member(POSIX_GROUP, "memberUid", "handmade");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("A", "anna", &["posix"]);
    // memberUid gets the account name as the directory spells it, not as the order does.
    w.simple_order("B", "Bertil", &["posix"]);
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(
        w.slapd.members(POSIX_GROUP, "memberUid"),
        set(&["anna", "bertil", "handmade"])
    );
    w.withdraw("A");
    w.withdraw("B");
    expect_exit(&w.run(&["apply"]), 0);
    // The posixGroup may become empty of coursegate's members; the hand-added one stays.
    assert_eq!(
        w.slapd.members(POSIX_GROUP, "memberUid"),
        set(&["handmade"])
    );

    let profiles = r#"
[courses.wim-grund]
lms_id = "Wim grundkurs"
[access.unique]
group = "cn=unique-users,ou=groups,dc=example,dc=org"
courses = ["wim-grund"]
"#;
    let u = World::with(Slapd::start(), "", "uniqueMember", profiles);
    let anna = u.slapd.add_user("anna", "Anna");
    u.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    u.simple_order("A", "anna", &["unique"]);
    expect_exit(&u.run(&["apply"]), 0);
    assert_eq!(
        u.slapd.members(UNIQUE_GROUP, "uniqueMember"),
        set(&[PLACEHOLDER_DN, &anna])
    );
    assert_eq!(u.plan_json()["changes"].as_array().unwrap().len(), 0);
}

#[test]
fn last_member_of_group_of_names_is_replaced_by_the_placeholder() {
    let w = World::new();
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("A", "anna", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);
    // Someone removes the placeholder by hand; anna is now the only member.
    w.slapd.remove_member(WIM_GROUP, "member", PLACEHOLDER_DN);
    assert_eq!(w.members(WIM_GROUP), set(&[&anna]));
    w.withdraw("A");
    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    assert_eq!(
        w.members(WIM_GROUP),
        set(&[PLACEHOLDER_DN]),
        "{}",
        describe(&out)
    );
}

#[test]
fn exclusive_group_keeps_only_granted_members() {
    let profiles = COURSES.replace(
        "courses = [\"wim-grund\"]",
        "courses = [\"wim-grund\"]\nexclusive = true",
    );
    let w = World::with(Slapd::start(), "", "member", &profiles);
    let anna = w.slapd.add_user("anna", "Anna");
    let stranger = w.slapd.add_user("stranger", "Stranger");
    let waiting = w.slapd.add_user("waiting", "Waiting");
    w.slapd.add_member(WIM_GROUP, "member", &stranger);
    w.slapd.add_member(WIM_GROUP, "member", &waiting);
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("A", "anna", &["wim"]);
    w.simple_order("W", "waiting", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &anna]));
    // The pacs group is not exclusive: nothing there was touched.
    assert_eq!(w.members(PACS_GROUP), set(&[PLACEHOLDER_DN]));
}

#[test]
fn tls_ldaps_and_starttls_verify_the_certificate() {
    let slapd = Slapd::start_tls();
    let ca = slapd.ca_file();
    let ldaps = slapd.ldaps_url();
    let w = World::with(slapd, "", "member", COURSES);
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("A", "anna", &["wim"]);
    let config = std::fs::read_to_string(&w.config).unwrap();
    let plain_url = w.slapd.url();

    // ldaps:// without the CA: the certificate is not trusted, nothing happens.
    std::fs::write(&w.config, config.replace(&plain_url, &ldaps)).unwrap();
    let out = w.run(&["apply"]);
    expect_exit(&out, 1);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("certificate"),
        "{}",
        describe(&out)
    );
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN]));

    // With tls_ca_file: works.
    let with_ca = config.replace(
        &format!("url = \"{plain_url}\""),
        &format!("url = \"{ldaps}\"\ntls_ca_file = \"{}\"", ca.display()),
    );
    std::fs::write(&w.config, &with_ca).unwrap();
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN, &anna]));

    // StartTLS on the plain port, with the CA.
    let starttls = config.replace(
        &format!("url = \"{plain_url}\""),
        &format!(
            "url = \"{plain_url}\"\nstarttls = true\ntls_ca_file = \"{}\"",
            ca.display()
        ),
    );
    std::fs::write(&w.config, starttls).unwrap();
    let plan = w.plan_json();
    assert_eq!(plan["changes"].as_array().unwrap().len(), 0, "{plan}");
}

#[test]
fn secrets_never_reach_the_output() {
    let w = World::new();
    w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("A", "anna", &["wim"]);
    let mut cmd = coursegate_command(&w.config, &["apply"]);
    cmd.env("RUST_LOG", "trace");
    let out = run_with_timeout(cmd, COURSEGATE_TIMEOUT);
    expect_exit(&out, 0);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains(SERVICE_PASSWORD),
        "the bind password was printed"
    );
    // The password file is world-readable here (mode 644): coursegate says so.
    assert!(all.contains("readable by group or others"), "{all}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        w.path("ldap-password"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = w.run(&["plan"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("readable by group or others"));
    // A wrong password: the error names the DN and the file, not the password.
    write_file(w.dir.path(), "ldap-password", "wrong-secret-value\n");
    let out = w.run(&["plan"]);
    expect_exit(&out, 1);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("invalid credentials") && all.contains("ldap-password"),
        "{all}"
    );
    assert!(!all.contains("wrong-secret-value"));
}

#[test]
fn config_errors_exit_2_and_directory_down_exits_1() {
    let mut w = World::new();
    let good = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(&w.config, good.replace("[lms]", "[lms]\nbogus = 1")).unwrap();
    let out = w.run(&["plan"]);
    expect_exit(&out, 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    std::fs::write(&w.config, &good).unwrap();
    w.slapd.stop();
    expect_exit(&w.run(&["apply"]), 1);
    expect_exit(&w.run(&["plan"]), 1);
    let out = w.run(&["apply", "--allow-revocations", "x"]);
    expect_exit(&out, 2);
}

/// Crash recovery: audit records that the ledger does not reflect (a run killed between
/// writing them and changing the directory, or before saving the ledger) get an `outcome`.
#[test]
fn interrupted_run_is_recovered_from_the_audit_log() {
    let w = World::new();
    let anna = w.slapd.add_user("anna", "Anna");
    let bertil = w.slapd.add_user("bertil", "Bertil");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
    ]);
    // First run creates state, audit log and anchor.
    expect_exit(&w.run(&["apply"]), 0);

    // Simulate two killed runs: grant records written, but only bertil's change reached the
    // directory.
    {
        let mut log = coursegate::audit::AuditLog::open(
            &w.path("audit.jsonl"),
            &w.path("state").join("audit-anchor.json"),
        )
        .unwrap();
        let event = |user: &str, dn: &str| coursegate::audit::Event {
            action: "grant".into(),
            user: Some(user.into()),
            user_dn: Some(dn.into()),
            member: Some(dn.into()),
            access: Some("wim".into()),
            group: Some(WIM_GROUP.into()),
            order: Some("X".into()),
            ..Default::default()
        };
        log.append(vec![event("anna", &anna), event("bertil", &bertil)])
            .unwrap();
    }
    w.slapd.add_member(WIM_GROUP, "member", &bertil);

    // No orders: bertil's membership turns out to be coursegate's and is revoked; anna's
    // grant never happened.
    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    let audit = w.audit();
    let outcomes = actions(&audit, "outcome");
    assert_eq!(outcomes.len(), 2, "{audit:?}");
    let grants = actions(&audit, "grant");
    let seq_of = |user: &str| grants.iter().find(|g| g["user"] == user).unwrap()["seq"].clone();
    let outcome_of =
        |seq: &Value| outcomes.iter().find(|o| &o["ref_seq"] == seq).unwrap()["outcome"].clone();
    assert_eq!(outcome_of(&seq_of("anna")), "not-applied");
    assert_eq!(outcome_of(&seq_of("bertil")), "applied");
    assert_eq!(w.members(WIM_GROUP), set(&[PLACEHOLDER_DN]));
    assert_eq!(actions(&audit, "revoke")[0]["user"], "bertil");
    expect_exit(&w.run(&["audit", "verify"]), 0);

    // Replaying the log gives exactly the directory.
    let not_applied: BTreeSet<u64> = outcomes
        .iter()
        .filter(|o| o["outcome"] == "not-applied")
        .map(|o| o["ref_seq"].as_u64().unwrap())
        .collect();
    let mut held = BTreeSet::new();
    for r in &audit {
        if not_applied.contains(&r["seq"].as_u64().unwrap()) {
            continue;
        }
        match r["action"].as_str().unwrap() {
            "grant" => {
                held.insert(r["member"].as_str().unwrap().to_string());
            }
            "revoke" => {
                held.remove(r["member"].as_str().unwrap());
            }
            _ => {}
        }
    }
    let mut dir = w.members(WIM_GROUP);
    dir.remove(PLACEHOLDER_DN);
    assert_eq!(held, dir);
}

#[test]
fn tampered_audit_log_fails_verify_and_blocks_apply() {
    let w = World::new();
    w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("A", "anna", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);
    w.withdraw("A");
    expect_exit(&w.run(&["apply"]), 0);
    let path = w.path("audit.jsonl");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, original.replace("\"anna\"", "\"eve\"")).unwrap();
    let out = w.run(&["audit", "verify"]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 1"),
        "{}",
        describe(&out)
    );
    // Truncation (last record cut off) is caught by the anchor.
    let lines: Vec<&str> = original.lines().collect();
    std::fs::write(&path, lines[..lines.len() - 1].join("\n") + "\n").unwrap();
    let out = w.run(&["audit", "verify"]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    expect_exit(&w.run(&["apply"]), 1);
}

#[test]
fn example_config_and_orders_pass_check() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = repo.join("examples/coursegate.toml");
    let out = run_coursegate(&config, &["check"]);
    expect_exit(&out, 0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("4 valid order file(s), 0 invalid"),
        "{}",
        describe(&out)
    );

    // Named files: one good, one bad; the bad one is named with its line.
    let dir = tempfile::tempdir().unwrap();
    let bad = write_file(
        dir.path(),
        "bad.toml",
        "id = \"X\"\nuser = \"u\"\naccess = [\"ris\"]\nordered_by = \"m\"\n",
    );
    let good = repo.join("desired/BEST-2026-0042.toml");
    let out = run_coursegate(
        &config,
        &["check", good.to_str().unwrap(), bad.to_str().unwrap()],
    );
    expect_exit(&out, 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml: line 3") && stderr.contains("\"ris\""),
        "{stderr}"
    );
    assert!(!stderr.contains("BEST-2026-0042"), "{stderr}");
}

/// A batch the directory refuses in part gets its `outcome` records while the next batch's
/// records are already prepared on another thread (the apply pipeline): the next batch is
/// chained after the outcomes, the log verifies, and replaying it gives the directory.
#[test]
fn a_batch_refused_in_part_is_followed_by_a_batch_chained_after_its_outcomes() {
    let w = World::with(Slapd::start(), "", "memberUid", POSIX_PROFILE);
    w.slapd
        .add_users(&[("bertil", "Bertil"), ("åsa", "Åsa"), ("cecilia", "Cecilia")]);
    w.results(&[
        "bertil;Wim grundkurs;true;2026-11-01",
        "åsa;Wim grundkurs;true;2026-11-01",
        "cecilia;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("B", "bertil", &["posix"]);
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.slapd.members(POSIX_GROUP, "memberUid"), set(&["bertil"]));

    // One run, two batches: the grants (memberUid is IA5: slapd refuses "åsa"), then the
    // revocation of bertil, whose order is withdrawn.
    w.withdraw("B");
    w.simple_order("A", "åsa", &["posix"]);
    w.simple_order("C", "cecilia", &["posix"]);
    let out = w.run(&["apply"]);
    expect_exit(&out, 1);
    assert_eq!(w.slapd.members(POSIX_GROUP, "memberUid"), set(&["cecilia"]));
    expect_exit(&w.run(&["audit", "verify"]), 0);

    let audit = w.audit();
    // The first run wrote one record, bertil's grant.
    let second_run: Vec<(String, String)> = audit
        .iter()
        .skip(1)
        .map(|r| {
            let who = r["user"]
                .as_str()
                .map_or_else(|| format!("ref {}", r["ref_seq"]), str::to_string);
            (r["action"].as_str().unwrap().to_string(), who)
        })
        .collect();
    let seq_of_asa = audit.iter().find(|r| r["user"] == "åsa").unwrap()["seq"].clone();
    assert_eq!(
        second_run,
        [
            ("grant".to_string(), "cecilia".to_string()),
            ("grant".to_string(), "åsa".to_string()),
            ("outcome".to_string(), format!("ref {seq_of_asa}")),
            ("revoke".to_string(), "bertil".to_string()),
        ],
        "{audit:?}"
    );
    let outcome = audit.iter().find(|r| r["action"] == "outcome").unwrap();
    assert_eq!(outcome["outcome"], "not-applied");

    // Replaying the log gives exactly the directory.
    assert_eq!(
        crate::safety::replay(&audit),
        w.slapd.members(POSIX_GROUP, "memberUid")
    );
}
