//! The LDAP / Active Directory adapter: connect (TLS, bind), find users, read and change group
//! members.
//!
//! Every operation is batched so that a reconcile of tens of thousands of orders costs tens of
//! LDAP operations: users are resolved many at a time (their escaped filters OR-ed into one
//! paged search), each group's members are read with one search, and changes go out as one
//! modify per group and action carrying many values (bounded by [`MAX_VALUES_PER_MODIFY`]).

pub mod dn;
mod member_of;

pub use member_of::MemberEntries;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Mod, Scope, SearchEntry};

use crate::config::{self, Secret};
use crate::plan::UserLookup;

/// Values per modify operation: large batches, but below what Active Directory refuses
/// (ADMIN_LIMIT_EXCEEDED on very large modifies).
pub const MAX_VALUES_PER_MODIFY: usize = 1000;
/// Users resolved per search (their filters are OR-ed together).
pub const USERS_PER_SEARCH: usize = 500;

/// The attribute read with every user entry for the person's e-mail address.
pub const MAIL_ATTRIBUTE: &str = "mail";

// LDAP result codes (RFC 4511 appendix A) that the adapter handles.
const RC_NO_SUCH_ATTRIBUTE: u32 = 16;
const RC_TYPE_OR_VALUE_EXISTS: u32 = 20;
const RC_NO_SUCH_OBJECT: u32 = 32;
const RC_OBJECT_CLASS_VIOLATION: u32 = 65;
const RC_STRONGER_AUTH_REQUIRED: u32 = 8;
const RC_INSUFFICIENT_ACCESS: u32 = 50;

/// How one modify batch failed.
enum ChunkError {
    /// The server refused this batch (maybe because of one value): worth retrying per value.
    Refused(DirectoryError),
    /// The connection or the group itself is the problem: stop.
    Fatal(DirectoryError),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DirectoryError {
    #[error("cannot connect to LDAP server {url}: {message}")]
    Connect { url: String, message: String },
    #[error("TLS set-up for {url} failed: {message}")]
    Tls { url: String, message: String },
    #[error("LDAP bind as {dn} failed: {message}")]
    Bind { dn: String, message: String },
    #[error("LDAP search in {base} failed: {message}")]
    Search { base: String, message: String },
    #[error("group {group} does not exist in the directory")]
    GroupMissing { group: String },
    #[error("changing members of {group} failed: {message}")]
    Modify { group: String, message: String },
}

impl DirectoryError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            DirectoryError::Connect { .. } => "connect",
            DirectoryError::Tls { .. } => "tls",
            DirectoryError::Bind { .. } => "bind",
            DirectoryError::Search { .. } => "search",
            DirectoryError::GroupMissing { .. } => "group_missing",
            DirectoryError::Modify { .. } => "modify",
        }
    }
}

/// Add or remove member values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    Add,
    Remove,
}

/// A bound connection to the directory.
pub struct Directory {
    ldap: Ldap,
    cfg: config::Ldap,
    /// The attribute compared with `{user}` in the user filter, if the filter has the simple
    /// form `(attr={user})` somewhere; it lets one search resolve many users.
    key_attribute: Option<String>,
    operations: u64,
}

impl Directory {
    /// Connects, upgrades with StartTLS if configured, and binds.
    pub async fn connect(
        cfg: &config::Ldap,
        password: Option<&Secret>,
    ) -> Result<Directory, DirectoryError> {
        let url = cfg.url.clone();
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(cfg.timeout)
            .set_starttls(cfg.starttls);
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("ldaps://") || cfg.starttls {
            settings = settings.set_config(tls_config(cfg)?);
        }
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &url)
            .await
            .map_err(|e| DirectoryError::Connect {
                url: url.clone(),
                message: e.to_string(),
            })?;
        ldap3::drive!(conn);
        ldap.with_timeout(cfg.timeout);
        if let (Some(dn), Some(pw)) = (&cfg.bind_dn, password) {
            let plain = !lower.starts_with("ldaps://") && !cfg.starttls;
            if plain && !config::is_loopback_url(&url) {
                // Only reachable with allow_insecure_bind = true (config validation refuses it).
                tracing::warn!(url = %url, "binding with a password over an unencrypted ldap:// connection (allow_insecure_bind = true)");
            }
            let result =
                ldap.simple_bind(dn, pw.expose())
                    .await
                    .map_err(|e| DirectoryError::Bind {
                        dn: dn.clone(),
                        message: e.to_string(),
                    })?;
            if result.rc != 0 {
                let mut message = format!("result code {}: {}", result.rc, result.text);
                if result.rc == RC_STRONGER_AUTH_REQUIRED {
                    message.push_str(
                        " — the server refuses a simple bind without TLS: use an ldaps:// url or set starttls = true",
                    );
                }
                if result.rc == 49 {
                    message = format!(
                        "invalid credentials (result code 49): check bind_dn and the password file {}",
                        cfg.bind_password_file
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    );
                }
                return Err(DirectoryError::Bind {
                    dn: dn.clone(),
                    message,
                });
            }
        }
        Ok(Directory {
            ldap,
            key_attribute: key_attribute(&cfg.user_filter),
            cfg: cfg.clone(),
            operations: 1,
        })
    }

    /// How many LDAP operations this connection has issued (bind, searches, pages, modifies).
    pub fn operations(&self) -> u64 {
        self.operations
    }

    /// Whether the connection has been closed (by the server or a network failure).
    pub fn is_closed(&mut self) -> bool {
        self.ldap.is_closed()
    }

    /// Resolves user names to directory entries. A failed search makes the users of that batch
    /// `Failed` (hold), never `NotFound`.
    pub async fn resolve_users(&mut self, users: &[String]) -> HashMap<String, UserLookup> {
        let mut unique: Vec<String> = users.to_vec();
        unique.sort();
        unique.dedup();
        let mut out = HashMap::new();
        let batch = if self.key_attribute.is_some() {
            USERS_PER_SEARCH
        } else {
            1
        };
        for chunk in unique.chunks(batch) {
            match self.resolve_batch(chunk).await {
                Ok(found) => out.extend(found),
                Err(e) => {
                    for u in chunk {
                        out.insert(
                            u.clone(),
                            UserLookup::Failed {
                                reason: e.to_string(),
                            },
                        );
                    }
                }
            }
        }
        out
    }

    async fn resolve_batch(
        &mut self,
        users: &[String],
    ) -> Result<HashMap<String, UserLookup>, DirectoryError> {
        let filters: Vec<String> = users
            .iter()
            .map(|u| dn::user_filter(&self.cfg.user_filter, u))
            .collect();
        let filter = if filters.len() == 1 {
            filters[0].clone()
        } else {
            format!("(|{})", filters.concat())
        };
        let mut attrs = vec![MAIL_ATTRIBUTE.to_string()];
        attrs.extend(self.key_attribute.clone());
        let base = self.cfg.user_base.clone();
        let entries = self
            .paged_search(&base, Scope::Subtree, &filter, attrs)
            .await?;

        // Requested name -> entry DN -> the name as the entry spells it.
        // Requested name -> entry DN -> (account as spelt there, mail).
        let mut matches: HashMap<String, BTreeMap<String, EntryNames>> = HashMap::new();
        if users.len() == 1 && self.key_attribute.is_none() {
            let dns = entries
                .into_iter()
                .map(|e| {
                    let mail = first_value(&e, MAIL_ATTRIBUTE);
                    (e.dn, (None, mail))
                })
                .collect();
            matches.insert(users[0].clone(), dns);
        } else if let Some(attr) = &self.key_attribute {
            // Which requested name each entry answers: compare the key attribute's values the way
            // directories compare names (case-insensitively, trimmed).
            let mut wanted: HashMap<String, Vec<&String>> = HashMap::new();
            for u in users {
                wanted.entry(fold(u)).or_default().push(u);
            }
            for entry in entries {
                let mail = first_value(&entry, MAIL_ATTRIBUTE);
                let values = entry
                    .attrs
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(attr))
                    .flat_map(|(_, v)| v.iter());
                for value in values {
                    for u in wanted.get(&fold(value)).into_iter().flatten() {
                        matches
                            .entry((*u).clone())
                            .or_default()
                            .insert(entry.dn.clone(), (Some(value.clone()), mail.clone()));
                    }
                }
            }
        }
        Ok(users
            .iter()
            .map(|u| {
                let dns = matches.remove(u).unwrap_or_default();
                let count = dns.len();
                let lookup = match dns.into_iter().next() {
                    None => UserLookup::NotFound,
                    Some((dn, (account, mail))) if count == 1 => {
                        UserLookup::Found { dn, account, mail }
                    }
                    Some(_) => UserLookup::Ambiguous { count },
                };
                (u.clone(), lookup)
            })
            .collect())
    }

    async fn paged_search(
        &mut self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: Vec<String>,
    ) -> Result<Vec<SearchEntry>, DirectoryError> {
        let err = |message: String| DirectoryError::Search {
            base: base.to_string(),
            message,
        };
        let page = i32::try_from(self.cfg.page_size).unwrap_or(i32::MAX);
        let adapters: Vec<Box<dyn Adapter<_, _>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(page)),
        ];
        self.operations += 1;
        let mut stream = self
            .ldap
            .streaming_search_with(adapters, base, scope, filter, attrs)
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut entries = Vec::new();
        while let Some(entry) = stream.next().await.map_err(|e| err(e.to_string()))? {
            entries.push(SearchEntry::construct(entry));
            if entries.len() % page.max(1) as usize == 0 {
                self.operations += 1;
            }
        }
        let result = stream.finish().await;
        if result.rc == RC_NO_SUCH_OBJECT {
            return Err(err(format!("the base {base} does not exist")));
        }
        if result.rc != 0 {
            return Err(err(format!("result code {}: {}", result.rc, result.text)));
        }
        Ok(entries)
    }

    /// Reads every value of the member attribute of `group` (one search; following value
    /// ranges if the server returns them).
    pub async fn read_members(&mut self, group: &str) -> Result<Vec<String>, DirectoryError> {
        let attr = self.cfg.member_attribute.name().to_string();
        let mut values = Vec::new();
        let mut request = attr.clone();
        loop {
            self.operations += 1;
            let result = self
                .ldap
                .search(group, Scope::Base, "(objectClass=*)", vec![request.clone()])
                .await
                .map_err(|e| DirectoryError::Search {
                    base: group.to_string(),
                    message: e.to_string(),
                })?;
            if result.1.rc == RC_NO_SUCH_OBJECT {
                return Err(DirectoryError::GroupMissing {
                    group: group.to_string(),
                });
            }
            if result.1.rc != 0 {
                return Err(DirectoryError::Search {
                    base: group.to_string(),
                    message: format!("result code {}: {}", result.1.rc, result.1.text),
                });
            }
            let Some(entry) = result.0.into_iter().next().map(SearchEntry::construct) else {
                return Err(DirectoryError::GroupMissing {
                    group: group.to_string(),
                });
            };
            let mut next = None;
            for (name, vals) in entry.attrs {
                let lower = name.to_ascii_lowercase();
                let prefix = format!("{};range=", attr.to_ascii_lowercase());
                if lower == attr.to_ascii_lowercase() {
                    values.extend(vals);
                } else if let Some(range) = lower.strip_prefix(&prefix) {
                    values.extend(vals);
                    // `low-high` means more follow; `low-*` is the last range.
                    if let Some((_, high)) = range.split_once('-')
                        && let Ok(high) = high.parse::<u64>()
                    {
                        next = Some(format!("{attr};range={}-*", high + 1));
                    }
                }
            }
            match next {
                Some(n) => request = n,
                None => return Ok(values),
            }
        }
    }

    /// Adds or removes `values` in `group`'s member attribute, in modifies of at most
    /// [`MAX_VALUES_PER_MODIFY`] values. Adding a value that is there or removing one that is
    /// gone counts as success. If a removal would leave a group that must have a member empty,
    /// the configured `placeholder_member` is added in the same modify.
    ///
    /// When the server refuses a batch because of one value (say, a non-ASCII `memberUid`),
    /// the values are retried one by one so that one bad value does not block the others.
    /// Returns the values that failed (index into `values`, error); `Err` means the whole
    /// change failed (connection lost, no permission on the group).
    pub async fn change_members(
        &mut self,
        group: &str,
        change: MemberChange,
        values: &[String],
    ) -> Result<Vec<(usize, DirectoryError)>, DirectoryError> {
        let mut failed = Vec::new();
        for (n, chunk) in values.chunks(MAX_VALUES_PER_MODIFY).enumerate() {
            let offset = n * MAX_VALUES_PER_MODIFY;
            match self.change_chunk(group, change, chunk).await {
                Ok(()) => {}
                Err(ChunkError::Fatal(e)) => return Err(e),
                Err(ChunkError::Refused(e)) if chunk.len() == 1 => failed.push((offset, e)),
                Err(ChunkError::Refused(_)) => {
                    for (i, value) in chunk.iter().enumerate() {
                        match self
                            .change_chunk(group, change, std::slice::from_ref(value))
                            .await
                        {
                            Ok(()) => {}
                            Err(ChunkError::Fatal(e)) => return Err(e),
                            Err(ChunkError::Refused(e)) => failed.push((offset + i, e)),
                        }
                    }
                }
            }
        }
        Ok(failed)
    }

    async fn change_chunk(
        &mut self,
        group: &str,
        change: MemberChange,
        values: &[String],
    ) -> Result<(), ChunkError> {
        let refused = |message: String| {
            ChunkError::Refused(DirectoryError::Modify {
                group: group.to_string(),
                message,
            })
        };
        let mut values: Vec<String> = values.to_vec();
        let mut with_placeholder = false;
        // At most: one try, one after re-reading the group (rc 16/20), one with the placeholder.
        for _ in 0..3 {
            if values.is_empty() {
                return Ok(());
            }
            let rc = self
                .modify(group, change, &values, with_placeholder)
                .await
                .map_err(ChunkError::Fatal)?;
            match rc {
                (0, _) => return Ok(()),
                (RC_TYPE_OR_VALUE_EXISTS, _) | (RC_NO_SUCH_ATTRIBUTE, _) => {
                    // Some values were already (not) there: keep only those that still need the
                    // change. LDAP applies a modify all-or-nothing, so nothing was changed.
                    let attribute = self.cfg.member_attribute;
                    let current: BTreeSet<String> = self
                        .read_members(group)
                        .await
                        .map_err(ChunkError::Fatal)?
                        .iter()
                        .map(|v| crate::state::member_key(v, attribute))
                        .collect();
                    values.retain(|v| {
                        let present = current.contains(&crate::state::member_key(v, attribute));
                        match change {
                            MemberChange::Add => !present,
                            MemberChange::Remove => present,
                        }
                    });
                }
                (RC_OBJECT_CLASS_VIOLATION, text) if change == MemberChange::Remove => {
                    if self.cfg.placeholder_member.is_none() || with_placeholder {
                        return Err(refused(format!(
                            "the server refused to remove the last member ({text}); set [ldap] placeholder_member so the group keeps a placeholder member"
                        )));
                    }
                    with_placeholder = true;
                }
                (RC_INSUFFICIENT_ACCESS, text) | (RC_NO_SUCH_OBJECT, text) => {
                    // About the group, not a value: retrying value by value cannot help.
                    return Err(ChunkError::Fatal(DirectoryError::Modify {
                        group: group.to_string(),
                        message: format!("result code {}: {text}", rc.0),
                    }));
                }
                (code, text) => return Err(refused(format!("result code {code}: {text}"))),
            }
        }
        Err(refused(
            "the group kept changing while coursegate modified it; will retry next run".to_string(),
        ))
    }

    async fn modify(
        &mut self,
        group: &str,
        change: MemberChange,
        values: &[String],
        with_placeholder: bool,
    ) -> Result<(u32, String), DirectoryError> {
        let attr = self.cfg.member_attribute.name().to_string();
        let set: std::collections::HashSet<String> = values.iter().cloned().collect();
        let mut mods = Vec::new();
        if with_placeholder && let Some(p) = &self.cfg.placeholder_member {
            mods.push(Mod::Add(attr.clone(), [p.clone()].into_iter().collect()));
        }
        mods.push(match change {
            MemberChange::Add => Mod::Add(attr, set),
            MemberChange::Remove => Mod::Delete(attr, set),
        });
        self.operations += 1;
        let result = self.ldap.modify(group, mods).await;
        match result {
            Ok(r) => Ok((r.rc, r.text)),
            Err(LdapError::LdapResult { result }) => Ok((result.rc, result.text)),
            Err(e) => Err(DirectoryError::Modify {
                group: group.to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// A cheap liveness probe that works on every server: read the root DSE.
    pub async fn probe(&mut self) -> Result<(), DirectoryError> {
        self.operations += 1;
        let r = self
            .ldap
            .search("", Scope::Base, "(objectClass=*)", vec!["1.1"])
            .await
            .map_err(|e| DirectoryError::Search {
                base: "root DSE".to_string(),
                message: e.to_string(),
            })?;
        if r.1.rc != 0 {
            return Err(DirectoryError::Search {
                base: "root DSE".to_string(),
                message: format!("result code {}: {}", r.1.rc, r.1.text),
            });
        }
        Ok(())
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        let _ = self.ldap.unbind().await;
    }
}

fn fold(name: &str) -> String {
    name.trim().to_lowercase()
}

/// The attribute a filter compares with `{user}` in a plain equality `(attr={user})`, if the
/// placeholder appears exactly once and only there.
fn key_attribute(filter: &str) -> Option<String> {
    if filter.matches("{user}").count() != 1 {
        return None;
    }
    let end = filter.find("={user})")?;
    let start = filter[..end].rfind('(')? + 1;
    let attr = &filter[start..end];
    let valid = !attr.is_empty()
        && attr
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ';');
    valid.then(|| attr.to_string())
}

fn tls_config(cfg: &config::Ldap) -> Result<Arc<rustls::ClientConfig>, DirectoryError> {
    let err = |message: String| DirectoryError::Tls {
        url: cfg.url.clone(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(file) = &cfg.tls_ca_file {
        let pem = std::fs::read(file)
            .map_err(|e| err(format!("cannot read tls_ca_file {}: {e}", file.display())))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert =
                cert.map_err(|e| err(format!("tls_ca_file {} is not PEM: {e}", file.display())))?;
            roots
                .add(cert)
                .map_err(|e| err(format!("tls_ca_file {}: {e}", file.display())))?;
            added += 1;
        }
        if added == 0 {
            return Err(err(format!(
                "tls_ca_file {} contains no PEM certificate",
                file.display()
            )));
        }
    }
    // ring is pure Rust and needs no C toolchain; it lacks post-quantum key exchange, which
    // directory servers do not offer yet either.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An entry's account name (as the entry spells it) and mail address.
type EntryNames = (Option<String>, Option<String>);

/// The first value of `attr` (compared case-insensitively) in `entry`, if any.
fn first_value(entry: &SearchEntry, attr: &str) -> Option<String> {
    entry
        .attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .and_then(|(_, v)| v.first().cloned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_attribute_of_common_filters() {
        assert_eq!(key_attribute("(uid={user})").as_deref(), Some("uid"));
        assert_eq!(
            key_attribute(
                "(&(objectCategory=person)(sAMAccountName={user})(!(userAccountControl:1.2.840.113556.1.4.803:=2)))"
            )
            .as_deref(),
            Some("sAMAccountName")
        );
        assert_eq!(key_attribute("(|(uid={user})(mail={user}))"), None);
        assert_eq!(key_attribute("(cn=*{user}*)"), None);
    }
}
