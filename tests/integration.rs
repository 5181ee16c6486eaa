//! Integration tests: coursegate against a real OpenLDAP slapd (see `common`) and a real Samba
//! AD DC (see `ad`), driven through the real binary.
//!
//! The first tests check the harness itself, so that a failure elsewhere can be trusted to be
//! coursegate's and not the test directory's.

mod ad;
mod badinput;
mod common;
mod daemon;
mod lms;
mod notify;
mod queue;
mod reconcile;
mod safety;
mod scale;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use common::*;

fn set(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|v| v.to_string()).collect()
}

// === the harness ===

#[test]
fn harness_slapd_starts_with_base_entries_acls_and_survives_restart() {
    let started = Instant::now();
    let mut slapd = Slapd::start();
    eprintln!(
        "slapd started in {:?} at {}",
        started.elapsed(),
        slapd.url()
    );

    assert_eq!(slapd.members(WIM_GROUP, "member"), set(&[PLACEHOLDER_DN]));
    assert_eq!(slapd.members(PACS_GROUP, "member"), set(&[PLACEHOLDER_DN]));
    assert_eq!(
        slapd.members(KARDIOPACS_GROUP, "member"),
        set(&[PLACEHOLDER_DN])
    );
    assert_eq!(
        slapd.members(UNIQUE_GROUP, "uniqueMember"),
        set(&[PLACEHOLDER_DN])
    );
    assert!(slapd.members(POSIX_GROUP, "memberUid").is_empty());
    let anna = slapd.add_user("anna.andersson", "Anna Andersson");

    // The service account reads people, but never a password.
    let out = slapd
        .service_tool("ldapsearch")
        .args([
            "-LLL",
            "-b",
            PEOPLE_BASE,
            "(uid=anna.andersson)",
            "*",
            "userPassword",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let found = parse_ldif(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].dn, anna);
    assert_eq!(found[0].values("mail"), ["anna.andersson@example.org"]);
    assert!(found[0].values("userPassword").is_empty());

    // It may change a group's members ...
    let add_anna = format!("dn: {WIM_GROUP}\nchangetype: modify\nadd: member\nmember: {anna}\n");
    let out = run_with_input(slapd.service_tool("ldapmodify"), &add_anna);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        slapd.members(WIM_GROUP, "member"),
        set(&[PLACEHOLDER_DN, &anna])
    );
    // ... but nothing else about a group, and nothing about a person.
    for change in [
        format!("dn: {WIM_GROUP}\nchangetype: modify\nreplace: description\ndescription: x\n"),
        format!("dn: {anna}\nchangetype: modify\nreplace: mail\nmail: x@example.org\n"),
    ] {
        let out = run_with_input(slapd.service_tool("ldapmodify"), &change);
        assert_eq!(
            out.status.code(),
            Some(50),
            "insufficientAccess expected: {out:?}"
        );
    }

    // Anonymous clients see nothing.
    let anonymous = Command::new("ldapsearch")
        .env("LDAPNOINIT", "1")
        .args([
            "-x",
            "-LLL",
            "-H",
            &slapd.url(),
            "-b",
            BASE_DN,
            "(objectClass=*)",
        ])
        .output()
        .unwrap();
    // 32 (noSuchObject): the server answered, and the suffix itself is invisible.
    assert_eq!(anonymous.status.code(), Some(32), "{anonymous:?}");
    assert!(anonymous.stdout.is_empty(), "{anonymous:?}");

    // An outage: the server goes away and comes back with its data on the same port.
    let url = slapd.url();
    slapd.stop();
    assert!(!slapd.is_running());
    assert!(
        !slapd
            .service_tool("ldapwhoami")
            .output()
            .unwrap()
            .status
            .success()
    );
    let restarted = Instant::now();
    slapd.restart();
    eprintln!("slapd restarted in {:?}", restarted.elapsed());
    assert_eq!(slapd.url(), url);
    assert!(
        slapd
            .service_tool("ldapwhoami")
            .output()
            .unwrap()
            .status
            .success()
    );
    assert_eq!(
        slapd.members(WIM_GROUP, "member"),
        set(&[PLACEHOLDER_DN, &anna])
    );
}

#[test]
fn harness_adds_users_whose_names_mean_something_in_ldap() {
    let slapd = Slapd::start();
    let uids = [
        "örjan.åström",
        r"a*b(c),d\e",
        "x=y;z<w>\"q\"+1",
        "#hash",
        " spaced ",
    ];
    let users: Vec<(&str, &str)> = uids.iter().map(|uid| (*uid, "Nasty Name")).collect();
    let dns = slapd.add_users(&users);

    for (uid, dn) in uids.iter().zip(&dns) {
        // The DN the harness computed is the one slapd reports for the entry.
        let filter = format!("(uid={})", escape_filter_value(uid));
        let found = slapd.search(PEOPLE_BASE, "one", &filter, &["uid"]);
        assert_eq!(found.len(), 1, "{uid:?}: {found:?}");
        assert_eq!(&found[0].dn, dn, "{uid:?}");
        assert_eq!(found[0].values("uid"), [*uid]);

        slapd.add_member(WIM_GROUP, "member", dn);
        slapd.add_member(UNIQUE_GROUP, "uniqueMember", dn);
        // memberUid is IA5 (ASCII) in nis.schema: slapd rejects non-ASCII account names there.
        if uid.is_ascii() {
            slapd.add_member(POSIX_GROUP, "memberUid", uid);
        }
    }
    let mut expected: BTreeSet<String> = dns.iter().cloned().collect();
    assert!(expected.contains("uid=örjan.åström,ou=people,dc=example,dc=org"));
    assert!(expected.contains(r"uid=a*b(c)\2Cd\5Ce,ou=people,dc=example,dc=org"));
    assert_eq!(slapd.members(POSIX_GROUP, "memberUid"), set(&uids[1..]));
    expected.insert(PLACEHOLDER_DN.to_string());
    assert_eq!(slapd.members(WIM_GROUP, "member"), expected);
    assert_eq!(slapd.members(UNIQUE_GROUP, "uniqueMember"), expected);

    slapd.remove_member(WIM_GROUP, "member", &dns[0]);
    assert!(!slapd.members(WIM_GROUP, "member").contains(&dns[0]));
}

#[test]
fn harness_tls_variant_serves_ldaps_and_starttls_with_its_own_ca() {
    let slapd = Slapd::start_tls();
    let ca = slapd.ca_file();
    // Not LDAPNOINIT: it would also ignore the LDAPTLS_* variables. REQCERT=demand overrides
    // whatever ldap.conf says.
    let search = |url: &str, ca: Option<&std::path::Path>, starttls: bool| {
        let mut cmd = Command::new("ldapsearch");
        cmd.env("LDAPTLS_REQCERT", "demand")
            .env_remove("LDAPTLS_CACERTDIR")
            .args([
                "-x",
                "-LLL",
                "-H",
                url,
                "-D",
                SERVICE_DN,
                "-w",
                SERVICE_PASSWORD,
            ])
            .args(["-b", WIM_GROUP, "-s", "base", "member"]);
        match ca {
            Some(ca) => cmd.env("LDAPTLS_CACERT", ca),
            None => cmd.env_remove("LDAPTLS_CACERT"),
        };
        if starttls {
            cmd.arg("-ZZ");
        }
        cmd.output().unwrap()
    };

    let ldaps = search(&slapd.ldaps_url(), Some(&ca), false);
    assert!(ldaps.status.success(), "{ldaps:?}");
    assert!(String::from_utf8_lossy(&ldaps.stdout).contains(PLACEHOLDER_DN));
    let starttls = search(&slapd.url(), Some(&ca), true);
    assert!(starttls.status.success(), "{starttls:?}");

    // Without the test CA the server certificate is not trusted.
    let untrusted = search(&slapd.ldaps_url(), None, false);
    assert!(!untrusted.status.success(), "{untrusted:?}");
    let untrusted = search(&slapd.url(), None, true);
    assert!(!untrusted.status.success(), "{untrusted:?}");
}

#[test]
fn example_directory_loads_and_the_example_password_binds() {
    let ldif = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/directory.ldif"
    ))
    .unwrap();
    let slapd = Slapd::start_with(Options {
        initial_ldif: Some(ldif),
        ..Options::default()
    });
    // examples/directory.ldif stores a hash of examples/ldap-password.
    let out = slapd
        .service_tool("ldapsearch")
        .args([
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-b",
            PEOPLE_BASE,
            "(uid=*)",
            "uid",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let uids: BTreeSet<String> = parse_ldif(&String::from_utf8(out.stdout).unwrap())
        .iter()
        .flat_map(|e| e.values("uid"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        uids,
        set(&[
            "anna.andersson",
            "bertil.berg",
            "cecilia.carlsson",
            "karin.chef",
            "örjan.åström"
        ])
    );
    for group in [WIM_GROUP, PACS_GROUP, KARDIOPACS_GROUP] {
        assert_eq!(slapd.members(group, "member"), set(&[PLACEHOLDER_DN]));
    }
}
