//! The daemon (`coursegate run`): watch, debounce, reconcile, resync, retry, until SIGTERM.
//!
//! One loop owns everything that changes state (the state lock, the audit log, the directory
//! connection), so a reconcile is never interrupted half-way: signals are handled between
//! passes, which is how SIGTERM "finishes the change in flight". The loop is level-triggered:
//! a file event, the resync timer, a retry coming due or a reload only mark a pass as due, and
//! every full pass looks at the whole world again ([`crate::reconcile::pass`]).
//!
//! New or changed order files get a quick pass first ([`crate::reconcile::quick_pass`]): the
//! grants their users are due, in tens of milliseconds however many orders are loaded. A full
//! pass follows once the order directory has been quiet for [`SETTLE`] (at the latest
//! [`MAX_SETTLE`] after the first quick pass) and does everything else: revocations, drift,
//! notifications, the status. A removed file, a non-order file, the course report, anything
//! the quick pass cannot decide, or more than [`QUICK_MAX_FILES`] files at once go straight to
//! a full pass.
//!
//! Failures are values, not exits: a directory that cannot be reached is retried with capped,
//! jittered exponential backoff while the daemon reports not-ready; items that failed or are on
//! hold are retried with their own backoff; the resync timer is the safety net.

pub mod http;
pub mod watch;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::directory::Directory;
use crate::notify::Notifier;
use crate::order::{self, FileKind};
use crate::plan::{DecisionKind, UserLookup};
use crate::reconcile::{self, ApplyOptions, Caches, Quick, RunReport};
use crate::state::{FileStore, StateLock};
use crate::{Error, Result};

use http::Shared;
use watch::{Trigger, Watch};

/// Quiet time after a file event before the pass starts (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A stream of events delays a pass at most this long.
const MAX_DEBOUNCE: Duration = Duration::from_millis(400);
/// Quiet time after an order file event before the quick pass starts (an atomic rename is one
/// event; an editor's several writes arrive within this).
const QUICK_DEBOUNCE: Duration = Duration::from_millis(50);
/// More changed files than this at once go to a full pass.
const QUICK_MAX_FILES: usize = 50;
/// After quick passes, the full pass (revocations, notifications, status) runs when the order
/// directory has been quiet this long…
const SETTLE: Duration = Duration::from_secs(2);
/// …and at the latest this long after the first quick pass.
const MAX_SETTLE: Duration = Duration::from_secs(30);
/// How often an idle daemon checks that the directory connection is alive.
const PROBE_EVERY: Duration = Duration::from_secs(30);
/// How often the watch is checked for a replaced order directory.
const WATCH_CHECK_EVERY: Duration = Duration::from_secs(2);
/// Retry delays: 1 s doubling to at most 2 min, jittered.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(120);

/// Writes the status text of `report` as a JSON string, escaped as it is made.
fn serialize_status_text<S: serde::Serializer>(
    report: &&RunReport,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    struct Text<'a>(&'a RunReport);
    impl std::fmt::Display for Text<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            crate::report::write_status(f, &self.0.plan, &self.0.observed)
        }
    }
    serializer.collect_str(&Text(report))
}

/// The file in `state_dir` where the running daemon publishes its status for `coursegate status`.
pub const STATUS_FILE: &str = "status.json";

fn backoff() -> ExponentialBackoff {
    jittered_backoff(RETRY_MIN, RETRY_MAX)
}

/// Capped, jittered exponential backoff that never gives up (the daemon's retries and the
/// queue's reconnects).
pub fn jittered_backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

struct Daemon {
    config_path: PathBuf,
    config: Config,
    store: FileStore,
    _lock: StateLock,
    audit: AuditLog,
    dir: Option<Directory>,
    connect_backoff: Option<ExponentialBackoff>,
    next_connect: Instant,
    caches: Caches,
    /// Notifications and ticket updates; its worker delivers in its own task.
    notifier: Option<Arc<Notifier>>,
    shared: Arc<Shared>,
    /// Failing items (changes, holds, the pass itself) -> their backoff and next retry.
    retries: HashMap<String, (ExponentialBackoff, Instant)>,
    passes: u64,
    ready_sent: bool,
}

/// Runs the daemon until SIGTERM or SIGINT. Errors only for what makes running impossible
/// (state directory locked or unreadable, audit log refused, `listen` address taken).
pub async fn run(config_path: &Path, config: Config) -> Result<()> {
    let store = FileStore::open(&config.daemon.state_dir)?;
    let lock = store.lock()?;
    let audit = AuditLog::open(&config.daemon.audit_log, &store.anchor_path())?;
    let shared = Arc::new(Shared::new());
    if let Some(addr) = config.daemon.listen {
        let server = http::bind(addr, shared.clone())
            .await
            .map_err(|e| Error::Daemon(format!("cannot listen on {addr}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!("HTTP server stopped: {e}");
            }
        });
        tracing::info!(%addr, "serving /healthz, /readyz, /metrics");
    }
    let signal_err =
        |e: std::io::Error| Error::Daemon(format!("cannot install signal handlers: {e}"));
    let mut hangup = signal(SignalKind::hangup()).map_err(signal_err)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_err)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_err)?;

    let (stop_queue, queue_stop) = tokio::sync::watch::channel(false);
    let queue = config.queue.is_some().then(|| {
        shared.set_queue_problem(Some("order queue: not connected yet".to_string()));
        tokio::spawn(crate::queue::run(
            config.clone(),
            shared.clone(),
            queue_stop,
        ))
    });

    let notifier = Notifier::open(&config, store.dir())?.map(Arc::new);
    let worker = notifier.clone().map(|n| {
        tokio::spawn(async move {
            n.run_worker().await;
        })
    });

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watch = start_watch(&config, &tx);
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let resync = config.daemon.resync_interval;

    let mut d = Daemon {
        config_path: config_path.to_path_buf(),
        config,
        store,
        _lock: lock,
        audit,
        dir: None,
        connect_backoff: None,
        next_connect: Instant::now(),
        caches: Caches::default(),
        notifier,
        shared,
        retries: HashMap::new(),
        passes: 0,
        ready_sent: false,
    };
    notify(&[NotifyState::Status("starting: first reconcile")]);
    tracing::info!(
        desired_dir = %d.config.daemon.desired_dir.display(),
        resync_interval = %humantime::format_duration(resync),
        "coursegate daemon started"
    );

    let now = Instant::now();
    let mut due: Option<Instant> = Some(now);
    let mut first_event: Option<Instant> = None;
    // Order files changed since the last pass, for a quick pass; and the full pass that
    // follows quick passes once the directory settles.
    let mut quick_files: BTreeSet<String> = BTreeSet::new();
    let mut quick_due: Option<Instant> = None;
    let mut quick_first: Option<Instant> = None;
    let mut settle_due: Option<Instant> = None;
    let mut settle_since: Option<Instant> = None;
    let mut next_resync = now + d.config.daemon.resync_interval;
    let mut next_probe = now + PROBE_EVERY;
    let mut next_watch_check = now + WATCH_CHECK_EVERY;
    let mut next_ping = now;

    loop {
        let wake = [
            due,
            quick_due,
            settle_due,
            Some(next_resync),
            d.next_retry(),
            Some(next_probe),
            Some(next_watch_check),
            watchdog.map(|_| next_ping),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + PROBE_EVERY);

        tokio::select! {
            biased;
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                if d.reload() {
                    watch = start_watch(&d.config, &tx);
                    next_resync = Instant::now() + d.config.daemon.resync_interval;
                    due = Some(Instant::now());
                }
            }
            Some(trigger) = rx.recv() => {
                let now = Instant::now();
                match trigger {
                    Trigger::Orders(names) => {
                        // Leftovers of editors and atomic writers are never read: no pass.
                        let names: Vec<String> = names
                            .into_iter()
                            .filter(|n| order::classify(n) != FileKind::Ignored)
                            .collect();
                        if names.iter().all(|n| order::classify(n) != FileKind::Other) {
                            if !names.is_empty() {
                                quick_files.extend(names);
                                let first = *quick_first.get_or_insert(now);
                                quick_due = Some((now + QUICK_DEBOUNCE).min(first + MAX_DEBOUNCE));
                            }
                        } else {
                            let first = *first_event.get_or_insert(now);
                            due = Some((now + DEBOUNCE).min(first + MAX_DEBOUNCE));
                        }
                    }
                    Trigger::Changed => {
                        let first = *first_event.get_or_insert(now);
                        due = Some((now + DEBOUNCE).min(first + MAX_DEBOUNCE));
                    }
                    Trigger::WatcherFailed(e) => {
                        tracing::warn!("file watcher failed, rebuilding it: {e}");
                        watch = start_watch(&d.config, &tx);
                        d.caches.resync();
                        due = Some(now);
                    }
                }
            }
            () = d.shared.pass_wanted.notified() => {
                let now = Instant::now();
                let first = *first_event.get_or_insert(now);
                due = Some((now + DEBOUNCE).min(first + MAX_DEBOUNCE));
            }
            _ = tokio::time::sleep_until(wake) => {}
        }

        let now = Instant::now();
        if let Some(every) = watchdog
            && now >= next_ping
        {
            notify(&[NotifyState::Watchdog]);
            next_ping = now + every;
        }
        if now >= next_watch_check {
            next_watch_check = now + WATCH_CHECK_EVERY;
            if watch.as_ref().is_none_or(Watch::is_stale) {
                tracing::info!("order directory replaced or not watched yet: rebuilding the watch");
                watch = start_watch(&d.config, &tx);
                due = Some(now);
            }
        }
        if now >= next_resync {
            next_resync = now + d.config.daemon.resync_interval;
            d.caches.resync();
            due = Some(now);
        }
        if d.next_retry().is_some_and(|t| now >= t) {
            due = Some(now);
        }
        if now >= next_probe {
            next_probe = now + PROBE_EVERY;
            if !d.probe().await {
                due = Some(now);
            }
        }
        if due.is_some_and(|t| now >= t) || settle_due.is_some_and(|t| now >= t) {
            due = None;
            first_event = None;
            // A full pass sees every file, the quick ones too.
            quick_files.clear();
            quick_due = None;
            quick_first = None;
            settle_due = None;
            settle_since = None;
            d.reconcile().await;
        } else if quick_due.is_some_and(|t| now >= t) {
            quick_due = None;
            quick_first = None;
            let files: Vec<String> = std::mem::take(&mut quick_files).into_iter().collect();
            if d.quick(&files).await {
                let since = *settle_since.get_or_insert(now);
                settle_due = Some((Instant::now() + SETTLE).min(since + MAX_SETTLE));
            } else {
                due = Some(Instant::now());
            }
        }
    }

    notify(&[NotifyState::Stopping]);
    // The queue consumer finishes the message in hand (file written and acked) and stops.
    let _ = stop_queue.send(true);
    if let Some(task) = queue {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    if let Some(w) = worker {
        // Undelivered messages stay in the outbox for the next start.
        w.abort();
    }
    if let Err(e) = d.caches.save_unsaved(&d.store) {
        tracing::error!(
            "cannot save the ledger and the last-good orders of quick passes (the next start recovers the ledger from the audit log): {e}"
        );
    }
    tracing::info!("stopping: no change in flight, audit log synced");
    if let Some(dir) = d.dir.take() {
        // A polite unbind, but never wait on a directory that stopped answering.
        let _ = tokio::time::timeout(Duration::from_secs(2), dir.close()).await;
    }
    Ok(())
}

fn start_watch(config: &Config, tx: &mpsc::UnboundedSender<Trigger>) -> Option<Watch> {
    match Watch::start(config, tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(
                "cannot watch for file changes (will retry; the resync timer still runs): {e}"
            );
            None
        }
    }
}

// === impl Daemon ===

impl Daemon {
    fn next_retry(&self) -> Option<Instant> {
        let items = self.retries.values().map(|(_, t)| *t).min();
        let connect = self.dir.is_none().then_some(self.next_connect);
        items.into_iter().chain(connect).min()
    }

    /// Re-reads the config (SIGHUP). An invalid config is rejected loudly and the running one
    /// stays. Returns whether the new config is in force.
    fn reload(&mut self) -> bool {
        notify(&[NotifyState::Reloading]);
        let outcome = match Config::load(&self.config_path) {
            Err(e) => Err(format!("{e}")),
            Ok(new)
                if new.daemon.state_dir != self.config.daemon.state_dir
                    || new.daemon.audit_log != self.config.daemon.audit_log =>
            {
                Err("state_dir and audit_log can only change with a restart".to_string())
            }
            Ok(new) => Ok(new),
        };
        let accepted = match outcome {
            Ok(new) => {
                if new.daemon.listen != self.config.daemon.listen {
                    tracing::warn!("a new `listen` address takes effect after a restart");
                }
                if format!("{:?}", new.queue) != format!("{:?}", self.config.queue) {
                    tracing::warn!("[queue] changes take effect after a restart");
                }
                if format!("{:?}{:?}", new.notify, new.ticket)
                    != format!("{:?}{:?}", self.config.notify, self.config.ticket)
                {
                    tracing::warn!("[notify] and [ticket] changes take effect after a restart");
                }
                if let Err(e) = self.caches.save_unsaved(&self.store) {
                    tracing::error!(
                        "cannot save the ledger and the last-good orders of quick passes (the next pass recovers the ledger from the audit log): {e}"
                    );
                }
                self.config = new;
                // Reconnect with the new settings (and a rotated password).
                self.dir = None;
                self.next_connect = Instant::now();
                self.connect_backoff = None;
                self.caches.clear();
                self.retries.clear();
                tracing::info!(config = %self.config_path.display(), "config reloaded");
                true
            }
            Err(why) => {
                tracing::error!(
                    config = %self.config_path.display(),
                    "config reload REJECTED, the running config stays in force: {why}"
                );
                notify(&[NotifyState::Status(&format!(
                    "config reload rejected, running with the previous config: {why}"
                ))]);
                false
            }
        };
        notify(&[NotifyState::Ready]);
        accepted
    }

    /// Checks an idle connection; drops it if dead. Returns false if it was dead.
    async fn probe(&mut self) -> bool {
        let Some(dir) = self.dir.as_mut() else {
            return true;
        };
        match dir.probe().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("directory connection lost: {e}");
                self.shared.metrics.record_ldap_error("probe");
                self.shared
                    .set_ready(Some(format!("directory connection lost: {e}")));
                self.dir = None;
                false
            }
        }
    }

    async fn connect(&mut self) -> bool {
        if self.dir.as_mut().is_some_and(|d| d.is_closed()) {
            self.dir = None;
        }
        if self.dir.is_some() {
            return true;
        }
        if Instant::now() < self.next_connect {
            return false;
        }
        match reconcile::connect(&self.config).await {
            Ok(dir) => {
                tracing::info!(url = %self.config.ldap.url, "connected to the directory");
                self.dir = Some(dir);
                self.connect_backoff = None;
                true
            }
            Err(e) => {
                let delay = self
                    .connect_backoff
                    .get_or_insert_with(backoff)
                    .next()
                    .unwrap_or(RETRY_MAX);
                self.next_connect = Instant::now() + delay;
                if let Error::Directory(d) = &e {
                    self.shared.metrics.record_ldap_error(d.metric_label());
                }
                let why = format!(
                    "directory unreachable, retrying in {}: {e}",
                    humantime::format_duration(Duration::from_secs(delay.as_secs().max(1)))
                );
                tracing::error!("{why}");
                self.shared.set_ready(Some(why.clone()));
                notify(&[NotifyState::Status(&format!("waiting: {why}"))]);
                false
            }
        }
    }

    /// A quick pass over changed order files ([`reconcile::quick_pass`]). Returns false when
    /// a full pass must follow at once: too many files, no connection, a failure, a change that
    /// failed, or a view the quick pass cannot trust.
    async fn quick(&mut self, files: &[String]) -> bool {
        if files.len() > QUICK_MAX_FILES || !self.connect().await {
            return false;
        }
        let Some(dir) = self.dir.as_mut() else {
            return false;
        };
        let started = std::time::Instant::now();
        let span = tracing::info_span!("quick", files = files.len());
        let result = reconcile::quick_pass(
            &self.config,
            &self.store,
            &mut self.audit,
            dir,
            &mut self.caches,
            files,
        )
        .instrument(span)
        .await;
        let ms = started.elapsed().as_millis();
        match result {
            Ok(Quick::Done { applied, platform }) => {
                self.shared.metrics.record_applied(&applied);
                if let Some(courses) = &platform {
                    self.shared.metrics.record_courses(courses);
                }
                tracing::info!(
                    files = files.len(),
                    granted = applied.granted.len(),
                    failed = applied.failed.len(),
                    ms,
                    "quick pass finished (the full pass follows when the orders settle)"
                );
                applied.failed.is_empty()
            }
            Ok(Quick::Full(why)) => {
                tracing::debug!(
                    files = files.len(),
                    "full pass instead of a quick one: {why}"
                );
                false
            }
            Err(e) => {
                tracing::warn!("quick pass failed, a full pass follows: {e}");
                if matches!(e, Error::Directory(_)) {
                    self.dir = None;
                }
                false
            }
        }
    }

    async fn reconcile(&mut self) {
        if !self.connect().await {
            return;
        }
        let Some(dir) = self.dir.as_mut() else {
            return;
        };
        self.passes += 1;
        let started = std::time::Instant::now();
        let span = tracing::info_span!("reconcile", pass = self.passes);
        let result = reconcile::pass(
            &self.config,
            &self.store,
            &mut self.audit,
            dir,
            &mut self.caches,
            ApplyOptions::default(),
            self.notifier.as_deref(),
        )
        .instrument(span)
        .await;
        let seconds = started.elapsed().as_secs_f64();
        let now = Instant::now();
        match result {
            Ok(mut report) => {
                self.shared.metrics.record_pass(&report, seconds);
                let directory_trouble = report
                    .observed
                    .directory
                    .users
                    .values()
                    .any(|l| matches!(l, UserLookup::Failed { .. }))
                    || report
                        .observed
                        .directory
                        .groups
                        .values()
                        .any(|g| g.is_err());
                if directory_trouble && self.dir.as_mut().is_some_and(|d| d.is_closed()) {
                    self.dir = None;
                }
                let why_not = if report.observed.courses.is_unavailable() {
                    Some(format!(
                        "course results unavailable: {}",
                        report.observed.courses.problems().join("; ")
                    ))
                } else if directory_trouble {
                    Some("some directory reads failed (decisions on hold)".to_string())
                } else {
                    None
                };
                self.shared.set_ready(why_not.clone());
                self.schedule_retries(&report, now);
                self.publish_status(&report, why_not.as_deref());
                let summary = summary(&report);
                self.caches
                    .keep_users(std::mem::take(&mut report.observed.directory.users));
                if report.applied.failed.is_empty() {
                    self.caches
                        .keep_ledger(std::mem::take(&mut report.observed.ledger));
                }
                if !self.ready_sent {
                    notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
                    self.ready_sent = true;
                } else {
                    notify(&[NotifyState::Status(&summary)]);
                }
            }
            Err(e) => {
                self.shared.metrics.record_failure(&e, seconds);
                tracing::error!("reconcile failed, nothing more was changed: {e}");
                if matches!(e, Error::Directory(_)) {
                    self.dir = None;
                }
                let why = format!("last reconcile failed: {e}");
                self.shared.set_ready(Some(why.clone()));
                notify(&[NotifyState::Status(&why)]);
                let entry = self
                    .retries
                    .entry("pass".to_string())
                    .or_insert_with(|| (backoff(), now));
                entry.1 = now + entry.0.next().unwrap_or(RETRY_MAX);
            }
        }
    }

    /// Keeps a backoff per failing item: each pass in which it still fails pushes its next
    /// retry further out; items that recovered are forgotten.
    fn schedule_retries(&mut self, report: &RunReport, now: Instant) {
        let mut failing: Vec<String> = report
            .applied
            .failed
            .iter()
            .map(|(c, _)| format!("change:{}", c.key()))
            .collect();
        failing.extend(
            report
                .plan
                .decisions
                .iter()
                .filter(|d| d.decision == DecisionKind::Hold)
                .map(|d| format!("hold:{}\u{1f}{}", d.user, d.access)),
        );
        self.retries.retain(|k, _| failing.contains(k));
        for key in failing {
            let entry = self.retries.entry(key).or_insert_with(|| (backoff(), now));
            entry.1 = now + entry.0.next().unwrap_or(RETRY_MAX);
        }
    }

    fn publish_status(&self, report: &RunReport, why_not: Option<&str>) {
        /// The status file's object (keys in sorted order); `text` is written straight into
        /// the file as it is made.
        #[derive(serde::Serialize)]
        struct Status<'a> {
            not_ready_reason: Option<&'a str>,
            pid: u32,
            ready: bool,
            #[serde(serialize_with = "serialize_status_text")]
            text: &'a RunReport,
            updated_at: String,
        }
        let status = Status {
            not_ready_reason: why_not,
            pid: std::process::id(),
            ready: why_not.is_none(),
            text: report,
            updated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let path = self.store.dir().join(STATUS_FILE);
        if let Err(e) = crate::state::write_json_atomic(&path, &status) {
            tracing::warn!("cannot publish status: {e}");
        }
    }
}

fn summary(report: &RunReport) -> String {
    let count = |k: DecisionKind| {
        report
            .plan
            .decisions
            .iter()
            .filter(|d| d.decision == k)
            .count()
    };
    format!(
        "reconciled: {} granted, {} waiting, {} on hold, {} invalid files{}",
        count(DecisionKind::Grant),
        count(DecisionKind::Wait),
        count(DecisionKind::Hold),
        report.observed.scan.invalid.len(),
        if report.plan.brake.is_some() {
            "; REVOCATION BRAKE ENGAGED"
        } else {
            ""
        }
    )
}
