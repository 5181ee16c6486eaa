//! Orders from NATS JetStream (issue 7): the real daemon against the real NATS server on
//! 127.0.0.1:4222 (scripts/test.sh starts it if it is not running) and a real slapd. Each test
//! uses its own stream, subjects and consumer so tests never see each other's messages.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;

use crate::common::*;
use crate::daemon::Running;
use crate::reconcile::{COURSES, World};

const NATS: &str = "nats://127.0.0.1:4222";

struct Names {
    stream: String,
    subject: String,
    dead: String,
    durable: String,
}

fn names() -> Names {
    let tag = format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    Names {
        stream: format!("CG_{tag}"),
        subject: format!("cg.{tag}.orders"),
        dead: format!("cg.{tag}.dead"),
        durable: format!("cg{tag}"),
    }
}

fn queue_world(n: &Names, url: &str) -> (World, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let queue = format!(
        "\n[queue]\nkind = \"nats\"\nurl = \"{url}\"\nstream = \"{}\"\nsubject = \"{}\"\ndurable = \"{}\"\ndead_letter_subject = \"{}\"\n",
        n.stream, n.subject, n.durable, n.dead
    );
    let w = World::with(
        Slapd::start(),
        &format!("listen = \"127.0.0.1:{port}\""),
        "member",
        &format!("{COURSES}{queue}"),
    );
    (w, port)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect() -> async_nats::Client {
    async_nats::connect(NATS).await.unwrap_or_else(|e| {
        panic!("the NATS server must run on {NATS} (scripts/test.sh starts it; Debian package nats-server): {e}")
    })
}

/// Publishes each body to the stream and waits for the stream's acknowledgement.
fn publish(n: &Names, bodies: &[String]) {
    runtime().block_on(async {
        let js = jetstream::new(connect().await);
        js.get_or_create_stream(jetstream::stream::Config {
            name: n.stream.clone(),
            subjects: vec![n.subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
        for body in bodies {
            js.publish(n.subject.clone(), body.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
}

fn delete_stream(n: &Names) {
    runtime().block_on(async {
        let js = jetstream::new(connect().await);
        let _ = js.delete_stream(&n.stream).await;
    });
}

fn order_json(id: &str, user: &str) -> String {
    format!(r#"{{"id":"{id}","user":"{user}","access":["wim"],"ordered_by":"karin.chef"}}"#)
}

/// The order files in desired_dir (temp files would show up too: they must not exist).
fn files(w: &World) -> BTreeSet<String> {
    std::fs::read_dir(w.path("desired"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn published_orders_become_files_grants_and_revocations() {
    let n = names();
    let (w, port) = queue_world(&n, NATS);
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    let mut d = Running::spawn(&w, port);
    d.wait_for("ready with the queue consumed", |d| {
        d.http("/readyz").0 == 200
    });

    publish(&n, &[order_json("Q-1", "anna")]);
    d.wait_for("anna granted from the queue", |_| {
        w.members(WIM_GROUP).contains(&anna)
    });
    assert_eq!(files(&w), BTreeSet::from(["Q-1.json".to_string()]));

    publish(&n, &[r#"{"withdraw":"Q-1"}"#.to_string()]);
    d.wait_for("anna revoked after the withdrawal", |_| {
        !w.members(WIM_GROUP).contains(&anna)
    });
    assert!(files(&w).is_empty());

    // Invalid messages: dead-lettered with their error, never written, never redelivered.
    let dead = runtime().block_on(async {
        let client = connect().await;
        let mut sub = client.subscribe(n.dead.clone()).await.unwrap();
        client.flush().await.unwrap();
        let bad = [
            "{not json".to_string(),
            r#"{"id":"B-1","user":"anna","access":["wim"],"ordered_by":"m","colour":"red"}"#
                .to_string(),
            r#"{"id":"../../etc/cron.d/x","user":"anna","access":["wim"],"ordered_by":"m"}"#
                .to_string(),
            r#"{"id":"B-3","user":"anna","access":["ris"],"ordered_by":"m"}"#.to_string(),
            r#"{"withdraw":"../x"}"#.to_string(),
        ];
        let js = jetstream::new(client.clone());
        for body in &bad {
            js.publish(n.subject.clone(), body.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        while got.len() < bad.len() {
            match tokio::time::timeout(Duration::from_secs(20), sub.next()).await {
                Ok(Some(m)) => {
                    got.push(serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap())
                }
                _ => break,
            }
        }
        got
    });
    assert_eq!(dead.len(), 5, "{dead:?}\n{}", d.log());
    let errors: Vec<&str> = dead.iter().map(|m| m["error"].as_str().unwrap()).collect();
    for needle in [
        "not JSON",
        "unknown field `colour`",
        "must not contain",
        "not an access profile",
        "file name",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{needle} not in {errors:?}"
        );
    }
    assert!(
        files(&w).is_empty(),
        "an invalid message reached the order directory"
    );
    // Nothing is left pending or waiting for an ack (terminated, not redelivered).
    let (pending, ack_pending) = runtime().block_on(async {
        let js = jetstream::new(connect().await);
        let stream = js.get_stream(&n.stream).await.unwrap();
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(&n.durable).await.unwrap();
        let info = consumer.info().await.unwrap();
        (info.num_pending, info.num_ack_pending)
    });
    assert_eq!((pending, ack_pending), (0, 0));
    let (_, metrics) = d.http("/metrics");
    assert!(
        metrics.contains("coursegate_queue_messages_total{result=\"dead_letter\"} 5"),
        "{metrics}"
    );
    assert_eq!(d.terminate(), Some(0));
    delete_stream(&n);
}

#[test]
fn backlog_published_while_stopped_arrives_exactly_once_even_across_kill_minus_nine() {
    let n = names();
    let (w, port) = queue_world(&n, NATS);
    let bodies: Vec<String> = (0..1000)
        .map(|i| order_json(&format!("B-{i:04}"), &format!("u{i:04}")))
        .collect();
    publish(&n, &bodies);
    let expected: BTreeSet<String> = (0..1000).map(|i| format!("B-{i:04}.json")).collect();

    // Killed with SIGKILL while consuming the backlog, then started again.
    let mut d = Running::spawn(&w, port);
    let started = Instant::now();
    d.wait_for("some of the backlog written", |_| {
        files(&w).len() >= 100 || started.elapsed() > Duration::from_secs(10)
    });
    drop(d); // Drop kills with SIGKILL.
    let partial = files(&w).len();

    let mut d = Running::spawn(&w, port);
    // Order files only: a kill between a temp file's write and its rename leaves the temp file
    // until the message is redelivered (after the 10 s ack wait), which renames it.
    d.wait_for("the whole backlog written", |_| {
        files(&w).iter().filter(|f| !f.starts_with('.')).count() >= 1000
    });
    d.wait_for("the queue drained", |d| {
        d.http("/metrics")
            .1
            .contains("coursegate_queue_connected 1")
    });
    let all = files(&w);
    assert_eq!(
        all, expected,
        "each order exactly once, no temp files (killed after {partial})"
    );
    assert_eq!(d.terminate(), Some(0));
    delete_stream(&n);
}

#[test]
fn broker_down_keeps_reconciling_from_files() {
    let n = names();
    // Nothing listens on this port.
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (w, port) = queue_world(&n, &format!("nats://127.0.0.1:{dead_port}"));
    let anna = w.slapd.add_user("anna", "Anna");
    w.results(&["anna;Wim grundkurs;true;2026-11-01"]);
    let mut d = Running::spawn(&w, port);
    w.simple_order("F-1", "anna", &["wim"]);
    d.wait_for("file orders still granted", |_| {
        w.members(WIM_GROUP).contains(&anna)
    });
    let (code, body) = d.http("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("order queue"), "{body}");
    assert_eq!(d.http("/healthz").0, 200);
    assert_eq!(d.terminate(), Some(0));
}

/// A private nats-server with JetStream on a random port, for stopping and starting at will.
struct PrivateNats {
    port: u16,
    store: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    fn start() -> PrivateNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut n = PrivateNats {
            port,
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        n.restart();
        n
    }

    fn restart(&mut self) {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect(
                "nats-server is not installed: apt-get install nats-server (scripts/test.sh does)",
            );
        let child = std::process::Command::new(bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A clean shutdown (SIGTERM), as a broker restart for maintenance does.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn broker_restart_mid_run_then_the_backlog_is_consumed() {
    let n = names();
    let mut nats = PrivateNats::start();
    let (w, port) = queue_world(&n, &nats.url());
    let users: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
    let pairs: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), u.as_str())).collect();
    let dns = w.slapd.add_users(&pairs);
    let rows: Vec<String> = users
        .iter()
        .map(|u| format!("{u};Wim grundkurs;true;2026-11-01"))
        .collect();
    w.results(&rows.iter().map(String::as_str).collect::<Vec<_>>());
    let mut d = Running::spawn(&w, port);
    d.wait_for("queue consumed", |d| d.http("/readyz").0 == 200);

    nats.stop();
    d.wait_for("not ready while the broker is gone", |d| {
        let (code, body) = d.http("/readyz");
        code == 503 && body.contains("order queue")
    });
    nats.restart();
    let publish_to = |bodies: &[String]| {
        runtime().block_on(async {
            let client = async_nats::connect(nats.url()).await.unwrap();
            let js = jetstream::new(client);
            // The publishing side makes sure its stream exists, as the order form's would.
            js.get_or_create_stream(jetstream::stream::Config {
                name: n.stream.clone(),
                subjects: vec![n.subject.clone()],
                ..Default::default()
            })
            .await
            .unwrap();
            // A restarted server restores its streams from disk shortly after it listens.
            let deadline = Instant::now() + Duration::from_secs(10);
            for body in bodies {
                loop {
                    let sent = match js.publish(n.subject.clone(), body.clone().into()).await {
                        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match sent {
                        Ok(()) => break,
                        Err(e) if Instant::now() > deadline => panic!("publish: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        })
    };
    let bodies: Vec<String> = users
        .iter()
        .map(|u| order_json(&format!("R-{u}"), u))
        .collect();
    publish_to(&bodies);
    d.wait_for("every order from the backlog granted", |_| {
        let members = w.members(WIM_GROUP);
        dns.iter().all(|dn| members.contains(dn))
    });
    d.wait_for("ready again", |d| d.http("/readyz").0 == 200);
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn an_invalid_message_is_told_to_its_orderer_by_mail() {
    let n = names();
    let (w, port) = queue_world(&n, NATS);
    let sink = crate::notify::SmtpSink::start(w.dir.path());
    let mut config = std::fs::read_to_string(&w.config).unwrap();
    config.push_str(&format!(
        "\n[notify]\nsmtp_url = \"{}\"\nfrom = \"coursegate@example.org\"\nlanguage = \"en\"\n",
        sink.url()
    ));
    std::fs::write(&w.config, config).unwrap();
    w.slapd.add_user("karin.chef", "Karin Chef");
    let mut d = Running::spawn(&w, port);
    d.wait_for("ready with the queue consumed", |d| {
        d.http("/readyz").0 == 200
    });

    publish(
        &n,
        &[r#"{"id":"Q-9","user":"anna","access":["ris"],"ordered_by":"karin.chef","ticket":"EASIT-9"}"#
            .to_string()],
    );
    let m = sink.wait_for(1);
    assert_eq!(m[0]["rcpt_tos"][0], "karin.chef@example.org");
    let subject = m[0]["subject"].as_str().unwrap();
    assert!(
        subject.starts_with("The order Q-9 could not be read (queue message #"),
        "{subject}"
    );
    let body = m[0]["body"].as_str().unwrap();
    assert!(body.contains("not an access profile"), "{body}");
    assert!(body.contains("Ticket: EASIT-9"), "{body}");
    // Handled: the record is gone, and nothing is sent twice.
    d.wait_for("the rejected record removed", |_| {
        std::fs::read_dir(w.path("state/rejected"))
            .map(|mut e| e.next().is_none())
            .unwrap_or(true)
    });
    assert_eq!(d.terminate(), Some(0));
    assert_eq!(sink.messages().len(), 1);
    delete_stream(&n);
}
