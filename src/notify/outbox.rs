//! The durable outbox: notifications and ticket updates waiting to be delivered.
//!
//! One append-only JSON Lines file, `state_dir/outbox.jsonl`. A pass appends an `enqueue` record
//! for every new message and fsyncs once; the worker appends a `delivered` record (fsynced) after
//! the peer accepted the message. Reading the file back gives exactly the messages still owed,
//! so they survive restarts: each is delivered at least once, and exactly once unless the process
//! dies between the peer's acceptance and the `delivered` record. Message ids derive from the
//! event key and channel, so the same event can never be enqueued twice. A torn last line (a
//! crash mid-append) is cut off when the file is opened; anything else unreadable is an error
//! that names the file and line.
//!
//! Failed attempts are kept in memory only (attempts, next try, last error): after a restart
//! every pending message is tried again at once.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::events::{Event, History};
use crate::state::StateError;

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Channel {
    /// E-mail to the orderer.
    Mail,
    /// An update to the order's ticket (Easit GO or a webhook).
    Ticket,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Mail => "mail",
            Channel::Ticket => "ticket",
        }
    }
}

/// The message id for an event on a channel: stable across passes and restarts.
pub fn message_id(channel: Channel, event_key: &str) -> String {
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut hasher, channel.as_str().as_bytes());
    sha2::Digest::update(&mut hasher, b"\n");
    sha2::Digest::update(&mut hasher, event_key.as_bytes());
    hex::encode(&sha2::Digest::finalize(hasher)[..16])
}

/// One message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub channel: Channel,
    /// The recipient's address (mail only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Set when the message can never be sent (the orderer has no e-mail address): kept so
    /// that status can say so, never tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undeliverable: Option<String>,
    pub created: DateTime<Utc>,
    pub event: Event,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Line {
    Enqueue(Box<Message>),
    Delivered {
        id: String,
        at: DateTime<Utc>,
    },
    /// A failed attempt, for `status` (not fsynced: losing one loses only the error text).
    Failed {
        id: String,
        at: DateTime<Utc>,
        attempts: u32,
        error: String,
    },
}

/// Where a message stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Delivery {
    Pending {
        attempts: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_error: Option<String>,
        #[serde(skip)]
        next_try: Option<std::time::Instant>,
    },
    Delivered {
        at: DateTime<Utc>,
    },
    Undeliverable {
        reason: String,
    },
}

impl Delivery {
    /// Where a message stands when it is enqueued.
    fn new(message: &Message) -> Delivery {
        match &message.undeliverable {
            Some(reason) => Delivery::Undeliverable {
                reason: reason.clone(),
            },
            None => Delivery::Pending {
                attempts: 0,
                last_error: None,
                next_try: None,
            },
        }
    }
}

/// A message and where it stands.
#[derive(Debug, Clone)]
pub struct Entry {
    pub message: Message,
    pub delivery: Delivery,
}

/// The outbox, loaded.
#[derive(Debug)]
pub struct Outbox {
    path: PathBuf,
    /// `None` when opened read-only (`plan`, `explain`, `status`).
    file: Option<File>,
    /// By id, in no particular order; `order` keeps enqueue order.
    entries: BTreeMap<String, Entry>,
    order: Vec<String>,
    history: History,
}

fn io_err(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Outbox {
    /// Opens (creating) `state_dir/outbox.jsonl` for appending; cuts off a torn last line.
    pub fn open(state_dir: &Path) -> Result<Outbox, StateError> {
        Outbox::load(state_dir, true)
    }

    /// Reads the outbox without changing anything (a missing file is an empty outbox).
    pub fn read_only(state_dir: &Path) -> Result<Outbox, StateError> {
        Outbox::load(state_dir, false)
    }

    fn load(state_dir: &Path, writable: bool) -> Result<Outbox, StateError> {
        let path = state_dir.join("outbox.jsonl");
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(io_err(&path, source)),
        };
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut order = Vec::new();
        let mut history = History::default();
        let mut good_len = 0usize;
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        for (i, raw) in lines.iter().enumerate() {
            let complete = raw.ends_with(b"\n");
            match serde_json::from_slice::<Line>(raw) {
                Ok(_) | Err(_) if !complete && i + 1 == lines.len() => {
                    // A crash mid-append: the record never counted.
                    tracing::warn!(file = %path.display(), line = i + 1, "cutting off a torn last outbox line");
                    break;
                }
                Ok(Line::Enqueue(message)) => {
                    let message = *message;
                    history.record(&message.event);
                    let delivery = Delivery::new(&message);
                    if !entries.contains_key(&message.id) {
                        order.push(message.id.clone());
                    }
                    entries.insert(message.id.clone(), Entry { message, delivery });
                }
                Ok(Line::Delivered { id, at }) => {
                    if let Some(e) = entries.get_mut(&id) {
                        e.delivery = Delivery::Delivered { at };
                    }
                }
                Ok(Line::Failed {
                    id,
                    attempts,
                    error,
                    ..
                }) => {
                    if let Some(e) = entries.get_mut(&id)
                        && let Delivery::Pending {
                            attempts: a,
                            last_error,
                            ..
                        } = &mut e.delivery
                    {
                        *a = attempts;
                        *last_error = Some(error);
                    }
                }
                Err(e) => {
                    return Err(StateError::Corrupt {
                        path,
                        message: format!("line {}: {e}", i + 1),
                    });
                }
            }
            good_len += raw.len();
        }
        if !writable {
            return Ok(Outbox {
                path,
                file: None,
                entries,
                order,
                history,
            });
        }
        if good_len < text.len() {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            f.set_len(good_len as u64).map_err(|e| io_err(&path, e))?;
            f.sync_all().map_err(|e| io_err(&path, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        Ok(Outbox {
            path,
            file: Some(file),
            entries,
            order,
            history,
        })
    }

    /// What derivation needs to know about everything enqueued so far.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Appends new messages (ids already present are skipped) with one fsync.
    pub fn enqueue(&mut self, messages: Vec<Message>) -> Result<usize, StateError> {
        let fresh: Vec<Message> = messages
            .into_iter()
            .filter(|m| !self.entries.contains_key(&m.id))
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::new();
        for m in &fresh {
            serde_json::to_writer(&mut buf, &Line::Enqueue(Box::new(m.clone()))).map_err(|e| {
                StateError::Corrupt {
                    path: self.path.clone(),
                    message: e.to_string(),
                }
            })?;
            buf.push(b'\n');
        }
        self.append(&buf)?;
        let count = fresh.len();
        for m in fresh {
            self.history.record(&m.event);
            let delivery = Delivery::new(&m);
            self.order.push(m.id.clone());
            self.entries.insert(
                m.id.clone(),
                Entry {
                    message: m,
                    delivery,
                },
            );
        }
        Ok(count)
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        self.write(bytes, true)
    }

    fn write(&mut self, bytes: &[u8], sync: bool) -> Result<(), StateError> {
        let Some(file) = self.file.as_mut() else {
            return Err(io_err(
                &self.path,
                std::io::Error::new(std::io::ErrorKind::PermissionDenied, "opened read-only"),
            ));
        };
        file.write_all(bytes)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
            .map_err(|e| io_err(&self.path, e))
    }

    /// Pending messages whose next try is due, oldest first.
    pub fn due(&self, now: std::time::Instant) -> Vec<Message> {
        self.order
            .iter()
            .filter_map(|id| self.entries.get(id))
            .filter(|e| match &e.delivery {
                Delivery::Pending { next_try, .. } => next_try.is_none_or(|t| t <= now),
                _ => false,
            })
            .map(|e| e.message.clone())
            .collect()
    }

    /// When the next pending message is due, if any is pending.
    pub fn next_due(&self) -> Option<std::time::Instant> {
        self.entries
            .values()
            .filter_map(|e| match &e.delivery {
                Delivery::Pending { next_try, .. } => {
                    Some(next_try.unwrap_or_else(std::time::Instant::now))
                }
                _ => None,
            })
            .min()
    }

    /// Records that the peer accepted the message.
    pub fn delivered(&mut self, id: &str, at: DateTime<Utc>) -> Result<(), StateError> {
        let mut buf = serde_json::to_vec(&Line::Delivered {
            id: id.to_string(),
            at,
        })
        .map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        buf.push(b'\n');
        self.append(&buf)?;
        if let Some(e) = self.entries.get_mut(id) {
            e.delivery = Delivery::Delivered { at };
        }
        Ok(())
    }

    /// Records a failed attempt; the message is tried again after `retry_in`.
    pub fn failed(&mut self, id: &str, error: String, retry_in: Duration) {
        let mut count = 0;
        if let Some(e) = self.entries.get_mut(id)
            && let Delivery::Pending {
                attempts,
                last_error,
                next_try,
            } = &mut e.delivery
        {
            *attempts += 1;
            count = *attempts;
            *last_error = Some(error.clone());
            *next_try = Some(std::time::Instant::now() + retry_in);
        }
        let line = Line::Failed {
            id: id.to_string(),
            at: Utc::now(),
            attempts: count,
            error,
        };
        if let Ok(mut buf) = serde_json::to_vec(&line) {
            buf.push(b'\n');
            if let Err(e) = self.write(&buf, false) {
                tracing::warn!("cannot note a failed delivery in the outbox: {e}");
            }
        }
    }

    /// The number of failed attempts of a pending message.
    pub fn attempts(&self, id: &str) -> u32 {
        match self.entries.get(id).map(|e| &e.delivery) {
            Some(Delivery::Pending { attempts, .. }) => *attempts,
            _ => 0,
        }
    }

    /// Every message, in enqueue order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.order.iter().filter_map(|id| self.entries.get(id))
    }

    /// Counts by state: (pending, delivered, undeliverable).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for e in self.entries.values() {
            match e.delivery {
                Delivery::Pending { .. } => c.0 += 1,
                Delivery::Delivered { .. } => c.1 += 1,
                Delivery::Undeliverable { .. } => c.2 += 1,
            }
        }
        c
    }

    /// The most recent delivery error of any pending message.
    pub fn last_error(&self) -> Option<String> {
        self.order
            .iter()
            .rev()
            .find_map(|id| match self.entries.get(id).map(|e| &e.delivery) {
                Some(Delivery::Pending {
                    last_error: Some(e),
                    ..
                }) => Some(e.clone()),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::events::EventKind;

    fn message(key: &str) -> Message {
        Message {
            id: message_id(Channel::Mail, key),
            channel: Channel::Mail,
            to: Some("karin@example.org".into()),
            undeliverable: None,
            created: Utc::now(),
            event: Event {
                kind: EventKind::Granted,
                key: key.into(),
                order: Some("O1".into()),
                file: None,
                user: Some("anna".into()),
                ordered_by: Some("karin".into()),
                ticket: None,
                access: vec![],
                courses: vec![],
                at: Utc::now(),
                valid_until: None,
                reason: None,
                cause: None,
            },
        }
    }

    #[test]
    fn pending_messages_survive_reopening_and_delivered_ones_do_not_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        let (a, b) = (message("O1|granted|wim#0"), message("O1|expiring|x"));
        assert_eq!(outbox.enqueue(vec![a.clone(), b.clone()]).unwrap(), 2);
        // The same event again is not a new message.
        assert_eq!(outbox.enqueue(vec![a.clone()]).unwrap(), 0);
        outbox.delivered(&a.id, Utc::now()).unwrap();
        drop(outbox);

        let mut outbox = Outbox::open(dir.path()).unwrap();
        let due: Vec<String> = outbox
            .due(std::time::Instant::now())
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(due, vec![b.id.clone()]);
        assert!(outbox.history().keys.contains("O1|granted|wim#0"));
        assert_eq!(outbox.enqueue(vec![a]).unwrap(), 0);
        outbox.failed(&b.id, "connection refused".into(), Duration::from_secs(60));
        assert!(outbox.due(std::time::Instant::now()).is_empty());
        assert_eq!(outbox.counts(), (1, 1, 0));
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_garbage_elsewhere_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        outbox.enqueue(vec![message("k1")]).unwrap();
        drop(outbox);
        let path = dir.path().join("outbox.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"op\":\"enqueue\",\"id\":\"abc");
        std::fs::write(&path, &text).unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        assert_eq!(outbox.counts(), (1, 0, 0));
        drop(outbox);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));

        std::fs::write(&path, format!("not json\n{text}\n")).unwrap();
        let err = Outbox::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("outbox.jsonl") && err.contains("line 1"),
            "{err}"
        );
    }
}
