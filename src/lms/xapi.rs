//! A Learning Record Store (`kind = "xapi"`), xAPI 1.0.3, with HTTP Basic authentication and
//! the `X-Experience-API-Version: 1.0.3` header on every request.
//!
//! For each (user, course): `GET <url>/statements?agent=…&verb=…&activity=<lms_id>` for each of
//! the verbs in [`VERBS`] — ADL `passed` and `completed`, and cmi5 `satisfied` — following `more`
//! to the end. A statement with one of them for the activity is a pass (a `completed` whose
//! `result.success` is `false` is not); the latest `timestamp` (else `stored`) is the completion
//! date, and the statement's id is the evidence. No such statement: *not passed*. Voided
//! statements are not returned by the LRS for such queries (xAPI 1.0.3, part two, §2.3.2), so a
//! voided pass does not count.
//!
//! The agent is `{"mbox": "mailto:<mail>"}` with the user's `mail` from the directory (as the
//! directory spells it), or `{"account": {"homePage": …, "name": …}}` from `agent_account` in the
//! config with `{user}` replaced by the account. A user without `mail` cannot be asked about:
//! unknown.

use chrono::{DateTime, Utc};
use reqwest::Url;
use serde_json::{Value, json};

use super::Query;
use super::http::{Cause, Failure, MAX_PAGES, Pass, XAPI_VERSION_HEADER, endpoint};
use super::platform::{Answer, NotPassed};
use crate::audit::PlatformRef;
use crate::config::{AgentAccount, HttpSecret};

/// The xAPI version coursegate speaks.
pub const XAPI_VERSION: &str = "1.0.3";

/// The verbs that mean "passed": ADL `passed`, ADL `completed`, cmi5 `satisfied`.
pub const VERBS: [&str; 3] = [
    "http://adlnet.gov/expapi/verbs/passed",
    "http://adlnet.gov/expapi/verbs/completed",
    "https://w3id.org/xapi/adl/verbs/satisfied",
];
const COMPLETED: &str = "http://adlnet.gov/expapi/verbs/completed";

/// The xAPI adapter; `account` is the agent template, `None` for `mbox` from `mail`.
#[derive(Debug)]
pub struct Xapi {
    account: Option<AgentAccount>,
}

/// The best passing statement found so far.
#[derive(Debug, Clone)]
struct Candidate {
    at: DateTime<Utc>,
    id: String,
    verb: String,
    time: String,
}

impl Xapi {
    pub fn new(account: Option<AgentAccount>) -> Xapi {
        Xapi { account }
    }

    /// The xAPI agent for `query`, as JSON.
    pub fn agent(&self, query: &Query) -> Result<Value, Failure> {
        if let Some(account) = &self.account {
            return Ok(json!({
                "objectType": "Agent",
                "account": {
                    "homePage": account.home_page,
                    "name": account.name.replace("{user}", query.login.trim()),
                },
            }));
        }
        match query
            .mail
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            Some(mail) => Ok(json!({"objectType": "Agent", "mbox": format!("mailto:{mail}")})),
            None => Err(Failure::new(
                Cause::NoAgent,
                "the directory entry has no mail to name the xAPI agent by (or set lms.agent_account)",
            )),
        }
    }

    pub async fn fetch(
        &self,
        pass: &Pass<'_>,
        queries: Vec<Query>,
    ) -> Vec<(Query, Result<Answer, Failure>)> {
        pass.each(queries, |q| async move { self.lookup(pass, &q).await })
            .await
    }

    async fn lookup(&self, pass: &Pass<'_>, query: &Query) -> Result<Answer, Failure> {
        let agent = self.agent(query)?.to_string();
        let activity = query.lms_id.trim();
        let mut best: Option<Candidate> = None;
        let mut unreadable: Option<Failure> = None;
        for verb in VERBS {
            for statement in statements(pass, &agent, verb, activity).await? {
                match candidate(&statement, verb, activity) {
                    Ok(Some(found)) if best.as_ref().is_none_or(|b| found.at > b.at) => {
                        best = Some(found);
                    }
                    Ok(_) => {}
                    Err(failure) => unreadable = Some(failure),
                }
            }
        }
        match (best, unreadable) {
            (Some(found), _) => Ok(Answer::Passed {
                at: found.at,
                reference: PlatformRef {
                    platform: "xapi".to_string(),
                    course_id: activity.to_string(),
                    statement_id: Some(found.id),
                    verb: Some(found.verb),
                    completed_at: found.time,
                    ..PlatformRef::default()
                },
            }),
            // A passing statement that cannot be read is not "no pass".
            (None, Some(failure)) => Err(failure),
            (None, None) => Ok(Answer::NotPassed(NotPassed::Incomplete)),
        }
    }
}

/// Every statement for (agent, verb, activity), following `more` to the end.
async fn statements(
    pass: &Pass<'_>,
    agent: &str,
    verb: &str,
    activity: &str,
) -> Result<Vec<Value>, Failure> {
    let HttpSecret::Basic { username, password } = pass.secret() else {
        return Err(Failure::new(
            Cause::Secret,
            "xAPI needs lms.username and lms.password_file",
        ));
    };
    let mut url: Url = endpoint(pass.base(), &["statements"]);
    url.query_pairs_mut()
        .append_pair("agent", agent)
        .append_pair("verb", verb)
        .append_pair("activity", activity);
    let mut found = Vec::new();
    for _ in 0..MAX_PAGES {
        let request = pass
            .client()
            .get(url)
            .basic_auth(username, Some(password.expose()))
            .header(XAPI_VERSION_HEADER, XAPI_VERSION);
        let reply = pass.send(request).await?;
        if let Some(failure) = reply.status_failure("The LRS", "lms.username and lms.password_file")
        {
            return Err(failure);
        }
        let (page, more) = parse_result(&reply.json()?)?;
        found.extend(page);
        match more {
            Some(more) => url = pass.follow(&more)?,
            None => return Ok(found),
        }
    }
    Err(Failure::shape(format!(
        "the LRS's `more` links go on for more than {MAX_PAGES} pages"
    )))
}

/// A StatementResult: its statements, and the `more` link if there is one.
pub fn parse_result(value: &Value) -> Result<(Vec<Value>, Option<String>), Failure> {
    let statements = value
        .get("statements")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::shape("the LRS's answer has no `statements` list"))?;
    let more = match value.get("more") {
        None | Some(Value::Null) => None,
        Some(Value::String(more)) if more.trim().is_empty() => None,
        Some(Value::String(more)) => Some(more.trim().to_string()),
        Some(other) => {
            return Err(Failure::shape(format!(
                "the LRS's `more` is not a link: {other}"
            )));
        }
    };
    Ok((statements.clone(), more))
}

/// Whether `statement` records a pass of `activity` with `verb`: `Ok(None)` if it does not
/// (another verb or activity than asked for, or a `completed` without success), an error if it
/// would but cannot be read.
fn candidate(statement: &Value, verb: &str, activity: &str) -> Result<Option<Candidate>, Failure> {
    let said_verb = statement.pointer("/verb/id").and_then(Value::as_str);
    let object = statement.pointer("/object/id").and_then(Value::as_str);
    if said_verb != Some(verb) || object != Some(activity) {
        return Ok(None);
    }
    if verb == COMPLETED
        && statement
            .pointer("/result/success")
            .and_then(Value::as_bool)
            == Some(false)
    {
        return Ok(None);
    }
    let Some(id) = statement.get("id").and_then(Value::as_str) else {
        return Err(Failure::shape("a statement without an `id`"));
    };
    let time = ["timestamp", "stored"].iter().find_map(|key| {
        let text = statement.get(*key)?.as_str()?;
        let at = DateTime::parse_from_rfc3339(text).ok()?;
        Some((at.to_utc(), text.to_string()))
    });
    let Some((at, time)) = time else {
        return Err(Failure::shape(format!(
            "statement {id} has no readable `timestamp` or `stored`"
        )));
    };
    Ok(Some(Candidate {
        at,
        id: id.to_string(),
        verb: verb.to_string(),
        time,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIVITY: &str = "https://lms.example.org/activities/wim-grund";

    fn statement(id: &str, verb: &str, timestamp: &str, success: Option<bool>) -> Value {
        let mut s = json!({
            "id": id,
            "actor": {"objectType": "Agent", "mbox": "mailto:anna@example.org"},
            "verb": {"id": verb, "display": {"en-US": "passed"}},
            "object": {"objectType": "Activity", "id": ACTIVITY},
            "timestamp": timestamp,
            "stored": "2026-12-01T00:00:00Z",
        });
        if let Some(success) = success {
            s["result"] = json!({"success": success});
        }
        s
    }

    fn query(mail: Option<&str>) -> Query {
        Query {
            user: "Anna".into(),
            login: "anna".into(),
            mail: mail.map(str::to_string),
            lms_id: ACTIVITY.into(),
            granted: false,
        }
    }

    #[test]
    fn agents_from_mail_or_the_account_template() {
        let by_mail = Xapi::new(None);
        assert_eq!(
            by_mail.agent(&query(Some("anna@example.org"))).unwrap(),
            json!({"objectType": "Agent", "mbox": "mailto:anna@example.org"})
        );
        assert_eq!(
            by_mail.agent(&query(None)).unwrap_err().cause,
            Cause::NoAgent
        );
        let by_account = Xapi::new(Some(AgentAccount {
            home_page: "https://lms.example.org".into(),
            name: "region\\{user}".into(),
        }));
        assert_eq!(
            by_account.agent(&query(None)).unwrap(),
            json!({"objectType": "Agent", "account": {"homePage": "https://lms.example.org", "name": "region\\anna"}})
        );
    }

    #[test]
    fn passing_statements_and_others() {
        let passed = statement("s-1", VERBS[0], "2026-11-20T10:15:02.123Z", Some(true));
        let found = candidate(&passed, VERBS[0], ACTIVITY).unwrap().unwrap();
        assert_eq!(found.id, "s-1");
        assert_eq!(found.time, "2026-11-20T10:15:02.123Z");
        // cmi5 satisfied carries no result.
        let satisfied = statement("s-2", VERBS[2], "2026-11-21T08:00:00+01:00", None);
        assert!(candidate(&satisfied, VERBS[2], ACTIVITY).unwrap().is_some());
        // completed, but failed: no pass.
        let failed = statement("s-3", COMPLETED, "2026-11-21T08:00:00Z", Some(false));
        assert!(candidate(&failed, COMPLETED, ACTIVITY).unwrap().is_none());
        // Another verb or activity than asked for (an LRS ignoring a filter): no pass.
        assert!(candidate(&passed, VERBS[1], ACTIVITY).unwrap().is_none());
        assert!(
            candidate(&passed, VERBS[0], "https://other")
                .unwrap()
                .is_none()
        );
        // A pass without a readable time is not evidence.
        let mut dateless = passed.clone();
        dateless["timestamp"] = json!("yesterday");
        dateless["stored"] = json!(null);
        assert_eq!(
            candidate(&dateless, VERBS[0], ACTIVITY).unwrap_err().cause,
            Cause::Shape
        );
    }

    #[test]
    fn statement_results_and_more() {
        let (list, more) =
            parse_result(&json!({"statements": [{"id": "a"}], "more": "/xapi/statements?more=2"}))
                .unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(more.as_deref(), Some("/xapi/statements?more=2"));
        let (_, more) = parse_result(&json!({"statements": [], "more": ""})).unwrap();
        assert_eq!(more, None);
        assert_eq!(parse_result(&json!({"statements": []})).unwrap().1, None);
        assert_eq!(parse_result(&json!([])).unwrap_err().cause, Cause::Shape);
        assert_eq!(
            parse_result(&json!({"statements": [], "more": 2}))
                .unwrap_err()
                .cause,
            Cause::Shape
        );
    }
}
