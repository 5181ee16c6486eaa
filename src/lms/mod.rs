//! Course results from the learning platform (LMS).
//!
//! Every adapter produces a [`CourseFacts`] snapshot; the decision logic asks it one question per
//! (user, course) and gets a three-valued answer ([`CourseResult`]). Names are compared
//! case-insensitively after trimming, as SPEC §5 requires, so adapters store keys through
//! [`course_key`].

pub mod csv;
pub mod xlsx;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

/// The LMS answer for one (user, course): SPEC §3 "passed, not passed, unknown".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CourseResult {
    /// Passed; `at` is the completion date used as evidence, `source` names where it came from.
    Passed {
        at: DateTime<Utc>,
        source: String,
    },
    NotPassed,
    /// The fact cannot be known (LMS down, unreadable row). Never grants, never revokes.
    Unknown {
        reason: String,
    },
}

/// A snapshot of everything the LMS said in one read.
#[derive(Debug, Clone)]
pub struct CourseFacts {
    source: String,
    state: FactsState,
    problems: Vec<String>,
}

#[derive(Debug, Clone)]
enum FactsState {
    /// The whole source could not be read: every answer is unknown.
    Unavailable { reason: String },
    Report {
        /// (user, course) keys from [`course_key`] -> latest passed date.
        passed: HashMap<(String, String), DateTime<Utc>>,
        /// (user, course) keys with at least one unreadable row -> why.
        unreadable: HashMap<(String, String), String>,
    },
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
        passed: HashMap<(String, String), DateTime<Utc>>,
        unreadable: HashMap<(String, String), String>,
        problems: Vec<String>,
    ) -> Self {
        CourseFacts {
            source: source.into(),
            state: FactsState::Report { passed, unreadable },
            problems,
        }
    }

    /// Facts when the source could not be read at all: everything is unknown.
    pub fn unavailable(source: impl Into<String>, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        CourseFacts {
            source: source.into(),
            problems: vec![reason.clone()],
            state: FactsState::Unavailable { reason },
        }
    }

    /// The three-valued answer for `user` and the course called `lms_id` in the LMS.
    pub fn result(&self, user: &str, lms_id: &str) -> CourseResult {
        match &self.state {
            FactsState::Unavailable { reason } => CourseResult::Unknown {
                reason: format!("{}: {reason}", self.source),
            },
            FactsState::Report { passed, unreadable } => {
                let key = course_key(user, lms_id);
                if let Some(why) = unreadable.get(&key) {
                    return CourseResult::Unknown {
                        reason: format!("{}: {why}", self.source),
                    };
                }
                match passed.get(&key) {
                    Some(at) => CourseResult::Passed {
                        at: *at,
                        source: self.source.clone(),
                    },
                    None => CourseResult::NotPassed,
                }
            }
        }
    }

    /// Whether the whole source was unreadable.
    pub fn is_unavailable(&self) -> bool {
        matches!(self.state, FactsState::Unavailable { .. })
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

/// The configured course-results source.
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
}

impl CourseSource {
    /// The source the `[lms]` section describes.
    pub fn from_config(lms: &crate::config::Lms) -> CourseSource {
        match lms.kind {
            crate::config::LmsKind::Csv => CourseSource::Csv {
                path: lms.path.clone(),
                label: lms.label.clone(),
            },
            crate::config::LmsKind::Xlsx => CourseSource::Xlsx {
                path: lms.path.clone(),
                label: lms.label.clone(),
            },
        }
    }
}
