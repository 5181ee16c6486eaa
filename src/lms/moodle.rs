//! Moodle (`kind = "moodle"`) through its REST web services.
//!
//! Two functions of the web service the token belongs to are called, as `POST` to
//! `<url>/webservice/rest/server.php` with `wstoken`, `wsfunction` and `moodlewsrestformat=json`
//! in the form body (a token in a query string would end up in every access log on the way):
//!
//! 1. `core_user_get_users_by_field` (`field=username`, `values[i]`): the accounts to Moodle
//!    user ids, up to [`USERS_PER_REQUEST`] per call. A name Moodle does not return has no
//!    Moodle account: *not passed*, which Moodle said positively.
//! 2. `core_completion_get_course_completion_status` (`courseid` = the course's `lms_id`,
//!    `userid`): `completionstatus.completed` decides; the completion date is the latest
//!    `timecompleted` of the course's criteria.
//!
//! Moodle reports errors with HTTP 200 and a body `{"exception":…,"errorcode":…,"message":…}`.
//! Those are unknown, with the errorcode; `invalidtoken` and access exceptions stop the pass and
//! are reported as the platform being unavailable. The one exception is `usernotenroled`: Moodle
//! positively says the user is not in the course, which is *not passed*.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use reqwest::Url;
use serde_json::Value;

use super::Query;
use super::http::{Cause, Failure, Pass, endpoint, fail_every};
use super::platform::{Answer, NotPassed};
use crate::audit::PlatformRef;

/// Usernames resolved per `core_user_get_users_by_field` call.
pub const USERS_PER_REQUEST: usize = 50;

const USERS_FUNCTION: &str = "core_user_get_users_by_field";
const COMPLETION_FUNCTION: &str = "core_completion_get_course_completion_status";

/// The Moodle adapter. It keeps nothing between passes: user ids are looked up again with the
/// answers that need them (one request for up to 50 users).
#[derive(Debug)]
pub struct Moodle;

impl Moodle {
    /// Answers `queries` (none of them cached): user ids first, then one completion status per
    /// (user, course).
    pub async fn fetch(
        &self,
        pass: &Pass<'_>,
        queries: Vec<Query>,
    ) -> Vec<(Query, Result<Answer, Failure>)> {
        let token = match pass.token("Moodle") {
            Ok(token) => token,
            Err(failure) => return fail_every(queries, &failure),
        };
        let url = endpoint(pass.base(), &["webservice", "rest", "server.php"]);

        let mut logins: Vec<String> = queries.iter().map(|q| username(&q.login)).collect();
        logins.sort();
        logins.dedup();
        let chunks: Vec<Vec<String>> = logins
            .chunks(USERS_PER_REQUEST)
            .map(<[String]>::to_vec)
            .collect();
        let resolved = pass
            .each(chunks, |chunk| users(pass, &url, token, chunk))
            .await;
        let mut ids: HashMap<String, Result<Option<u64>, Failure>> = HashMap::new();
        for (chunk, result) in resolved {
            for login in chunk {
                let id = match &result {
                    Ok(found) => Ok(found.get(&login).copied()),
                    Err(failure) => Err(failure.clone()),
                };
                ids.insert(login, id);
            }
        }

        pass.each(queries, |q| {
            let id = ids.get(&username(&q.login)).cloned();
            let url = &url;
            async move {
                match id {
                    Some(Ok(Some(user_id))) => {
                        completion(pass, url, token, user_id, &q.lms_id).await
                    }
                    Some(Ok(None)) => Ok(Answer::NotPassed(NotPassed::NoSuchUser)),
                    Some(Err(failure)) => Err(failure),
                    None => Err(Failure::shape("the user was not looked up in Moodle")),
                }
            }
        })
        .await
    }
}

/// Moodle keeps usernames in lower case (`PARAM_USERNAME`).
fn username(login: &str) -> String {
    login.trim().to_lowercase()
}

/// One web service call: the answer, or Moodle's own error, or why there is neither.
async fn call(
    pass: &Pass<'_>,
    url: &Url,
    token: &str,
    function: &str,
    args: &[(String, String)],
) -> Result<Result<Value, MoodleError>, Failure> {
    let mut form: Vec<(&str, &str)> = vec![
        ("wstoken", token),
        ("wsfunction", function),
        ("moodlewsrestformat", "json"),
    ];
    form.extend(args.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let reply = pass
        .send(pass.client().post(url.clone()).form(&form))
        .await?;
    if let Some(failure) = reply.status_failure("Moodle", "lms.token_file") {
        return Err(failure);
    }
    let value = reply.json()?;
    Ok(match error_body(&value) {
        Some(error) => Err(error),
        None => Ok(value),
    })
}

async fn users(
    pass: &Pass<'_>,
    url: &Url,
    token: &str,
    logins: Vec<String>,
) -> Result<HashMap<String, u64>, Failure> {
    let mut args = vec![("field".to_string(), "username".to_string())];
    args.extend(
        logins
            .iter()
            .enumerate()
            .map(|(i, login)| (format!("values[{i}]"), login.clone())),
    );
    match call(pass, url, token, USERS_FUNCTION, &args).await? {
        Ok(value) => parse_users(&value),
        Err(error) => Err(error.failure(USERS_FUNCTION)),
    }
}

async fn completion(
    pass: &Pass<'_>,
    url: &Url,
    token: &str,
    user_id: u64,
    course_id: &str,
) -> Result<Answer, Failure> {
    let args = [
        ("courseid".to_string(), course_id.trim().to_string()),
        ("userid".to_string(), user_id.to_string()),
    ];
    match call(pass, url, token, COMPLETION_FUNCTION, &args).await? {
        Ok(value) => parse_completion(&value, course_id.trim(), user_id),
        Err(error) if error.errorcode == "usernotenroled" => {
            Ok(Answer::NotPassed(NotPassed::NotEnrolled))
        }
        Err(error) => Err(error.failure(COMPLETION_FUNCTION)),
    }
}

// === the answers ===

/// Moodle's error body: `{"exception": …, "errorcode": …, "message": …}` (HTTP 200).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoodleError {
    pub errorcode: String,
    pub message: String,
}

impl MoodleError {
    /// What the error means for the lookup. Errors about the token or the service stop the pass.
    pub fn failure(&self, function: &str) -> Failure {
        let code = self.errorcode.as_str();
        let said = format!("{code}: {}", self.message);
        match code {
            "invalidtoken" => Failure::new(
                Cause::Unauthorized,
                format!("Moodle rejected the web service token ({said}); check lms.token_file"),
            ),
            "accessexception"
            | "nopermissions"
            | "requireloginerror"
            | "forbiddenwsuser"
            | "servicenotavailable"
            | "usernotfullysetup"
            | "invalidiptoken" => Failure::new(
                Cause::Forbidden,
                format!(
                    "Moodle refused {function} ({said}); the token's web service needs that function and the user its capabilities"
                ),
            ),
            "sitemaintenance" => Failure::new(
                Cause::ServerError,
                format!("Moodle is in maintenance mode ({said})"),
            ),
            _ => Failure::new(
                Cause::PlatformError,
                format!("Moodle error {said} ({function})"),
            ),
        }
    }
}

/// Recognises Moodle's error body.
pub fn error_body(value: &Value) -> Option<MoodleError> {
    let object = value.as_object()?;
    if !object.contains_key("exception") {
        return None;
    }
    let text = |key: &str| {
        object
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Some(MoodleError {
        errorcode: match text("errorcode") {
            code if code.is_empty() => text("exception"),
            code => code,
        },
        message: text("message"),
    })
}

/// `core_user_get_users_by_field`: an array of users; lower-cased username -> id.
pub fn parse_users(value: &Value) -> Result<HashMap<String, u64>, Failure> {
    let Some(list) = value.as_array() else {
        return Err(Failure::shape(format!(
            "{USERS_FUNCTION} did not answer with an array of users"
        )));
    };
    let mut ids = HashMap::new();
    for user in list {
        let id = user.get("id").and_then(as_integer);
        let name = user.get("username").and_then(Value::as_str);
        let (Some(id), Some(name)) = (id, name) else {
            return Err(Failure::shape(format!(
                "{USERS_FUNCTION}: a user without a numeric `id` and a `username`"
            )));
        };
        ids.insert(username(name), id);
    }
    Ok(ids)
}

/// `core_completion_get_course_completion_status`: `completionstatus.completed` decides, and the
/// latest `timecompleted` of the criteria is the completion date.
pub fn parse_completion(value: &Value, course_id: &str, user_id: u64) -> Result<Answer, Failure> {
    let status = value
        .get("completionstatus")
        .ok_or_else(|| Failure::shape(format!("{COMPLETION_FUNCTION}: no `completionstatus`")))?;
    let completed = status
        .get("completed")
        .and_then(Value::as_bool)
        .ok_or_else(|| {
            Failure::shape(format!(
                "{COMPLETION_FUNCTION}: `completionstatus.completed` is not true or false"
            ))
        })?;
    let criteria = status
        .get("completions")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            Failure::shape(format!(
                "{COMPLETION_FUNCTION}: `completionstatus.completions` is not a list"
            ))
        })?;
    if !completed {
        return Ok(Answer::NotPassed(NotPassed::Incomplete));
    }
    let mut latest: Option<i64> = None;
    for criterion in criteria {
        match criterion.get("timecompleted") {
            None | Some(Value::Null) => {}
            Some(time) => {
                let Some(seconds) = as_integer(time).and_then(|s| i64::try_from(s).ok()) else {
                    return Err(Failure::shape(format!(
                        "{COMPLETION_FUNCTION}: `timecompleted` {time} is not a Unix time"
                    )));
                };
                if seconds > 0 {
                    latest = Some(latest.map_or(seconds, |l| l.max(seconds)));
                }
            }
        }
    }
    let Some(seconds) = latest else {
        return Err(Failure::shape(format!(
            "{COMPLETION_FUNCTION}: the course is completed, but no criterion says when"
        )));
    };
    let at: DateTime<Utc> = Utc.timestamp_opt(seconds, 0).single().ok_or_else(|| {
        Failure::shape(format!(
            "{COMPLETION_FUNCTION}: `timecompleted` {seconds} is out of range"
        ))
    })?;
    Ok(Answer::Passed {
        at,
        reference: PlatformRef {
            platform: "moodle".to_string(),
            course_id: course_id.to_string(),
            user_id: Some(user_id.to_string()),
            completed_at: seconds.to_string(),
            ..PlatformRef::default()
        },
    })
}

/// A JSON number or numeric string (Moodle has sent both over the years) as an unsigned integer.
fn as_integer(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(completed: bool, times: &[Value]) -> Value {
        let completions: Vec<Value> = times
            .iter()
            .map(|t| {
                json!({"type": 4, "title": "Activity", "status": "Yes", "complete": !t.is_null(),
                       "timecompleted": t, "details": {"type": "", "criteria": "", "requirement": "", "status": ""}})
            })
            .collect();
        json!({"completionstatus": {"completed": completed, "aggregation": 1, "completions": completions}, "warnings": []})
    }

    #[test]
    fn completed_course_is_passed_at_the_latest_criterion() {
        let answer = parse_completion(
            &status(true, &[json!(1763633702), json!(1763720102), Value::Null]),
            "42",
            7,
        )
        .unwrap();
        let Answer::Passed { at, reference } = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(at, Utc.timestamp_opt(1763720102, 0).unwrap());
        assert_eq!(reference.platform, "moodle");
        assert_eq!(reference.course_id, "42");
        assert_eq!(reference.user_id.as_deref(), Some("7"));
        assert_eq!(reference.completed_at, "1763720102");
        // Numeric strings count too.
        assert!(matches!(
            parse_completion(&status(true, &[json!("1763633702")]), "42", 7),
            Ok(Answer::Passed { .. })
        ));
    }

    #[test]
    fn incomplete_course_is_not_passed() {
        assert_eq!(
            parse_completion(&status(false, &[json!(1763633702), Value::Null]), "42", 7),
            Ok(Answer::NotPassed(NotPassed::Incomplete))
        );
    }

    #[test]
    fn unexpected_shapes_are_unknown() {
        for value in [
            json!([]),
            json!({"completionstatus": {"completions": []}}),
            json!({"completionstatus": {"completed": "yes", "completions": []}}),
            json!({"completionstatus": {"completed": true}}),
            // Completed without any date: no evidence to grant on.
            status(true, &[Value::Null]),
            status(true, &[json!("yesterday")]),
        ] {
            let failure = parse_completion(&value, "42", 7).unwrap_err();
            assert_eq!(failure.cause, Cause::Shape, "{value}: {failure}");
        }
    }

    #[test]
    fn users_by_username() {
        let ids = parse_users(&json!([
            {"id": 12, "username": "anna.andersson", "fullname": "Anna"},
            {"id": "13", "username": "Bertil"}
        ]))
        .unwrap();
        assert_eq!(ids.get("anna.andersson"), Some(&12));
        assert_eq!(ids.get("bertil"), Some(&13));
        assert!(parse_users(&json!([])).unwrap().is_empty());
        assert_eq!(
            parse_users(&json!({"users": []})).unwrap_err().cause,
            Cause::Shape
        );
        assert_eq!(
            parse_users(&json!([{"username": "x"}])).unwrap_err().cause,
            Cause::Shape
        );
    }

    #[test]
    fn error_bodies_are_classified() {
        let error = |code: &str| {
            error_body(&json!({"exception": "moodle_exception", "errorcode": code, "message": "m"}))
                .unwrap()
                .failure(COMPLETION_FUNCTION)
        };
        assert_eq!(error("invalidtoken").cause, Cause::Unauthorized);
        assert!(error("invalidtoken").detail.contains("lms.token_file"));
        assert_eq!(error("accessexception").cause, Cause::Forbidden);
        assert_eq!(error("sitemaintenance").cause, Cause::ServerError);
        let other = error("nocriteriaset");
        assert_eq!(other.cause, Cause::PlatformError);
        assert!(other.detail.contains("nocriteriaset"), "{other}");
        assert!(error_body(&json!({"completionstatus": {}})).is_none());
        assert!(error_body(&json!([])).is_none());
    }
}
