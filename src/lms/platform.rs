//! An HTTP learning platform (`kind = "moodle"`, `"canvas"`, `"xapi"`) as the reconcile sees it:
//! asked for exactly the (user, course) pairs a pass needs, through a cache that bounds the load
//! on the platform, and answering with [`CourseFacts`] like a report does.
//!
//! The cache rules (one place, [`is_fresh`]):
//!
//! * an answer is reused for `cache_ttl`: no more than one query per (user, course) per TTL;
//! * a *pass* that one of coursegate's own memberships rests on is reused for
//!   `reverify_interval` instead: granted memberships are re-verified at that slower pace;
//! * a failure is never cached: an unknown answer is asked again at the next pass (the daemon
//!   spaces those passes with its backoff);
//! * at the daemon's full resync every *not passed* answer is dropped ([`Platform::resync`]), so
//!   a pending order is re-checked at every resync however long `cache_ttl` is.
//!
//! The platform is kept in [`crate::reconcile::Caches`] between passes; a one-shot `apply` starts
//! with an empty one. When the platform asks to be left alone (`Retry-After`, a rate-limit budget
//! nearly used up), no request is sent until then and the lookups that would have needed one are
//! unknown — the reconcile itself never sleeps.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use reqwest::Url;

use super::http::{self, Cause, Failure, Pass};
use super::{CourseFacts, CourseResult, Query, ReadStats, canvas, course_key, moodle, xapi};
use crate::audit::PlatformRef;
use crate::config::{HttpLms, Lms, LmsKind, warn_if_readable_by_others};

/// What a platform positively said about one (user, course).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Passed at `at`; `reference` is where the platform keeps it (the audit evidence).
    Passed {
        at: DateTime<Utc>,
        reference: PlatformRef,
    },
    NotPassed(NotPassed),
}

/// Why the platform's answer is "not passed".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NotPassed {
    /// The course is not complete (Moodle `completed: false`, Canvas `completed_at: null`, no
    /// xAPI statement that says so).
    Incomplete,
    /// The platform says the user is not enrolled in the course (Moodle `usernotenroled`;
    /// Canvas: 404 for the user in a course that exists).
    NotEnrolled,
    /// The platform has no user by that name (Moodle: no user with that username).
    NoSuchUser,
}

impl NotPassed {
    fn describe(self) -> &'static str {
        match self {
            NotPassed::Incomplete => "not completed",
            NotPassed::NotEnrolled => "not enrolled in the course",
            NotPassed::NoSuchUser => "unknown to the platform",
        }
    }
}

/// The adapter for each platform: how to ask, and how to read the answer.
#[derive(Debug)]
enum Adapter {
    Moodle(moodle::Moodle),
    Canvas(canvas::Canvas),
    Xapi(xapi::Xapi),
}

impl Adapter {
    async fn fetch(
        &self,
        pass: &Pass<'_>,
        queries: Vec<Query>,
    ) -> Vec<(Query, Result<Answer, Failure>)> {
        match self {
            Adapter::Moodle(moodle) => moodle.fetch(pass, queries).await,
            Adapter::Canvas(canvas) => canvas.fetch(pass, queries).await,
            Adapter::Xapi(xapi) => xapi.fetch(pass, queries).await,
        }
    }
}

#[derive(Debug, Clone)]
struct Cached {
    answer: Answer,
    at: Instant,
}

/// One HTTP platform with its client, its cache and what it asked of coursegate.
#[derive(Debug)]
pub struct Platform {
    label: String,
    settings: HttpLms,
    base: Url,
    client: reqwest::Client,
    adapter: Adapter,
    answers: HashMap<(String, String), Cached>,
    /// No request before this instant: the platform throttled.
    pause_until: Option<Instant>,
}

impl Platform {
    /// Sets up the platform the `[lms]` section describes. Fails (with a reason for the log)
    /// when it is not an HTTP platform or the client cannot be built (an unreadable CA file).
    pub fn new(lms: &Lms) -> Result<Platform, String> {
        let Some(settings) = lms.http.clone() else {
            return Err(format!("{} is not an HTTP platform", lms.label));
        };
        let adapter = match lms.kind {
            LmsKind::Moodle => Adapter::Moodle(moodle::Moodle),
            LmsKind::Canvas => Adapter::Canvas(canvas::Canvas::new(settings.bulk_threshold)),
            LmsKind::Xapi => Adapter::Xapi(xapi::Xapi::new(settings.agent_account.clone())),
            LmsKind::Csv | LmsKind::Xlsx => {
                return Err(format!("{} is not an HTTP platform", lms.label));
            }
        };
        let base = http::base_url(&settings.url)?;
        let client = http::client(&settings)?;
        let (file, key) = settings.credentials.file();
        warn_if_readable_by_others(file, key);
        Ok(Platform {
            label: lms.label.clone(),
            settings,
            base,
            client,
            adapter,
            answers: HashMap::new(),
            pause_until: None,
        })
    }

    /// The evidence source, e.g. `moodle:https://moodle.example.org`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The daemon's full resync: forget every "not passed", so pending orders are asked again.
    /// Passes stay, re-verified by their age.
    pub fn resync(&mut self) {
        self.answers
            .retain(|_, cached| matches!(cached.answer, Answer::Passed { .. }));
    }

    /// Answers `queries`, from the cache where it is fresh and from the platform otherwise.
    /// Never fails: whatever cannot be answered is unknown, with the reason.
    pub async fn load(&mut self, queries: &[Query]) -> CourseFacts {
        let now = Instant::now();
        let longest = self.settings.cache_ttl.max(self.settings.reverify_interval);
        self.answers
            .retain(|_, cached| now.saturating_duration_since(cached.at) < longest);

        // One lookup per (user, course); a pass of a pair any granted profile needs is granted.
        let mut wanted: BTreeMap<(String, String), Query> = BTreeMap::new();
        for q in queries {
            wanted
                .entry(course_key(&q.user, &q.lms_id))
                .and_modify(|known| known.granted |= q.granted)
                .or_insert_with(|| q.clone());
        }
        let mut answers = HashMap::new();
        let mut stale = Vec::new();
        for (key, q) in wanted {
            match self.answers.get(&key) {
                Some(cached) if is_fresh(cached, q.granted, now, &self.settings) => {
                    answers.insert(key, self.result(&cached.answer));
                }
                _ => stale.push(q),
            }
        }
        let cached = answers.len() as u64;

        let (fetched, requests, unavailable) = if stale.is_empty() {
            (Vec::new(), 0, false)
        } else if let Some(until) = self.pause_until.filter(|until| *until > now) {
            let failure = Failure::new(
                Cause::Throttled,
                format!(
                    "the platform asked coursegate to wait; not asking it for another {}",
                    humantime::format_duration(Duration::from_secs(
                        until.saturating_duration_since(now).as_secs().max(1)
                    ))
                ),
            );
            (super::http::fail_every(stale, &failure), 0, true)
        } else {
            match self.settings.credentials.read() {
                Err(e) => (
                    super::http::fail_every(stale, &Failure::new(Cause::Secret, e.to_string())),
                    0,
                    true,
                ),
                Ok(secret) => {
                    let pass = Pass::new(&self.client, &self.base, &secret, &self.settings);
                    let fetched = self.adapter.fetch(&pass, stale).await;
                    self.pause_until = pass.pause_until().or(self.pause_until);
                    (fetched, pass.requests(), pass.tripped().is_some())
                }
            }
        };

        let mut failures: BTreeMap<Cause, (u64, String)> = BTreeMap::new();
        let mut not_passed: BTreeMap<NotPassed, u64> = BTreeMap::new();
        for (q, result) in fetched {
            let key = course_key(&q.user, &q.lms_id);
            match result {
                Ok(answer) => {
                    if let Answer::NotPassed(why) = answer {
                        *not_passed.entry(why).or_default() += 1;
                    }
                    answers.insert(key.clone(), self.result(&answer));
                    self.answers.insert(key, Cached { answer, at: now });
                }
                Err(failure) => {
                    tracing::debug!(user = %q.user, course = %q.lms_id, cause = failure.cause.label(), "course result unknown: {failure}");
                    answers.insert(
                        key,
                        CourseResult::Unknown {
                            reason: format!("{}: {failure}", self.label),
                        },
                    );
                    failures
                        .entry(failure.cause)
                        .or_insert((0, failure.detail))
                        .0 += 1;
                }
            }
        }
        let notes: Vec<String> = not_passed
            .iter()
            .filter(|(why, _)| **why != NotPassed::Incomplete)
            .map(|(why, n)| format!("{n} {}", why.describe()))
            .collect();
        if !notes.is_empty() {
            tracing::info!(
                source = %self.label,
                "not passed because the platform says so: {}",
                notes.join(", ")
            );
        }
        let problems = failures
            .iter()
            .map(|(cause, (n, detail))| {
                format!(
                    "{}: {n} {} unknown ({}): {detail}",
                    self.label,
                    if *n == 1 { "lookup" } else { "lookups" },
                    cause.label()
                )
            })
            .collect();
        let stats = ReadStats {
            requests,
            cached,
            errors: failures
                .iter()
                .map(|(cause, (n, _))| (cause.label().to_string(), *n))
                .collect(),
        };
        CourseFacts::from_answers(self.label.clone(), answers, problems, unavailable, stats)
    }

    fn result(&self, answer: &Answer) -> CourseResult {
        match answer {
            Answer::Passed { at, reference } => CourseResult::Passed {
                at: *at,
                source: self.label.clone(),
                reference: Some(reference.clone()),
            },
            Answer::NotPassed(_) => CourseResult::NotPassed,
        }
    }
}

/// Whether a cached answer may be used for a pair (module docs): a pass a granted membership
/// rests on for `reverify_interval`, anything else for `cache_ttl`.
fn is_fresh(cached: &Cached, granted: bool, now: Instant, settings: &HttpLms) -> bool {
    let limit = match cached.answer {
        Answer::Passed { .. } if granted => settings.reverify_interval,
        _ => settings.cache_ttl,
    };
    now.saturating_duration_since(cached.at) < limit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HttpCredentials;

    fn settings() -> HttpLms {
        HttpLms {
            url: "https://lms.example.org".into(),
            credentials: HttpCredentials::Token {
                file: "/nonexistent".into(),
            },
            agent_account: None,
            tls_ca_file: None,
            cache_ttl: Duration::from_secs(600),
            reverify_interval: Duration::from_secs(86400),
            timeout: Duration::from_secs(10),
            concurrency: 4,
            bulk_threshold: 20,
        }
    }

    fn passed() -> Answer {
        Answer::Passed {
            at: Utc::now(),
            reference: PlatformRef::default(),
        }
    }

    #[test]
    fn granted_passes_live_for_reverify_interval_everything_else_for_the_ttl() {
        let s = settings();
        let start = Instant::now();
        let at = |answer: Answer| Cached { answer, at: start };
        let minutes = |m: u64| start + Duration::from_secs(m * 60);
        // Inside the TTL everything is fresh.
        assert!(is_fresh(&at(passed()), false, minutes(9), &s));
        assert!(is_fresh(
            &at(Answer::NotPassed(NotPassed::Incomplete)),
            true,
            minutes(9),
            &s
        ));
        // After it, only a pass a granted membership rests on.
        assert!(!is_fresh(&at(passed()), false, minutes(11), &s));
        assert!(!is_fresh(
            &at(Answer::NotPassed(NotPassed::Incomplete)),
            true,
            minutes(11),
            &s
        ));
        assert!(is_fresh(&at(passed()), true, minutes(23 * 60), &s));
        assert!(!is_fresh(&at(passed()), true, minutes(24 * 60), &s));
    }

    #[test]
    fn resync_forgets_not_passed_and_keeps_passes() {
        let lms = Lms {
            kind: LmsKind::Moodle,
            label: "moodle:https://lms.example.org".into(),
            path: None,
            http: Some(settings()),
        };
        let mut platform = Platform::new(&lms).unwrap();
        let now = Instant::now();
        platform.answers.insert(
            course_key("anna", "1"),
            Cached {
                answer: passed(),
                at: now,
            },
        );
        platform.answers.insert(
            course_key("bertil", "1"),
            Cached {
                answer: Answer::NotPassed(NotPassed::NotEnrolled),
                at: now,
            },
        );
        platform.resync();
        assert!(platform.answers.contains_key(&course_key("anna", "1")));
        assert!(!platform.answers.contains_key(&course_key("bertil", "1")));
    }

    #[tokio::test]
    async fn an_unreadable_secret_makes_every_lookup_unknown_and_sends_nothing() {
        let lms = Lms {
            kind: LmsKind::Canvas,
            label: "canvas:https://lms.example.org".into(),
            path: None,
            http: Some(settings()),
        };
        let mut platform = Platform::new(&lms).unwrap();
        let query = Query {
            user: "anna".into(),
            login: "anna".into(),
            mail: None,
            lms_id: "1".into(),
            granted: true,
        };
        let facts = platform.load(&[query]).await;
        assert!(facts.is_unavailable());
        assert_eq!(facts.stats().requests, 0);
        assert_eq!(facts.stats().errors.get("secret"), Some(&1));
        match facts.result("anna", "1") {
            CourseResult::Unknown { reason } => {
                assert!(reason.contains("lms.token_file"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            facts.problems()[0].contains("1 lookup unknown (secret)"),
            "{:?}",
            facts.problems()
        );
    }
}
