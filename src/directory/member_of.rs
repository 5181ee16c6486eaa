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

use std::collections::HashMap;

use ldap3::Scope;

use super::{Directory, DirectoryError, MAIL_ATTRIBUTE, dn, first_value, fold};
use crate::plan::UserLookup;

/// Entries found through `memberOf`: folded account name -> the entries with that account, each
/// DN once. Nearly every account has one entry: a list of one costs a tenth of a map's node,
/// which for 20,000 people was 16 MB.
pub type MemberEntries = HashMap<String, Vec<MemberEntry>>;

/// One entry of [`MemberEntries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEntry {
    pub dn: String,
    /// The key attribute's value as the directory spells it.
    pub account: String,
    pub mail: Option<String>,
}

impl Directory {
    /// The entries under `user_base` that the user filter matches (for any account) and whose
    /// `memberOf` names `group`. `None` when the user filter has no single attribute compared
    /// with `{user}` (then accounts cannot be matched to entries).
    pub async fn members_by_member_of(
        &mut self,
        group: &str,
    ) -> Result<Option<MemberEntries>, DirectoryError> {
        let member_of = format!("(memberOf={})", dn::escape_filter_value(group));
        self.accounts_matching(&member_of, usize::MAX).await
    }

    /// Every entry under `user_base` that the user filter matches for any account — one paged
    /// search instead of one per [`super::USERS_PER_SEARCH`] names, for a run that must look up
    /// most of the directory's people (a first run). `None` when the filter has no single
    /// attribute compared with `{user}`, or when more than `limit` entries match (the search is
    /// abandoned: the directory holds many more people than there are names to look up). Names
    /// are matched to the entries with [`lookup`], as batched lookups match them.
    pub async fn scan_users(
        &mut self,
        limit: usize,
    ) -> Result<Option<MemberEntries>, DirectoryError> {
        self.accounts_matching("", limit).await
    }

    /// The entries the user filter (with `{user}` = `*`, AND-ed with `extra` if not empty)
    /// matches, by account; `None` without a key attribute or above `limit` entries.
    async fn accounts_matching(
        &mut self,
        extra: &str,
        limit: usize,
    ) -> Result<Option<MemberEntries>, DirectoryError> {
        let Some(key) = self.key_attribute.clone() else {
            return Ok(None);
        };
        let any_user = self.cfg.user_filter.replace("{user}", "*");
        let filter = if extra.is_empty() {
            any_user
        } else {
            format!("(&{any_user}{extra})")
        };
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

/// What `entries` say about the name `user`, as a lookup of that name would: no entry is not
/// found, one is found, several are ambiguous (names compared trimmed and case-folded).
pub fn lookup(entries: &MemberEntries, user: &str) -> UserLookup {
    match entries.get(&fold(user)).map(Vec::as_slice) {
        None | Some([]) => UserLookup::NotFound,
        Some([one]) => UserLookup::Found {
            dn: one.dn.clone(),
            account: Some(one.account.clone()),
            mail: one.mail.clone(),
        },
        Some(several) => UserLookup::Ambiguous {
            count: several.len(),
        },
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
            let list = out.entry(fold(account)).or_default();
            // Two values of one entry that fold alike name it once.
            if !list.iter().any(|e| e.dn == entry.dn) {
                list.push(MemberEntry {
                    dn: entry.dn.clone(),
                    account: account.clone(),
                    mail: mail.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dn: &str, uids: &[&str], mail: Option<&str>) -> ldap3::SearchEntry {
        let mut attrs = HashMap::from([(
            "uid".to_string(),
            uids.iter().map(|u| u.to_string()).collect(),
        )]);
        if let Some(mail) = mail {
            attrs.insert(MAIL_ATTRIBUTE.to_string(), vec![mail.to_string()]);
        }
        ldap3::SearchEntry {
            dn: dn.to_string(),
            attrs,
            bin_attrs: HashMap::new(),
        }
    }

    #[test]
    fn accounts_are_matched_as_a_lookup_matches_them() {
        let entries = by_account(
            vec![
                entry("uid=anna,ou=p", &["Anna", "anna"], Some("anna@x")),
                entry("uid=bo,ou=p", &["bo"], None),
                entry("uid=bo,ou=q", &["BO"], None),
            ],
            "uid",
        );
        // Two values of one entry that fold alike: still one entry.
        assert_eq!(
            lookup(&entries, " ANNA "),
            UserLookup::Found {
                dn: "uid=anna,ou=p".into(),
                account: Some("Anna".into()),
                mail: Some("anna@x".into()),
            }
        );
        assert_eq!(lookup(&entries, "bo"), UserLookup::Ambiguous { count: 2 });
        assert_eq!(lookup(&entries, "cecilia"), UserLookup::NotFound);
    }
}
