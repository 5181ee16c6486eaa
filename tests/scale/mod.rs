//! Large populations against a slapd with the memberof overlay, as regions run it: users who are
//! already members of their groups are resolved with one search per group, and the result is
//! the same as looking every user up.

use std::process::Stdio;

use crate::common::*;
use crate::reconcile::{COURSES, World, describe, expect_exit};

/// A slapd with `overlay memberof` (and an index on it), where the service account may page
/// through any number of entries.
pub fn slapd_with_member_of() -> Slapd {
    Slapd::start_with(Options {
        extra_db_config: format!(
            "overlay memberof\nindex memberOf eq\nlimits dn.exact=\"{SERVICE_DN}\" size.prtotal=unlimited\n"
        ),
        ..Options::default()
    })
}

fn apply_debug(w: &World) -> String {
    let mut cmd = coursegate_command(&w.config, &["apply"]);
    cmd.env("RUST_LOG", "coursegate=debug")
        .stdout(Stdio::piped());
    let out = run_with_timeout(cmd, COURSEGATE_TIMEOUT);
    expect_exit(&out, 0);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn field(log: &str, line_marker: &str, key: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains(line_marker))
        .unwrap_or_else(|| panic!("no `{line_marker}` in:\n{log}"));
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn members_are_resolved_through_member_of_and_a_deleted_account_still_loses_access() {
    let w = World::with(slapd_with_member_of(), "", "member", COURSES);
    let (users, dns) = w.passed_users("m", 1100);
    for u in &users {
        w.simple_order(u, u, &["wim"]);
    }
    // First run: nobody is a member yet, every user is looked up and granted.
    let first = apply_debug(&w);
    assert_eq!(field(&first, "reconcile finished", "granted"), 1100);
    assert_eq!(w.members(WIM_GROUP).len(), 1101);
    // The overlay keeps memberOf on the user entries.
    let entry = w
        .slapd
        .search(&dns[0], "base", "(objectClass=*)", &["memberOf"]);
    assert_eq!(entry[0].values("memberOf"), vec![WIM_GROUP]);

    // Second run: all 1,100 are found in their group's memberOf search; nothing changes.
    let second = apply_debug(&w);
    assert_eq!(
        field(&second, "users resolved through memberOf", "resolved"),
        1100,
        "{second}"
    );
    assert_eq!(field(&second, "users resolved through memberOf", "left"), 0);
    assert_eq!(field(&second, "reconcile finished", "granted"), 0);
    assert_eq!(field(&second, "reconcile finished", "revoked"), 0);

    // An account deleted from the directory is not in any memberOf result: it is looked up,
    // not found, and its membership is revoked, exactly as without the shortcut.
    let out = w
        .slapd
        .admin_tool("ldapdelete")
        .arg(&dns[7])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let third = apply_debug(&w);
    assert_eq!(
        field(&third, "users resolved through memberOf", "left"),
        1,
        "{third}"
    );
    assert_eq!(field(&third, "reconcile finished", "revoked"), 1, "{third}");
    assert!(!w.members(WIM_GROUP).contains(&dns[7]));
    assert_eq!(w.members(WIM_GROUP).len(), 1100);
    let _ = describe;
}

/// A first run with thousands of users to look up reads the user base once instead of one
/// search per 500 names, and decides exactly as the lookups would: a name spelt in another case
/// is the same person, a name no entry has is not found, a name two entries have is ambiguous.
#[test]
fn a_first_run_reads_the_user_base_once_and_decides_as_lookups_would() {
    let w = World::with(slapd_with_member_of(), "", "member", COURSES);
    let (users, dns) = w.passed_users("s", 2100);
    for u in &users {
        w.simple_order(u, u, &["wim"]);
    }
    // s00010 twice (another entry with the same uid), s00007 also ordered in capitals, and a
    // name nobody has.
    w.slapd.add_ldif(&format!(
        "dn: cn=Second s00010,ou=people,{base}\nobjectClass: inetOrgPerson\ncn: Second s00010\nsn: x\nuid: s00010\n",
        base = w.slapd.base()
    ));
    w.simple_order("upper", "S00007", &["wim"]);
    w.simple_order("ghost", "ghost.nobody", &["wim"]);

    let mut cmd = coursegate_command(&w.config, &["apply"]);
    cmd.env("RUST_LOG", "coursegate=debug")
        .stdout(Stdio::piped());
    let out = run_with_timeout(cmd, COURSEGATE_TIMEOUT);
    // The ambiguous user is on hold.
    expect_exit(&out, 1);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        field(
            &log,
            "users resolved by one scan of the user base",
            "resolved"
        ),
        2102,
        "{log}"
    );
    assert_eq!(field(&log, "reconcile finished", "granted"), 2099, "{log}");
    // One scan (three pages of 1,000) instead of five batches of 500 names.
    assert!(
        field(&log, "reconcile finished", "ldap_operations") < 15,
        "{log}"
    );
    let members = w.members(WIM_GROUP);
    assert_eq!(members.len(), 2100, "2099 and the placeholder");
    assert!(members.contains(&dns[7]) && !members.contains(&dns[10]));
    let explain = w.run(&["explain", "s00010"]);
    assert!(
        String::from_utf8_lossy(&explain.stdout).contains("matches 2 directory entries"),
        "{}",
        describe(&explain)
    );
    let explain = w.run(&["explain", "ghost.nobody"]);
    assert!(
        String::from_utf8_lossy(&explain.stdout).contains("matches no directory entry"),
        "{}",
        describe(&explain)
    );
}

/// A user base with many more people than names to look up is not read whole: the scan is
/// abandoned and the names are looked up in batches, with the same result.
#[test]
fn a_user_base_much_larger_than_the_orders_is_not_read_whole() {
    let w = World::with(slapd_with_member_of(), "", "member", COURSES);
    let (users, _) = w.passed_users("t", 2000);
    for u in &users {
        w.simple_order(u, u, &["wim"]);
    }
    let others: Vec<(String, String)> = (0..4100)
        .map(|i| (format!("x{i:05}"), format!("Other {i}")))
        .collect();
    let pairs: Vec<(&str, &str)> = others
        .iter()
        .map(|(u, c)| (u.as_str(), c.as_str()))
        .collect();
    w.slapd.add_users(&pairs);
    let log = apply_debug(&w);
    assert!(log.contains("user scan not used"), "{log}");
    assert!(!log.contains("users resolved by one scan"), "{log}");
    assert_eq!(field(&log, "reconcile finished", "granted"), 2000, "{log}");
    assert_eq!(w.members(WIM_GROUP).len(), 2001);
}
