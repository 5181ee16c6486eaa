//! File-system triggers: watch `desired_dir` and the course results report, and say "look
//! again" when anything there changes.
//!
//! Events carry no meaning beyond that: the reconcile is level-triggered. The watch survives
//! atomic writes (temp file + rename), editors' swap files and the deletion and re-creation of
//! the order directory: it also watches the directories above them, and [`Watch::is_stale`]
//! notices when a watched directory was replaced so the daemon can build a new watch.

use std::path::{Path, PathBuf};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::Config;

/// Why the daemon is woken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Something changed in a watched place.
    Changed,
    /// Files directly in `desired_dir` changed (names only, every kind: the daemon sorts
    /// them); the daemon may reconcile just these ([`crate::reconcile::quick_pass`]).
    Orders(Vec<String>),
    /// The watcher reported an error: rebuild it and resync.
    WatcherFailed(String),
}

/// The active watches. Dropping it stops them.
pub struct Watch {
    _watcher: RecommendedWatcher,
    desired_dir: PathBuf,
    desired_id: Option<(u64, u64)>,
}

fn dir_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether an event only says that something was opened or read.
fn is_read(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
        EventKind::Access(_) => true,
        _ => false,
    }
}

/// The names of the files an event is about, if every one of them is directly in `dir` (a
/// plain change of order files); `None` for anything else (the directory itself, the report, a
/// rescan request), which needs a full pass.
fn order_files(dir: &Path, event: &Event) -> Option<Vec<String>> {
    if event.need_rescan() || event.paths.is_empty() {
        return None;
    }
    event
        .paths
        .iter()
        .map(|p| match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) if parent == dir => {
                Some(name.to_string_lossy().into_owned())
            }
            _ => None,
        })
        .collect()
}

impl Watch {
    /// Starts watching the places `config` names; events go to `tx`.
    pub fn start(config: &Config, tx: UnboundedSender<Trigger>) -> notify::Result<Watch> {
        let desired_dir = config.daemon.desired_dir.clone();
        // An HTTP platform has no report file to watch: its answers are asked at every pass.
        let report = config.lms.path.clone();
        let report_name = report
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_os_string());
        let desired_parent = desired_dir.parent().map(Path::to_path_buf);
        let report_dir = report
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);

        let relevant = {
            let desired_dir = desired_dir.clone();
            move |path: &Path| {
                path.starts_with(&desired_dir)
                    || (report_name.is_some() && path.file_name() == report_name.as_deref())
            }
        };
        let orders_dir = desired_dir.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
            let trigger = match res {
                // Opening and reading are no change (and the daemon's own reads would
                // trigger it again); a close after writing is.
                Ok(event) if is_read(&event.kind) => return,
                Ok(event) if event.paths.iter().any(|p| relevant(p)) => {
                    order_files(&orders_dir, &event).map_or(Trigger::Changed, Trigger::Orders)
                }
                Ok(_) => return,
                Err(e) => Trigger::WatcherFailed(e.to_string()),
            };
            let _ = tx.send(trigger);
        })?;
        let mut watched = Vec::new();
        for dir in [Some(desired_dir.clone()), desired_parent, report_dir]
            .into_iter()
            .flatten()
        {
            if watched.contains(&dir) || !dir.is_dir() {
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => watched.push(dir),
                Err(e) => tracing::warn!(dir = %dir.display(), "cannot watch: {e}"),
            }
        }
        tracing::debug!(?watched, "watching for changes");
        Ok(Watch {
            _watcher: watcher,
            desired_id: dir_id(&desired_dir),
            desired_dir,
        })
    }

    /// Whether the order directory was removed or replaced since the watch started (its
    /// watch is then dead and must be rebuilt).
    pub fn is_stale(&self) -> bool {
        dir_id(&self.desired_dir) != self.desired_id
    }
}
