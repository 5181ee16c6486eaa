//! THE decision (SPEC §3): from orders, directory facts, course facts, the ownership ledger and
//! the time, compute what coursegate should do. No I/O happens here.
//!
//! For every (user, access profile) named by an order the planner decides grant, wait, hold,
//! revoke or lapse, with the reason a support desk can read out. From those decisions it derives
//! the directory changes: a membership is added when a grant needs it, and removed only when
//! coursegate owns it (or the group is `exclusive`) and nothing still keeps it. Unknown facts
//! (LMS down, lookup failed, ambiguous user) keep everything as it is. Finally the revocation
//! brake may hold back every revocation of the run.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::audit::Evidence;
use crate::config::{Config, MemberAttribute};
use crate::directory::dn;
use crate::lms::{CourseFacts, CourseResult};
use crate::order::LoadedOrder;
use crate::state::{Ledger, member_key, membership_key};

/// What the directory said about one user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserLookup {
    Found {
        dn: String,
    },
    /// The filter matched no entry: the account is gone (or never existed).
    NotFound,
    /// The filter matched several entries: which one is meant is unknown.
    Ambiguous {
        count: usize,
    },
    /// The lookup itself failed.
    Failed {
        reason: String,
    },
}

/// Everything read from the directory for one run.
#[derive(Debug, Clone, Default)]
pub struct DirectoryFacts {
    /// Order user name (as written) -> lookup result.
    pub users: HashMap<String, UserLookup>,
    /// Configured group DN (as written in the config) -> member values, or why they are unknown.
    pub groups: HashMap<String, Result<Vec<String>, String>>,
}

/// The inputs of one decision.
pub struct PlanInput<'a> {
    pub config: &'a Config,
    pub orders: &'a [LoadedOrder],
    pub directory: &'a DirectoryFacts,
    pub courses: &'a CourseFacts,
    pub ledger: &'a Ledger,
    pub now: DateTime<Utc>,
    /// `apply --allow-revocations N`: up to N revocations pass whatever the brakes say.
    pub allow_revocations: Option<usize>,
}

/// The decision kinds of SPEC §3, plus the quiet states of an order that is not in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionKind {
    Grant,
    Wait,
    Hold,
    Revoke,
    Lapse,
    /// Every order for the pair has expired and coursegate holds nothing to revoke.
    Expired,
}

impl DecisionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Grant => "grant",
            DecisionKind::Wait => "wait",
            DecisionKind::Hold => "hold",
            DecisionKind::Revoke => "revoke",
            DecisionKind::Lapse => "lapse",
            DecisionKind::Expired => "expired",
        }
    }
}

/// One (user, profile) decision with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub user: String,
    pub access: String,
    pub decision: DecisionKind,
    /// A sentence for people: which course is missing, which fact is unknown.
    pub reason: String,
    /// Orders that name this pair (empty for a revocation of an order that is gone).
    pub orders: Vec<String>,
    /// Courses still missing (wait / lapse).
    pub missing_courses: Vec<String>,
    /// Whether the user is a member of the profile's group now (None if unknown).
    pub member: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Grant,
    Revoke,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Grant => "grant",
            Action::Revoke => "revoke",
        }
    }
}

/// One directory change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub action: Action,
    pub user: String,
    pub user_dn: Option<String>,
    /// The value added to or removed from the member attribute.
    pub member: String,
    pub access: String,
    pub group: String,
    pub order: Option<String>,
    pub ticket: Option<String>,
    pub evidence: Vec<Evidence>,
    pub reason: String,
    /// Whether coursegate owned the membership (false only for `exclusive` clean-up).
    pub owned: bool,
}

impl Change {
    pub fn key(&self, attribute: MemberAttribute) -> String {
        membership_key(&self.group, &self.member, attribute)
    }
}

/// Why the revocation brake holds the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Brake {
    pub revocations: usize,
    pub reasons: Vec<String>,
}

/// The outcome of planning.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub decisions: Vec<Decision>,
    /// Changes to carry out, grants first.
    pub changes: Vec<Change>,
    /// Set when the brake holds: the revocations it held back are in `held_revocations`.
    pub brake: Option<Brake>,
    pub held_revocations: Vec<Change>,
    /// Ledger bookkeeping: membership key -> new `lapse_since` (None clears it).
    pub lapse_marks: BTreeMap<String, Option<DateTime<Utc>>>,
    /// Owned memberships that are no longer in the directory although nobody revoked them:
    /// removed outside coursegate. The ledger forgets them; no directory change.
    pub forget: Vec<String>,
    /// Notes for the operator (owned memberships in groups no longer configured, etc.).
    pub notes: Vec<String>,
}

impl Plan {
    /// Whether any decision is on hold (an unknown fact).
    pub fn has_holds(&self) -> bool {
        self.decisions
            .iter()
            .any(|d| d.decision == DecisionKind::Hold)
    }
}

struct CourseCheck {
    evidence: Vec<Evidence>,
    missing: Vec<String>,
    unknown: Vec<String>,
}

fn check_courses(
    config: &Config,
    profile: &str,
    user: &str,
    facts: &CourseFacts,
    now: DateTime<Utc>,
) -> CourseCheck {
    let mut check = CourseCheck {
        evidence: Vec::new(),
        missing: Vec::new(),
        unknown: Vec::new(),
    };
    let Some(p) = config.access.get(profile) else {
        return check;
    };
    for key in &p.courses {
        let Some(course) = config.courses.get(key) else {
            check
                .unknown
                .push(format!("course `{key}` is not configured"));
            continue;
        };
        match facts.result(user, &course.lms_id) {
            CourseResult::Passed { at, source } => {
                let expired = course
                    .valid_for
                    .is_some_and(|v| chrono::Duration::from_std(v).is_ok_and(|v| at + v < now));
                if expired {
                    check.missing.push(format!(
                        "{} (passed {} but a pass is valid for {})",
                        course.title,
                        at.format("%Y-%m-%d"),
                        humantime::format_duration(course.valid_for.unwrap_or_default())
                    ));
                } else {
                    check.evidence.push(Evidence {
                        course: key.clone(),
                        passed_at: format_passed_at(at),
                        source,
                    });
                }
            }
            CourseResult::NotPassed => check.missing.push(course.title.clone()),
            CourseResult::Unknown { reason } => {
                check.unknown.push(format!("{}: {reason}", course.title))
            }
        }
    }
    check
}

fn format_passed_at(at: DateTime<Utc>) -> String {
    if at.time() == chrono::NaiveTime::MIN {
        at.format("%Y-%m-%d").to_string()
    } else {
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }
}

fn in_window(o: &LoadedOrder, now: DateTime<Utc>) -> bool {
    o.order.valid_from.is_none_or(|f| f <= now) && o.order.valid_until.is_none_or(|u| now <= u)
}

/// Computes the plan. Pure: same input, same plan.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let config = input.config;
    let attr = config.ldap.member_attribute;
    let now = input.now;
    let mut out = Plan::default();

    // Configured groups (normalized) -> profiles using them.
    let mut group_profiles: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (name, p) in &config.access {
        group_profiles
            .entry(dn::normalize(&p.group))
            .or_default()
            .push(name);
    }
    let group_members: HashMap<String, Result<BTreeSet<String>, String>> = config
        .access
        .values()
        .map(|p| {
            let members = match input.directory.groups.get(&p.group) {
                Some(Ok(values)) => Ok(values.iter().map(|v| member_key(v, attr)).collect()),
                Some(Err(e)) => Err(e.clone()),
                None => Err("group members were not read".to_string()),
            };
            (dn::normalize(&p.group), members)
        })
        .collect();

    // (user, profile) -> the orders naming it.
    let mut pairs: BTreeMap<(String, String), Vec<&LoadedOrder>> = BTreeMap::new();
    for o in input.orders {
        for access in &o.order.access {
            if config.access.contains_key(access) {
                pairs
                    .entry((o.order.user.clone(), access.clone()))
                    .or_default()
                    .push(o);
            }
        }
    }

    // Membership keys something still keeps, and (user, group) pairs on hold whose member value
    // is unknown: nothing of theirs may be revoked.
    let mut kept: BTreeSet<String> = BTreeSet::new();
    let mut held_users: BTreeSet<(String, String)> = BTreeSet::new();
    let mut grants: BTreeMap<String, Change> = BTreeMap::new();
    let mut lapse_revokes: BTreeMap<String, (String, String)> = BTreeMap::new();
    // (user, normalized group) -> why the pair no longer wants the membership.
    let mut lost_reason: BTreeMap<(String, String), String> = BTreeMap::new();

    for ((user, access), orders) in &pairs {
        let profile = &config.access[access];
        let group_norm = dn::normalize(&profile.group);
        let mut order_ids: Vec<String> = orders.iter().map(|o| o.order.id.clone()).collect();
        order_ids.sort();
        order_ids.dedup();
        let mut decision = Decision {
            user: user.clone(),
            access: access.clone(),
            decision: DecisionKind::Wait,
            reason: String::new(),
            orders: order_ids,
            missing_courses: Vec::new(),
            member: None,
        };
        let lookup = input.directory.users.get(user);
        let member_value = match lookup {
            Some(UserLookup::Found { dn }) => Some(if attr.holds_dns() {
                dn.clone()
            } else {
                user.clone()
            }),
            _ => None,
        };
        let key = member_value
            .as_ref()
            .map(|m| membership_key(&profile.group, m, attr));
        let owned = key.as_ref().and_then(|k| input.ledger.owned.get(k));
        let members = &group_members[&group_norm];
        decision.member = match (&member_value, members) {
            (Some(m), Ok(set)) => Some(set.contains(&member_key(m, attr))),
            _ => None,
        };

        let mut active: Vec<&&LoadedOrder> = orders.iter().filter(|o| in_window(o, now)).collect();
        active.sort_by(|a, b| a.order.id.cmp(&b.order.id));
        if active.is_empty() {
            let future = orders
                .iter()
                .filter_map(|o| o.order.valid_from.filter(|f| *f > now))
                .min();
            let reason = match future {
                Some(from) => format!(
                    "the order is valid from {}",
                    from.format("%Y-%m-%d %H:%M UTC")
                ),
                None => "the order has expired".to_string(),
            };
            lost_reason.insert((user.clone(), group_norm.clone()), reason.clone());
            decision.reason = reason;
            decision.decision = if future.is_some() {
                DecisionKind::Wait
            } else {
                DecisionKind::Expired
            };
            out.decisions.push(decision);
            continue;
        }
        let first = active[0];

        match lookup {
            None | Some(UserLookup::Failed { .. }) => {
                let why = match lookup {
                    Some(UserLookup::Failed { reason }) => reason.clone(),
                    _ => "the user was not looked up".to_string(),
                };
                decision.decision = DecisionKind::Hold;
                decision.reason = format!("directory lookup of the user failed: {why}");
                held_users.insert((user.to_lowercase(), group_norm.clone()));
                out.decisions.push(decision);
                continue;
            }
            Some(UserLookup::Ambiguous { count }) => {
                decision.decision = DecisionKind::Hold;
                decision.reason = format!(
                    "the user filter matches {count} directory entries; it must match exactly one"
                );
                held_users.insert((user.to_lowercase(), group_norm.clone()));
                out.decisions.push(decision);
                continue;
            }
            Some(UserLookup::NotFound) => {
                let reason = "the user filter matches no directory entry".to_string();
                lost_reason.insert((user.clone(), group_norm.clone()), reason.clone());
                decision.decision = DecisionKind::Wait;
                decision.reason = reason;
                out.decisions.push(decision);
                continue;
            }
            Some(UserLookup::Found { .. }) => {}
        }
        let (Some(member_value), Some(key)) = (member_value, key) else {
            continue;
        };

        if let Err(e) = members {
            decision.decision = DecisionKind::Hold;
            decision.reason = format!("members of {} could not be read: {e}", profile.group);
            kept.insert(key);
            out.decisions.push(decision);
            continue;
        }
        let is_member = decision.member == Some(true);

        let check = check_courses(config, access, user, input.courses, now);
        if !check.unknown.is_empty() {
            decision.decision = DecisionKind::Hold;
            decision.reason = format!("course result unknown: {}", check.unknown.join("; "));
            kept.insert(key);
            out.decisions.push(decision);
            continue;
        }
        if check.missing.is_empty() {
            decision.decision = DecisionKind::Grant;
            kept.insert(key.clone());
            if let Some(o) = owned
                && o.lapse_since.is_some()
            {
                out.lapse_marks.insert(key.clone(), None);
            }
            if is_member {
                decision.reason = if owned.is_some() {
                    "all courses passed; access granted".to_string()
                } else {
                    "all courses passed; already a member (added outside coursegate)".to_string()
                };
            } else {
                decision.reason = "all courses passed; will be added to the group".to_string();
                grants.entry(key).or_insert_with(|| Change {
                    action: Action::Grant,
                    user: user.clone(),
                    user_dn: match lookup {
                        Some(UserLookup::Found { dn }) => Some(dn.clone()),
                        _ => None,
                    },
                    member: member_value,
                    access: access.clone(),
                    group: profile.group.clone(),
                    order: Some(first.order.id.clone()),
                    ticket: first.order.ticket.clone(),
                    evidence: check.evidence,
                    reason: "all required courses passed".to_string(),
                    owned: true,
                });
            }
            out.decisions.push(decision);
            continue;
        }

        decision.missing_courses = check.missing.clone();
        let missing = check.missing.join(", ");
        match owned {
            Some(o) => {
                decision.decision = DecisionKind::Lapse;
                let since = o.lapse_since.unwrap_or(now);
                if o.lapse_since.is_none() {
                    out.lapse_marks.insert(key.clone(), Some(now));
                }
                let grace = chrono::Duration::from_std(profile.lapse_grace)
                    .unwrap_or(chrono::Duration::MAX);
                if profile.revoke_on_lapse && since + grace <= now {
                    decision.decision = DecisionKind::Revoke;
                    decision.reason = format!(
                        "course requirement lapsed ({missing}) since {} and the grace of {} has passed",
                        since.format("%Y-%m-%d"),
                        humantime::format_duration(profile.lapse_grace)
                    );
                    lapse_revokes.insert(key, (decision.reason.clone(), first.order.id.clone()));
                } else {
                    decision.reason = if profile.revoke_on_lapse {
                        format!(
                            "course requirement lapsed ({missing}); kept until {}",
                            (since + grace).format("%Y-%m-%d")
                        )
                    } else {
                        format!(
                            "course requirement lapsed ({missing}); kept (revoke_on_lapse is off)"
                        )
                    };
                    kept.insert(key);
                }
            }
            None => {
                decision.decision = DecisionKind::Wait;
                decision.reason = format!("waiting for course: {missing}");
            }
        }
        out.decisions.push(decision);
    }

    // Revocations of owned memberships that nothing keeps any more.
    let mut revokes: Vec<Change> = Vec::new();
    for (key, o) in &input.ledger.owned {
        let group_norm = dn::normalize(&o.group);
        if !group_profiles.contains_key(&group_norm) {
            out.notes.push(format!(
                "{} in {} was granted by coursegate, but the group is no longer configured: left alone",
                o.member, o.group
            ));
            continue;
        }
        if kept.contains(key) || held_users.contains(&(o.user.to_lowercase(), group_norm.clone())) {
            continue;
        }
        let members = match &group_members[&group_norm] {
            Ok(m) => m,
            Err(e) => {
                out.notes.push(format!(
                    "revocation of {} from {} on hold: members could not be read: {e}",
                    o.member, o.group
                ));
                continue;
            }
        };
        if !members.contains(&member_key(&o.member, attr)) {
            out.forget.push(key.clone());
            out.notes.push(format!(
                "{} was already removed from {} outside coursegate; forgetting it",
                o.member, o.group
            ));
            continue;
        }
        let (reason, order) = match lapse_revokes.get(key) {
            Some((r, id)) => (r.clone(), Some(id.clone())),
            None => (
                lost_reason
                    .get(&(o.user.clone(), group_norm.clone()))
                    .cloned()
                    .unwrap_or_else(|| {
                        format!("no order names `{}` for this user any more", o.access)
                    }),
                o.order.clone(),
            ),
        };
        if !lapse_revokes.contains_key(key) {
            out.decisions.push(Decision {
                user: o.user.clone(),
                access: o.access.clone(),
                decision: DecisionKind::Revoke,
                reason: reason.clone(),
                orders: Vec::new(),
                missing_courses: Vec::new(),
                member: Some(true),
            });
        }
        revokes.push(Change {
            action: Action::Revoke,
            user: o.user.clone(),
            user_dn: o.user_dn.clone(),
            member: o.member.clone(),
            access: o.access.clone(),
            group: o.group.clone(),
            order,
            ticket: o.ticket.clone(),
            evidence: Vec::new(),
            reason,
            owned: true,
        });
    }

    // Exclusive groups: coursegate is the only authority; remove every member it does not keep.
    for (name, p) in &config.access {
        if !p.exclusive {
            continue;
        }
        let group_norm = dn::normalize(&p.group);
        if held_users.iter().any(|(_, g)| *g == group_norm) {
            out.notes.push(format!(
                "exclusive clean-up of {} on hold: a user's directory entry is unknown",
                p.group
            ));
            continue;
        }
        let Some(Ok(values)) = input.directory.groups.get(&p.group) else {
            continue;
        };
        let placeholder = config
            .ldap
            .placeholder_member
            .as_deref()
            .map(|ph| member_key(ph, attr));
        for value in values {
            let key = membership_key(&p.group, value, attr);
            if kept.contains(&key)
                || input.ledger.owned.contains_key(&key)
                || placeholder.as_deref() == Some(member_key(value, attr).as_str())
                || revokes.iter().any(|r| r.key(attr) == key)
            {
                continue;
            }
            // A member coursegate never granted has no known account name: show the value.
            let user = value.clone();
            out.decisions.push(Decision {
                user: user.clone(),
                access: name.clone(),
                decision: DecisionKind::Revoke,
                reason: "not granted by coursegate, and the group is exclusive".to_string(),
                orders: Vec::new(),
                missing_courses: Vec::new(),
                member: Some(true),
            });
            revokes.push(Change {
                action: Action::Revoke,
                user,
                user_dn: attr.holds_dns().then(|| value.clone()),
                member: value.clone(),
                access: name.clone(),
                group: p.group.clone(),
                order: None,
                ticket: None,
                evidence: Vec::new(),
                reason: "not granted by coursegate, and the group is exclusive".to_string(),
                owned: false,
            });
        }
    }

    out.brake = brake(input, &revokes);
    out.changes = grants.into_values().collect();
    if out.brake.is_some() {
        out.held_revocations = revokes;
    } else {
        out.changes.extend(revokes);
    }
    out.decisions
        .sort_by(|a, b| (&a.user, &a.access).cmp(&(&b.user, &b.access)));
    out
}

/// SPEC §3 revocation brake: `None` when the revocations may go ahead.
fn brake(input: &PlanInput<'_>, revokes: &[Change]) -> Option<Brake> {
    if revokes.is_empty() {
        return None;
    }
    let daemon = &input.config.daemon;
    let total = revokes.len();
    if let Some(allowed) = input.allow_revocations
        && total <= allowed
    {
        return None;
    }
    let mut reasons = Vec::new();
    if total > daemon.max_revocations_per_run {
        reasons.push(format!(
            "{total} revocations exceed max_revocations_per_run = {}",
            daemon.max_revocations_per_run
        ));
    }
    if let Some(ratio) = daemon.max_revocation_ratio {
        let mut per_group: BTreeMap<String, (usize, &str)> = BTreeMap::new();
        for r in revokes {
            per_group
                .entry(dn::normalize(&r.group))
                .or_insert((0, &r.group))
                .0 += 1;
        }
        for (count, group) in per_group.values() {
            let owned = input.ledger.owned_in_group(group);
            if owned > 5 && (*count as f64) > ratio * owned as f64 {
                reasons.push(format!(
                    "{count} of the {owned} memberships coursegate owns in {group} exceed max_revocation_ratio = {ratio}"
                ));
            }
        }
    }
    if reasons.is_empty() {
        return None;
    }
    if let Some(allowed) = input.allow_revocations {
        reasons.push(format!(
            "--allow-revocations {allowed} is less than the {total} revocations needed"
        ));
    }
    Some(Brake {
        revocations: total,
        reasons,
    })
}
