//! Orders from NATS JetStream (`[queue]`, SPEC §4): the queue is just another writer into
//! `desired_dir`, which stays the single source of truth.
//!
//! A durable pull consumer with explicit acks reads each message. A valid order is written as
//! `<id>.json` atomically (temp file, fsync, rename, fsync of the directory) and only then
//! acknowledged, so a crash between the two redelivers a message whose write is idempotent. A
//! withdrawal `{"withdraw": "<id>"}` removes the file that holds that id, then acks. An invalid
//! message never reaches the directory: it is published with its error to the dead-letter
//! subject and terminated, so it is not redelivered. The daemon's file watcher does the rest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::config::{Config, Queue};
use crate::daemon::http::Shared;
use crate::order::{self, FileKind};

/// What one message asks for, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Write this order (already valid) as `<id>.json` with these bytes.
    Order {
        id: String,
        json: Vec<u8>,
    },
    Withdraw {
        id: String,
    },
}

/// Validates a message body (SPEC §2 rules, unknown profile included). Pure.
pub fn interpret(body: &[u8], is_profile: &dyn Fn(&str) -> bool) -> Result<Message, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(map) = value.as_object()
        && map.contains_key("withdraw")
    {
        if map.len() != 1 {
            return Err("a withdrawal has exactly one key, \"withdraw\"".to_string());
        }
        let id = map["withdraw"]
            .as_str()
            .ok_or("\"withdraw\" must be a string (the order id)")?;
        check_id(id)?;
        return Ok(Message::Withdraw { id: id.to_string() });
    }
    let order = order::parse(body, FileKind::Json, is_profile).map_err(|e| e.to_string())?;
    check_id(&order.id)?;
    Ok(Message::Order {
        id: order.id,
        json: body.to_vec(),
    })
}

/// The rules that keep an id inside `desired_dir` as one file name.
fn check_id(id: &str) -> Result<(), String> {
    let len = id.chars().count();
    if !(1..=128).contains(&len) {
        return Err(format!("order id must be 1–128 characters, not {len}"));
    }
    if id.contains(['/', '\\']) || id.starts_with('.') || id.chars().any(|c| c.is_control()) {
        return Err(format!(
            "order id {id:?} could not be a file name in the order directory (`/`, `\\`, a leading `.` or a control character)"
        ));
    }
    if file_name(id).len() > 255 {
        return Err("order id is too long for a file name".to_string());
    }
    Ok(())
}

fn file_name(id: &str) -> String {
    format!("{id}.json")
}

/// The files in `dir` that hold order `id` (by name first, then by content).
fn files_holding(dir: &Path, id: &str, is_profile: &dyn Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !matches!(order::classify(&name), FileKind::Toml | FileKind::Json) {
            continue;
        }
        if let Ok(o) = order::load_file(&path, is_profile)
            && o.id == id
        {
            found.push(path);
        }
    }
    found
}

/// Carries out one valid message on the order directory. Idempotent.
pub fn apply_message(
    dir: &Path,
    message: &Message,
    is_profile: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    let remove = |path: &Path| {
        std::fs::remove_file(path).map_err(|e| format!("cannot remove {}: {e}", path.display()))
    };
    match message {
        Message::Order { id, json } => {
            let name = file_name(id);
            // Temp file, fsync, rename, fsync of the directory: the scanner never sees half.
            crate::state::write_atomic(&dir.join(&name), json).map_err(|e| e.to_string())?;
            // The id now lives in <id>.json. An admin's `<id>.toml` for the same order would make
            // both files invalid (duplicate id), so the queue's newer version replaces it. (Other
            // file names are not searched per message: that would cost a scan of the whole
            // directory each time; a duplicate elsewhere is reported by the scan, and the
            // last valid version stays in effect.)
            let twin = dir.join(format!("{id}.toml"));
            if order::load_file(&twin, is_profile).is_ok_and(|o| o.id == *id) {
                remove(&twin)?;
            }
            Ok(())
        }
        Message::Withdraw { id } => {
            for path in files_holding(dir, id, is_profile) {
                remove(&path)?;
            }
            Ok(())
        }
    }
}

/// Runs the consumer until `stop` turns true. Never returns an error: a broker that is down is
/// retried with backoff while the daemon keeps reconciling from the files.
pub async fn run(config: Config, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(queue) = config.queue.clone() else {
        return;
    };
    let mut backoff =
        crate::daemon::jittered_backoff(Duration::from_millis(500), Duration::from_secs(60));
    loop {
        if *stop.borrow() {
            return;
        }
        let result = consume(&config, &queue, &shared, &mut stop).await;
        if *stop.borrow() {
            return;
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(60));
        let why = match result {
            Ok(()) => "the message stream ended".to_string(),
            Err(e) => e,
        };
        tracing::error!(url = %queue.url, "order queue unavailable, retrying in {delay:?}: {why}");
        shared.set_queue_problem(Some(format!("order queue {}: {why}", queue.url)));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn consume(
    config: &Config,
    queue: &Queue,
    shared: &Arc<Shared>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    // The client reconnects by itself; its events keep readiness honest meanwhile.
    let events = shared.clone();
    let url = queue.url.clone();
    let mut options = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .name("coursegate")
        .event_callback(move |event| {
            let shared = events.clone();
            let url = url.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!(url = %url, "order queue disconnected, reconnecting");
                        shared.set_queue_problem(Some(format!("order queue {url}: disconnected")));
                    }
                    async_nats::Event::Connected => shared.set_queue_problem(None),
                    _ => {}
                }
            }
        });
    if let Some(creds) = &queue.credentials_file {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| format!("credentials file {}: {e}", creds.display()))?;
    }
    let client = options
        .connect(queue.url.as_str())
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: queue.stream.clone(),
            subjects: vec![queue.subject.clone()],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {}: {e}", queue.stream))?;
    let consumer = stream
        .get_or_create_consumer(
            &queue.durable,
            pull::Config {
                durable_name: Some(queue.durable.clone()),
                filter_subject: queue.subject.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                // A message whose ack never came (the daemon was killed) is redelivered after
                // this; writing it again is harmless, so a short wait loses little.
                ack_wait: Duration::from_secs(10),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer {}: {e}", queue.durable))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(100)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| format!("consumer {}: {e}", queue.durable))?;
    shared.set_queue_problem(None);
    tracing::info!(url = %queue.url, stream = %queue.stream, durable = %queue.durable, "consuming orders from the queue");

    let dir = config.daemon.desired_dir.clone();
    let profiles: Vec<String> = config.access.keys().cloned().collect();
    let is_profile = move |name: &str| profiles.iter().any(|p| p == name);
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            _ = stop.changed() => return Ok(()),
        };
        let message = match next {
            None => return Ok(()),
            Some(Err(e)) => return Err(format!("receiving: {e}")),
            Some(Ok(m)) => m,
        };
        // Each message is finished (file written and acked, or dead-lettered) before `stop` is
        // looked at again: SIGTERM never leaves half of one.
        match interpret(&message.payload, &is_profile) {
            Ok(m) => {
                let target = dir.clone();
                let is_profile = is_profile.clone();
                let m2 = m.clone();
                let written =
                    tokio::task::spawn_blocking(move || apply_message(&target, &m2, &is_profile))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r);
                match written {
                    Ok(()) => {
                        // A lost ack means a redelivery, and writing the same file again is harmless.
                        message.ack().await.map_err(|e| format!("ack: {e}"))?;
                        let (result, id) = match &m {
                            Message::Order { id, .. } => ("written", id),
                            Message::Withdraw { id } => ("withdrawn", id),
                        };
                        shared.metrics.record_queue(result);
                        tracing::info!(order = %id, result, "order from the queue");
                    }
                    Err(e) => {
                        // Not acked: redelivered once the directory is writable again.
                        tracing::error!(
                            "cannot write the order from the queue into {}: {e}",
                            dir.display()
                        );
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                            .await;
                        shared.metrics.record_queue("write_failed");
                    }
                }
            }
            Err(why) => {
                tracing::warn!(subject = %message.subject, "invalid order message, sent to the dead-letter subject: {why}");
                if let Some(dead) = &queue.dead_letter_subject {
                    let body = serde_json::json!({
                        "error": why,
                        "subject": message.subject.to_string(),
                        "payload": String::from_utf8_lossy(&message.payload),
                    });
                    client
                        .publish(dead.clone(), body.to_string().into())
                        .await
                        .map_err(|e| format!("dead-letter publish: {e}"))?;
                    client
                        .flush()
                        .await
                        .map_err(|e| format!("dead-letter publish: {e}"))?;
                }
                if config.notify.is_some() || config.ticket.is_some() {
                    // Told to the orderer by the next reconcile pass (crate::notify). Written
                    // before the message is terminated: a crash in between redelivers it, and
                    // the same sequence number names the same file.
                    let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                    let record = crate::notify::Rejected::new(
                        seq,
                        message.subject.as_str(),
                        &message.payload,
                        &why,
                    );
                    match record.save(&config.daemon.state_dir) {
                        Ok(()) => shared.pass_wanted.notify_one(),
                        Err(e) => tracing::warn!(
                            "cannot keep the rejected message for the orderer's notification: {e}"
                        ),
                    }
                }
                message
                    .ack_with(AckKind::Term)
                    .await
                    .map_err(|e| format!("terminate: {e}"))?;
                shared.metrics.record_queue("dead_letter");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profiles(p: &str) -> bool {
        p == "wim"
    }

    #[test]
    fn messages_are_validated_like_order_files() {
        let ok = br#"{"id":"Q-1","user":"anna","access":["wim"],"ordered_by":"m"}"#;
        assert!(matches!(interpret(ok, &profiles), Ok(Message::Order { id, .. }) if id == "Q-1"));
        assert_eq!(
            interpret(br#"{"withdraw":"Q-1"}"#, &profiles),
            Ok(Message::Withdraw { id: "Q-1".into() })
        );
        for (bad, why) in [
            (&b"{not json"[..], "not JSON"),
            (
                br#"{"id":"Q","user":"a","access":["wim"],"ordered_by":"m","x":1}"#,
                "unknown field",
            ),
            (
                br#"{"id":"../etc/passwd","user":"a","access":["wim"],"ordered_by":"m"}"#,
                "must not contain",
            ),
            (
                br#"{"id":"Q","user":"a","access":["ris"],"ordered_by":"m"}"#,
                "not an access profile",
            ),
            (br#"{"withdraw":"../x"}"#, "file name"),
            (br#"{"withdraw":"a\u0000b"}"#, "file name"),
            (br#"{"withdraw":"Q","extra":1}"#, "exactly one key"),
            (
                br#"["Q","a",["wim"],"m",null,null,null,null]"#,
                "JSON object",
            ),
        ] {
            let e = interpret(bad, &profiles).unwrap_err();
            assert!(e.contains(why), "{e:?} lacks {why:?}");
        }
    }

    #[test]
    fn writes_and_withdrawals_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("Q-1.toml"),
            "id = \"Q-1\"\nuser = \"a\"\naccess = [\"wim\"]\nordered_by = \"m\"\n",
        )
        .unwrap();
        let m = interpret(
            br#"{"id":"Q-1","user":"anna","access":["wim"],"ordered_by":"m"}"#,
            &profiles,
        )
        .unwrap();
        apply_message(d, &m, &profiles).unwrap();
        apply_message(d, &m, &profiles).unwrap();
        let names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["Q-1.json"],
            "the queue's version replaces the other file with that id"
        );
        let w = Message::Withdraw { id: "Q-1".into() };
        apply_message(d, &w, &profiles).unwrap();
        apply_message(d, &w, &profiles).unwrap();
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 0);
    }
}
