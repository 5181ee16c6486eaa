//! The configuration file (SPEC §4): its TOML schema, defaults and validation.
//!
//! Parsing is strict (`deny_unknown_fields`): a misspelt key is an error that names the file and
//! the key, never a silently ignored setting. Relative paths are resolved against the directory
//! of the config file; durations are humantime strings. Secrets are never part of the config:
//! only the path of the file that holds them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Default location of the config file.
pub const DEFAULT_PATH: &str = "/etc/coursegate/coursegate.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("cannot read secret file {path} (from config key `{key}`): {source}")]
    Secret {
        path: PathBuf,
        key: &'static str,
        source: std::io::Error,
    },
}

// === the validated configuration ===

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this config was read from.
    pub path: PathBuf,
    pub daemon: Daemon,
    pub ldap: Ldap,
    pub lms: Lms,
    pub courses: BTreeMap<String, Course>,
    pub access: BTreeMap<String, Profile>,
    pub orders: Option<Orders>,
    pub notify: Option<Notify>,
    pub ticket: Option<Ticket>,
    pub queue: Option<Queue>,
}

#[derive(Debug, Clone)]
pub struct Daemon {
    pub desired_dir: PathBuf,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    pub resync_interval: Duration,
    pub max_revocations_per_run: usize,
    pub max_revocation_ratio: Option<f64>,
    pub listen: Option<SocketAddr>,
}

/// How group members are stored: DN values (`member`, `uniqueMember`) or account names
/// (`memberUid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberAttribute {
    Member,
    UniqueMember,
    MemberUid,
}

impl MemberAttribute {
    pub fn name(self) -> &'static str {
        match self {
            MemberAttribute::Member => "member",
            MemberAttribute::UniqueMember => "uniqueMember",
            MemberAttribute::MemberUid => "memberUid",
        }
    }

    /// Whether values are DNs (compared as DNs) rather than account names.
    pub fn holds_dns(self) -> bool {
        !matches!(self, MemberAttribute::MemberUid)
    }
}

#[derive(Clone)]
pub struct Ldap {
    pub url: String,
    pub starttls: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub bind_dn: Option<String>,
    pub bind_password_file: Option<PathBuf>,
    pub user_base: String,
    pub user_filter: String,
    pub member_attribute: MemberAttribute,
    pub placeholder_member: Option<String>,
    pub page_size: u32,
    pub range_size: u32,
    pub timeout: Duration,
    /// Allow a password bind over plain `ldap://` to a host that is not loopback.
    pub allow_insecure_bind: bool,
}

impl fmt::Debug for Ldap {
    // Written out by hand so that nobody adds a secret here and gets it logged by accident.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ldap")
            .field("url", &self.url)
            .field("starttls", &self.starttls)
            .field("bind_dn", &self.bind_dn)
            .field("user_base", &self.user_base)
            .field("user_filter", &self.user_filter)
            .field("member_attribute", &self.member_attribute)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmsKind {
    Csv,
    Xlsx,
    Moodle,
    Canvas,
    Xapi,
}

impl LmsKind {
    /// The `kind` value as written in the config (also the metrics label and evidence prefix).
    pub fn name(self) -> &'static str {
        match self {
            LmsKind::Csv => "csv",
            LmsKind::Xlsx => "xlsx",
            LmsKind::Moodle => "moodle",
            LmsKind::Canvas => "canvas",
            LmsKind::Xapi => "xapi",
        }
    }

    /// Whether the course results come from an HTTP platform rather than a report file.
    pub fn is_http(self) -> bool {
        !matches!(self, LmsKind::Csv | LmsKind::Xlsx)
    }
}

#[derive(Debug, Clone)]
pub struct Lms {
    pub kind: LmsKind,
    /// The evidence source: `csv:lms/results.csv` (the path as written in the config) or
    /// `moodle:https://moodle.example.org` (the platform's URL).
    pub label: String,
    /// The results report (`csv`, `xlsx`); `None` for an HTTP platform.
    pub path: Option<PathBuf>,
    /// How to reach an HTTP platform (`moodle`, `canvas`, `xapi`); `None` for a report.
    pub http: Option<HttpLms>,
}

/// The connection and load settings of an HTTP learning platform.
#[derive(Debug, Clone)]
pub struct HttpLms {
    /// The platform's base URL, without a trailing `/`: the Moodle site, the Canvas instance, the
    /// xAPI LRS endpoint (the part before `statements`).
    pub url: String,
    pub credentials: HttpCredentials,
    /// xAPI: the agent template; `None` means `mbox` from the directory's `mail`.
    pub agent_account: Option<AgentAccount>,
    pub tls_ca_file: Option<PathBuf>,
    /// How long an answer is reused before the platform is asked again.
    pub cache_ttl: Duration,
    /// How long a pass that coursegate's own memberships rest on is reused.
    pub reverify_interval: Duration,
    /// Bound of each request (connect, send, read the whole answer).
    pub timeout: Duration,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Canvas: from this many users to ask about in one course, the course's bulk endpoints are
    /// read instead of one request per user.
    pub bulk_threshold: usize,
}

/// How coursegate proves who it is to the platform. Only file paths: the secret itself is read
/// by [`HttpCredentials::read`] when needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpCredentials {
    /// Moodle web service token (`wstoken`) or Canvas access token (Bearer), from `token_file`.
    Token { file: PathBuf },
    /// xAPI LRS Basic authentication: `username` and the password from `password_file`.
    Basic {
        username: String,
        password_file: PathBuf,
    },
}

/// The secret of [`HttpCredentials`], read from its file.
#[derive(Debug, Clone)]
pub enum HttpSecret {
    Token(Secret),
    Basic { username: String, password: Secret },
}

impl HttpCredentials {
    /// Reads the secret file (trailing newline ignored). The error names the file and the key.
    pub fn read(&self) -> Result<HttpSecret, ConfigError> {
        let (file, key) = match self {
            HttpCredentials::Token { file } => (file, "lms.token_file"),
            HttpCredentials::Basic { password_file, .. } => (password_file, "lms.password_file"),
        };
        let secret = read_secret(file, key)?;
        Ok(match self {
            HttpCredentials::Token { .. } => HttpSecret::Token(secret),
            HttpCredentials::Basic { username, .. } => HttpSecret::Basic {
                username: username.clone(),
                password: secret,
            },
        })
    }

    /// The secret file, for the one warning about its permissions.
    pub fn file(&self) -> (&Path, &'static str) {
        match self {
            HttpCredentials::Token { file } => (file, "lms.token_file"),
            HttpCredentials::Basic { password_file, .. } => (password_file, "lms.password_file"),
        }
    }
}

/// xAPI `account` agent: `home_page` as written, `name` with `{user}` replaced by the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAccount {
    pub home_page: String,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Course {
    pub title: String,
    pub lms_id: String,
    pub url: Option<String>,
    pub valid_for: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub title: String,
    pub group: String,
    pub courses: Vec<String>,
    pub exclusive: bool,
    pub revoke_on_lapse: bool,
    pub lapse_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Orders {
    /// Only orders from members of this group take effect (SPEC §4).
    pub allowed_orderers_group: Option<String>,
}

/// The language of the orderer notifications (and the template set used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Sv,
    En,
}

impl Language {
    pub fn code(self) -> &'static str {
        match self {
            Language::Sv => "sv",
            Language::En => "en",
        }
    }
}

/// `[notify]`: e-mail to the orderer.
#[derive(Debug, Clone)]
pub struct Notify {
    /// `smtp://host[:port]` (STARTTLS where offered, required when a password is sent to a host
    /// that is not loopback) or `smtps://host[:port]` (TLS from the start).
    pub smtp_url: String,
    pub from: String,
    pub language: Language,
    /// How long before `valid_until` the orderer is warned (default 14 days).
    pub expiry_warning: Duration,
    pub smtp_user: Option<String>,
    pub smtp_password_file: Option<PathBuf>,
    /// Extra CA (PEM) trusted for the SMTP server's certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// A directory with `<language>/<event>.txt` files that replace the shipped templates.
    pub templates_dir: Option<PathBuf>,
    /// Limit for one SMTP conversation.
    pub timeout: Duration,
}

/// `[ticket]`: updates to the ticket an order names.
#[derive(Debug, Clone)]
pub enum Ticket {
    /// Easit GO's REST import API.
    Easit {
        url: String,
        api_key_file: PathBuf,
        import_handler: String,
        timeout: Duration,
    },
    /// A JSON POST to any URL, signed with HMAC-SHA256 when `secret_file` is set.
    Webhook {
        url: String,
        secret_file: Option<PathBuf>,
        timeout: Duration,
    },
}

impl Ticket {
    pub fn url(&self) -> &str {
        match self {
            Ticket::Easit { url, .. } | Ticket::Webhook { url, .. } => url,
        }
    }

    pub fn timeout(&self) -> Duration {
        match self {
            Ticket::Easit { timeout, .. } | Ticket::Webhook { timeout, .. } => *timeout,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    smtp_url: String,
    from: String,
    #[serde(default = "default_language")]
    language: Language,
    #[serde(default, deserialize_with = "de_opt_duration")]
    expiry_warning: Option<Duration>,
    smtp_user: Option<String>,
    smtp_password_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
    templates_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTicket {
    kind: String,
    url: String,
    api_key_file: Option<PathBuf>,
    import_handler: Option<String>,
    secret_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    pub kind: String,
    pub url: String,
    pub stream: String,
    pub subject: String,
    pub durable: String,
    pub dead_letter_subject: Option<String>,
    /// NATS credentials (`.creds`) file, if the server wants one.
    pub credentials_file: Option<PathBuf>,
}

fn default_language() -> Language {
    Language::Sv
}

// === the raw TOML schema ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    ldap: RawLdap,
    lms: RawLms,
    #[serde(default)]
    courses: BTreeMap<String, RawCourse>,
    #[serde(default)]
    access: BTreeMap<String, RawProfile>,
    orders: Option<Orders>,
    notify: Option<RawNotify>,
    ticket: Option<RawTicket>,
    queue: Option<Queue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    #[serde(default = "default_desired_dir")]
    desired_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_audit_log")]
    audit_log: PathBuf,
    #[serde(default = "default_resync", deserialize_with = "de_duration")]
    resync_interval: Duration,
    #[serde(default = "default_max_revocations")]
    max_revocations_per_run: usize,
    max_revocation_ratio: Option<f64>,
    listen: Option<String>,
}

impl Default for RawDaemon {
    fn default() -> Self {
        RawDaemon {
            desired_dir: default_desired_dir(),
            state_dir: default_state_dir(),
            audit_log: default_audit_log(),
            resync_interval: default_resync(),
            max_revocations_per_run: default_max_revocations(),
            max_revocation_ratio: None,
            listen: None,
        }
    }
}

fn default_desired_dir() -> PathBuf {
    PathBuf::from("desired")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
fn default_audit_log() -> PathBuf {
    PathBuf::from("audit.jsonl")
}
fn default_resync() -> Duration {
    Duration::from_secs(300)
}
fn default_max_revocations() -> usize {
    25
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLdap {
    url: String,
    #[serde(default)]
    starttls: bool,
    tls_ca_file: Option<PathBuf>,
    bind_dn: Option<String>,
    bind_password_file: Option<PathBuf>,
    user_base: String,
    #[serde(default = "default_user_filter")]
    user_filter: String,
    #[serde(default = "default_member_attribute")]
    member_attribute: String,
    placeholder_member: Option<String>,
    #[serde(default = "default_page_size")]
    page_size: u32,
    #[serde(default = "default_range_size")]
    range_size: u32,
    #[serde(default = "default_ldap_timeout", deserialize_with = "de_duration")]
    timeout: Duration,
    #[serde(default)]
    allow_insecure_bind: bool,
}

fn default_user_filter() -> String {
    "(uid={user})".to_string()
}
fn default_member_attribute() -> String {
    "member".to_string()
}
fn default_page_size() -> u32 {
    1000
}
fn default_range_size() -> u32 {
    1500
}
fn default_ldap_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLms {
    kind: String,
    path: Option<PathBuf>,
    url: Option<String>,
    token_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    agent_account: Option<RawAgentAccount>,
    tls_ca_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    cache_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    reverify_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    timeout: Option<Duration>,
    concurrency: Option<usize>,
    bulk_threshold: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentAccount {
    #[serde(alias = "homePage")]
    home_page: String,
    name: String,
}

fn default_cache_ttl() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_reverify_interval() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_lms_timeout() -> Duration {
    Duration::from_secs(10)
}
const DEFAULT_LMS_CONCURRENCY: usize = 4;
const MAX_LMS_CONCURRENCY: usize = 64;
const DEFAULT_BULK_THRESHOLD: usize = 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCourse {
    title: Option<String>,
    lms_id: Option<String>,
    url: Option<String>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    valid_for: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    title: Option<String>,
    group: String,
    #[serde(default)]
    courses: Vec<String>,
    #[serde(default)]
    exclusive: bool,
    #[serde(default)]
    revoke_on_lapse: bool,
    #[serde(default, deserialize_with = "de_opt_duration")]
    lapse_grace: Option<Duration>,
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Parses a humantime duration (`"90s"`, `"5m"`, `"2y"`), with an error that shows the value.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like \"90s\", \"5m\" or \"2y\": {e}"))
}

// === loading and validation ===

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(path, &text)
    }

    /// Parses and validates config text; `path` names the file in errors and anchors relative
    /// paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        // Absolute, so that what the daemon watches compares equal to the paths its file
        // events carry (a relative `-c coursegate.toml` once made every event look foreign).
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let daemon = validate_daemon(raw.daemon, &resolve, &invalid)?;
        let ldap = validate_ldap(raw.ldap, &resolve, &invalid)?;
        let lms = validate_lms(raw.lms, &resolve, &invalid)?;

        let mut courses = BTreeMap::new();
        for (key, c) in raw.courses {
            check_name(&key).map_err(|m| invalid(&format!("courses.{key}"), m))?;
            courses.insert(
                key.clone(),
                Course {
                    title: c.title.unwrap_or_else(|| key.clone()),
                    lms_id: c.lms_id.unwrap_or_else(|| key.clone()),
                    url: c.url,
                    valid_for: c.valid_for,
                },
            );
        }

        check_lms_ids(&lms, &courses, &invalid)?;

        if raw.access.is_empty() {
            return Err(invalid(
                "access",
                "no access profiles: add at least one [access.<name>] section".to_string(),
            ));
        }
        let mut access = BTreeMap::new();
        for (key, p) in raw.access {
            let k = format!("access.{key}");
            check_name(&key).map_err(|m| invalid(&k, m))?;
            if p.group.trim().is_empty() || !p.group.contains('=') {
                return Err(invalid(
                    &format!("{k}.group"),
                    format!("`{}` is not a group DN", p.group),
                ));
            }
            for course in &p.courses {
                if !courses.contains_key(course) {
                    return Err(invalid(
                        &format!("{k}.courses"),
                        format!("course `{course}` has no [courses.{course}] section"),
                    ));
                }
            }
            access.insert(
                key.clone(),
                Profile {
                    title: p.title.unwrap_or_else(|| key.clone()),
                    group: p.group,
                    courses: p.courses,
                    exclusive: p.exclusive,
                    revoke_on_lapse: p.revoke_on_lapse,
                    lapse_grace: p.lapse_grace.unwrap_or(Duration::from_secs(30 * 24 * 3600)),
                },
            );
        }

        if let Some(group) = raw
            .orders
            .as_ref()
            .and_then(|o| o.allowed_orderers_group.as_ref())
            && (group.trim().is_empty() || !group.contains('='))
        {
            return Err(invalid(
                "orders.allowed_orderers_group",
                format!("`{group}` is not a group DN"),
            ));
        }
        let notify = raw
            .notify
            .map(|n| validate_notify(n, &resolve, &invalid))
            .transpose()?;
        let ticket = raw
            .ticket
            .map(|t| validate_ticket(t, &resolve, &invalid))
            .transpose()?;

        Ok(Config {
            path: path.to_path_buf(),
            daemon,
            ldap,
            lms,
            courses,
            access,
            orders: raw.orders,
            notify,
            ticket,
            queue: match raw.queue {
                Some(q) if q.kind != "nats" => {
                    return Err(invalid(
                        "queue.kind",
                        format!("`{}` is not supported; use \"nats\"", q.kind),
                    ));
                }
                Some(mut q) => {
                    q.credentials_file = q.credentials_file.as_deref().map(&resolve);
                    Some(q)
                }
                None => None,
            },
        })
    }

    /// Reads the LDAP bind password from `bind_password_file`; `None` means anonymous bind.
    pub fn bind_password(&self) -> Result<Option<Secret>, ConfigError> {
        self.ldap
            .bind_password_file
            .as_deref()
            .map(|file| read_secret(file, "ldap.bind_password_file"))
            .transpose()
    }
}

/// Reads a secret from `file` (named in errors by its config `key`). A trailing newline from
/// `echo` or an editor is not part of the secret.
pub fn read_secret(file: &Path, key: &'static str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Secret {
        path: file.to_path_buf(),
        key,
        source,
    })?;
    warn_if_readable_by_others(file, key);
    Ok(Secret(text.trim_end_matches(['\n', '\r']).to_string()))
}

fn validate_notify(
    raw: RawNotify,
    resolve: &impl Fn(&Path) -> PathBuf,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<Notify, ConfigError> {
    let scheme = raw.smtp_url.split("://").next().unwrap_or_default();
    if !matches!(scheme, "smtp" | "smtps") || !raw.smtp_url.contains("://") {
        return Err(invalid(
            "notify.smtp_url",
            format!(
                "`{}` is not an smtp:// or smtps:// URL (e.g. \"smtp://mail.example.org:587\")",
                raw.smtp_url
            ),
        ));
    }
    if let Err(e) = raw.from.parse::<lettre::message::Mailbox>() {
        return Err(invalid(
            "notify.from",
            format!("`{}` is not an e-mail address: {e}", raw.from),
        ));
    }
    if raw.smtp_user.is_some() != raw.smtp_password_file.is_some() {
        return Err(invalid(
            "notify.smtp_user",
            "smtp_user and smtp_password_file go together: set both or neither".to_string(),
        ));
    }
    Ok(Notify {
        smtp_url: raw.smtp_url,
        from: raw.from,
        language: raw.language,
        expiry_warning: raw
            .expiry_warning
            .unwrap_or(Duration::from_secs(14 * 24 * 3600)),
        smtp_user: raw.smtp_user,
        smtp_password_file: raw.smtp_password_file.as_deref().map(resolve),
        tls_ca_file: raw.tls_ca_file.as_deref().map(resolve),
        templates_dir: raw.templates_dir.as_deref().map(resolve),
        timeout: raw.timeout.unwrap_or(Duration::from_secs(30)),
    })
}

fn validate_ticket(
    raw: RawTicket,
    resolve: &impl Fn(&Path) -> PathBuf,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<Ticket, ConfigError> {
    if !(raw.url.starts_with("http://") || raw.url.starts_with("https://")) {
        return Err(invalid(
            "ticket.url",
            format!("`{}` is not an http:// or https:// URL", raw.url),
        ));
    }
    let url = raw.url.trim_end_matches('/').to_string();
    let timeout = raw.timeout.unwrap_or(Duration::from_secs(30));
    match raw.kind.as_str() {
        "easit" => {
            let Some(api_key_file) = raw.api_key_file else {
                return Err(invalid(
                    "ticket.api_key_file",
                    "kind = \"easit\" needs the file with Easit GO's API key".to_string(),
                ));
            };
            let Some(import_handler) = raw.import_handler else {
                return Err(invalid(
                    "ticket.import_handler",
                    "kind = \"easit\" needs the identifier of the import handler".to_string(),
                ));
            };
            if raw.secret_file.is_some() {
                return Err(invalid(
                    "ticket.secret_file",
                    "belongs to kind = \"webhook\"; Easit uses api_key_file".to_string(),
                ));
            }
            Ok(Ticket::Easit {
                url,
                api_key_file: resolve(&api_key_file),
                import_handler,
                timeout,
            })
        }
        "webhook" => {
            if raw.api_key_file.is_some() || raw.import_handler.is_some() {
                return Err(invalid(
                    "ticket.api_key_file",
                    "api_key_file and import_handler belong to kind = \"easit\"".to_string(),
                ));
            }
            Ok(Ticket::Webhook {
                url,
                secret_file: raw.secret_file.as_deref().map(resolve),
                timeout,
            })
        }
        other => Err(invalid(
            "ticket.kind",
            format!("`{other}` is not one of \"easit\", \"webhook\""),
        )),
    }
}

/// Secrets belong to the service alone: warn when group or others may read the file.
pub fn warn_if_readable_by_others(file: &Path, key: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(file) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %file.display(),
                key,
                "secret file is readable by group or others (mode {:o}); chmod 600 it or pass it with systemd's LoadCredential=",
                mode & 0o777
            );
        }
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "`{name}` is not a valid name (use letters, digits, `-` and `_`)"
        ));
    }
    Ok(())
}

fn validate_daemon(
    raw: RawDaemon,
    resolve: &impl Fn(&Path) -> PathBuf,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<Daemon, ConfigError> {
    if raw.resync_interval.is_zero() {
        return Err(invalid(
            "daemon.resync_interval",
            "must be longer than 0s".to_string(),
        ));
    }
    if let Some(r) = raw.max_revocation_ratio
        && !(r > 0.0 && r <= 1.0)
    {
        return Err(invalid(
            "daemon.max_revocation_ratio",
            format!("{r} is not a share between 0 (exclusive) and 1"),
        ));
    }
    let listen = match raw.listen {
        None => None,
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "daemon.listen",
                format!("`{text}` is not an address like \"127.0.0.1:9464\": {e}"),
            )
        })?),
    };
    Ok(Daemon {
        desired_dir: resolve(&raw.desired_dir),
        state_dir: resolve(&raw.state_dir),
        audit_log: resolve(&raw.audit_log),
        resync_interval: raw.resync_interval,
        max_revocations_per_run: raw.max_revocations_per_run,
        max_revocation_ratio: raw.max_revocation_ratio,
        listen,
    })
}

fn validate_ldap(
    raw: RawLdap,
    resolve: &impl Fn(&Path) -> PathBuf,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<Ldap, ConfigError> {
    let url = raw.url.trim().to_string();
    let lower = url.to_ascii_lowercase();
    let is_ldaps = lower.starts_with("ldaps://");
    if !is_ldaps && !lower.starts_with("ldap://") {
        return Err(invalid(
            "ldap.url",
            format!("`{url}` must start with ldap:// or ldaps://"),
        ));
    }
    if is_ldaps && raw.starttls {
        return Err(invalid(
            "ldap.starttls",
            "StartTLS upgrades a plain ldap:// connection; with ldaps:// set starttls = false"
                .to_string(),
        ));
    }
    if raw.bind_dn.is_some() != raw.bind_password_file.is_some() {
        return Err(invalid(
            "ldap.bind_password_file",
            "bind_dn and bind_password_file must be set together (or neither, for an anonymous bind)"
                .to_string(),
        ));
    }
    if raw.bind_dn.is_some()
        && !is_ldaps
        && !raw.starttls
        && !is_loopback_url(&url)
        && !raw.allow_insecure_bind
    {
        return Err(invalid(
            "ldap.url",
            format!(
                "`{url}` would send the bind password unencrypted: use ldaps:// or starttls = true (or, on a trusted network only, allow_insecure_bind = true)"
            ),
        ));
    }
    let filter = raw.user_filter.trim().to_string();
    if !filter.contains("{user}") {
        return Err(invalid(
            "ldap.user_filter",
            format!("`{filter}` must contain the placeholder {{user}}"),
        ));
    }
    if !filter.starts_with('(') || !filter.ends_with(')') || !balanced(&filter) {
        return Err(invalid(
            "ldap.user_filter",
            format!("`{filter}` is not a parenthesised LDAP filter"),
        ));
    }
    let member_attribute = match raw.member_attribute.to_ascii_lowercase().as_str() {
        "member" => MemberAttribute::Member,
        "uniquemember" => MemberAttribute::UniqueMember,
        "memberuid" => MemberAttribute::MemberUid,
        other => {
            return Err(invalid(
                "ldap.member_attribute",
                format!("`{other}` is not one of member, uniqueMember, memberUid"),
            ));
        }
    };
    if raw.page_size == 0 {
        return Err(invalid("ldap.page_size", "must be at least 1".to_string()));
    }
    if raw.range_size == 0 {
        return Err(invalid("ldap.range_size", "must be at least 1".to_string()));
    }
    if raw.user_base.trim().is_empty() {
        return Err(invalid("ldap.user_base", "must not be empty".to_string()));
    }
    Ok(Ldap {
        url,
        starttls: raw.starttls,
        tls_ca_file: raw.tls_ca_file.as_deref().map(resolve),
        bind_dn: raw.bind_dn,
        bind_password_file: raw.bind_password_file.as_deref().map(resolve),
        user_base: raw.user_base,
        user_filter: filter,
        member_attribute,
        placeholder_member: raw.placeholder_member.filter(|p| !p.trim().is_empty()),
        page_size: raw.page_size,
        range_size: raw.range_size,
        timeout: raw.timeout,
        allow_insecure_bind: raw.allow_insecure_bind,
    })
}

/// Whether an `ldap://` / `ldaps://` URL names this machine (127.0.0.0/8, `localhost`, `::1`):
/// there a plain connection never leaves the host.
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = if let Some(v6) = rest.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        rest.split([':', '/']).next().unwrap_or("")
    };
    let host = host.to_ascii_lowercase();
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn balanced(filter: &str) -> bool {
    let mut depth = 0i32;
    for c in filter.chars() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

fn validate_lms(
    raw: RawLms,
    resolve: &impl Fn(&Path) -> PathBuf,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<Lms, ConfigError> {
    let kind = match raw.kind.as_str() {
        "csv" => LmsKind::Csv,
        "xlsx" => LmsKind::Xlsx,
        "moodle" => LmsKind::Moodle,
        "canvas" => LmsKind::Canvas,
        "xapi" => LmsKind::Xapi,
        other => {
            return Err(invalid(
                "lms.kind",
                format!(
                    "`{other}` is not one of \"csv\", \"xlsx\", \"moodle\", \"canvas\", \"xapi\""
                ),
            ));
        }
    };
    let name = kind.name();
    // Every key that is set, and the kinds it belongs to: a key of another kind is a mistake
    // worth naming (a report with a `url`, Moodle with a `path`), not something to ignore.
    let http = ["moodle", "canvas", "xapi"];
    let keys: [(&str, bool, &[&str]); 12] = [
        ("path", raw.path.is_some(), &["csv", "xlsx"]),
        ("url", raw.url.is_some(), &http),
        (
            "token_file",
            raw.token_file.is_some(),
            &["moodle", "canvas"],
        ),
        ("username", raw.username.is_some(), &["xapi"]),
        ("password_file", raw.password_file.is_some(), &["xapi"]),
        ("agent_account", raw.agent_account.is_some(), &["xapi"]),
        ("tls_ca_file", raw.tls_ca_file.is_some(), &http),
        ("cache_ttl", raw.cache_ttl.is_some(), &http),
        ("reverify_interval", raw.reverify_interval.is_some(), &http),
        ("timeout", raw.timeout.is_some(), &http),
        ("concurrency", raw.concurrency.is_some(), &http),
        ("bulk_threshold", raw.bulk_threshold.is_some(), &["canvas"]),
    ];
    for (key, set, kinds) in keys {
        if set && !kinds.contains(&name) {
            let hint = if key == "path" {
                " (an HTTP platform is asked at `url`)".to_string()
            } else if !kind.is_http() {
                " (a results report is read from `path`)".to_string()
            } else {
                String::new()
            };
            return Err(invalid(
                &format!("lms.{key}"),
                format!(
                    "is not a setting of kind = \"{name}\"; it belongs to kind = {}{hint}",
                    kinds
                        .iter()
                        .map(|k| format!("\"{k}\""))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            ));
        }
    }
    if !kind.is_http() {
        let Some(path) = raw.path else {
            return Err(invalid(
                "lms.path",
                "the results report needs a path".to_string(),
            ));
        };
        return Ok(Lms {
            kind,
            label: format!("{name}:{}", path.display()),
            path: Some(resolve(&path)),
            http: None,
        });
    }

    let required = |key: &str, what: &str| {
        invalid(
            &format!("lms.{key}"),
            format!("kind = \"{name}\" needs {what}"),
        )
    };
    let Some(url) = raw.url else {
        return Err(required(
            "url",
            "the platform's address, e.g. \"https://lms.example.org\"",
        ));
    };
    let url = check_platform_url(&url).map_err(|m| invalid("lms.url", m))?;
    let credentials = match kind {
        LmsKind::Xapi => {
            let Some(username) = raw.username.filter(|u| !u.trim().is_empty()) else {
                return Err(required("username", "the LRS user name (HTTP Basic)"));
            };
            let Some(password_file) = raw.password_file else {
                return Err(required(
                    "password_file",
                    "the file that holds the LRS password",
                ));
            };
            HttpCredentials::Basic {
                username,
                password_file: resolve(&password_file),
            }
        }
        _ => {
            let Some(token_file) = raw.token_file else {
                return Err(required("token_file", "the file that holds the API token"));
            };
            HttpCredentials::Token {
                file: resolve(&token_file),
            }
        }
    };
    let agent_account = match raw.agent_account {
        None => None,
        Some(a) => {
            if !a.name.contains("{user}") {
                return Err(invalid(
                    "lms.agent_account.name",
                    format!(
                        "`{}` must contain the placeholder {{user}}, or every user would be the same agent",
                        a.name
                    ),
                ));
            }
            if a.home_page.trim().is_empty() {
                return Err(invalid(
                    "lms.agent_account.home_page",
                    "must not be empty".to_string(),
                ));
            }
            Some(AgentAccount {
                home_page: a.home_page,
                name: a.name,
            })
        }
    };
    let cache_ttl = raw.cache_ttl.unwrap_or_else(default_cache_ttl);
    let reverify_interval = raw
        .reverify_interval
        .unwrap_or_else(default_reverify_interval);
    if reverify_interval < cache_ttl {
        return Err(invalid(
            "lms.reverify_interval",
            format!(
                "{} is shorter than cache_ttl ({}): passes coursegate's memberships rest on are re-checked less often than anything else, not more",
                humantime::format_duration(reverify_interval),
                humantime::format_duration(cache_ttl)
            ),
        ));
    }
    let timeout = raw.timeout.unwrap_or_else(default_lms_timeout);
    if timeout.is_zero() {
        return Err(invalid("lms.timeout", "must be longer than 0s".to_string()));
    }
    let concurrency = raw.concurrency.unwrap_or(DEFAULT_LMS_CONCURRENCY);
    if !(1..=MAX_LMS_CONCURRENCY).contains(&concurrency) {
        return Err(invalid(
            "lms.concurrency",
            format!("{concurrency} is not between 1 and {MAX_LMS_CONCURRENCY}"),
        ));
    }
    let bulk_threshold = raw.bulk_threshold.unwrap_or(DEFAULT_BULK_THRESHOLD);
    if bulk_threshold == 0 {
        return Err(invalid(
            "lms.bulk_threshold",
            "must be at least 1".to_string(),
        ));
    }
    Ok(Lms {
        kind,
        label: format!("{name}:{url}"),
        path: None,
        http: Some(HttpLms {
            url,
            credentials,
            agent_account,
            tls_ca_file: raw.tls_ca_file.as_deref().map(resolve),
            cache_ttl,
            reverify_interval,
            timeout,
            concurrency,
            bulk_threshold,
        }),
    })
}

/// An HTTP platform's base URL: `https://`, or `http://` to this machine only (a token must
/// never cross a network in clear); no user name or password in it (secrets live in files); no
/// query or fragment. Returned without a trailing `/`.
fn check_platform_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    let url = reqwest::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_url(text) => {}
        "http" => {
            return Err(format!(
                "`{text}` would send the token or password unencrypted: use https:// (plain http:// is allowed only to this machine)"
            ));
        }
        other => return Err(format!("`{text}`: the scheme must be https, not {other}")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{text}` names no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "`{text}` contains a user name or password; put the secret in token_file or password_file"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "`{text}` must not have a query (?…) or fragment (#…)"
        ));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// Course ids the platform can take: Moodle's are numbers, xAPI's activity ids are IRIs.
fn check_lms_ids(
    lms: &Lms,
    courses: &BTreeMap<String, Course>,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    for (key, course) in courses {
        let id = course.lms_id.trim();
        let problem = match lms.kind {
            LmsKind::Moodle if !id.parse::<u64>().is_ok_and(|n| n > 0) => Some(format!(
                "`{}` is not a Moodle course id: Moodle knows courses by number (the id in course/view.php?id=42); set lms_id = \"42\"",
                course.lms_id
            )),
            LmsKind::Xapi if reqwest::Url::parse(id).is_err() => Some(format!(
                "`{}` is not an xAPI activity id: it must be an absolute IRI such as \"https://lms.example.org/activities/wim-grund\"",
                course.lms_id
            )),
            LmsKind::Canvas if id.is_empty() => Some("must not be empty".to_string()),
            _ => None,
        };
        if let Some(message) = problem {
            return Err(invalid(&format!("courses.{key}.lms_id"), message));
        }
    }
    Ok(())
}

/// A secret read from a file. Its `Debug` and `Display` never show the value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[ldap]
url = "ldap://127.0.0.1:389"
bind_dn = "cn=svc,dc=example,dc=org"
bind_password_file = "pw"
user_base = "ou=people,dc=example,dc=org"

[lms]
kind = "csv"
path = "lms/results.csv"

[courses.wim-grund]
lms_id = "Wim grundkurs"
valid_for = "2y"

[access.wim]
group = "cn=wim-users,ou=groups,dc=example,dc=org"
courses = ["wim-grund"]
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/etc/cg/coursegate.toml"), text)
    }

    #[test]
    fn a_config_named_relative_to_the_working_directory_gets_absolute_paths() {
        let cwd = std::env::current_dir().unwrap();
        for name in [
            "coursegate.toml",
            "./coursegate.toml",
            "etc/coursegate.toml",
        ] {
            let c = Config::from_toml(Path::new(name), MINIMAL).unwrap();
            let base = cwd.join(Path::new(name).parent().unwrap());
            let base = std::path::absolute(base).unwrap();
            assert!(
                c.daemon.desired_dir.is_absolute(),
                "{name}: {:?}",
                c.daemon.desired_dir
            );
            assert_eq!(c.daemon.desired_dir, base.join("desired"), "{name}");
            assert_eq!(c.lms.path, Some(base.join("lms/results.csv")), "{name}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.daemon.desired_dir, PathBuf::from("/etc/cg/desired"));
        assert_eq!(c.daemon.max_revocations_per_run, 25);
        assert_eq!(c.daemon.resync_interval, Duration::from_secs(300));
        assert_eq!(c.lms.path, Some(PathBuf::from("/etc/cg/lms/results.csv")));
        assert!(c.lms.http.is_none());
        assert_eq!(c.lms.label, "csv:lms/results.csv");
        assert_eq!(c.ldap.user_filter, "(uid={user})");
        assert_eq!(c.ldap.member_attribute, MemberAttribute::Member);
        let wim = &c.access["wim"];
        assert_eq!(wim.lapse_grace, Duration::from_secs(30 * 86400));
        assert_eq!(c.courses["wim-grund"].lms_id, "Wim grundkurs");
        assert_eq!(c.courses["wim-grund"].title, "wim-grund");
        assert!(c.courses["wim-grund"].valid_for.unwrap() > Duration::from_secs(2 * 365 * 86400));
        assert_eq!(c.ldap.bind_password_file, Some(PathBuf::from("/etc/cg/pw")));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load(&MINIMAL.replace("[lms]", "[lms]\nkidn = 1")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/etc/cg/coursegate.toml"), "{msg}");
        assert!(msg.contains("kidn"), "{msg}");
    }

    #[test]
    fn bad_duration_is_named() {
        let err = load(&MINIMAL.replace("\"2y\"", "\"two years\"")).unwrap_err();
        assert!(err.to_string().contains("two years"), "{err}");
    }

    #[test]
    fn unknown_course_in_profile() {
        let err = load(&MINIMAL.replace("courses = [\"wim-grund\"]", "courses = [\"nope\"]"))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("access.wim.courses") && msg.contains("nope"),
            "{msg}"
        );
    }

    #[test]
    fn filter_without_placeholder_rejected() {
        let err =
            load(&MINIMAL.replace("user_base = ", "user_filter = \"(uid=anna)\"\nuser_base = "))
                .unwrap_err();
        assert!(err.to_string().contains("ldap.user_filter"), "{err}");
    }

    #[test]
    fn bad_member_attribute_and_scheme() {
        let err = load(&MINIMAL.replace(
            "user_base = ",
            "member_attribute = \"members\"\nuser_base = ",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("ldap.member_attribute"), "{err}");
        let err = load(&MINIMAL.replace("ldap://127", "http://127")).unwrap_err();
        assert!(err.to_string().contains("ldap.url"), "{err}");
        let err = load(&MINIMAL.replace(
            "ldap://127.0.0.1:389\"",
            "ldaps://127.0.0.1:636\"\nstarttls = true",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("ldap.starttls"), "{err}");
    }

    #[test]
    fn plain_password_bind_to_a_remote_host_is_refused() {
        let remote = MINIMAL.replace("ldap://127.0.0.1:389", "ldap://dc1.example.org");
        let err = load(&remote).unwrap_err().to_string();
        assert!(
            err.contains("unencrypted") && err.contains("ldap.url"),
            "{err}"
        );
        assert!(
            load(&remote.replace("user_base =", "allow_insecure_bind = true\nuser_base =")).is_ok()
        );
        assert!(load(&remote.replace("user_base =", "starttls = true\nuser_base =")).is_ok());
        assert!(load(&remote.replace("ldap://dc1", "ldaps://dc1")).is_ok());
        assert!(load(&MINIMAL.replace("127.0.0.1:389", "localhost")).is_ok());
        assert!(load(&MINIMAL.replace("127.0.0.1:389", "[::1]:389")).is_ok());
        assert!(!is_loopback_url("ldap://127.0.0.1.evil.org"));
        assert!(!is_loopback_url("ldap://localhost.evil.org:389"));
    }

    #[test]
    fn orderer_group_must_be_a_dn() {
        let with = |g: &str| format!("{MINIMAL}\n[orders]\nallowed_orderers_group = \"{g}\"\n");
        let c = load(&with("cn=managers,dc=example,dc=org")).unwrap();
        assert_eq!(
            c.orders.unwrap().allowed_orderers_group.as_deref(),
            Some("cn=managers,dc=example,dc=org")
        );
        let err = load(&with("managers")).unwrap_err().to_string();
        assert!(err.contains("orders.allowed_orderers_group"), "{err}");
        assert!(load(&format!("{MINIMAL}\n[orders]\n")).is_ok());
    }

    #[test]
    fn notify_section_is_validated() {
        let notify = |extra: &str| {
            format!(
                "{MINIMAL}\n[notify]\nsmtp_url = \"smtp://127.0.0.1:2525\"\nfrom = \"coursegate@example.org\"\n{extra}"
            )
        };
        let c = load(&notify("")).unwrap();
        let n = c.notify.unwrap();
        assert_eq!(n.language, Language::Sv);
        assert_eq!(n.expiry_warning, Duration::from_secs(14 * 24 * 3600));
        let c = load(&notify("language = \"en\"\nexpiry_warning = \"3d\"\n")).unwrap();
        let n = c.notify.unwrap();
        assert_eq!(n.language, Language::En);
        assert_eq!(n.expiry_warning, Duration::from_secs(3 * 24 * 3600));
        for (extra, key) in [
            ("language = \"de\"\n", "expected `sv` or `en`"),
            ("smtp_user = \"x\"\n", "notify.smtp_user"),
            ("expiry_warning = \"soon\"\n", "expiry_warning"),
            ("smpt_url = \"x\"\n", "smpt_url"),
        ] {
            let err = load(&notify(extra)).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let err = load(&notify("").replace("smtp://", "http://"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("notify.smtp_url"), "{err}");
        let err = load(&notify("").replace("coursegate@example.org", "not an address"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("notify.from"), "{err}");
    }

    #[test]
    fn ticket_section_is_validated() {
        let easit = format!(
            "{MINIMAL}\n[ticket]\nkind = \"easit\"\nurl = \"https://easit.example.org/\"\napi_key_file = \"easit.key\"\nimport_handler = \"CoursegateUpdate\"\n"
        );
        match load(&easit).unwrap().ticket.unwrap() {
            Ticket::Easit {
                url,
                api_key_file,
                import_handler,
                ..
            } => {
                assert_eq!(url, "https://easit.example.org");
                assert!(api_key_file.is_absolute(), "{api_key_file:?}");
                assert_eq!(import_handler, "CoursegateUpdate");
            }
            other => panic!("{other:?}"),
        }
        let err = load(&easit.replace("import_handler = \"CoursegateUpdate\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ticket.import_handler"), "{err}");
        let webhook = format!(
            "{MINIMAL}\n[ticket]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret_file = \"hook.secret\"\n"
        );
        assert!(matches!(
            load(&webhook).unwrap().ticket,
            Some(Ticket::Webhook { .. })
        ));
        let err = load(&webhook.replace("webhook", "jira"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ticket.kind"), "{err}");
    }

    #[test]
    fn ratio_out_of_range() {
        let err = load(&format!("[daemon]\nmax_revocation_ratio = 1.5\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("max_revocation_ratio"), "{err}");
    }

    fn with_lms(lms: &str, lms_id: &str) -> String {
        MINIMAL
            .replace(
                "[lms]\nkind = \"csv\"\npath = \"lms/results.csv\"\n",
                &format!("[lms]\n{lms}\n"),
            )
            .replace(
                "lms_id = \"Wim grundkurs\"",
                &format!("lms_id = \"{lms_id}\""),
            )
    }

    #[test]
    fn http_platforms_get_defaults_and_resolved_secret_files() {
        let c = load(&with_lms(
            "kind = \"moodle\"\nurl = \"https://moodle.example.org/\"\ntoken_file = \"moodle.token\"",
            "42",
        ))
        .unwrap();
        assert_eq!(c.lms.kind, LmsKind::Moodle);
        assert_eq!(c.lms.label, "moodle:https://moodle.example.org");
        assert_eq!(c.lms.path, None);
        let http = c.lms.http.unwrap();
        assert_eq!(http.url, "https://moodle.example.org");
        assert_eq!(
            http.credentials,
            HttpCredentials::Token {
                file: PathBuf::from("/etc/cg/moodle.token")
            }
        );
        assert_eq!(http.cache_ttl, Duration::from_secs(600));
        assert_eq!(http.reverify_interval, Duration::from_secs(86400));
        assert_eq!(http.timeout, Duration::from_secs(10));
        assert_eq!(http.concurrency, 4);

        let c = load(&with_lms(
            "kind = \"xapi\"\nurl = \"https://lrs.example.org/xapi\"\nusername = \"cg\"\npassword_file = \"/run/lrs\"\n\
             agent_account = { homePage = \"https://lms.example.org\", name = \"{user}\" }\n\
             cache_ttl = \"1m\"\nreverify_interval = \"1h\"\ntimeout = \"300ms\"\nconcurrency = 2",
            "https://lms.example.org/activities/wim",
        ))
        .unwrap();
        let http = c.lms.http.unwrap();
        assert_eq!(
            http.credentials,
            HttpCredentials::Basic {
                username: "cg".into(),
                password_file: PathBuf::from("/run/lrs")
            }
        );
        assert_eq!(
            http.agent_account,
            Some(AgentAccount {
                home_page: "https://lms.example.org".into(),
                name: "{user}".into()
            })
        );
        assert_eq!(http.timeout, Duration::from_millis(300));
        assert_eq!(http.concurrency, 2);

        let c = load(&with_lms(
            "kind = \"canvas\"\nurl = \"https://canvas.example.org\"\ntoken_file = \"t\"\nbulk_threshold = 5",
            "sis_course_id:WIM-1",
        ))
        .unwrap();
        assert_eq!(c.lms.http.unwrap().bulk_threshold, 5);
    }

    #[test]
    fn keys_of_another_kind_are_named() {
        let cases = [
            // A report needs a path and takes nothing of the HTTP platforms.
            ("kind = \"csv\"", "Wim", "lms.path"),
            (
                "kind = \"csv\"\npath = \"r.csv\"\nurl = \"https://x.org\"",
                "Wim",
                "lms.url",
            ),
            (
                "kind = \"xlsx\"\npath = \"r.xlsx\"\ncache_ttl = \"1m\"",
                "Wim",
                "lms.cache_ttl",
            ),
            // An HTTP platform has no path, and its own credentials.
            (
                "kind = \"moodle\"\npath = \"r.csv\"\nurl = \"https://m.org\"\ntoken_file = \"t\"",
                "42",
                "lms.path",
            ),
            ("kind = \"moodle\"\ntoken_file = \"t\"", "42", "lms.url"),
            (
                "kind = \"moodle\"\nurl = \"https://m.org\"",
                "42",
                "lms.token_file",
            ),
            (
                "kind = \"moodle\"\nurl = \"https://m.org\"\ntoken_file = \"t\"\nusername = \"u\"",
                "42",
                "lms.username",
            ),
            (
                "kind = \"canvas\"\nurl = \"https://c.org\"\ntoken_file = \"t\"\nagent_account = { home_page = \"h\", name = \"{user}\" }",
                "1",
                "lms.agent_account",
            ),
            (
                "kind = \"xapi\"\nurl = \"https://l.org\"\npassword_file = \"p\"",
                "https://a.org/1",
                "lms.username",
            ),
            (
                "kind = \"xapi\"\nurl = \"https://l.org\"\nusername = \"u\"",
                "https://a.org/1",
                "lms.password_file",
            ),
            (
                "kind = \"xapi\"\nurl = \"https://l.org\"\nusername = \"u\"\npassword_file = \"p\"\ntoken_file = \"t\"",
                "https://a.org/1",
                "lms.token_file",
            ),
            (
                "kind = \"xapi\"\nurl = \"https://l.org\"\nusername = \"u\"\npassword_file = \"p\"\nagent_account = { home_page = \"h\", name = \"anna\" }",
                "https://a.org/1",
                "lms.agent_account.name",
            ),
            (
                "kind = \"xapi\"\nurl = \"https://l.org\"\nusername = \"u\"\npassword_file = \"p\"\nbulk_threshold = 3",
                "https://a.org/1",
                "lms.bulk_threshold",
            ),
            // Course ids the platform cannot take.
            (
                "kind = \"moodle\"\nurl = \"https://m.org\"\ntoken_file = \"t\"",
                "Wim grundkurs",
                "courses.wim-grund.lms_id",
            ),
            (
                "kind = \"xapi\"\nurl = \"https://l.org\"\nusername = \"u\"\npassword_file = \"p\"",
                "wim",
                "courses.wim-grund.lms_id",
            ),
            // Load settings out of range.
            (
                "kind = \"canvas\"\nurl = \"https://c.org\"\ntoken_file = \"t\"\nconcurrency = 0",
                "1",
                "lms.concurrency",
            ),
            (
                "kind = \"canvas\"\nurl = \"https://c.org\"\ntoken_file = \"t\"\ntimeout = \"0s\"",
                "1",
                "lms.timeout",
            ),
            (
                "kind = \"canvas\"\nurl = \"https://c.org\"\ntoken_file = \"t\"\ncache_ttl = \"2h\"\nreverify_interval = \"1h\"",
                "1",
                "lms.reverify_interval",
            ),
            ("kind = \"pingpong\"", "1", "lms.kind"),
        ];
        for (lms, id, key) in cases {
            let err = load(&with_lms(lms, id))
                .err()
                .unwrap_or_else(|| panic!("accepted:\n{lms}"))
                .to_string();
            assert!(err.contains(&format!("key `{key}`")), "{lms}\n=> {err}");
            assert!(err.contains("/etc/cg/coursegate.toml"), "{err}");
        }
    }

    #[test]
    fn platform_urls_are_https_or_loopback_and_carry_no_secret() {
        let moodle = |url: &str| {
            load(&with_lms(
                &format!("kind = \"moodle\"\nurl = \"{url}\"\ntoken_file = \"t\""),
                "42",
            ))
        };
        assert!(moodle("https://moodle.example.org/lms/").is_ok());
        assert!(moodle("http://127.0.0.1:8080").is_ok());
        assert!(moodle("http://localhost/moodle").is_ok());
        for (bad, says) in [
            ("http://moodle.example.org", "unencrypted"),
            ("ftp://moodle.example.org", "scheme"),
            (
                "https://admin:pw@moodle.example.org",
                "user name or password",
            ),
            ("https://moodle.example.org/?wstoken=abc", "query"),
            ("moodle.example.org", "not a URL"),
        ] {
            let err = moodle(bad).unwrap_err().to_string();
            assert!(
                err.contains("lms.url") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn http_secrets_are_read_from_their_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lrs-password"), "lrs-s3cret\r\n").unwrap();
        let text = with_lms(
            "kind = \"xapi\"\nurl = \"https://l.org\"\nusername = \"cg\"\npassword_file = \"lrs-password\"",
            "https://a.org/1",
        );
        let c = Config::from_toml(&dir.path().join("c.toml"), &text).unwrap();
        let credentials = &c.lms.http.as_ref().unwrap().credentials;
        match credentials.read().unwrap() {
            HttpSecret::Basic { username, password } => {
                assert_eq!(username, "cg");
                assert_eq!(password.expose(), "lrs-s3cret");
                assert!(!format!("{password:?}").contains("s3cret"));
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(dir.path().join("lrs-password")).unwrap();
        let err = credentials.read().unwrap_err().to_string();
        assert!(
            err.contains("lrs-password") && err.contains("lms.password_file"),
            "{err}"
        );
    }

    #[test]
    fn secret_is_read_trimmed_and_never_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret-value\n").unwrap();
        let c = Config::from_toml(&dir.path().join("c.toml"), MINIMAL).unwrap();
        let secret = c.bind_password().unwrap().unwrap();
        assert_eq!(secret.expose(), "s3cret-value");
        assert!(!format!("{secret:?} {:?}", c.ldap).contains("s3cret"));
    }
}
