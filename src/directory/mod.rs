//! The LDAP / Active Directory adapter: connect (TLS, bind), find users, read and change group
//! members.
//!
//! Every operation is batched so that a reconcile of tens of thousands of orders costs tens of
//! LDAP operations: users are resolved many at a time (their escaped filters OR-ed into one
//! paged search of `page_size` entries per page), each group's members are read with one search
//! (on Active Directory: one per `range_size` values, see [`range`]), and changes go out as one
//! modify per group and action carrying many values (bounded by [`MAX_VALUES_PER_MODIFY`] and
//! `range_size`).
//!
//! Active Directory is recognised by its root DSE (`supportedCapabilities` contains
//! [`AD_CAPABILITY`]; Samba's AD DC says the same), read once after the bind. Everything else
//! works the same on every server: the liveness probe reads the root DSE (Samba has no WhoAmI),
//! DNs are compared in a normal form ([`dn::normalize`]), and Active Directory's answers to
//! adding a member that is there (68) or removing one that is not (53) count as success like
//! OpenLDAP's (20, 16).

pub mod dn;
mod explain;
mod in_order;
mod member_of;
pub mod range;

pub use member_of::{MemberEntries, lookup};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Mod, Scope, SearchEntry};

use crate::config::{self, Secret};
use crate::plan::UserLookup;
use in_order::Ranked;

/// Values per modify operation: large batches, but below what Active Directory refuses
/// (ADMIN_LIMIT_EXCEEDED on very large modifies). A configured `range_size` below it lowers it
/// further, and a batch the server still finds too large is split in halves.
pub const MAX_VALUES_PER_MODIFY: usize = 1000;
/// Values per modify on other servers (OpenLDAP): adding values to a big group costs slapd time
/// in proportion to the values already there times the values added, so one large modify per
/// group converges several times faster than many small ones (`scripts/bench.sh`). 50,000 DNs
/// are about 2.5 MB, below slapd's default 4 MB limit on an authenticated request
/// (`sockbuf_max_incoming_auth`).
pub const MAX_VALUES_PER_MODIFY_ELSEWHERE: usize = 50_000;
/// `supportedCapabilities` value of Active Directory (LDAP_CAP_ACTIVE_DIRECTORY_OID), also
/// announced by Samba's AD DC.
pub const AD_CAPABILITY: &str = "1.2.840.113556.1.4.800";
/// Users resolved per search (their names OR-ed into one filter, see `batch_filter`).
pub const USERS_PER_SEARCH: usize = 500;

/// The attribute read with every user entry for the person's e-mail address.
pub const MAIL_ATTRIBUTE: &str = "mail";

// LDAP result codes (RFC 4511 appendix A) that the adapter handles.
const RC_COMPARE_FALSE: u32 = 5;
const RC_COMPARE_TRUE: u32 = 6;
const RC_STRONGER_AUTH_REQUIRED: u32 = 8;
const RC_ADMIN_LIMIT_EXCEEDED: u32 = 11;
const RC_NO_SUCH_ATTRIBUTE: u32 = 16;
const RC_TYPE_OR_VALUE_EXISTS: u32 = 20;
const RC_NO_SUCH_OBJECT: u32 = 32;
const RC_INVALID_CREDENTIALS: u32 = 49;
const RC_INSUFFICIENT_ACCESS: u32 = 50;
/// Active Directory's answer to removing a member that is not there (WILL_NOT_PERFORM).
const RC_UNWILLING_TO_PERFORM: u32 = 53;
const RC_OBJECT_CLASS_VIOLATION: u32 = 65;
/// Active Directory's answer to adding a member that is there (ENTRY_EXISTS).
const RC_ALREADY_EXISTS: u32 = 68;

/// How one modify batch failed.
enum ChunkError {
    /// The server refused this batch (maybe because of one value): worth retrying per value.
    Refused(DirectoryError),
    /// The server found the batch too large (adminLimitExceeded): worth retrying in halves.
    TooLarge(DirectoryError),
    /// The connection or the group itself is the problem: stop.
    Fatal(DirectoryError),
}

/// How one attempt to read a group's members failed.
enum ReadError {
    /// The group changed between two range reads; reading again from the start may succeed.
    Shifted(DirectoryError),
    Failed(DirectoryError),
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
    /// The change was sent but no answer came (timeout, connection lost): the server may or may
    /// not have made it. Only a later look at the directory can tell.
    #[error(
        "no answer to a change of the members of {group} ({message}); whether the directory made \
         it is unknown until the next run checks it"
    )]
    InDoubt { group: String, message: String },
}

impl DirectoryError {
    /// Whether a change may have been made although it failed (see [`DirectoryError::InDoubt`]).
    pub fn in_doubt(&self) -> bool {
        matches!(self, DirectoryError::InDoubt { .. })
    }
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
            DirectoryError::InDoubt { .. } => "modify_in_doubt",
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
    /// The server announced Active Directory's capability: members are read in explicit ranges.
    active_directory: bool,
    /// Shared with the handles [`Directory::beside`] makes.
    operations: Arc<AtomicU64>,
}

impl Directory {
    /// Connects, upgrades with StartTLS if configured, binds, and reads the root DSE to learn
    /// whether the server is Active Directory.
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
            .map_err(|e| {
                match explain::certificate_problem(&e, &url, cfg.tls_ca_file.as_deref()) {
                    Some(message) => DirectoryError::Tls {
                        url: url.clone(),
                        message,
                    },
                    None => DirectoryError::Connect {
                        url: url.clone(),
                        message: e.to_string(),
                    },
                }
            })?;
        ldap3::drive!(conn);
        ldap.with_timeout(cfg.timeout);
        let mut operations = 0;
        if let (Some(dn), Some(pw)) = (&cfg.bind_dn, password) {
            let plain = !lower.starts_with("ldaps://") && !cfg.starttls;
            if plain && !config::is_loopback_url(&url) {
                // Only reachable with allow_insecure_bind = true (config validation refuses it).
                tracing::warn!(url = %url, "binding with a password over an unencrypted ldap:// connection (allow_insecure_bind = true)");
            }
            operations += 1;
            let result =
                ldap.simple_bind(dn, pw.expose())
                    .await
                    .map_err(|e| DirectoryError::Bind {
                        dn: dn.clone(),
                        message: e.to_string(),
                    })?;
            if result.rc != 0 {
                let message = match result.rc {
                    RC_STRONGER_AUTH_REQUIRED => {
                        explain::stronger_auth_required(&url, &result.text)
                    }
                    RC_INVALID_CREDENTIALS => explain::invalid_credentials(
                        cfg.bind_password_file.as_deref(),
                        &result.text,
                    ),
                    rc => format!("result code {rc}: {}", result.text),
                };
                return Err(DirectoryError::Bind {
                    dn: dn.clone(),
                    message,
                });
            }
        }
        let mut dir = Directory {
            ldap,
            key_attribute: key_attribute(&cfg.user_filter),
            active_directory: false,
            cfg: cfg.clone(),
            operations: Arc::new(AtomicU64::new(operations)),
        };
        // A root DSE that cannot be read (some servers hide it) just means "not Active
        // Directory": members are then read in one search that follows any ranges returned.
        match dir.root_dse(vec!["supportedCapabilities"]).await {
            Ok(Some(entry)) => {
                dir.active_directory = entry
                    .attrs
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case("supportedCapabilities"))
                    .flat_map(|(_, v)| v)
                    .any(|v| v.trim() == AD_CAPABILITY);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(url = %url, "root DSE not readable, assuming a server other than Active Directory: {e}")
            }
        }
        if dir.active_directory
            && !cfg
                .user_filter
                .to_ascii_lowercase()
                .contains("useraccountcontrol")
        {
            tracing::warn!(
                user_filter = %cfg.user_filter,
                "the directory is Active Directory, and user_filter does not leave out disabled accounts: add (!(userAccountControl:1.2.840.113556.1.4.803:=2)) so that disabling an account takes its access away"
            );
        }
        tracing::debug!(
            url = %url,
            active_directory = dir.active_directory,
            range_size = cfg.range_size,
            page_size = cfg.page_size,
            "connected to the directory"
        );
        Ok(dir)
    }

    /// Whether the server announced Active Directory's capability in its root DSE (so group
    /// members are read in explicit ranges of `range_size` values).
    pub fn is_active_directory(&self) -> bool {
        self.active_directory
    }

    /// How many LDAP operations this connection has issued (bind, searches, pages, modifies).
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::Relaxed)
    }

    /// Another handle on the same connection and session, for an operation that runs beside
    /// this handle's (LDAP answers each request by its message id). Operations are counted
    /// together.
    pub fn beside(&self) -> Directory {
        Directory {
            ldap: self.ldap.clone(),
            cfg: self.cfg.clone(),
            key_attribute: self.key_attribute.clone(),
            active_directory: self.active_directory,
            operations: Arc::clone(&self.operations),
        }
    }

    fn count_operation(&self) {
        self.operations.fetch_add(1, Ordering::Relaxed);
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
        let template = &self.cfg.user_filter;
        let filter = match users {
            [user] => dn::user_filter(template, user),
            _ => self
                .key_attribute
                .as_deref()
                .and_then(|attr| batch_filter(template, attr, users))
                .unwrap_or_else(|| {
                    let filters: Vec<String> =
                        users.iter().map(|u| dn::user_filter(template, u)).collect();
                    format!("(|{})", filters.concat())
                }),
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
        let entries = self
            .paged_search_at_most(base, scope, filter, attrs, usize::MAX)
            .await?;
        Ok(entries.unwrap_or_default())
    }

    /// [`Directory::paged_search`] that gives up (abandons the search) and returns `None` as
    /// soon as more than `limit` entries come back.
    async fn paged_search_at_most(
        &mut self,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: Vec<String>,
        limit: usize,
    ) -> Result<Option<Vec<SearchEntry>>, DirectoryError> {
        let err = |message: String| DirectoryError::Search {
            base: base.to_string(),
            message,
        };
        let page = i32::try_from(self.cfg.page_size).unwrap_or(i32::MAX);
        let adapters: Vec<Box<dyn Adapter<_, _>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(page)),
        ];
        self.count_operation();
        let mut stream = self
            .timed()
            .streaming_search_with(adapters, base, scope, filter, attrs)
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut entries = Vec::new();
        while let Some(entry) = stream.next().await.map_err(|e| err(e.to_string()))? {
            if entries.len() == limit {
                let _ = stream.finish().await;
                let id = stream.ldap_handle().last_id();
                let _ = stream.ldap_handle().abandon(id).await;
                return Ok(None);
            }
            entries.push(SearchEntry::construct(entry));
            if entries.len() % page.max(1) as usize == 0 {
                self.count_operation();
            }
        }
        let result = stream.finish().await;
        if result.rc == RC_NO_SUCH_OBJECT {
            return Err(err(format!("the base {base} does not exist")));
        }
        if result.rc != 0 {
            return Err(err(format!("result code {}: {}", result.rc, result.text)));
        }
        Ok(Some(entries))
    }

    /// Reads every value of the member attribute of `group`. On Active Directory in explicit
    /// ranges of `range_size` values (`member;range=0-99`, `member;range=100-199`, … until the
    /// server answers with a range ending in `*`); elsewhere with one search that follows any
    /// ranges the server returns. A group that changes between two range reads is read once
    /// more from the start; a read that cannot be shown complete is an error, never a short
    /// list.
    pub async fn read_members(&mut self, group: &str) -> Result<Vec<String>, DirectoryError> {
        match self.read_members_once(group).await {
            Ok(values) => Ok(values),
            Err(ReadError::Failed(e)) => Err(e),
            Err(ReadError::Shifted(e)) => {
                tracing::debug!(group = %group, "group changed while its members were read, reading again: {e}");
                match self.read_members_once(group).await {
                    Ok(values) => Ok(values),
                    Err(ReadError::Failed(e) | ReadError::Shifted(e)) => Err(e),
                }
            }
        }
    }

    async fn read_members_once(&mut self, group: &str) -> Result<Vec<String>, ReadError> {
        let attr = self.cfg.member_attribute.name().to_string();
        let step = u64::from(self.cfg.range_size.max(1));
        let search_error = |message: String| DirectoryError::Search {
            base: group.to_string(),
            message,
        };
        let mut values = Vec::new();
        let mut low = 0u64;
        loop {
            let request = match (self.active_directory, low) {
                (true, _) => range::request(&attr, low, step),
                (false, 0) => attr.clone(),
                (false, _) => range::request_rest(&attr, low),
            };
            let entry = self
                .read_entry(group, vec![request.clone()])
                .await
                .map_err(ReadError::Failed)?
                .ok_or_else(|| {
                    ReadError::Failed(DirectoryError::GroupMissing {
                        group: group.to_string(),
                    })
                })?;
            let mut returned: Option<range::Range> = None;
            for (name, vals) in entry.attrs {
                if name.eq_ignore_ascii_case(&attr) {
                    values.extend(vals);
                    continue;
                }
                match range::parse(&attr, &name) {
                    None => {}
                    Some(Err(e)) => return Err(ReadError::Failed(search_error(e))),
                    Some(Ok(r)) if r.low != low => {
                        return Err(ReadError::Failed(search_error(format!(
                            "asked for {request}, the server returned {name}"
                        ))));
                    }
                    Some(Ok(r)) => {
                        values.extend(vals);
                        returned = Some(r);
                    }
                }
            }
            match returned.map(|r| r.end) {
                Some(range::RangeEnd::Upto(high)) => low = high + 1,
                Some(range::RangeEnd::Last) => return Ok(values),
                // The whole attribute at once, or no values at all.
                None if low == 0 => return Ok(values),
                // The previous range said more would follow, and now there are none: values
                // were removed meanwhile, so some of those read may have moved.
                None => {
                    return Err(ReadError::Shifted(search_error(format!(
                        "the server returned nothing for {request} after announcing more values"
                    ))));
                }
            }
        }
    }

    /// Reads one entry with the given attributes; `None` if it does not exist.
    async fn read_entry(
        &mut self,
        dn: &str,
        attrs: Vec<String>,
    ) -> Result<Option<SearchEntry>, DirectoryError> {
        let base = if dn.is_empty() { "root DSE" } else { dn };
        let err = |message: String| DirectoryError::Search {
            base: base.to_string(),
            message,
        };
        self.count_operation();
        let ldap3::SearchResult(entries, result) = self
            .timed()
            .search(dn, Scope::Base, "(objectClass=*)", attrs)
            .await
            .map_err(|e| err(e.to_string()))?;
        match result.rc {
            0 => Ok(entries.into_iter().next().map(SearchEntry::construct)),
            RC_NO_SUCH_OBJECT => Ok(None),
            rc => Err(err(format!("result code {rc}: {}", result.text))),
        }
    }

    async fn root_dse(&mut self, attrs: Vec<&str>) -> Result<Option<SearchEntry>, DirectoryError> {
        self.read_entry("", attrs.into_iter().map(String::from).collect())
            .await
    }

    /// How many values go into one modify. On Active Directory [`MAX_VALUES_PER_MODIFY`], or
    /// `range_size` if that is smaller (an AD whose MaxValRange was lowered takes smaller
    /// modifies too); elsewhere [`MAX_VALUES_PER_MODIFY_ELSEWHERE`].
    pub fn values_per_modify(&self) -> usize {
        if !self.active_directory {
            return MAX_VALUES_PER_MODIFY_ELSEWHERE;
        }
        MAX_VALUES_PER_MODIFY
            .min(usize::try_from(self.cfg.range_size).unwrap_or(usize::MAX))
            .max(1)
    }

    /// Adds or removes `values` in `group`'s member attribute, in modifies of at most
    /// [`Directory::values_per_modify`] values; never a `replace` of the attribute. Adding a
    /// value that is there or removing one that is gone counts as success. If a removal would
    /// leave a group that must have a member empty, the configured `placeholder_member` is added
    /// in the same modify.
    ///
    /// A batch the server finds too large (adminLimitExceeded) is split in halves. When the
    /// server refuses a batch because of one value (say, a non-ASCII `memberUid`, or a DN that
    /// names no entry on Active Directory), the values are retried one by one so that one bad
    /// value does not block the others. Returns the values that failed (index into `values`,
    /// error), in order; `Err` means the whole change failed (connection lost, no permission on
    /// the group, the group is gone).
    pub async fn change_members(
        &mut self,
        group: &str,
        change: MemberChange,
        values: &[String],
    ) -> Result<Vec<(usize, DirectoryError)>, DirectoryError> {
        let size = self.values_per_modify();
        let mut failed = Vec::new();
        // (offset, length) of the batches still to send, the next one last.
        let mut pending: Vec<(usize, usize)> = (0..values.len())
            .step_by(size)
            .map(|offset| (offset, size.min(values.len() - offset)))
            .rev()
            .collect();
        while let Some((offset, len)) = pending.pop() {
            let chunk = &values[offset..offset + len];
            match self.change_chunk(group, change, chunk).await {
                Ok(()) => {}
                Err(ChunkError::Fatal(e)) => return Err(e),
                Err(ChunkError::Refused(e) | ChunkError::TooLarge(e)) if len == 1 => {
                    failed.push((offset, e));
                }
                Err(ChunkError::TooLarge(e)) => {
                    tracing::debug!(group = %group, values = len, "batch too large for the server, splitting it: {e}");
                    let half = len / 2;
                    pending.push((offset + half, len - half));
                    pending.push((offset, half));
                }
                Err(ChunkError::Refused(_)) => {
                    pending.extend((offset..offset + len).rev().map(|i| (i, 1)));
                }
            }
        }
        failed.sort_by_key(|(i, _)| *i);
        Ok(failed)
    }

    async fn change_chunk(
        &mut self,
        group: &str,
        change: MemberChange,
        values: &[String],
    ) -> Result<(), ChunkError> {
        let modify_error = |rc: u32, text: &str| DirectoryError::Modify {
            group: group.to_string(),
            message: format!("result code {rc}: {text}"),
        };
        let mut values: Vec<String> = values.to_vec();
        let mut with_placeholder = false;
        // At most: one try, one after re-reading the group (some values were already (not)
        // there), one with the placeholder.
        for _ in 0..3 {
            if values.is_empty() {
                return Ok(());
            }
            let (rc, text) = self
                .modify(group, change, &values, with_placeholder)
                .await
                .map_err(ChunkError::Fatal)?;
            let already = match change {
                MemberChange::Add => matches!(rc, RC_TYPE_OR_VALUE_EXISTS | RC_ALREADY_EXISTS),
                MemberChange::Remove => {
                    matches!(rc, RC_NO_SUCH_ATTRIBUTE | RC_UNWILLING_TO_PERFORM)
                }
            };
            match rc {
                0 => return Ok(()),
                _ if already => {
                    // Some values may already be (not) there: keep only those that still need
                    // the change. LDAP applies a modify all-or-nothing, so nothing was changed.
                    let attribute = self.cfg.member_attribute;
                    let current: BTreeSet<String> = self
                        .read_members(group)
                        .await
                        .map_err(ChunkError::Fatal)?
                        .iter()
                        .map(|v| crate::state::member_key(v, attribute))
                        .collect();
                    let before = values.len();
                    values.retain(|v| {
                        let present = current.contains(&crate::state::member_key(v, attribute));
                        match change {
                            MemberChange::Add => !present,
                            MemberChange::Remove => present,
                        }
                    });
                    if values.len() == before {
                        // Every value still needs the change: the refusal is about something
                        // else (53 has other meanings on Active Directory).
                        return Err(ChunkError::Refused(modify_error(rc, &text)));
                    }
                }
                RC_OBJECT_CLASS_VIOLATION if change == MemberChange::Remove => {
                    if self.cfg.placeholder_member.is_none() || with_placeholder {
                        return Err(ChunkError::Refused(DirectoryError::Modify {
                            group: group.to_string(),
                            message: format!(
                                "the server refused to remove the last member ({text}); set [ldap] placeholder_member so the group keeps a placeholder member"
                            ),
                        }));
                    }
                    with_placeholder = true;
                }
                RC_ADMIN_LIMIT_EXCEEDED => {
                    return Err(ChunkError::TooLarge(modify_error(rc, &text)));
                }
                // About the group, not a value: retrying value by value cannot help.
                RC_INSUFFICIENT_ACCESS => return Err(ChunkError::Fatal(modify_error(rc, &text))),
                RC_NO_SUCH_OBJECT => {
                    // Either the group is gone, or (Active Directory checks `member` values)
                    // a value names an entry that does not exist.
                    let exists = self
                        .read_entry(group, vec!["1.1".to_string()])
                        .await
                        .map_err(ChunkError::Fatal)?
                        .is_some();
                    return Err(if exists {
                        ChunkError::Refused(modify_error(rc, &text))
                    } else {
                        ChunkError::Fatal(DirectoryError::GroupMissing {
                            group: group.to_string(),
                        })
                    });
                }
                rc => return Err(ChunkError::Refused(modify_error(rc, &text))),
            }
        }
        Err(ChunkError::Refused(DirectoryError::Modify {
            group: group.to_string(),
            message: "the group kept changing while coursegate modified it; will retry next run"
                .to_string(),
        }))
    }

    async fn modify(
        &mut self,
        group: &str,
        change: MemberChange,
        values: &[String],
        with_placeholder: bool,
    ) -> Result<(u32, String), DirectoryError> {
        let attr = Ranked::plain(self.cfg.member_attribute.name());
        let set = in_order::in_order(values);
        let mut mods = Vec::new();
        if with_placeholder && let Some(p) = &self.cfg.placeholder_member {
            mods.push(Mod::Add(attr.clone(), [Ranked::plain(p)].into()));
        }
        mods.push(match change {
            MemberChange::Add => Mod::Add(attr, set),
            MemberChange::Remove => Mod::Delete(attr, set),
        });
        self.count_operation();
        // The server's work grows with the values (memberof updates each member's entry): the
        // bound grows with them, 1 ms per value, so that a large batch is not cut off while the
        // server is still working on it.
        let values = u64::try_from(values.len()).unwrap_or(u64::MAX);
        self.ldap
            .with_timeout(self.cfg.timeout + std::time::Duration::from_millis(values));
        let result = self.ldap.modify(group, mods).await;
        match result {
            Ok(r) => Ok((r.rc, r.text)),
            Err(LdapError::LdapResult { result }) => Ok((result.rc, result.text)),
            // Sent, but no answer: the server may have made the change.
            Err(e) => Err(DirectoryError::InDoubt {
                group: group.to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Whether `group` has `value` in its member attribute, asked with one compare operation
    /// (the server applies the attribute's matching rule: DN or case-insensitive name). For the
    /// daemon's quick pass, which must not read whole groups for one new order. A group that
    /// does not exist, or any other answer than true or false, is an error.
    pub async fn has_member(&mut self, group: &str, value: &str) -> Result<bool, DirectoryError> {
        let attr = self.cfg.member_attribute.name().to_string();
        let err = |message: String| DirectoryError::Search {
            base: group.to_string(),
            message,
        };
        self.count_operation();
        let result = self
            .timed()
            .compare(group, &attr, value)
            .await
            .map_err(|e| err(e.to_string()))?;
        match result.0.rc {
            RC_COMPARE_TRUE => Ok(true),
            RC_COMPARE_FALSE => Ok(false),
            RC_NO_SUCH_OBJECT => Err(DirectoryError::GroupMissing {
                group: group.to_string(),
            }),
            rc => Err(err(format!("compare: result code {rc}: {}", result.0.text))),
        }
    }

    /// The connection with the configured timeout armed: ldap3 applies a timeout to the next
    /// operation only, so every operation goes through here.
    fn timed(&mut self) -> &mut Ldap {
        self.ldap.with_timeout(self.cfg.timeout);
        &mut self.ldap
    }

    /// A cheap liveness probe that works on every server: read the root DSE. (Not WhoAmI:
    /// Samba's AD DC answers that extended operation with "Protocol error".)
    pub async fn probe(&mut self) -> Result<(), DirectoryError> {
        self.root_dse(vec!["1.1"]).await.map(|_| ())
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        let _ = self.timed().unbind().await;
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

/// The filter that finds all of `users` in one search: the template with its `(attr={user})`
/// replaced by `(|(attr=u1)(attr=u2)…)`. Because the placeholder appears once and not under a
/// `!`, this matches exactly the entries the users' own filters match, OR-ed together — and
/// servers evaluate it far faster (Samba's AD DC: 0.08 s instead of 1.1 s for 500 users with
/// the recommended AD filter, which it cannot serve from an index when each user's copy of it
/// is OR-ed). `None` when the placeholder is under a negation.
fn batch_filter(template: &str, attr: &str, users: &[String]) -> Option<String> {
    let atom = format!("({attr}={{user}})");
    let at = template.find(&atom)?;
    // Raw parentheses are filter structure (RFC 4515 escapes them in values as \28, \29).
    let mut negated: Vec<bool> = Vec::new();
    let bytes = template.as_bytes();
    for (i, &b) in bytes[..at].iter().enumerate() {
        match b {
            b'(' => negated.push(bytes.get(i + 1) == Some(&b'!')),
            b')' => {
                negated.pop();
            }
            _ => {}
        }
    }
    if negated.contains(&true) {
        return None;
    }
    let alternatives: String = users
        .iter()
        .map(|u| format!("({attr}={})", dn::escape_filter_value(u)))
        .collect();
    Some(format!(
        "{}(|{alternatives}){}",
        &template[..at],
        &template[at + atom.len()..]
    ))
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

    #[test]
    fn batch_filters_put_the_alternatives_where_the_placeholder_was() {
        let users = ["anna".to_string(), "a)(x=*".to_string()];
        assert_eq!(
            batch_filter("(uid={user})", "uid", &users).as_deref(),
            Some("(|(uid=anna)(uid=a\\29\\28x=\\2a))")
        );
        let ad = "(&(objectCategory=person)(sAMAccountName={user})(!(userAccountControl:1.2.840.113556.1.4.803:=2)))";
        assert_eq!(
            batch_filter(ad, "sAMAccountName", &users[..1]).as_deref(),
            Some(
                "(&(objectCategory=person)(|(sAMAccountName=anna))(!(userAccountControl:1.2.840.113556.1.4.803:=2)))"
            )
        );
        // Under a negation, OR-ing inside would change the meaning: not rewritten.
        assert_eq!(
            batch_filter("(&(objectClass=person)(!(!(uid={user}))))", "uid", &users),
            None
        );
        assert_eq!(
            batch_filter("(&(!(x=1))(uid={user}))", "uid", &users).as_deref(),
            Some("(&(!(x=1))(|(uid=anna)(uid=a\\29\\28x=\\2a)))")
        );
    }
}
