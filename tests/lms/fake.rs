//! A fake learning platform on 127.0.0.1 (axum on its own tokio runtime): Moodle's REST server,
//! Canvas's API and an xAPI LRS, answering in the shapes their documentation gives, with the
//! credentials checked the way the real ones check them. A test sets the data, can switch on a
//! [`Fault`], and reads back every request it received ([`Seen`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const MOODLE_TOKEN: &str = "moodle-token-s3cret-9f2c";
pub const CANVAS_TOKEN: &str = "canvas-token-s3cret-41ab";
pub const LRS_USER: &str = "coursegate";
pub const LRS_PASSWORD: &str = "lrs-password-s3cret-77de";

/// Misbehaviour, applied to every request while set.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Fault {
    #[default]
    None,
    /// This status with a short JSON error body (Canvas-style `errors`).
    Status(u16),
    /// 200 with HTML and broken JSON.
    Garbage,
    /// 200 with valid JSON of a shape no platform documents.
    WrongShape,
    /// Answers properly, after this delay.
    Slow(Duration),
    /// 200 and the first byte of a body at once, the rest never (within this delay).
    Drip(Duration),
    /// Moodle's error body (HTTP 200) with this errorcode.
    MoodleError(&'static str),
    /// Throttling: 429 or Canvas's 403 "Rate Limit Exceeded", with an optional Retry-After.
    Throttle {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Paginated answers link their next page to another server.
    ForeignNextLink,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Query and form parameters, decoded, in order.
    pub query: Vec<(String, String)>,
    pub form: Vec<(String, String)>,
    pub headers: HashMap<String, String>,
}

impl Seen {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .chain(&self.form)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What a Moodle course completion status says for one user.
#[derive(Debug, Clone)]
pub enum MoodleCompletion {
    /// Completed, with each criterion's `timecompleted`.
    Completed(Vec<Option<i64>>),
    Incomplete,
}

/// A Canvas user and their enrollment in one course.
#[derive(Debug, Clone)]
pub struct CanvasUser {
    pub id: u64,
    pub login: String,
    /// Whether the course's user listing shows the `login_id` (it does not without permission).
    pub login_visible: bool,
    /// `completed_at` of their progress.
    pub completed_at: Option<String>,
}

#[derive(Default)]
struct Inner {
    port: u16,
    fault: Fault,
    seen: Vec<Seen>,
    page_size: usize,
    moodle_users: BTreeMap<String, u64>,
    /// (course id, user id) -> completion; enrolled users only.
    moodle: HashMap<(u64, u64), MoodleCompletion>,
    moodle_courses: BTreeSet<u64>,
    /// course id -> enrolled users.
    canvas: BTreeMap<String, Vec<CanvasUser>>,
    statements: Vec<Value>,
    /// Pending `more` pages of the LRS.
    more: HashMap<String, Vec<Value>>,
    next_more: u64,
}

type Shared = Arc<Mutex<Inner>>;

/// The running fake. Dropping it stops the server.
pub struct Fake {
    pub port: u16,
    inner: Shared,
    _runtime: tokio::runtime::Runtime,
}

impl Fake {
    pub fn start() -> Fake {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let inner: Shared = Arc::new(Mutex::new(Inner {
            port,
            page_size: 2,
            ..Inner::default()
        }));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = axum::serve(listener, app).await;
        });
        Fake {
            port,
            inner,
            _runtime: runtime,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap())
    }

    pub fn set_fault(&self, fault: Fault) {
        self.with(|i| i.fault = fault);
    }

    /// Every request received since the last call.
    pub fn take_seen(&self) -> Vec<Seen> {
        self.with(|i| std::mem::take(&mut i.seen))
    }

    pub fn requests(&self) -> usize {
        self.with(|i| i.seen.len())
    }

    // === Moodle ===

    pub fn moodle_user(&self, username: &str, id: u64) {
        self.with(|i| i.moodle_users.insert(username.to_string(), id));
    }

    pub fn moodle_course(&self, course: u64) {
        self.with(|i| i.moodle_courses.insert(course));
    }

    /// Enrols the user in the course with this completion.
    pub fn moodle_completion(&self, course: u64, user: u64, completion: MoodleCompletion) {
        self.with(|i| i.moodle.insert((course, user), completion));
    }

    // === Canvas ===

    pub fn canvas_user(&self, course: &str, user: CanvasUser) {
        self.with(|i| {
            let users = i.canvas.entry(course.to_string()).or_default();
            users.retain(|u| u.id != user.id);
            users.push(user);
        });
    }

    // === LRS ===

    pub fn statement(&self, statement: Value) {
        self.with(|i| i.statements.push(statement));
    }

    /// Keeps only the statements `keep` accepts (the others are voided).
    pub fn retain_statements(&self, keep: impl Fn(&Value) -> bool) {
        self.with(|i| i.statements.retain(|s| keep(s)));
    }
}

/// An xAPI statement about `actor` (an agent object).
pub fn statement(id: &str, actor: Value, verb: &str, activity: &str, timestamp: &str) -> Value {
    json!({
        "id": id,
        "actor": actor,
        "verb": {"id": verb, "display": {"en-US": verb.rsplit('/').next().unwrap_or(verb)}},
        "object": {"objectType": "Activity", "id": activity},
        "result": {"success": true, "completion": true},
        "timestamp": timestamp,
        "stored": timestamp,
        "authority": {"objectType": "Agent", "mbox": "mailto:lrs@example.org"},
        "version": "1.0.3",
    })
}

fn decode(text: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{text}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: StatusCode, value: Value) -> Response {
    (
        status,
        [("content-type", "application/json; charset=utf-8")],
        value.to_string(),
    )
        .into_response()
}

async fn handle(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: decode(uri.query().unwrap_or("")),
        form: if method == Method::POST {
            decode(&String::from_utf8_lossy(&body))
        } else {
            Vec::new()
        },
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
    };
    let fault = {
        let mut i = inner.lock().unwrap();
        i.seen.push(seen.clone());
        i.fault.clone()
    };
    match fault {
        Fault::None | Fault::ForeignNextLink => {}
        Fault::Slow(delay) => tokio::time::sleep(delay).await,
        Fault::Drip(delay) => {
            let body = futures_util::stream::unfold(false, move |sent| async move {
                if sent {
                    tokio::time::sleep(delay).await;
                    None
                } else {
                    Some((Ok::<_, std::io::Error>(Bytes::from_static(b"[")), true))
                }
            });
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                axum::body::Body::from_stream(body),
            )
                .into_response();
        }
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            let mut response = json_response(
                status,
                json!({"errors": [{"message": format!("fault {code}")}]}),
            );
            if code == 401 {
                response.headers_mut().insert(
                    "www-authenticate",
                    HeaderValue::from_static("Bearer realm=\"canvas-lms\""),
                );
            }
            return response;
        }
        Fault::Garbage => {
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                "<html><head><title>502 Bad Gateway</title></head>{\"completionstatus\":",
            )
                .into_response();
        }
        Fault::WrongShape => {
            return json_response(StatusCode::OK, json!({"data": [1, 2, 3], "ok": true}));
        }
        Fault::MoodleError(code) => {
            return json_response(
                StatusCode::OK,
                json!({"exception": "moodle_exception", "errorcode": code, "message": format!("Moodle says {code}")}),
            );
        }
        Fault::Throttle {
            status,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap();
            let body = if status == StatusCode::FORBIDDEN {
                "403 Forbidden (Rate Limit Exceeded)"
            } else {
                "Too Many Requests"
            };
            let mut response = (status, body).into_response();
            response
                .headers_mut()
                .insert("x-rate-limit-remaining", HeaderValue::from_static("0.0"));
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from(seconds));
            }
            return response;
        }
    }
    let path = seen.path.clone();
    if path == "/webservice/rest/server.php" {
        moodle(&inner, &seen)
    } else if let Some(rest) = path.strip_prefix("/api/v1/courses/") {
        let segments: Vec<String> = rest.split('/').map(percent_decode).collect();
        canvas(&inner, &seen, &segments)
    } else if path.starts_with("/xapi/statements") {
        lrs(&inner, &seen)
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            json!({"errors": [{"message": "no such route"}]}),
        )
    }
}

// === Moodle: webservice/rest/server.php ===

fn moodle_error(code: &str, message: &str) -> Response {
    json_response(
        StatusCode::OK,
        json!({"exception": "moodle_exception", "errorcode": code, "message": message}),
    )
}

fn moodle(inner: &Shared, seen: &Seen) -> Response {
    if seen.param("wstoken") != Some(MOODLE_TOKEN) {
        return moodle_error("invalidtoken", "Invalid token - token not found");
    }
    if seen.param("moodlewsrestformat") != Some("json") {
        // Moodle's default is XML.
        return (StatusCode::OK, "<?xml version=\"1.0\"?><RESPONSE/>").into_response();
    }
    let i = inner.lock().unwrap();
    match seen.param("wsfunction") {
        Some("core_user_get_users_by_field") => {
            if seen.param("field") != Some("username") {
                return moodle_error("invalidparameter", "Invalid parameter value detected");
            }
            let users: Vec<Value> = seen
                .form
                .iter()
                .chain(&seen.query)
                .filter(|(k, _)| k.starts_with("values["))
                .filter_map(|(_, name)| {
                    let id = i.moodle_users.get(name)?;
                    Some(json!({"id": id, "username": name, "fullname": name, "email": format!("{name}@example.org")}))
                })
                .collect();
            json_response(StatusCode::OK, Value::Array(users))
        }
        Some("core_completion_get_course_completion_status") => {
            let course: Option<u64> = seen.param("courseid").and_then(|c| c.parse().ok());
            let user: Option<u64> = seen.param("userid").and_then(|c| c.parse().ok());
            let (Some(course), Some(user)) = (course, user) else {
                return moodle_error("invalidparameter", "Invalid parameter value detected");
            };
            if !i.moodle_courses.contains(&course) {
                return moodle_error(
                    "invalidrecord",
                    "Can't find data record in database table course.",
                );
            }
            let completion = match i.moodle.get(&(course, user)) {
                None => {
                    return moodle_error("usernotenroled", "User is not enrolled in this course");
                }
                Some(c) => c,
            };
            let (completed, times) = match completion {
                MoodleCompletion::Completed(times) => (true, times.clone()),
                MoodleCompletion::Incomplete => (false, vec![Some(1_700_000_000), None]),
            };
            let completions: Vec<Value> = times
                .iter()
                .map(|t| {
                    json!({"type": 4, "title": "Activity completion", "status": if t.is_some() { "Yes" } else { "No" },
                           "complete": t.is_some(), "timecompleted": t,
                           "details": {"type": "Activity completion", "criteria": "Quiz", "requirement": "Passing grade", "status": ""}})
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({"completionstatus": {"completed": completed, "aggregation": 1, "completions": completions}, "warnings": []}),
            )
        }
        _ => moodle_error("accessexception", "Access control exception"),
    }
}

// === Canvas: /api/v1/courses/... ===

fn canvas_error(status: StatusCode, message: &str) -> Response {
    json_response(status, json!({"errors": [{"message": message}]}))
}

fn progress_json(user: &CanvasUser) -> Value {
    json!({
        "requirement_count": 3,
        "requirement_completed_count": if user.completed_at.is_some() { 3 } else { 1 },
        "next_requirement_url": if user.completed_at.is_some() { Value::Null } else { json!("https://canvas.example.org/courses/12/modules/items/7") },
        "completed_at": user.completed_at,
    })
}

fn canvas(inner: &Shared, seen: &Seen, segments: &[String]) -> Response {
    if seen.header("authorization") != Some(&format!("Bearer {CANVAS_TOKEN}")) {
        let mut r = canvas_error(StatusCode::UNAUTHORIZED, "Invalid access token.");
        r.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static("Bearer realm=\"canvas-lms\""),
        );
        return r;
    }
    let i = inner.lock().unwrap();
    let not_found = || {
        canvas_error(
            StatusCode::NOT_FOUND,
            "The specified resource does not exist.",
        )
    };
    let Some(users) = i.canvas.get(&segments[0]) else {
        return not_found();
    };
    let course = &segments[0];
    let mut response = match &segments[1..] {
        [] => json_response(
            StatusCode::OK,
            json!({"id": course, "name": format!("Course {course}"), "workflow_state": "available"}),
        ),
        [users_segment, who, progress] if users_segment == "users" && progress == "progress" => {
            let Some(login) = who.strip_prefix("sis_login_id:") else {
                return not_found();
            };
            match users.iter().find(|u| u.login == login) {
                Some(user) => json_response(StatusCode::OK, progress_json(user)),
                None => not_found(),
            }
        }
        [listing] if listing == "users" || listing == "bulk_user_progress" => {
            let items: Vec<Value> = users
                .iter()
                .map(|u| {
                    if listing == "users" {
                        let mut user = json!({"id": u.id, "name": u.login, "sortable_name": u.login, "short_name": u.login});
                        if u.login_visible {
                            user["login_id"] = json!(u.login);
                        }
                        user
                    } else {
                        json!({"id": u.id, "display_name": u.login, "avatar_image_url": "https://canvas.example.org/images/messages/avatar-50.png",
                               "html_url": format!("https://canvas.example.org/courses/{course}/users/{}", u.id), "pronouns": null,
                               "progress": progress_json(u)})
                    }
                })
                .collect();
            let page: usize = seen.param("page").and_then(|p| p.parse().ok()).unwrap_or(1);
            let per_page = seen
                .param("per_page")
                .and_then(|p| p.parse::<usize>().ok())
                .unwrap_or(10)
                .min(i.page_size);
            let start = (page - 1) * per_page;
            let slice: Vec<Value> = items.iter().skip(start).take(per_page).cloned().collect();
            let mut r = json_response(StatusCode::OK, Value::Array(slice));
            let host = if i.fault == Fault::ForeignNextLink {
                format!("http://127.0.0.2:{}", i.port)
            } else {
                format!("http://127.0.0.1:{}", i.port)
            };
            let link_to = |p: usize, rel: &str| {
                format!(
                    "<{host}/api/v1/courses/{course}/{listing}?page={p}&per_page={per_page}>; rel=\"{rel}\""
                )
            };
            let mut links = vec![link_to(page, "current"), link_to(1, "first")];
            if start + per_page < items.len() {
                links.insert(1, link_to(page + 1, "next"));
            }
            r.headers_mut()
                .insert("link", HeaderValue::from_str(&links.join(",")).unwrap());
            r
        }
        _ => not_found(),
    };
    response
        .headers_mut()
        .insert("x-rate-limit-remaining", HeaderValue::from_static("699.5"));
    response
}

// === LRS: /xapi/statements ===

fn lrs(inner: &Shared, seen: &Seen) -> Response {
    let expected = format!(
        "Basic {}",
        crate::common::base64_encode(format!("{LRS_USER}:{LRS_PASSWORD}").as_bytes())
    );
    if seen.header("authorization") != Some(expected.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"LRS\"")],
            "Unauthorized",
        )
            .into_response();
    }
    if seen
        .header("x-experience-api-version")
        .is_none_or(|v| !v.starts_with("1.0"))
    {
        return (
            StatusCode::BAD_REQUEST,
            "X-Experience-API-Version header missing or wrong",
        )
            .into_response();
    }
    let mut i = inner.lock().unwrap();
    let page_size = i.page_size;
    let matching: Vec<Value> = if let Some(token) = seen.path.strip_prefix("/xapi/statements/more/")
    {
        match i.more.remove(token) {
            Some(rest) => rest,
            None => return (StatusCode::NOT_FOUND, "no such more token").into_response(),
        }
    } else {
        let agent: Option<Value> = seen
            .param("agent")
            .and_then(|a| serde_json::from_str(a).ok());
        let Some(agent) = agent else {
            return (StatusCode::BAD_REQUEST, "agent is not a JSON agent").into_response();
        };
        let same_agent = |actor: &Value| {
            (agent.get("mbox").is_some() && actor.get("mbox") == agent.get("mbox"))
                || (agent.get("account").is_some() && actor.get("account") == agent.get("account"))
        };
        i.statements
            .iter()
            .filter(|s| same_agent(&s["actor"]))
            .filter(|s| seen.param("verb").is_none_or(|v| s["verb"]["id"] == v))
            .filter(|s| {
                seen.param("activity")
                    .is_none_or(|a| s["object"]["id"] == a)
            })
            .cloned()
            .collect()
    };
    let (page, rest) = matching.split_at(matching.len().min(page_size));
    let more = if rest.is_empty() {
        String::new()
    } else {
        i.next_more += 1;
        let token = format!("m{}", i.next_more);
        i.more.insert(token.clone(), rest.to_vec());
        if i.fault == Fault::ForeignNextLink {
            format!("http://127.0.0.2:{}/xapi/statements/more/{token}", i.port)
        } else {
            format!("/xapi/statements/more/{token}")
        }
    };
    let mut r = json_response(StatusCode::OK, json!({"statements": page, "more": more}));
    r.headers_mut().insert(
        "x-experience-api-version",
        HeaderValue::from_static("1.0.3"),
    );
    r
}
