//! Active Directory (issue 9): the real `coursegate` binary, and its directory adapter, against a
//! real AD-compatible domain controller — Samba's AD DC ([`samba`]).
//!
//! Samba's ports are fixed (389/636) and provisioning a domain takes seconds, so one DC serves
//! every scenario, and they run in one test, [`against_samba_ad_dc`]: nextest runs each test
//! in its own process, where a DC shared by several tests would need a cross-process fixture
//! and someone to stop it after the last one. Each scenario has its own groups, accounts, config
//! and state directory, so none sees another's changes. A failing scenario does not stop the
//! others: all run, each reports its time, and the test fails naming every one that failed.
//!
//! The scenarios use the README's recommended AD settings: `ldaps://` (or StartTLS) with
//! `tls_ca_file`, a simple bind as the UPN, the `sAMAccountName` filter that leaves out disabled
//! accounts, `member_attribute = "member"`, and `user_base` the domain itself (so searches meet
//! Samba's referrals to the configuration partition). Samba does not enforce MaxPageSize or
//! MaxValRange, so `page_size = 50` and `range_size = 100` make multi-page and multi-range
//! reads happen with a few thousand accounts.

mod samba;

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::process::Output;
use std::time::Instant;

use serde_json::Value;
use tempfile::TempDir;

use crate::common::{run_coursegate, write_file};
use crate::reconcile::{actions, describe, expect_exit};
use samba::*;

/// One scenario against the shared DC.
type Scenario = fn(&SambaDc);

#[test]
fn against_samba_ad_dc() {
    let started = Instant::now();
    let dc = SambaDc::start();
    eprintln!(
        "Samba AD DC: provisioned in {:.1?}, started in {:.1?}, ready with OUs and the service account after {:.1?}",
        dc.provision_time,
        dc.start_time,
        started.elapsed()
    );
    let scenarios: [(&str, Scenario); 5] = [
        ("ldaps_starttls_and_refused_connections", tls_and_binds),
        ("grant_wait_disable_withdraw_and_hand_members", lifecycle),
        ("names_with_commas_and_non_ascii", names_with_commas),
        ("group_of_1730_members_in_ranges_and_pages", large_group),
        ("directory_adapter_on_active_directory", adapter),
    ];
    let mut failed = Vec::new();
    for (name, scenario) in scenarios {
        let t = Instant::now();
        eprintln!("=== ad scenario {name}");
        let outcome = catch_unwind(AssertUnwindSafe(|| scenario(&dc)));
        let took = t.elapsed();
        match outcome {
            Ok(()) => eprintln!("=== ad scenario {name}: passed in {took:.1?}"),
            Err(_) => {
                eprintln!("=== ad scenario {name}: FAILED after {took:.1?} (panic above)");
                failed.push(name);
            }
        }
    }
    eprintln!("Active Directory tests took {:.1?}", started.elapsed());
    assert!(failed.is_empty(), "failed scenarios: {failed:?}");
}

// === a coursegate set-up against the DC ===

/// How coursegate connects.
#[derive(Debug, Clone)]
struct Connection {
    url: String,
    starttls: bool,
    ca: PathBuf,
    bind_dn: String,
}

/// One scenario's coursegate: config, order directory, results report, state.
struct AdWorld {
    dir: TempDir,
    config: PathBuf,
    daemon_extra: String,
    profiles: String,
}

impl AdWorld {
    /// `profiles`: (access name, group DN as the config spells it). Every profile needs the
    /// course "Wim grundkurs".
    fn new(dc: &SambaDc, profiles: &[(&str, &str)], daemon_extra: &str) -> AdWorld {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("desired")).unwrap();
        write_file(
            dir.path(),
            "ldap-password",
            &format!("{SERVICE_PASSWORD}\n"),
        );
        write_file(dir.path(), "results.csv", "Username;Course;Passed;Date\n");
        let mut text =
            "[courses.wim-grund]\ntitle = \"Wim – grundkurs\"\nlms_id = \"Wim grundkurs\"\n"
                .to_string();
        for (access, group) in profiles {
            text.push_str(&format!(
                "\n[access.{access}]\ngroup = {}\ncourses = [\"wim-grund\"]\n",
                toml_string(group)
            ));
        }
        let w = AdWorld {
            config: dir.path().join("coursegate.toml"),
            dir,
            daemon_extra: daemon_extra.to_string(),
            profiles: text,
        };
        w.connect(&Connection {
            url: LDAPS_URL.to_string(),
            starttls: false,
            ca: dc.ca_file(),
            bind_dn: SERVICE_UPN.to_string(),
        });
        w
    }

    /// Rewrites the config with this connection (the rest stays).
    fn connect(&self, c: &Connection) {
        let text = format!(
            r#"[daemon]
desired_dir = "desired"
state_dir = "state"
audit_log = "audit.jsonl"
{daemon_extra}

[ldap]
url = {url}
starttls = {starttls}
tls_ca_file = {ca}
bind_dn = {bind_dn}
bind_password_file = "ldap-password"
user_base = "{DOMAIN_DN}"
user_filter = {filter}
member_attribute = "member"
page_size = 50
range_size = 100

[lms]
kind = "csv"
path = "results.csv"

{profiles}"#,
            daemon_extra = self.daemon_extra,
            url = toml_string(&c.url),
            starttls = c.starttls,
            ca = toml_string(&c.ca.display().to_string()),
            bind_dn = toml_string(&c.bind_dn),
            filter = toml_string(AD_USER_FILTER),
            profiles = self.profiles,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn order(&self, id: &str, user: &str, access: &str) {
        write_file(
            &self.path("desired"),
            &format!("{id}.toml"),
            &format!(
                "id = \"{id}\"\nuser = {}\naccess = [\"{access}\"]\nordered_by = \"karin.chef\"\n",
                toml_string(user)
            ),
        );
    }

    fn withdraw(&self, id: &str) {
        std::fs::remove_file(self.path("desired").join(format!("{id}.toml"))).unwrap();
    }

    /// The results report: these users passed "Wim grundkurs".
    fn passed(&self, users: &[&str]) {
        let mut text = "Username;Course;Passed;Date\n".to_string();
        for u in users {
            text.push_str(&format!("{u};Wim grundkurs;true;2026-11-20\n"));
        }
        write_file(self.dir.path(), "results.csv", &text);
    }

    fn run(&self, args: &[&str]) -> Output {
        run_coursegate(&self.config, args)
    }

    fn plan_json(&self) -> Value {
        let out = self.run(&["plan", "--json"]);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("plan --json printed no JSON ({e}):\n{}", describe(&out)))
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Asserts that `plan` would change nothing and exits 0 (no churn).
    fn expect_converged(&self) {
        let plan = self.plan_json();
        assert_eq!(plan["changes"], Value::Array(vec![]), "{plan}");
        assert_eq!(plan["brake"], false, "{plan}");
        expect_exit(&self.run(&["plan"]), 0);
    }
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn set(values: &[&String]) -> BTreeSet<String> {
    values.iter().map(|v| v.to_string()).collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The users named in the audit log's grant and revoke records.
fn audited_users(w: &AdWorld) -> BTreeSet<String> {
    w.audit()
        .iter()
        .filter(|r| r["action"] == "grant" || r["action"] == "revoke")
        .filter_map(|r| r["user"].as_str().map(str::to_owned))
        .collect()
}

// === the scenarios ===

/// LDAPS and StartTLS with `tls_ca_file`, binds as UPN and as DN; a plain `ldap://` bind, an
/// unrelated CA, a host name the certificate does not cover and a wrong password are refused
/// with a message that says what to fix, and change nothing.
fn tls_and_binds(dc: &SambaDc) {
    let users = [
        AdUser::new("tls.anna", "TLS Anna"),
        AdUser::new("tls.bertil", "TLS Bertil"),
        AdUser::new("tls.cecilia", "TLS Cecilia"),
    ];
    let dns = dc.add_users(PEOPLE_OU, &users);
    let group = dc.add_group("TLS Wim Users", &[]);
    let w = AdWorld::new(dc, &[("wim", &group)], "");
    w.passed(&["tls.anna", "tls.bertil", "tls.cecilia"]);
    let ldaps_upn = Connection {
        url: LDAPS_URL.to_string(),
        starttls: false,
        ca: dc.ca_file(),
        bind_dn: SERVICE_UPN.to_string(),
    };
    let starttls_dn = Connection {
        url: LDAP_URL.to_string(),
        starttls: true,
        bind_dn: SERVICE_DN.to_string(),
        ..ldaps_upn.clone()
    };

    // LDAPS, bound as the UPN.
    w.order("A", "tls.anna", "wim");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[&dns[0]]));

    // StartTLS on ldap://, bound as the DN: sees the same state, and changes it.
    w.connect(&starttls_dn);
    w.expect_converged();
    w.order("B", "tls.bertil", "wim");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[&dns[0], &dns[1]]));

    // From here on there is work to do (C), and every refused connection must leave it undone.
    w.order("C", "tls.cecilia", "wim");
    let before = dc.members(&group);
    let refused = |c: &Connection, expected: &[&str]| {
        w.connect(c);
        let out = w.run(&["apply"]);
        expect_exit(&out, 1);
        let err = stderr(&out);
        let first = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default();
        eprintln!("refused as expected: {first}");
        for e in expected {
            assert!(err.contains(e), "expected {e:?} in:\n{}", describe(&out));
        }
        assert_eq!(dc.members(&group), before, "{}", describe(&out));
        assert!(
            !audited_users(&w).contains("tls.cecilia"),
            "an audit record for a change that was never made:\n{}",
            describe(&out)
        );
    };

    // A plain ldap:// password bind: the DC wants TLS, and the message says how to give it.
    refused(
        &Connection {
            starttls: false,
            ..starttls_dn.clone()
        },
        &[
            "Strong(er) authentication required",
            "url = \"ldaps://127.0.0.1\"",
            "starttls = true",
            "tls_ca_file",
        ],
    );
    // A CA that did not issue the DC's certificate, over LDAPS and over StartTLS.
    let unrelated = dc.unrelated_ca_file();
    let unrelated_hint = "not issued by a CA coursegate trusts";
    refused(
        &Connection {
            ca: unrelated.clone(),
            ..ldaps_upn.clone()
        },
        &[unrelated_hint, "tls_ca_file"],
    );
    refused(
        &Connection {
            ca: unrelated,
            ..starttls_dn.clone()
        },
        &[unrelated_hint],
    );
    // The certificate names 127.0.0.1 only.
    refused(
        &Connection {
            url: "ldaps://localhost".to_string(),
            ..ldaps_upn.clone()
        },
        &["not valid for the host `localhost`"],
    );
    // A wrong password: AD's reason is spelled out, the password file named, never its content.
    write_file(w.dir.path(), "ldap-password", "Not-The-Password-1\n");
    refused(&ldaps_upn, &["wrong password (data 52e)", "ldap-password"]);
    assert!(!stderr(&w.run(&["plan"])).contains("Not-The-Password-1"));
    write_file(
        w.dir.path(),
        "ldap-password",
        &format!("{SERVICE_PASSWORD}\n"),
    );

    // Fixed: the pending grant goes through, and the audit log holds exactly the three grants.
    w.connect(&ldaps_upn);
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[&dns[0], &dns[1], &dns[2]]));
    assert_eq!(actions(&w.audit(), "grant").len(), 3);
    w.expect_converged();
    expect_exit(&w.run(&["audit", "verify"]), 0);
}

/// Grant, wait for a course, a disabled account revoked (through the revocation brake), a
/// withdrawal, and members added by hand never touched.
fn lifecycle(dc: &SambaDc) {
    let users = [
        AdUser::new("life.anna", "Life Anna"),
        AdUser::new("life.bertil", "Life Bertil"),
        AdUser::new("life.david", "Life David"),
        AdUser::new("life.erik", "Life Erik"),
        AdUser::new("life.hand", "Life Hand"),
    ];
    let dns = dc.add_users(PEOPLE_OU, &users);
    let [anna, bertil, david, erik, hand] = [&dns[0], &dns[1], &dns[2], &dns[3], &dns[4]];
    let group = dc.add_group("Life PACS Users", &[]);
    dc.add_member(&group, hand);
    let w = AdWorld::new(dc, &[("pacs", &group)], "max_revocations_per_run = 1");
    // Bertil has not passed yet.
    w.passed(&["life.anna", "life.david", "life.erik", "life.hand"]);
    for (id, user) in [
        ("A", "life.anna"),
        ("B", "life.bertil"),
        ("D", "life.david"),
        ("E", "life.erik"),
    ] {
        w.order(id, user, "pacs");
    }

    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[hand, anna, david, erik]));
    let out = w.run(&["explain", "life.bertil"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("wait — waiting for course: Wim – grundkurs"),
        "{}",
        describe(&out)
    );

    // Two accounts disabled in AD: the filter no longer finds them, so their access goes —
    // but two revocations exceed max_revocations_per_run = 1, so the brake holds them first.
    dc.set_account_control(david, UAC_DISABLED);
    dc.set_account_control(erik, UAC_DISABLED);
    let out = w.run(&["apply"]);
    expect_exit(&out, 3);
    assert_eq!(dc.members(&group), set(&[hand, anna, david, erik]));
    let out = w.run(&["apply", "--allow-revocations", "2"]);
    expect_exit(&out, 0);
    assert_eq!(dc.members(&group), set(&[hand, anna]));
    let revoked: BTreeSet<String> = actions(&w.audit(), "revoke")
        .iter()
        .map(|r| r["user"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        revoked,
        ["life.david", "life.erik"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );

    // Bertil passes: granted.
    w.passed(&["life.anna", "life.bertil", "life.hand"]);
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[hand, anna, bertil]));

    // Anna's order is withdrawn: revoked; the hand-added member stays throughout.
    w.withdraw("A");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[hand, bertil]));
    w.expect_converged();
    expect_exit(&w.run(&["audit", "verify"]), 0);
}

/// Accounts whose CN holds a comma, a plus sign and non-ASCII letters, a group whose DN has an
/// escaped comma and is spelled differently in the config than the DC prints it: granted,
/// revoked, and no churn.
fn names_with_commas(dc: &SambaDc) {
    let users = [
        AdUser::new("anna.andersson", "Andersson, Anna"),
        AdUser::new("örjan.åström", "Åström, Örjan"),
        AdUser::new("hans.muller", "Müller+Schmidt, Hans"),
    ];
    let dns = dc.add_users(PEOPLE_OU, &users);
    // The harness's DNs are exactly what the DC prints (so the comparisons below are exact).
    for (u, dn) in users.iter().zip(&dns) {
        let filter = format!("(sAMAccountName={})", u.sam);
        let found = dc.search(DOMAIN_DN, "sub", &filter, &["1.1"]);
        assert_eq!(found.len(), 1, "{filter}");
        assert_eq!(&found[0].dn, dn);
    }
    assert_eq!(dns[0], format!("CN=Andersson\\, Anna,{PEOPLE_OU}"));

    let group = dc.add_group("Röntgen, Wim-användare", &[]);
    assert_eq!(group, format!("CN=Röntgen\\, Wim-användare,{GROUPS_OU}"));
    // The config names the group in lower case with a hex-escaped comma, spaces after commas
    // and the non-ASCII letter as escaped UTF-8 bytes.
    let spelled = "cn=r\\c3\\b6ntgen\\2c wim-anv\\C3\\A4ndare, ou=groups, dc=region, dc=test";
    let w = AdWorld::new(dc, &[("wim", spelled)], "");
    w.passed(&["anna.andersson", "örjan.åström", "hans.muller"]);
    // Account names are matched case-insensitively, like AD does.
    w.order("A", "Anna.Andersson", "wim");
    w.order("O", "örjan.åström", "wim");
    w.order("H", "hans.muller", "wim");

    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[&dns[0], &dns[1], &dns[2]]));
    w.expect_converged();
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(actions(&w.audit(), "grant").len(), 3, "grant churn");

    w.withdraw("O");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[&dns[0], &dns[2]]));
    w.withdraw("A");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(dc.members(&group), set(&[&dns[2]]));
    w.expect_converged();
    assert_eq!(actions(&w.audit(), "revoke").len(), 2);
}

/// 1,700 orders granted into a group that also has 30 hand-added members: user resolution in
/// pages of 50, members read in ranges of 100, modifies of at most 100 values; `plan` after
/// `apply` is empty; 150 withdrawals go through the brake and in batches too.
fn large_group(dc: &SambaDc) {
    const ORDERED: usize = 1700;
    const BY_HAND: usize = 30;
    let bulk_ou = format!("OU=Bulk,{DOMAIN_DN}");
    dc.add_ou(&bulk_ou);
    let users: Vec<AdUser> = (0..ORDERED + BY_HAND)
        .map(|i| AdUser::new(&format!("bulk{i:05}"), &format!("Bulk User {i:05}")))
        .collect();
    let t = Instant::now();
    let dns = dc.add_users(&bulk_ou, &users);
    eprintln!("added {} accounts in {:.1?}", users.len(), t.elapsed());
    let group = dc.add_group("KardioPACS Users", &dns[ORDERED..]);

    let w = AdWorld::new(dc, &[("kardiopacs", &group)], "");
    let names: Vec<&str> = users[..ORDERED].iter().map(|u| u.sam.as_str()).collect();
    w.passed(&names);
    for name in &names {
        w.order(name, name, "kardiopacs");
    }
    let t = Instant::now();
    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    eprintln!("apply of {ORDERED} grants took {:.1?}", t.elapsed());
    let members = dc.members(&group);
    assert_eq!(members.len(), ORDERED + BY_HAND);
    assert_eq!(members, dns.iter().cloned().collect());
    assert_eq!(actions(&w.audit(), "grant").len(), ORDERED);

    // Every one of the 1,730 members is seen: nothing to grant again, nothing else to do.
    let t = Instant::now();
    w.expect_converged();
    eprintln!(
        "plan over {} members took {:.1?}",
        members.len(),
        t.elapsed()
    );
    let out = w.run(&["plan"]);
    let operations = ldap_operations(&out);
    // At least 34 pages of users (1,700 / 50) and 18 ranges of members (1,730 / 100).
    assert!(operations >= 34 + 18, "{operations} LDAP operations");

    // 150 withdrawals: more than the brake's 25, so an operator lets them through.
    for name in &names[..150] {
        w.withdraw(name);
    }
    expect_exit(&w.run(&["apply"]), 3);
    assert_eq!(dc.members(&group).len(), ORDERED + BY_HAND);
    expect_exit(&w.run(&["apply", "--allow-revocations", "150"]), 0);
    let members = dc.members(&group);
    assert_eq!(members.len(), ORDERED + BY_HAND - 150);
    assert!(!members.contains(&dns[0]) && members.contains(&dns[150]));
    assert!(dns[ORDERED..].iter().all(|hand| members.contains(hand)));
    w.expect_converged();
}

fn ldap_operations(out: &Output) -> u64 {
    let err = stderr(out);
    err.rsplit("ldap_operations=")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no operation count in:\n{err}"))
}

/// The directory adapter itself on the DC: Active Directory recognised from the root DSE, the
/// liveness probe (where WhoAmI fails), member reads in exact numbers of ranges, paged user
/// resolution, and AD's answers to modifies that are already done or name no entry.
fn adapter(dc: &SambaDc) {
    use coursegate::directory::{DirectoryError, MemberChange};
    use coursegate::plan::UserLookup;

    let ou = format!("OU=Adapter,{DOMAIN_DN}");
    dc.add_ou(&ou);
    let users: Vec<AdUser> = (0..300)
        .map(|i| AdUser::new(&format!("adapter{i:03}"), &format!("Adapter, User {i:03}")))
        .collect();
    let dns = dc.add_users(&ou, &users);
    let g250 = dc.add_group("Adapter 250", &dns[..250]);
    let g200 = dc.add_group("Adapter 200", &dns[..200]);
    let empty = dc.add_group("Adapter empty", &[]);
    let w = AdWorld::new(dc, &[("a", &g250)], "");
    let config = coursegate::config::Config::load(&w.config).unwrap();

    // Why the probe reads the root DSE: Samba's DC has no WhoAmI extended operation.
    let whoami = dc.admin_tool("ldapwhoami").output().unwrap();
    assert!(!whoami.status.success());
    assert!(
        String::from_utf8_lossy(&whoami.stderr).contains("Protocol error"),
        "{whoami:?}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut dir = coursegate::reconcile::connect(&config).await.unwrap();
        assert!(dir.is_active_directory());
        dir.probe().await.unwrap();
        assert_eq!(dir.values_per_modify(), 100);

        // Exactly one read per range of 100: 0-99, 100-199, 200-299 (answered as 200-*).
        let ops = dir.operations();
        let members = dir.read_members(&g250).await.unwrap();
        assert_eq!(dir.operations() - ops, 3);
        let expected: BTreeSet<&String> = dns[..250].iter().collect();
        assert_eq!(members.len(), 250);
        assert_eq!(members.iter().collect::<BTreeSet<_>>(), expected);
        // 200 values: the second range (100-199) is answered as the last one (100-*).
        let ops = dir.operations();
        assert_eq!(dir.read_members(&g200).await.unwrap().len(), 200);
        assert_eq!(dir.operations() - ops, 2);
        let ops = dir.operations();
        assert!(dir.read_members(&empty).await.unwrap().is_empty());
        assert_eq!(dir.operations() - ops, 1);
        let missing = format!("CN=No Such Group,{GROUPS_OU}");
        assert!(matches!(
            dir.read_members(&missing).await,
            Err(DirectoryError::GroupMissing { .. })
        ));

        // 300 users in one OR-ed search, in pages of 50; one of them disabled is not found.
        dc.set_account_control(&dns[7], UAC_DISABLED);
        let names: Vec<String> = users.iter().map(|u| u.sam.clone()).collect();
        let ops = dir.operations();
        let found = dir.resolve_users(&names).await;
        assert!(
            dir.operations() - ops >= 6,
            "{} pages",
            dir.operations() - ops
        );
        for (i, u) in users.iter().enumerate() {
            match (&found[&u.sam], i) {
                (UserLookup::NotFound, 7) => {}
                (UserLookup::Found { dn, mail, .. }, i) if i != 7 => {
                    assert_eq!(dn, &dns[i]);
                    assert_eq!(
                        mail.as_deref(),
                        Some(format!("{}@region.test", u.sam).as_str())
                    );
                }
                (other, _) => panic!("{}: {other:?}", u.sam),
            }
        }

        // Adding a member that is there (AD: 68) or removing one that is not (AD: 53) is
        // success, and the other values of the batch are changed.
        let add = vec![dns[0].clone(), dns[250].clone()];
        assert!(
            dir.change_members(&g250, MemberChange::Add, &add)
                .await
                .unwrap()
                .is_empty()
        );
        let remove = vec![dns[299].clone(), dns[1].clone()];
        assert!(
            dir.change_members(&g250, MemberChange::Remove, &remove)
                .await
                .unwrap()
                .is_empty()
        );
        let now = dc.members(&g250);
        assert!(now.contains(&dns[250]) && !now.contains(&dns[1]) && now.len() == 250);
        // A DN that names no entry (AD checks `member` values: 32) fails alone.
        let nobody = format!("CN=Nobody Here,{PEOPLE_OU}");
        let add = vec![dns[251].clone(), nobody, dns[252].clone()];
        let failed = dir
            .change_members(&g250, MemberChange::Add, &add)
            .await
            .unwrap();
        assert_eq!(failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1]);
        let now = dc.members(&g250);
        assert!(now.contains(&dns[251]) && now.contains(&dns[252]));
        // A group that is gone fails the whole change.
        assert!(matches!(
            dir.change_members(&missing, MemberChange::Add, &add[..1])
                .await,
            Err(DirectoryError::GroupMissing { .. })
        ));
        dir.close().await;
    });
}
