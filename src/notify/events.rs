//! Which notifications a pass calls for. Pure: (orders, plan, what was applied, the ledger after
//! it, what was already sent) -> new events.
//!
//! Derivation is level-triggered like the reconcile itself: an event is due because of the state
//! the pass ended in, not because of the change that led there. So an event whose pass crashed
//! before it reached the outbox is found again by the next pass, and an event that did reach the
//! outbox is never found again ([`History`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::order::{LoadedOrder, Scan};
use crate::plan::{DecisionKind, Gate, Plan};
use crate::state::Ledger;

/// The kinds of notification (issue: "each sent once per order and event").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The order is accepted, but the user must pass a course first.
    CourseNeeded,
    Granted,
    /// The order file (or message) is invalid.
    Invalid,
    /// `valid_until` is within `expiry_warning`.
    Expiring,
    /// Access the orderer was told about has been removed.
    Revoked,
    /// The orderer may not order access (`allowed_orderers_group`).
    Unauthorized,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::CourseNeeded,
        EventKind::Granted,
        EventKind::Invalid,
        EventKind::Expiring,
        EventKind::Revoked,
        EventKind::Unauthorized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::CourseNeeded => "course-needed",
            EventKind::Granted => "granted",
            EventKind::Invalid => "invalid",
            EventKind::Expiring => "expiring",
            EventKind::Revoked => "revoked",
            EventKind::Unauthorized => "unauthorized",
        }
    }
}

/// Why access ended, for the `revoked` notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevokeCause {
    Withdrawn,
    Expired,
    NoLongerOrdered,
    AccountGone,
    Other,
}

/// An access profile as named in a notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRef {
    pub name: String,
    pub title: String,
}

/// A course the user still has to pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CourseRef {
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// One notification-worthy event, with everything needed to render it later (config changes
/// after the event do not change what is sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// Identifies the event across passes and restarts; the message ids derive from it.
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<AccessRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub courses: Vec<CourseRef>,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<DateTime<Utc>>,
    /// What is wrong (invalid, unauthorized) or why access ended (revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<RevokeCause>,
}

/// What earlier passes already put in the outbox, as far as derivation needs it.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Event keys already enqueued.
    pub keys: HashSet<String>,
    /// (order, access) the orderer was told is granted, and not since told is revoked.
    pub granted: BTreeMap<(String, String), GrantedNote>,
    /// (order, access) -> how many times it was revoked (keys of later grants differ).
    pub generation: HashMap<(String, String), u32>,
}

/// What is remembered of a `granted` notification, for the `revoked` one that may follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedNote {
    pub user: String,
    pub ordered_by: String,
    pub ticket: Option<String>,
    pub title: String,
}

impl History {
    /// Folds an enqueued event into the history (in enqueue order).
    pub fn record(&mut self, event: &Event) {
        self.keys.insert(event.key.clone());
        let Some(order) = &event.order else {
            return;
        };
        match event.kind {
            EventKind::Granted => {
                for a in &event.access {
                    self.granted.insert(
                        (order.clone(), a.name.clone()),
                        GrantedNote {
                            user: event.user.clone().unwrap_or_default(),
                            ordered_by: event.ordered_by.clone().unwrap_or_default(),
                            ticket: event.ticket.clone(),
                            title: a.title.clone(),
                        },
                    );
                }
            }
            EventKind::Revoked => {
                for a in &event.access {
                    let pair = (order.clone(), a.name.clone());
                    self.granted.remove(&pair);
                    *self.generation.entry(pair).or_default() += 1;
                }
            }
            _ => {}
        }
    }
}

/// Fields read leniently from an invalid order file, to find whom to tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvalidHints {
    pub id: Option<String>,
    pub ordered_by: Option<String>,
    pub ticket: Option<String>,
    pub user: Option<String>,
}

/// The key of the `invalid` event for a file: one per file and problem.
pub fn invalid_key(bad: &crate::order::InvalidFile) -> String {
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut hasher, bad.message.as_bytes());
    let digest = hex::encode(sha2::Digest::finalize(hasher));
    format!("invalid|{}|{}", bad.file, &digest[..16])
}

/// The `invalid` event for a message the order queue rejected.
pub fn rejected_event(r: &crate::notify::Rejected, now: DateTime<Utc>) -> Event {
    Event {
        kind: EventKind::Invalid,
        key: format!("invalid|queue|{}|{}", r.subject, r.seq),
        order: r.id.clone(),
        file: Some(format!("queue message #{} on {}", r.seq, r.subject)),
        user: r.user.clone(),
        ordered_by: r.ordered_by.clone(),
        ticket: r.ticket.clone(),
        access: Vec::new(),
        courses: Vec::new(),
        at: now,
        valid_until: None,
        reason: Some(r.error.clone()),
        cause: None,
    }
}

/// Everything derivation looks at.
pub struct DeriveInput<'a> {
    pub config: &'a Config,
    pub scan: &'a Scan,
    pub gates: &'a HashMap<String, Gate>,
    pub plan: &'a Plan,
    /// (user, access) pairs granted by this pass.
    pub granted_now: &'a HashSet<(String, String)>,
    /// The ownership ledger after this pass.
    pub ledger: &'a Ledger,
    pub history: &'a History,
    /// Invalid file name -> what could be read of it.
    pub invalid_hints: &'a HashMap<String, InvalidHints>,
    pub now: DateTime<Utc>,
}

fn access_ref(config: &Config, name: &str) -> AccessRef {
    AccessRef {
        name: name.to_string(),
        title: config
            .access
            .get(name)
            .map(|p| p.title.clone())
            .unwrap_or_else(|| name.to_string()),
    }
}

fn base_event(kind: EventKind, key: String, o: &LoadedOrder, now: DateTime<Utc>) -> Event {
    Event {
        kind,
        key,
        order: Some(o.order.id.clone()),
        file: Some(o.file.clone()),
        user: Some(o.order.user.clone()),
        ordered_by: Some(o.order.ordered_by.clone()),
        ticket: o.order.ticket.clone(),
        access: Vec::new(),
        courses: Vec::new(),
        at: now,
        valid_until: o.order.valid_until,
        reason: None,
        cause: None,
    }
}

/// The events this pass calls for that were not sent before.
pub fn derive(input: &DeriveInput<'_>) -> Vec<Event> {
    let config = input.config;
    let now = input.now;
    let history = input.history;
    let mut events = Vec::new();

    // (user, access) -> decision.
    let decisions: HashMap<(&str, &str), &crate::plan::Decision> = input
        .plan
        .decisions
        .iter()
        .map(|d| ((d.user.as_str(), d.access.as_str()), d))
        .collect();
    let owned: HashSet<(&str, &str)> = input
        .ledger
        .owned
        .values()
        .map(|o| (o.user.as_str(), o.access.as_str()))
        .collect();
    let orders: HashMap<&str, &LoadedOrder> = input
        .scan
        .orders
        .iter()
        .map(|o| (o.order.id.as_str(), o))
        .collect();

    for o in &input.scan.orders {
        let id = &o.order.id;
        if let Some(Gate::Refused { reason }) = input.gates.get(id) {
            let key = format!("{id}|unauthorized|{}", o.order.ordered_by.to_lowercase());
            if !history.keys.contains(&key) {
                let mut e = base_event(EventKind::Unauthorized, key, o, now);
                e.access = o
                    .order
                    .access
                    .iter()
                    .map(|a| access_ref(config, a))
                    .collect();
                e.reason = Some(reason.clone());
                events.push(e);
            }
            continue;
        }
        if input.gates.contains_key(id) || !crate::plan::in_window(o, now) {
            continue;
        }

        // Granted: the pair is decided `grant` and the user is a member now.
        let mut newly_granted = Vec::new();
        let mut waiting = Vec::new();
        for access in &o.order.access {
            let Some(d) = decisions.get(&(o.order.user.as_str(), access.as_str())) else {
                continue;
            };
            match d.decision {
                DecisionKind::Grant => {
                    let member = d.member == Some(true)
                        || input
                            .granted_now
                            .contains(&(o.order.user.clone(), access.clone()));
                    if member && !history.granted.contains_key(&(id.clone(), access.clone())) {
                        newly_granted.push(access.clone());
                    }
                }
                DecisionKind::Wait if !d.missing_courses.is_empty() => waiting.push(access),
                _ => {}
            }
        }
        if !newly_granted.is_empty() {
            let parts: Vec<String> = newly_granted
                .iter()
                .map(|a| {
                    let generation = history
                        .generation
                        .get(&(id.clone(), a.clone()))
                        .copied()
                        .unwrap_or(0);
                    format!("{a}#{generation}")
                })
                .collect();
            let mut e = base_event(
                EventKind::Granted,
                format!("{id}|granted|{}", parts.join("+")),
                o,
                now,
            );
            e.access = newly_granted
                .iter()
                .map(|a| access_ref(config, a))
                .collect();
            events.push(e);
        }

        let course_key = format!("{id}|course-needed");
        if !waiting.is_empty() && !history.keys.contains(&course_key) {
            let mut e = base_event(EventKind::CourseNeeded, course_key, o, now);
            e.access = waiting.iter().map(|a| access_ref(config, a)).collect();
            let mut seen = BTreeSet::new();
            for access in &waiting {
                let Some(profile) = config.access.get(*access) else {
                    continue;
                };
                let d = decisions[&(o.order.user.as_str(), access.as_str())];
                for key in &profile.courses {
                    let Some(course) = config.courses.get(key) else {
                        continue;
                    };
                    // `missing_courses` holds titles (possibly with a note on an old pass).
                    let missing = d.missing_courses.iter().any(|m| {
                        m == &course.title || m.starts_with(&format!("{} (", course.title))
                    });
                    if missing && seen.insert(key.clone()) {
                        e.courses.push(CourseRef {
                            title: course.title.clone(),
                            url: course.url.clone(),
                        });
                    }
                }
            }
            events.push(e);
        }

        if let (Some(until), Some(warning)) = (
            o.order.valid_until,
            config
                .notify
                .as_ref()
                .and_then(|n| chrono::Duration::from_std(n.expiry_warning).ok()),
        ) {
            let held: Vec<&String> = o
                .order
                .access
                .iter()
                .filter(|a| {
                    history.granted.contains_key(&(id.clone(), (*a).clone()))
                        || newly_granted.contains(a)
                })
                .collect();
            let key = format!("{id}|expiring|{}", until.to_rfc3339());
            if now + warning >= until
                && now <= until
                && !held.is_empty()
                && !history.keys.contains(&key)
            {
                let mut e = base_event(EventKind::Expiring, key, o, now);
                e.access = held.iter().map(|a| access_ref(config, a)).collect();
                events.push(e);
            }
        }
    }

    // Revoked: the orderer was told of a grant that no longer holds and that coursegate no
    // longer owns (removed, or the brake still holds it: then not yet).
    let mut revoked: BTreeMap<String, Vec<(&String, &GrantedNote, RevokeCause)>> = BTreeMap::new();
    for ((order_id, access), note) in &history.granted {
        let cause = match orders.get(order_id.as_str()) {
            None => RevokeCause::Withdrawn,
            Some(o) if o.order.valid_until.is_some_and(|u| now > u) => RevokeCause::Expired,
            Some(o) if !o.order.access.contains(access) || o.order.user != note.user => {
                RevokeCause::NoLongerOrdered
            }
            Some(o) if input.gates.contains_key(&o.order.id) => continue,
            Some(o) => match decisions.get(&(o.order.user.as_str(), access.as_str())) {
                Some(d) if d.reason.contains("matches no directory entry") => {
                    RevokeCause::AccountGone
                }
                Some(d) if d.decision == DecisionKind::Revoke => RevokeCause::Other,
                _ => continue,
            },
        };
        if owned.contains(&(note.user.as_str(), access.as_str())) {
            continue;
        }
        revoked
            .entry(order_id.clone())
            .or_default()
            .push((access, note, cause));
    }
    for (order_id, items) in revoked {
        let (_, first, cause) = items[0];
        let parts: Vec<String> = items
            .iter()
            .map(|(a, _, _)| {
                let generation = history
                    .generation
                    .get(&(order_id.clone(), (*a).clone()))
                    .copied()
                    .unwrap_or(0);
                format!("{a}#{generation}")
            })
            .collect();
        let order = orders.get(order_id.as_str());
        events.push(Event {
            kind: EventKind::Revoked,
            key: format!("{order_id}|revoked|{}", parts.join("+")),
            order: Some(order_id.clone()),
            file: order.map(|o| o.file.clone()),
            user: Some(first.user.clone()),
            ordered_by: Some(first.ordered_by.clone()),
            ticket: first.ticket.clone(),
            access: items
                .iter()
                .map(|(a, n, _)| AccessRef {
                    name: (*a).clone(),
                    title: n.title.clone(),
                })
                .collect(),
            courses: Vec::new(),
            at: now,
            valid_until: order.and_then(|o| o.order.valid_until),
            reason: None,
            cause: Some(cause),
        });
    }

    // Invalid files: tell whoever the file names as orderer, once per problem.
    for bad in &input.scan.invalid {
        let hints = input
            .invalid_hints
            .get(&bad.file)
            .cloned()
            .unwrap_or_default();
        let key = invalid_key(bad);
        if history.keys.contains(&key) || hints.ordered_by.is_none() {
            continue;
        }
        events.push(Event {
            kind: EventKind::Invalid,
            key,
            order: hints.id.clone(),
            file: Some(bad.file.clone()),
            user: hints.user.clone(),
            ordered_by: hints.ordered_by.clone(),
            ticket: hints.ticket.clone(),
            access: Vec::new(),
            courses: Vec::new(),
            at: now,
            valid_until: None,
            reason: Some(bad.message.clone()),
            cause: None,
        });
    }
    events
}
