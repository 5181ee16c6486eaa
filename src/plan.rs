//! THE decision (SPEC §3): from orders, directory facts, course facts, the ownership ledger and
//! the time, compute what coursegate should do. No I/O happens here.
//!
//! For every (user, access profile) named by an order the planner decides grant, wait, hold,
//! revoke or lapse, with the reason a support desk can read out. From those decisions it derives
//! the directory changes: a membership is added when a grant needs it, and removed only when
//! coursegate owns it (or the group is `exclusive`) and nothing still keeps it. Unknown facts
//! (LMS down, lookup failed, ambiguous user) keep everything as it is. Finally the revocation
//! brake may hold back every revocation of the run.

use std::borrow::Cow;
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
    /// Exactly one entry. `account` is the name as the directory spells it (the value of the
    /// attribute the filter compares), used for `memberUid`; `None` if not known. `mail` is the
    /// entry's `mail` attribute, if it has one (notifications, xAPI agents).
    Found {
        dn: String,
        account: Option<String>,
        mail: Option<String>,
    },
    /// The filter matched no entry: the account is gone (or never existed).
    NotFound,
    /// The filter matched several entries: which one is meant is unknown.
    Ambiguous { count: usize },
    /// The lookup itself failed.
    Failed { reason: String },
}

impl UserLookup {
    /// The value that makes the user a member of a group: the entry's DN, or for `memberUid`
    /// the account name (the order's name if the directory did not say). `None` unless found.
    pub fn member_value(&self, user: &str, attribute: MemberAttribute) -> Option<String> {
        match self {
            UserLookup::Found { dn, account, .. } => Some(if attribute.holds_dns() {
                dn.clone()
            } else {
                account.clone().unwrap_or_else(|| user.to_string())
            }),
            _ => None,
        }
    }
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
    /// Orders that may not take effect (yet): order id -> why. Orders not named here are
    /// accepted. Filled from the `allowed_orderers_group` check ([`crate::orderers`]).
    pub gates: &'a HashMap<String, Gate>,
}

/// Why an otherwise valid order is not in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The orderer may not order access: the order is not in effect.
    Refused { reason: String },
    /// Whether the orderer may order is unknown (directory failure): hold.
    Unknown { reason: String },
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
    /// Every order for the pair comes from someone who may not order access
    /// (`allowed_orderers_group`): not in effect.
    Unauthorized,
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
            DecisionKind::Unauthorized => "unauthorized",
        }
    }
}

/// One (user, profile) decision with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub user: String,
    pub access: String,
    pub decision: DecisionKind,
    /// A sentence for people: which course is missing, which fact is unknown. The common ones
    /// are static: a region's 60,000 decisions would otherwise carry 60,000 copies.
    pub reason: Cow<'static, str>,
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
    /// The membership's key ([`membership_key`]), made once by the plan: the ledger entry a
    /// grant makes, or the one a revocation removes.
    #[serde(skip)]
    pub key: String,
}

impl Change {
    /// The membership's key in the ledger.
    pub fn key(&self) -> &str {
        &self.key
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
    with_evidence: bool,
) -> CourseCheck {
    let mut check = CourseCheck {
        evidence: Vec::new(),
        missing: Vec::new(),
        unknown: Vec::new(),
    };
    let Some(p) = config.access.get(profile) else {
        return check;
    };
    if with_evidence {
        check.evidence.reserve_exact(p.courses.len());
    }
    for key in &p.courses {
        let Some(course) = config.courses.get(key) else {
            check
                .unknown
                .push(format!("course `{key}` is not configured"));
            continue;
        };
        match facts.result(user, &course.lms_id) {
            CourseResult::Passed {
                at,
                source,
                reference,
            } => {
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
                } else if with_evidence {
                    check.evidence.push(Evidence {
                        course: key.clone(),
                        passed_at: format_passed_at(at),
                        source,
                        platform_ref: reference,
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
    use chrono::Datelike as _;
    if at.time() == chrono::NaiveTime::MIN {
        // What `%Y-%m-%d` writes, without parsing the format for each of 60,000 grants.
        match at.year() {
            year @ 0..=9999 => format!("{year:04}-{:02}-{:02}", at.month(), at.day()),
            _ => at.format("%Y-%m-%d").to_string(),
        }
    } else {
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }
}

/// Whether the order is in force at `now` (`valid_from ≤ now ≤ valid_until`).
pub fn in_window(o: &LoadedOrder, now: DateTime<Utc>) -> bool {
    o.order.valid_from.is_none_or(|f| f <= now) && o.order.valid_until.is_none_or(|u| now <= u)
}

/// Computes the plan. Pure: same input, same plan.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    plan_split_from(input, PARALLEL_PAIRS)
}

/// [`plan`], deciding the pairs on two threads from `parallel_from` pairs.
fn plan_split_from(input: &PlanInput<'_>, parallel_from: usize) -> Plan {
    let group_members = members_of(input, |_| true);
    let norms = group_norms(input.config);
    let pairs = pairs_of(input, |_| true);
    let found = decide_split(input, &group_members, &norms, pairs, parallel_from, 0);
    finish(input, &group_members, found)
}

/// The decisions of the pairs whose profile's group is the configured group with the normalized
/// DN that sorts first: the plan's changes begin with the grants to that group, in key order
/// (every key begins with its group's normalized DN). Made before the rest of the plan
/// ([`plan_after_first`]), so that those grants can be carried out while the rest is decided.
pub struct FirstGroup<'a> {
    /// The group's normalized DN.
    group: String,
    /// Its members ([`members_of`]).
    members: GroupMembers<'a>,
    decided: Pairs<'a>,
}

/// Members of configured groups by normalized DN, as member keys, or why they are unknown.
type GroupMembers<'a> = HashMap<String, Result<BTreeSet<Cow<'a, str>>, String>>;

impl FirstGroup<'_> {
    /// The grants to the group, in key order: the changes the plan begins with.
    pub fn take_grants(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.decided.grants)
    }
}

/// Decides the pairs of [`FirstGroup`]'s group, by the same rules as [`plan`]. `None` without
/// configured groups, or if a group's normalized DN holds the separator of keys (its keys could
/// then sort among another group's).
pub fn decide_first_group<'a>(input: &PlanInput<'a>) -> Option<FirstGroup<'a>> {
    let norms = group_norms(input.config);
    if norms.values().any(|g| g.contains(KEY_SEPARATOR)) {
        return None;
    }
    let group = norms.values().min()?.clone();
    let members = members_of(input, |g| g == group);
    let pairs = pairs_of(input, |access| norms[access] == group);
    let mut decided = decide_split(input, &members, &norms, pairs, PARALLEL_PAIRS, 0);
    decided.grants = in_key_order(std::mem::take(&mut decided.grants));
    Some(FirstGroup {
        group,
        members,
        decided,
    })
}

/// The plan, given the first group's decisions, without the grants taken from them
/// ([`FirstGroup::take_grants`]): put first, they make it the plan [`plan`] makes (a property
/// test holds them equal). Decided on two threads from [`PARALLEL_PAIRS`] pairs, like [`plan`]:
/// made while the directory works on the first group's grants, the plan on one thread held
/// back the other groups' modifies more than a second thread slowed the directory (2 cores).
pub fn plan_after_first<'a>(input: &PlanInput<'a>, first: FirstGroup<'a>) -> Plan {
    let mut group_members = members_of(input, |g| g != first.group);
    group_members.extend(first.members);
    let norms = group_norms(input.config);
    let pairs = pairs_of(input, |access| norms[access] != first.group);
    // Room for the first group's decisions too, so that the merge does not grow the list.
    let first_decisions = first.decided.decisions.len();
    let mut found = decide_split(
        input,
        &group_members,
        &norms,
        pairs,
        PARALLEL_PAIRS,
        first_decisions,
    );
    found.merge(first.decided);
    finish(input, &group_members, found)
}

/// The rest of [`plan`] once the pairs are decided: revocations, exclusive groups, the brake,
/// and the changes in order.
fn finish<'a>(input: &PlanInput<'a>, group_members: &GroupMembers<'_>, found: Pairs<'a>) -> Plan {
    let config = input.config;
    let attr = config.ldap.member_attribute;
    let mut out = Plan::default();

    // Configured groups (normalized) -> profiles using them.
    let mut group_profiles: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (name, p) in &config.access {
        group_profiles
            .entry(dn::normalize(&p.group))
            .or_default()
            .push(name);
    }
    let Pairs {
        decisions,
        mut kept,
        held_users,
        grants,
        lapse_revokes,
        lost_reason,
        lapse_marks,
    } = found;
    out.decisions = decisions;
    out.lapse_marks = lapse_marks;

    kept.sort_unstable();
    kept.dedup();
    let kept = |key: &str| kept.binary_search_by(|k| k.as_ref().cmp(key)).is_ok();

    // Revocations of owned memberships that nothing keeps any more.
    let mut revokes: Vec<Change> = Vec::new();
    let mut owned_group_norm: HashMap<&str, String> = HashMap::new();
    for (key, o) in &input.ledger.owned {
        let group_norm: &str = owned_group_norm
            .entry(o.group.as_str())
            .or_insert_with(|| dn::normalize(&o.group));
        if !group_profiles.contains_key(group_norm) {
            out.notes.push(format!(
                "{} in {} was granted by coursegate, but the group is no longer configured: left alone",
                o.member, o.group
            ));
            continue;
        }
        if kept(key.as_str())
            || held_users.contains(&(o.user.to_lowercase(), group_norm.to_string()))
        {
            continue;
        }
        let members = match &group_members[group_norm] {
            Ok(m) => m,
            Err(e) => {
                out.notes.push(format!(
                    "revocation of {} from {} on hold: members could not be read: {e}",
                    o.member, o.group
                ));
                continue;
            }
        };
        if !members.contains(member_key(&o.member, attr).as_str()) {
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
                    .get(&(o.user.clone(), group_norm.to_string()))
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
                reason: reason.clone().into(),
                orders: Vec::new(),
                missing_courses: Vec::new(),
                member: Some(true),
            });
        }
        revokes.push(Change {
            key: key.clone(),
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
            if kept(key.as_str())
                || input.ledger.owned.contains_key(&key)
                || placeholder.as_deref() == Some(member_key(value, attr).as_str())
                || revokes.iter().any(|r| r.key() == key)
            {
                continue;
            }
            // A member coursegate never granted has no known account name: show the value.
            let user = value.clone();
            out.decisions.push(Decision {
                user: user.clone(),
                access: name.clone(),
                decision: DecisionKind::Revoke,
                reason: Cow::Borrowed("not granted by coursegate, and the group is exclusive"),
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
                key,
            });
        }
    }

    out.brake = brake(input, &revokes);
    out.changes = in_key_order(grants);
    if out.brake.is_some() {
        out.held_revocations = revokes;
    } else {
        out.changes.extend(revokes);
    }
    // The pairs' decisions come in order; only revocations appended after them need a sort,
    // whose scratch space would be as large as the decisions themselves.
    let by_pair = |a: &Decision, b: &Decision| (&a.user, &a.access).cmp(&(&b.user, &b.access));
    if !out.decisions.is_sorted_by(|a, b| by_pair(a, b).is_le()) {
        out.decisions.sort_by(by_pair);
    }
    out
}

/// What separates a key's normalized group DN from its member ([`membership_key`]).
const KEY_SEPARATOR: char = '\u{1f}';

/// Normalized group DN of each profile: computed once, not once per pair (DN normalization
/// dominated large plans).
fn group_norms(config: &Config) -> HashMap<&str, String> {
    config
        .access
        .iter()
        .map(|(name, p)| (name.as_str(), dn::normalize(&p.group)))
        .collect()
}

/// The members of the configured groups whose normalized DN `wanted` accepts, by normalized
/// DN, as member keys, or why they are unknown. Values mostly in normal form already are
/// borrowed, not copied.
fn members_of<'a>(input: &PlanInput<'a>, wanted: impl Fn(&str) -> bool) -> GroupMembers<'a> {
    let attr = input.config.ldap.member_attribute;
    input
        .config
        .access
        .values()
        .map(|p| (dn::normalize(&p.group), p))
        .filter(|(norm, _)| wanted(norm))
        .map(|(norm, p)| {
            let members = match input.directory.groups.get(&p.group) {
                Some(Ok(values)) => Ok(values
                    .iter()
                    .map(|v| match member_key(v, attr) {
                        k if k == *v => Cow::Borrowed(v.as_str()),
                        k => Cow::Owned(k),
                    })
                    .collect()),
                Some(Err(e)) => Err(e.clone()),
                None => Err("group members were not read".to_string()),
            };
            (norm, members)
        })
        .collect()
}

/// (user, profile) -> the orders naming it, for the configured profiles `wanted` accepts.
fn pairs_of<'a>(
    input: &PlanInput<'a>,
    wanted: impl Fn(&str) -> bool,
) -> BTreeMap<(&'a str, &'a str), Vec<&'a LoadedOrder>> {
    let mut pairs: BTreeMap<(&str, &str), Vec<&LoadedOrder>> = BTreeMap::new();
    for o in input.orders {
        for access in &o.order.access {
            if input.config.access.contains_key(access) && wanted(access) {
                pairs
                    .entry((o.order.user.as_str(), access.as_str()))
                    .or_default()
                    .push(o);
            }
        }
    }
    pairs
}

/// [`decide_pairs`] over `pairs`, on two threads from `parallel_from` pairs: split between two
/// users, each half decided as the one loop would decide it, the halves joined in order (a
/// property test holds the plans equal). The decisions have room for `more` besides.
fn decide_split<'a>(
    input: &PlanInput<'a>,
    group_members: &GroupMembers<'_>,
    profile_group_norm: &HashMap<&str, String>,
    mut pairs: BTreeMap<(&'a str, &'a str), Vec<&'a LoadedOrder>>,
    parallel_from: usize,
    more: usize,
) -> Pairs<'a> {
    let total = pairs.len() + more;
    let decide =
        |pairs, capacity| decide_pairs(input, group_members, profile_group_norm, pairs, capacity);
    let later = match pairs.keys().nth(pairs.len() / 2) {
        Some(&(user, _)) if pairs.len() >= parallel_from => pairs.split_off(&(user, "")),
        _ => BTreeMap::new(),
    };
    if later.is_empty() {
        return decide(pairs, total);
    }
    // Taken by the thread, or by this one if no thread can be had.
    let later = std::sync::Mutex::new(Some(later));
    let take = || later.lock().unwrap_or_else(|e| e.into_inner()).take();
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new()
            .name("plan".into())
            .spawn_scoped(s, || take().map(|later| decide(later, 0)));
        let mut found = decide(pairs, total);
        let rest = match spawned {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            Err(_) => None,
        };
        found.extend(
            rest.or_else(|| take().map(|later| decide(later, 0)))
                .expect("the later pairs are decided by one thread or the other"),
        );
        found
    })
}

/// What the pair loop of [`plan`] found over a run of (user, profile) pairs.
struct Pairs<'a> {
    /// One per pair, in the pairs' order.
    decisions: Vec<Decision>,
    /// Membership keys something still keeps. `kept` borrows the ledger's copy of a key where
    /// coursegate owns the membership (most pairs of a large region). A list, sorted once the
    /// pairs are done: a set would cost half as much again in nodes.
    kept: Vec<Cow<'a, str>>,
    /// (user, group) pairs on hold whose member value is unknown: nothing of theirs may be
    /// revoked.
    held_users: BTreeSet<(String, String)>,
    /// Grants, put in the order of their keys once all are made.
    grants: Vec<Change>,
    lapse_revokes: BTreeMap<String, (String, String)>,
    /// (user, normalized group) -> why the pair no longer wants the membership.
    lost_reason: BTreeMap<(String, String), String>,
    lapse_marks: BTreeMap<String, Option<DateTime<Utc>>>,
}

impl<'a> Pairs<'a> {
    /// Adds what was found over other pairs, of other groups: the decisions are put in the
    /// pairs' order again, and no map key can be in both.
    fn merge(&mut self, other: Pairs<'a>) {
        self.extend(other);
        // In place: every pair is decided once, so no two decisions share a key.
        self.decisions
            .sort_unstable_by(|a, b| (&a.user, &a.access).cmp(&(&b.user, &b.access)));
    }

    /// Appends what was found over pairs that all come after this run's: the lists continue
    /// in order, and a map entry both found is the later one, as one loop over all the pairs
    /// would have left it.
    fn extend(&mut self, later: Pairs<'a>) {
        self.decisions.extend(later.decisions);
        self.kept.extend(later.kept);
        self.held_users.extend(later.held_users);
        self.grants.extend(later.grants);
        self.lapse_revokes.extend(later.lapse_revokes);
        self.lost_reason.extend(later.lost_reason);
        self.lapse_marks.extend(later.lapse_marks);
    }
}

/// From this many (user, profile) pairs, [`plan`] decides them on two threads.
const PARALLEL_PAIRS: usize = 4096;

/// Decides the pairs of `pairs` (SPEC §3, one (user, profile) pair at a time). `capacity`: room
/// for this many decisions, so that a later run's can be appended without growing the list.
fn decide_pairs<'a>(
    input: &PlanInput<'a>,
    group_members: &GroupMembers<'_>,
    profile_group_norm: &HashMap<&str, String>,
    pairs: BTreeMap<(&'a str, &'a str), Vec<&'a LoadedOrder>>,
    capacity: usize,
) -> Pairs<'a> {
    let config = input.config;
    let attr = config.ldap.member_attribute;
    let now = input.now;
    let mut part = Pairs {
        decisions: Vec::with_capacity(capacity.max(pairs.len())),
        kept: Vec::new(),
        held_users: BTreeSet::new(),
        grants: Vec::new(),
        lapse_revokes: BTreeMap::new(),
        lost_reason: BTreeMap::new(),
        lapse_marks: BTreeMap::new(),
    };
    let mut member_keys: HashMap<&str, String> = HashMap::new();
    // Consumed as it is decided, so that the map is gone once the decisions are made.
    for ((user, access), orders) in pairs {
        let profile = &config.access[access];
        let group_norm: &str = &profile_group_norm[access];
        let mut order_ids: Vec<String> = orders.iter().map(|o| o.order.id.clone()).collect();
        order_ids.sort();
        order_ids.dedup();
        let mut decision = Decision {
            user: user.to_string(),
            access: access.to_string(),
            decision: DecisionKind::Wait,
            reason: Cow::Borrowed(""),
            orders: order_ids,
            missing_courses: Vec::new(),
            member: None,
        };
        let lookup = input.directory.users.get(user);
        let member_value = lookup.and_then(|l| l.member_value(user, attr));
        let mkey: Option<&String> = match &member_value {
            Some(m) => Some(
                member_keys
                    .entry(user)
                    .or_insert_with(|| member_key(m, attr)),
            ),
            None => None,
        };
        let key = mkey.map(|m| [group_norm, "\u{1f}", m].concat());
        let owned_entry = key
            .as_ref()
            .and_then(|k| input.ledger.owned.get_key_value(k));
        let owned = owned_entry.map(|(_, o)| o);
        let kept_key = |k: &String| match owned_entry {
            Some((ledger_key, _)) => Cow::Borrowed(ledger_key.as_str()),
            None => Cow::Owned(k.clone()),
        };
        let members = &group_members[group_norm];
        decision.member = match (mkey, members) {
            (Some(m), Ok(set)) => Some(set.contains(m.as_str())),
            _ => None,
        };

        let mut active: Vec<&&LoadedOrder> = orders.iter().filter(|o| in_window(o, now)).collect();
        active.sort_by(|a, b| a.order.id.cmp(&b.order.id));
        let gated: Vec<&Gate> = active
            .iter()
            .filter_map(|o| input.gates.get(&o.order.id))
            .collect();
        active.retain(|o| !input.gates.contains_key(&o.order.id));
        if active.is_empty() && !gated.is_empty() {
            let unknown = gated.iter().find_map(|g| match g {
                Gate::Unknown { reason } => Some(reason),
                Gate::Refused { .. } => None,
            });
            if let Some(reason) = unknown {
                // Whether the order may take effect is unknown: neither grant nor revoke.
                decision.decision = DecisionKind::Hold;
                decision.reason =
                    format!("whether the orderer may order is unknown: {reason}").into();
                if let Some(k) = &key {
                    part.kept.push(kept_key(k));
                }
                part.held_users
                    .insert((user.to_lowercase(), group_norm.to_string()));
            } else {
                let reasons: BTreeSet<&str> = gated
                    .iter()
                    .map(|g| match g {
                        Gate::Refused { reason } | Gate::Unknown { reason } => reason.as_str(),
                    })
                    .collect();
                let reason = format!(
                    "the order is not in effect: {}",
                    reasons.into_iter().collect::<Vec<_>>().join("; ")
                );
                part.lost_reason
                    .insert((user.to_string(), group_norm.to_string()), reason.clone());
                decision.decision = DecisionKind::Unauthorized;
                decision.reason = reason.into();
            }
            part.decisions.push(decision);
            continue;
        }
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
            part.lost_reason
                .insert((user.to_string(), group_norm.to_string()), reason.clone());
            decision.reason = reason.into();
            decision.decision = if future.is_some() {
                DecisionKind::Wait
            } else {
                DecisionKind::Expired
            };
            part.decisions.push(decision);
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
                decision.reason = format!("directory lookup of the user failed: {why}").into();
                part.held_users
                    .insert((user.to_lowercase(), group_norm.to_string()));
                part.decisions.push(decision);
                continue;
            }
            Some(UserLookup::Ambiguous { count }) => {
                decision.decision = DecisionKind::Hold;
                decision.reason = format!(
                    "the user filter matches {count} directory entries; it must match exactly one"
                )
                .into();
                part.held_users
                    .insert((user.to_lowercase(), group_norm.to_string()));
                part.decisions.push(decision);
                continue;
            }
            Some(UserLookup::NotFound) => {
                const REASON: &str = "the user filter matches no directory entry";
                part.lost_reason.insert(
                    (user.to_string(), group_norm.to_string()),
                    REASON.to_string(),
                );
                decision.decision = DecisionKind::Wait;
                decision.reason = Cow::Borrowed(REASON);
                part.decisions.push(decision);
                continue;
            }
            Some(UserLookup::Found { .. }) => {}
        }
        let (Some(member_value), Some(key)) = (member_value, key) else {
            continue;
        };

        if let Err(e) = members {
            decision.decision = DecisionKind::Hold;
            decision.reason = format!("members of {} could not be read: {e}", profile.group).into();
            part.kept.push(kept_key(&key));
            part.decisions.push(decision);
            continue;
        }
        let is_member = decision.member == Some(true);

        // Evidence goes into a grant's record only: a member is granted nothing.
        let check = check_courses(config, access, user, input.courses, now, !is_member);
        if !check.unknown.is_empty() {
            decision.decision = DecisionKind::Hold;
            decision.reason = format!("course result unknown: {}", check.unknown.join("; ")).into();
            part.kept.push(kept_key(&key));
            part.decisions.push(decision);
            continue;
        }
        if check.missing.is_empty() {
            decision.decision = DecisionKind::Grant;
            part.kept.push(kept_key(&key));
            if let Some(o) = owned
                && o.lapse_since.is_some()
            {
                part.lapse_marks.insert(key.clone(), None);
            }
            if is_member {
                decision.reason = Cow::Borrowed(if owned.is_some() {
                    "all courses passed; access granted"
                } else {
                    "all courses passed; already a member (added outside coursegate)"
                });
            } else {
                decision.reason = Cow::Borrowed("all courses passed; will be added to the group");
                part.grants.push(Change {
                    key,
                    action: Action::Grant,
                    user: user.to_string(),
                    user_dn: match lookup {
                        Some(UserLookup::Found { dn, .. }) => Some(dn.clone()),
                        _ => None,
                    },
                    member: member_value,
                    access: access.to_string(),
                    group: profile.group.clone(),
                    order: Some(first.order.id.clone()),
                    ticket: first.order.ticket.clone(),
                    evidence: check.evidence,
                    reason: "all required courses passed".to_string(),
                    owned: true,
                });
            }
            part.decisions.push(decision);
            continue;
        }

        decision.missing_courses = check.missing.clone();
        let missing = check.missing.join(", ");
        match owned {
            Some(o) => {
                decision.decision = DecisionKind::Lapse;
                let since = o.lapse_since.unwrap_or(now);
                if o.lapse_since.is_none() {
                    part.lapse_marks.insert(key.clone(), Some(now));
                }
                let grace = chrono::Duration::from_std(profile.lapse_grace)
                    .unwrap_or(chrono::Duration::MAX);
                if profile.revoke_on_lapse && since + grace <= now {
                    decision.decision = DecisionKind::Revoke;
                    decision.reason = format!(
                        "course requirement lapsed ({missing}) since {} and the grace of {} has passed",
                        since.format("%Y-%m-%d"),
                        humantime::format_duration(profile.lapse_grace)
                    ).into();
                    part.lapse_revokes
                        .insert(key, (decision.reason.to_string(), first.order.id.clone()));
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
                    }
                    .into();
                    part.kept.push(kept_key(&key));
                }
            }
            None => {
                decision.decision = DecisionKind::Wait;
                decision.reason = format!("waiting for course: {missing}").into();
            }
        }
        part.decisions.push(decision);
    }

    part
}

/// The changes in the order of their keys, the first of each key only (two profiles naming one
/// group grant its membership once). Sorts the keys, not the changes: a first run has 60,000.
fn in_key_order(changes: Vec<Change>) -> Vec<Change> {
    let mut order: Vec<usize> = (0..changes.len()).collect();
    order.sort_unstable_by(|&a, &b| changes[a].key.cmp(&changes[b].key).then(a.cmp(&b)));
    order.dedup_by(|later, earlier| changes[*later].key == changes[*earlier].key);
    let mut slots: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
    order.iter().filter_map(|&i| slots[i].take()).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::Order;
    use crate::state::Owned;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::path::Path;

    #[test]
    fn a_pass_date_is_written_as_chrono_writes_it() {
        for (y, m, d) in [
            (2026, 11, 1),
            (1999, 12, 31),
            (2024, 2, 29),
            (7, 1, 9),
            (9999, 12, 31),
        ] {
            let at = chrono::NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_time(chrono::NaiveTime::MIN)
                .and_utc();
            assert_eq!(format_passed_at(at), at.format("%Y-%m-%d").to_string());
        }
        let late = chrono::NaiveDate::from_ymd_opt(12026, 1, 2)
            .unwrap()
            .and_time(chrono::NaiveTime::MIN)
            .and_utc();
        assert_eq!(format_passed_at(late), late.format("%Y-%m-%d").to_string());
    }

    const CONFIG: &str = r#"
[daemon]
max_revocations_per_run = 3
max_revocation_ratio = 0.2
[ldap]
url = "ldap://127.0.0.1:389"
user_base = "ou=people,dc=x"
placeholder_member = "cn=nobody,dc=x"
[lms]
kind = "csv"
path = "r.csv"
[courses.c1]
lms_id = "Course One"
[courses.c2]
valid_for = "365d"
[access.wim]
group = "cn=wim,ou=groups,dc=x"
courses = ["c1"]
[access.pacs]
group = "cn=pacs,ou=groups,dc=x"
courses = ["c1", "c2"]
[access.ex]
group = "cn=ex,ou=groups,dc=x"
courses = ["c1"]
exclusive = true
[access.strict]
group = "cn=strict,ou=groups,dc=x"
courses = ["c2"]
revoke_on_lapse = true
lapse_grace = "10d"
"#;

    fn config() -> Config {
        Config::from_toml(Path::new("/tmp/c.toml"), CONFIG).unwrap()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap()
    }

    fn dn_of(user: &str) -> String {
        format!("uid={user},ou=people,dc=x")
    }

    fn order(id: &str, user: &str, access: &[&str]) -> LoadedOrder {
        LoadedOrder {
            file: format!("{id}.toml"),
            order: std::sync::Arc::new(Order {
                id: id.to_string(),
                user: user.to_string(),
                access: access.iter().map(|a| a.to_string()).collect(),
                ordered_by: "boss".to_string(),
                ticket: None,
                valid_from: None,
                valid_until: None,
                note: None,
            }),
            last_good: false,
        }
    }

    fn facts(passed: &[(&str, &str, DateTime<Utc>)]) -> CourseFacts {
        let map: HashMap<_, _> = passed
            .iter()
            .map(|(u, c, at)| (crate::lms::course_key(u, c), *at))
            .collect();
        CourseFacts::from_report("csv:r.csv", map, HashMap::new(), Vec::new())
    }

    struct World {
        config: Config,
        orders: Vec<LoadedOrder>,
        directory: DirectoryFacts,
        courses: CourseFacts,
        ledger: Ledger,
        allow: Option<usize>,
        gates: HashMap<String, Gate>,
    }

    impl World {
        fn new(orders: Vec<LoadedOrder>, courses: CourseFacts) -> World {
            let config = config();
            let mut directory = DirectoryFacts::default();
            for o in &orders {
                directory.users.insert(
                    o.order.user.clone(),
                    UserLookup::Found {
                        dn: dn_of(&o.order.user),
                        account: None,
                        mail: None,
                    },
                );
            }
            for p in config.access.values() {
                directory
                    .groups
                    .insert(p.group.clone(), Ok(vec!["cn=nobody,dc=x".to_string()]));
            }
            World {
                config,
                orders,
                directory,
                courses,
                ledger: Ledger::default(),
                allow: None,
                gates: HashMap::new(),
            }
        }

        fn plan(&self) -> Plan {
            self.plan_split_from(PARALLEL_PAIRS)
        }

        fn input(&self) -> PlanInput<'_> {
            PlanInput {
                config: &self.config,
                orders: &self.orders,
                directory: &self.directory,
                courses: &self.courses,
                ledger: &self.ledger,
                now: now(),
                allow_revocations: self.allow,
                gates: &self.gates,
            }
        }

        fn plan_split_from(&self, parallel_from: usize) -> Plan {
            plan_split_from(&self.input(), parallel_from)
        }

        fn own(&mut self, user: &str, access: &str) {
            let group = self.config.access[access].group.clone();
            let member = dn_of(user);
            self.ledger.owned.insert(
                membership_key(&group, &member, MemberAttribute::Member),
                Owned {
                    group: group.clone(),
                    member: member.clone(),
                    user: user.to_string(),
                    user_dn: Some(member.clone()),
                    access: access.to_string(),
                    order: Some("OLD".to_string()),
                    ticket: None,
                    granted_seq: 1,
                    granted_at: now(),
                    lapse_since: None,
                },
            );
            self.add_member(access, &member);
        }

        fn add_member(&mut self, access: &str, value: &str) {
            let group = self.config.access[access].group.clone();
            if let Some(Ok(m)) = self.directory.groups.get_mut(&group) {
                m.push(value.to_string());
            }
        }

        /// Carries a plan out on the in-memory world, as `apply` would.
        fn apply(&mut self, plan: &Plan) {
            let attr = self.config.ldap.member_attribute;
            for c in &plan.changes {
                let key = c.key().to_string();
                if let Some(Ok(m)) = self.directory.groups.get_mut(&c.group) {
                    match c.action {
                        Action::Grant => m.push(c.member.clone()),
                        Action::Revoke => {
                            m.retain(|v| member_key(v, attr) != member_key(&c.member, attr))
                        }
                    }
                }
                match c.action {
                    Action::Grant => {
                        self.ledger.owned.insert(
                            key,
                            Owned {
                                group: c.group.clone(),
                                member: c.member.clone(),
                                user: c.user.clone(),
                                user_dn: c.user_dn.clone(),
                                access: c.access.clone(),
                                order: c.order.clone(),
                                ticket: None,
                                granted_seq: 1,
                                granted_at: now(),
                                lapse_since: None,
                            },
                        );
                    }
                    Action::Revoke => {
                        self.ledger.owned.remove(&key);
                    }
                }
            }
            for (key, mark) in &plan.lapse_marks {
                if let Some(o) = self.ledger.owned.get_mut(key) {
                    o.lapse_since = *mark;
                }
            }
            for key in &plan.forget {
                self.ledger.owned.remove(key);
            }
        }
    }

    fn decision<'a>(plan: &'a Plan, user: &str, access: &str) -> &'a Decision {
        plan.decisions
            .iter()
            .find(|d| d.user == user && d.access == access)
            .unwrap_or_else(|| panic!("no decision for {user}/{access}: {:?}", plan.decisions))
    }

    #[test]
    fn an_order_from_someone_who_may_not_order_grants_nothing() {
        let passed = now() - chrono::Duration::days(10);
        let mut w = World::new(
            vec![order("O1", "anna", &["wim"])],
            facts(&[("anna", "course one", passed)]),
        );
        w.gates.insert(
            "O1".into(),
            Gate::Refused {
                reason: "karin.chef is not a member of cn=managers".into(),
            },
        );
        let p = w.plan();
        let d = decision(&p, "anna", "wim");
        assert_eq!(d.decision, DecisionKind::Unauthorized);
        assert!(d.reason.contains("karin.chef"), "{}", d.reason);
        assert!(p.changes.is_empty(), "{:?}", p.changes);

        // Another, accepted order for the same pair still grants.
        w.orders.push(order("O2", "anna", &["wim"]));
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Grant);
        assert_eq!(p.changes.len(), 1);
    }

    #[test]
    fn an_unknown_orderer_check_holds_and_revokes_nothing() {
        let passed = now() - chrono::Duration::days(10);
        let mut w = World::new(
            vec![order("O1", "anna", &["wim"])],
            facts(&[("anna", "course one", passed)]),
        );
        // coursegate owns anna's membership through an order that is gone; the only order left
        // for the pair waits for the orderer check, which failed.
        w.own("anna", "wim");
        w.gates.insert(
            "O1".into(),
            Gate::Unknown {
                reason: "directory unreachable".into(),
            },
        );
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Hold);
        assert!(p.changes.is_empty(), "{:?}", p.changes);

        // Refused instead: the order is not in effect, so the owned membership goes.
        w.gates.insert(
            "O1".into(),
            Gate::Refused {
                reason: "not allowed".into(),
            },
        );
        let p = w.plan();
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].action, Action::Revoke);
    }

    #[test]
    fn grants_only_when_every_course_passed() {
        let passed = now() - chrono::Duration::days(10);
        let w = World::new(
            vec![order("O1", "anna", &["wim", "pacs"])],
            facts(&[("anna", "course one", passed)]),
        );
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Grant);
        let pacs = decision(&p, "anna", "pacs");
        assert_eq!(pacs.decision, DecisionKind::Wait);
        assert!(pacs.reason.contains("c2"), "{}", pacs.reason);
        assert_eq!(p.changes.len(), 1);
        let c = &p.changes[0];
        assert_eq!(
            (c.action, c.group.as_str()),
            (Action::Grant, "cn=wim,ou=groups,dc=x")
        );
        assert_eq!(c.order.as_deref(), Some("O1"));
        assert_eq!(c.evidence[0].course, "c1");
        assert_eq!(c.evidence[0].source, "csv:r.csv");
    }

    #[test]
    fn expired_pass_does_not_count() {
        let old = now() - chrono::Duration::days(400);
        let w = World::new(
            vec![order("O1", "anna", &["pacs"])],
            facts(&[("anna", "Course One", now()), ("anna", "c2", old)]),
        );
        let p = w.plan();
        let d = decision(&p, "anna", "pacs");
        assert_eq!(d.decision, DecisionKind::Wait);
        assert!(d.reason.contains("valid for"), "{}", d.reason);
        assert!(p.changes.is_empty());
    }

    #[test]
    fn unknown_course_result_holds_and_changes_nothing() {
        let mut w = World::new(
            vec![order("O1", "anna", &["wim"]), order("O2", "bert", &["wim"])],
            CourseFacts::unavailable("csv:r.csv", "missing"),
        );
        w.own("anna", "wim");
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Hold);
        assert_eq!(decision(&p, "bert", "wim").decision, DecisionKind::Hold);
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert!(p.has_holds());
    }

    #[test]
    fn withdrawn_order_revokes_owned_but_never_manual_members() {
        let mut w = World::new(vec![], facts(&[]));
        w.own("anna", "wim");
        w.add_member("wim", &dn_of("manual"));
        let p = w.plan();
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].action, Action::Revoke);
        assert_eq!(p.changes[0].member, dn_of("anna"));
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Revoke);
    }

    #[test]
    fn validity_window() {
        let mut future = order("O1", "anna", &["wim"]);
        std::sync::Arc::make_mut(&mut future.order).valid_from =
            Some(now() + chrono::Duration::days(1));
        let mut expired = order("O2", "bert", &["wim"]);
        std::sync::Arc::make_mut(&mut expired.order).valid_until =
            Some(now() - chrono::Duration::days(1));
        let mut w = World::new(
            vec![future, expired],
            facts(&[("anna", "Course One", now()), ("bert", "Course One", now())]),
        );
        w.own("bert", "wim");
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Wait);
        assert!(decision(&p, "anna", "wim").reason.contains("valid from"));
        assert_eq!(p.changes.len(), 1);
        assert_eq!(
            (p.changes[0].action, p.changes[0].user.as_str()),
            (Action::Revoke, "bert")
        );
        assert!(
            p.changes[0].reason.contains("expired"),
            "{}",
            p.changes[0].reason
        );
    }

    #[test]
    fn ambiguous_or_failed_lookup_holds_even_owned() {
        let mut w = World::new(
            vec![order("O1", "anna", &["wim"]), order("O2", "bert", &["wim"])],
            facts(&[]),
        );
        w.own("anna", "wim");
        w.own("bert", "wim");
        w.directory
            .users
            .insert("anna".into(), UserLookup::Ambiguous { count: 2 });
        w.directory.users.insert(
            "bert".into(),
            UserLookup::Failed {
                reason: "timeout".into(),
            },
        );
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Hold);
        assert_eq!(decision(&p, "bert", "wim").decision, DecisionKind::Hold);
        assert!(p.changes.is_empty(), "{:?}", p.changes);
    }

    #[test]
    fn user_gone_revokes() {
        let mut w = World::new(
            vec![order("O1", "anna", &["wim"])],
            facts(&[("anna", "Course One", now())]),
        );
        w.own("anna", "wim");
        w.directory
            .users
            .insert("anna".into(), UserLookup::NotFound);
        let p = w.plan();
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].action, Action::Revoke);
        assert!(p.changes[0].reason.contains("no directory entry"));
    }

    #[test]
    fn lapse_is_kept_then_revoked_after_grace_when_configured() {
        let mut w = World::new(vec![order("O1", "anna", &["wim", "strict"])], facts(&[]));
        w.own("anna", "wim");
        w.own("anna", "strict");
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Lapse);
        assert_eq!(decision(&p, "anna", "strict").decision, DecisionKind::Lapse);
        assert!(p.changes.is_empty());
        assert_eq!(p.lapse_marks.len(), 2);
        w.apply(&p);
        for o in w.ledger.owned.values_mut() {
            o.lapse_since = Some(now() - chrono::Duration::days(11));
        }
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Lapse);
        assert_eq!(
            decision(&p, "anna", "strict").decision,
            DecisionKind::Revoke
        );
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].group, "cn=strict,ou=groups,dc=x");
    }

    #[test]
    fn brake_on_total_and_allow_revocations() {
        let mut w = World::new(vec![], facts(&[]));
        for u in ["a", "b", "c", "d"] {
            w.own(u, "wim");
        }
        let p = w.plan();
        assert!(p.brake.is_some());
        assert!(p.changes.is_empty());
        assert_eq!(p.held_revocations.len(), 4);
        w.allow = Some(4);
        let p = w.plan();
        assert!(p.brake.is_none());
        assert_eq!(p.changes.len(), 4);
        w.allow = Some(3);
        assert!(w.plan().brake.is_some());
    }

    #[test]
    fn ratio_brake_only_above_five_owned() {
        let mut w = World::new(vec![], facts(&[]));
        w.config.daemon.max_revocations_per_run = 100;
        let keep: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
        for u in &keep {
            w.own(u, "wim");
        }
        w.orders = keep[2..]
            .iter()
            .map(|u| order(&format!("O-{u}"), u, &["wim"]))
            .collect();
        w.courses = facts(
            &keep
                .iter()
                .map(|u| (u.as_str(), "Course One", now()))
                .collect::<Vec<_>>(),
        );
        for u in &keep {
            w.directory.users.insert(
                u.clone(),
                UserLookup::Found {
                    dn: dn_of(u),
                    account: None,
                    mail: None,
                },
            );
        }
        // 2 of 8 = 25 % > 20 %.
        let p = w.plan();
        assert!(p.brake.is_some(), "{:?}", p.changes);
        assert!(p.brake.unwrap().reasons[0].contains("max_revocation_ratio"));
        // 1 of 8 = 12.5 %: passes.
        w.orders.push(order("O-k1", "k1", &["wim"]));
        assert!(w.plan().brake.is_none());
        // 5 owned, 2 revoked (40 %): the ratio does not apply to small groups.
        let mut small = World::new(vec![], facts(&[]));
        small.config.daemon.max_revocations_per_run = 100;
        for u in ["a", "b", "c", "d", "e"] {
            small.own(u, "wim");
        }
        small.orders = ["c", "d", "e"]
            .iter()
            .map(|u| order(u, u, &["wim"]))
            .collect();
        small.courses = facts(&[
            ("c", "Course One", now()),
            ("d", "Course One", now()),
            ("e", "Course One", now()),
        ]);
        let p = small.plan();
        assert!(p.brake.is_none());
        assert_eq!(p.changes.len(), 2);
    }

    #[test]
    fn exclusive_group_removes_everyone_not_granted_except_placeholder() {
        let mut w = World::new(
            vec![order("O1", "anna", &["ex"]), order("O2", "wait", &["ex"])],
            facts(&[("anna", "Course One", now())]),
        );
        w.add_member("ex", &dn_of("anna"));
        w.add_member("ex", &dn_of("wait"));
        w.add_member("ex", &dn_of("stranger"));
        let p = w.plan();
        let removed: BTreeSet<&str> = p
            .changes
            .iter()
            .filter(|c| c.action == Action::Revoke)
            .map(|c| c.member.as_str())
            .collect();
        assert_eq!(
            removed,
            [dn_of("stranger").as_str(), dn_of("wait").as_str()]
                .into_iter()
                .collect()
        );
        assert!(p.changes.iter().all(|c| !c.owned));
    }

    #[test]
    fn unreadable_group_holds() {
        let mut w = World::new(
            vec![order("O1", "anna", &["wim"])],
            facts(&[("anna", "Course One", now())]),
        );
        w.own("bert", "wim");
        w.directory
            .groups
            .insert("cn=wim,ou=groups,dc=x".into(), Err("timeout".into()));
        let p = w.plan();
        assert_eq!(decision(&p, "anna", "wim").decision, DecisionKind::Hold);
        assert!(p.changes.is_empty());
    }

    #[test]
    fn unconfigured_group_is_never_touched() {
        let mut w = World::new(vec![], facts(&[]));
        w.own("anna", "wim");
        w.config.access.remove("wim");
        let p = w.plan();
        assert!(p.changes.is_empty() && p.held_revocations.is_empty());
        assert!(p.notes[0].contains("no longer configured"));
    }

    // === properties ===

    const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
    const PROFILES: [&str; 4] = ["wim", "pacs", "ex", "strict"];

    #[derive(Debug, Clone)]
    struct Gen {
        orders: Vec<(usize, Vec<usize>, i64, i64)>,
        passed: Vec<(usize, usize, i64)>,
        unknown: Vec<(usize, usize)>,
        lms_down: bool,
        lookups: Vec<u8>,
        members: Vec<(usize, usize)>,
        owned: Vec<(usize, usize, Option<i64>)>,
        group_down: Option<usize>,
    }

    fn gen_world() -> impl Strategy<Value = Gen> {
        (
            prop::collection::vec(
                (
                    0..5usize,
                    prop::collection::vec(0..4usize, 1..3),
                    -3..3i64,
                    -3..3i64,
                ),
                0..8,
            ),
            prop::collection::vec((0..5usize, 0..2usize, -800..0i64), 0..10),
            prop::collection::vec((0..5usize, 0..2usize), 0..2),
            prop::bool::weighted(0.1),
            prop::collection::vec(0..10u8, 5),
            prop::collection::vec((0..5usize, 0..4usize), 0..6),
            prop::collection::vec((0..5usize, 0..4usize, prop::option::of(-20..0i64)), 0..6),
            prop::option::weighted(0.1, 0..4usize),
        )
            .prop_map(
                |(orders, passed, unknown, lms_down, lookups, members, owned, group_down)| Gen {
                    orders,
                    passed,
                    unknown,
                    lms_down,
                    lookups,
                    members,
                    owned,
                    group_down,
                },
            )
    }

    fn build(g: &Gen) -> World {
        let day = chrono::Duration::days(1);
        let orders = g
            .orders
            .iter()
            .enumerate()
            .map(|(i, (u, access, from, until))| {
                let mut o = order(
                    &format!("O{i}"),
                    USERS[*u],
                    &access.iter().map(|a| PROFILES[*a]).collect::<Vec<_>>(),
                );
                let window = std::sync::Arc::make_mut(&mut o.order);
                window.valid_from = (*from > 0).then(|| now() + day * (*from as i32));
                window.valid_until = (*until < 0).then(|| now() + day * (*until as i32));
                o
            })
            .collect();
        let courses = ["Course One", "c2"];
        let courses = if g.lms_down {
            CourseFacts::unavailable("csv:r.csv", "down")
        } else {
            let passed: HashMap<_, _> = g
                .passed
                .iter()
                .map(|(u, c, d)| {
                    (
                        crate::lms::course_key(USERS[*u], courses[*c]),
                        now() + day * (*d as i32),
                    )
                })
                .collect();
            let unknown = g
                .unknown
                .iter()
                .map(|(u, c)| {
                    (
                        crate::lms::course_key(USERS[*u], courses[*c]),
                        "bad row".to_string(),
                    )
                })
                .collect();
            CourseFacts::from_report("csv:r.csv", passed, unknown, Vec::new())
        };
        let mut w = World::new(orders, courses);
        for (i, u) in USERS.iter().enumerate() {
            let lookup = match g.lookups[i] {
                0 => UserLookup::NotFound,
                1 => UserLookup::Ambiguous { count: 2 },
                2 => UserLookup::Failed { reason: "x".into() },
                _ => UserLookup::Found {
                    dn: dn_of(u),
                    account: None,
                    mail: None,
                },
            };
            w.directory.users.insert(u.to_string(), lookup);
        }
        for (u, p) in &g.members {
            w.add_member(PROFILES[*p], &dn_of(USERS[*u]));
        }
        for (u, p, lapse) in &g.owned {
            w.own(USERS[*u], PROFILES[*p]);
            if let Some(days) = lapse {
                let key = membership_key(
                    &w.config.access[PROFILES[*p]].group,
                    &dn_of(USERS[*u]),
                    MemberAttribute::Member,
                );
                if let Some(o) = w.ledger.owned.get_mut(&key) {
                    o.lapse_since = Some(now() + day * (*days as i32));
                }
            }
        }
        if let Some(p) = g.group_down {
            let group = w.config.access[PROFILES[p]].group.clone();
            w.directory.groups.insert(group, Err("down".into()));
        }
        w.config.daemon.max_revocations_per_run = 1000;
        w.config.daemon.max_revocation_ratio = None;
        w
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn never_grants_without_every_course_passed(g in gen_world()) {
            let w = build(&g);
            let p = w.plan();
            for c in p.changes.iter().filter(|c| c.action == Action::Grant) {
                let profile = &w.config.access[&c.access];
                for key in &profile.courses {
                    let course = &w.config.courses[key];
                    let result = w.courses.result(&c.user, &course.lms_id);
                    let CourseResult::Passed { at, .. } = result else {
                        panic!("granted {} {} without {key}: {result:?}", c.user, c.access);
                    };
                    if let Some(v) = course.valid_for {
                        prop_assert!(at + chrono::Duration::from_std(v).unwrap() >= now());
                    }
                }
                let active = w.orders.iter().any(|o| o.order.user == c.user
                    && o.order.access.contains(&c.access) && in_window(o, now()));
                prop_assert!(active, "granted without an active order: {c:?}");
                let found = matches!(w.directory.users.get(&c.user), Some(UserLookup::Found { .. }));
                prop_assert!(found);
            }
        }

        #[test]
        fn unknown_facts_change_nothing(g in gen_world()) {
            let w = build(&g);
            let p = w.plan();
            for d in p.decisions.iter().filter(|d| d.decision == DecisionKind::Hold) {
                let group = &w.config.access[&d.access].group;
                for c in &p.changes {
                    let same_group = dn::normalize(&c.group) == dn::normalize(group);
                    let same_user = c.user.eq_ignore_ascii_case(&d.user)
                        || c.member == dn_of(&d.user);
                    prop_assert!(!(same_group && same_user), "hold {d:?} but change {c:?}");
                }
            }
            if let Some(p_idx) = g.group_down {
                let group = &w.config.access[PROFILES[p_idx]].group;
                prop_assert!(p.changes.iter().all(|c| &c.group != group));
            }
        }

        #[test]
        fn only_configured_groups_and_only_owned_unless_exclusive(g in gen_world()) {
            let w = build(&g);
            let p = w.plan();
            let attr = w.config.ldap.member_attribute;
            for c in p.changes.iter().chain(p.held_revocations.iter()) {
                let profile = w.config.access.values().find(|pr| pr.group == c.group);
                prop_assert!(profile.is_some(), "unconfigured group {}", c.group);
                // The key the plan made is the membership's (the ledger entry apply books).
                prop_assert_eq!(c.key(), membership_key(&c.group, &c.member, attr));
                if c.action == Action::Revoke && !profile.unwrap().exclusive {
                    prop_assert!(w.ledger.owned.contains_key(c.key()), "revoked unowned {c:?}");
                }
                if c.action == Action::Revoke {
                    prop_assert!(c.member != "cn=nobody,dc=x");
                }
            }
        }

        #[test]
        fn deciding_the_pairs_on_two_threads_plans_what_one_thread_plans(g in gen_world()) {
            let w = build(&g);
            let one = w.plan_split_from(usize::MAX);
            let two = w.plan_split_from(0);
            prop_assert_eq!(format!("{two:#?}"), format!("{one:#?}"));
        }

        #[test]
        fn the_first_groups_grants_then_the_rest_of_the_plan_are_the_plan(g in gen_world()) {
            let w = build(&g);
            let whole = w.plan();
            let input = w.input();
            let mut first = decide_first_group(&input).expect("no separator in the test's DNs");
            let mut changes = first.take_grants();
            let group = first.group.clone();
            let mut rest = plan_after_first(&input, first);
            // The grants to the first group, and only those, come first.
            prop_assert!(changes.iter().all(|c| c.action == Action::Grant
                && dn::normalize(&c.group) == group));
            prop_assert!(rest.changes.iter().all(|c| c.action == Action::Revoke
                || dn::normalize(&c.group) != group));
            changes.append(&mut rest.changes);
            rest.changes = changes;
            prop_assert_eq!(format!("{rest:#?}"), format!("{whole:#?}"));
        }

        #[test]
        fn applying_then_planning_again_changes_nothing(g in gen_world()) {
            let mut w = build(&g);
            let first = w.plan();
            w.apply(&first);
            let second = w.plan();
            prop_assert!(second.changes.is_empty(), "second plan: {:?}\nfirst: {:?}", second.changes, first.changes);
        }
    }
}
