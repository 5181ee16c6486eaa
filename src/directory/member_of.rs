//! Resolving many users at once through the `memberOf` attribute that Active Directory and
//! OpenLDAP's memberof overlay keep on user entries.
//!
//! A one-shot `apply` of tens of thousands of orders would otherwise look every user up again
//! (one search per [`super::USERS_PER_SEARCH`] users). Nearly all of them are already members of
//! the groups their orders name, so one paged search per group —
//! `(&<user_filter with {user} = *>(memberOf=<group>))` — finds them with their DN, account and
//! mail, and only the rest (new grants, accounts that are gone) are looked up one batch at a
//! time. The search includes the user filter, so every entry it returns is one the filter
//! matches: correctness never depends on `memberOf` being kept. A server without it simply
//! returns nothing and every user is looked up as before. What this path cannot see is a second
//! entry with the same account that is not a member (the filter would then be ambiguous); such a
//! user is treated as found — and being a member already, nothing is granted twice.

use std::collections::{BTreeMap, HashMap};

use ldap3::Scope;

use super::{Directory, DirectoryError, MAIL_ATTRIBUTE, dn, first_value, fold};

/// Entries found through `memberOf`: folded account name -> DN -> (account, mail).
pub type MemberEntries = HashMap<String, BTreeMap<String, (String, Option<String>)>>;

impl Directory {
    /// The entries under `user_base` that the user filter matches (for any account) and whose
    /// `memberOf` names `group`. `None` when the user filter has no single attribute compared
    /// with `{user}` (then accounts cannot be matched to entries).
    pub async fn members_by_member_of(
        &mut self,
        group: &str,
    ) -> Result<Option<MemberEntries>, DirectoryError> {
        let Some(key) = self.key_attribute.clone() else {
            return Ok(None);
        };
        let any_user = self.cfg.user_filter.replace("{user}", "*");
        let filter = format!("(&{any_user}(memberOf={}))", dn::escape_filter_value(group));
        let base = self.cfg.user_base.clone();
        let entries = self
            .paged_search(
                &base,
                Scope::Subtree,
                &filter,
                vec![key.clone(), MAIL_ATTRIBUTE.to_string()],
            )
            .await?;
        Ok(Some(by_account(entries, &key)))
    }

    /// Every entry under `user_base` that the user filter matches for any account — one paged
    /// search instead of one per [`super::USERS_PER_SEARCH`] names, for a run that must look up
    /// most of the directory's people (a first run). `None` when the filter has no single
    /// attribute compared with `{user}`, or when more than `limit` entries match (the search is
    /// abandoned: the directory holds many more people than there are names to look up). The
    /// entries are matched to names the way batched lookups match them (the key attribute,
    /// trimmed and case-folded), so a name no entry answers is not found, and one that several
    /// entries answer is ambiguous, exactly as a lookup of that name would say.
    pub async fn scan_users(
        &mut self,
        limit: usize,
    ) -> Result<Option<MemberEntries>, DirectoryError> {
        let Some(key) = self.key_attribute.clone() else {
            return Ok(None);
        };
        let filter = self.cfg.user_filter.replace("{user}", "*");
        let base = self.cfg.user_base.clone();
        let entries = self
            .paged_search_at_most(
                &base,
                Scope::Subtree,
                &filter,
                vec![key.clone(), MAIL_ATTRIBUTE.to_string()],
                limit,
            )
            .await?;
        Ok(entries.map(|entries| by_account(entries, &key)))
    }
}

/// Entries by folded account name (the values of the key attribute `key`).
fn by_account(entries: Vec<ldap3::SearchEntry>, key: &str) -> MemberEntries {
    let mut out: MemberEntries = HashMap::new();
    for entry in entries {
        let mail = first_value(&entry, MAIL_ATTRIBUTE);
        let accounts = entry
            .attrs
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(key))
            .flat_map(|(_, v)| v.iter());
        for account in accounts {
            out.entry(fold(account))
                .or_default()
                .insert(entry.dn.clone(), (account.clone(), mail.clone()));
        }
    }
    out
}
