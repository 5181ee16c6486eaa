//! Who may order access (SPEC §4 `[orders] allowed_orderers_group`).
//!
//! An order takes effect only if its `ordered_by` is a member of the configured group when
//! coursegate first accepts it. The acceptance is recorded in `state_dir` (`orderers.json`), so a
//! manager who later leaves the group does not take access away from the staff they ordered for.
//! Until an order is accepted it is re-checked on every pass: an orderer who is added to the group
//! later makes their order take effect then. An order that already holds memberships when the
//! check is switched on is accepted as it stands ("granted before the check"), so configuring the
//! key never revokes anything by itself. When the check cannot be made (the group or the orderer
//! cannot be read) the order is on hold: it neither grants nor lets anything be revoked.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::directory::Directory;
use crate::order::LoadedOrder;
use crate::plan::{Gate, UserLookup};
use crate::state::{Ledger, StateStore, member_key};
use crate::{Error, Result};

/// Orders accepted by the orderer check: order id -> how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceptances {
    pub accepted: BTreeMap<String, Accepted>,
}

/// One accepted order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The orderer who was checked (an order whose `ordered_by` changes is checked again).
    pub ordered_by: String,
    pub at: DateTime<Utc>,
    /// `member of <group>` or `granted before the orderer check was configured`.
    pub how: String,
}

impl Acceptances {
    fn holds(&self, o: &LoadedOrder) -> bool {
        self.accepted
            .get(&o.order.id)
            .is_some_and(|a| fold(&a.ordered_by) == fold(&o.order.ordered_by))
    }
}

fn fold(name: &str) -> String {
    name.trim().to_lowercase()
}

/// Checks every valid order against `allowed_orderers_group` and returns the ones that may not
/// take effect (yet). Saves newly accepted orders before returning. Without the config key every
/// order is accepted and nothing is read.
pub async fn check(
    config: &Config,
    store: &impl StateStore,
    orders: &[LoadedOrder],
    ledger: &Ledger,
    dir: &mut Directory,
    now: DateTime<Utc>,
    saved: Option<&mut Option<Acceptances>>,
) -> Result<HashMap<String, Gate>> {
    let Some(group) = config
        .orders
        .as_ref()
        .and_then(|o| o.allowed_orderers_group.as_deref())
    else {
        return Ok(HashMap::new());
    };
    // `saved`: a run that changes things records new acceptances and keeps them between passes
    // (only it, holding the state lock, writes the file); `None`: a dry run reads the file.
    let mut scratch = None;
    let (persist, cached) = match saved {
        Some(cache) => (true, cache),
        None => (false, &mut scratch),
    };
    let acceptances = match cached {
        Some(a) => a,
        None => cached.insert(store.load_acceptances().map_err(Error::State)?),
    };
    let mut changed = false;
    let pending: Vec<&LoadedOrder> = orders.iter().filter(|o| !acceptances.holds(o)).collect();
    let mut gates = HashMap::new();
    if pending.is_empty() {
        return Ok(gates);
    }

    // Orders that already hold memberships were accepted before the check existed.
    let holding: BTreeSet<&str> = ledger
        .owned
        .values()
        .filter_map(|o| o.order.as_deref())
        .collect();
    let mut to_check = Vec::new();
    for o in pending {
        if holding.contains(o.order.id.as_str()) {
            changed = true;
            acceptances.accepted.insert(
                o.order.id.clone(),
                Accepted {
                    ordered_by: o.order.ordered_by.clone(),
                    at: now,
                    how: "granted before the orderer check was configured".to_string(),
                },
            );
        } else {
            to_check.push(o);
        }
    }

    if !to_check.is_empty() {
        let attr = config.ldap.member_attribute;
        let members = dir
            .read_members(group)
            .await
            .map(|values| {
                values
                    .iter()
                    .map(|v| member_key(v, attr))
                    .collect::<BTreeSet<_>>()
            })
            .map_err(|e| e.to_string());
        let orderers: Vec<String> = to_check
            .iter()
            .map(|o| o.order.ordered_by.clone())
            .collect();
        let lookups = match &members {
            Ok(_) => dir.resolve_users(&orderers).await,
            Err(_) => HashMap::new(),
        };
        for o in to_check {
            let orderer = &o.order.ordered_by;
            let gate = match (&members, lookups.get(orderer)) {
                (Err(e), _) => Gate::Unknown {
                    reason: format!("the members of {group} could not be read: {e}"),
                },
                (Ok(set), Some(UserLookup::Found { dn, account, .. })) => {
                    let value = if attr.holds_dns() {
                        dn.clone()
                    } else {
                        account.clone().unwrap_or_else(|| orderer.clone())
                    };
                    if set.contains(&member_key(&value, attr)) {
                        changed = true;
                        acceptances.accepted.insert(
                            o.order.id.clone(),
                            Accepted {
                                ordered_by: orderer.clone(),
                                at: now,
                                how: format!("{orderer} is a member of {group}"),
                            },
                        );
                        continue;
                    }
                    Gate::Refused {
                        reason: format!(
                            "the orderer {orderer} is not a member of {group}, which may order access"
                        ),
                    }
                }
                (Ok(_), Some(UserLookup::NotFound)) => Gate::Refused {
                    reason: format!(
                        "the orderer {orderer} has no directory entry, so is not a member of {group}"
                    ),
                },
                (Ok(_), Some(UserLookup::Ambiguous { count })) => Gate::Unknown {
                    reason: format!("the orderer {orderer} matches {count} directory entries"),
                },
                (Ok(_), Some(UserLookup::Failed { reason })) => Gate::Unknown {
                    reason: format!("the orderer {orderer} could not be looked up: {reason}"),
                },
                (Ok(_), None) => Gate::Unknown {
                    reason: format!("the orderer {orderer} was not looked up"),
                },
            };
            gates.insert(o.order.id.clone(), gate);
        }
    }

    if persist
        && changed
        && let Err(e) = store.save_acceptances(acceptances)
    {
        // Forget what was not saved: the next pass reads the file and checks again.
        *cached = None;
        return Err(Error::State(e));
    }
    Ok(gates)
}
