//! Canvas (`kind = "canvas"`) through its REST API, with the access token as `Bearer`.
//!
//! Per user: `GET /api/v1/courses/:lms_id/users/sis_login_id:<login>/progress` answers
//! `requirement_count`, `requirement_completed_count` and `completed_at`; passed ⇔ `completed_at`
//! is set, and it is the completion date. A 404 there means the user is not in the course — or
//! that the course does not exist: `GET /api/v1/courses/:lms_id` (once per course and pass) tells
//! which, so only a missing *user* reads as *not passed*.
//!
//! In bulk, from `bulk_threshold` users to ask about in one course: the course's users
//! (`/api/v1/courses/:id/users`, for their `login_id`) and `/api/v1/courses/:id/bulk_user_progress`
//! (the same progress objects, by Canvas user id), each read to the end through `Link: rel="next"`.
//! Bulk answers are used only where they give the same answer as the per-user endpoint: a user
//! the listings do not show with a login and a progress (concluded enrollments, another login
//! than the listed one, no permission to see logins) is asked per user.
//!
//! Throttling (HTTP 429, or 403 with "Rate Limit Exceeded") and a nearly used-up
//! `X-Rate-Limit-Remaining` are handled in [`super::http::Pass`]: no new request in this pass,
//! and none until the `Retry-After` has passed.

use std::collections::{BTreeMap, HashMap};

use chrono::DateTime;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::OnceCell;

use super::Query;
use super::http::{Cause, Failure, MAX_PAGES, Pass, endpoint, fail_every, next_link};
use super::platform::{Answer, NotPassed};
use crate::audit::PlatformRef;

/// Items per page asked of Canvas's listings (its usual maximum).
const PER_PAGE: &str = "100";

/// The Canvas adapter; `bulk_threshold` users in one course switch to the bulk endpoints.
#[derive(Debug)]
pub struct Canvas {
    bulk_threshold: usize,
}

impl Canvas {
    pub fn new(bulk_threshold: usize) -> Canvas {
        Canvas { bulk_threshold }
    }

    /// Answers `queries` (none of them cached): bulk per course where enough users are asked
    /// about, per user for the rest.
    pub async fn fetch(
        &self,
        pass: &Pass<'_>,
        queries: Vec<Query>,
    ) -> Vec<(Query, Result<Answer, Failure>)> {
        let token = match pass.token("Canvas") {
            Ok(token) => token,
            Err(failure) => return fail_every(queries, &failure),
        };
        let mut by_course: BTreeMap<String, Vec<Query>> = BTreeMap::new();
        for q in queries {
            by_course
                .entry(q.lms_id.trim().to_string())
                .or_default()
                .push(q);
        }

        let mut answered = Vec::new();
        let mut per_user: Vec<(String, Query)> = Vec::new();
        for (course, queries) in by_course {
            if queries.len() < self.bulk_threshold {
                per_user.extend(queries.into_iter().map(|q| (course.clone(), q)));
                continue;
            }
            match bulk(pass, token, &course).await {
                Ok(mut progress) => {
                    for q in queries {
                        match progress.remove(&q.login.trim().to_lowercase()) {
                            Some(result) => answered.push((q, result)),
                            None => per_user.push((course.clone(), q)),
                        }
                    }
                }
                Err(failure) => {
                    pass.trip(&failure);
                    answered.extend(fail_every(queries, &failure));
                }
            }
        }

        // Whether each course exists, asked at most once, and only after a 404 for a user.
        let exists: HashMap<String, OnceCell<Result<bool, Failure>>> = per_user
            .iter()
            .map(|(course, _)| (course.clone(), OnceCell::new()))
            .collect();
        let asked = pass
            .each(per_user, |(course, q)| {
                let exists = &exists;
                async move { progress(pass, token, &course, &q.login, exists.get(&course)).await }
            })
            .await;
        answered.extend(asked.into_iter().map(|((_, q), result)| (q, result)));
        answered
    }
}

/// One user's progress in one course.
async fn progress(
    pass: &Pass<'_>,
    token: &str,
    course: &str,
    login: &str,
    exists: Option<&OnceCell<Result<bool, Failure>>>,
) -> Result<Answer, Failure> {
    let user = format!("sis_login_id:{}", login.trim());
    let url = endpoint(
        pass.base(),
        &["api", "v1", "courses", course, "users", &user, "progress"],
    );
    let reply = pass.send(pass.client().get(url).bearer_auth(token)).await?;
    if reply.status == StatusCode::NOT_FOUND {
        let known = match exists {
            Some(cell) => cell
                .get_or_init(|| course_exists(pass, token, course))
                .await
                .clone(),
            None => course_exists(pass, token, course).await,
        };
        return match known? {
            true => Ok(Answer::NotPassed(NotPassed::NotEnrolled)),
            false => Err(no_such_course(course)),
        };
    }
    if let Some(failure) = reply.status_failure("Canvas", "lms.token_file") {
        return Err(failure);
    }
    parse_progress(&reply.json()?, course, None)
}

async fn course_exists(pass: &Pass<'_>, token: &str, course: &str) -> Result<bool, Failure> {
    let url = endpoint(pass.base(), &["api", "v1", "courses", course]);
    let reply = pass.send(pass.client().get(url).bearer_auth(token)).await?;
    if reply.status == StatusCode::NOT_FOUND {
        return Ok(false);
    }
    if let Some(failure) = reply.status_failure("Canvas", "lms.token_file") {
        return Err(failure);
    }
    match reply.json()? {
        Value::Object(_) => Ok(true),
        _ => Err(Failure::shape(
            "GET /api/v1/courses/:id did not answer with a course",
        )),
    }
}

fn no_such_course(course: &str) -> Failure {
    Failure::new(
        Cause::NotFound,
        format!("Canvas has no course `{course}` (lms_id), or the token cannot see it"),
    )
}

/// The course's progress in bulk: lower-cased login -> the answer, for every user the listings
/// show with both a login and a progress object Canvas documents.
async fn bulk(
    pass: &Pass<'_>,
    token: &str,
    course: &str,
) -> Result<HashMap<String, Result<Answer, Failure>>, Failure> {
    let listing = |what: &str| {
        let mut url = endpoint(pass.base(), &["api", "v1", "courses", course, what]);
        url.query_pairs_mut().append_pair("per_page", PER_PAGE);
        url
    };
    let users = pages(pass, token, listing("users"), course).await?;
    let logins = parse_course_users(&users);
    let entries = pages(pass, token, listing("bulk_user_progress"), course).await?;
    let mut out = HashMap::new();
    for entry in &entries {
        if let Some((id, answer)) = parse_bulk_entry(entry, course)
            && let Some(login) = logins.get(&id)
        {
            out.insert(login.clone(), answer);
        }
    }
    Ok(out)
}

/// Every item of a paginated listing, following `Link: rel="next"` to the end.
async fn pages(
    pass: &Pass<'_>,
    token: &str,
    first: reqwest::Url,
    course: &str,
) -> Result<Vec<Value>, Failure> {
    let mut url = first;
    let mut items = Vec::new();
    for _ in 0..MAX_PAGES {
        let reply = pass.send(pass.client().get(url).bearer_auth(token)).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Err(no_such_course(course));
        }
        if let Some(failure) = reply.status_failure("Canvas", "lms.token_file") {
            return Err(failure);
        }
        match reply.json()? {
            Value::Array(page) => items.extend(page),
            _ => return Err(Failure::shape("a Canvas listing is not a JSON array")),
        }
        match next_link(&reply.headers) {
            Some(link) => url = pass.follow(&link)?,
            None => return Ok(items),
        }
    }
    Err(Failure::shape(format!(
        "a Canvas listing has more than {MAX_PAGES} pages"
    )))
}

// === the answers ===

/// A course progress object: passed ⇔ `completed_at` is set. Canvas answers
/// `{"error": {"message": …}}` instead when the course has no module requirements or the user is
/// not a student in it — not a positive "not passed", so unknown.
pub fn parse_progress(
    value: &Value,
    course: &str,
    user_id: Option<u64>,
) -> Result<Answer, Failure> {
    if let Some(message) = value.get("error").map(|e| {
        e.get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message")
            .to_string()
    }) {
        return Err(Failure::new(
            Cause::PlatformError,
            format!("Canvas has no progress for course `{course}`: {message}"),
        ));
    }
    let Some(object) = value.as_object() else {
        return Err(Failure::shape(
            "a Canvas course progress is not a JSON object",
        ));
    };
    for key in ["requirement_count", "requirement_completed_count"] {
        if !object.get(key).is_some_and(Value::is_u64) {
            return Err(Failure::shape(format!(
                "a Canvas course progress has no numeric `{key}`"
            )));
        }
    }
    match object.get("completed_at") {
        Some(Value::Null) => Ok(Answer::NotPassed(NotPassed::Incomplete)),
        Some(Value::String(text)) => {
            let at = DateTime::parse_from_rfc3339(text).map_err(|e| {
                Failure::shape(format!(
                    "`completed_at` \"{text}\" is not an ISO 8601 time: {e}"
                ))
            })?;
            Ok(Answer::Passed {
                at: at.to_utc(),
                reference: PlatformRef {
                    platform: "canvas".to_string(),
                    course_id: course.to_string(),
                    user_id: user_id.map(|id| id.to_string()),
                    completed_at: text.clone(),
                    ..PlatformRef::default()
                },
            })
        }
        _ => Err(Failure::shape(
            "a Canvas course progress has no `completed_at` (null or a time)",
        )),
    }
}

/// The course's users: Canvas user id -> lower-cased `login_id`. Users shown without a login
/// (the token may not see logins) are left out: they are asked about per user.
pub fn parse_course_users(users: &[Value]) -> HashMap<u64, String> {
    users
        .iter()
        .filter_map(|u| {
            let id = u.get("id")?.as_u64()?;
            let login = u.get("login_id")?.as_str()?;
            Some((id, login.trim().to_lowercase()))
        })
        .collect()
}

/// One `bulk_user_progress` entry: the user's id and what its `progress` says. An entry in
/// another shape gives nothing, so the user is asked per user.
pub fn parse_bulk_entry(entry: &Value, course: &str) -> Option<(u64, Result<Answer, Failure>)> {
    let id = entry.get("id")?.as_u64()?;
    let result = parse_progress(entry.get("progress")?, course, Some(id));
    match &result {
        Err(failure) if failure.cause == Cause::Shape => None,
        _ => Some((id, result)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn completed_at_decides() {
        let passed = parse_progress(
            &json!({"requirement_count": 2, "requirement_completed_count": 2,
                    "next_requirement_url": null, "completed_at": "2026-11-20T10:15:02Z"}),
            "12",
            Some(5),
        )
        .unwrap();
        let Answer::Passed { at, reference } = passed else {
            panic!("{passed:?}");
        };
        assert_eq!(at.to_rfc3339(), "2026-11-20T10:15:02+00:00");
        assert_eq!(reference.platform, "canvas");
        assert_eq!(reference.course_id, "12");
        assert_eq!(reference.user_id.as_deref(), Some("5"));
        assert_eq!(reference.completed_at, "2026-11-20T10:15:02Z");

        assert_eq!(
            parse_progress(
                &json!({"requirement_count": 2, "requirement_completed_count": 1,
                        "next_requirement_url": "https://c/x", "completed_at": null}),
                "12",
                None
            ),
            Ok(Answer::NotPassed(NotPassed::Incomplete))
        );
    }

    #[test]
    fn odd_progress_is_unknown() {
        for (value, cause) in [
            (
                json!({"requirement_count": 1, "requirement_completed_count": 1}),
                Cause::Shape,
            ),
            (
                json!({"requirement_count": 1, "requirement_completed_count": 1, "completed_at": 5}),
                Cause::Shape,
            ),
            (
                json!({"requirement_count": 1, "requirement_completed_count": 1, "completed_at": "gestern"}),
                Cause::Shape,
            ),
            (
                json!({"requirement_completed_count": 1, "completed_at": null}),
                Cause::Shape,
            ),
            (json!([]), Cause::Shape),
            (
                json!({"error": {"message": "no progress available because this course is not module based"}}),
                Cause::PlatformError,
            ),
        ] {
            let failure = parse_progress(&value, "12", None).unwrap_err();
            assert_eq!(failure.cause, cause, "{value}: {failure}");
        }
    }

    #[test]
    fn bulk_entries_and_logins() {
        let users = [
            json!({"id": 1, "name": "Anna", "login_id": "Anna.Andersson"}),
            json!({"id": 2, "name": "Bertil"}),
        ];
        let logins = parse_course_users(&users);
        assert_eq!(logins.get(&1).map(String::as_str), Some("anna.andersson"));
        assert!(!logins.contains_key(&2));

        let entry = json!({"id": 1, "display_name": "Anna", "progress":
            {"requirement_count": 1, "requirement_completed_count": 1, "next_requirement_url": null,
             "completed_at": "2026-11-20T10:15:02Z"}});
        let (id, answer) = parse_bulk_entry(&entry, "12").unwrap();
        assert_eq!(id, 1);
        assert!(matches!(answer, Ok(Answer::Passed { .. })));
        // Not understood: asked per user instead.
        assert!(parse_bulk_entry(&json!({"id": 1, "progress": {"x": 1}}), "12").is_none());
        assert!(parse_bulk_entry(&json!({"display_name": "no id"}), "12").is_none());
    }
}
