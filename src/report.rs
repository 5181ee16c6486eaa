//! What people read: the text and JSON renderings of `plan`, `explain` and `status`.
//!
//! Rendering is kept apart from deciding so the support desk's wording can change without
//! touching the decision logic, and so the JSON shape of `plan --json` (SPEC §7) lives in one
//! place.

use std::fmt::Write;

use serde_json::{Value, json};

use crate::config::Config;
use crate::plan::{Change, DecisionKind, Plan};
use crate::reconcile::Observed;

fn change_json(c: &Change) -> Value {
    json!({
        "action": c.action.as_str(),
        "user": c.user,
        "access": c.access,
        "group": c.group,
        "order": c.order,
        "member": c.member,
        "reason": c.reason,
    })
}

/// Every change a run would make, including revocations the brake would hold back.
fn all_changes(plan: &Plan) -> impl Iterator<Item = &Change> {
    plan.changes.iter().chain(plan.held_revocations.iter())
}

/// `plan --json`: one object with `changes` and `brake` (SPEC §7), plus decisions and problems.
pub fn plan_json(plan: &Plan, observed: &Observed) -> Value {
    json!({
        "changes": all_changes(plan).map(change_json).collect::<Vec<_>>(),
        "brake": plan.brake.is_some(),
        "brake_reasons": plan.brake.as_ref().map(|b| b.reasons.clone()).unwrap_or_default(),
        "decisions": plan.decisions,
        "invalid_orders": observed.scan.invalid.iter().map(|i| json!({
            "file": i.file,
            "message": i.message,
            "last_good_in_effect": i.last_good_in_effect,
        })).collect::<Vec<_>>(),
        "course_report_problems": observed.courses.problems(),
        "notes": plan.notes,
    })
}

/// `plan` for people.
pub fn plan_text(plan: &Plan, observed: &Observed) -> String {
    let changes: Vec<&Change> = all_changes(plan).collect();
    // A first run lists 60,000 changes: room for them at once, each line written in pieces.
    let mut out = String::with_capacity(changes.iter().map(|c| change_line_len(c)).sum());
    if changes.is_empty() {
        out.push_str("No changes.\n");
    } else {
        let _ = writeln!(out, "Changes ({}):", changes.len());
        for c in &changes {
            push_change_line(&mut out, c);
        }
    }
    if let Some(b) = &plan.brake {
        let _ = writeln!(
            out,
            "Revocation brake: the run would revoke nothing ({} revocations held): {}",
            b.revocations,
            b.reasons.join("; ")
        );
        out.push_str("  After review: coursegate apply --allow-revocations N\n");
    }
    // Writing into a String cannot fail.
    let _ = write_decisions(&mut out, plan, DecisionKind::Wait, "Waiting");
    let _ = write_decisions(
        &mut out,
        plan,
        DecisionKind::Hold,
        "On hold (unknown facts, nothing changed)",
    );
    let _ = write_decisions(&mut out, plan, DecisionKind::Lapse, "Lapsed (kept)");
    let _ = write_invalid(&mut out, observed);
    for note in &plan.notes {
        let _ = writeln!(out, "Note: {note}");
    }
    out
}

/// `  + grant  anna wim → cn=wim,… (reason; order W-1)` and a newline: what
/// `write!(out, "  {sign} {:<6} {} {} → {} ({}; order {o})")` writes (a test holds them equal),
/// without formatting machinery per line.
fn push_change_line(out: &mut String, c: &Change) {
    out.push_str(match c.action {
        crate::plan::Action::Grant => "  + ",
        crate::plan::Action::Revoke => "  - ",
    });
    let action = c.action.as_str();
    out.push_str(action);
    for _ in action.chars().count()..6 {
        out.push(' ');
    }
    for (before, text) in [
        (" ", &c.user),
        (" ", &c.access),
        (" → ", &c.group),
        (" (", &c.reason),
    ] {
        out.push_str(before);
        out.push_str(text);
    }
    if let Some(o) = &c.order {
        out.push_str("; order ");
        out.push_str(o);
    }
    out.push_str(")\n");
}

/// An upper bound of what [`push_change_line`] writes for `c`.
fn change_line_len(c: &Change) -> usize {
    let order = c.order.as_ref().map_or(0, |o| o.len() + 8);
    32 + c.user.len() + c.access.len() + c.group.len() + c.reason.len() + order
}

fn write_decisions(
    out: &mut dyn Write,
    plan: &Plan,
    kind: DecisionKind,
    title: &str,
) -> std::fmt::Result {
    let list: Vec<_> = plan
        .decisions
        .iter()
        .filter(|d| d.decision == kind)
        .collect();
    if list.is_empty() {
        return Ok(());
    }
    writeln!(out, "{title} ({}):", list.len())?;
    for d in list {
        writeln!(out, "  {} {}: {}", d.user, d.access, d.reason)?;
    }
    Ok(())
}

fn write_invalid(out: &mut dyn Write, observed: &Observed) -> std::fmt::Result {
    if observed.scan.invalid.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "Invalid order files ({}):",
        observed.scan.invalid.len()
    )?;
    for i in &observed.scan.invalid {
        let kept = if i.last_good_in_effect {
            " (its last valid version stays in effect)"
        } else {
            ""
        };
        writeln!(out, "  {}: {}{kept}", i.file, i.message)?;
    }
    Ok(())
}

/// `explain USER`: every profile the user has, wants or waits for, and why.
pub fn explain_text(user: &str, config: &Config, plan: &Plan, observed: &Observed) -> String {
    let mut out = String::new();
    let wanted = user.trim().to_lowercase();
    let _ = writeln!(out, "{user}:");
    let mut any = false;
    for d in plan
        .decisions
        .iter()
        .filter(|d| d.user.to_lowercase() == wanted)
    {
        any = true;
        let title = config
            .access
            .get(&d.access)
            .map(|p| p.title.as_str())
            .unwrap_or(&d.access);
        let _ = writeln!(
            out,
            "  {} ({title}): {} — {}",
            d.access,
            d.decision.as_str(),
            d.reason
        );
        if !d.orders.is_empty() {
            let _ = writeln!(out, "      orders: {}", d.orders.join(", "));
            if let Some(view) = &observed.notifications {
                for order in &d.orders {
                    if let Some(notes) = view.by_order.get(order) {
                        let _ = writeln!(
                            out,
                            "      notifications for {order}: {}",
                            notes_line(notes)
                        );
                    }
                }
            }
        }
        if let Some(p) = config.access.get(&d.access) {
            for key in &p.courses {
                if let Some(course) = config.courses.get(key)
                    && d.missing_courses
                        .iter()
                        .any(|m| m.starts_with(&course.title))
                {
                    let _ = writeln!(
                        out,
                        "      missing course: {}{}",
                        course.title,
                        course
                            .url
                            .as_ref()
                            .map(|u| format!(" — {u}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        match d.member {
            Some(true) => out.push_str("      currently a member of the group\n"),
            Some(false) => out.push_str("      currently not a member of the group\n"),
            None => {}
        }
    }
    for o in observed.ledger.owned.values() {
        if o.user.to_lowercase() == wanted
            && !plan
                .decisions
                .iter()
                .any(|d| d.user.to_lowercase() == wanted && d.access == o.access)
        {
            any = true;
            let _ = writeln!(
                out,
                "  {}: granted by coursegate (order {}), kept",
                o.access,
                o.order.as_deref().unwrap_or("-")
            );
        }
    }
    if !any {
        out.push_str("  no order names this user, and coursegate holds no access for them\n");
    }
    if !observed.scan.invalid.is_empty() {
        let _ = writeln!(
            out,
            "  ({} invalid order file(s) in the order directory; `coursegate check` lists them)",
            observed.scan.invalid.len()
        );
    }
    out
}

/// `status`: orders by phase.
pub fn status_text(plan: &Plan, observed: &Observed) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_status(&mut out, plan, observed);
    out
}

/// [`status_text`] written into `out` as it is made: the daemon streams it into its status file
/// instead of holding the text of 60,000 decisions (and two copies of it) at once.
pub fn write_status(out: &mut dyn Write, plan: &Plan, observed: &Observed) -> std::fmt::Result {
    let count = |k: DecisionKind| plan.decisions.iter().filter(|d| d.decision == k).count();
    writeln!(
        out,
        "granted: {}  waiting for a course: {}  on hold: {}  lapsed: {}  to revoke: {}  invalid files: {}",
        count(DecisionKind::Grant),
        count(DecisionKind::Wait),
        count(DecisionKind::Hold),
        count(DecisionKind::Lapse),
        count(DecisionKind::Revoke),
        observed.scan.invalid.len()
    )?;
    if let Some(b) = &plan.brake {
        writeln!(
            out,
            "REVOCATION BRAKE: {} revocations held back: {}",
            b.revocations,
            b.reasons.join("; ")
        )?;
    }
    for kind in [
        DecisionKind::Grant,
        DecisionKind::Wait,
        DecisionKind::Hold,
        DecisionKind::Lapse,
        DecisionKind::Revoke,
        DecisionKind::Expired,
        DecisionKind::Unauthorized,
    ] {
        write_decisions(out, plan, kind, kind.as_str())?;
    }
    write_invalid(out, observed)?;
    if let Some(view) = &observed.notifications {
        let sum = &view.summary;
        writeln!(
            out,
            "notifications: {} pending, {} delivered, {} undeliverable{}",
            sum.pending,
            sum.delivered,
            sum.undeliverable,
            sum.last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        )?;
        for (order, notes) in &view.by_order {
            writeln!(out, "  {order}: {}", notes_line(notes))?;
        }
    }
    Ok(())
}

/// One order's notifications on one line: `granted mail delivered; granted ticket pending …`.
fn notes_line(notes: &[crate::notify::OrderNote]) -> String {
    use crate::notify::outbox::Delivery;
    notes
        .iter()
        .map(|n| {
            let state = match &n.delivery {
                Delivery::Pending {
                    attempts: 0,
                    last_error: None,
                    ..
                } => "pending".to_string(),
                Delivery::Pending {
                    attempts,
                    last_error,
                    ..
                } => format!(
                    "pending after {attempts} failed attempt(s): {}",
                    last_error.as_deref().unwrap_or("?")
                ),
                Delivery::Delivered { at } => format!(
                    "delivered {}",
                    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                Delivery::Undeliverable { reason } => format!("undeliverable: {reason}"),
            };
            let to =
                n.to.as_ref()
                    .map(|t| format!(" to {t}"))
                    .unwrap_or_default();
            format!("{} {}{to} {state}", n.event, n.channel)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Action;

    #[test]
    fn a_change_line_is_what_the_format_string_writes() {
        for (action, order) in [
            (Action::Grant, Some("W-1")),
            (Action::Grant, None),
            (Action::Revoke, Some("Ö-2")),
            (Action::Revoke, None),
        ] {
            let c = Change {
                key: String::new(),
                action,
                user: "anna.åkesson".into(),
                user_dn: None,
                member: "uid=anna,ou=people,dc=example,dc=org".into(),
                access: "wim".into(),
                group: "cn=wim-users,ou=groups,dc=example,dc=org".into(),
                order: order.map(String::from),
                ticket: None,
                evidence: Vec::new(),
                reason: "all required courses passed".into(),
                owned: true,
            };
            let sign = if action == Action::Grant { '+' } else { '-' };
            let mut expected = format!(
                "  {sign} {:<6} {} {} → {} ({}",
                c.action.as_str(),
                c.user,
                c.access,
                c.group,
                c.reason,
            );
            if let Some(o) = &c.order {
                expected.push_str(&format!("; order {o}"));
            }
            expected.push_str(")\n");
            let mut line = String::new();
            push_change_line(&mut line, &c);
            assert_eq!(line, expected);
            assert!(line.len() <= change_line_len(&c));
        }
    }
}
