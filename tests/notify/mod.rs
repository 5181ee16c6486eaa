//! Orderer notifications, ticket updates and the orderer check, end to end: the real binary,
//! a real slapd, a real SMTP server (aiosmtpd, `tests/support/smtp_sink.py`) and a real HTTP
//! server on loopback standing in for Easit GO / a webhook receiver.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::daemon::{Running, free_port, world};
use crate::reconcile::{World, describe, expect_exit};

const WAIT: Duration = Duration::from_secs(30);
const PYTHON: &str = "/usr/bin/python3";

// === a real SMTP server ===

pub struct SmtpSink {
    child: Option<Child>,
    pub port: u16,
    out: PathBuf,
    /// `plain`, or `starttls`/`tls` with the certificate and key made in the test dir.
    mode: Vec<String>,
}

impl SmtpSink {
    pub fn start(dir: &Path) -> SmtpSink {
        SmtpSink::start_mode(dir, "plain")
    }

    /// A server that requires STARTTLS (`starttls`) or speaks TLS at once (`tls`), with a
    /// certificate for 127.0.0.1 from a CA in `dir/ca.pem`.
    pub fn start_mode(dir: &Path, mode: &str) -> SmtpSink {
        let mut args = vec![mode.to_string()];
        if mode != "plain" {
            make_certificates(dir);
            for f in ["server.pem", "server.key"] {
                args.push(dir.join(f).display().to_string());
            }
        }
        let mut sink = SmtpSink {
            child: None,
            port: free_port(),
            out: dir.join("smtp-received.jsonl"),
            mode: args,
        };
        sink.resume();
        sink
    }

    /// A port for a server that is not running yet (an SMTP outage).
    pub fn down(dir: &Path) -> SmtpSink {
        SmtpSink {
            child: None,
            port: free_port(),
            out: dir.join("smtp-received.jsonl"),
            mode: vec!["plain".to_string()],
        }
    }

    /// (Re)starts the server on the same port.
    pub fn resume(&mut self) {
        let ok = Command::new(PYTHON)
            .args(["-c", "import aiosmtpd"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "the notification tests need a real SMTP server, but {PYTHON} cannot import aiosmtpd: install it with: sudo apt-get install python3-aiosmtpd (or run scripts/test.sh, which does)"
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_sink.py");
        let mut child = Command::new(PYTHON)
            .arg(script)
            .arg(self.port.to_string())
            .arg(&self.out)
            .args(&self.mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the SMTP sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "SMTP sink did not start");
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn messages(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Polls until at least `n` messages have arrived.
    pub fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.messages();
            if m.len() >= n {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} messages, got {}: {m:#?}",
                m.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

// === a real HTTP server that records requests ===

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

pub struct HttpRecorder {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<Request>>>,
    /// The status every request is answered with.
    pub status: Arc<AtomicU16>,
}

impl HttpRecorder {
    pub fn start() -> HttpRecorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let (log, code) = (requests.clone(), status.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (log, code) = (log.clone(), code.clone());
                std::thread::spawn(move || serve(stream, &log, &code));
            }
        });
        HttpRecorder {
            port,
            requests,
            status,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn taken(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, log: &Mutex<Vec<Request>>, code: &AtomicU16) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        log.lock().unwrap().push(Request {
            method,
            path,
            headers,
            body,
        });
        let status = code.load(Ordering::SeqCst);
        let mut s = &stream;
        let _ = write!(
            s,
            "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{{}}"
        );
    }
}

// === helpers ===

fn append_config(w: &World, text: &str) {
    let mut config = std::fs::read_to_string(&w.config).unwrap();
    config.push_str(text);
    std::fs::write(&w.config, config).unwrap();
}

fn notify_section(smtp_url: &str, language: &str) -> String {
    format!(
        "\n[notify]\nsmtp_url = \"{smtp_url}\"\nfrom = \"coursegate@example.org\"\nlanguage = \"{language}\"\ntimeout = \"3s\"\n"
    )
}

fn order_with_ticket(w: &World, id: &str, user: &str, orderer: &str, ticket: &str) {
    w.order(
        &format!("{id}.toml"),
        &format!(
            "id = \"{id}\"\nuser = \"{user}\"\naccess = [\"wim\"]\nordered_by = \"{orderer}\"\nticket = \"{ticket}\"\nnote = \"ST-läkare, röntgen\"\n"
        ),
    );
}

fn apply(w: &World) -> std::process::Output {
    let out = w.run(&["apply"]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        describe(&out)
    );
    out
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// === tests ===

#[test]
fn orderer_is_told_which_course_then_that_access_was_granted_then_removed_each_once() {
    let w = World::new();
    let sink = SmtpSink::start(w.dir.path());
    append_config(&w, &notify_section(&sink.url(), "sv"));
    w.slapd.add_user("anna.andersson", "Anna Andersson");
    w.slapd.add_user("karin.chef", "Karin Chef");
    order_with_ticket(&w, "BEST-1", "anna.andersson", "karin.chef", "EASIT-1");

    // Not passed yet: one mail naming the course, its link, and that access follows by itself.
    expect_exit(&apply(&w), 0);
    let m = sink.wait_for(1);
    assert_eq!(m.len(), 1, "{m:#?}");
    let mail = &m[0];
    assert_eq!(
        mail["rcpt_tos"],
        serde_json::json!(["karin.chef@example.org"])
    );
    assert_eq!(mail["mail_from"], "coursegate@example.org");
    assert_eq!(
        mail["subject"],
        "E-kurs krävs innan anna.andersson får behörighet till Wim (RIS)"
    );
    // å/ä/ö travel MIME-encoded: the raw message is pure ASCII, the decoded text intact.
    assert_eq!(mail["raw_is_ascii"], true, "{mail:#?}");
    assert!(
        mail["raw_subject"].as_str().unwrap().contains("=?utf-8?"),
        "{mail:#?}"
    );
    assert_eq!(mail["charset"], "utf-8");
    let body = mail["body"].as_str().unwrap();
    assert!(body.contains("Wim – grundkurs"), "{body}");
    assert!(
        body.contains("https://pingpong.example.org/courseId/1"),
        "{body}"
    );
    assert!(body.contains("automatiskt"), "{body}");
    assert!(body.contains("Ärende: EASIT-1"), "{body}");

    // Nothing new: nothing sent.
    expect_exit(&apply(&w), 0);
    assert_eq!(sink.messages().len(), 1);

    // Passed: access granted, one mail.
    w.results(&["anna.andersson;Wim grundkurs;true;2026-11-20"]);
    expect_exit(&apply(&w), 0);
    let m = sink.wait_for(2);
    assert_eq!(
        m[1]["subject"],
        "Behörighet beviljad: Wim (RIS) för anna.andersson"
    );
    expect_exit(&apply(&w), 0);
    assert_eq!(sink.messages().len(), 2);

    // explain and status show what was sent.
    let explain = stdout(&w.run(&["explain", "anna.andersson"]));
    assert!(
        explain.contains(
            "notifications for BEST-1: course-needed mail to karin.chef@example.org delivered"
        ),
        "{explain}"
    );
    let status = stdout(&w.run(&["status"]));
    assert!(
        status.contains("notifications: 0 pending, 2 delivered, 0 undeliverable"),
        "{status}"
    );

    // Withdrawn: the membership goes, and the orderer hears so, once.
    w.withdraw("BEST-1");
    expect_exit(&apply(&w), 0);
    let m = sink.wait_for(3);
    assert_eq!(
        m[2]["subject"],
        "Behörighet borttagen: Wim (RIS) för anna.andersson"
    );
    assert!(
        m[2]["body"]
            .as_str()
            .unwrap()
            .contains("beställningen har återkallats"),
        "{:#?}",
        m[2]
    );
    expect_exit(&apply(&w), 0);
    assert_eq!(sink.messages().len(), 3, "{:#?}", sink.messages());
    // Every message has its own stable Message-ID.
    let ids: std::collections::BTreeSet<&str> = m
        .iter()
        .map(|x| x["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
}

#[test]
fn mail_goes_over_starttls_and_smtps_and_an_unknown_certificate_is_refused() {
    for (mode, scheme) in [("starttls", "smtp"), ("tls", "smtps")] {
        let w = World::new();
        let sink = SmtpSink::start_mode(w.dir.path(), mode);
        let url = format!("{scheme}://127.0.0.1:{}", sink.port);
        // First without trusting the test CA: the certificate is refused, nothing is sent,
        // the message waits.
        append_config(&w, &notify_section(&url, "en"));
        w.slapd.add_user("anna.andersson", "Anna Andersson");
        w.slapd.add_user("karin.chef", "Karin Chef");
        w.simple_order("BEST-10", "anna.andersson", &["wim"]);
        expect_exit(&apply(&w), 0);
        assert!(sink.messages().is_empty(), "{mode}");
        let status = stdout(&w.run(&["status"]));
        assert!(
            status.contains(
                "course-needed mail to karin.chef@example.org pending after 1 failed attempt(s)"
            ),
            "{mode}: {status}"
        );
        assert!(
            status.to_lowercase().contains("certificate"),
            "{mode}: {status}"
        );

        // Trusting the CA: delivered, over TLS.
        append_config(&w, "");
        let config = std::fs::read_to_string(&w.config).unwrap().replace(
            "timeout = \"3s\"\n",
            "timeout = \"3s\"\ntls_ca_file = \"ca.pem\"\n",
        );
        std::fs::write(&w.config, config).unwrap();
        expect_exit(&apply(&w), 0);
        let m = sink.wait_for(1);
        assert_eq!(m.len(), 1, "{mode}: {m:#?}");
        assert!(
            m[0]["subject"]
                .as_str()
                .unwrap()
                .starts_with("E-course required"),
            "{mode}: {m:#?}"
        );
    }
}

#[test]
fn english_invalid_order_and_expiry_warning_reach_the_orderer() {
    let w = World::new();
    let sink = SmtpSink::start(w.dir.path());
    append_config(&w, &notify_section(&sink.url(), "en"));
    w.slapd.add_user("bertil.berg", "Bertil Berg");
    w.slapd.add_user("karin.chef", "Karin Chef");
    w.results(&["bertil.berg;Wim grundkurs;true;2026-11-20"]);
    // Valid for three more days: inside the default 14-day warning.
    let until = (chrono::Utc::now() + chrono::Duration::days(3)).format("%Y-%m-%d");
    w.order(
        "BEST-2.toml",
        &format!(
            "id = \"BEST-2\"\nuser = \"bertil.berg\"\naccess = [\"wim\"]\nordered_by = \"karin.chef\"\nvalid_until = {until}\n"
        ),
    );
    w.order(
        "BEST-3.toml",
        "id = \"BEST-3\"\nuser = \"bertil.berg\"\naccess = [\"wim\", \"radiology\"]\nordered_by = \"karin.chef\"\n",
    );
    expect_exit(&apply(&w), 0);
    let m = sink.wait_for(3);
    let subjects: Vec<&str> = m.iter().map(|x| x["subject"].as_str().unwrap()).collect();
    assert!(
        subjects.contains(&"Access granted: Wim (RIS) for bertil.berg"),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&format!("Access to Wim (RIS) for bertil.berg ends on {until}").as_str()),
        "{subjects:?}"
    );
    let invalid = m
        .iter()
        .find(|x| x["subject"] == "The order BEST-3 could not be read (BEST-3.toml)")
        .unwrap_or_else(|| panic!("{subjects:?}"));
    assert!(
        invalid["body"].as_str().unwrap().contains("radiology"),
        "{invalid:#?}"
    );
    expect_exit(&apply(&w), 0);
    assert_eq!(sink.messages().len(), 3);
}

#[test]
fn smtp_outage_delays_mail_and_loses_none_and_a_restart_sends_nothing_twice() {
    let (w, port) = world();
    let mut sink = SmtpSink::down(w.dir.path());
    append_config(&w, &notify_section(&sink.url(), "sv"));
    w.slapd.add_user("anna.andersson", "Anna Andersson");
    w.slapd.add_user("karin.chef", "Karin Chef");
    w.results(&["anna.andersson;Wim grundkurs;true;2026-11-20"]);
    order_with_ticket(&w, "BEST-4", "anna.andersson", "karin.chef", "EASIT-4");

    let mut d = Running::spawn(&w, port);
    d.wait_for("the grant", |_| {
        w.members(WIM_GROUP).contains(&user_dn("anna.andersson"))
    });
    // The mail server is down: reconciling went on; the mail waits in the outbox.
    d.wait_for("a failed delivery in the log", |r| {
        r.log().contains("notification not delivered")
    });
    let outbox = std::fs::read_to_string(w.path("state/outbox.jsonl")).unwrap();
    assert_eq!(outbox.matches("\"op\":\"enqueue\"").count(), 1, "{outbox}");

    sink.resume();
    let m = sink.wait_for(1);
    assert_eq!(
        m[0]["subject"],
        "Behörighet beviljad: Wim (RIS) för anna.andersson"
    );
    assert_eq!(d.terminate(), Some(0));

    // A restart finds the message delivered and derives nothing new.
    let mut d = Running::spawn(&w, port);
    d.wait_for("a second pass", |r| {
        r.log().matches("reconcile finished").count() >= 1
    });
    assert_eq!(d.terminate(), Some(0));
    assert_eq!(sink.messages().len(), 1, "{:#?}", sink.messages());
    let status = stdout(&w.run(&["status"]));
    assert!(status.contains("0 pending, 1 delivered"), "{status}");
}

#[test]
fn easit_receives_the_documented_request_with_the_api_key_as_basic_user() {
    let w = World::new();
    let easit = HttpRecorder::start();
    write_file(w.dir.path(), "easit.key", "s3cret-key\n");
    append_config(
        &w,
        &format!(
            "\n[ticket]\nkind = \"easit\"\nurl = \"{}/\"\napi_key_file = \"easit.key\"\nimport_handler = \"CoursegateUpdate\"\n",
            easit.url()
        ),
    );
    w.slapd.add_user("anna.andersson", "Anna Andersson");
    order_with_ticket(&w, "BEST-5", "anna.andersson", "karin.chef", "EASIT-123456");
    // An order without a ticket gets no ticket update.
    w.slapd.add_user("bertil.berg", "Bertil Berg");
    w.simple_order("BEST-6", "bertil.berg", &["wim"]);

    let out = apply(&w);
    expect_exit(&out, 0);
    let requests = easit.taken();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let r = &requests[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/integration-api/items")
    );
    assert_eq!(
        r.headers.get("authorization").map(String::as_str),
        Some(format!("Basic {}", base64_encode(b"s3cret-key:")).as_str())
    );
    assert!(r.headers["content-type"].starts_with("application/json"));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["importHandlerIdentifier"], "CoursegateUpdate");
    let props = body["itemToImport"][0]["property"].as_array().unwrap();
    let prop = |name: &str| {
        props
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["content"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no property {name}: {body}"))
    };
    assert_eq!(prop("ticket"), "EASIT-123456");
    assert_eq!(prop("event"), "course-needed");
    assert_eq!(
        prop("status"),
        "E-kurs krävs innan anna.andersson får behörighet till Wim (RIS)"
    );
    // The key is never logged.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cret-key"));

    // Easit answers 503: the update stays in the outbox and goes out on a later run.
    easit.status.store(503, Ordering::SeqCst);
    w.results(&["anna.andersson;Wim grundkurs;true;2026-11-20"]);
    expect_exit(&apply(&w), 0);
    assert_eq!(easit.taken().len(), 2);
    let status = stdout(&w.run(&["status"]));
    assert!(
        status.contains("granted ticket pending after 1 failed attempt(s): HTTP 503"),
        "{status}"
    );
    easit.status.store(200, Ordering::SeqCst);
    expect_exit(&apply(&w), 0);
    let requests = easit.taken();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    let last: Value = serde_json::from_slice(&requests[2].body).unwrap();
    assert_eq!(last["itemToImport"][0]["property"][2]["content"], "granted");
    expect_exit(&apply(&w), 0);
    assert_eq!(easit.taken().len(), 3);
}

#[test]
fn webhook_posts_the_event_signed_with_hmac_sha256() {
    use hmac::Mac;
    let w = World::new();
    let hook = HttpRecorder::start();
    write_file(w.dir.path(), "hook.secret", "hook-secret\n");
    append_config(
        &w,
        &format!(
            "\n[ticket]\nkind = \"webhook\"\nurl = \"{}/coursegate\"\nsecret_file = \"hook.secret\"\n",
            hook.url()
        ),
    );
    w.slapd.add_user("anna.andersson", "Anna Andersson");
    w.results(&["anna.andersson;Wim grundkurs;true;2026-11-20"]);
    order_with_ticket(&w, "BEST-7", "anna.andersson", "karin.chef", "JIRA-77");
    expect_exit(&apply(&w), 0);
    let requests = hook.taken();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let r = &requests[0];
    assert_eq!(r.path, "/coursegate");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret").unwrap();
    mac.update(&r.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.headers["x-coursegate-signature-256"], expected);
    assert_eq!(r.headers["x-coursegate-event"], "granted");
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["event"], "granted");
    assert_eq!(body["ticket"], "JIRA-77");
    assert_eq!(body["order"], "BEST-7");
    assert_eq!(body["user"], "anna.andersson");
    assert_eq!(body["access"][0]["name"], "wim");
    assert_eq!(
        body["delivery"],
        r.headers["x-coursegate-delivery"].as_str()
    );
}

#[test]
fn an_orderer_outside_the_allowed_group_grants_nothing_and_is_told_why() {
    let w = World::new();
    let sink = SmtpSink::start(w.dir.path());
    let managers = "cn=imaging-managers,ou=groups,dc=example,dc=org";
    let karin = w.slapd.add_user("karin.chef", "Karin Chef");
    w.slapd.add_user("olle.obehorig", "Olle Obehörig");
    w.slapd.add_ldif(&format!(
        "dn: {managers}\nobjectClass: groupOfNames\ncn: imaging-managers\nmember: {karin}\nmember: {PLACEHOLDER_DN}\n"
    ));
    append_config(
        &w,
        &format!(
            "\n[orders]\nallowed_orderers_group = \"{managers}\"\n{}",
            notify_section(&sink.url(), "en")
        ),
    );
    w.slapd.add_user("anna.andersson", "Anna Andersson");
    w.slapd.add_user("bertil.berg", "Bertil Berg");
    w.results(&[
        "anna.andersson;Wim grundkurs;true;2026-11-20",
        "bertil.berg;Wim grundkurs;true;2026-11-20",
    ]);
    w.order(
        "BEST-8.toml",
        "id = \"BEST-8\"\nuser = \"anna.andersson\"\naccess = [\"wim\"]\nordered_by = \"olle.obehorig\"\n",
    );
    w.simple_order("BEST-9", "bertil.berg", &["wim"]);

    let plan = w.plan_json();
    let changes = plan["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{plan}");
    assert_eq!(changes[0]["user"], "bertil.berg");

    expect_exit(&apply(&w), 0);
    let members = w.members(WIM_GROUP);
    assert!(members.contains(&user_dn("bertil.berg")));
    assert!(!members.contains(&user_dn("anna.andersson")), "{members:?}");

    let explain = stdout(&w.run(&["explain", "anna.andersson"]));
    assert!(
        explain.contains("unauthorized")
            && explain.contains("olle.obehorig is not a member of cn=imaging-managers"),
        "{explain}"
    );
    let status = stdout(&w.run(&["status"]));
    assert!(status.contains("unauthorized (1)"), "{status}");

    let m = sink.wait_for(2);
    let to_olle = m
        .iter()
        .find(|x| x["rcpt_tos"][0] == "olle.obehorig@example.org")
        .unwrap_or_else(|| panic!("{m:#?}"));
    assert_eq!(
        to_olle["subject"],
        "The order BEST-8 is not in effect: you may not order access"
    );
    assert!(
        to_olle["body"]
            .as_str()
            .unwrap()
            .contains("not a member of cn=imaging-managers"),
        "{to_olle:#?}"
    );

    // Karin leaves the managers: what she ordered stays (accepted when first seen).
    w.slapd.remove_member(managers, "member", &karin);
    expect_exit(&apply(&w), 0);
    assert!(w.members(WIM_GROUP).contains(&user_dn("bertil.berg")));
    let accepted: Value =
        serde_json::from_str(&std::fs::read_to_string(w.path("state/orderers.json")).unwrap())
            .unwrap();
    assert!(
        accepted["accepted"]["BEST-9"]["how"]
            .as_str()
            .unwrap()
            .contains("karin.chef is a member"),
        "{accepted}"
    );
    assert!(accepted["accepted"].get("BEST-8").is_none(), "{accepted}");
    let _ = describe;
}
