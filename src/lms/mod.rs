//! Course results from the learning platform (LMS).
//!
//! The decision logic asks one question per (user, course) and gets a three-valued answer
//! ([`CourseResult`]) from a [`CourseFacts`]. Two families of adapters fill it:
//!
//! * results reports (`kind = "csv"`, `"xlsx"`): the whole export is read into one snapshot
//!   ([`CourseSource`], [`csv`], [`xlsx`]);
//! * HTTP platforms (`"moodle"`, `"canvas"`, `"xapi"`): asked per (user, course) for exactly the
//!   pairs the reconcile needs ([`Query`]), through a cache that lives between daemon passes
//!   ([`platform`], with the wire formats in [`moodle`], [`canvas`], [`xapi`] and the shared
//!   HTTP handling in [`http`]).
//!
//! Names are compared case-insensitively after trimming, as SPEC §5 requires, so adapters store
//! keys through [`course_key`].

pub mod canvas;
pub mod csv;
pub mod http;
pub mod moodle;
pub mod platform;
pub mod xapi;
pub mod xlsx;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::audit::PlatformRef;

/// The LMS answer for one (user, course): SPEC §3 "passed, not passed, unknown".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CourseResult {
    /// Passed; `at` is the completion date used as evidence, `source` names where it came from
    /// and `reference` where the platform keeps it (HTTP platforms; `None` for a report).
    Passed {
        at: DateTime<Utc>,
        source: String,
        reference: Option<PlatformRef>,
    },
    NotPassed,
    /// The fact cannot be known (LMS down, unreadable row). Never grants, never revokes.
    Unknown {
        reason: String,
    },
}

/// Everything the LMS said in one read: a report snapshot, or the answers of an HTTP platform
/// to the pairs that were asked. Cloning is cheap: the answers are shared, so a daemon can keep
/// a report's facts between passes and hand each pass the same ones.
#[derive(Debug, Clone)]
pub struct CourseFacts {
    source: String,
    state: Arc<FactsState>,
    problems: Vec<String>,
    stats: ReadStats,
}

/// What one read cost and what went wrong in it, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// HTTP requests sent to the platform.
    pub requests: u64,
    /// Answers taken from the cache instead.
    pub cached: u64,
    /// Errors by kind: `unavailable` and `unreadable_row` for a report, the failure cause
    /// ([`http::Cause::label`]) of each unknown lookup for an HTTP platform.
    pub errors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone)]
enum FactsState {
    /// The whole source could not be read: every answer is unknown.
    Unavailable { reason: String },
    Report {
        passed: Passes,
        /// (user, course) keys with at least one unreadable row -> why.
        unreadable: HashMap<(String, String), String>,
    },
    /// An HTTP platform's answers for the pairs that were asked. A pair that was not asked is
    /// unknown.
    Answers {
        answers: HashMap<(String, String), CourseResult>,
        /// The platform as a whole failed in this read (unreachable, credentials refused,
        /// throttled): reported like an unreadable report.
        unavailable: bool,
    },
}

/// The latest pass date of each (user, course) in a report, names compared as [`course_key`]
/// compares them. A region's report has a row per user and course: here each user is one entry
/// holding a short list of their courses, and each course name is kept once.
#[derive(Debug, Clone, Default)]
pub struct Passes {
    /// Normalized course names; a user's list refers to them by index.
    courses: Vec<Box<str>>,
    course_index: HashMap<Box<str>, u32>,
    users: HashMap<Box<str>, Vec<(u32, DateTime<Utc>)>>,
}

impl Passes {
    /// Records a pass; of several passes of the same course the latest counts.
    pub fn record(&mut self, user: &str, course: &str, at: DateTime<Utc>) {
        let course = normalized(course);
        let index = match self.course_index.get(course.as_ref()) {
            Some(&index) => index,
            None => {
                let index = u32::try_from(self.courses.len()).expect("fewer than 2^32 courses");
                self.courses.push(course.as_ref().into());
                self.course_index.insert(course.as_ref().into(), index);
                index
            }
        };
        let list = match self.users.get_mut(normalized(user).as_ref()) {
            Some(list) => list,
            None => self
                .users
                .entry(normalized(user).into_owned().into_boxed_str())
                .or_default(),
        };
        match list.iter_mut().find(|(c, _)| *c == index) {
            Some((_, latest)) => *latest = (*latest).max(at),
            None => list.push((index, at)),
        }
    }

    /// The latest pass of `course` by `user`, if any.
    pub fn get(&self, user: &str, course: &str) -> Option<DateTime<Utc>> {
        let index = *self.course_index.get(normalized(course).as_ref())?;
        let list = self.users.get(normalized(user).as_ref())?;
        list.iter().find(|(c, _)| *c == index).map(|(_, at)| *at)
    }
}

impl From<HashMap<(String, String), DateTime<Utc>>> for Passes {
    fn from(map: HashMap<(String, String), DateTime<Utc>>) -> Passes {
        let mut passes = Passes::default();
        for ((user, course), at) in map {
            passes.record(&user, &course, at);
        }
        passes
    }
}

/// [`normalize_name`] without a copy when the name is in normal form already (most are).
fn normalized(name: &str) -> std::borrow::Cow<'_, str> {
    let trimmed = name.trim();
    if trimmed
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
    {
        std::borrow::Cow::Borrowed(trimmed)
    } else {
        std::borrow::Cow::Owned(trimmed.to_lowercase())
    }
}

/// Normalizes a user name or course name for comparison (trim, lower-case).
pub fn course_key(user: &str, course: &str) -> (String, String) {
    (normalize_name(user), normalize_name(course))
}

/// Trims and lower-cases a name the way SPEC §5 compares them.
pub fn normalize_name(name: &str) -> String {
    name.trim().to_lowercase()
}

impl CourseFacts {
    /// Facts from a readable report. `problems` lists unreadable rows for reporting.
    pub fn from_report(
        source: impl Into<String>,
        passed: impl Into<Passes>,
        unreadable: HashMap<(String, String), String>,
        problems: Vec<String>,
    ) -> Self {
        let passed = passed.into();
        let mut stats = ReadStats::default();
        if !problems.is_empty() {
            stats
                .errors
                .insert("unreadable_row".to_string(), problems.len() as u64);
        }
        CourseFacts {
            source: source.into(),
            state: Arc::new(FactsState::Report { passed, unreadable }),
            problems,
            stats,
        }
    }

    /// Facts when the source could not be read at all: everything is unknown.
    pub fn unavailable(source: impl Into<String>, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        CourseFacts {
            source: source.into(),
            problems: vec![reason.clone()],
            state: Arc::new(FactsState::Unavailable { reason }),
            stats: ReadStats {
                errors: BTreeMap::from([("unavailable".to_string(), 1)]),
                ..ReadStats::default()
            },
        }
    }

    /// Facts from an HTTP platform: `answers` keyed by [`course_key`] for the pairs that were
    /// asked; `problems` says (once per cause) why some are unknown; `unavailable` when the
    /// platform as a whole failed.
    pub fn from_answers(
        source: impl Into<String>,
        answers: HashMap<(String, String), CourseResult>,
        problems: Vec<String>,
        unavailable: bool,
        stats: ReadStats,
    ) -> Self {
        CourseFacts {
            source: source.into(),
            state: Arc::new(FactsState::Answers {
                answers,
                unavailable,
            }),
            problems,
            stats,
        }
    }

    /// The three-valued answer for `user` and the course called `lms_id` in the LMS.
    pub fn result(&self, user: &str, lms_id: &str) -> CourseResult {
        match &*self.state {
            FactsState::Unavailable { reason } => CourseResult::Unknown {
                reason: format!("{}: {reason}", self.source),
            },
            FactsState::Report { passed, unreadable } => {
                if let Some(why) = (!unreadable.is_empty())
                    .then(|| unreadable.get(&course_key(user, lms_id)))
                    .flatten()
                {
                    return CourseResult::Unknown {
                        reason: format!("{}: {why}", self.source),
                    };
                }
                match passed.get(user, lms_id) {
                    Some(at) => CourseResult::Passed {
                        at,
                        source: self.source.clone(),
                        reference: None,
                    },
                    None => CourseResult::NotPassed,
                }
            }
            FactsState::Answers { answers, .. } => answers
                .get(&course_key(user, lms_id))
                .cloned()
                .unwrap_or_else(|| CourseResult::Unknown {
                    reason: format!("{}: this user and course were not looked up", self.source),
                }),
        }
    }

    /// Whether the whole source was unreadable (a report), or the platform failed as a whole.
    pub fn is_unavailable(&self) -> bool {
        match &*self.state {
            FactsState::Unavailable { .. } => true,
            FactsState::Report { .. } => false,
            FactsState::Answers { unavailable, .. } => *unavailable,
        }
    }

    /// The kind of source: `csv`, `xlsx`, `moodle`, `canvas`, `xapi` (metrics label).
    pub fn platform(&self) -> &str {
        self.source
            .split_once(':')
            .map_or(self.source.as_str(), |(kind, _)| kind)
    }

    /// Requests, cache hits and errors of this read.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// Where the facts came from, e.g. `csv:lms/results.csv`.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Human-readable problems found while reading (whole-file failure or bad rows).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}

/// One (user, course) the reconcile needs an answer for from an HTTP platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The user as the order names them: the key the decision asks with.
    pub user: String,
    /// The name the platform knows them by: the account as the directory spells it, or `user`.
    pub login: String,
    /// The directory's `mail` for the user (xAPI agents).
    pub mail: Option<String>,
    /// The course's `lms_id`.
    pub lms_id: String,
    /// Whether coursegate holds a membership that needs this course: a pass of such a pair is
    /// re-verified at `reverify_interval` rather than `cache_ttl`.
    pub granted: bool,
}

/// A results report source (`kind = "csv"` / `"xlsx"`, SPEC §5).
#[derive(Debug, Clone)]
pub enum CourseSource {
    /// An exported results report in CSV (SPEC §5).
    Csv { path: PathBuf, label: String },
    /// The same report exported as an Excel workbook (SPEC §5, `kind = "xlsx"`).
    Xlsx { path: PathBuf, label: String },
}

impl CourseSource {
    /// Reads the source now. Never fails: a failure becomes "everything unknown".
    pub async fn load(&self) -> CourseFacts {
        let (path, label, read): (PathBuf, String, fn(&Path, &str) -> CourseFacts) = match self {
            CourseSource::Csv { path, label } => (path.clone(), label.clone(), csv::load),
            CourseSource::Xlsx { path, label } => (path.clone(), label.clone(), xlsx::load),
        };
        let source = label.clone();
        tokio::task::spawn_blocking(move || read(&path, &label))
            .await
            .unwrap_or_else(|e| {
                CourseFacts::unavailable(source, format!("report reader failed: {e}"))
            })
    }

    /// The report the `[lms]` section describes; `None` for an HTTP platform.
    pub fn from_config(lms: &crate::config::Lms) -> Option<CourseSource> {
        let path = lms.path.clone()?;
        let label = lms.label.clone();
        match lms.kind {
            crate::config::LmsKind::Csv => Some(CourseSource::Csv { path, label }),
            crate::config::LmsKind::Xlsx => Some(CourseSource::Xlsx { path, label }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn day(d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0).unwrap()
    }

    #[test]
    fn passes_compare_names_as_course_key_does_and_keep_the_latest() {
        let mut passes = Passes::default();
        passes.record(" Anna ", "Wim Grundkurs", day(3));
        passes.record("anna", "wim grundkurs", day(1));
        passes.record("ÅSA", "PACS", day(2));
        passes.record("åsa", "PACS", day(5));
        assert_eq!(passes.get("ANNA", " wim grundkurs"), Some(day(3)));
        assert_eq!(passes.get("åsa", "pacs"), Some(day(5)));
        assert_eq!(passes.get("Åsa", "Wim Grundkurs"), None);
        assert_eq!(passes.get("bertil", "PACS"), None);
        assert_eq!(passes.get("anna", "KardioPACS"), None);
        // Every key a map of course_key pairs holds is found the same way.
        let map: HashMap<(String, String), DateTime<Utc>> = [
            (course_key("Cecilia", "Wim"), day(4)),
            (course_key("cecilia", "PACS"), day(6)),
        ]
        .into();
        let passes = Passes::from(map.clone());
        for ((user, course), at) in &map {
            assert_eq!(passes.get(user, course), Some(*at));
        }
    }
}
