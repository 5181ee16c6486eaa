//! One reconcile pass, shared by `plan`, `apply`, `explain`, `status` and the daemon: observe
//! the world, decide (pure, [`crate::plan`]), carry the changes out, and recover from a run that
//! was killed half-way.
//!
//! The write protocol (SPEC §6): for each batch of changes to one group the audit records are
//! appended and fsynced first, then the directory is modified, then the ledger checkpoint is
//! saved. A failed modify gets `outcome: not-applied` records. A crash anywhere leaves audit
//! records that the ledger does not yet reflect; [`recover`] finds them at the start of the next
//! run, asks the directory whether each change happened, and says so in the log.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::audit::{AuditLog, Event, PreparedBatch, Record};
use crate::config::Config;
use crate::directory::{Directory, DirectoryError, MemberChange, MemberEntries};
use crate::lms::platform::Platform;
use crate::lms::{CourseFacts, CourseSource, Query, normalize_name};
use crate::notify::Notifier;
use crate::order::{self, FileStamp, Scan};
use crate::plan::{self, Action, Change, DirectoryFacts, Plan, PlanInput, UserLookup};
use crate::state::{FileStore, Ledger, Owned, StateStore, member_key, membership_key};
use crate::{Error, Result};

/// Everything one run observed.
#[derive(Debug, Clone)]
pub struct Observed {
    pub scan: Scan,
    pub directory: DirectoryFacts,
    pub courses: CourseFacts,
    pub ledger: Ledger,
    /// Orders held back by the orderer check (SPEC §4 `allowed_orderers_group`).
    pub gates: HashMap<String, plan::Gate>,
    /// The outbox of notifications and ticket updates, when `[notify]` or `[ticket]` is set.
    pub notifications: Option<crate::notify::View>,
}

/// What a long-running process keeps between passes so that a pass after one changed file
/// costs little: parsed order files (re-read when their stamp changes), user lookups (a failed
/// lookup is never kept), the course report (re-read when its stamp changes) and an HTTP
/// learning platform with its answer cache. The daemon calls [`Caches::resync`] at every full
/// resync, so cached directory and report facts are never older than `resync_interval`; the
/// platform keeps only what its own rules allow ([`crate::lms::platform`]). A config reload
/// clears everything.
#[derive(Debug, Default)]
pub struct Caches {
    orders: order::ParseCache,
    users: HashMap<String, UserLookup>,
    courses: Option<(Option<FileStamp>, CourseFacts)>,
    platform: Option<Platform>,
    /// Orders accepted by the orderer check, as saved.
    acceptances: Option<crate::orderers::Acceptances>,
    /// The ledger as the last successful pass left it (and saved it): the daemon holds the
    /// state lock, so nobody else changes it, and it need not be read back every pass.
    ledger: Option<Ledger>,
    /// Whether `ledger` holds grants of quick passes that are not saved yet (the audit log has
    /// them; the next full pass or the daemon's shutdown saves the ledger).
    ledger_unsaved: bool,
    /// The last-good store as saved (the daemon holds the state lock, like for the ledger).
    last_good: Option<order::LastGood>,
    /// Whether `last_good` holds files of quick passes that are not saved yet (saved by the
    /// next full pass, at SIGTERM or SIGHUP).
    last_good_unsaved: bool,
    /// A one-shot run's order parse cache: saved on another thread as soon as the scan is done
    /// (the run then waits for it at its end).
    save_orders: Option<SaveOrders>,
}

/// Where a one-shot run saves its order parse cache, and the save under way.
#[derive(Debug)]
struct SaveOrders {
    store: FileStore,
    saving: Option<std::thread::JoinHandle<std::result::Result<(), crate::state::StateError>>>,
}

impl Caches {
    /// Keeps the ledger a successful pass ended with, for the next pass.
    pub fn keep_ledger(&mut self, ledger: Ledger) {
        self.ledger = Some(ledger);
    }

    /// Takes back the user lookups of a full pass ([`observe_cached`] moves them out of the
    /// cache): a failed lookup is used once, never kept.
    pub fn keep_users(&mut self, mut users: HashMap<String, UserLookup>) {
        users.retain(|_, l| !matches!(l, UserLookup::Failed { .. }));
        self.users = users;
    }

    /// Saves the ledger and the last-good store if quick passes changed them (the daemon's
    /// shutdown and reload).
    pub fn save_unsaved(&mut self, store: &impl StateStore) -> Result<()> {
        if let Some(ledger) = self.ledger.as_ref().filter(|_| self.ledger_unsaved) {
            store.save_ledger(ledger)?;
            self.ledger_unsaved = false;
        }
        if let Some(last_good) = self.last_good.as_ref().filter(|_| self.last_good_unsaved) {
            store.save_last_good(last_good)?;
            self.last_good_unsaved = false;
        }
        Ok(())
    }

    /// Forgets everything (a config reload: the platform itself may have changed).
    pub fn clear(&mut self) {
        *self = Caches::default();
    }

    /// A full resync: forgets everything but coursegate's own state (the ledger and the
    /// last-good store) and the platform's passes, which are
    /// re-verified at their own pace; its "not passed" answers go, so pending orders are asked
    /// again.
    pub fn resync(&mut self) {
        let mut platform = self.platform.take();
        if let Some(p) = platform.as_mut() {
            p.resync();
        }
        // The ledger is coursegate's own state, not a fact of the world: it stays.
        *self = Caches {
            platform,
            ledger: self.ledger.take(),
            ledger_unsaved: self.ledger_unsaved,
            last_good: self.last_good.take(),
            last_good_unsaved: self.last_good_unsaved,
            ..Caches::default()
        };
    }
}

/// Reads orders, course results and the directory facts the decision needs.
pub async fn observe(
    config: &Config,
    store: &impl StateStore,
    dir: &mut Directory,
    ledger: Ledger,
    now: DateTime<Utc>,
) -> Result<Observed> {
    let last_good = store.load_last_good()?;
    observe_cached(config, &last_good, dir, ledger, now, &mut Caches::default()).await
}

/// [`observe`], reusing and refreshing `caches`.
pub async fn observe_cached(
    config: &Config,
    last_good: &order::LastGood,
    dir: &mut Directory,
    ledger: Ledger,
    now: DateTime<Utc>,
    caches: &mut Caches,
) -> Result<Observed> {
    observe_scoped(config, last_good, dir, ledger, now, caches, None).await
}

/// [`observe_cached`]; with `only_user`, an HTTP learning platform is asked about that user's
/// courses only (`explain USER` reports nothing else, and must not cost a request per order).
async fn observe_scoped(
    config: &Config,
    last_good: &order::LastGood,
    dir: &mut Directory,
    ledger: Ledger,
    now: DateTime<Utc>,
    caches: &mut Caches,
    only_user: Option<&str>,
) -> Result<Observed> {
    // The course report is read on another thread while the orders are read and the users looked
    // up; so are the order files, while the directory is asked about the users (first passes).
    let report = CourseSource::from_config(&config.lms).map(|source| {
        let stamp = config.lms.path.as_deref().and_then(FileStamp::of);
        match &caches.courses {
            Some((cached, facts)) if stamp.is_some() && *cached == stamp => {
                Report::Kept(facts.clone())
            }
            _ => Report::Loading(stamp, tokio::spawn(async move { source.load().await })),
        }
    });
    let reading = {
        let profiles: std::collections::HashSet<String> = config.access.keys().cloned().collect();
        let desired = config.daemon.desired_dir.clone();
        let previous = last_good.clone();
        let mut cache = std::mem::take(&mut caches.orders);
        tokio::task::spawn_blocking(move || {
            let is_profile = |name: &str| profiles.contains(name);
            let scan = order::scan_cached(&desired, &is_profile, &previous, &mut cache);
            (scan, cache)
        })
    };
    let mut prefetched = if caches.users.is_empty() {
        prefetch_users(config, dir).await
    } else {
        Prefetched::default()
    };
    let (scan, cache) = joined(reading).await;
    caches.orders = cache;
    if let Some(save) = caches.save_orders.as_mut()
        && caches.orders.changed()
        && save.saving.is_none()
    {
        let settled = caches.orders.settled(
            std::time::SystemTime::now(),
            crate::state::ORDER_CACHE_SETTLE,
        );
        let store = save.store.clone();
        let profiles = config.access.keys().cloned().collect();
        save.saving = std::thread::Builder::new()
            .name("order-cache".into())
            .spawn(move || store.save_settled_order_cache(profiles, settled))
            .ok();
    }
    let scan = scan?;
    tracing::debug!(
        orders = scan.orders.len(),
        invalid = scan.invalid.len(),
        "order files read"
    );
    for bad in &scan.invalid {
        tracing::warn!(
            file = %bad.file,
            last_good_in_effect = bad.last_good_in_effect,
            "invalid order file: {}",
            bad.message
        );
    }
    for (file, why) in &scan.ignored {
        tracing::warn!(file = %file, "ignored: {why}");
    }
    let users: Vec<String> = scan
        .orders
        .iter()
        .filter(|o| plan::in_window(o, now))
        .map(|o| o.order.user.clone())
        .collect();
    let wanted: std::collections::HashSet<&String> = users.iter().collect();
    caches.users.retain(|u, _| wanted.contains(u));
    let mut unknown: Vec<String> = users
        .iter()
        .filter(|u| !caches.users.contains_key(*u))
        .cloned()
        .collect();
    unknown.sort();
    unknown.dedup();
    if unknown.len() >= MEMBER_OF_THRESHOLD && config.ldap.member_attribute.holds_dns() {
        let prefetched = prefetched.member_of.take();
        resolve_through_member_of(config, dir, &mut unknown, &mut caches.users, prefetched).await;
    }
    if unknown.len() >= SCAN_THRESHOLD {
        let prefetched = prefetched.scan.take();
        resolve_by_scan(dir, &mut unknown, &mut caches.users, prefetched).await;
    }
    drop(prefetched);
    for (user, lookup) in dir.resolve_users(&unknown).await {
        if !matches!(lookup, UserLookup::Failed { .. }) {
            caches.users.insert(user.clone(), lookup.clone());
        }
        caches.users.entry(user).or_insert(lookup);
    }
    // The cache now holds exactly the lookups of `users` (failed ones too): they are moved into
    // the pass rather than copied, and the daemon gives them back once the pass is done
    // ([`Caches::keep_users`]); a pass that fails leaves the next one to look them up again.
    drop(wanted);
    let mut directory = DirectoryFacts {
        users: std::mem::take(&mut caches.users),
        groups: HashMap::new(),
    };

    let courses = match report {
        Some(Report::Kept(facts)) => facts,
        Some(Report::Loading(stamp, loading)) => {
            let facts = joined(loading).await;
            caches.courses = Some((stamp, facts.clone()));
            facts
        }
        None => {
            let mut queries = course_queries(config, &scan.orders, &directory.users, &ledger, now);
            if let Some(only) = only_user {
                queries.retain(|q| normalize_name(&q.user) == normalize_name(only));
            }
            if caches.platform.is_none() {
                match Platform::new(&config.lms) {
                    Ok(platform) => caches.platform = Some(platform),
                    Err(why) => tracing::error!(source = %config.lms.label, "{why}"),
                }
            }
            match caches.platform.as_mut() {
                Some(platform) => platform.load(&queries).await,
                None => CourseFacts::unavailable(
                    config.lms.label.clone(),
                    "the learning platform's client could not be set up (see the error above)",
                ),
            }
        }
    };
    if courses.is_unavailable() {
        tracing::error!(
            source = courses.source(),
            "course results unavailable, every decision that needs them is on hold: {}",
            courses.problems().join("; ")
        );
    } else {
        for p in courses.problems() {
            tracing::warn!(source = courses.source(), "course results: {p}");
        }
    }
    let stats = courses.stats();
    if stats.requests > 0 || stats.cached > 0 {
        tracing::info!(
            source = courses.source(),
            requests = stats.requests,
            cached = stats.cached,
            "course results asked"
        );
    }

    // Each group is read once, however many profiles name it; its members are copied only for
    // another spelling of the same DN (the decision looks groups up as the config writes them).
    let mut read_as: HashMap<String, &String> = HashMap::new();
    for profile in config.access.values() {
        if directory.groups.contains_key(&profile.group) {
            continue;
        }
        let norm = crate::directory::dn::normalize(&profile.group);
        let members = match read_as.get(&norm) {
            Some(spelling) => directory.groups[*spelling].clone(),
            None => {
                read_as.insert(norm, &profile.group);
                dir.read_members(&profile.group).await.map_err(|e| {
                    tracing::error!(group = %profile.group, "cannot read group members: {e}");
                    e.to_string()
                })
            }
        };
        directory.groups.insert(profile.group.clone(), members);
    }
    Ok(Observed {
        scan,
        directory,
        courses,
        ledger,
        gates: HashMap::new(),
        notifications: None,
    })
}

/// How often a long run checkpoints the ledger while it works through its batches.
const LEDGER_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// From this many users to look up, members of the configured groups are first resolved through
/// `memberOf`, one search per group ([`Directory::members_by_member_of`]); below it, the batched
/// lookups are cheaper.
const MEMBER_OF_THRESHOLD: usize = 1000;

/// From this many users still to look up, one search for every entry the user filter matches
/// ([`Directory::scan_users`]) is tried first; it gives up when the directory answers with
/// more than [`SCAN_LIMIT_FACTOR`] times as many entries.
const SCAN_THRESHOLD: usize = 2000;
const SCAN_LIMIT_FACTOR: usize = 3;

/// A user search's answer: `None` where the directory cannot answer it (no `memberOf`, or the
/// scan was abandoned).
type Fetched = Result<Option<MemberEntries>, DirectoryError>;

/// The course report of a pass: the one read before, or one being read on another thread.
enum Report {
    Kept(CourseFacts),
    Loading(Option<FileStamp>, tokio::task::JoinHandle<CourseFacts>),
}

/// User searches made while the order files are read, for a pass that knows no user yet.
#[derive(Default)]
struct Prefetched {
    /// Answers for the first groups of [`member_of_groups`], in order, up to the first
    /// `Ok(None)` or until they name as many people as there are order files.
    member_of: Option<Vec<Fetched>>,
    scan: Option<Fetched>,
}

/// The configured groups, each once, in the order `memberOf` searches take them.
fn member_of_groups(config: &Config) -> Vec<&str> {
    let mut groups: Vec<&str> = config.access.values().map(|p| p.group.as_str()).collect();
    groups.sort_by_key(|g| crate::directory::dn::normalize(g));
    groups.dedup_by_key(|g| crate::directory::dn::normalize(g));
    groups
}

/// Asks the directory, before the orders are read, what [`resolve_through_member_of`] and
/// [`resolve_by_scan`] would ask once they are. The number of files in the order directory
/// stands in for the number of users: below [`MEMBER_OF_THRESHOLD`] nothing is asked, and the
/// scan is made only if the groups' members leave [`SCAN_THRESHOLD`] of them unknown, with
/// the limit it would have then.
async fn prefetch_users(config: &Config, dir: &mut Directory) -> Prefetched {
    let mut prefetched = Prefetched::default();
    let files = std::fs::read_dir(&config.daemon.desired_dir).map_or(0, Iterator::count);
    if files < MEMBER_OF_THRESHOLD {
        return prefetched;
    }
    let mut members: std::collections::HashSet<String> = std::collections::HashSet::new();
    if config.ldap.member_attribute.holds_dns() {
        let mut answers = Vec::new();
        for group in member_of_groups(config) {
            let answer = dir.members_by_member_of(group).await;
            let unanswerable = matches!(answer, Ok(None));
            if let Ok(Some(entries)) = &answer {
                members.extend(entries.keys().cloned());
            }
            answers.push(answer);
            // As the searches stop once no user is left: then the groups hold as many people
            // as there are files. The rest, if needed, are asked for as before.
            if unanswerable || members.len() >= files {
                break;
            }
        }
        prefetched.member_of = Some(answers);
    }
    let left = files.saturating_sub(members.len());
    if left >= SCAN_THRESHOLD {
        prefetched.scan = Some(dir.scan_users(left * SCAN_LIMIT_FACTOR).await);
    }
    prefetched
}

/// Resolves every `unknown` user with one search over the user base, if the directory holds
/// not many more people than that; a failed or abandoned scan leaves them to the batched
/// lookups.
async fn resolve_by_scan(
    dir: &mut Directory,
    unknown: &mut Vec<String>,
    found: &mut HashMap<String, UserLookup>,
    prefetched: Option<Fetched>,
) {
    let scanned = match prefetched {
        Some(scanned) => scanned,
        None => dir.scan_users(unknown.len() * SCAN_LIMIT_FACTOR).await,
    };
    let entries = match scanned {
        Ok(Some(entries)) => entries,
        Ok(None) => {
            tracing::debug!(
                users = unknown.len(),
                "user scan not used: the user base holds many more entries"
            );
            return;
        }
        Err(e) => {
            tracing::warn!("user scan failed, looking users up one batch at a time: {e}");
            return;
        }
    };
    tracing::debug!(
        resolved = unknown.len(),
        entries = entries.len(),
        "users resolved by one scan of the user base"
    );
    for user in unknown.drain(..) {
        let lookup = crate::directory::lookup(&entries, &user);
        found.insert(user, lookup);
    }
}

/// Resolves the `unknown` users that are members of a configured group with one search per group
/// and removes them from `unknown`. A failed search only leaves its users to the batched lookup.
async fn resolve_through_member_of(
    config: &Config,
    dir: &mut Directory,
    unknown: &mut Vec<String>,
    found: &mut HashMap<String, UserLookup>,
    prefetched: Option<Vec<Fetched>>,
) {
    let before = unknown.len();
    let mut searches = 0;
    let mut prefetched = prefetched.map(Vec::into_iter);
    for group in member_of_groups(config) {
        if unknown.is_empty() {
            break;
        }
        searches += 1;
        let fetched = match prefetched.as_mut().and_then(Iterator::next) {
            Some(answer) => answer,
            None => dir.members_by_member_of(group).await,
        };
        let entries = match fetched {
            Ok(Some(entries)) => entries,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%group, "memberOf search failed, looking users up one batch at a time: {e}");
                continue;
            }
        };
        // Only members found once are settled here; the rest are looked up by name.
        unknown.retain(|user| match crate::directory::lookup(&entries, user) {
            found_once @ UserLookup::Found { .. } => {
                found.insert(user.clone(), found_once);
                false
            }
            _ => true,
        });
    }
    tracing::debug!(
        searches,
        resolved = before - unknown.len(),
        left = unknown.len(),
        "users resolved through memberOf"
    );
}

/// The (user, course) pairs an HTTP platform is asked about: every course of every profile that
/// an order in force names, for users the directory found (the decision asks about no one else).
/// A pair is `granted` when coursegate holds a membership of a profile that needs the course:
/// its pass is re-verified at `reverify_interval` rather than `cache_ttl`.
pub fn course_queries(
    config: &Config,
    orders: &[order::LoadedOrder],
    users: &HashMap<String, UserLookup>,
    ledger: &Ledger,
    now: DateTime<Utc>,
) -> Vec<Query> {
    let held: std::collections::HashSet<(String, &str)> = ledger
        .owned
        .values()
        .map(|o| (normalize_name(&o.user), o.access.as_str()))
        .collect();
    let mut queries: BTreeMap<(String, String), Query> = BTreeMap::new();
    for o in orders.iter().filter(|o| plan::in_window(o, now)) {
        let user = &o.order.user;
        let Some(UserLookup::Found { account, mail, .. }) = users.get(user) else {
            continue;
        };
        for access in &o.order.access {
            let Some(profile) = config.access.get(access) else {
                continue;
            };
            let granted = held.contains(&(normalize_name(user), access.as_str()));
            for course in profile.courses.iter().filter_map(|c| config.courses.get(c)) {
                queries
                    .entry(crate::lms::course_key(user, &course.lms_id))
                    .and_modify(|q| q.granted |= granted)
                    .or_insert_with(|| Query {
                        user: user.clone(),
                        login: account.clone().unwrap_or_else(|| user.clone()),
                        mail: mail.clone(),
                        lms_id: course.lms_id.clone(),
                        granted,
                    });
            }
        }
    }
    queries.into_values().collect()
}

/// The decision for what was observed.
pub fn decide(
    config: &Config,
    observed: &Observed,
    now: DateTime<Utc>,
    allow_revocations: Option<usize>,
) -> Plan {
    plan::plan(&plan_input(config, observed, now, allow_revocations))
}

fn plan_input<'a>(
    config: &'a Config,
    observed: &'a Observed,
    now: DateTime<Utc>,
    allow_revocations: Option<usize>,
) -> PlanInput<'a> {
    PlanInput {
        config,
        orders: &observed.scan.orders,
        directory: &observed.directory,
        courses: &observed.courses,
        ledger: &observed.ledger,
        now,
        allow_revocations,
        gates: &observed.gates,
    }
}

/// What carrying out a plan did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub granted: Vec<Made>,
    pub revoked: Vec<Made>,
    /// Changes that could not be made, with the error.
    pub failed: Vec<(Change, String)>,
    /// Whether the ledger changed since its last checkpoint: the caller saves it (a full pass
    /// at once; the daemon's quick pass later, as rewriting every membership for each new order
    /// would cost more than the order itself).
    pub ledger_unsaved: bool,
}

/// A change that was made: whose access to what. The plan holds the change itself; a first run
/// makes 60,000, and copying each whole (evidence, DNs, reason) cost more than booking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    pub user: String,
    /// The profile.
    pub access: String,
}

impl Made {
    fn of(change: &Change) -> Made {
        Made {
            user: change.user.clone(),
            access: change.access.clone(),
        }
    }
}

/// Carries out `plan`: audit first, then the directory, then the ledger (module docs). A long
/// run checkpoints the ledger every [`LEDGER_CHECKPOINT_EVERY`]; the last checkpoint is the
/// caller's, when [`Applied::ledger_unsaved`] says so.
pub async fn apply_plan(
    store: &impl StateStore,
    audit: &mut AuditLog,
    dir: &mut Directory,
    ledger: &mut Ledger,
    plan: &Plan,
    now: DateTime<Utc>,
) -> Result<Applied> {
    apply_plan_after(store, audit, dir, ledger, plan, None, now).await
}

/// One directory change of a plan: changes of one group (as the config writes it) and action,
/// at most [`Directory::values_per_modify`] of them, in plan order.
type Unit<'p> = (&'p str, Action, Vec<&'p Change>);

/// The units of `changes`: one batch per group and action, in the order the changes come
/// (grants first), cut into modifies of at most `per_modify` values.
fn units_of(changes: &[Change], per_modify: usize) -> Vec<Unit<'_>> {
    let mut batches: Vec<((&str, Action), Vec<&Change>)> = Vec::new();
    for change in changes {
        let key = (change.group.as_str(), change.action);
        match batches.iter_mut().find(|(k, _)| *k == key) {
            Some((_, list)) => list.push(change),
            None => batches.push((key, vec![change])),
        }
    }
    let mut units = Vec::new();
    for ((group, action), changes) in batches {
        for chunk in changes.chunks(per_modify.max(1)) {
            units.push((group, action, chunk.to_vec()));
        }
    }
    units
}

/// How many units may be with the directory at once: never two of one group, so that a group's
/// modifies keep their order, and each unit's records are written (and fsynced) before it is
/// sent. The directory works on modifies of different groups side by side: with slapd's
/// memberof overlay, one modify per group sent at once took about 1.25 s where the same three
/// one after the other took about 1.5 s (20,000 members each, 2 cores).
const UNITS_IN_FLIGHT: usize = 3;

/// A unit whose records are written and whose modify is with the directory.
struct InFlight {
    /// Index into the plan's units.
    unit: usize,
    /// The seqs of its records, one per change.
    seqs: Vec<u64>,
    started: std::time::Instant,
    /// The modify, on a handle of its own ([`Directory::beside`]).
    task: tokio::task::JoinHandle<Result<Vec<(usize, DirectoryError)>, DirectoryError>>,
}

fn events_of((_, _, chunk): &Unit<'_>) -> Vec<Event> {
    chunk.iter().map(|c| change_event(c)).collect()
}

/// Writes a unit's records durably, then sends its modify; the answer is read by [`answer`].
fn send(
    audit: &mut AuditLog,
    dir: &Directory,
    index: usize,
    unit: &Unit<'_>,
    prepared: PreparedBatch,
) -> Result<InFlight> {
    let (group, action, chunk) = unit;
    let seqs = audit.commit(prepared)?;
    let values: Vec<String> = chunk.iter().map(|c| c.member.clone()).collect();
    let how = match action {
        Action::Grant => MemberChange::Add,
        Action::Revoke => MemberChange::Remove,
    };
    let mut handle = dir.beside();
    let target = group.to_string();
    let task = tokio::spawn(async move { handle.change_members(&target, how, &values).await });
    Ok(InFlight {
        unit: index,
        seqs,
        started: std::time::Instant::now(),
        task,
    })
}

/// Reads the directory's answer to a unit sent; values it refused get `outcome` records. A
/// modify whose outcome is unknown is an error: nothing more is changed in the run, and the next
/// run's crash recovery looks at the directory and records what happened.
async fn answer(audit: &mut AuditLog, sent: InFlight, units: &[Unit<'_>]) -> Result<Answered> {
    let (group, action, chunk) = &units[sent.unit];
    // A modify task that panicked is an error here, not a panic resumed ([`joined`]): the other
    // units in flight are still waited for.
    let changed = match sent.task.await {
        Ok(changed) => changed,
        Err(e) => {
            return Err(Error::Internal(format!(
                "the change of the members of {group} did not finish: {e}"
            )));
        }
    };
    let failures = match changed {
        Ok(failures) => failures,
        Err(e) if e.in_doubt() => {
            tracing::error!(group = %group, action = action.as_str(), values = chunk.len(), "{e}");
            return Err(e.into());
        }
        Err(e) => (0..chunk.len()).map(|i| (i, e.clone())).collect(),
    };
    let mut failed_at: BTreeMap<usize, String> = BTreeMap::new();
    for (i, e) in failures {
        tracing::error!(group = %group, action = action.as_str(), member = %chunk[i].member, "directory change failed: {e}");
        failed_at.insert(i, e.to_string());
    }
    let outcomes: Vec<Event> = failed_at
        .iter()
        .map(|(i, why)| outcome_event(sent.seqs[*i], false, why))
        .collect();
    audit.append(outcomes)?;
    tracing::info!(
        group = %group,
        action = action.as_str(),
        changed = chunk.len() - failed_at.len(),
        failed = failed_at.len(),
        ms = sent.started.elapsed().as_millis(),
        "directory batch done"
    );
    Ok(Answered {
        unit: sent.unit,
        seqs: sent.seqs,
        failed_at,
    })
}

/// Makes the plan while the grants it begins with are carried out: `grants` are those grants
/// ([`plan::FirstGroup::take_grants`]); their first unit goes to the audit log and the
/// directory, and `decide_rest` makes the rest of the plan ([`plan::plan_after_first`]) while
/// the directory works on it. On 2 cores the plan of a first run at 20,000 users took a tenth
/// of the run, before anything was sent. The plan is the
/// grants followed by the rest; [`apply_plan_after`] carries out the rest and reads the first
/// unit's answer. Without grants the plan is simply made. (A brake record, if the plan has one,
/// comes after that unit's records: the brake holds revocations only.)
async fn first_then_plan(
    audit: &mut AuditLog,
    dir: &mut Directory,
    grants: Vec<Change>,
    decide_rest: impl FnOnce() -> Plan,
) -> Result<(Plan, Option<InFlight>)> {
    let first_units = units_of(&grants, dir.values_per_modify());
    let Some(unit) = first_units.first() else {
        return Ok((decide_rest(), None));
    };
    let prepared = audit.chain_end().prepare(events_of(unit))?;
    let sent = send(audit, dir, 0, unit, prepared)?;
    let mut plan = decide_rest();
    drop(first_units);
    let mut changes = grants;
    changes.append(&mut plan.changes);
    plan.changes = changes;
    Ok((plan, Some(sent)))
}

/// [`apply_plan`] for a plan whose first unit may have been sent already ([`first_then_plan`]).
async fn apply_plan_after(
    store: &impl StateStore,
    audit: &mut AuditLog,
    dir: &mut Directory,
    ledger: &mut Ledger,
    plan: &Plan,
    first: Option<InFlight>,
    now: DateTime<Utc>,
) -> Result<Applied> {
    let mut applied = Applied::default();
    let units = units_of(&plan.changes, dir.values_per_modify());
    let mut in_flight: VecDeque<InFlight> = std::collections::VecDeque::new();
    let mut start = 0;
    if let Some(first) = first {
        let sent = first.seqs.len();
        // The plan's first unit is the one sent: the plan's first changes, in order.
        let begins_with_it = units.first().is_some_and(|(_, action, changes)| {
            *action == Action::Grant
                && changes.len() == sent
                && changes
                    .iter()
                    .zip(&plan.changes)
                    .all(|(a, b)| std::ptr::eq(*a, b))
        });
        in_flight.push_back(first);
        if !begins_with_it {
            // The unit's records are in the audit log: once its answer is in, the next run's
            // crash recovery books what it did.
            drain(audit, in_flight, &units).await;
            return Err(Error::Internal(format!(
                "the plan does not begin with the {sent} grants sent while it was made"
            )));
        }
        start = 1;
    }

    let sent_all = async {
        if let Some(brake) = &plan.brake {
            tracing::error!(
                revocations = brake.revocations,
                "revocation brake engaged, no revocation in this run: {}",
                brake.reasons.join("; ")
            );
            audit.append(vec![brake_event(brake, plan)])?;
        }
        let mut last_save = std::time::Instant::now();
        let mut settled_since_save = false;
        for (i, unit) in units.iter().enumerate().skip(start) {
            // The ledger is a checkpoint of the audit log: saving it after every batch would
            // rewrite it O(batches) times (quadratic on a first run). Recovery replays whatever
            // a crash leaves after the last checkpoint. A checkpoint waits for every answer.
            let checkpoint = settled_since_save && last_save.elapsed() >= LEDGER_CHECKPOINT_EVERY;
            while in_flight.front().is_some()
                && (checkpoint
                    || in_flight.len() >= UNITS_IN_FLIGHT
                    || in_flight
                        .iter()
                        .any(|f| units[f.unit].0.eq_ignore_ascii_case(unit.0)))
            {
                settle_next(audit, &mut in_flight, &units, ledger, &mut applied, now).await?;
                settled_since_save = true;
            }
            if checkpoint {
                store.save_ledger(ledger)?;
                last_save = std::time::Instant::now();
                settled_since_save = false;
            }
            let prepared = audit.chain_end().prepare(events_of(unit))?;
            in_flight.push_back(send(audit, dir, i, unit, prepared)?);
        }
        while !in_flight.is_empty() {
            settle_next(audit, &mut in_flight, &units, ledger, &mut applied, now).await?;
        }
        Ok::<_, Error>(())
    }
    .await;
    if let Err(e) = sent_all {
        // Nothing goes out after the run has stopped: every modify already sent is waited for.
        drain(audit, in_flight, &units).await;
        return Err(e);
    }
    if plan.brake.is_some() {
        // The brake record changes no membership: the ledger reflects it as it is. (Each unit
        // settled above moved the seq on to its own records; a unit carried out before the plan
        // was made has records before the brake's.)
        ledger.applied_seq = ledger.applied_seq.max(audit.last_seq());
    }

    // Ledger bookkeeping that changes nothing in the directory.
    let mut bookkeeping = false;
    for (key, mark) in &plan.lapse_marks {
        if let Some(owned) = ledger.owned.get_mut(key) {
            owned.lapse_since = *mark;
            bookkeeping = true;
        }
    }
    if !plan.forget.is_empty() {
        let events = plan
            .forget
            .iter()
            .filter_map(|key| ledger.owned.get(key))
            .map(|o| Event {
                action: "drift".to_string(),
                user: Some(o.user.clone()),
                member: Some(o.member.clone()),
                access: Some(o.access.clone()),
                group: Some(o.group.clone()),
                reason: Some(
                    "membership granted by coursegate was removed outside coursegate; no longer owned"
                        .to_string(),
                ),
                ..Event::default()
            })
            .collect();
        audit.append(events)?;
        for key in &plan.forget {
            ledger.owned.remove(key);
        }
        ledger.applied_seq = audit.last_seq();
        bookkeeping = true;
    }
    // The last unit is settled after any checkpoint.
    applied.ledger_unsaved = !units.is_empty() || bookkeeping;
    Ok(applied)
}

/// A unit the directory has answered.
struct Answered {
    /// Index into the units of [`apply_plan`].
    unit: usize,
    seqs: Vec<u64>,
    failed_at: BTreeMap<usize, String>,
}

impl Answered {
    /// Books the unit in the ledger and the report. The ledger then reflects the log up to
    /// `through_seq`.
    fn settle(
        self,
        units: &[Unit<'_>],
        ledger: &mut Ledger,
        applied: &mut Applied,
        now: DateTime<Utc>,
        through_seq: u64,
    ) {
        let (_, action, chunk) = &units[self.unit];
        for (i, (change, seq)) in chunk.iter().zip(&self.seqs).enumerate() {
            if let Some(why) = self.failed_at.get(&i) {
                applied.failed.push(((*change).clone(), why.clone()));
                continue;
            }
            match action {
                Action::Grant => {
                    ledger.owned.insert(
                        change.key().to_string(),
                        owned_from_change(change, *seq, now),
                    );
                    applied.granted.push(Made::of(change));
                }
                Action::Revoke => {
                    ledger.owned.remove(change.key());
                    applied.revoked.push(Made::of(change));
                }
            }
        }
        ledger.applied_seq = ledger.applied_seq.max(through_seq);
    }
}

/// Reads the answer to the oldest unit in flight and books it. The ledger then reflects the log
/// up to the records of the next unit in flight (whose outcome is not known yet), or all of it.
async fn settle_next(
    audit: &mut AuditLog,
    in_flight: &mut VecDeque<InFlight>,
    units: &[Unit<'_>],
    ledger: &mut Ledger,
    applied: &mut Applied,
    now: DateTime<Utc>,
) -> Result<()> {
    let Some(sent) = in_flight.pop_front() else {
        return Ok(());
    };
    let answered = answer(audit, sent, units).await?;
    let through_seq = match in_flight.front().and_then(|next| next.seqs.first()) {
        Some(next) => next - 1,
        None => audit.last_seq(),
    };
    answered.settle(units, ledger, applied, now, through_seq);
    Ok(())
}

/// After a run stopped with units in flight: waits for each answer, so that nothing changes in
/// the directory once the run has returned, and records the refusals it learns of. The ledger
/// is left as it is (a failed pass keeps none); the next run's crash recovery books the rest.
async fn drain(audit: &mut AuditLog, in_flight: VecDeque<InFlight>, units: &[Unit<'_>]) {
    for sent in in_flight {
        if let Err(e) = answer(audit, sent, units).await {
            tracing::debug!("after the run stopped: {e}");
        }
    }
}

fn brake_event(brake: &plan::Brake, plan: &Plan) -> Event {
    Event {
        action: "brake".to_string(),
        reason: Some(brake.reasons.join("; ")),
        detail: Some(serde_json::json!({
            "revocations": brake.revocations,
            "held": plan.held_revocations.iter().map(|c| serde_json::json!({
                "user": c.user, "access": c.access, "group": c.group, "member": c.member,
            })).collect::<Vec<_>>(),
        })),
        ..Event::default()
    }
}

fn change_event(c: &Change) -> Event {
    Event {
        action: c.action.as_str().to_string(),
        user: Some(c.user.clone()),
        user_dn: c.user_dn.clone(),
        member: Some(c.member.clone()),
        access: Some(c.access.clone()),
        group: Some(c.group.clone()),
        order: c.order.clone(),
        ticket: c.ticket.clone(),
        reason: Some(c.reason.clone()),
        evidence: c.evidence.clone(),
        ..Event::default()
    }
}

fn outcome_event(seq: u64, applied: bool, why: &str) -> Event {
    Event {
        action: "outcome".to_string(),
        ref_seq: Some(seq),
        outcome: Some(if applied { "applied" } else { "not-applied" }.to_string()),
        reason: Some(why.to_string()),
        ..Event::default()
    }
}

fn owned_from_change(c: &Change, seq: u64, now: DateTime<Utc>) -> Owned {
    Owned {
        group: c.group.clone(),
        member: c.member.clone(),
        user: c.user.clone(),
        user_dn: c.user_dn.clone(),
        access: c.access.clone(),
        order: c.order.clone(),
        ticket: c.ticket.clone(),
        granted_seq: seq,
        granted_at: now,
        lapse_since: None,
    }
}

/// Brings the ledger up to date with audit records it does not reflect yet (a run that was
/// killed, or a ledger that was lost: then the whole log is replayed). For each membership the
/// latest change whose outcome is not recorded is checked against the directory, and an
/// `outcome` record says whether it happened. Returns how many outcomes were recorded.
pub async fn recover(
    config: &Config,
    store: &impl StateStore,
    audit: &mut AuditLog,
    dir: &mut Directory,
    ledger: &mut Ledger,
    now: DateTime<Utc>,
) -> Result<usize> {
    if ledger.applied_seq > audit.last_seq() {
        return Err(Error::Recovery(format!(
            "the ledger reflects audit record {} but the audit log ends at {}: the log was replaced or truncated",
            ledger.applied_seq,
            audit.last_seq()
        )));
    }
    if ledger.applied_seq == audit.last_seq() {
        return Ok(0);
    }
    let attr = config.ldap.member_attribute;
    let records = audit.records_after(ledger.applied_seq)?;
    let mut outcomes: HashMap<u64, bool> = HashMap::new();
    for r in &records {
        if r.event.action == "outcome"
            && let (Some(seq), Some(o)) = (r.event.ref_seq, &r.event.outcome)
        {
            outcomes.insert(seq, o == "applied");
        }
    }
    // Membership key -> its grant/revoke records in log order.
    let mut by_key: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in &records {
        if matches!(r.event.action.as_str(), "grant" | "revoke")
            && let (Some(group), Some(member)) = (
                &r.event.group,
                r.event.member.as_ref().or(r.event.user_dn.as_ref()),
            )
        {
            by_key
                .entry(membership_key(group, member, attr))
                .or_default()
                .push(r);
        }
    }

    let mut members_cache: HashMap<String, Vec<String>> = HashMap::new();
    let mut new_outcomes = Vec::new();
    for (key, list) in &by_key {
        // The latest record that took effect decides ownership.
        let mut effective: Option<&Record> = None;
        for r in list.iter().rev() {
            let happened = match outcomes.get(&r.seq) {
                Some(known) => *known,
                None => {
                    let group = r.event.group.clone().unwrap_or_default();
                    if !members_cache.contains_key(&group) {
                        let m = dir.read_members(&group).await?;
                        members_cache.insert(group.clone(), m);
                    }
                    let member = r
                        .event
                        .member
                        .as_ref()
                        .or(r.event.user_dn.as_ref())
                        .map(|m| member_key(m, attr))
                        .unwrap_or_default();
                    let present = members_cache[&group]
                        .iter()
                        .any(|v| member_key(v, attr) == member);
                    let happened = (r.event.action == "grant") == present;
                    outcomes.insert(r.seq, happened);
                    new_outcomes.push(outcome_event(
                        r.seq,
                        happened,
                        "recovered: checked the directory after an interrupted run",
                    ));
                    happened
                }
            };
            if happened {
                effective = Some(r);
                break;
            }
        }
        match effective {
            Some(r) if r.event.action == "grant" => {
                let e = &r.event;
                ledger.owned.insert(
                    key.clone(),
                    Owned {
                        group: e.group.clone().unwrap_or_default(),
                        member: e.member.clone().or(e.user_dn.clone()).unwrap_or_default(),
                        user: e.user.clone().unwrap_or_default(),
                        user_dn: e.user_dn.clone(),
                        access: e.access.clone().unwrap_or_default(),
                        order: e.order.clone(),
                        ticket: e.ticket.clone(),
                        granted_seq: r.seq,
                        granted_at: now,
                        lapse_since: None,
                    },
                );
            }
            Some(_) => {
                ledger.owned.remove(key);
            }
            None => {}
        }
    }
    let count = new_outcomes.len();
    if count > 0 {
        tracing::warn!(
            count,
            "recovered the outcome of changes from an interrupted run"
        );
        audit.append(new_outcomes)?;
    }
    ledger.applied_seq = audit.last_seq();
    store.save_ledger(ledger)?;
    Ok(count)
}

/// Options of one `apply` run.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    pub allow_revocations: Option<usize>,
}

/// The result of `apply`: what was observed, decided and done.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub observed: Observed,
    pub plan: Plan,
    pub applied: Applied,
    pub recovered: usize,
}

impl RunReport {
    /// SPEC §7: 3 if the brake held revocations, 1 if anything did not converge (a failed
    /// change, a decision on hold), else 0.
    pub fn exit_code(&self) -> i32 {
        if self.plan.brake.is_some() {
            3
        } else if !self.applied.failed.is_empty() || self.plan.has_holds() {
            1
        } else {
            0
        }
    }
}

/// Connects to the directory with the configured credentials.
pub async fn connect(config: &Config) -> Result<Directory> {
    let password = config.bind_password()?;
    Ok(Directory::connect(&config.ldap, password.as_ref()).await?)
}

/// One full reconcile pass that changes the directory (`coursegate apply`).
pub async fn apply(config: &Config, options: ApplyOptions) -> Result<RunReport> {
    let store = FileStore::open(&config.daemon.state_dir)?;
    let _lock = store.lock()?;
    // The ledger and the last-good store are read on another thread meanwhile (under the lock).
    let loading = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            Ok::<_, Error>((store.load_ledger()?, store.load_last_good()?))
        })
    };
    let mut audit = AuditLog::open(&config.daemon.audit_log, &store.anchor_path())?;
    let notifier = Notifier::open(config, store.dir())?;
    let mut dir = connect(config).await?;
    let profiles: Vec<&String> = config.access.keys().collect();
    let orders = store.load_order_cache(&profiles);
    let (ledger, last_good) = joined(loading).await?;
    let mut caches = Caches {
        orders,
        ledger: Some(ledger.unwrap_or_default()),
        last_good: Some(last_good),
        save_orders: Some(SaveOrders {
            store: store.clone(),
            saving: None,
        }),
        ..Caches::default()
    };
    let report = pass(
        config,
        &store,
        &mut audit,
        &mut dir,
        &mut caches,
        options,
        notifier.as_ref(),
    )
    .await;
    dir.close().await;
    let saved = match caches.save_orders.take().and_then(|s| s.saving) {
        Some(saving) => saving
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        // The scan did not run (the pass failed before it), or no thread could be had.
        None if caches.orders.changed() => store.save_order_cache(&profiles, &caches.orders),
        None => Ok(()),
    };
    if let Err(e) = saved {
        tracing::warn!("cannot save the order parse cache (the next run reads every file): {e}");
    }
    drop_in_background(caches);
    let mut report = report?;
    if let Some(n) = &notifier {
        // One delivery round; whatever a peer refuses stays in the outbox for the next run or
        // the daemon. Each attempt is bounded by the peer's timeout.
        let round = n.deliver_due().await?;
        if round.failed + round.deferred > 0 {
            tracing::warn!(
                delivered = round.delivered,
                failed = round.failed,
                deferred = round.deferred,
                "some notifications could not be delivered; they stay in the outbox"
            );
        }
        report.observed.notifications = Some(n.view().await);
    }
    Ok(report)
}

/// What a task spawned for work beside the pass returned. Only a panic (a bug) fails the task
/// itself: it goes on as the panic it was.
async fn joined<T>(task: tokio::task::JoinHandle<T>) -> T {
    match task.await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Frees `value` on a thread of its own. A one-shot run ends with the state of 20,000 orders in
/// memory, and freeing it piece by piece took a tenth of a first run; the process may exit
/// before the thread is done, which is just as good.
pub fn drop_in_background<T: Send + 'static>(value: T) {
    let spawned = std::thread::Builder::new()
        .name("drop".into())
        .spawn(move || drop(value));
    // Without a thread (the process is at its limit), the value was dropped with the error.
    drop(spawned);
}

/// One reconcile pass on open resources: recover, observe, decide, apply. Shared by `apply`
/// and the daemon; the caller holds the state lock.
pub async fn pass(
    config: &Config,
    store: &FileStore,
    audit: &mut AuditLog,
    dir: &mut Directory,
    caches: &mut Caches,
    options: ApplyOptions,
    notifier: Option<&Notifier>,
) -> Result<RunReport> {
    tracing::info!(
        seq = audit.last_seq(),
        hash = audit.last_hash(),
        "audit log anchor"
    );
    let now = Utc::now();
    let operations_before = dir.operations();
    let clock = std::time::Instant::now();
    // Taken, not borrowed: a pass that fails leaves no ledger behind, and the next one reads
    // the saved one.
    let ledger_unsaved = std::mem::take(&mut caches.ledger_unsaved);
    let mut ledger = match caches.ledger.take() {
        Some(ledger) => ledger,
        None => store.load_ledger()?.unwrap_or_default(),
    };
    if ledger_unsaved {
        // Quick passes' grants: saved first, so that nothing this pass does can leave them to
        // crash recovery.
        store.save_ledger(&ledger)?;
    }
    let recovered = recover(config, store, audit, dir, &mut ledger, now).await?;
    let last_good_unsaved = std::mem::take(&mut caches.last_good_unsaved);
    let last_good_before = match caches.last_good.take() {
        Some(kept) => kept,
        None => store.load_last_good()?,
    };
    if last_good_unsaved {
        store.save_last_good(&last_good_before)?;
    }
    tracing::debug!(ms = clock.elapsed().as_millis(), "state loaded");
    let mut observed = observe_cached(config, &last_good_before, dir, ledger, now, caches).await?;
    observed.gates = crate::orderers::check(
        config,
        store,
        &observed.scan.orders,
        &observed.ledger,
        dir,
        now,
        Some(&mut caches.acceptances),
    )
    .await?;
    tracing::debug!(ms = clock.elapsed().as_millis(), "observed");
    // A changed last-good store is saved on another thread while the plan is made (which
    // changes nothing); nothing is changed before the save is done.
    let last_good = std::mem::take(&mut observed.scan.last_good);
    let saving = if last_good != last_good_before {
        let store = store.clone();
        Some(tokio::task::spawn_blocking(move || {
            let saved = store.save_last_good(&last_good);
            (last_good, saved)
        }))
    } else {
        caches.last_good = Some(last_good);
        None
    };
    drop(last_good_before);
    // The first group's pairs are decided first, so that the grants the plan begins with go out
    // while the rest is decided.
    let first = plan::decide_first_group(&plan_input(
        config,
        &observed,
        now,
        options.allow_revocations,
    ));
    if let Some(saving) = saving {
        let (last_good, saved) = joined(saving).await;
        saved?;
        caches.last_good = Some(last_good);
    }
    tracing::debug!(ms = clock.elapsed().as_millis(), "first group decided");
    let (plan, first) = match first {
        Some(mut first) => {
            let grants = first.take_grants();
            first_then_plan(audit, dir, grants, || {
                let input = plan_input(config, &observed, now, options.allow_revocations);
                plan::plan_after_first(&input, first)
            })
            .await?
        }
        None => (
            decide(config, &observed, now, options.allow_revocations),
            None,
        ),
    };
    tracing::debug!(ms = clock.elapsed().as_millis(), "decided");
    // One ledger: the plan is made from it, then the run updates it in place (the report and
    // the notifications see the ledger as the run left it).
    let mut applied =
        apply_plan_after(store, audit, dir, &mut observed.ledger, &plan, first, now).await?;
    if applied.ledger_unsaved {
        store.save_ledger(&observed.ledger)?;
        applied.ledger_unsaved = false;
    }
    tracing::debug!(ms = clock.elapsed().as_millis(), "applied");
    if let Some(n) = notifier {
        let granted_now = applied
            .granted
            .iter()
            .map(|c| (c.user.clone(), c.access.clone()))
            .collect();
        // A failure here loses nothing: the next pass derives the same events again.
        if let Err(e) = n
            .record(
                config,
                dir,
                &observed.scan,
                &observed.gates,
                &plan,
                &granted_now,
                &observed.ledger,
                now,
            )
            .await
        {
            tracing::error!("cannot queue notifications (the next pass tries again): {e}");
        }
        observed.notifications = Some(n.view().await);
    }
    tracing::info!(
        granted = applied.granted.len(),
        revoked = applied.revoked.len(),
        failed = applied.failed.len(),
        ldap_operations = dir.operations() - operations_before,
        "reconcile finished"
    );
    Ok(RunReport {
        observed,
        plan,
        applied,
        recovered,
    })
}

/// What a [`quick_pass`] did.
#[derive(Debug)]
pub enum Quick {
    /// The grants it made (none, if nothing was due), and what an HTTP learning platform was
    /// asked (a report's facts are the full pass's).
    Done {
        applied: Applied,
        platform: Option<Box<CourseFacts>>,
    },
    /// It decided nothing: a full pass must, for this reason.
    Full(&'static str),
}

/// The daemon's quick pass over a few order files that changed (an order dropped into
/// `desired_dir`): it makes the grants those files' users are due, and nothing else, so that a
/// new order takes effect at once however many orders are loaded. It reads only the named files
/// ([`order::ParseCache::quick_view`]), looks up only their users, asks the directory with one
/// compare per group and user whether they are members already, and decides with
/// [`plan::plan`] over that slice of the world, under the same rules as a full pass (courses,
/// orderer check, validity window, unknown facts hold). Revocations, drift, lapse marks,
/// notifications and the published status are left to the full pass that the daemon runs once
/// the files settle. The view holds at most the orders a full scan would see and every fact it
/// lacks holds the decision, so a quick pass can only grant what a full pass would grant.
///
/// Returns `Ok(None)` when a full pass must do the work instead: no ledger in memory (no full
/// pass since start, reload or a failure), the course report changed, or the quick view of the
/// files cannot be trusted. Its grants go to the audit log first, as always; the ledger is
/// saved by the next full pass (a crash before that is recovered from the audit log).
pub async fn quick_pass(
    config: &Config,
    store: &impl StateStore,
    audit: &mut AuditLog,
    dir: &mut Directory,
    caches: &mut Caches,
    files: &[String],
) -> Result<Quick> {
    let attr = config.ldap.member_attribute;
    match &caches.ledger {
        Some(ledger) if ledger.applied_seq == audit.last_seq() => {}
        Some(_) => return Ok(Quick::Full("the ledger in memory lags the audit log")),
        None => return Ok(Quick::Full("no ledger in memory yet")),
    }
    let is_profile = |name: &str| config.access.contains_key(name);
    let Some(orders) = caches
        .orders
        .quick_view(&config.daemon.desired_dir, files, &is_profile)
    else {
        return Ok(Quick::Full(
            "a file is gone, invalid or shares its id, or another file of its user changed",
        ));
    };
    let now = Utc::now();
    let mut users: Vec<String> = orders
        .iter()
        .filter(|o| plan::in_window(o, now))
        .map(|o| o.order.user.clone())
        .collect();
    users.sort();
    users.dedup();
    if users.is_empty() {
        return Ok(Quick::Done {
            applied: Applied::default(),
            platform: None,
        });
    }
    let report_stamp = config.lms.path.as_deref().and_then(FileStamp::of);
    let csv = CourseSource::from_config(&config.lms).is_some();
    if csv
        && !matches!(&caches.courses, Some((cached, _)) if report_stamp.is_some() && *cached == report_stamp)
    {
        return Ok(Quick::Full("the course report changed"));
    }

    // The users: as cached, else one lookup (a failed one is used once, never kept).
    let unknown: Vec<String> = users
        .iter()
        .filter(|u| !caches.users.contains_key(*u))
        .cloned()
        .collect();
    let mut looked_up = HashMap::new();
    if !unknown.is_empty() {
        for (user, lookup) in dir.resolve_users(&unknown).await {
            if !matches!(lookup, UserLookup::Failed { .. }) {
                caches.users.insert(user.clone(), lookup.clone());
            }
            looked_up.insert(user, lookup);
        }
    }
    let mut directory = DirectoryFacts::default();
    for user in &users {
        if let Some(lookup) = looked_up.get(user).or_else(|| caches.users.get(user)) {
            directory.users.insert(user.clone(), lookup.clone());
        }
    }

    // Membership of these users only, in the groups their orders name.
    let named: std::collections::BTreeSet<&str> = orders
        .iter()
        .flat_map(|o| o.order.access.iter().map(String::as_str))
        .collect();
    let mut read: HashMap<String, std::result::Result<Vec<String>, String>> = HashMap::new();
    for (name, profile) in &config.access {
        if !named.contains(name.as_str()) {
            continue;
        }
        let norm = crate::directory::dn::normalize(&profile.group);
        if !read.contains_key(&norm) {
            let mut present = Ok(Vec::new());
            for (user, lookup) in &directory.users {
                let Some(value) = lookup.member_value(user, attr) else {
                    continue;
                };
                match dir.has_member(&profile.group, &value).await {
                    Ok(true) => {
                        if let Ok(values) = &mut present {
                            values.push(value);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        present = Err(e.to_string());
                        break;
                    }
                }
            }
            read.insert(norm.clone(), present);
        }
        directory
            .groups
            .insert(profile.group.clone(), read[&norm].clone());
    }

    let ledger = caches.ledger.as_ref().expect("checked above");
    let gates = crate::orderers::check(
        config,
        store,
        &orders,
        ledger,
        dir,
        now,
        Some(&mut caches.acceptances),
    )
    .await?;
    let platform_facts = if csv {
        None
    } else {
        let queries = course_queries(config, &orders, &directory.users, ledger, now);
        let Some(platform) = caches.platform.as_mut() else {
            return Ok(Quick::Full("the learning platform's client is not set up"));
        };
        Some(platform.load(&queries).await)
    };
    let courses = match (&platform_facts, &caches.courses) {
        (Some(facts), _) | (None, Some((_, facts))) => facts,
        (None, None) => return Ok(Quick::Full("no course results in memory")),
    };
    if courses.is_unavailable() {
        return Ok(Quick::Full("course results unavailable"));
    }
    // The ledger entries of these users (by member value: the user's name may be spelled
    // differently in another order).
    let member_keys: std::collections::HashSet<String> = directory
        .users
        .iter()
        .filter_map(|(user, lookup)| lookup.member_value(user, attr))
        .map(|value| member_key(&value, attr))
        .collect();
    let slice = Ledger {
        applied_seq: ledger.applied_seq,
        owned: ledger
            .owned
            .iter()
            .filter(|(key, _)| {
                key.rsplit_once('\u{1f}')
                    .is_some_and(|(_, member)| member_keys.contains(member))
            })
            .map(|(key, owned)| (key.clone(), owned.clone()))
            .collect(),
    };
    let decided = plan::plan(&PlanInput {
        config,
        orders: &orders,
        directory: &directory,
        courses,
        ledger: &slice,
        now,
        allow_revocations: None,
        gates: &gates,
    });
    let grants = Plan {
        changes: decided
            .changes
            .into_iter()
            .filter(|c| c.action == Action::Grant)
            .collect(),
        ..Plan::default()
    };
    if grants.changes.is_empty() {
        return Ok(Quick::Done {
            applied: Applied::default(),
            platform: platform_facts.map(Box::new),
        });
    }
    // The files granted from become last-good versions, as a full pass records them: if such
    // a file turns invalid later, what it granted stays in effect. Kept in memory and saved by
    // the next full pass (rewriting every order's last version for each new one would cost
    // more than the order itself).
    if caches.last_good.is_none() {
        caches.last_good = Some(store.load_last_good()?);
    }
    let last_good = caches.last_good.as_mut().expect("just loaded");
    for o in orders.iter().filter(|o| files.contains(&o.file)) {
        if last_good.get(&o.file) != Some(&o.order) {
            last_good.insert(o.file.clone(), o.order.clone());
            caches.last_good_unsaved = true;
        }
    }
    let ledger = caches.ledger.as_mut().expect("checked above");
    match apply_plan(store, audit, dir, ledger, &grants, now).await {
        Ok(applied) => {
            caches.ledger_unsaved |= applied.ledger_unsaved;
            Ok(Quick::Done {
                applied,
                platform: platform_facts.map(Box::new),
            })
        }
        Err(e) => {
            // The ledger may lag the audit log now: the next pass reads the saved one and
            // recovers the rest from the log.
            caches.ledger = None;
            caches.ledger_unsaved = false;
            Err(e)
        }
    }
}

/// Observes and decides without changing anything (`plan`, `status`).
pub async fn dry_run(
    config: &Config,
    allow_revocations: Option<usize>,
) -> Result<(Observed, Plan)> {
    dry_run_scoped(config, allow_revocations, None).await
}

/// [`dry_run`] for `explain USER`: an HTTP learning platform is asked about `user` only, so the
/// other users' course results are unknown in the returned plan; only `user`'s decisions count.
pub async fn dry_run_for_user(config: &Config, user: &str) -> Result<(Observed, Plan)> {
    dry_run_scoped(config, None, Some(user)).await
}

async fn dry_run_scoped(
    config: &Config,
    allow_revocations: Option<usize>,
    only_user: Option<&str>,
) -> Result<(Observed, Plan)> {
    let store = FileStore::open_read_only(&config.daemon.state_dir);
    let ledger = store.load_ledger()?.unwrap_or_default();
    let mut dir = connect(config).await?;
    let now = Utc::now();
    let last_good = store.load_last_good()?;
    // The parse results the last `apply` kept: `plan`, `explain` and `status` read only the
    // order files that changed since (they never write the cache).
    let profiles: Vec<&String> = config.access.keys().collect();
    let mut caches = Caches {
        orders: store.load_order_cache(&profiles),
        ..Caches::default()
    };
    let mut observed = observe_scoped(
        config,
        &last_good,
        &mut dir,
        ledger,
        now,
        &mut caches,
        only_user,
    )
    .await?;
    observed.gates = crate::orderers::check(
        config,
        &store,
        &observed.scan.orders,
        &observed.ledger,
        &mut dir,
        now,
        None,
    )
    .await?;
    if config.notify.is_some() || config.ticket.is_some() {
        observed.notifications = Some(crate::notify::View::of(
            &crate::notify::outbox::Outbox::read_only(store.dir())?,
        ));
    }
    let plan = decide(config, &observed, now, allow_revocations);
    tracing::info!(
        changes = plan.changes.len(),
        ldap_operations = dir.operations(),
        "plan computed (nothing changed)"
    );
    dir.close().await;
    Ok((observed, plan))
}
