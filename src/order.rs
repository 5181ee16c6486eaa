//! Access orders (SPEC §2): one file each in `desired_dir`, parsed, validated and scanned.
//!
//! This module owns the order format and every rule that makes a file invalid, the scan of the
//! watched directory (ignored names, non-regular files, duplicate ids) and the "a typo never
//! revokes" rule: a file that was valid and became invalid keeps its last valid version in
//! effect. The last-good versions themselves are stored by [`crate::state`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Order files larger than this are rejected unread: an order is a few hundred bytes.
pub const MAX_ORDER_BYTES: u64 = 64 * 1024;

/// A valid access order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub user: String,
    pub access: Vec<String>,
    pub ordered_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The last valid version of each order file, by file name. The orders are shared with the
/// parse cache and the scan that produced them (a large region has tens of thousands).
pub type LastGood = BTreeMap<String, Arc<Order>>;

/// An order in effect, with the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedOrder {
    /// File name inside `desired_dir`.
    pub file: String,
    /// Shared with the parse cache and the scan's last-good store.
    pub order: Arc<Order>,
    /// True when the file is currently invalid and this is its last valid version.
    pub last_good: bool,
}

/// A file that is not a valid order, with everything an admin needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidFile {
    pub file: String,
    /// `line N, column M: what is wrong`, or just what is wrong.
    pub message: String,
    /// Whether the file's last valid version stays in effect.
    pub last_good_in_effect: bool,
}

/// The result of reading `desired_dir`.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Orders in effect: valid files, plus last-good versions of files that became invalid.
    pub orders: Vec<LoadedOrder>,
    pub invalid: Vec<InvalidFile>,
    /// Files skipped with a warning (unknown extension), with the reason.
    pub ignored: Vec<(String, String)>,
    /// The last-good store after this scan: every currently valid file, plus the kept versions
    /// of currently invalid ones. Persisting it is the caller's choice (`apply` does, `plan`
    /// does not).
    pub last_good: LastGood,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read order directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What kind of order file a name is, per SPEC §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Toml,
    Json,
    /// Editor and atomic-writer leftovers: skipped silently.
    Ignored,
    /// Any other extension: skipped with a warning.
    Other,
}

/// Classifies a file name in `desired_dir`.
pub fn classify(name: &str) -> FileKind {
    if name.starts_with('.')
        || name.ends_with('~')
        || name.ends_with(".tmp")
        || name.ends_with(".swp")
    {
        return FileKind::Ignored;
    }
    if name.ends_with(".toml") {
        FileKind::Toml
    } else if name.ends_with(".json") {
        FileKind::Json
    } else {
        FileKind::Other
    }
}

// === parsing ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlOrder {
    id: String,
    user: String,
    access: Vec<String>,
    ordered_by: String,
    ticket: Option<String>,
    valid_from: Option<toml::value::Datetime>,
    valid_until: Option<toml::value::Datetime>,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOrder {
    id: String,
    user: String,
    access: Vec<String>,
    ordered_by: String,
    ticket: Option<String>,
    valid_from: Option<String>,
    valid_until: Option<String>,
    note: Option<String>,
}

/// Why a file is not a valid order; `line`/`column` where they are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for OrderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl OrderError {
    /// An error about `key`, located at the line where the key is written (if found).
    fn at_key(text: &str, kind: FileKind, key: &str, message: impl Into<String>) -> Self {
        OrderError {
            line: key_line(text, kind, key),
            column: None,
            message: message.into(),
        }
    }
}

fn key_line(text: &str, kind: FileKind, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            match kind {
                FileKind::Json => l.contains(&format!("\"{key}\"")),
                _ => l
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('=')),
            }
        })
        .map(|i| i + 1)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses and validates one order. `kind` is [`FileKind::Toml`] or [`FileKind::Json`];
/// `is_profile` says whether an access name is a configured profile.
pub fn parse(
    bytes: &[u8],
    kind: FileKind,
    is_profile: &dyn Fn(&str) -> bool,
) -> Result<Order, OrderError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_col(
            std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
            e.valid_up_to(),
        );
        OrderError {
            line: Some(line),
            column: Some(column),
            message: format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
        }
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if let Some(at) = text.find('\0') {
        let (line, column) = line_col(text, at);
        return Err(OrderError {
            line: Some(line),
            column: Some(column),
            message:
                "contains NUL bytes: not a text file (binary, or UTF-16 without a byte-order mark?)"
                    .to_string(),
        });
    }
    let raw = match kind {
        FileKind::Json => {
            // serde would also read a JSON array field by field; an order is an object.
            if !text.trim_start().starts_with('{') {
                return Err(OrderError {
                    line: Some(1),
                    column: None,
                    message: "an order must be a JSON object ({\"id\": …, \"user\": …})"
                        .to_string(),
                });
            }
            let o: JsonOrder = serde_json::from_str(text).map_err(|e| OrderError {
                line: Some(e.line()),
                column: Some(e.column()),
                message: strip_json_position(&e.to_string()),
            })?;
            let from = o
                .valid_from
                .map(|s| json_date(text, "valid_from", &s, Edge::Start))
                .transpose()?;
            let until = o
                .valid_until
                .map(|s| json_date(text, "valid_until", &s, Edge::End))
                .transpose()?;
            Order {
                id: o.id,
                user: o.user,
                access: o.access,
                ordered_by: o.ordered_by,
                ticket: o.ticket,
                valid_from: from,
                valid_until: until,
                note: o.note,
            }
        }
        _ => {
            let o: TomlOrder = toml::from_str(text).map_err(|e| {
                let (line, column) = match e.span() {
                    Some(span) => {
                        let (l, c) = line_col(text, span.start);
                        (Some(l), Some(c))
                    }
                    None => (None, None),
                };
                OrderError {
                    line,
                    column,
                    message: toml_message(text, line, e.message()),
                }
            })?;
            let from = o
                .valid_from
                .map(|d| {
                    toml_date(&d, Edge::Start)
                        .map_err(|m| OrderError::at_key(text, kind, "valid_from", m))
                })
                .transpose()?;
            let until = o
                .valid_until
                .map(|d| {
                    toml_date(&d, Edge::End)
                        .map_err(|m| OrderError::at_key(text, kind, "valid_until", m))
                })
                .transpose()?;
            Order {
                id: o.id,
                user: o.user,
                access: o.access,
                ordered_by: o.ordered_by,
                ticket: o.ticket,
                valid_from: from,
                valid_until: until,
                note: o.note,
            }
        }
    };
    validate(raw, text, kind, is_profile)
}

/// One line of explanation for a TOML error. A date the TOML parser cannot read shows up as a
/// syntax error ("expected newline"); say which key and that its date is the problem.
fn toml_message(text: &str, line: Option<usize>, message: &str) -> String {
    let message = message.trim().replace('\n', "; ");
    let key_on_line = line
        .and_then(|l| text.lines().nth(l - 1))
        .and_then(|l| l.split_once('='))
        .map(|(key, value)| (key.trim(), value.trim()));
    match key_on_line {
        Some((key @ ("valid_from" | "valid_until"), value)) => format!(
            "`{key}` = {value} is not a valid date (2027-06-30) or offset date-time (2027-06-30T08:00:00+01:00): {message}"
        ),
        _ => message,
    }
}

fn strip_json_position(message: &str) -> String {
    // serde_json appends " at line L column C"; the position is reported separately.
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[derive(Clone, Copy)]
enum Edge {
    Start,
    End,
}

fn json_date(text: &str, key: &str, value: &str, edge: Edge) -> Result<DateTime<Utc>, OrderError> {
    let parsed: toml::value::Datetime = value.trim().parse().map_err(|_| {
        OrderError::at_key(
            text,
            FileKind::Json,
            key,
            format!("`{key}`: \"{value}\" is not a date (\"2027-06-30\") or an RFC 3339 date-time"),
        )
    })?;
    toml_date(&parsed, edge)
        .map_err(|m| OrderError::at_key(text, FileKind::Json, key, format!("`{key}`: {m}")))
}

/// Turns a TOML date / offset date-time into an instant; a date means the start or the end of
/// that day in UTC (SPEC §2). Local date-times and times are ambiguous and rejected.
fn toml_date(d: &toml::value::Datetime, edge: Edge) -> Result<DateTime<Utc>, String> {
    let Some(date) = d.date else {
        return Err(format!("{d} is a time of day without a date"));
    };
    let day = NaiveDate::from_ymd_opt(
        i32::from(date.year),
        u32::from(date.month),
        u32::from(date.day),
    )
    .ok_or_else(|| format!("{d} is not a calendar date"))?;
    match (d.time, d.offset) {
        (None, _) => {
            let time = match edge {
                Edge::Start => day.and_hms_opt(0, 0, 0),
                Edge::End => day.and_hms_nano_opt(23, 59, 59, 999_999_999),
            }
            .ok_or_else(|| format!("{d} is out of range"))?;
            Ok(Utc.from_utc_datetime(&time))
        }
        (Some(_), None) => Err(format!(
            "{d} is a local date-time, which is ambiguous: add an offset (Z or +01:00) or give a date"
        )),
        (Some(t), Some(offset)) => {
            let minutes: i32 = match offset {
                toml::value::Offset::Z => 0,
                toml::value::Offset::Custom { minutes } => i32::from(minutes),
            };
            let naive = day
                .and_hms_nano_opt(
                    u32::from(t.hour),
                    u32::from(t.minute),
                    u32::from(t.second),
                    t.nanosecond,
                )
                .ok_or_else(|| format!("{d} is not a valid time"))?;
            let fixed = chrono::FixedOffset::east_opt(minutes * 60)
                .ok_or_else(|| format!("{d} has an offset out of range"))?;
            fixed
                .from_local_datetime(&naive)
                .single()
                .map(|t| t.with_timezone(&Utc))
                .ok_or_else(|| format!("{d} is out of range"))
        }
    }
}

fn validate(
    mut o: Order,
    text: &str,
    kind: FileKind,
    is_profile: &dyn Fn(&str) -> bool,
) -> Result<Order, OrderError> {
    let err = |key: &str, m: String| OrderError::at_key(text, kind, key, m);
    let mut strings: Vec<(&str, &str)> = vec![
        ("id", &o.id),
        ("user", &o.user),
        ("ordered_by", &o.ordered_by),
    ];
    if let Some(t) = &o.ticket {
        strings.push(("ticket", t));
    }
    if let Some(n) = &o.note {
        strings.push(("note", n));
    }
    for a in &o.access {
        strings.push(("access", a));
    }
    for (key, value) in strings {
        if let Some(c) = value.chars().find(|c| c.is_ascii_control()) {
            return Err(err(
                key,
                format!(
                    "`{key}` contains the control character U+{:04X}",
                    u32::from(c)
                ),
            ));
        }
    }
    let id_len = o.id.chars().count();
    if !(1..=128).contains(&id_len) {
        return Err(err(
            "id",
            format!("`id` must be 1–128 characters, not {id_len}"),
        ));
    }
    if o.id.contains('/') || o.id.contains('\\') {
        return Err(err(
            "id",
            format!("`id` \"{}\" must not contain `/` or `\\`", o.id),
        ));
    }
    if o.id.starts_with('.') {
        return Err(err(
            "id",
            format!("`id` \"{}\" must not start with `.`", o.id),
        ));
    }
    for (key, value) in [("user", &o.user), ("ordered_by", &o.ordered_by)] {
        let n = value.chars().count();
        if !(1..=256).contains(&n) {
            return Err(err(
                key,
                format!("`{key}` must be 1–256 characters, not {n}"),
            ));
        }
    }
    if o.access.is_empty() {
        return Err(err(
            "access",
            "`access` is empty: name at least one access profile".to_string(),
        ));
    }
    if let Some(unknown) = o.access.iter().find(|a| !is_profile(a)) {
        return Err(err(
            "access",
            format!("`access` names \"{unknown}\", which is not an access profile in the config"),
        ));
    }
    let mut seen = BTreeSet::new();
    o.access.retain(|a| seen.insert(a.clone()));
    if let (Some(from), Some(until)) = (o.valid_from, o.valid_until)
        && until < from
    {
        return Err(err(
            "valid_until",
            format!("`valid_until` ({until}) is before `valid_from` ({from})"),
        ));
    }
    Ok(o)
}

// === scanning the directory ===

/// Reads and parses a file that the directory listing says is a regular file, with one path
/// lookup ([`read_regular`]) where [`FileStamp::of`] and [`load_file`] make three: a first run
/// reads 20,000 files, and the lookups were most of its system time. The stamp is the opened
/// file's, taken before it is read, so a file changed meanwhile is read again by the next scan.
/// `None` if anything is unusual (not regular after all, too large, any error): the caller then
/// takes the careful way, which looks at a file before opening it.
fn load_regular_file(
    path: &Path,
    kind: FileKind,
    is_profile: &dyn Fn(&str) -> bool,
) -> Option<(FileStamp, Result<Order, String>)> {
    let (meta, bytes) = read_regular(path).ok()?;
    let parsed = parse(&bytes, kind, is_profile).map_err(|e| e.to_string());
    Some((FileStamp::from_metadata(&meta), parsed))
}

/// Opens `path` without following a symlink (and without blocking on a FIFO) and reads it if the
/// open file is a regular file of at most [`MAX_ORDER_BYTES`]; with the open file's metadata.
fn read_regular(path: &Path) -> Result<(std::fs::Metadata, Vec<u8>), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let cannot = |e: std::io::Error| format!("cannot read: {e}");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => NOT_A_SYMLINK.to_string(),
            _ => cannot(e),
        })?;
    let meta = file.metadata().map_err(cannot)?;
    refuse_unless_order_file(&meta)?;
    // Room for one byte more than fstat said, so that one read returns the whole file.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0) + 1);
    (&file)
        .take(MAX_ORDER_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_ORDER_BYTES {
        return Err(format!(
            "grew beyond {MAX_ORDER_BYTES} bytes while it was read; an order file may be at most {MAX_ORDER_BYTES} bytes"
        ));
    }
    Ok((meta, bytes))
}

const NOT_A_SYMLINK: &str = "is a symbolic link; order files must be regular files";

/// Why a file with metadata `meta` (not following a symlink) is no order file, if it is not.
fn refuse_unless_order_file(meta: &std::fs::Metadata) -> Result<(), String> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(NOT_A_SYMLINK.to_string());
    }
    if ft.is_dir() {
        return Err("is a directory, not an order file".to_string());
    }
    if !ft.is_file() {
        return Err("is not a regular file".to_string());
    }
    if meta.len() > MAX_ORDER_BYTES {
        return Err(format!(
            "is {} bytes; an order file may be at most {MAX_ORDER_BYTES} bytes",
            meta.len()
        ));
    }
    Ok(())
}

/// Reads one file's bytes, refusing anything that is not a regular file or is too large. The
/// file is looked at before it is opened: a device or FIFO is never opened.
fn read_order_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    refuse_unless_order_file(&meta)?;
    read_regular(path).map(|(_, bytes)| bytes)
}

/// Parses one order file at `path` (used by `check FILE…` and by the scan).
pub fn load_file(path: &Path, is_profile: &dyn Fn(&str) -> bool) -> Result<Order, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let kind = match classify(&name) {
        FileKind::Json => FileKind::Json,
        _ => FileKind::Toml,
    };
    let bytes = read_order_file(path)?;
    parse(&bytes, kind, is_profile).map_err(|e| e.to_string())
}

/// SPEC §2: an id that two files share makes both invalid. Takes (file, id) pairs of the valid
/// files; returns, for each file whose id is shared, the message naming the other files.
pub fn duplicate_ids<'a>(
    files: impl Iterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<String, String> {
    let mut by_id: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (file, id) in files {
        by_id.entry(id).or_default().push(file);
    }
    by_id
        .iter()
        .filter(|(_, files)| files.len() > 1)
        .flat_map(|(id, files)| {
            files.iter().map(move |f| {
                let others: Vec<&str> = files.iter().copied().filter(|o| o != f).collect();
                (
                    f.to_string(),
                    format!("`id` \"{id}\" is also used by {}", others.join(", ")),
                )
            })
        })
        .collect()
}

/// From this many files a scan works on [`SCAN_THREADS`] threads.
const PARALLEL_FROM: usize = 512;
const SCAN_THREADS: usize = 16;

/// Reads every order file in `dir`, applying SPEC §2 and the last-good rule.
///
/// `previous` is the last-good store from the previous run. A missing or unreadable directory
/// is an error, never "no orders": an empty view of the world must not revoke everything.
pub fn scan(
    dir: &Path,
    is_profile: &(dyn Fn(&str) -> bool + Sync),
    previous: &LastGood,
) -> Result<Scan, ScanError> {
    scan_cached(dir, is_profile, previous, &mut ParseCache::default())
}

/// Parse results of unchanged files, so a long-running process re-reads only what changed.
/// A file counts as unchanged while its size, modification time, change time and inode are
/// the same. The cache is only valid for one set of profiles: clear it when the config changes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ParseCache {
    entries: BTreeMap<String, (FileStamp, Result<Arc<Order>, String>)>,
    /// Whether a scan added, replaced or dropped an entry since the cache was made or loaded.
    #[serde(skip)]
    changed: bool,
}

impl PartialEq for ParseCache {
    fn eq(&self, other: &ParseCache) -> bool {
        self.entries == other.entries
    }
}

impl ParseCache {
    /// Whether a scan changed the cache (so that saving it is worth it).
    pub fn changed(&self) -> bool {
        self.changed
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Drops entries for files modified less than `settle` before `now`: a file written again
    /// within the file system's timestamp granularity could keep its stamp, so only settled
    /// files may be trusted by a later process (git's "racily clean" rule).
    pub fn settled(&self, now: std::time::SystemTime, settle: std::time::Duration) -> ParseCache {
        let limit = now
            .checked_sub(settle)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        ParseCache {
            entries: self
                .entries
                .iter()
                .filter(|(_, (stamp, _))| stamp.mtime_ns < limit && stamp.ctime_ns < limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            changed: false,
        }
    }
}

impl ParseCache {
    /// The daemon's quick view of a few changed order files ([`crate::reconcile::quick_pass`]):
    /// re-reads `names` (file names in `dir`) into the cache and returns every valid order, from
    /// any cached file, of the users those files name. `None` when the quick view cannot be
    /// trusted and a full scan must decide: a named file is gone, unreadable or invalid, a
    /// returned order's `id` is used by another file (SPEC §2 makes both invalid), or a name is
    /// not an order file, or another file of those users changed or went since it was cached.
    /// Orders in effect only as a last-good version are left out, so the view can only hold
    /// fewer orders than a full scan, never more.
    pub fn quick_view(
        &mut self,
        dir: &Path,
        names: &[String],
        is_profile: &dyn Fn(&str) -> bool,
    ) -> Option<Vec<LoadedOrder>> {
        let mut users = std::collections::HashSet::new();
        for name in names {
            if !matches!(classify(name), FileKind::Toml | FileKind::Json) {
                return None;
            }
            let path = dir.join(name);
            let stamp = FileStamp::of(&path)?;
            let fresh = matches!(self.entries.get(name), Some((then, _)) if *then == stamp);
            if !fresh {
                let result = load_file(&path, is_profile).map(Arc::new);
                self.entries.insert(name.clone(), (stamp, result));
                self.changed = true;
            }
            match &self.entries[name].1 {
                Ok(order) => users.insert(order.user.clone()),
                Err(_) => return None,
            };
        }
        let mut ids: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (_, result) in self.entries.values() {
            if let Ok(order) = result {
                *ids.entry(order.id.as_str()).or_default() += 1;
            }
        }
        let mut orders = Vec::new();
        for (name, (stamp, result)) in &self.entries {
            let Ok(order) = result else { continue };
            if !users.contains(&order.user) {
                continue;
            }
            // The user's other files must still be as cached (a removal not yet seen).
            if ids[order.id.as_str()] > 1 || FileStamp::of(&dir.join(name)) != Some(*stamp) {
                return None;
            }
            orders.push(LoadedOrder {
                file: name.clone(),
                order: order.clone(),
                last_good: false,
            });
        }
        Some(orders)
    }
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
}

impl FileStamp {
    /// The stamp of `path` (following no symlink), or `None` if it cannot be read.
    pub fn of(path: &Path) -> Option<FileStamp> {
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| FileStamp::from_metadata(&m))
    }

    fn from_metadata(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            ino: m.ino(),
        }
    }
}

/// An order file as the directory listing shows it.
struct Listed {
    name: String,
    path: PathBuf,
    kind: FileKind,
    /// Whether the listing says it is a regular file (not a symlink, directory, FIFO, …).
    regular: bool,
}

/// [`scan`] that reuses the parse results of files that did not change since the last call.
pub fn scan_cached(
    dir: &Path,
    is_profile: &(dyn Fn(&str) -> bool + Sync),
    previous: &LastGood,
    cache: &mut ParseCache,
) -> Result<Scan, ScanError> {
    let read_err = |source| ScanError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut scan = Scan::default();
    let mut files: Vec<Listed> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = classify(&name);
        match kind {
            FileKind::Ignored => continue,
            FileKind::Other => {
                scan.ignored.push((
                    name,
                    "not an order file: only *.toml and *.json are read".to_string(),
                ));
                continue;
            }
            FileKind::Toml | FileKind::Json => {}
        }
        // The listing's file type costs no system call where the filesystem records it.
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        files.push(Listed {
            path: entry.path(),
            name,
            kind,
            regular,
        });
    }
    // Each file is read unless the cache holds its current version; a large directory on
    // several threads (a first run reads 20,000 files).
    let entries = &cache.entries;
    let look = |file: &Listed| {
        let cached = entries.get(&file.name);
        if cached.is_none()
            && file.regular
            && let Some((stamp, parsed)) = load_regular_file(&file.path, file.kind, is_profile)
        {
            return (Some(stamp), parsed.map(Arc::new), true);
        }
        let stamp = FileStamp::of(&file.path);
        match (stamp, cached) {
            (Some(now), Some((then, result))) if now == *then => (stamp, result.clone(), false),
            _ => (stamp, load_file(&file.path, is_profile).map(Arc::new), true),
        }
    };
    let looked: Vec<_> = if files.len() >= PARALLEL_FROM {
        // More threads than cores: when the files are not in the page cache (evicted since
        // they were written), each read waits for the disk, and several reads in flight at
        // once are what makes that fast. With the files cached the extra threads cost little.
        let chunks: Vec<&[Listed]> = files.chunks(files.len().div_ceil(SCAN_THREADS)).collect();
        std::thread::scope(|s| {
            let others: Vec<_> = chunks[1..]
                .iter()
                .map(|chunk| {
                    let spawned = std::thread::Builder::new()
                        .name("order-scan".into())
                        .spawn_scoped(s, || chunk.iter().map(look).collect::<Vec<_>>());
                    (chunk, spawned)
                })
                .collect();
            let mut looked: Vec<_> = chunks[0].iter().map(look).collect();
            for (chunk, spawned) in others {
                match spawned {
                    Ok(other) => looked.extend(
                        other
                            .join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    ),
                    // No thread to be had: this one reads that part.
                    Err(_) => looked.extend(chunk.iter().map(look)),
                }
            }
            looked
        })
    } else {
        files.iter().map(look).collect()
    };
    let mut parsed: Vec<(String, Result<Arc<Order>, String>)> = Vec::with_capacity(files.len());
    for (Listed { name, .. }, (stamp, result, read)) in files.into_iter().zip(looked) {
        if read && let Some(stamp) = stamp {
            cache.entries.insert(name.clone(), (stamp, result.clone()));
            cache.changed = true;
        }
        parsed.push((name, result));
    }
    let present: std::collections::HashSet<&str> = parsed.iter().map(|(n, _)| n.as_str()).collect();
    let cached = cache.entries.len();
    cache
        .entries
        .retain(|name, _| present.contains(name.as_str()));
    cache.changed |= cache.entries.len() != cached;
    parsed.sort_by(|a, b| a.0.cmp(&b.0));

    let duplicates = duplicate_ids(
        parsed
            .iter()
            .filter_map(|(name, r)| r.as_ref().ok().map(|o| (name.as_str(), o.id.as_str()))),
    );

    for (name, result) in parsed {
        let result = match (result, duplicates.get(&name)) {
            (Ok(_), Some(dup)) => Err(dup.clone()),
            (r, _) => r,
        };
        match result {
            Ok(order) => {
                scan.last_good.insert(name.clone(), order.clone());
                scan.orders.push(LoadedOrder {
                    file: name,
                    order,
                    last_good: false,
                });
            }
            Err(message) => {
                let kept = previous.get(&name).cloned();
                if let Some(order) = &kept {
                    scan.last_good.insert(name.clone(), order.clone());
                    scan.orders.push(LoadedOrder {
                        file: name.clone(),
                        order: Arc::clone(order),
                        last_good: true,
                    });
                }
                scan.invalid.push(InvalidFile {
                    file: name,
                    message,
                    last_good_in_effect: kept.is_some(),
                });
            }
        }
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profiles(name: &str) -> bool {
        matches!(name, "wim" | "pacs" | "kardiopacs")
    }

    fn toml(text: &str) -> Result<Order, OrderError> {
        parse(text.as_bytes(), FileKind::Toml, &profiles)
    }

    fn json(text: &str) -> Result<Order, OrderError> {
        parse(text.as_bytes(), FileKind::Json, &profiles)
    }

    const GOOD: &str = r#"id = "BEST-2026-0042"
user = "anna.andersson"
access = ["wim", "pacs"]
ordered_by = "karin.chef"
ticket = "EASIT-123456"
valid_from = 2026-12-01
valid_until = 2027-06-30
note = "ST-läkare, radiologi"
"#;

    fn err_of(text: &str) -> String {
        toml(text).unwrap_err().to_string()
    }

    #[test]
    fn full_toml_order() {
        let o = toml(GOOD).unwrap();
        assert_eq!(o.id, "BEST-2026-0042");
        assert_eq!(o.access, vec!["wim", "pacs"]);
        assert_eq!(
            o.valid_from.unwrap().to_rfc3339(),
            "2026-12-01T00:00:00+00:00"
        );
        let until = o.valid_until.unwrap();
        assert_eq!(until.date_naive().to_string(), "2027-06-30");
        assert!(until > Utc.with_ymd_and_hms(2027, 6, 30, 23, 59, 59).unwrap());
        assert!(until < Utc.with_ymd_and_hms(2027, 7, 1, 0, 0, 0).unwrap());
        assert_eq!(o.note.as_deref(), Some("ST-läkare, radiologi"));
    }

    #[test]
    fn offset_datetime_is_exact() {
        let o = toml(&GOOD.replace("2026-12-01", "2026-12-01T08:00:00+01:00")).unwrap();
        assert_eq!(
            o.valid_from.unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 1, 7, 0, 0).unwrap()
        );
    }

    #[test]
    fn json_order_with_string_dates() {
        let o = json(
            r#"{"id":"X-1","user":"örjan.åström","access":["wim"],"ordered_by":"karin.chef",
                "valid_from":"2026-12-01T10:00:00Z","valid_until":"2027-06-30"}"#,
        )
        .unwrap();
        assert_eq!(o.user, "örjan.åström");
        assert_eq!(
            o.valid_from.unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap()
        );
        assert_eq!(
            o.valid_until.unwrap().date_naive().to_string(),
            "2027-06-30"
        );
    }

    #[test]
    fn ldap_special_characters_are_valid_names() {
        let o = toml(&GOOD.replace("anna.andersson", r"a*)(uid=\\,x")).unwrap();
        assert_eq!(o.user, r"a*)(uid=\,x");
    }

    #[test]
    fn each_invalid_case_has_its_own_message() {
        let cases: Vec<(String, &str)> = vec![
            (
                GOOD.replace("note =", "colour = \"red\"\nnote ="),
                "unknown field `colour`",
            ),
            (GOOD.replace("\"karin.chef\"", "42"), "invalid type"),
            (
                GOOD.replace("[\"wim\", \"pacs\"]", "[]"),
                "`access` is empty",
            ),
            (
                GOOD.replace("\"pacs\"]", "\"ris\"]"),
                "\"ris\", which is not an access profile",
            ),
            (
                GOOD.replace("2027-06-30", "2026-11-30"),
                "is before `valid_from`",
            ),
            (
                GOOD.replace("2026-12-01", "2026-12-01T08:00:00"),
                "local date-time",
            ),
            (GOOD.replace("BEST-2026-0042", "a/b"), "must not contain"),
            (GOOD.replace("BEST-2026-0042", "a\\\\b"), "must not contain"),
            (
                GOOD.replace("BEST-2026-0042", ".hidden"),
                "must not start with `.`",
            ),
            (GOOD.replace("BEST-2026-0042", ""), "1–128 characters"),
            (
                GOOD.replace("BEST-2026-0042", &"x".repeat(129)),
                "1–128 characters",
            ),
            (GOOD.replace("anna.andersson", ""), "`user` must be 1–256"),
            (
                GOOD.replace("anna.andersson", &"u".repeat(257)),
                "`user` must be 1–256",
            ),
            (GOOD.replace("karin.chef", ""), "`ordered_by` must be 1–256"),
            (
                GOOD.replace("anna.andersson", "anna\\u0000"),
                "control character U+0000",
            ),
            (
                GOOD.replace("radiologi", "radiologi\\u007f"),
                "control character U+007F",
            ),
            (
                GOOD.replace("id = \"BEST-2026-0042\"\n", ""),
                "missing field `id`",
            ),
            (
                GOOD.replace("access = [\"wim\", \"pacs\"]", "access = \"wim\""),
                "invalid type",
            ),
            (
                GOOD.replace("= 2026-12-01", "= 2026-13-01"),
                "`valid_from` = 2026-13-01 is not a valid date",
            ),
            (
                GOOD.replace("= 2027-06-30", "= 10000-01-01"),
                "`valid_until` = 10000-01-01 is not a valid date",
            ),
            (
                GOOD.replace("= 2026-12-01", "= 2026-12-01T25:00:00Z"),
                "`valid_from`",
            ),
            ("id = ".to_string(), ""),
        ];
        for (text, expected) in cases {
            let e = err_of(&text);
            assert!(
                e.contains(expected),
                "expected {expected:?} in {e:?} for\n{text}"
            );
        }
    }

    #[test]
    fn errors_carry_line_numbers() {
        let e = toml(&GOOD.replace("note =", "colour = \"red\"\nnote =")).unwrap_err();
        assert_eq!(e.line, Some(8), "{e}");
        let e = toml(&GOOD.replace("[\"wim\", \"pacs\"]", "[]")).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let e = json("{\"id\": \"x\",\n \"bogus\": 1}").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn json_invalid_cases() {
        let e = json(r#"{"id":"x","user":"u","access":["wim"],"ordered_by":"m","valid_from":"2026-12-01T10:00:00"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("local date-time"), "{e}");
        let e =
            json(r#"{"id":"x","user":"u","access":["wim"],"ordered_by":"m","valid_until":"soon"}"#)
                .unwrap_err();
        assert!(e.to_string().contains("not a date"), "{e}");
        let e = json(r#"{"id":"x","user":"u","access":["wim"],"ordered_by":"m","extra":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn every_message_is_one_line() {
        for text in [
            GOOD.replace("= 2027-06-30", "= 2027-02-30"),
            GOOD.replace("[\"wim\", \"pacs\"]", "[\"wim\", \"pacs\""),
        ] {
            let e = toml(&text).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e:?}");
        }
    }

    #[test]
    fn json_must_be_an_object_and_nul_bytes_are_binary() {
        let e = json(r#"["X", "bertil", ["wim"], "m", null, null, null, null]"#).unwrap_err();
        assert!(e.to_string().contains("must be a JSON object"), "{e}");
        let e = parse(b"{\0\"\0i\0d", FileKind::Json, &profiles).unwrap_err();
        assert!(e.to_string().contains("NUL bytes"), "{e}");
    }

    #[test]
    fn not_utf8_is_invalid() {
        let e = parse(b"id = \"\xff\"", FileKind::Toml, &profiles).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }

    #[test]
    fn classify_names() {
        assert_eq!(classify("a.toml"), FileKind::Toml);
        assert_eq!(classify("a.json"), FileKind::Json);
        for ignored in [".a.toml", "a.toml~", "a.toml.tmp", "a.toml.swp", ".#x"] {
            assert_eq!(classify(ignored), FileKind::Ignored, "{ignored}");
        }
        assert_eq!(classify("README.md"), FileKind::Other);
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn scan_reports_duplicates_ignores_and_non_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.toml", GOOD);
        write(
            d,
            "b.json",
            r#"{"id":"BEST-2026-0042","user":"x","access":["wim"],"ordered_by":"m"}"#,
        );
        write(d, "c.toml", &GOOD.replace("BEST-2026-0042", "OTHER"));
        write(d, "notes.txt", "hello");
        write(d, "d.toml.swp", "garbage");
        std::fs::create_dir(d.join("e.toml")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("f.toml")).unwrap();
        let scan = scan(d, &profiles, &BTreeMap::new()).unwrap();
        let valid: Vec<&str> = scan.orders.iter().map(|o| o.file.as_str()).collect();
        assert_eq!(valid, vec!["c.toml"]);
        let invalid: BTreeMap<&str, &str> = scan
            .invalid
            .iter()
            .map(|i| (i.file.as_str(), i.message.as_str()))
            .collect();
        assert!(
            invalid["a.toml"].contains("also used by b.json"),
            "{invalid:?}"
        );
        assert!(
            invalid["b.json"].contains("also used by a.toml"),
            "{invalid:?}"
        );
        assert!(invalid["e.toml"].contains("directory"), "{invalid:?}");
        assert!(invalid["f.toml"].contains("symbolic link"), "{invalid:?}");
        assert_eq!(scan.ignored.len(), 1);
        assert_eq!(scan.ignored[0].0, "notes.txt");
    }

    #[test]
    fn typo_keeps_last_good_and_deletion_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.toml", GOOD);
        let first = scan(d, &profiles, &BTreeMap::new()).unwrap();
        assert_eq!(first.orders.len(), 1);
        write(d, "a.toml", &GOOD.replace("access =", "acess ="));
        let second = scan(d, &profiles, &first.last_good).unwrap();
        assert_eq!(second.orders.len(), 1);
        assert!(second.orders[0].last_good);
        assert!(second.invalid[0].last_good_in_effect);
        assert_eq!(second.orders[0].order.id, "BEST-2026-0042");
        // Never valid: not in effect.
        write(d, "new.toml", "id = 1");
        let third = scan(d, &profiles, &second.last_good).unwrap();
        assert_eq!(third.orders.len(), 1);
        std::fs::remove_file(d.join("a.toml")).unwrap();
        let fourth = scan(d, &profiles, &third.last_good).unwrap();
        assert!(fourth.orders.is_empty());
        assert!(fourth.last_good.is_empty());
    }

    #[test]
    fn cached_scan_sees_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut cache = ParseCache::default();
        write(d, "a.toml", GOOD);
        let first = scan_cached(d, &profiles, &BTreeMap::new(), &mut cache).unwrap();
        assert_eq!(first.orders[0].order.user, "anna.andersson");
        // Same length, new content: still noticed.
        write(
            d,
            "a.toml",
            &GOOD.replace("anna.andersson", "anna.anderssoX"),
        );
        let second = scan_cached(d, &profiles, &first.last_good, &mut cache).unwrap();
        assert_eq!(second.orders[0].order.user, "anna.anderssoX");
        std::fs::remove_file(d.join("a.toml")).unwrap();
        let third = scan_cached(d, &profiles, &second.last_good, &mut cache).unwrap();
        assert!(third.orders.is_empty());
        assert!(cache.entries.is_empty());
    }

    #[test]
    fn the_one_lookup_read_leaves_every_unusual_file_to_the_careful_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.toml", GOOD);
        let (stamp, parsed) = load_regular_file(&d.join("a.toml"), FileKind::Toml, &profiles)
            .expect("a regular file is read");
        // The stamp is the one a later scan compares with.
        assert_eq!(Some(stamp), FileStamp::of(&d.join("a.toml")));
        assert_eq!(parsed.unwrap().user, "anna.andersson");
        // Invalid content is still this read's result.
        write(d, "bad.toml", "id = ");
        let (_, parsed) = load_regular_file(&d.join("bad.toml"), FileKind::Toml, &profiles)
            .expect("a regular file is read");
        assert!(parsed.is_err());

        std::os::unix::fs::symlink(d.join("a.toml"), d.join("link.toml")).unwrap();
        std::fs::create_dir(d.join("dir.toml")).unwrap();
        let out = std::process::Command::new("mkfifo")
            .arg(d.join("fifo.toml"))
            .output()
            .expect("run mkfifo");
        assert!(out.status.success(), "mkfifo: {out:?}");
        write(d, "big.toml", &"#".repeat(MAX_ORDER_BYTES as usize + 1));
        for name in [
            "link.toml",
            "dir.toml",
            "fifo.toml",
            "big.toml",
            "gone.toml",
        ] {
            assert!(
                load_regular_file(&d.join(name), FileKind::Toml, &profiles).is_none(),
                "{name}"
            );
        }
    }

    /// A valid order for `user` naming the profile `wim`.
    fn order(id: &str, user: &str) -> String {
        format!("id = \"{id}\"\nuser = \"{user}\"\naccess = [\"wim\"]\nordered_by = \"m\"\n")
    }

    #[test]
    fn a_large_directory_read_on_several_threads_gives_what_one_thread_gives() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let n = PARALLEL_FROM + 88;
        for i in 0..n {
            write(
                d,
                &format!("o{i:04}.toml"),
                &order(&format!("O-{i}"), &format!("u{i}")),
            );
        }
        // An invalid file early, a pair sharing an id late (the last thread's part).
        write(d, "o0003.toml", "id = \"O-3\"\nuser = ");
        write(d, &format!("o{:04}.toml", n - 2), &order("O-7", "x"));
        let mut cache = ParseCache::default();
        let scan = scan_cached(d, &profiles, &BTreeMap::new(), &mut cache).unwrap();
        let invalid: Vec<&str> = scan.invalid.iter().map(|f| f.file.as_str()).collect();
        let late = format!("o{:04}.toml", n - 2);
        assert_eq!(invalid, ["o0003.toml", "o0007.toml", late.as_str()]);
        assert_eq!(scan.orders.len(), n - 3);
        assert!(scan.orders.windows(2).all(|w| w[0].file < w[1].file));
        assert_eq!(scan.orders[0].order.id, "O-0");
        assert_eq!(scan.orders.last().unwrap().order.id, format!("O-{}", n - 1));
        // Every file is cached, and an unchanged directory reads nothing again.
        assert_eq!(cache.entries.len(), n);
        cache.changed = false;
        let again = scan_cached(d, &profiles, &scan.last_good, &mut cache).unwrap();
        assert!(!cache.changed());
        assert_eq!(again.orders, scan.orders);
    }

    #[test]
    fn quick_view_gives_the_users_orders_or_leaves_it_to_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a1.toml", &order("A-1", "anna"));
        write(d, "b1.toml", &order("B-1", "bertil"));
        let mut cache = ParseCache::default();
        scan_cached(d, &profiles, &BTreeMap::new(), &mut cache).unwrap();
        let names = |v: &[LoadedOrder]| v.iter().map(|o| o.file.clone()).collect::<Vec<_>>();

        // A new file: it and the user's other orders, nobody else's.
        write(d, "a2.toml", &order("A-2", "anna"));
        let view = cache
            .quick_view(d, &["a2.toml".to_string()], &profiles)
            .unwrap();
        assert_eq!(names(&view), ["a1.toml", "a2.toml"]);
        assert!(cache.changed());

        let quick = |cache: &mut ParseCache, name: &str| {
            cache.quick_view(d, &[name.to_string()], &profiles)
        };
        // Gone, invalid, not an order file: a full scan decides.
        assert!(quick(&mut cache, "nope.toml").is_none());
        write(d, "bad.toml", "id = 1");
        assert!(quick(&mut cache, "bad.toml").is_none());
        write(d, "notes.txt", &order("N-1", "nils"));
        assert!(quick(&mut cache, "notes.txt").is_none());
        // An id another file uses (both are invalid after a full scan).
        write(d, "b2.toml", &order("A-1", "bertil"));
        assert!(quick(&mut cache, "b2.toml").is_none());
        std::fs::remove_file(d.join("b2.toml")).unwrap();
        cache.entries.remove("b2.toml");
        // Another file of the user removed since the last scan.
        std::fs::remove_file(d.join("a1.toml")).unwrap();
        write(d, "a3.toml", &order("A-3", "anna"));
        assert!(quick(&mut cache, "a3.toml").is_none());
        // Bertil's other file is unchanged: his view holds it.
        write(d, "b3.toml", &order("B-3", "bertil"));
        assert_eq!(
            names(&quick(&mut cache, "b3.toml").unwrap()),
            ["b1.toml", "b3.toml"]
        );
    }

    #[test]
    fn missing_directory_is_an_error_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scan(&dir.path().join("nope"), &profiles, &BTreeMap::new()).is_err());
    }

    #[test]
    fn huge_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "big.toml",
            &format!("{GOOD}\n# {}", "x".repeat(100_000)),
        );
        let e = load_file(&dir.path().join("big.toml"), &profiles).unwrap_err();
        assert!(e.contains("at most"), "{e}");
    }
}
