//! coursegate's own durable state in `state_dir`: the ownership ledger and the last valid
//! version of every order file.
//!
//! The ledger is a checkpoint of the audit log: every membership coursegate added and has not
//! removed, plus `applied_seq`, the last audit record whose outcome it reflects. Records after
//! that are replayed (and checked against the directory) by crash recovery in
//! [`crate::reconcile`]. Storage sits behind [`StateStore`] so that a database backend can
//! replace the files; [`FileStore`] writes each document atomically (temp file, fsync, rename,
//! fsync of the directory) so a crash leaves either the old or the new version.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::MemberAttribute;
use crate::directory::dn;
use crate::order::{LastGood, ParseCache};
use crate::orderers::Acceptances;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "state directory {path} is locked by another coursegate process (a daemon or an apply is running)"
    )]
    Locked { path: PathBuf },
}

/// A membership coursegate added itself and therefore may remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    pub group: String,
    /// The attribute value written: a DN, or an account name for `memberUid`.
    pub member: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_dn: Option<String>,
    pub access: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    pub granted_seq: u64,
    pub granted_at: DateTime<Utc>,
    /// When coursegate first saw the course requirement lapse (SPEC §3 `lapse_grace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lapse_since: Option<DateTime<Utc>>,
}

/// The ownership ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The last audit record whose effect this ledger reflects.
    pub applied_seq: u64,
    /// [`membership_key`] -> the owned membership.
    #[serde(deserialize_with = "packed_map")]
    pub owned: BTreeMap<String, Owned>,
}

/// Reads a map into a `BTreeMap` built in one go: one inserted entry at a time (serde's way)
/// leaves the nodes of a map read in key order half empty, which cost the daemon a fifth of the
/// ledger's size for as long as it runs.
fn packed_map<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Entries<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Entries<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    let entries = deserializer.deserialize_map(Entries(std::marker::PhantomData))?;
    // A later duplicate key wins, as with one insert at a time.
    Ok(entries.into_iter().collect())
}

/// The identity of one membership: the group DN and the member value, both normalized.
pub fn membership_key(group: &str, member: &str, attribute: MemberAttribute) -> String {
    format!(
        "{}\u{1f}{}",
        dn::normalize(group),
        member_key(member, attribute)
    )
}

/// The normalized form of a member value for comparisons.
pub fn member_key(member: &str, attribute: MemberAttribute) -> String {
    if attribute.holds_dns() {
        dn::normalize(member)
    } else {
        member.to_string()
    }
}

impl Ledger {
    /// How many memberships coursegate owns in `group`.
    pub fn owned_in_group(&self, group: &str) -> usize {
        let prefix = format!("{}\u{1f}", dn::normalize(group));
        self.owned.keys().filter(|k| k.starts_with(&prefix)).count()
    }
}

/// Where the durable state lives. Implemented by [`FileStore`]; kept small so a PostgreSQL
/// backend can follow.
pub trait StateStore {
    /// The ledger, or `None` if none was ever written.
    fn load_ledger(&self) -> Result<Option<Ledger>, StateError>;
    fn save_ledger(&self, ledger: &Ledger) -> Result<(), StateError>;
    /// The last valid version of each order file, by file name.
    fn load_last_good(&self) -> Result<LastGood, StateError>;
    fn save_last_good(&self, orders: &LastGood) -> Result<(), StateError>;
    /// Orders accepted by the orderer check ([`crate::orderers`]).
    fn load_acceptances(&self) -> Result<Acceptances, StateError>;
    fn save_acceptances(&self, acceptances: &Acceptances) -> Result<(), StateError>;
}

/// The file-based store: one JSON document per concern in `state_dir`. A clone is another handle
/// on the same directory (for work on another thread).
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// An exclusive lock on the state directory, held while a run may change anything.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl FileStore {
    /// Opens the store, creating `state_dir` (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<FileStore, StateError> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode_0700()
                .create(dir)
                .map_err(|source| io_err(dir, source))?;
        }
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens the store read-only: a missing directory just means "no state yet".
    pub fn open_read_only(dir: &Path) -> FileStore {
        FileStore {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the audit log's anchor (last seq and hash) is kept.
    pub fn anchor_path(&self) -> PathBuf {
        self.dir.join("audit-anchor.json")
    }

    /// Takes the exclusive lock, failing at once if another process holds it.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| io_err(&path, source))?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StateError::Locked {
                path: self.dir.clone(),
            }),
            Err(std::fs::TryLockError::Error(source)) => Err(io_err(&path, source)),
        }
    }

    fn load<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::Corrupt {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io_err(&path, source)),
        }
    }

    fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        write_json_atomic(&self.dir.join(name), value)
    }
}

/// The order parse cache as kept between runs, valid for one set of profile names.
#[derive(Serialize, Deserialize)]
struct SavedParses {
    profiles: Vec<String>,
    files: ParseCache,
}

impl FileStore {
    /// The parse results of order files as the last run left them, so that a one-shot run
    /// reads only files that changed since. Anything unreadable (or made for other profiles)
    /// is an empty cache: the cache only saves time, it never decides anything.
    pub fn load_order_cache(&self, profiles: &[&String]) -> ParseCache {
        match self.load::<SavedParses>(ORDER_CACHE) {
            Ok(Some(saved)) if saved.profiles.iter().eq(profiles.iter().copied()) => saved.files,
            Ok(_) => ParseCache::default(),
            Err(e) => {
                tracing::warn!("ignoring the order parse cache: {e}");
                ParseCache::default()
            }
        }
    }

    /// Saves `cache` (its settled entries) for the next run.
    pub fn save_order_cache(
        &self,
        profiles: &[&String],
        cache: &ParseCache,
    ) -> Result<(), StateError> {
        let files = cache.settled(std::time::SystemTime::now(), ORDER_CACHE_SETTLE);
        self.save_settled_order_cache(profiles.iter().map(|p| (*p).clone()).collect(), files)
    }

    /// Saves a cache that holds settled entries only ([`ParseCache::settled`]).
    pub fn save_settled_order_cache(
        &self,
        profiles: Vec<String>,
        files: ParseCache,
    ) -> Result<(), StateError> {
        self.save(ORDER_CACHE, &SavedParses { profiles, files })
    }
}

/// How long before a run an order file must have been written for its parse to be saved: one
/// written again within the file system's timestamp granularity could keep its stamp.
pub const ORDER_CACHE_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

const ORDER_CACHE: &str = "order-cache.json";

impl StateStore for FileStore {
    fn load_ledger(&self) -> Result<Option<Ledger>, StateError> {
        self.load("ledger.json")
    }

    fn save_ledger(&self, ledger: &Ledger) -> Result<(), StateError> {
        write_atomic_with(&self.dir.join("ledger.json"), |file| {
            let mut out = BufWriter::with_capacity(1 << 16, file);
            write_ledger(&mut out, ledger, PARALLEL_LEDGER_ENTRIES)?;
            out.flush()
        })
    }

    fn load_last_good(&self) -> Result<LastGood, StateError> {
        Ok(self.load("last-good-orders.json")?.unwrap_or_default())
    }

    fn save_last_good(&self, orders: &LastGood) -> Result<(), StateError> {
        self.save("last-good-orders.json", orders)
    }

    fn load_acceptances(&self) -> Result<Acceptances, StateError> {
        Ok(self.load("orderers.json")?.unwrap_or_default())
    }

    fn save_acceptances(&self, acceptances: &Acceptances) -> Result<(), StateError> {
        self.save("orderers.json", acceptances)
    }
}

trait DirBuilderExt {
    fn mode_0700(&mut self) -> &mut Self;
}

impl DirBuilderExt for std::fs::DirBuilder {
    fn mode_0700(&mut self) -> &mut Self {
        std::os::unix::fs::DirBuilderExt::mode(self, 0o700)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// [`write_atomic`] of `value` as compact JSON. Compact: the ledger of a large region is tens of
/// megabytes, read at every run. Written as it is serialized: a buffer holding all of it was the
/// largest allocation of a run.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), StateError> {
    write_atomic_with(path, |file| {
        let mut out = BufWriter::with_capacity(1 << 16, file);
        serde_json::to_writer(&mut out, value)?;
        out.flush()
    })
}

/// From this many owned memberships, half of the ledger is serialized on another thread: a
/// first run at 20,000 users with three profiles leaves a 22 MB ledger, written after the last
/// change, when the directory has nothing more to do and a core is free.
const PARALLEL_LEDGER_ENTRIES: usize = 8192;

/// Writes `ledger` as `serde_json::to_writer` writes it; from `parallel_from` entries, the
/// later half of them is serialized on another thread meanwhile.
fn write_ledger(
    out: &mut impl Write,
    ledger: &Ledger,
    parallel_from: usize,
) -> std::io::Result<()> {
    fn entries<'a>(
        out: &mut impl Write,
        mut first: bool,
        owned: impl Iterator<Item = (&'a String, &'a Owned)>,
    ) -> serde_json::Result<()> {
        for (key, membership) in owned {
            if !first {
                out.write_all(b",").map_err(serde_json::Error::io)?;
            }
            first = false;
            serde_json::to_writer(&mut *out, key)?;
            out.write_all(b":").map_err(serde_json::Error::io)?;
            serde_json::to_writer(&mut *out, membership)?;
        }
        Ok(())
    }
    let count = ledger.owned.len();
    let later = match ledger.owned.keys().nth(count / 2) {
        Some(key) if count >= parallel_from.max(2) => key.clone(),
        _ => return Ok(serde_json::to_writer(out, ledger)?),
    };
    write!(out, "{{\"applied_seq\":{},\"owned\":{{", ledger.applied_seq)?;
    let earlier_half = ledger.owned.range(..later.clone());
    let later_half = ledger.owned.range(later..);
    let serialize = |half: std::collections::btree_map::Range<'_, String, Owned>| {
        let mut text = Vec::with_capacity(1 << 20);
        entries(&mut text, false, half)?;
        Ok::<_, serde_json::Error>(text)
    };
    std::thread::scope(|s| {
        let for_thread = later_half.clone();
        let spawned = std::thread::Builder::new()
            .name("ledger".into())
            .spawn_scoped(s, move || serialize(for_thread));
        entries(&mut *out, true, earlier_half)?;
        let text = match spawned {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?,
            Err(_) => serialize(later_half)?,
        };
        out.write_all(&text)?;
        out.write_all(b"}}")
    })
}

/// [`write_atomic`] with the content written by `write` to the new file.
fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let replace = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    replace().map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path, source)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_written_in_two_halves_is_what_serde_json_writes() {
        let owned = |i: u64| Owned {
            group: "cn=wim-users,ou=groups,dc=example,dc=org".to_string(),
            member: format!("uid=u{i},ou=people,dc=example,dc=org"),
            user: format!("u{i} \"quoted\"\n"),
            user_dn: i
                .is_multiple_of(2)
                .then(|| format!("uid=u{i},ou=people,dc=example,dc=org")),
            access: "wim".to_string(),
            order: Some(format!("O-{i}")),
            ticket: None,
            granted_seq: i,
            granted_at: Utc::now(),
            lapse_since: i.is_multiple_of(3).then(Utc::now),
        };
        for count in [0, 1, 2, 3, 10] {
            let ledger = Ledger {
                applied_seq: 42,
                owned: (0..count)
                    .map(|i| (format!("cn=wim\u{1f}uid=u{i}"), owned(i)))
                    .collect(),
            };
            let expected = serde_json::to_vec(&ledger).unwrap();
            for parallel_from in [0, 1, 2, usize::MAX] {
                let mut written = Vec::new();
                write_ledger(&mut written, &ledger, parallel_from).unwrap();
                assert_eq!(
                    String::from_utf8(written).unwrap(),
                    String::from_utf8(expected.clone()).unwrap(),
                    "{count} entries, in halves from {parallel_from}"
                );
            }
        }
    }

    #[test]
    fn ledger_round_trips_and_keys_normalize() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("state")).unwrap();
        assert_eq!(store.load_ledger().unwrap(), None);
        let mut ledger = Ledger::default();
        let key = membership_key(
            "CN=Wim-Users,ou=groups,dc=x",
            "uid=Anna,ou=people,dc=x",
            MemberAttribute::Member,
        );
        assert_eq!(
            key,
            membership_key(
                "cn=wim-users,ou=groups,dc=x",
                "UID=anna, ou=people,dc=x",
                MemberAttribute::Member
            )
        );
        ledger.owned.insert(
            key,
            Owned {
                group: "cn=wim-users,ou=groups,dc=x".into(),
                member: "uid=anna,ou=people,dc=x".into(),
                user: "anna".into(),
                user_dn: None,
                access: "wim".into(),
                order: Some("O-1".into()),
                ticket: None,
                granted_seq: 3,
                granted_at: Utc::now(),
                lapse_since: None,
            },
        );
        ledger.applied_seq = 3;
        store.save_ledger(&ledger).unwrap();
        assert_eq!(store.load_ledger().unwrap(), Some(ledger.clone()));
        assert_eq!(ledger.owned_in_group("CN=WIM-USERS,ou=groups,dc=x"), 1);
        assert_eq!(ledger.owned_in_group("cn=pacs,ou=groups,dc=x"), 0);
    }

    #[test]
    fn memberuid_keys_are_exact() {
        assert_ne!(
            membership_key("cn=g,dc=x", "Anna", MemberAttribute::MemberUid),
            membership_key("cn=g,dc=x", "anna", MemberAttribute::MemberUid)
        );
    }

    #[test]
    fn corrupt_ledger_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ledger.json"), "{not json").unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let err = store.load_ledger().unwrap_err();
        assert!(err.to_string().contains("ledger.json"), "{err}");
    }

    #[test]
    fn order_cache_keeps_settled_files_for_the_same_profiles_only() {
        let dir = tempfile::tempdir().unwrap();
        let desired = dir.path().join("desired");
        std::fs::create_dir(&desired).unwrap();
        for id in ["O1", "O2"] {
            std::fs::write(
                desired.join(format!("{id}.toml")),
                format!("id = \"{id}\"\nuser = \"anna\"\naccess = [\"wim\"]\nordered_by = \"k\"\n"),
            )
            .unwrap();
        }
        let mut cache = ParseCache::default();
        let is_profile = |p: &str| p == "wim";
        crate::order::scan_cached(&desired, &is_profile, &BTreeMap::new(), &mut cache).unwrap();
        let now = std::time::SystemTime::now();
        let settle = std::time::Duration::from_secs(2);
        // Files written just now are not trusted by a later run (their stamp could repeat);
        // the same files seen an hour later are.
        assert_eq!(cache.settled(now, settle), ParseCache::default());
        let later = now + std::time::Duration::from_secs(3600);
        assert_eq!(cache.settled(later, settle), cache);

        let store = FileStore::open(&dir.path().join("state")).unwrap();
        let wim = "wim".to_string();
        store.save_order_cache(&[&wim], &cache).unwrap();
        assert_eq!(store.load_order_cache(&[&wim]), ParseCache::default());
        std::fs::write(
            dir.path().join("state/order-cache.json"),
            serde_json::to_vec(&serde_json::json!({"profiles": ["wim"], "files": cache})).unwrap(),
        )
        .unwrap();
        assert_eq!(store.load_order_cache(&[&wim]), cache);
        // A cache made for other profiles is not used, and garbage is an empty cache.
        let pacs = "pacs".to_string();
        assert_eq!(store.load_order_cache(&[&pacs]), ParseCache::default());
        std::fs::write(dir.path().join("state/order-cache.json"), "{oops").unwrap();
        assert_eq!(store.load_order_cache(&[&wim]), ParseCache::default());
    }

    #[test]
    fn second_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let _held = store.lock().unwrap();
        assert!(matches!(store.lock(), Err(StateError::Locked { .. })));
    }
}
