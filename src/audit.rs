//! The audit log: an append-only, hash-chained JSON Lines file (SPEC.md §6) plus its anchor.
//!
//! This module owns the on-disk format of the log, appending to it durably, reading records back
//! for crash recovery, and the full verification behind `coursegate audit verify`. Every record
//! is one line of compact JSON with sorted keys. `hash` is the SHA-256 of the record without
//! `hash`, and `prev` is the previous record's `hash`, so any JSON tool can recompute the chain.
//! A chain alone cannot show that its newest records were cut off. So the last `seq` and `hash`
//! are also kept outside the log, in an *anchor* file in `state_dir`:
//! `{"hash":"<64 hex>","seq":N}`.
//!
//! What the chain and anchor do and do not prove: they detect a record that was edited, removed or
//! reordered anywhere in the log, and truncation of its end. They use no secret key, so someone
//! who can write both the log and `state_dir` can forge a consistent history. Ship the log off the
//! host if that matters. Valid records *beyond* the anchor are accepted, by `open` and by
//! [`verify`]. A crash between fsyncing the log and replacing the anchor leaves exactly that
//! state. [`VerifySummary::anchor_seq`] tells the auditor how many records the anchor does not
//! yet cover.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Backward reads of the tail go in chunks of this size.
const TAIL_CHUNK: u64 = 64 * 1024;

/// How far back `open` will read to confirm that records beyond the anchor chain onto it. A crash
/// between append and anchor update leaves at most one batch beyond the anchor, and a first run
/// granting a few thousand memberships fits in this budget. Beyond it, the lag is accepted with a
/// warning rather than reading a large log at every start.
const ANCHOR_LAG_SCAN_BUDGET: u64 = 4 * 1024 * 1024;

// === Types ===

/// One event to append; the log adds `seq`, `ts`, `prev` and `hash`.
///
/// Optional fields are left out of the JSON when `None` or empty. Keep floats out of `detail`
/// (append refuses them): JSON tools disagree on how to print a float, and an auditor must be
/// able to recompute the hash byte for byte. Write ratios as strings (`"0.2"`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// `grant` | `revoke` | `outcome` | `brake` | `order-invalid` | `torn-tail` | …
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_dn: Option<String>,
    /// The value written to the group's member attribute (a DN, or an account for `memberUid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<Evidence>,
    /// For `outcome` records: the `seq` of the grant/revoke this settles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_seq: Option<u64>,
    /// For `outcome` records: `applied` | `not-applied`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Free-form extra (brake numbers, torn-tail file …). No floats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

/// A course pass that justified a grant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Evidence {
    pub course: String,
    pub passed_at: String,
    pub source: String,
    /// The learning platform's own ids for this pass (HTTP platforms only; a results report has
    /// none). Left out of the JSON when absent, so records written before it existed hash alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_ref: Option<PlatformRef>,
}

/// Where a learning platform keeps the pass, in its own terms, so an auditor can look it up
/// there. Every value is a string (no floats in hashed records).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlatformRef {
    /// `moodle` | `canvas` | `xapi`.
    pub platform: String,
    /// The course as the platform names it: Moodle course id, Canvas course id, xAPI activity IRI.
    pub course_id: String,
    /// The platform's id of the person (Moodle user id, Canvas user id), where it said one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The xAPI statement that records the pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_id: Option<String>,
    /// The xAPI verb of that statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verb: Option<String>,
    /// The completion time exactly as the platform wrote it (Moodle: Unix seconds; Canvas and
    /// xAPI: an ISO 8601 time stamp).
    pub completed_at: String,
}

/// A record as read back from the log.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    /// 1-based line number in the log file.
    pub line: usize,
    pub event: Event,
    pub hash: String,
}

/// What [`verify`] found in a good log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub records: u64,
    pub last_seq: u64,
    pub last_hash: String,
    /// The `seq` the anchor records. Usually equal to `last_seq`. Smaller if the process stopped
    /// between appending and updating the anchor. The chain still vouches for those extra records,
    /// but nothing outside the log does.
    pub anchor_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: cannot {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "audit log {path} is locked by another writer (another coursegate process, or a second \
         AuditLog in this one); only one may append"
    )]
    Locked { path: PathBuf },

    /// A line that does not parse or does not chain. Reported by [`verify`] and
    /// [`AuditLog::records_after`].
    #[error("audit log {path}, line {line}: {problem}")]
    BadLine {
        path: PathBuf,
        line: usize,
        problem: String,
    },

    /// Damage found by `open`, which reads only the tail and so cannot name a line.
    #[error(
        "audit log {path}: {problem}; refusing to append. Run `coursegate audit verify` for details"
    )]
    Corrupt { path: PathBuf, problem: String },

    #[error(
        "audit log {path} ends at seq {last_seq} but its anchor {anchor} records seq {anchor_seq}: \
         the log was truncated or replaced; refusing to append. Run `coursegate audit verify` and \
         restore the log from a backup"
    )]
    AnchorAhead {
        path: PathBuf,
        anchor: PathBuf,
        anchor_seq: u64,
        last_seq: u64,
    },

    /// Reported by [`verify`] when the log ends before the anchor's record. `line` is the first
    /// missing line.
    #[error(
        "audit log {path}, line {line}: missing; the log ends at seq {last_seq} but its anchor \
         {anchor} records seq {anchor_seq}, so records were cut off"
    )]
    Truncated {
        path: PathBuf,
        anchor: PathBuf,
        line: usize,
        anchor_seq: u64,
        last_seq: u64,
    },

    #[error(
        "audit log {path}{}: the record with seq {seq} has hash {log_hash}, but the anchor {anchor} \
         records {anchor_hash}: the log was rewritten or replaced",
        line.map(|l| format!(", line {l}")).unwrap_or_default()
    )]
    AnchorMismatch {
        path: PathBuf,
        anchor: PathBuf,
        line: Option<usize>,
        seq: u64,
        anchor_hash: String,
        log_hash: String,
    },

    #[error(
        "audit log {path} has records but its anchor {anchor} is missing, so truncation cannot be \
         ruled out; refusing to append. Run `coursegate audit verify`: it checks the chain and \
         shows the anchor to restore"
    )]
    AnchorMissing { path: PathBuf, anchor: PathBuf },

    /// [`verify`] found a good chain but no anchor. The message tells the operator how to restore it.
    #[error(
        "audit log {path}: the hash chain is intact ({records} records, last seq {last_seq}), but \
         its anchor {anchor} is missing, so records cut off from the end would go unnoticed. If you \
         trust this log (compare it with a backup or a shipped copy), restore the anchor by writing \
         {{\"hash\":\"{last_hash}\",\"seq\":{last_seq}}} to {anchor}"
    )]
    AnchorMissingVerified {
        path: PathBuf,
        anchor: PathBuf,
        records: u64,
        last_seq: u64,
        last_hash: String,
    },

    #[error("audit anchor {anchor}: {problem}")]
    BadAnchor { anchor: PathBuf, problem: String },

    #[error("audit log {path}: refusing to write event {action:?}: {problem}")]
    InvalidEvent {
        path: PathBuf,
        action: String,
        problem: String,
    },

    #[error(
        "audit log {path}: an earlier append failed, so the file's state is uncertain; no further \
         appends until it is reopened"
    )]
    Poisoned { path: PathBuf },
}

impl AuditError {
    /// The 1-based line number the error is about, where known.
    pub fn line(&self) -> Option<usize> {
        match self {
            AuditError::BadLine { line, .. } | AuditError::Truncated { line, .. } => Some(*line),
            AuditError::AnchorMismatch { line, .. } => *line,
            _ => None,
        }
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> AuditError + use<> {
    let path = path.to_path_buf();
    move |source| AuditError::Io { path, op, source }
}

// === Hashing and canonical JSON ===

/// Recomputes a record's hash: SHA-256, lower-case hex, of its canonical JSON (see SPEC §6).
///
/// A top-level `hash` key is ignored, so the parsed line can be passed as it is.
pub fn record_hash(record_without_hash: &Value) -> String {
    let mut canonical = String::new();
    match record_without_hash {
        Value::Object(map) => write_object(map, Some("hash"), &mut canonical),
        other => write_canonical(other, &mut canonical),
    }
    hex_digest(canonical.as_bytes())
}

/// Compact JSON with keys sorted recursively and non-ASCII left as UTF-8. This is what Python's
/// `json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` prints.
///
/// It sorts keys itself instead of relying on serde_json's default `BTreeMap`. Any crate in the
/// build that turns on serde_json's `preserve_order` feature would silently change that map
/// (Cargo unifies features) and with it every hash.
fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => write_object(map, None, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(text) => push_json_str(text, out),
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{n}");
        }
    }
}

/// Appends `text` as a JSON string the way serde_json and Python (`ensure_ascii=False`) write
/// it: `"` and `\` escaped, the short forms \b \f \n \r \t, other controls as \u00xx
/// (lower-case hex), nothing else. Written in place: a hash-chained batch of 20,000 records
/// otherwise allocated a string for every key and value twice over.
/// The SHA-256 of `bytes` in lower-case hex (what `hex::encode` writes, a table lookup per
/// byte instead of an iterator of characters: a first run hashes 60,000 records).
fn hex_digest(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut text = String::with_capacity(2 * digest.len());
    for b in digest {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    text
}

fn push_json_str(text: &str, out: &mut String) {
    out.push('"');
    let mut start = 0;
    // Everything that needs escaping is ASCII, and no byte of a multi-byte UTF-8 sequence is:
    // bytes are scanned, not decoded characters.
    for (i, &b) in text.as_bytes().iter().enumerate() {
        let escaped = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            b if b < 0x20 => "",
            _ => continue,
        };
        out.push_str(&text[start..i]);
        if escaped.is_empty() {
            use std::fmt::Write as _;
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

fn write_object(map: &Map<String, Value>, skip_key: Option<&str>, out: &mut String) {
    let mut entries: Vec<(&String, &Value)> = map
        .iter()
        .filter(|(k, _)| Some(k.as_str()) != skip_key)
        .collect();
    // Byte order of UTF-8 equals code point order, which is how Python sorts str keys.
    entries.sort_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (key, val)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(key, out);
        out.push(':');
        write_canonical(val, out);
    }
    out.push('}');
}

/// The end of the chain a batch is prepared on: the log's last `seq` and `hash`.
#[derive(Debug, Clone)]
pub struct ChainEnd {
    path: PathBuf,
    seq: u64,
    hash: String,
}

/// Records serialized and hashed, ready for [`AuditLog::commit`]; nothing is written yet.
#[derive(Debug)]
pub struct PreparedBatch {
    after_seq: u64,
    after_hash: String,
    /// The events, kept to prepare them again if the chain moved on meanwhile.
    events: Vec<Event>,
    /// The records' lines, each ending in `\n`.
    text: String,
    seqs: Vec<u64>,
    last_hash: String,
}

impl ChainEnd {
    /// Assigns `seq`, `ts` (now, UTC, milliseconds; one for the whole batch), `prev` and `hash`
    /// to each event and serializes the records. Refuses an event without `action` or with a
    /// float in `detail`.
    pub fn prepare(self, events: Vec<Event>) -> Result<PreparedBatch, AuditError> {
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut text = String::new();
        let mut seqs = Vec::with_capacity(events.len());
        let mut seq = self.seq;
        let mut prev = self.hash.clone();
        for event in &events {
            let invalid = |problem: String| AuditError::InvalidEvent {
                path: self.path.clone(),
                action: event.action.clone(),
                problem,
            };
            if event.action.is_empty() {
                return Err(invalid("`action` is empty".into()));
            }
            if let Some(at) = event.detail.as_ref().and_then(|d| find_float(d, "detail")) {
                return Err(invalid(format!(
                    "{at} is a float; JSON tools print floats differently, so the hash could not \
                     be recomputed reliably (write it as a string)"
                )));
            }
            seq = seq
                .checked_add(1)
                .ok_or_else(|| invalid("seq overflow".into()))?;
            let hash = push_event_record(event, seq, &ts, &prev, &mut text)
                .map_err(|e| invalid(format!("cannot serialize: {e}")))?;
            text.push('\n');
            if seqs.is_empty() {
                // Records of one batch are alike: room for all of them, with some to spare,
                // instead of growing (and copying) the text a dozen times for 20,000 records.
                let rest = events.len() - 1;
                text.reserve(
                    text.len()
                        .saturating_mul(rest)
                        .saturating_add(text.len() * rest / 8),
                );
            }
            seqs.push(seq);
            prev = hash;
        }
        Ok(PreparedBatch {
            after_seq: self.seq,
            after_hash: self.hash,
            events,
            text,
            seqs,
            last_hash: prev,
        })
    }
}

/// Appends the record of `event` (with `seq`, `ts`, `prev` and its `hash`) to `out` and returns
/// the hash. Writes the fields straight from the event in sorted key order, as [`record_hash`] and
/// [`canonical_json`] write the event serialized to a map (a property test holds them equal): a first run writes
/// 60,000 records, and going through a map cost more than the rest of the record's way to disk.
fn push_event_record(
    event: &Event,
    seq: u64,
    ts: &str,
    prev: &str,
    out: &mut String,
) -> Result<String, serde_json::Error> {
    let start = out.len();
    out.push('{');
    let mut fields = Fields { out, first: true };
    fields.text("access", event.access.as_deref());
    fields.text("action", Some(&event.action));
    if let Some(detail) = &event.detail {
        write_canonical(detail, fields.key("detail"));
    }
    if !event.evidence.is_empty() {
        let out = fields.key("evidence");
        out.push('[');
        for (i, e) in event.evidence.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('{');
            let mut inner = Fields { out, first: true };
            inner.text("course", Some(&e.course));
            inner.text("passed_at", Some(&e.passed_at));
            if let Some(platform_ref) = &e.platform_ref {
                write_canonical(
                    &serde_json::to_value(platform_ref)?,
                    inner.key("platform_ref"),
                );
            }
            inner.text("source", Some(&e.source));
            out.push('}');
        }
        out.push(']');
    }
    fields.text("group", event.group.as_deref());
    // `hash` sorts here; `action` always comes before it, so it is never the first key.
    let hash_at = fields.out.len();
    fields.text("member", event.member.as_deref());
    fields.text("order", event.order.as_deref());
    fields.text("outcome", event.outcome.as_deref());
    fields.text("prev", Some(prev));
    fields.text("reason", event.reason.as_deref());
    if let Some(ref_seq) = event.ref_seq {
        push_u64(ref_seq, fields.key("ref_seq"));
    }
    push_u64(seq, fields.key("seq"));
    fields.text("ticket", event.ticket.as_deref());
    fields.text("ts", Some(ts));
    fields.text("user", event.user.as_deref());
    fields.text("user_dn", event.user_dn.as_deref());
    out.push('}');
    let hash = hex_digest(&out.as_bytes()[start..]);
    out.insert_str(hash_at, &format!(",\"hash\":\"{hash}\""));
    Ok(hash)
}

/// Writes the members of one JSON object, a comma before all but the first.
struct Fields<'a> {
    out: &'a mut String,
    first: bool,
}

impl Fields<'_> {
    /// Writes `"name":` and returns where the value goes.
    fn key(&mut self, name: &str) -> &mut String {
        if !std::mem::take(&mut self.first) {
            self.out.push(',');
        }
        push_json_str(name, self.out);
        self.out.push(':');
        self.out
    }

    /// Writes `"name":"value"`, or nothing for `None`.
    fn text(&mut self, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            push_json_str(value, self.key(name));
        }
    }
}

fn push_u64(n: u64, out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(out, "{n}");
}

/// Finds a float anywhere in `value`, as a path for the error message.
fn find_float(value: &Value, path: &str) -> Option<String> {
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => Some(path.to_string()),
        Value::Object(map) => map
            .iter()
            .find_map(|(k, v)| find_float(v, &format!("{path}.{k}"))),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_float(v, &format!("{path}[{i}]"))),
        _ => None,
    }
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// === Parsing one line ===

struct Parsed {
    seq: u64,
    prev: String,
    hash: String,
    event: Event,
}

/// Parses and self-checks one line (without its '\n'): JSON object, required fields, the hash,
/// canonical form, and the event's field types. Chain checks (`seq`, `prev`) belong to the caller.
fn parse_record(line: &[u8]) -> Result<Parsed, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let Value::Object(mut map) = value else {
        return Err("not a JSON object".into());
    };
    let hash = match map.get("hash") {
        Some(Value::String(h)) => h.clone(),
        Some(_) => return Err("`hash` is not a string".into()),
        None => return Err("no `hash`".into()),
    };
    let mut without_hash = String::new();
    write_object(&map, Some("hash"), &mut without_hash);
    let computed = hex_digest(without_hash.as_bytes());
    if computed != hash {
        return Err(format!(
            "hash does not match the content (stored {hash}, computed {computed}): the record was \
             edited"
        ));
    }
    // Two readers must not be able to see two different records in one line. Duplicate keys, for
    // instance, are resolved differently by different JSON parsers. Requiring the exact canonical
    // bytes rules that out.
    let mut canonical = String::new();
    write_object(&map, None, &mut canonical);
    if canonical.as_bytes() != line {
        return Err(
            "not in canonical form (sorted keys, no spaces, no duplicate keys): the line was \
             edited"
                .into(),
        );
    }
    map.remove("hash");

    let seq = match map.remove("seq") {
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|s| *s >= 1)
            .ok_or_else(|| format!("`seq` {n} is not a positive integer"))?,
        Some(_) => return Err("`seq` is not a number".into()),
        None => return Err("no `seq`".into()),
    };
    let prev = match map.remove("prev") {
        Some(Value::String(p)) if is_hash(&p) => p,
        Some(_) => return Err("`prev` is not a 64-digit lower-case hex string".into()),
        None => return Err("no `prev`".into()),
    };
    match map.remove("ts") {
        Some(Value::String(ts)) => {
            chrono::DateTime::parse_from_rfc3339(&ts)
                .map_err(|e| format!("`ts` {ts:?} is not an RFC 3339 time: {e}"))?;
        }
        Some(_) => return Err("`ts` is not a string".into()),
        None => return Err("no `ts`".into()),
    }
    // Unknown keys are tolerated (a newer coursegate may add some); the hash covers them anyway.
    let event: Event = serde_json::from_value(Value::Object(map))
        .map_err(|e| format!("not a valid event: {e}"))?;
    Ok(Parsed {
        seq,
        prev,
        hash,
        event,
    })
}

// === Anchor ===

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Anchor {
    seq: u64,
    hash: String,
}

fn read_anchor(anchor_path: &Path) -> Result<Option<Anchor>, AuditError> {
    let bytes = match fs::read(anchor_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AuditError::Io {
                path: anchor_path.to_path_buf(),
                op: "read the anchor",
                source,
            });
        }
    };
    let bad = |problem: String| AuditError::BadAnchor {
        anchor: anchor_path.to_path_buf(),
        problem,
    };
    let anchor: Anchor = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("not {{\"hash\":\"…\",\"seq\":N}}: {e}")))?;
    if !is_hash(&anchor.hash) {
        return Err(bad("`hash` is not a 64-digit lower-case hex string".into()));
    }
    if anchor.seq == 0 && anchor.hash != GENESIS_HASH {
        return Err(bad("seq 0 must come with a hash of 64 zeros".into()));
    }
    Ok(Some(anchor))
}

/// Replaces the anchor atomically: write a temp file, fsync it, rename it over. On `Err` the old
/// anchor is untouched. The caller still has to fsync the directory ([`sync_dir`]) to make the
/// rename durable.
fn replace_anchor(anchor_path: &Path, anchor: &Anchor) -> Result<(), AuditError> {
    let mut tmp_name = anchor_path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut text = canonical_json(&serde_json::json!({"seq": anchor.seq, "hash": anchor.hash}));
    text.push('\n');
    let write_tmp = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    write_tmp().map_err(io_err(&tmp, "write the new anchor"))?;
    fs::rename(&tmp, anchor_path).map_err(io_err(anchor_path, "rename the new anchor into place"))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes a create, rename or truncate of a file in that directory durable.
fn sync_dir(path_in_dir: &Path) -> io::Result<()> {
    File::open(parent_dir(path_in_dir))?.sync_all()
}

// === Reading files ===

/// `Read` over `[pos, end)` of a file by positioned reads. It leaves the file's cursor alone,
/// so `&AuditLog` can be read while shared, and it never sees bytes past the known end.
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let max = buf.len().min(left);
        if max == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..max], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Offset just past the last '\n' in the first `len` bytes (0 if there is none). Bytes beyond it
/// are a torn tail.
fn complete_end(file: &File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; TAIL_CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Lines of `[0, end)` from last to first, read backwards in chunks. `end` must be 0 or just
/// past a '\n'. Used so that `open` reads the tail, not the whole log.
struct ReverseLines<'a> {
    file: &'a File,
    /// File offset of `pending[0]`.
    start: u64,
    /// Bytes not yet returned; empty or ending with the '\n' of the next line to return.
    pending: Vec<u8>,
    bytes_read: u64,
}

impl<'a> ReverseLines<'a> {
    fn new(file: &'a File, end: u64) -> Self {
        ReverseLines {
            file,
            start: end,
            pending: Vec::new(),
            bytes_read: 0,
        }
    }

    fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some((_, body)) = self.pending.split_last() {
                if let Some(i) = body.iter().rposition(|&b| b == b'\n') {
                    let line = body[i + 1..].to_vec();
                    self.pending.truncate(i + 1);
                    return Ok(Some(line));
                }
                if self.start == 0 {
                    let line = body.to_vec();
                    self.pending.clear();
                    return Ok(Some(line));
                }
            } else if self.start == 0 {
                return Ok(None);
            }
            let new_start = self.start.saturating_sub(TAIL_CHUNK);
            let mut chunk = vec![0u8; (self.start - new_start) as usize];
            self.file.read_exact_at(&mut chunk, new_start)?;
            self.bytes_read += chunk.len() as u64;
            chunk.extend_from_slice(&self.pending);
            self.pending = chunk;
            self.start = new_start;
        }
    }
}

// === impl AuditLog ===

/// The open, exclusively locked audit log, ready to append.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    anchor_path: PathBuf,
    /// Opened read + append; holds an exclusive advisory lock (`flock`) for as long as we live, so
    /// two writers can never fork the chain.
    file: File,
    /// Bytes of the log we vouch for; everything before it is complete records.
    len: u64,
    last_seq: u64,
    last_hash: String,
    /// Set when an append failed after it started writing: the on-disk state is then uncertain
    /// (fsync errors may lose pages silently), and only a fresh `open` can tell.
    poisoned: bool,
}

impl AuditLog {
    /// Opens the log at `path`, creating it if missing (its directory must exist), and checks it
    /// against its anchor file at `anchor_path` (in `state_dir`).
    ///
    /// Only the tail is read. The last record must be intact. Anchor seq equal to the last seq:
    /// the hashes must match. Anchor seq smaller: the process stopped between appending and
    /// updating the anchor. The records beyond the anchor are accepted once they are confirmed
    /// to chain onto the anchor's hash (or unconfirmed, with a warning, if that would mean reading
    /// more than a few MiB). An anchor ahead of the log, a hash mismatch, or a missing anchor for
    /// a non-empty log is an error: the log was truncated or replaced, so nothing may be appended.
    ///
    /// A torn last line (bytes after the final '\n', left by a crash mid-write) is moved to
    /// `<log name>.torn-<unix seconds>` beside the log. The log is cut back to the last '\n', and a
    /// `torn-tail` event is appended. A torn line is never extended, which would fuse two records
    /// into one bad line.
    pub fn open(path: &Path, anchor_path: &Path) -> Result<AuditLog, AuditError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(AuditError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(AuditError::Io {
                    path: path.to_path_buf(),
                    op: "lock",
                    source,
                });
            }
        }
        // The file may just have been created; make its directory entry durable too.
        sync_dir(path).map_err(io_err(path, "fsync the log's directory"))?;

        let file_len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let end = complete_end(&file, file_len).map_err(io_err(path, "read the tail"))?;

        let corrupt = |problem: String| AuditError::Corrupt {
            path: path.to_path_buf(),
            problem,
        };
        let mut lines = ReverseLines::new(&file, end);
        let last = match lines.next_line().map_err(io_err(path, "read the tail"))? {
            Some(line) => Some(
                parse_record(&line).map_err(|p| corrupt(format!("the last complete line: {p}")))?,
            ),
            None => None,
        };
        let (last_seq, last_hash) = match &last {
            Some(r) => (r.seq, r.hash.clone()),
            None => (0, GENESIS_HASH.to_string()),
        };

        let anchor = read_anchor(anchor_path)?;
        match &anchor {
            None if last_seq > 0 => {
                return Err(AuditError::AnchorMissing {
                    path: path.to_path_buf(),
                    anchor: anchor_path.to_path_buf(),
                });
            }
            None => {}
            Some(a) if a.seq > last_seq => {
                return Err(AuditError::AnchorAhead {
                    path: path.to_path_buf(),
                    anchor: anchor_path.to_path_buf(),
                    anchor_seq: a.seq,
                    last_seq,
                });
            }
            Some(a) if a.seq == last_seq && a.hash != last_hash => {
                return Err(AuditError::AnchorMismatch {
                    path: path.to_path_buf(),
                    anchor: anchor_path.to_path_buf(),
                    line: None,
                    seq: a.seq,
                    anchor_hash: a.hash.clone(),
                    log_hash: last_hash,
                });
            }
            Some(a) if a.seq < last_seq => {
                if let Some(newest) = last {
                    check_lag(path, anchor_path, a, newest, &mut lines)?;
                }
            }
            Some(_) => {}
        }
        tracing::info!(
            log = %path.display(),
            last_seq,
            last_hash = %last_hash,
            anchor_seq = anchor.as_ref().map(|a| a.seq),
            anchor_hash = anchor.as_ref().map(|a| a.hash.as_str()),
            "audit log opened"
        );

        let mut log = AuditLog {
            path: path.to_path_buf(),
            anchor_path: anchor_path.to_path_buf(),
            file,
            len: end,
            last_seq,
            last_hash,
            poisoned: false,
        };
        if file_len > end {
            log.set_aside_torn_tail(end, file_len)?;
        }
        Ok(log)
    }

    /// Moves bytes `[end, file_len)` to a side file, cuts the log back to `end`, and records that
    /// in the log.
    fn set_aside_torn_tail(&mut self, end: u64, file_len: u64) -> Result<(), AuditError> {
        let path = self.path.clone();
        let mut torn = vec![0u8; usize::try_from(file_len - end).unwrap_or(usize::MAX)];
        self.file
            .read_exact_at(&mut torn, end)
            .map_err(io_err(&path, "read the torn tail"))?;

        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let log_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "audit.jsonl".into());
        let (side_path, mut side) =
            create_side_file(parent_dir(&path), &format!("{log_name}.torn-{secs}"))
                .map_err(io_err(&path, "create a side file for the torn tail"))?;
        side.write_all(&torn)
            .and_then(|()| side.sync_all())
            .map_err(io_err(&side_path, "write the torn tail"))?;
        // Only once the bytes are safe in the side file may they leave the log.
        self.file
            .set_len(end)
            .and_then(|()| self.file.sync_all())
            .map_err(io_err(&path, "truncate the torn tail"))?;
        sync_dir(&path).map_err(io_err(&path, "fsync the log's directory"))?;

        let side_name = side_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = torn.len() as u64;
        tracing::warn!(
            log = %path.display(),
            file = %side_path.display(),
            bytes,
            "audit log ended in an incomplete line (a crash mid-write); moved it aside"
        );
        self.append(vec![Event {
            action: "torn-tail".into(),
            reason: Some(
                "incomplete last line, left by a crash mid-write, moved to a side file".into(),
            ),
            detail: Some(serde_json::json!({
                "file": side_name,
                "bytes": bytes,
                "sha256": hex_digest(&torn),
            })),
            ..Event::default()
        }])?;
        Ok(())
    }

    /// Appends all events as one batch: assigns `seq`, `ts` (now, UTC, milliseconds; one `ts` for
    /// the whole batch), `prev` and `hash`, makes one write and one fsync of the log, then
    /// replaces the anchor. Returns the assigned seqs; an empty batch is a no-op.
    ///
    /// On `Err` nothing may be considered written. Where possible the log is cut back to its
    /// length before the call. A record that nevertheless survives (e.g. the cut failed too) is
    /// settled later by the caller's recovery through an `outcome` record. After a failed write
    /// the log is poisoned: further appends fail until it is reopened.
    pub fn append(&mut self, events: Vec<Event>) -> Result<Vec<u64>, AuditError> {
        let batch = self.chain_end().prepare(events)?;
        self.commit(batch)
    }

    /// Where the next batch chains on, to [`ChainEnd::prepare`] it, possibly on another thread,
    /// while this log goes on (see [`AuditLog::commit`]).
    pub fn chain_end(&self) -> ChainEnd {
        ChainEnd {
            path: self.path.clone(),
            seq: self.last_seq,
            hash: self.last_hash.clone(),
        }
    }

    /// Writes a prepared batch as [`AuditLog::append`] does. A batch prepared on an end that is no
    /// longer the log's (other records were appended since) is prepared again on the current
    /// end, with a new `ts`: the chain is never forked.
    pub fn commit(&mut self, batch: PreparedBatch) -> Result<Vec<u64>, AuditError> {
        if batch.events.is_empty() {
            return Ok(Vec::new());
        }
        if self.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.clone(),
            });
        }
        let batch = if batch.after_seq == self.last_seq && batch.after_hash == self.last_hash {
            batch
        } else {
            self.chain_end().prepare(batch.events)?
        };
        let PreparedBatch {
            text: batch,
            seqs,
            last_hash: prev,
            ..
        } = batch;
        let seq = seqs.last().copied().unwrap_or(self.last_seq);

        // From here on a failure leaves the disk in doubt: poison first, clear on success.
        self.poisoned = true;
        let written = (&self.file)
            .write_all(batch.as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(source) = written {
            self.roll_back();
            return Err(AuditError::Io {
                path: self.path.clone(),
                op: "append",
                source,
            });
        }
        let anchor = Anchor {
            seq,
            hash: prev.clone(),
        };
        if let Err(e) = replace_anchor(&self.anchor_path, &anchor) {
            // The old anchor is still in place, so the new records can go again.
            self.roll_back();
            return Err(e);
        }
        // The anchor is replaced but maybe not durably. Either anchor is legal after a crash (one
        // lagging the log is accepted), so the records stay, and the log stays poisoned.
        sync_dir(&self.anchor_path)
            .map_err(io_err(&self.anchor_path, "fsync the anchor's directory"))?;
        self.len += batch.len() as u64;
        self.last_seq = seq;
        self.last_hash = prev;
        self.poisoned = false;
        Ok(seqs)
    }

    /// Best effort: cut the log back to the last length we vouch for.
    fn roll_back(&self) {
        if let Err(e) = self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.sync_all())
        {
            tracing::error!(
                log = %self.path.display(),
                error = %e,
                "could not cut a failed append off the audit log; reopening will show what is on disk"
            );
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records with `seq > after`, oldest first, for crash recovery. Scans the file from the start
    /// (for true line numbers). Lines up to `after` are only checked for their `seq`; later ones
    /// are fully checked and must chain.
    pub fn records_after(&self, after: u64) -> Result<Vec<Record>, AuditError> {
        #[derive(Deserialize)]
        struct SeqOnly {
            seq: u64,
        }
        let mut reader = BufReader::new(ReadAt {
            file: &self.file,
            pos: 0,
            end: self.len,
        });
        let bad = |line: usize, problem: String| AuditError::BadLine {
            path: self.path.clone(),
            line,
            problem,
        };
        let mut out: Vec<Record> = Vec::new();
        let mut buf = Vec::new();
        let mut line_no = 0usize;
        // The hash of record `after`, once seen, so that the first returned record can be chained.
        let mut prev_hash: Option<String> = (after == 0).then(|| GENESIS_HASH.to_string());
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(io_err(&self.path, "read"))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let Some(line) = buf.strip_suffix(b"\n") else {
                return Err(bad(line_no, "incomplete line (no newline)".into()));
            };
            let seq = serde_json::from_slice::<SeqOnly>(line)
                .map_err(|e| bad(line_no, format!("no readable `seq`: {e}")))?
                .seq;
            if seq < after {
                continue;
            }
            let parsed = parse_record(line).map_err(|p| bad(line_no, p))?;
            if seq == after {
                prev_hash = Some(parsed.hash);
                continue;
            }
            let expected = out.last().map_or(after + 1, |r| r.seq + 1);
            if parsed.seq != expected {
                return Err(bad(
                    line_no,
                    format!("seq is {}, expected {expected}", parsed.seq),
                ));
            }
            if let Some(p) = &prev_hash
                && parsed.prev != *p
            {
                return Err(bad(
                    line_no,
                    "`prev` does not match the previous record's hash".into(),
                ));
            }
            prev_hash = Some(parsed.hash.clone());
            out.push(Record {
                seq: parsed.seq,
                line: line_no,
                event: parsed.event,
                hash: parsed.hash,
            });
        }
        Ok(out)
    }
}

/// Creates `dir/name` exclusively, or `dir/name-1`, `-2`, … if taken, so an earlier side file is
/// never overwritten.
fn create_side_file(dir: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    let mut n = 0u32;
    loop {
        let candidate = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{name}-{n}"))
        };
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate)
        {
            Ok(f) => return Ok((candidate, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// The anchor lags the log (`a.seq < newest.seq`): walk back from the newest record and confirm
/// that the records beyond the anchor chain down onto the anchor's hash, within a read budget.
fn check_lag(
    path: &Path,
    anchor_path: &Path,
    a: &Anchor,
    newest: Parsed,
    lines: &mut ReverseLines<'_>,
) -> Result<(), AuditError> {
    let corrupt = |problem: String| AuditError::Corrupt {
        path: path.to_path_buf(),
        problem,
    };
    let mut newer = newest;
    // `newer` is the oldest record seen so far; stop once it is the one right after the anchor.
    while newer.seq > a.seq + 1 {
        if lines.bytes_read > ANCHOR_LAG_SCAN_BUDGET {
            tracing::warn!(
                log = %path.display(),
                anchor_seq = a.seq,
                "audit log runs far beyond its anchor; accepting without reading back that far \
                 (`coursegate audit verify` checks the whole chain)"
            );
            return Ok(());
        }
        let Some(line) = lines.next_line().map_err(io_err(path, "read the tail"))? else {
            return Err(corrupt(format!(
                "the first record has seq {}, not 1",
                newer.seq
            )));
        };
        let older = parse_record(&line)
            .map_err(|p| corrupt(format!("the record before seq {}: {p}", newer.seq)))?;
        if older.seq + 1 != newer.seq || newer.prev != older.hash {
            return Err(corrupt(format!(
                "the record before seq {} does not chain onto it (found seq {})",
                newer.seq, older.seq
            )));
        }
        newer = older;
    }
    if newer.prev != a.hash {
        return Err(AuditError::AnchorMismatch {
            path: path.to_path_buf(),
            anchor: anchor_path.to_path_buf(),
            line: None,
            seq: a.seq,
            anchor_hash: a.hash.clone(),
            log_hash: newer.prev,
        });
    }
    tracing::warn!(
        log = %path.display(),
        anchor_seq = a.seq,
        last_seq = newer.seq,
        "audit anchor lags the log (stopped between append and anchor update); the extra records \
         chain onto it, continuing"
    );
    Ok(())
}

// === verify ===

/// Full verification for `coursegate audit verify`.
///
/// Checks that every line is a canonical, self-consistent record, that `seq` starts at 1 and grows
/// by one, that every `prev` is the previous `hash` (64 zeros first), and that the anchor matches:
/// its record exists with the same hash. An error names the first bad line (1-based). Valid records
/// beyond the anchor are accepted, because a crash between append and anchor update leaves
/// exactly that. [`VerifySummary::anchor_seq`] shows how many there are. A missing log counts as an
/// empty one. An incomplete last line is an error: the next `open` moves it aside.
pub fn verify(path: &Path, anchor_path: &Path) -> Result<VerifySummary, AuditError> {
    let anchor = read_anchor(anchor_path)?;
    let file = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(AuditError::Io {
                path: path.to_path_buf(),
                op: "open",
                source,
            });
        }
    };
    let bad = |line: usize, problem: String| AuditError::BadLine {
        path: path.to_path_buf(),
        line,
        problem,
    };

    let mut records = 0u64;
    let mut last_seq = 0u64;
    let mut last_hash = GENESIS_HASH.to_string();
    // Hash of the anchor's record as found in the log, with its line.
    let mut anchored: Option<(usize, String)> = None;
    if let Some(file) = file {
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut line_no = 0usize;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(io_err(path, "read"))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let Some(line) = buf.strip_suffix(b"\n") else {
                return Err(bad(
                    line_no,
                    "incomplete last line (no newline), left by a crash mid-write; the next start \
                     of coursegate moves it to a side file"
                        .into(),
                ));
            };
            let parsed = parse_record(line).map_err(|p| bad(line_no, p))?;
            let expected = last_seq + 1;
            if parsed.seq != expected {
                return Err(bad(
                    line_no,
                    format!(
                        "seq is {}, expected {expected}: a record was removed, inserted or moved",
                        parsed.seq
                    ),
                ));
            }
            if parsed.prev != last_hash {
                return Err(bad(
                    line_no,
                    if line_no == 1 {
                        "`prev` of the first record is not 64 zeros".into()
                    } else {
                        format!(
                            "`prev` does not match the hash of line {}: that line or this one \
                             was altered",
                            line_no - 1
                        )
                    },
                ));
            }
            if anchor.as_ref().is_some_and(|a| a.seq == parsed.seq) {
                anchored = Some((line_no, parsed.hash.clone()));
            }
            records += 1;
            last_seq = parsed.seq;
            last_hash = parsed.hash;
        }
    }

    let Some(anchor) = anchor else {
        if records == 0 {
            return Ok(VerifySummary {
                records,
                last_seq,
                last_hash,
                anchor_seq: 0,
            });
        }
        return Err(AuditError::AnchorMissingVerified {
            path: path.to_path_buf(),
            anchor: anchor_path.to_path_buf(),
            records,
            last_seq,
            last_hash,
        });
    };
    if anchor.seq > last_seq {
        return Err(AuditError::Truncated {
            path: path.to_path_buf(),
            anchor: anchor_path.to_path_buf(),
            // seq n is on line n in a log that got this far, so this is the first missing line.
            line: usize::try_from(last_seq + 1).unwrap_or(usize::MAX),
            anchor_seq: anchor.seq,
            last_seq,
        });
    }
    let (line, log_hash) = anchored.unwrap_or((0, GENESIS_HASH.to_string()));
    if log_hash != anchor.hash {
        return Err(AuditError::AnchorMismatch {
            path: path.to_path_buf(),
            anchor: anchor_path.to_path_buf(),
            line: (line > 0).then_some(line),
            seq: anchor.seq,
            anchor_hash: anchor.hash,
            log_hash,
        });
    }
    Ok(VerifySummary {
        records,
        last_seq,
        last_hash,
        anchor_seq: anchor.seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn strings_are_written_exactly_as_serde_json_writes_them() {
        let mut samples: Vec<String> = (0u32..0x80)
            .map(|c| char::from_u32(c).unwrap().to_string())
            .collect();
        samples.extend(
            [
                "",
                "Åsa Öberg",
                "a\"b\\c",
                "\u{7f}\u{80}\u{2028}\u{1f600}",
                "x\u{1}y\n",
            ]
            .map(String::from),
        );
        for text in samples {
            let mut out = String::new();
            push_json_str(&text, &mut out);
            assert_eq!(out, serde_json::to_string(&text).unwrap(), "{text:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_written_as_serde_json_writes_it(text in "\\PC*|[\\x00-\\x7f]*") {
            let mut out = String::new();
            push_json_str(&text, &mut out);
            proptest::prop_assert_eq!(out, serde_json::to_string(&text).unwrap());
        }
    }

    /// The record the slow way: the event serialized to a map, hashed, the hash added, sorted.
    fn record_through_a_map(event: &Event, seq: u64, ts: &str, prev: &str) -> String {
        let Value::Object(mut map) = serde_json::to_value(event).unwrap() else {
            panic!("not an object")
        };
        map.insert("seq".into(), Value::from(seq));
        map.insert("ts".into(), Value::from(ts));
        map.insert("prev".into(), Value::from(prev));
        let hash = record_hash(&Value::Object(map.clone()));
        map.insert("hash".into(), Value::from(hash));
        canonical_json(&Value::Object(map))
    }

    fn any_text() -> impl proptest::strategy::Strategy<Value = String> {
        "\\PC{0,6}|[\\x00-\\x7f]{0,4}"
    }

    fn any_event() -> impl proptest::strategy::Strategy<Value = Event> {
        use proptest::option::of;
        use proptest::prelude::*;
        let evidence = (
            any_text(),
            any_text(),
            any_text(),
            of((any_text(), of(any_text()))),
        )
            .prop_map(|(course, passed_at, source, platform)| Evidence {
                course,
                passed_at,
                source,
                platform_ref: platform.map(|(course_id, user_id)| PlatformRef {
                    platform: "moodle".into(),
                    course_id,
                    user_id,
                    ..PlatformRef::default()
                }),
            });
        let detail = of(proptest::collection::btree_map(
            any_text(),
            prop_oneof![
                any_text().prop_map(Value::from),
                any::<i64>().prop_map(Value::from)
            ],
            0..3,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect())));
        (
            (
                "[a-z-]{1,8}",
                of(any_text()),
                of(any_text()),
                of(any_text()),
                of(any_text()),
            ),
            (
                of(any_text()),
                of(any_text()),
                of(any_text()),
                of(any_text()),
            ),
            (
                proptest::collection::vec(evidence, 0..3),
                of(any::<u64>()),
                detail,
            ),
        )
            .prop_map(
                |(
                    (action, user, user_dn, member, access),
                    (group, order, ticket, reason),
                    (evidence, ref_seq, detail),
                )| Event {
                    action,
                    user,
                    user_dn,
                    member,
                    access,
                    group,
                    order,
                    ticket,
                    reason,
                    evidence,
                    outcome: ref_seq.map(|_| "applied".to_string()),
                    ref_seq,
                    detail,
                },
            )
    }

    proptest::proptest! {
        /// The one-pass record writer writes what sorting the serialized event writes.
        #[test]
        fn a_record_is_written_as_the_event_serialized_and_sorted_is(
            event in any_event(),
            seq in 1u64..u64::MAX,
            prev in "[0-9a-f]{64}",
        ) {
            let ts = "2026-12-05T04:30:00.123Z";
            let mut out = String::from("earlier line\n");
            let hash = push_event_record(&event, seq, ts, &prev, &mut out).unwrap();
            let expected = record_through_a_map(&event, seq, ts, &prev);
            proptest::prop_assert_eq!(&out, &format!("earlier line\n{expected}"));
            let written: Value = serde_json::from_str(&expected).unwrap();
            proptest::prop_assert_eq!(written["hash"].as_str(), Some(hash.as_str()));
        }
    }

    #[test]
    fn a_batch_prepared_on_an_old_end_is_chained_on_the_new_one() {
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        log.append(vec![grant("u1")]).unwrap();
        let early = log.chain_end().prepare(vec![grant("u3")]).unwrap();
        log.append(vec![grant("u2")]).unwrap();
        assert_eq!(log.commit(early).unwrap(), vec![3]);
        let on_time = log.chain_end().prepare(vec![grant("u4")]).unwrap();
        assert_eq!(log.commit(on_time).unwrap(), vec![4]);
        drop(log);
        let summary = verify(&f.log, &f.anchor).unwrap();
        assert_eq!(summary.records, 4);
        let users: Vec<String> = lines(&f.log)
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["user"].to_string())
            .collect();
        assert_eq!(users, ["\"u1\"", "\"u2\"", "\"u3\"", "\"u4\""]);
    }

    /// A log directory with the log at `dir/audit.jsonl` and the anchor in `dir/state/`.
    struct Fixture {
        _dir: tempfile::TempDir,
        log: PathBuf,
        anchor: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        Fixture {
            log: dir.path().join("audit.jsonl"),
            anchor: state.join("audit.anchor"),
            _dir: dir,
        }
    }

    fn grant(user: &str) -> Event {
        Event {
            action: "grant".into(),
            user: Some(user.into()),
            user_dn: Some(format!("uid={user},ou=people,dc=example,dc=org")),
            access: Some("wim".into()),
            group: Some("cn=wim-users,ou=groups,dc=example,dc=org".into()),
            order: Some("BEST-2026-0042".into()),
            ticket: Some("EASIT-123456".into()),
            evidence: vec![Evidence {
                course: "wim-grund".into(),
                passed_at: "2026-11-20".into(),
                source: "csv:lms/results.csv".into(),
                platform_ref: None,
            }],
            ..Event::default()
        }
    }

    /// A log with five records written in two batches; the log is closed again.
    fn five_records(f: &Fixture) {
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        log.append(vec![grant("u1"), grant("u2"), grant("u3")])
            .unwrap();
        log.append(vec![grant("u4"), grant("u5")]).unwrap();
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        if !lines.is_empty() {
            text.push('\n');
        }
        fs::write(path, text).unwrap();
    }

    /// Asserts that `verify` fails and names `line`, and returns the message.
    fn verify_fails_at(f: &Fixture, line: usize) -> String {
        match verify(&f.log, &f.anchor) {
            Ok(s) => panic!("verify passed a tampered log: {s:?}"),
            Err(e) => {
                assert_eq!(e.line(), Some(line), "wrong line in: {e}");
                assert!(e.to_string().contains(&format!("line {line}")), "{e}");
                e.to_string()
            }
        }
    }

    /// Re-seals a record after an edit, as a forger who knows the hash rule would.
    fn reseal(line: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
        let Value::Object(mut map) = serde_json::from_str::<Value>(line).unwrap() else {
            panic!("not an object")
        };
        edit(&mut map);
        map.remove("hash");
        let hash = record_hash(&Value::Object(map.clone()));
        map.insert("hash".into(), Value::from(hash));
        canonical_json(&Value::Object(map))
    }

    fn torn_files(f: &Fixture) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(parent_dir(&f.log))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("audit.jsonl.torn-"))
            .collect();
        found.sort();
        found
    }

    // --- format and hashing ---

    #[test]
    fn hash_matches_python_json_dumps_on_hand_written_json() {
        // Unsorted keys, spaces, \u escapes and nesting: the Rust side must canonicalize all of it
        // the way Python does.
        let text = r#"{ "user": "\u00f6rjan.\u00e5str\u00f6m", "seq": 3, "action": "grant",
            "reason": "tab\tquote\" back\\ ctl\u0001 del\u007f ls\u2028 emoji \ud83d\ude00",
            "detail": {"z": [3, {"b": 1, "a": -2}], "a": null, "m": true, "é": "é"},
            "evidence": [], "prev": "00" }"#;
        let value: Value = serde_json::from_str(text).unwrap();
        let ours = record_hash(&value);

        let script = "import sys,json,hashlib\n\
            v=json.loads(sys.stdin.read())\n\
            s=json.dumps(v,sort_keys=True,separators=(',',':'),ensure_ascii=False)\n\
            print(hashlib.sha256(s.encode('utf-8')).hexdigest())";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("this test needs python3 as an independent JSON implementation");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), ours);

        // And `hash` itself is never part of what is hashed.
        let Value::Object(mut with_hash) = value.clone() else {
            panic!()
        };
        with_hash.insert("hash".into(), Value::from("whatever"));
        assert_eq!(record_hash(&Value::Object(with_hash)), ours);
    }

    #[test]
    fn written_log_verifies_with_python() {
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        let mut odd = grant("örjan.åström");
        odd.reason = Some("ctl\u{1} tab\t nl\n quote\" back\\ del\u{7f} ls\u{2028} 😀".into());
        odd.detail = Some(serde_json::json!({"ü": 1, "a": [true, null, -5], "big": u64::MAX}));
        log.append(vec![grant("u1"), odd]).unwrap();
        log.append(vec![grant("u3")]).unwrap();

        // Python re-derives every hash, the chain, and the exact bytes of every line.
        let script = r#"import sys,json,hashlib
prev="0"*64
n=0
for raw in open(sys.argv[1],"rb"):
    n+=1
    line=raw.decode("utf-8")
    assert line.endswith("\n")
    r=json.loads(line)
    h=r.pop("hash")
    s=json.dumps(r,sort_keys=True,separators=(",",":"),ensure_ascii=False)
    assert hashlib.sha256(s.encode("utf-8")).hexdigest()==h,(n,s)
    assert r["prev"]==prev and r["seq"]==n,n
    r["hash"]=h
    assert json.dumps(r,sort_keys=True,separators=(",",":"),ensure_ascii=False)+"\n"==line,n
    prev=h
print(n, prev)"#;
        let out = Command::new("python3")
            .args(["-c", script])
            .arg(&f.log)
            .output()
            .expect("this test needs python3 as an independent JSON implementation");
        assert!(
            out.status.success(),
            "python rejected the log: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!("3 {}", log.last_hash())
        );
        // The non-ASCII name is stored as UTF-8, not as \u escapes.
        assert!(fs::read_to_string(&f.log).unwrap().contains("örjan.åström"));
    }

    #[test]
    fn record_shape_omits_empty_fields_and_has_millisecond_utc_ts() {
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        log.append(vec![Event {
            action: "outcome".into(),
            ref_seq: Some(1),
            outcome: Some("not-applied".into()),
            ..Event::default()
        }])
        .unwrap();
        let line = &lines(&f.log)[0];
        let Value::Object(map) = serde_json::from_str::<Value>(line).unwrap() else {
            panic!()
        };
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["action", "hash", "outcome", "prev", "ref_seq", "seq", "ts"]
        );
        assert_eq!(map["prev"], GENESIS_HASH);
        assert!(
            line.starts_with(r#"{"action":"outcome","hash":""#),
            "{line}"
        );
        let ts = map["ts"].as_str().unwrap();
        // 2026-12-04T10:15:02.114Z
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
        assert_eq!(
            fs::read_to_string(&f.anchor).unwrap(),
            format!("{{\"hash\":\"{}\",\"seq\":1}}\n", log.last_hash())
        );
    }

    // --- append, reopen, read back ---

    #[test]
    fn append_then_reopen_continues_the_chain() {
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        assert_eq!((log.last_seq(), log.last_hash()), (0, GENESIS_HASH));
        assert_eq!(log.append(vec![grant("a"), grant("b")]).unwrap(), [1, 2]);
        assert_eq!(log.append(Vec::new()).unwrap(), Vec::<u64>::new());
        let hash_2 = log.last_hash().to_string();
        drop(log);

        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        assert_eq!((log.last_seq(), log.last_hash()), (2, hash_2.as_str()));
        assert_eq!(log.append(vec![grant("c")]).unwrap(), [3]);
        let third: Value = serde_json::from_str(&lines(&f.log)[2]).unwrap();
        assert_eq!(third["prev"], Value::from(hash_2));
        assert_eq!(third["seq"], 3);

        let summary = verify(&f.log, &f.anchor).unwrap();
        assert_eq!(
            summary,
            VerifySummary {
                records: 3,
                last_seq: 3,
                last_hash: log.last_hash().to_string(),
                anchor_seq: 3,
            }
        );
    }

    #[test]
    fn records_after_returns_later_records_with_line_numbers() {
        let f = fixture();
        five_records(&f);
        let log = AuditLog::open(&f.log, &f.anchor).unwrap();
        let recs = log.records_after(3).unwrap();
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(recs.iter().map(|r| r.line).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(recs[0].event, grant("u4"));
        assert_eq!(recs[1].hash, log.last_hash());
        assert_eq!(log.records_after(0).unwrap().len(), 5);
        assert!(log.records_after(5).unwrap().is_empty());
    }

    #[test]
    fn empty_batch_writes_nothing() {
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        log.append(Vec::new()).unwrap();
        assert_eq!(fs::metadata(&f.log).unwrap().len(), 0);
        assert!(!f.anchor.exists());
        assert_eq!(verify(&f.log, &f.anchor).unwrap().records, 0);
    }

    #[test]
    fn floats_and_empty_actions_are_refused_before_anything_is_written() {
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        let brake = Event {
            action: "brake".into(),
            detail: Some(serde_json::json!({"would_revoke": 30, "groups": [{"ratio": 0.2}]})),
            ..Event::default()
        };
        let err = log.append(vec![grant("a"), brake]).unwrap_err();
        assert!(matches!(err, AuditError::InvalidEvent { .. }), "{err}");
        assert!(err.to_string().contains("detail.groups[0].ratio"), "{err}");
        let err = log.append(vec![Event::default()]).unwrap_err();
        assert!(matches!(err, AuditError::InvalidEvent { .. }), "{err}");
        assert_eq!(fs::metadata(&f.log).unwrap().len(), 0);
        // Not a write failure, so the log is still usable.
        assert_eq!(log.append(vec![grant("a")]).unwrap(), [1]);
    }

    #[test]
    fn second_writer_is_locked_out() {
        let f = fixture();
        let log = AuditLog::open(&f.log, &f.anchor).unwrap();
        let err = AuditLog::open(&f.log, &f.anchor).unwrap_err();
        assert!(matches!(err, AuditError::Locked { .. }), "{err}");
        drop(log);
        AuditLog::open(&f.log, &f.anchor).unwrap();
    }

    #[test]
    fn failed_anchor_update_takes_the_batch_back_and_poisons_the_log() {
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        log.append(vec![grant("a")]).unwrap();
        let len = fs::metadata(&f.log).unwrap().len();
        let anchor_text = fs::read(&f.anchor).unwrap();

        let state = parent_dir(&f.anchor).to_path_buf();
        fs::remove_dir_all(&state).unwrap();
        let err = log.append(vec![grant("b")]).unwrap_err();
        assert!(matches!(err, AuditError::Io { .. }), "{err}");
        assert_eq!(
            fs::metadata(&f.log).unwrap().len(),
            len,
            "batch not rolled back"
        );
        assert_eq!(log.last_seq(), 1);
        let err = log.append(vec![grant("b")]).unwrap_err();
        assert!(matches!(err, AuditError::Poisoned { .. }), "{err}");
        drop(log);

        fs::create_dir(&state).unwrap();
        fs::write(&f.anchor, anchor_text).unwrap();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        assert_eq!(log.append(vec![grant("b")]).unwrap(), [2]);
        assert_eq!(verify(&f.log, &f.anchor).unwrap().records, 2);
    }

    // --- verify: good logs ---

    #[test]
    fn verify_accepts_a_good_log_and_a_missing_one() {
        let f = fixture();
        assert_eq!(verify(&f.log, &f.anchor).unwrap().records, 0);
        five_records(&f);
        let s = verify(&f.log, &f.anchor).unwrap();
        assert_eq!((s.records, s.last_seq, s.anchor_seq), (5, 5, 5));
    }

    /// A valid record beyond the anchor is what a crash between fsyncing the log and replacing
    /// the anchor leaves, so it is accepted, and the summary shows the anchor's seq.
    #[test]
    fn valid_records_beyond_the_anchor_are_accepted() {
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        let forged = reseal(&all[4], |m| {
            m.insert("seq".into(), Value::from(6));
            m.insert("prev".into(), m["hash"].clone());
            m.insert("user".into(), Value::from("mallory"));
        });
        all.push(forged);
        write_lines(&f.log, &all);
        let s = verify(&f.log, &f.anchor).unwrap();
        assert_eq!((s.records, s.last_seq, s.anchor_seq), (6, 6, 5));
        // open accepts it too, and continues after it.
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        assert_eq!(log.last_seq(), 6);
        assert_eq!(log.append(vec![grant("u7")]).unwrap(), [7]);
        assert_eq!(verify(&f.log, &f.anchor).unwrap().anchor_seq, 7);
    }

    // --- verify: tampering ---

    #[test]
    fn verify_names_an_edited_line() {
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        all[2] = all[2].replace("\"access\":\"wim\"", "\"access\":\"pacs\"");
        write_lines(&f.log, &all);
        let msg = verify_fails_at(&f, 3);
        assert!(msg.contains("hash does not match"), "{msg}");
    }

    #[test]
    fn verify_names_the_next_line_when_an_edit_was_resealed() {
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        all[1] = reseal(&all[1], |m| {
            m.insert("user".into(), Value::from("mallory"));
        });
        write_lines(&f.log, &all);
        let msg = verify_fails_at(&f, 3);
        assert!(msg.contains("hash of line 2"), "{msg}");
    }

    #[test]
    fn verify_names_a_whitespace_or_duplicate_key_edit() {
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        all[3] = all[3].replacen("\"action\":\"grant\"", "\"action\": \"grant\"", 1);
        write_lines(&f.log, &all);
        assert!(verify_fails_at(&f, 4).contains("canonical"));

        let mut all = lines(&f.log);
        all[3] = all[3].replacen(
            "\"action\": \"grant\"",
            "\"action\":\"revoke\",\"action\":\"grant\"",
            1,
        );
        write_lines(&f.log, &all);
        assert!(verify_fails_at(&f, 4).contains("canonical"));
    }

    #[test]
    fn verify_names_a_deleted_middle_line() {
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        all.remove(2);
        write_lines(&f.log, &all);
        let msg = verify_fails_at(&f, 3);
        assert!(msg.contains("seq is 4, expected 3"), "{msg}");
    }

    #[test]
    fn verify_names_reordered_lines() {
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        all.swap(1, 2);
        write_lines(&f.log, &all);
        verify_fails_at(&f, 2);
    }

    #[test]
    fn verify_catches_truncation_through_the_anchor() {
        let f = fixture();
        five_records(&f);
        let all = lines(&f.log);

        write_lines(&f.log, &all[..4]);
        let msg = verify_fails_at(&f, 5);
        assert!(msg.contains("cut off"), "{msg}");

        write_lines(&f.log, &all[..3]);
        verify_fails_at(&f, 4);

        write_lines(&f.log, &[]);
        verify_fails_at(&f, 1);
    }

    #[test]
    fn verify_names_a_forged_line_that_does_not_chain() {
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        // Correctly hashed and numbered, but chained onto record 4 instead of 5.
        let forged = reseal(&all[4], |m| {
            m.insert("seq".into(), Value::from(6));
        });
        all.push(forged);
        write_lines(&f.log, &all);
        verify_fails_at(&f, 6);
    }

    #[test]
    fn verify_checks_the_anchor_hash() {
        let f = fixture();
        five_records(&f);
        let all = lines(&f.log);
        let hash_3: Value = serde_json::from_str::<Value>(&all[2]).unwrap()["hash"].clone();
        fs::write(&f.anchor, format!("{{\"hash\":{hash_3},\"seq\":5}}\n")).unwrap();
        let err = verify(&f.log, &f.anchor).unwrap_err();
        assert!(matches!(err, AuditError::AnchorMismatch { .. }), "{err}");
        assert_eq!(err.line(), Some(5));
    }

    #[test]
    fn verify_without_anchor_fails_and_says_how_to_restore_it() {
        let f = fixture();
        five_records(&f);
        fs::remove_file(&f.anchor).unwrap();
        let err = verify(&f.log, &f.anchor).unwrap_err();
        let Ok(last) = serde_json::from_str::<Value>(&lines(&f.log)[4]) else {
            panic!()
        };
        let restore = format!(
            "{{\"hash\":\"{}\",\"seq\":5}}",
            last["hash"].as_str().unwrap()
        );
        assert!(err.to_string().contains(&restore), "{err}");

        // Following that advice works.
        fs::write(&f.anchor, restore).unwrap();
        assert_eq!(verify(&f.log, &f.anchor).unwrap().anchor_seq, 5);
        AuditLog::open(&f.log, &f.anchor).unwrap();
    }

    // --- open: anchor checks ---

    #[test]
    fn open_refuses_a_log_without_its_anchor() {
        let f = fixture();
        five_records(&f);
        fs::remove_file(&f.anchor).unwrap();
        let err = AuditLog::open(&f.log, &f.anchor).unwrap_err();
        assert!(matches!(err, AuditError::AnchorMissing { .. }), "{err}");
        assert!(err.to_string().contains("coursegate audit verify"), "{err}");
    }

    #[test]
    fn open_refuses_when_the_anchor_is_ahead_of_the_log() {
        let f = fixture();
        five_records(&f);
        let all = lines(&f.log);
        write_lines(&f.log, &all[..4]);
        let err = AuditLog::open(&f.log, &f.anchor).unwrap_err();
        assert!(
            matches!(
                err,
                AuditError::AnchorAhead {
                    anchor_seq: 5,
                    last_seq: 4,
                    ..
                }
            ),
            "{err}"
        );
        // A log that vanished entirely is caught the same way.
        fs::remove_file(&f.log).unwrap();
        let err = AuditLog::open(&f.log, &f.anchor).unwrap_err();
        assert!(
            matches!(err, AuditError::AnchorAhead { last_seq: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn open_refuses_a_replaced_last_record() {
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        all[4] = reseal(&all[4], |m| {
            m.insert("user".into(), Value::from("mallory"));
        });
        write_lines(&f.log, &all);
        let err = AuditLog::open(&f.log, &f.anchor).unwrap_err();
        assert!(
            matches!(err, AuditError::AnchorMismatch { seq: 5, .. }),
            "{err}"
        );

        // An unsealed edit of the last line is caught without the anchor.
        all[4] = lines(&f.log)[4].replace("mallory", "eve");
        write_lines(&f.log, &all);
        let err = AuditLog::open(&f.log, &f.anchor).unwrap_err();
        assert!(matches!(err, AuditError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn open_accepts_a_lagging_anchor_only_if_the_chain_reaches_it() {
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        log.append(vec![grant("u1"), grant("u2")]).unwrap();
        let old_anchor = fs::read(&f.anchor).unwrap();
        log.append(vec![grant("u3"), grant("u4")]).unwrap();
        drop(log);
        // As if the process died between the log's fsync and the anchor's rename.
        fs::write(&f.anchor, &old_anchor).unwrap();
        let log = AuditLog::open(&f.log, &f.anchor).unwrap();
        assert_eq!(log.last_seq(), 4);
        drop(log);

        // Records 3 and 4 rebuilt so they chain onto a forged record 2: not the anchored one.
        let mut all = lines(&f.log);
        all[1] = reseal(&all[1], |m| {
            m.insert("user".into(), Value::from("mallory"));
        });
        all[2] = reseal(&all[2], |m| {
            m.insert(
                "prev".into(),
                serde_json::from_str::<Value>(&all[1]).unwrap()["hash"].clone(),
            );
        });
        all[3] = reseal(&all[3], |m| {
            m.insert(
                "prev".into(),
                serde_json::from_str::<Value>(&all[2]).unwrap()["hash"].clone(),
            );
        });
        write_lines(&f.log, &all);
        let err = AuditLog::open(&f.log, &f.anchor).unwrap_err();
        assert!(
            matches!(err, AuditError::AnchorMismatch { seq: 2, .. }),
            "{err}"
        );
        // verify agrees and names line 2, whose hash differs from the anchor's.
        let err = verify(&f.log, &f.anchor).unwrap_err();
        assert_eq!(err.line(), Some(2), "{err}");
    }

    #[test]
    fn open_reads_only_the_tail() {
        // Garbage early in the file is not noticed by open (verify's job), proving it did not
        // read from the start; the last record and the anchor are still checked.
        let f = fixture();
        five_records(&f);
        let mut all = lines(&f.log);
        all[0] = "not json".into();
        write_lines(&f.log, &all);
        let log = AuditLog::open(&f.log, &f.anchor).unwrap();
        assert_eq!(log.last_seq(), 5);
        drop(log);
        verify_fails_at(&f, 1);
    }

    // --- open: torn tail ---

    #[test]
    fn torn_tail_is_moved_aside_and_recorded() {
        let f = fixture();
        five_records(&f);
        let good = fs::read(&f.log).unwrap();
        let torn = br#"{"action":"grant","evidence":[{"cou"#;
        let mut text = good.clone();
        text.extend_from_slice(torn);
        fs::write(&f.log, &text).unwrap();
        let msg = verify_fails_at(&f, 6);
        assert!(msg.contains("incomplete"), "{msg}");

        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        let side = torn_files(&f);
        assert_eq!(side.len(), 1);
        assert_eq!(fs::read(&side[0]).unwrap(), torn);
        // The good part is untouched, and the torn-tail record follows it.
        let now = fs::read(&f.log).unwrap();
        assert_eq!(&now[..good.len()], &good[..]);
        assert_eq!(log.last_seq(), 6);
        let rec = &log.records_after(5).unwrap()[0];
        assert_eq!(rec.event.action, "torn-tail");
        let detail = rec.event.detail.as_ref().unwrap();
        assert_eq!(detail["bytes"], torn.len() as u64);
        assert_eq!(
            detail["file"],
            side[0].file_name().unwrap().to_str().unwrap()
        );
        log.append(vec![grant("u7")]).unwrap();
        drop(log);
        assert_eq!(verify(&f.log, &f.anchor).unwrap().records, 7);
    }

    #[test]
    fn torn_first_write_is_moved_aside_too() {
        let f = fixture();
        fs::write(&f.log, b"{\"action\":\"gr").unwrap();
        let log = AuditLog::open(&f.log, &f.anchor).unwrap();
        assert_eq!(log.last_seq(), 1);
        assert_eq!(torn_files(&f).len(), 1);
        drop(log);
        assert_eq!(verify(&f.log, &f.anchor).unwrap().records, 1);
    }

    #[test]
    fn complete_record_without_newline_is_still_set_aside() {
        // The write stopped just before the '\n': the record may look whole, but its append
        // never returned Ok, so its change was never made. It must not stay in the log.
        let f = fixture();
        let mut log = AuditLog::open(&f.log, &f.anchor).unwrap();
        log.append(vec![grant("u1")]).unwrap();
        let anchor = fs::read(&f.anchor).unwrap();
        log.append(vec![grant("u2")]).unwrap();
        drop(log);
        let mut text = fs::read(&f.log).unwrap();
        text.pop();
        fs::write(&f.log, &text).unwrap();
        fs::write(&f.anchor, anchor).unwrap();

        let log = AuditLog::open(&f.log, &f.anchor).unwrap();
        let recs = log.records_after(0).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].event.action, "torn-tail");
    }

    #[test]
    fn torn_tail_is_left_alone_when_the_anchor_check_fails() {
        let f = fixture();
        five_records(&f);
        let all = lines(&f.log);
        write_lines(&f.log, &all[..4]);
        let mut text = fs::read(&f.log).unwrap();
        text.extend_from_slice(b"{\"partial");
        fs::write(&f.log, &text).unwrap();
        assert!(AuditLog::open(&f.log, &f.anchor).is_err());
        assert_eq!(fs::read(&f.log).unwrap(), text, "evidence was modified");
        assert!(torn_files(&f).is_empty());
    }

    #[test]
    fn reverse_lines_cross_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines");
        // Lines longer than a chunk, and a short first line.
        let long = "x".repeat(TAIL_CHUNK as usize + 17);
        let text = format!("a\n{long}\n\nb\n{long}y\n");
        fs::write(&path, &text).unwrap();
        let file = File::open(&path).unwrap();
        let len = text.len() as u64;
        assert_eq!(complete_end(&file, len).unwrap(), len);
        let mut rl = ReverseLines::new(&file, len);
        let mut got = Vec::new();
        while let Some(l) = rl.next_line().unwrap() {
            got.push(String::from_utf8(l).unwrap());
        }
        assert_eq!(
            got,
            [
                format!("{long}y"),
                "b".into(),
                String::new(),
                long.clone(),
                "a".into()
            ]
        );
        assert_eq!(
            complete_end(&file, len - 3).unwrap(),
            len - long.len() as u64 - 2
        );
    }
}
