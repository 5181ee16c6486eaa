//! The daemon (`coursegate run`) as systemd runs it: the real binary against a real slapd, with
//! a notify socket the test binds (NOTIFY_SOCKET), signals, the HTTP endpoints, and file drops
//! into the watched directory. Every wait is a poll with a deadline, never a fixed sleep.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::reconcile::{COURSES, World, describe, expect_exit};

const WAIT: Duration = Duration::from_secs(30);

pub struct Running {
    child: Child,
    port: u16,
    log: PathBuf,
    /// Every datagram received on the notify socket, collected by a reader thread (like
    /// systemd, it must always be drained, or the daemon's sends would block).
    received: Arc<Mutex<Vec<String>>>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn world() -> (World, u16) {
    let port = free_port();
    let w = World::with(
        Slapd::start(),
        &format!("listen = \"127.0.0.1:{port}\""),
        "member",
        COURSES,
    );
    (w, port)
}

impl Running {
    /// Starts the daemon and waits for READY=1.
    pub fn spawn(w: &World, port: u16) -> Running {
        let mut r = Running::spawn_unready(w, port);
        r.wait_for("READY=1 on the notify socket", |_| false);
        r
    }

    /// Starts the daemon without waiting for it to become ready.
    pub fn spawn_unready(w: &World, port: u16) -> Running {
        let socket = w.path("notify.sock");
        // A previous daemon of the same test may have left its socket behind.
        let _ = std::fs::remove_file(&socket);
        let notify = UnixDatagram::bind(&socket).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = notify.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push(text);
            }
        });
        let log = w.path("daemon.log");
        let child = Command::new(coursegate_bin())
            .arg("-c")
            .arg(&w.config)
            .arg("run")
            .env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "400000")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Running {
            child,
            port,
            log,
            received,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn notified(&self, what: &str) -> bool {
        self.received
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.lines().any(|l| l == what))
    }

    /// Polls `cond` (and, for "READY=1 …" descriptions, the notify socket) until it holds.
    pub fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&Running) -> bool) {
        let deadline = Instant::now() + WAIT;
        let notify_line = what.split(' ').next().unwrap_or("").to_string();
        loop {
            if cond(self) || (what.contains("notify socket") && self.notified(&notify_line)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "daemon exited ({status}) while waiting for {what}\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\n--- daemon log\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn http(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return (0, String::new());
        };
        let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// SIGTERM, then the exit code (panics if it does not stop in time).
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes an order the way atomic writers do: a temp name, then a rename into place.
fn drop_order_atomically(w: &World, id: &str, user: &str, access: &str) {
    let desired = w.path("desired");
    let tmp = desired.join(format!(".{id}.toml.tmp"));
    std::fs::write(
        &tmp,
        format!("id = \"{id}\"\nuser = \"{user}\"\naccess = [\"{access}\"]\nordered_by = \"karin.chef\"\n"),
    )
    .unwrap();
    std::fs::rename(&tmp, desired.join(format!("{id}.toml"))).unwrap();
}

#[test]
fn daemon_converges_on_file_events_and_speaks_systemd() {
    let (w, port) = world();
    let anna = w.slapd.add_user("anna", "Anna");
    let bertil = w.slapd.add_user("bertil", "Bertil");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
    ]);
    let mut d = Running::spawn(&w, port);
    assert_eq!(d.http("/healthz").0, 200);
    d.wait_for("WATCHDOG=1 on the notify socket", |_| false);

    // Atomic rename into the directory: granted.
    drop_order_atomically(&w, "O-1", "anna", "wim");
    d.wait_for("anna granted", |_| w.members(WIM_GROUP).contains(&anna));

    // Editor-style: swap and backup files first (ignored), then the file itself.
    let desired = w.path("desired");
    std::fs::write(desired.join(".O-2.toml.swp"), "garbage").unwrap();
    std::fs::write(desired.join("O-2.toml~"), "garbage").unwrap();
    std::fs::write(
        desired.join("O-2.toml"),
        "id = \"O-2\"\nuser = \"bertil\"\naccess = [\"wim\"]\nordered_by = \"m\"\n",
    )
    .unwrap();
    d.wait_for("bertil granted", |_| w.members(WIM_GROUP).contains(&bertil));

    // Deleted: revoked.
    w.withdraw("O-1");
    d.wait_for("anna revoked", |_| !w.members(WIM_GROUP).contains(&anna));

    d.wait_for("ready", |d| d.http("/readyz").0 == 200);
    // The directory shows the revocation before the pass that made it has recorded its metrics.
    d.wait_for("the revoking pass's metrics", |d| {
        let metrics = d.http("/metrics").1;
        metrics.contains("coursegate_revocations_total{profile=\"wim\"} 1")
            && metrics.contains("coursegate_orders{phase=\"grant\"} 1")
    });
    let (code, metrics) = d.http("/metrics");
    assert_eq!(code, 200);
    for needle in [
        "coursegate_grants_total{profile=\"wim\"} 2",
        "coursegate_revocations_total{profile=\"wim\"} 1",
        "coursegate_reconcile_duration_seconds_count",
        "coursegate_orders{phase=\"grant\"} 1",
        "coursegate_brake_engaged 0",
        "coursegate_last_success_timestamp_seconds",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }

    let out = w.run(&["status"]);
    expect_exit(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("coursegate daemon (pid") && text.contains("bertil wim"),
        "{text}"
    );
    // Only one process may change state: a concurrent apply is refused.
    let out = w.run(&["apply"]);
    expect_exit(&out, 1);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        describe(&out)
    );

    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    assert!(d.notified("STOPPING=1"));
    expect_exit(&w.run(&["audit", "verify"]), 0);
    assert!(
        !d.log().contains(SERVICE_PASSWORD),
        "the password was logged"
    );
}

/// A dropped order is granted by the quick pass, without a full pass over every order; what the
/// quick pass must not decide (a course not passed, an `id` another file uses) it leaves alone,
/// and the full pass that follows once the files settle decides it. Its grants survive kill -9
/// before that full pass (the ledger is saved later; the audit log has them).
#[test]
fn a_dropped_order_is_granted_by_a_quick_pass_and_settled_by_a_full_one() {
    let (w, port) = world();
    let anna = w.slapd.add_user("anna", "Anna");
    let bertil = w.slapd.add_user("bertil", "Bertil");
    let cecilia = w.slapd.add_user("cecilia", "Cecilia");
    let dora = w.slapd.add_user("dora", "Dora");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "cecilia;Wim grundkurs;true;2026-11-01",
        "dora;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("O-1", "anna", &["wim"]);
    let full_passes = |d: &Running| d.log().matches("reconcile finished").count();
    let mut d = Running::spawn(&w, port);
    d.wait_for("anna granted by the first pass", |d| {
        full_passes(d) == 1 && w.members(WIM_GROUP).contains(&anna)
    });

    drop_order_atomically(&w, "O-2", "cecilia", "wim");
    d.wait_for("cecilia granted", |_| {
        w.members(WIM_GROUP).contains(&cecilia)
    });
    let log = d.log();
    assert_eq!(full_passes(&d), 1, "granted by a full pass:\n{log}");
    assert!(
        log.contains("quick pass finished") && log.contains("granted=1"),
        "{log}"
    );

    // Not passed: the quick pass grants nothing. The same id as O-2 in another file: the quick
    // pass does not decide it; the full pass makes both files invalid, and O-2's last valid
    // version stays in effect.
    drop_order_atomically(&w, "O-3", "bertil", "wim");
    w.order(
        "O-2-copy.toml",
        "id = \"O-2\"\nuser = \"dora\"\naccess = [\"wim\"]\nordered_by = \"m\"\n",
    );
    d.wait_for("a full pass after the duplicate", |d| full_passes(d) >= 2);
    d.wait_for("the status of the settled orders", |_| {
        let out = w.run(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("bertil wim") && text.contains("O-2-copy.toml")
    });
    let members = w.members(WIM_GROUP);
    assert!(
        members.contains(&anna) && members.contains(&cecilia),
        "{members:?}"
    );
    assert!(
        !members.contains(&bertil) && !members.contains(&dora),
        "{members:?}"
    );

    // A quick grant, then kill -9 before any full pass: the restarted daemon owns it.
    std::fs::remove_file(w.path("desired").join("O-2-copy.toml")).unwrap();
    d.wait_for("the duplicate gone", |d| full_passes(d) >= 3);
    let before = full_passes(&d);
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "cecilia;Wim grundkurs;true;2026-11-01",
        "dora;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
    ]);
    d.wait_for("the report change read", |d| full_passes(d) > before);
    let before = full_passes(&d);
    drop_order_atomically(&w, "O-4", "dora", "wim");
    d.wait_for("dora granted", |_| w.members(WIM_GROUP).contains(&dora));
    assert_eq!(
        full_passes(&d),
        before,
        "granted by a full pass:\n{}",
        d.log()
    );
    drop(d);
    let mut d = Running::spawn(&w, port);
    d.wait_for("a pass after the restart", |d| full_passes(d) >= 1);
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    expect_exit(&w.run(&["audit", "verify"]), 0);
    w.withdraw("O-4");
    let out = w.run(&["plan"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("revoke") && l.contains("dora")),
        "the quick grant is not owned after the crash: {}",
        describe(&out)
    );
}

/// What a quick pass granted from is a last-good version at once: SIGTERM before the full pass
/// saves it, so a file broken afterwards keeps its grant in effect.
#[test]
fn a_quick_grant_keeps_its_last_good_order_across_sigterm() {
    let (w, port) = world();
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    let full_passes = |d: &Running| d.log().matches("reconcile finished").count();
    let mut d = Running::spawn(&w, port);
    d.wait_for("the first pass", |d| full_passes(d) == 1);
    drop_order_atomically(&w, "O-1", "anna", "wim");
    d.wait_for("anna granted", |_| w.members(WIM_GROUP).contains(&anna));
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    assert_eq!(full_passes(&d), 1, "not a quick grant:\n{}", d.log());

    w.order(
        "O-1.toml",
        "id = \"O-1\"\nuser = \"anna\"\naccess = [\"wim\"\n",
    );
    let out = w.run(&["apply"]);
    assert!(
        w.members(WIM_GROUP).contains(&anna),
        "the broken file's last valid version is not in effect: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("last_good_in_effect=true"),
        "{}",
        describe(&out)
    );
}

/// An engaged revocation brake writes an audit record each full pass; new orders are still
/// granted by quick passes while the brake holds the revocations.
#[test]
fn the_revocation_brake_does_not_hold_up_quick_grants() {
    let port = free_port();
    let w = World::with(
        Slapd::start(),
        &format!("listen = \"127.0.0.1:{port}\"\nmax_revocations_per_run = 1"),
        "member",
        COURSES,
    );
    let anna = w.slapd.add_user("anna", "Anna");
    let bertil = w.slapd.add_user("bertil", "Bertil");
    let cecilia = w.slapd.add_user("cecilia", "Cecilia");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
        "cecilia;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("O-1", "anna", &["wim"]);
    w.simple_order("O-2", "bertil", &["wim"]);
    let full_passes = |d: &Running| d.log().matches("reconcile finished").count();
    let mut d = Running::spawn(&w, port);
    d.wait_for("both granted", |_| {
        let m = w.members(WIM_GROUP);
        m.contains(&anna) && m.contains(&bertil)
    });
    w.withdraw("O-1");
    w.withdraw("O-2");
    d.wait_for("the brake engaged", |d| {
        d.log().contains("revocation brake engaged")
    });
    d.wait_for("the pass that engaged it to finish", |d| {
        full_passes(d) >= 2
    });
    let before = full_passes(&d);
    drop_order_atomically(&w, "O-3", "cecilia", "wim");
    d.wait_for("cecilia granted", |_| {
        w.members(WIM_GROUP).contains(&cecilia)
    });
    assert_eq!(full_passes(&d), before, "not a quick grant:\n{}", d.log());
    let m = w.members(WIM_GROUP);
    assert!(
        m.contains(&anna) && m.contains(&bertil),
        "the brake let go: {m:?}"
    );
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    expect_exit(&w.run(&["audit", "verify"]), 0);
}

#[test]
fn daemon_rides_out_a_directory_outage() {
    let (mut w, port) = world();
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    let mut d = Running::spawn(&w, port);
    d.wait_for("ready", |d| d.http("/readyz").0 == 200);

    w.slapd.stop();
    drop_order_atomically(&w, "O-1", "anna", "wim");
    d.wait_for("not ready while slapd is down", |d| {
        d.http("/readyz").0 == 503
    });
    assert_eq!(d.http("/healthz").0, 200, "alive while a peer is down");
    w.slapd.restart();
    d.wait_for("anna granted after slapd came back", |_| {
        w.members(WIM_GROUP).contains(&anna)
    });
    d.wait_for("ready again", |d| d.http("/readyz").0 == 200);
    let (_, metrics) = d.http("/metrics");
    assert!(
        metrics.contains("coursegate_ldap_errors_total"),
        "{metrics}"
    );
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn garbled_report_holds_until_fixed() {
    let (w, port) = world();
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    let mut d = Running::spawn(&w, port);
    write_file(
        w.dir.path(),
        "results.csv",
        "this is not a report\n\u{1}\u{2}",
    );
    drop_order_atomically(&w, "O-1", "anna", "wim");
    d.wait_for("not ready: report unavailable", |d| {
        let (code, body) = d.http("/readyz");
        code == 503 && body.contains("course results unavailable")
    });
    assert!(
        !w.members(WIM_GROUP).contains(&anna),
        "granted on an unreadable report"
    );
    // Fixed with an atomic replace of the report.
    let tmp = w.path("results.csv.tmp");
    std::fs::write(
        &tmp,
        "Username;Course;Passed;Date\nanna;Wim grundkurs;true;2026-11-01\n",
    )
    .unwrap();
    std::fs::rename(&tmp, w.path("results.csv")).unwrap();
    d.wait_for("anna granted once the report is readable", |_| {
        w.members(WIM_GROUP).contains(&anna)
    });
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn sighup_rejects_a_bad_config_and_applies_a_good_one() {
    let (w, port) = world();
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    let mut d = Running::spawn(&w, port);
    let good = std::fs::read_to_string(&w.config).unwrap();

    std::fs::write(&w.config, good.replace("[lms]", "[lms]\nnonsense = true")).unwrap();
    d.signal("HUP");
    d.wait_for("reload rejected", |d| {
        d.log().contains("config reload REJECTED")
    });
    assert!(d.log().contains("nonsense"), "the error names the key");
    // The old config is still in force.
    drop_order_atomically(&w, "O-1", "anna", "wim");
    d.wait_for("anna granted with the old config", |_| {
        w.members(WIM_GROUP).contains(&anna)
    });

    // A good new config with a new profile: an order naming it becomes valid.
    drop_order_atomically(&w, "O-2", "anna", "kardio");
    let with_kardio = format!(
        "{good}\n[access.kardio]\ngroup = \"{KARDIOPACS_GROUP}\"\ncourses = [\"wim-grund\"]\n"
    );
    std::fs::write(&w.config, with_kardio).unwrap();
    d.signal("HUP");
    d.wait_for("kardio granted after reload", |_| {
        w.slapd.members(KARDIOPACS_GROUP, "member").contains(&anna)
    });
    assert!(d.log().contains("config reloaded"));
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn sigterm_mid_work_leaves_everything_consistent() {
    let (w, port) = world();
    let (users, _) = w.passed_users("u", 300);
    let mut d = Running::spawn(&w, port);
    for u in &users {
        w.simple_order(u, u, &["wim"]);
    }
    // Stop as soon as the pass has begun.
    d.wait_for("a pass started", |d| {
        d.log().matches("audit log anchor").count() >= 2
    });
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    expect_exit(&w.run(&["audit", "verify"]), 0);
    // Whatever was done is recorded; a one-shot apply finishes the rest.
    expect_exit(&w.run(&["apply"]), 0);
    assert_eq!(w.members(WIM_GROUP).len(), 301);
    let plan = w.plan_json();
    assert_eq!(plan["changes"].as_array().unwrap().len(), 0);
}

#[test]
fn order_directory_deleted_and_recreated() {
    let (w, port) = world();
    let anna = w.slapd.add_user("anna", "Anna");
    let bertil = w.slapd.add_user("bertil", "Bertil");
    w.results(&[
        "anna;Wim grundkurs;true;2026-11-01",
        "bertil;Wim grundkurs;true;2026-11-01",
    ]);
    w.simple_order("O-1", "anna", &["wim"]);
    let mut d = Running::spawn(&w, port);
    d.wait_for("anna granted", |_| w.members(WIM_GROUP).contains(&anna));

    let desired = w.path("desired");
    std::fs::remove_dir_all(&desired).unwrap();
    d.wait_for("not ready without the order directory", |d| {
        d.http("/readyz").0 == 503
    });
    assert!(
        w.members(WIM_GROUP).contains(&anna),
        "a missing directory must not revoke"
    );

    std::fs::create_dir(&desired).unwrap();
    w.simple_order("O-1", "anna", &["wim"]);
    w.simple_order("O-2", "bertil", &["wim"]);
    d.wait_for("bertil granted in the new directory", |_| {
        w.members(WIM_GROUP).contains(&bertil)
    });
    assert!(w.members(WIM_GROUP).contains(&anna));
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn json_logs_carry_the_reconcile_span() {
    let (w, _port) = world();
    w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    w.simple_order("O-1", "anna", &["wim"]);
    let mut cmd = coursegate_command(&w.config, &["--log-format", "json", "apply"]);
    cmd.env("RUST_LOG", "info");
    let out = run_with_timeout(cmd, COURSEGATE_TIMEOUT);
    expect_exit(&out, 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "reconcile finished"),
        "{stderr}"
    );
    assert!(!stderr.contains(SERVICE_PASSWORD));
}
