//! What the HTTP learning platforms share: the client (timeouts, the system's trust store plus
//! `tls_ca_file`, no redirects), one pass of requests ([`Pass`]: a concurrency limit, a circuit
//! that stops new requests once the platform as a whole has failed, throttling), bounded reads of
//! answers, same-origin pagination, and the classification of everything that can go wrong into
//! a [`Failure`] with a stable [`Cause`].
//!
//! Every failure means *unknown* for the lookup it hit — never *not passed*. Which failures speak
//! for the whole platform (unreachable, timeouts, 5xx, credentials refused, throttling) is decided
//! here, in [`Cause::is_platform_wide`]: after one of them no new request is started in the pass,
//! so a platform that is down or slow costs about one request timeout, not one per user.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::header::{HeaderMap, LINK, LOCATION, RETRY_AFTER};
use reqwest::{RequestBuilder, StatusCode, Url};
use serde_json::Value;

use crate::config::{HttpLms, HttpSecret};

/// The largest answer read; a bigger one is refused (a garbage response must not fill memory).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// The most pages one paginated answer may have (Canvas listings, xAPI `more`).
pub const MAX_PAGES: usize = 1000;
/// How long to leave the platform alone after it throttled without saying for how long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this is capped: a confused server must not silence coursegate for
/// days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Below this much `X-Rate-Limit-Remaining` (Canvas's bucket holds 700, and every request in
/// parallel costs 50 up front) no new request is started, and the platform is left alone for
/// [`LOW_BUDGET_PAUSE`], before Canvas answers "403 Rate Limit Exceeded".
const RATE_LIMIT_FLOOR: f64 = 100.0;
const LOW_BUDGET_PAUSE: Duration = Duration::from_secs(10);
/// The header carrying the xAPI version (xAPI 1.0.3, part three, §6.2).
pub const XAPI_VERSION_HEADER: &str = "X-Experience-API-Version";

/// Why a lookup is unknown, as a stable metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// Connection refused, DNS failure, TLS handshake (certificate) failure.
    Connect,
    /// No complete answer within `timeout`.
    Timeout,
    /// HTTP 5xx.
    ServerError,
    /// HTTP 401, Moodle `invalidtoken`: the token or password was refused.
    Unauthorized,
    /// HTTP 403 (not throttling), Moodle access exceptions: the credentials lack a permission.
    Forbidden,
    /// HTTP 429, Canvas "403 Rate Limit Exceeded", or coursegate waiting out a `Retry-After`.
    Throttled,
    /// HTTP 404 where the platform should know the thing (a configured course).
    NotFound,
    /// Any other unexpected status (400, a redirect).
    HttpStatus,
    /// Not JSON, broken off, or too large.
    Malformed,
    /// JSON, but not the documented shape.
    Shape,
    /// The platform answered with its own error (a Moodle error body).
    PlatformError,
    /// xAPI: the user has no `mail` in the directory to build the agent from.
    NoAgent,
    /// The token or password file could not be read.
    Secret,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Connect => "connect",
            Cause::Timeout => "timeout",
            Cause::ServerError => "server_error",
            Cause::Unauthorized => "unauthorized",
            Cause::Forbidden => "forbidden",
            Cause::Throttled => "throttled",
            Cause::NotFound => "not_found",
            Cause::HttpStatus => "http_status",
            Cause::Malformed => "malformed",
            Cause::Shape => "unexpected_shape",
            Cause::PlatformError => "platform_error",
            Cause::NoAgent => "no_agent",
            Cause::Secret => "secret",
        }
    }

    /// Whether the failure would hit every other request too, so none should be sent in this
    /// pass. Answers that concern one user or course (a 404, an odd body) are not.
    pub fn is_platform_wide(self) -> bool {
        matches!(
            self,
            Cause::Connect
                | Cause::Timeout
                | Cause::ServerError
                | Cause::Unauthorized
                | Cause::Forbidden
                | Cause::Throttled
                | Cause::Secret
        )
    }
}

/// Why one lookup is unknown. `detail` never names the user (failures are reported once per
/// cause, for many users at a time) and never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Failure {
    pub cause: Cause,
    pub detail: String,
}

impl Failure {
    pub fn new(cause: Cause, detail: impl Into<String>) -> Failure {
        Failure {
            cause,
            detail: detail.into(),
        }
    }

    /// "JSON, but not what the platform documents", naming what was expected.
    pub fn shape(detail: impl Into<String>) -> Failure {
        Failure::new(Cause::Shape, detail)
    }
}

/// The client for one platform. Redirects are not followed: a redirected API call (http →
/// https, a moved site) is a configuration error worth naming, and following it could carry the
/// token elsewhere.
pub fn client(settings: &HttpLms) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(settings.concurrency)
        .user_agent(concat!("coursegate/", env!("CARGO_PKG_VERSION")));
    if let Some(file) = &settings.tls_ca_file {
        let pem = std::fs::read(file)
            .map_err(|e| format!("cannot read lms.tls_ca_file {}: {e}", file.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            format!(
                "lms.tls_ca_file {} holds no readable PEM certificate: {e}",
                file.display()
            )
        })?;
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {e}"))
}

/// The base URL with a trailing `/`, so that relative paths join below it rather than beside it.
pub fn base_url(url: &str) -> Result<Url, String> {
    Url::parse(&format!("{}/", url.trim_end_matches('/')))
        .map_err(|e| format!("`{url}` is not a URL: {e}"))
}

/// `base` with `segments` appended, each percent-encoded as one path segment (a login with a
/// `/` or `?` stays inside its segment).
pub fn endpoint(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

/// The same failure as the answer to every query.
pub fn fail_every(
    queries: Vec<super::Query>,
    failure: &Failure,
) -> Vec<(super::Query, Result<super::platform::Answer, Failure>)> {
    queries
        .into_iter()
        .map(|q| (q, Err(failure.clone())))
        .collect()
}

// === impl Pass ===

/// One pass of requests to a platform: counts them, runs lookups at most `concurrency` at a
/// time, and holds the circuit that stops new requests after a platform-wide failure.
pub struct Pass<'a> {
    client: &'a reqwest::Client,
    base: &'a Url,
    secret: &'a HttpSecret,
    timeout: Duration,
    concurrency: usize,
    requests: AtomicU64,
    /// The first platform-wide failure: every later request fails with it, unsent.
    tripped: Mutex<Option<Failure>>,
    /// The platform asked to be left alone until then.
    pause_until: Mutex<Option<Instant>>,
}

impl<'a> Pass<'a> {
    pub fn new(
        client: &'a reqwest::Client,
        base: &'a Url,
        secret: &'a HttpSecret,
        settings: &HttpLms,
    ) -> Pass<'a> {
        Pass {
            client,
            base,
            secret,
            timeout: settings.timeout,
            concurrency: settings.concurrency,
            requests: AtomicU64::new(0),
            tripped: Mutex::new(None),
            pause_until: Mutex::new(None),
        }
    }

    pub fn client(&self) -> &reqwest::Client {
        self.client
    }

    pub fn base(&self) -> &Url {
        self.base
    }

    pub fn secret(&self) -> &HttpSecret {
        self.secret
    }

    /// The bearer token, or the failure that every query of a `platform` that needs one gets.
    pub fn token(&self, platform: &str) -> Result<&str, Failure> {
        match self.secret {
            HttpSecret::Token(token) => Ok(token.expose()),
            _ => Err(Failure::new(
                Cause::Secret,
                format!("{platform} needs lms.token_file"),
            )),
        }
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The platform-wide failure that stopped this pass, if any.
    pub fn tripped(&self) -> Option<Failure> {
        self.tripped.lock().ok().and_then(|t| t.clone())
    }

    /// Stops new requests if `failure` speaks for the whole platform. The first one is kept.
    pub fn trip(&self, failure: &Failure) {
        if !failure.cause.is_platform_wide() {
            return;
        }
        if let Ok(mut tripped) = self.tripped.lock()
            && tripped.is_none()
        {
            *tripped = Some(failure.clone());
        }
    }

    /// Until when the platform asked to be left alone (throttling), if it did.
    pub fn pause_until(&self) -> Option<Instant> {
        self.pause_until.lock().ok().and_then(|p| *p)
    }

    fn pause(&self, until: Instant) {
        if let Ok(mut pause) = self.pause_until.lock() {
            *pause = Some(pause.map_or(until, |p| p.max(until)));
        }
    }

    /// Sends one request and reads the whole answer, whatever its status. Fails, unsent, once the
    /// circuit is open; a transport failure (refused, timeout, TLS) opens it.
    pub async fn send(&self, request: RequestBuilder) -> Result<Reply, Failure> {
        if let Some(failure) = self.tripped() {
            return Err(failure);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let reply = match self.exchange(request).await {
            Ok(reply) => reply,
            Err(failure) => {
                self.trip(&failure);
                return Err(failure);
            }
        };
        if reply.is_throttled() {
            let wait = retry_after(&reply.headers).unwrap_or(DEFAULT_RETRY_AFTER);
            self.pause(Instant::now() + wait.min(MAX_RETRY_AFTER));
        } else if let Some(remaining) = rate_limit_remaining(&reply.headers)
            && remaining < RATE_LIMIT_FLOOR
        {
            // This answer is good; the next request might not be.
            self.pause(Instant::now() + LOW_BUDGET_PAUSE);
            self.trip(&Failure::new(
                Cause::Throttled,
                format!(
                    "the rate-limit budget is nearly used up (X-Rate-Limit-Remaining: {remaining}); not asking more in this pass"
                ),
            ));
        }
        Ok(reply)
    }

    async fn exchange(&self, request: RequestBuilder) -> Result<Reply, Failure> {
        let mut response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.transport(e))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(Failure::new(
                    Cause::Malformed,
                    format!("the answer is larger than {} MiB", MAX_BODY / (1024 * 1024)),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    fn transport(&self, error: reqwest::Error) -> Failure {
        if error.is_timeout() {
            return Failure::new(
                Cause::Timeout,
                format!(
                    "no complete answer within {} (lms.timeout)",
                    humantime::format_duration(self.timeout)
                ),
            );
        }
        let why = error_chain(&error);
        if error.is_connect() {
            Failure::new(Cause::Connect, format!("cannot connect: {why}"))
        } else if error.is_body() || error.is_decode() {
            Failure::new(Cause::Malformed, format!("the answer broke off: {why}"))
        } else {
            Failure::new(Cause::Connect, format!("the request failed: {why}"))
        }
    }

    /// Resolves a next-page link against the platform's URL. A link to another origin is refused:
    /// the credentials go only where `url` points.
    pub fn follow(&self, link: &str) -> Result<Url, Failure> {
        let next = self
            .base
            .join(link)
            .map_err(|e| Failure::shape(format!("next-page link `{link}` is not a URL: {e}")))?;
        if next.origin() != self.base.origin() {
            return Err(Failure::shape(format!(
                "next-page link points to another server ({}); not following it with the credentials",
                next.origin().ascii_serialization()
            )));
        }
        Ok(next)
    }

    /// Runs `lookup` for every item, at most `concurrency` at a time, and opens the circuit on
    /// the first platform-wide failure. Returns each item with its result, in no fixed order.
    pub async fn each<T, A, F, Fut>(&self, items: Vec<T>, lookup: F) -> Vec<(T, Result<A, Failure>)>
    where
        T: Clone,
        F: Fn(T) -> Fut,
        Fut: Future<Output = Result<A, Failure>>,
    {
        futures_util::stream::iter(items)
            .map(|item| {
                let running = lookup(item.clone());
                async move {
                    let result = running.await;
                    if let Err(failure) = &result {
                        self.trip(failure);
                    }
                    (item, result)
                }
            })
            .buffer_unordered(self.concurrency.max(1))
            .collect()
            .await
    }
}

/// The messages of an error's sources, without reqwest's outer "error sending request for url
/// (…)" (the URL can hold a user's login).
fn error_chain(error: &reqwest::Error) -> String {
    let mut messages: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        let text = e.to_string();
        if !messages.iter().any(|m| m.contains(&text)) {
            messages.push(text);
        }
        source = e.source();
    }
    if messages.is_empty() {
        error.to_string()
    } else {
        messages.join(": ")
    }
}

// === impl Reply ===

/// A whole answer: status, headers and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// Canvas throttles with 403 and "Rate Limit Exceeded" in the body; everyone else with 429.
    pub fn is_throttled(&self) -> bool {
        self.status == StatusCode::TOO_MANY_REQUESTS
            || (self.status == StatusCode::FORBIDDEN
                && String::from_utf8_lossy(&self.body).contains("Rate Limit Exceeded"))
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value, Failure> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Failure::new(
                Cause::Malformed,
                format!(
                    "the answer is not JSON ({e}); it starts with {}",
                    self.preview()
                ),
            )
        })
    }

    /// The start of the body, quoted, for messages.
    pub fn preview(&self) -> String {
        let text: String = String::from_utf8_lossy(&self.body)
            .chars()
            .take(60)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        format!("{text:?}")
    }

    /// What a non-success status means; `None` for 2xx. `platform` names the platform in
    /// messages (e.g. "Canvas"), `credential` the config key of its secret.
    pub fn status_failure(&self, platform: &str, credential: &str) -> Option<Failure> {
        let status = self.status;
        if status.is_success() {
            return None;
        }
        let (cause, detail) = if self.is_throttled() {
            let wait = retry_after(&self.headers).map_or_else(
                || "no Retry-After".to_string(),
                |d| format!("Retry-After {}", humantime::format_duration(d)),
            );
            (
                Cause::Throttled,
                format!("{platform} is throttling coursegate (HTTP {status}, {wait})"),
            )
        } else if status == StatusCode::UNAUTHORIZED {
            (
                Cause::Unauthorized,
                format!("{platform} refused the credentials (HTTP {status}); check {credential}"),
            )
        } else if status == StatusCode::FORBIDDEN {
            (
                Cause::Forbidden,
                format!(
                    "{platform} denied access (HTTP {status}); the account behind {credential} lacks a permission"
                ),
            )
        } else if status == StatusCode::NOT_FOUND {
            (
                Cause::NotFound,
                format!("{platform} answered HTTP {status}; is lms.url right?"),
            )
        } else if status.is_server_error() {
            (
                Cause::ServerError,
                format!("{platform} failed (HTTP {status})"),
            )
        } else if status.is_redirection() {
            let to = self
                .headers
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or("?");
            (
                Cause::HttpStatus,
                format!(
                    "{platform} redirects (HTTP {status}) to {to}; set lms.url to the final address"
                ),
            )
        } else {
            (
                Cause::HttpStatus,
                format!("{platform} answered HTTP {status}: {}", self.preview()),
            )
        };
        Some(Failure::new(cause, detail))
    }
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(text).ok()?;
    (at.to_utc() - chrono::Utc::now()).to_std().ok()
}

/// Canvas's `X-Rate-Limit-Remaining` (a decimal number).
fn rate_limit_remaining(headers: &HeaderMap) -> Option<f64> {
    headers
        .get("x-rate-limit-remaining")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The `rel="next"` target of a `Link` header (RFC 8288), as Canvas paginates.
pub fn next_link(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(LINK) {
        let Ok(mut rest) = value.to_str() else {
            continue;
        };
        // Each link is `<target>` followed by `; param` pairs up to the next `<`.
        while let Some(open) = rest.find('<') {
            let Some(length) = rest[open + 1..].find('>') else {
                break;
            };
            let target = &rest[open + 1..open + 1 + length];
            let after = &rest[open + 2 + length..];
            let end = after.find('<').unwrap_or(after.len());
            if after[..end].split(';').any(is_rel_next) {
                return Some(target.to_string());
            }
            rest = &after[end..];
        }
    }
    None
}

fn is_rel_next(param: &str) -> bool {
    let param = param.trim().trim_end_matches(',').trim();
    let Some((name, value)) = param.split_once('=') else {
        return false;
    };
    name.trim().eq_ignore_ascii_case("rel")
        && value
            .trim()
            .trim_matches('"')
            .split_whitespace()
            .any(|rel| rel.eq_ignore_ascii_case("next"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn reply(status: u16, body: &str, pairs: &[(&'static str, &str)]) -> Reply {
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            headers: headers(pairs),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn finds_the_next_link_among_several() {
        let canvas = headers(&[(
            "link",
            "<https://c.org/api/v1/courses/1/bulk_user_progress?page=1&per_page=2>; rel=\"current\",\
             <https://c.org/api/v1/courses/1/bulk_user_progress?page=2&per_page=2>; rel=\"next\",\
             <https://c.org/api/v1/courses/1/bulk_user_progress?page=1&per_page=2>; rel=\"first\"",
        )]);
        assert_eq!(
            next_link(&canvas).as_deref(),
            Some("https://c.org/api/v1/courses/1/bulk_user_progress?page=2&per_page=2")
        );
        let last_page = headers(&[(
            "link",
            "<https://c.org/x?page=1>; rel=\"first\", <https://c.org/x?page=3>; rel=\"last\"",
        )]);
        assert_eq!(next_link(&last_page), None);
        assert_eq!(next_link(&HeaderMap::new()), None);
        // Two Link headers, unquoted and multi-valued rel.
        let split = headers(&[
            ("link", "<https://c.org/x?page=1>; rel=prev"),
            ("link", "<https://c.org/x?page=3>; rel=\"next last\""),
        ]);
        assert_eq!(next_link(&split).as_deref(), Some("https://c.org/x?page=3"));
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "120")])),
            Some(Duration::from_secs(120))
        );
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(90)).to_rfc2822();
        let wait = retry_after(&headers(&[("retry-after", &soon)])).unwrap();
        assert!(
            wait > Duration::from_secs(80) && wait <= Duration::from_secs(90),
            "{wait:?}"
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn statuses_map_to_causes() {
        let cause = |r: Reply| {
            r.status_failure("Canvas", "lms.token_file")
                .map(|f| f.cause)
        };
        assert_eq!(cause(reply(200, "[]", &[])), None);
        assert_eq!(cause(reply(401, "{}", &[])), Some(Cause::Unauthorized));
        assert_eq!(cause(reply(403, "{}", &[])), Some(Cause::Forbidden));
        assert_eq!(
            cause(reply(403, "403 Forbidden (Rate Limit Exceeded)", &[])),
            Some(Cause::Throttled)
        );
        assert_eq!(
            cause(reply(429, "", &[("retry-after", "30")])),
            Some(Cause::Throttled)
        );
        assert_eq!(cause(reply(404, "{}", &[])), Some(Cause::NotFound));
        assert_eq!(cause(reply(502, "<html>", &[])), Some(Cause::ServerError));
        assert_eq!(cause(reply(400, "bad", &[])), Some(Cause::HttpStatus));
        let moved = reply(301, "", &[("location", "https://new.example.org/")])
            .status_failure("Moodle", "lms.token_file")
            .unwrap();
        assert!(moved.detail.contains("https://new.example.org/"), "{moved}");
        let throttled = reply(429, "", &[("retry-after", "30")])
            .status_failure("Canvas", "lms.token_file")
            .unwrap();
        assert!(throttled.detail.contains("Retry-After 30s"), "{throttled}");
    }

    #[test]
    fn garbage_is_malformed_and_previewed_without_control_characters() {
        let failure = reply(200, "<html>\u{1}\n<title>502 Bad Gateway</title>", &[])
            .json()
            .unwrap_err();
        assert_eq!(failure.cause, Cause::Malformed);
        assert!(failure.detail.contains("<html>  <title>502"), "{failure}");
    }

    #[test]
    fn platform_wide_causes_stop_the_pass_and_others_do_not() {
        for cause in [
            Cause::Connect,
            Cause::Timeout,
            Cause::Unauthorized,
            Cause::Throttled,
        ] {
            assert!(cause.is_platform_wide(), "{cause:?}");
        }
        for cause in [
            Cause::NotFound,
            Cause::Malformed,
            Cause::Shape,
            Cause::NoAgent,
        ] {
            assert!(!cause.is_platform_wide(), "{cause:?}");
        }
    }

    #[test]
    fn endpoints_encode_each_segment() {
        let base = base_url("https://canvas.example.org/lms").unwrap();
        let url = endpoint(
            &base,
            &[
                "api",
                "v1",
                "courses",
                "12",
                "users",
                "sis_login_id:a/b?c d",
                "progress",
            ],
        );
        assert_eq!(
            url.as_str(),
            "https://canvas.example.org/lms/api/v1/courses/12/users/sis_login_id:a%2Fb%3Fc%20d/progress"
        );
        assert_eq!(
            base_url("https://lrs.example.org/xapi/")
                .unwrap()
                .join("statements")
                .unwrap()
                .as_str(),
            "https://lrs.example.org/xapi/statements"
        );
    }
}
