//! Safety under crashes and faults (issue 5): kill -9 at random moments, a directory server
//! that dies or freezes mid-run, a full disk and a read-only audit log. After each, the same
//! invariants must hold: no directory change without its audit record, replaying the audit log
//! gives exactly the directory, the ledger agrees, `audit verify` passes, and the next run
//! converges once the fault is gone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::daemon::{Running, world};
use crate::reconcile::{COURSES, World, describe, expect_exit};

/// A small deterministic random source (xorshift); the seed is printed so a failure can be
/// replayed with COURSEGATE_TEST_SEED.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("COURSEGATE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64 | 1)
            });
        eprintln!("random seed: COURSEGATE_TEST_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A world of `n` users who all passed the Wim course, each with an order file, and no brake
/// (the tests withdraw many orders at once on purpose).
fn big_world(n: usize) -> (World, Vec<String>, Vec<String>) {
    world_with_orders(n, "max_revocations_per_run = 1000000")
}

/// `n` users who passed, each with an order; `daemon_extra` goes into `[daemon]`.
fn world_with_orders(n: usize, daemon_extra: &str) -> (World, Vec<String>, Vec<String>) {
    let w = World::with(Slapd::start(), daemon_extra, "member", COURSES);
    let (users, dns) = w.passed_users("p", n);
    for u in &users {
        w.simple_order(u, u, &["wim"]);
    }
    (w, users, dns)
}

fn audit_records(w: &World) -> Vec<Value> {
    std::fs::read_to_string(w.path("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line ({e}): {l}")))
        .collect()
}

/// Replays the audit log (SPEC §6): grants and revokes, minus those marked not-applied.
pub fn replay(records: &[Value]) -> BTreeSet<String> {
    let not_applied: BTreeSet<u64> = records
        .iter()
        .filter(|r| r["action"] == "outcome" && r["outcome"] == "not-applied")
        .filter_map(|r| r["ref_seq"].as_u64())
        .collect();
    let mut held = BTreeSet::new();
    for r in records {
        if r["seq"].as_u64().is_some_and(|s| not_applied.contains(&s)) {
            continue;
        }
        let member = r["member"].as_str().unwrap_or_default().to_string();
        match r["action"].as_str() {
            Some("grant") => {
                held.insert(member);
            }
            Some("revoke") => {
                held.remove(&member);
            }
            _ => {}
        }
    }
    held
}

/// The invariants after any sequence of crashes and faults, once a clean run has finished.
fn assert_consistent(w: &World, state_dir: &Path, expected: &BTreeSet<String>) {
    let mut directory = w.members(WIM_GROUP);
    assert!(
        directory.remove(PLACEHOLDER_DN),
        "the placeholder was removed"
    );
    assert_eq!(
        &directory, expected,
        "directory differs from the desired state"
    );
    let records = audit_records(w);
    assert_eq!(
        replay(&records),
        directory,
        "replaying the audit log differs from the directory"
    );
    let ledger: Value =
        serde_json::from_str(&std::fs::read_to_string(state_dir.join("ledger.json")).unwrap())
            .unwrap();
    let owned: BTreeSet<String> = ledger["owned"]
        .as_object()
        .unwrap()
        .values()
        .map(|o| o["member"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(owned, directory, "the ledger differs from the directory");
    assert_eq!(
        ledger["applied_seq"].as_u64(),
        records.last().and_then(|r| r["seq"].as_u64()),
        "the ledger does not reflect the whole audit log"
    );
    expect_exit(&w.run(&["audit", "verify"]), 0);
    let plan = w.plan_json();
    assert_eq!(plan["changes"].as_array().unwrap().len(), 0, "{plan}");
}

fn desired(w: &World, users: &[String], dns: &[String]) -> BTreeSet<String> {
    users
        .iter()
        .zip(dns)
        .filter(|(u, _)| w.path("desired").join(format!("{u}.toml")).exists())
        .map(|(_, dn)| dn.clone())
        .collect()
}

#[test]
fn kill_minus_nine_fifty_times_then_converge() {
    let (w, users, dns) = big_world(2000);
    let mut rng = Rng::new();
    // Scale the kill window to this machine: a dry run costs about what a pass costs.
    let started = Instant::now();
    expect_exit(&w.run(&["plan"]), 0);
    let mut window = (started.elapsed() * 3).as_millis().max(50) as u64;

    let (mut killed, mut finished) = (0, 0);
    for round in 0..50 {
        // The desired state keeps moving: withdraw or restore a random batch of orders.
        let batch = 20 + rng.below(80) as usize;
        for _ in 0..batch {
            let u = &users[rng.below(users.len() as u64) as usize];
            let file = w.path("desired").join(format!("{u}.toml"));
            if round % 2 == 0 {
                let _ = std::fs::remove_file(&file);
            } else if !file.exists() {
                w.simple_order(u, u, &["wim"]);
            }
        }
        let mut child = coursegate_command(&w.config, &["apply"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(window)));
        if child.try_wait().unwrap().is_some() {
            finished += 1;
            // Keep about half of the runs killed, however fast this machine is today.
            window = (window * 4 / 5).max(10);
        } else {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
            window = window * 11 / 10 + 1;
        }
        child.wait().unwrap();
    }
    let recovered = audit_records(&w)
        .iter()
        .filter(|r| r["action"] == "outcome")
        .count();
    eprintln!(
        "50 rounds: {killed} killed mid-run, {finished} finished before the kill; {recovered} outcomes recovered"
    );
    assert!(
        killed >= 15,
        "only {killed} runs were killed: the test did not test crashes"
    );

    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    assert_consistent(&w, &w.path("state"), &desired(&w, &users, &dns));
}

#[test]
fn torn_audit_line_is_set_aside_and_recorded() {
    let w = World::new();
    let anna = w.slapd.add_user("anna", "Anna");
    let bertil = w.slapd.add_user("bertil", "Bertil");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("A", "anna", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);
    // A power loss in the middle of a write leaves half a line.
    let log = w.path("audit.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"action\":\"grant\",\"group\":\"cn=wim-us");
    std::fs::write(&log, &text).unwrap();

    w.simple_order("B", "bertil", &["wim"]);
    let out = w.run(&["apply"]);
    expect_exit(&out, 0);
    assert_eq!(
        w.members(WIM_GROUP),
        crate::reconcile::set(&[PLACEHOLDER_DN, &anna, &bertil])
    );
    let records = audit_records(&w);
    assert!(
        records.iter().any(|r| r["action"] == "torn-tail"),
        "{records:?}"
    );
    let aside: Vec<PathBuf> = std::fs::read_dir(w.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("audit.jsonl.torn-"))
        .collect();
    assert_eq!(aside.len(), 1, "the torn bytes are kept for the auditor");
    assert!(
        std::fs::read_to_string(&aside[0])
            .unwrap()
            .contains("cn=wim-us")
    );
    expect_exit(&w.run(&["audit", "verify"]), 0);
}

#[test]
fn slapd_killed_mid_run_then_converges() {
    let (mut w, users, dns) = big_world(2000);
    let mut rng = Rng::new();
    let started = Instant::now();
    expect_exit(&w.run(&["plan"]), 0);
    let window = (started.elapsed() * 3).as_millis().max(50) as u64;
    for round in 0..3 {
        if round > 0 {
            for u in users.iter().skip(round * 300).take(300) {
                let _ = std::fs::remove_file(w.path("desired").join(format!("{u}.toml")));
            }
        }
        let mut child = coursegate_command(&w.config, &["apply"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(window)));
        w.slapd.stop();
        let status = child.wait().unwrap();
        assert!(
            matches!(status.code(), Some(0) | Some(1)),
            "apply ended with {status}"
        );
        w.slapd.restart();
    }
    expect_exit(&w.run(&["apply"]), 0);
    assert_consistent(&w, &w.path("state"), &desired(&w, &users, &dns));
}

#[test]
fn frozen_slapd_times_out_and_changes_nothing() {
    let w = World::new();
    let config = std::fs::read_to_string(&w.config).unwrap();
    std::fs::write(
        &w.config,
        config.replace(
            "member_attribute = \"member\"",
            "member_attribute = \"member\"\ntimeout = \"1s\"",
        ),
    )
    .unwrap();
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("A", "anna", &["wim"]);
    let slapd_dir = w.slapd.dir().to_string_lossy().into_owned();
    let freeze = |sig: &str| {
        let ok = Command::new("pkill")
            .args([sig, "-f", &slapd_dir])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pkill {sig} slapd");
    };
    freeze("-STOP");
    let started = Instant::now();
    let out = w.run(&["apply"]);
    let took = started.elapsed();
    freeze("-CONT");
    expect_exit(&out, 1);
    assert!(
        took < Duration::from_secs(30),
        "a frozen server must time out, took {took:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("timeout")
            || String::from_utf8_lossy(&out.stderr)
                .to_lowercase()
                .contains("timed out"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        w.members(WIM_GROUP),
        crate::reconcile::set(&[PLACEHOLDER_DN])
    );
    expect_exit(&w.run(&["apply"]), 0);
    assert!(w.members(WIM_GROUP).contains(&anna));
}

/// Points the world's config at the LDAP server `url` with a 1 s operation timeout; returns the
/// config as it was.
fn point_at(w: &World, url: &str) -> String {
    let config = std::fs::read_to_string(&w.config).unwrap();
    assert!(config.contains(&w.slapd.url()), "{config}");
    std::fs::write(
        &w.config,
        config.replace(&w.slapd.url(), url).replace(
            "member_attribute = \"member\"",
            "member_attribute = \"member\"\ntimeout = \"1s\"",
        ),
    )
    .unwrap();
    config
}

/// An LDAP peer that answers the bind and the first search (the root DSE read at connect) and
/// then reads requests without ever answering: a server that hangs mid-run.
fn serve_then_stall(mut stream: std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut buffer = Vec::new();
    let mut answered = 0;
    let mut chunk = [0u8; 4096];
    loop {
        // One whole LDAPMessage: SEQUENCE, BER length, then the messageID INTEGER.
        while let Some((len, body)) = ber_message(&buffer) {
            let message: Vec<u8> = buffer.drain(..len).collect();
            let id = &message[body..];
            assert_eq!(id[0], 0x02, "messageID");
            let id = &id[..2 + usize::from(id[1])];
            let op = match answered {
                0 => 0x61, // bindResponse
                1 => 0x65, // searchResDone
                _ => continue,
            };
            answered += 1;
            let mut reply = vec![0x30, (id.len() + 9) as u8];
            reply.extend_from_slice(id);
            reply.extend_from_slice(&[op, 0x07, 0x0a, 0x01, 0x00, 0x04, 0x00, 0x04, 0x00]);
            if stream.write_all(&reply).is_err() {
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The length of the first complete BER SEQUENCE in `buffer` and where its contents start.
fn ber_message(buffer: &[u8]) -> Option<(usize, usize)> {
    if buffer.len() < 2 {
        return None;
    }
    assert_eq!(buffer[0], 0x30, "an LDAPMessage is a SEQUENCE");
    let (len, header) = if buffer[1] < 0x80 {
        (usize::from(buffer[1]), 2)
    } else {
        let n = usize::from(buffer[1] & 0x7f);
        if buffer.len() < 2 + n {
            return None;
        }
        let len = buffer[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    (buffer.len() >= header + len).then_some((header + len, header))
}

#[test]
fn a_server_that_stops_answering_after_the_bind_times_out() {
    let w = World::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("ldap://127.0.0.1:{}", listener.local_addr().unwrap().port());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_then_stall(stream));
        }
    });
    point_at(&w, &hung_url);
    w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("A", "anna", &["wim"]);
    let started = Instant::now();
    let out = w.run(&["apply"]);
    let took = started.elapsed();
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        took < Duration::from_secs(20),
        "every operation must time out, not only the bind: took {took:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr.contains("timeout") || stderr.contains("timed out"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        w.members(WIM_GROUP),
        crate::reconcile::set(&[PLACEHOLDER_DN])
    );
}

/// A tmpfs of a given size mounted for one test (needs root, as CI has).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI and scripts/test.sh run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path)
    }

    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {options}");
    }

    /// Fills the file system; returns the filler file.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Moves state_dir and audit_log of `w` onto `dir`.
fn relocate_state(w: &World, dir: &Path) {
    let config = std::fs::read_to_string(&w.config).unwrap();
    let config = config
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{}/state\"", dir.display()),
        )
        .replace(
            "audit_log = \"audit.jsonl\"",
            &format!("audit_log = \"{}/audit.jsonl\"", dir.display()),
        );
    std::fs::write(&w.config, config).unwrap();
}

fn audit_at(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn full_disk_changes_nothing_and_the_daemon_converges_when_space_returns() {
    let (w, port) = world();
    let disk = Tmpfs::mount(w.path("disk"), "1m");
    relocate_state(&w, &disk.0);
    let users: Vec<String> = (0..20).map(|i| format!("d{i:02}")).collect();
    let pairs: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), u.as_str())).collect();
    let dns = w.slapd.add_users(&pairs);
    let passed = |n: usize| -> Vec<String> {
        users[..n]
            .iter()
            .map(|u| format!("{u};Wim grundkurs;true;2026-11-01"))
            .collect()
    };
    w.results(&passed(10).iter().map(String::as_str).collect::<Vec<_>>());
    for u in &users {
        w.simple_order(u, u, &["wim"]);
    }
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP).len(), 11);

    let filler = disk.fill();
    // Everyone passes now: ten grants are due, but their audit records cannot be written.
    w.results(&passed(20).iter().map(String::as_str).collect::<Vec<_>>());
    let out = w.run(&["apply"]);
    expect_exit(&out, 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        w.members(WIM_GROUP).len(),
        11,
        "a change without its audit record"
    );
    // Withdrawals while the disk is full: nothing is revoked either.
    for u in &users[..5] {
        w.withdraw(u);
    }
    expect_exit(&w.run(&["apply"]), 1);
    assert_eq!(w.members(WIM_GROUP).len(), 11);

    // The daemon stays up while the disk is full and converges once there is space.
    let mut d = Running::spawn_unready(&w, port);
    d.wait_for("not ready while the disk is full", |d| {
        d.http("/readyz").0 == 503
    });
    assert_eq!(d.http("/healthz").0, 200);
    std::fs::remove_file(filler).unwrap();
    d.wait_for("converged after space returned", |_| {
        w.members(WIM_GROUP).len() == 16
    });
    assert_eq!(d.terminate(), Some(0));

    let expected: BTreeSet<String> = dns[5..].iter().cloned().collect();
    let mut directory = w.members(WIM_GROUP);
    directory.remove(PLACEHOLDER_DN);
    assert_eq!(directory, expected);
    assert_eq!(replay(&audit_at(&disk.0)), directory);
    expect_exit(&w.run(&["audit", "verify"]), 0);
}

#[test]
fn read_only_audit_log_blocks_every_change() {
    let w = World::new();
    let disk = Tmpfs::mount(w.path("disk"), "4m");
    relocate_state(&w, &disk.0);
    let anna = w.slapd.add_user("anna", "Anna");
    let bertil = w.slapd.add_user("bertil", "Bertil");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("A", "anna", &["wim"]);
    expect_exit(&w.run(&["apply"]), 0);

    disk.remount("ro");
    w.simple_order("B", "bertil", &["wim"]);
    w.withdraw("A");
    let out = w.run(&["apply"]);
    expect_exit(&out, 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        w.members(WIM_GROUP),
        crate::reconcile::set(&[PLACEHOLDER_DN, &anna])
    );

    disk.remount("rw");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(
        w.members(WIM_GROUP),
        crate::reconcile::set(&[PLACEHOLDER_DN, &bertil])
    );
    let expected: BTreeSet<String> = [bertil].into_iter().collect();
    assert_eq!(replay(&audit_at(&disk.0)), expected);
}

#[test]
fn emptying_the_order_directory_by_mistake_revokes_nothing() {
    // Default brake: at most 25 revocations per run.
    let (w, users, _) = world_with_orders(40, "");
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP).len(), 41);
    for u in &users {
        w.withdraw(u);
    }
    let out = w.run(&["apply"]);
    expect_exit(&out, 3);
    assert_eq!(
        w.members(WIM_GROUP).len(),
        41,
        "the brake must hold every revocation"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Revocation brake"),
        "{}",
        describe(&out)
    );
    // The directory itself gone: an error, not an empty desired state.
    std::fs::remove_dir_all(w.path("desired")).unwrap();
    expect_exit(&w.run(&["apply", "--allow-revocations", "100"]), 1);
    assert_eq!(w.members(WIM_GROUP).len(), 41);
}

/// A TCP proxy in front of `upstream` that passes every request, and every answer except those
/// to modify requests: the directory makes the change, coursegate never hears of it.
fn swallow_modify_answers(listener: std::net::TcpListener, upstream: String) {
    use std::io::{Read, Write};
    for client in listener.incoming().flatten() {
        let Ok(server) = std::net::TcpStream::connect(&upstream) else {
            return;
        };
        let (mut from_client, mut to_server) =
            (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_server);
            let _ = to_server.shutdown(std::net::Shutdown::Write);
        });
        let (mut from_server, mut to_client) = (server, client);
        std::thread::spawn(move || {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                while let Some((len, body)) = ber_message(&buffer) {
                    let message: Vec<u8> = buffer.drain(..len).collect();
                    // messageID INTEGER (short length), then the protocolOp's tag.
                    let op = message[body + 2 + usize::from(message[body + 1])];
                    if op == 0x67 {
                        continue; // modifyResponse
                    }
                    if to_client.write_all(&message).is_err() {
                        return;
                    }
                }
                match from_server.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
        });
    }
}

/// A change the directory makes without answering (timeout) is in doubt: the run stops and
/// records no outcome for it, and the next run looks at the directory and records `applied`.
/// Marking it `not-applied` would break the log's replay and lose coursegate's ownership of a
/// membership that exists.
#[test]
fn a_change_made_without_an_answer_is_settled_by_the_next_run_not_marked_not_applied() {
    let w = World::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("ldap://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let upstream = format!("127.0.0.1:{}", w.slapd.port());
    std::thread::spawn(move || swallow_modify_answers(listener, upstream));
    let config = point_at(&w, &proxy_url);
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("A", "anna", &["wim"]);

    let out = w.run(&["apply"]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no answer to a change"),
        "{}",
        describe(&out)
    );
    // slapd made the change; the log holds the grant and no outcome for it.
    assert!(w.members(WIM_GROUP).contains(&anna));
    let records = audit_records(&w);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["action"], "grant");

    // Straight to slapd: the next run settles the doubt from the directory.
    std::fs::write(&w.config, &config).unwrap();
    expect_exit(&w.run(&["apply"]), 0);
    let records = audit_records(&w);
    let outcomes: Vec<&Value> = records
        .iter()
        .filter(|r| r["action"] == "outcome")
        .collect();
    assert_eq!(outcomes.len(), 1, "{records:?}");
    assert_eq!(outcomes[0]["outcome"], "applied");
    assert_eq!(outcomes[0]["ref_seq"], records[0]["seq"]);
    let mut directory = w.members(WIM_GROUP);
    directory.remove(PLACEHOLDER_DN);
    assert_eq!(replay(&records), directory);
    expect_exit(&w.run(&["audit", "verify"]), 0);

    // The membership is coursegate's: withdrawing the order revokes it.
    w.withdraw("A");
    expect_exit(&w.run(&["apply"]), 0);
    assert!(!w.members(WIM_GROUP).contains(&anna));
}
