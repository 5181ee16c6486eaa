//! Prometheus metrics of the daemon (`/metrics`), recorded from each reconcile's report.
//!
//! Every failure is countable: LDAP and LMS errors by kind, holds by profile, the brake, and the
//! time of the last successful reconcile so that an alert can fire when it gets old.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::lms::CourseFacts;
use crate::plan::{Action, DecisionKind};
use crate::reconcile::{Applied, RunReport};

type Labels = Vec<(String, String)>;

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

/// All metrics, registered once.
pub struct Metrics {
    registry: Registry,
    reconcile_duration: Histogram,
    reconciles: Family<Labels, Counter>,
    grants: Family<Labels, Counter>,
    revocations: Family<Labels, Counter>,
    holds: Family<Labels, Counter>,
    failed_changes: Family<Labels, Counter>,
    orders: Family<Labels, Gauge>,
    invalid_orders: Gauge,
    ldap_errors: Family<Labels, Counter>,
    lms_errors: Family<Labels, Counter>,
    lms_requests: Family<Labels, Counter>,
    lms_cached: Family<Labels, Counter>,
    brake: Gauge,
    last_success: Gauge<f64, AtomicU64>,
    ready: Gauge,
    queue_messages: Family<Labels, Counter>,
    queue_connected: Gauge,
    outbox: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("coursegate");
        let m = Metrics {
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            reconciles: Family::default(),
            grants: Family::default(),
            revocations: Family::default(),
            holds: Family::default(),
            failed_changes: Family::default(),
            orders: Family::default(),
            invalid_orders: Gauge::default(),
            ldap_errors: Family::default(),
            lms_errors: Family::default(),
            lms_requests: Family::default(),
            lms_cached: Family::default(),
            brake: Gauge::default(),
            last_success: Gauge::default(),
            ready: Gauge::default(),
            queue_messages: Family::default(),
            outbox: Family::default(),
            queue_connected: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile pass",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "reconciles",
            "Reconcile passes by result (ok, error)",
            m.reconciles.clone(),
        );
        registry.register(
            "grants",
            "Memberships added, by access profile",
            m.grants.clone(),
        );
        registry.register(
            "revocations",
            "Memberships removed, by access profile",
            m.revocations.clone(),
        );
        registry.register(
            "holds",
            "Decisions on hold (an unknown fact), by access profile, counted per pass",
            m.holds.clone(),
        );
        registry.register(
            "failed_changes",
            "Directory changes the server refused, by access profile",
            m.failed_changes.clone(),
        );
        registry.register(
            "orders",
            "(user, profile) pairs by phase after the last pass",
            m.orders.clone(),
        );
        registry.register(
            "invalid_order_files",
            "Order files that are not valid orders",
            m.invalid_orders.clone(),
        );
        registry.register(
            "ldap_errors",
            "Directory errors by kind",
            m.ldap_errors.clone(),
        );
        registry.register(
            "lms_errors",
            "Course results errors by platform and kind: unavailable, unreadable_row (reports); \
             connect, timeout, server_error, unauthorized, forbidden, throttled, not_found, \
             http_status, malformed, unexpected_shape, platform_error, no_agent, secret (HTTP \
             platforms, one per unknown lookup)",
            m.lms_errors.clone(),
        );
        registry.register(
            "lms_requests",
            "HTTP requests sent to the learning platform",
            m.lms_requests.clone(),
        );
        registry.register(
            "lms_cache_hits",
            "Course results answered from the cache instead of the learning platform",
            m.lms_cached.clone(),
        );
        registry.register(
            "brake_engaged",
            "1 if the revocation brake held the last pass",
            m.brake.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful reconcile",
            m.last_success.clone(),
        );
        registry.register(
            "ready",
            "1 if the last reconcile succeeded and the peers are reachable",
            m.ready.clone(),
        );
        registry.register(
            "queue_messages",
            "Order queue messages by result (written, withdrawn, dead_letter, write_failed)",
            m.queue_messages.clone(),
        );
        registry.register(
            "queue_connected",
            "1 while the order queue is being consumed",
            m.queue_connected.clone(),
        );
        registry.register(
            "outbox_messages",
            "Notifications and ticket updates in the outbox, by state (pending, delivered, undeliverable), as of the last pass",
            m.outbox.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts the changes a pass (or the daemon's quick pass) made and failed to make.
    pub fn record_applied(&self, applied: &Applied) {
        for c in &applied.granted {
            self.grants
                .get_or_create(&label("profile", &c.access))
                .inc();
        }
        for c in &applied.revoked {
            self.revocations
                .get_or_create(&label("profile", &c.access))
                .inc();
        }
        for (c, _) in &applied.failed {
            self.failed_changes
                .get_or_create(&label("profile", &c.access))
                .inc();
            let kind = match c.action {
                Action::Grant | Action::Revoke => "modify",
            };
            self.ldap_errors.get_or_create(&label("kind", kind)).inc();
        }
    }

    /// Counts a pass's (or a quick pass's) questions to the learning platform and their errors.
    pub fn record_courses(&self, courses: &CourseFacts) {
        let platform = courses.platform();
        let stats = courses.stats();
        for (kind, count) in &stats.errors {
            self.lms_errors
                .get_or_create(&vec![
                    ("platform".to_string(), platform.to_string()),
                    ("kind".to_string(), kind.clone()),
                ])
                .inc_by(*count);
        }
        if stats.requests > 0 {
            self.lms_requests
                .get_or_create(&label("platform", platform))
                .inc_by(stats.requests);
        }
        if stats.cached > 0 {
            self.lms_cached
                .get_or_create(&label("platform", platform))
                .inc_by(stats.cached);
        }
    }

    /// Records a finished pass.
    pub fn record_pass(&self, report: &RunReport, seconds: f64) {
        self.reconcile_duration.observe(seconds);
        self.reconciles.get_or_create(&label("result", "ok")).inc();
        self.record_applied(&report.applied);
        if let Some(view) = &report.observed.notifications {
            let sum = &view.summary;
            for (state, n) in [
                ("pending", sum.pending),
                ("delivered", sum.delivered),
                ("undeliverable", sum.undeliverable),
            ] {
                self.outbox
                    .get_or_create(&label("state", state))
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        for phase in [
            "grant",
            "wait",
            "hold",
            "lapse",
            "revoke",
            "expired",
            "unauthorized",
        ] {
            self.orders.get_or_create(&label("phase", phase)).set(0);
        }
        for d in &report.plan.decisions {
            self.orders
                .get_or_create(&label("phase", d.decision.as_str()))
                .inc();
            if d.decision == DecisionKind::Hold {
                self.holds.get_or_create(&label("profile", &d.access)).inc();
            }
        }
        self.invalid_orders
            .set(i64::try_from(report.observed.scan.invalid.len()).unwrap_or(i64::MAX));
        self.record_courses(&report.observed.courses);
        self.brake.set(i64::from(report.plan.brake.is_some()));
        if report.applied.failed.is_empty() {
            self.last_success
                .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
        }
    }

    /// Records a pass that failed as a whole.
    pub fn record_failure(&self, error: &crate::Error, seconds: f64) {
        self.reconcile_duration.observe(seconds);
        self.reconciles
            .get_or_create(&label("result", "error"))
            .inc();
        if let crate::Error::Directory(e) = error {
            self.ldap_errors
                .get_or_create(&label("kind", e.metric_label()))
                .inc();
        }
    }

    /// Counts a directory error outside a pass (connect, probe).
    pub fn record_ldap_error(&self, kind: &str) {
        self.ldap_errors.get_or_create(&label("kind", kind)).inc();
    }

    pub fn record_queue(&self, result: &str) {
        self.queue_messages
            .get_or_create(&label("result", result))
            .inc();
    }

    pub fn set_queue_connected(&self, connected: bool) {
        self.queue_connected.set(i64::from(connected));
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_metric_family() {
        let m = Metrics::new();
        m.record_ldap_error("connect");
        m.set_ready(true);
        let text = m.encode();
        for name in [
            "coursegate_reconcile_duration_seconds",
            "coursegate_ldap_errors_total{kind=\"connect\"} 1",
            "coursegate_brake_engaged 0",
            "coursegate_last_success_timestamp_seconds",
            "coursegate_ready 1",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
