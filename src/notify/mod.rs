//! Telling people what happened to an order: e-mail to the orderer (`[notify]`) and updates to
//! the order's ticket (`[ticket]`).
//!
//! Each reconcile pass derives the events its outcome calls for ([`events`]: course needed,
//! granted, invalid, expiring, revoked, unauthorized), turns each into one message per channel
//! and appends them to the durable [`outbox`] before the pass ends. A worker delivers what the
//! outbox owes with retry and backoff; a peer that is down only delays its own messages, never a
//! reconcile. Nothing here can change the directory.

pub mod events;
pub mod outbox;
pub mod render;
pub mod send;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::config::Config;
use crate::directory::Directory;
use crate::order::Scan;
use crate::plan::{Gate, Plan, UserLookup};
use crate::state::Ledger;
use crate::{Error, Result};
use events::{DeriveInput, InvalidHints};
use outbox::{Channel, Delivery, Message, Outbox, message_id};
use send::{Mailer, SetupError, TicketClient};

/// The first retry waits this long; each failure doubles it, up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(15 * 60);

/// The outbox and the senders.
#[derive(Debug)]
pub struct Notifier {
    outbox: Mutex<Outbox>,
    mailer: Option<Mailer>,
    tickets: Option<TicketClient>,
    wake: tokio::sync::Notify,
}

/// What one delivery round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    pub delivered: usize,
    pub failed: usize,
    /// Not tried because their peer failed earlier in the round.
    pub deferred: usize,
}

/// The outbox at a glance, for `status` and the daemon's published status.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub pending: usize,
    pub delivered: usize,
    pub undeliverable: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One message about an order, for `explain` and `status`.
#[derive(Debug, Clone, Serialize)]
pub struct OrderNote {
    pub event: String,
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(flatten)]
    pub delivery: Delivery,
}

fn setup(e: SetupError) -> Error {
    match e {
        SetupError::Config(c) => Error::Config(c),
        other => Error::Daemon(other.to_string()),
    }
}

impl Notifier {
    /// The notifier the config asks for, or `None` without `[notify]` and `[ticket]`.
    pub fn open(config: &Config, state_dir: &Path) -> Result<Option<Notifier>> {
        if config.notify.is_none() && config.ticket.is_none() {
            return Ok(None);
        }
        let mailer = config
            .notify
            .as_ref()
            .map(Mailer::new)
            .transpose()
            .map_err(setup)?;
        let tickets = match &config.ticket {
            Some(t) => {
                let (language, dir) = config
                    .notify
                    .as_ref()
                    .map(|n| (n.language, n.templates_dir.as_deref()))
                    .unwrap_or((crate::config::Language::Sv, None));
                let templates = render::Templates::load(language, dir)
                    .map_err(|e| setup(SetupError::Template(e)))?;
                Some(TicketClient::new(t, templates).map_err(setup)?)
            }
            None => None,
        };
        let outbox = Outbox::open(state_dir).map_err(Error::State)?;
        Ok(Some(Notifier {
            outbox: Mutex::new(outbox),
            mailer,
            tickets,
            wake: tokio::sync::Notify::new(),
        }))
    }

    /// Derives the events of a finished pass and puts their messages in the outbox (fsynced
    /// before returning). Returns how many messages were added.
    #[allow(clippy::too_many_arguments)]
    pub async fn record(
        &self,
        config: &Config,
        dir: &mut Directory,
        scan: &Scan,
        gates: &HashMap<String, Gate>,
        plan: &Plan,
        granted_now: &HashSet<(String, String)>,
        ledger: &Ledger,
        now: DateTime<Utc>,
    ) -> Result<usize> {
        let rejected = Rejected::load_all(&config.daemon.state_dir);
        let events = {
            let outbox = self.outbox.lock().await;
            // Only files whose problem nobody was told about yet are read again.
            let hints = invalid_hints(&config.daemon.desired_dir, scan, |bad| {
                !outbox.history().keys.contains(&events::invalid_key(bad))
            });
            let mut events = events::derive(&DeriveInput {
                config,
                scan,
                gates,
                plan,
                granted_now,
                ledger,
                history: outbox.history(),
                invalid_hints: &hints,
                now,
            });
            events.extend(
                rejected
                    .iter()
                    .map(|(_, r)| events::rejected_event(r, now))
                    .filter(|e| !outbox.history().keys.contains(&e.key)),
            );
            events
        };
        if events.is_empty() {
            forget_rejected(&rejected);
            return Ok(0);
        }

        // The orderers' addresses, only for events that will be mailed.
        let mut addresses: HashMap<String, UserLookup> = HashMap::new();
        if self.mailer.is_some() {
            let orderers: BTreeSet<String> =
                events.iter().filter_map(|e| e.ordered_by.clone()).collect();
            let orderers: Vec<String> = orderers.into_iter().collect();
            addresses = dir.resolve_users(&orderers).await;
        }

        let mut messages = Vec::new();
        let mut deferred = 0usize;
        for event in events {
            let mut for_event = Vec::new();
            if self.mailer.is_some() {
                let orderer = event.ordered_by.clone().unwrap_or_default();
                let lookup = event.ordered_by.as_ref().map(|o| addresses.get(o));
                let (to, undeliverable) = match lookup {
                    // A rejected queue message may name a ticket but no orderer.
                    None => (None, Some("the order names no orderer".to_string())),
                    Some(Some(UserLookup::Found {
                        mail: Some(mail), ..
                    })) => (Some(mail.clone()), None),
                    Some(Some(UserLookup::Found { mail: None, .. })) => (
                        None,
                        Some(format!("the orderer {orderer} has no mail attribute")),
                    ),
                    Some(Some(UserLookup::NotFound)) => (
                        None,
                        Some(format!("the orderer {orderer} has no directory entry")),
                    ),
                    // Unknown for now: the whole event waits for the next pass, so that its
                    // channels stay together and the mail is not lost.
                    Some(Some(UserLookup::Failed { .. } | UserLookup::Ambiguous { .. }) | None) => {
                        deferred += 1;
                        continue;
                    }
                };
                if let Some(why) = &undeliverable {
                    tracing::warn!(order = ?event.order, event = event.kind.as_str(), "no e-mail to the orderer: {why}");
                }
                for_event.push(Message {
                    id: message_id(Channel::Mail, &event.key),
                    channel: Channel::Mail,
                    to,
                    undeliverable,
                    created: now,
                    event: event.clone(),
                });
            }
            if self.tickets.is_some() && event.ticket.is_some() {
                for_event.push(Message {
                    id: message_id(Channel::Ticket, &event.key),
                    channel: Channel::Ticket,
                    to: None,
                    undeliverable: None,
                    created: now,
                    event: event.clone(),
                });
            }
            messages.extend(for_event);
        }
        if deferred > 0 {
            tracing::warn!(
                deferred,
                "notifications wait for the next pass: the orderer's directory entry could not be read"
            );
        }
        let added = self
            .outbox
            .lock()
            .await
            .enqueue(messages)
            .map_err(Error::State)?;
        if added > 0 {
            tracing::info!(messages = added, "notifications queued in the outbox");
            self.wake.notify_one();
        }
        if deferred == 0 {
            forget_rejected(&rejected);
        }
        Ok(added)
    }

    /// Tries every message that is due once. A peer that fails (unreachable, 5xx, timeout) is
    /// not tried again in the same round: its other messages wait for their next try.
    pub async fn deliver_due(&self) -> Result<Round> {
        let due = self.outbox.lock().await.due(Instant::now());
        let mut round = Round::default();
        let mut down: HashMap<Channel, String> = HashMap::new();
        for message in due {
            if let Some(why) = down.get(&message.channel) {
                let mut outbox = self.outbox.lock().await;
                let wait = retry_delay(outbox.attempts(&message.id));
                outbox.failed(&message.id, why.clone(), wait);
                round.deferred += 1;
                continue;
            }
            let result = match message.channel {
                Channel::Mail => match &self.mailer {
                    Some(m) => m.send(&message).await.map_err(|e| (e, true)),
                    None => Err(("[notify] is no longer configured".to_string(), false)),
                },
                Channel::Ticket => match &self.tickets {
                    Some(t) => t.send(&message).await.map_err(|e| {
                        let peer_down = !e.starts_with("HTTP 4");
                        (e, peer_down)
                    }),
                    None => Err(("[ticket] is no longer configured".to_string(), false)),
                },
            };
            let mut outbox = self.outbox.lock().await;
            match result {
                Ok(()) => {
                    outbox
                        .delivered(&message.id, Utc::now())
                        .map_err(Error::State)?;
                    round.delivered += 1;
                    tracing::info!(
                        order = ?message.event.order,
                        event = message.event.kind.as_str(),
                        channel = message.channel.as_str(),
                        "notification delivered"
                    );
                }
                Err((error, peer_down)) => {
                    let attempts = outbox.attempts(&message.id);
                    let wait = retry_delay(attempts);
                    tracing::warn!(
                        order = ?message.event.order,
                        event = message.event.kind.as_str(),
                        channel = message.channel.as_str(),
                        attempt = attempts + 1,
                        retry_in = %humantime::format_duration(wait),
                        "notification not delivered: {error}"
                    );
                    outbox.failed(&message.id, error.clone(), wait);
                    round.failed += 1;
                    if peer_down {
                        down.insert(message.channel, format!("not tried: {error}"));
                    }
                }
            }
        }
        Ok(round)
    }

    /// The daemon's delivery loop: delivers whatever is due, then sleeps until the next message
    /// is due or a pass adds new ones. Runs until the task is dropped.
    pub async fn run_worker(&self) {
        loop {
            if let Err(e) = self.deliver_due().await {
                tracing::error!("outbox: {e}");
            }
            let next = self.outbox.lock().await.next_due();
            let sleep = next
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600))
                .max(Duration::from_millis(50));
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    pub async fn summary(&self) -> Summary {
        let outbox = self.outbox.lock().await;
        let (pending, delivered, undeliverable) = outbox.counts();
        Summary {
            pending,
            delivered,
            undeliverable,
            last_error: outbox.last_error(),
        }
    }

    /// The outbox for `explain` and `status`.
    pub async fn view(&self) -> View {
        View::of(&*self.outbox.lock().await)
    }
}

/// What `explain` and `status` show of the outbox.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub summary: Summary,
    /// Order id -> its messages, in enqueue order.
    pub by_order: std::collections::BTreeMap<String, Vec<OrderNote>>,
}

impl View {
    pub fn of(outbox: &Outbox) -> View {
        let (pending, delivered, undeliverable) = outbox.counts();
        let mut by_order: std::collections::BTreeMap<String, Vec<OrderNote>> =
            std::collections::BTreeMap::new();
        for e in outbox.entries() {
            if let Some(order) = &e.message.event.order {
                by_order.entry(order.clone()).or_default().push(note(e));
            }
        }
        View {
            summary: Summary {
                pending,
                delivered,
                undeliverable,
                last_error: outbox.last_error(),
            },
            by_order,
        }
    }
}

fn note(e: &outbox::Entry) -> OrderNote {
    OrderNote {
        event: e.message.event.kind.as_str().to_string(),
        channel: e.message.channel.as_str().to_string(),
        to: e.message.to.clone(),
        delivery: e.delivery.clone(),
    }
}

/// How long to wait after the `attempts`-th failure: doubling from [`FIRST_RETRY`] to
/// [`MAX_RETRY`], with up to 25 % jitter so that many messages do not retry in step.
fn retry_delay(attempts: u32) -> Duration {
    let base = FIRST_RETRY
        .saturating_mul(1u32.checked_shl(attempts.min(20)).unwrap_or(u32::MAX))
        .min(MAX_RETRY);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

/// Removes rejected-message records whose events are in the outbox.
fn forget_rejected(rejected: &[(std::path::PathBuf, Rejected)]) {
    for (path, _) in rejected {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(file = %path.display(), "cannot remove a handled rejected-message record: {e}");
        }
    }
}

/// An invalid message from the order queue, kept in `state_dir/rejected/` until the next pass
/// has told the orderer (the queue consumer cannot look the orderer up itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Rejected {
    /// The message's stream sequence number: it names the message.
    pub seq: u64,
    pub subject: String,
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

const REJECTED_DIR: &str = "rejected";

impl Rejected {
    /// What can be read of an invalid message's payload.
    pub fn new(seq: u64, subject: &str, payload: &[u8], error: &str) -> Rejected {
        let value: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
        let hints = value.map(|v| hints_of(&v)).unwrap_or_default();
        Rejected {
            seq,
            subject: subject.to_string(),
            error: error.to_string(),
            id: hints.id,
            ordered_by: hints.ordered_by,
            ticket: hints.ticket,
            user: hints.user,
        }
    }

    /// Keeps the record (atomically) if it names an orderer or a ticket; else there is no one
    /// to tell.
    pub fn save(&self, state_dir: &Path) -> std::result::Result<(), crate::state::StateError> {
        if self.ordered_by.is_none() && self.ticket.is_none() {
            return Ok(());
        }
        let dir = state_dir.join(REJECTED_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| crate::state::StateError::Io {
            path: dir.clone(),
            source,
        })?;
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        crate::state::write_atomic(&dir.join(format!("{}.json", self.seq)), &bytes)
    }

    /// Every kept record, with its file.
    fn load_all(state_dir: &Path) -> Vec<(std::path::PathBuf, Rejected)> {
        let Ok(entries) = std::fs::read_dir(state_dir.join(REJECTED_DIR)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Rejected>(&b).ok())
            {
                Some(r) => out.push((path, r)),
                None => {
                    tracing::warn!(file = %path.display(), "unreadable rejected-message record, ignored")
                }
            }
        }
        out.sort_by_key(|(_, r)| r.seq);
        out
    }
}

fn hints_of(value: &serde_json::Value) -> InvalidHints {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
            .map(str::to_string)
    };
    InvalidHints {
        id: field("id"),
        ordered_by: field("ordered_by"),
        ticket: field("ticket"),
        user: field("user"),
    }
}

/// Reads what can be read of each invalid order file, to find whom to tell.
fn invalid_hints(
    desired_dir: &Path,
    scan: &Scan,
    wanted: impl Fn(&crate::order::InvalidFile) -> bool,
) -> HashMap<String, InvalidHints> {
    let mut out = HashMap::new();
    for bad in scan.invalid.iter().filter(|b| wanted(b)) {
        // A file whose last valid version is in effect: that version names the orderer.
        if let Some(o) = scan.orders.iter().find(|o| o.file == bad.file) {
            out.insert(
                bad.file.clone(),
                InvalidHints {
                    id: Some(o.order.id.clone()),
                    ordered_by: Some(o.order.ordered_by.clone()),
                    ticket: o.order.ticket.clone(),
                    user: Some(o.order.user.clone()),
                },
            );
            continue;
        }
        let path = desired_dir.join(&bad.file);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.len() > 64 * 1024 {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let value: Option<serde_json::Value> = if bad.file.ends_with(".json") {
            serde_json::from_str(&text).ok()
        } else {
            toml::from_str::<toml::Table>(&text)
                .ok()
                .and_then(|t| serde_json::to_value(t).ok())
        };
        let Some(value) = value else { continue };
        out.insert(bad.file.clone(), hints_of(&value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_is_capped() {
        assert!(retry_delay(0) >= FIRST_RETRY && retry_delay(0) < FIRST_RETRY * 2);
        assert!(retry_delay(1) >= FIRST_RETRY * 2);
        assert!(retry_delay(40) >= MAX_RETRY && retry_delay(40) <= MAX_RETRY.mul_f64(1.25));
    }
}
