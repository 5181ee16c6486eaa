//! Delivering one message: e-mail over SMTP (lettre), ticket updates over HTTP (reqwest) to
//! Easit GO's import API or a signed webhook. Every function here makes one attempt and returns
//! a one-line error for the outbox to keep; retrying is the worker's business.

use std::time::Duration;

use hmac::{Hmac, Mac};
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Message as MailMessage};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde_json::json;
use sha2::Sha256;

use super::events::Event;
use super::outbox::Message;
use super::render::Templates;
use crate::config::{ConfigError, Notify, Secret, Ticket, read_secret};

/// The header that carries the webhook signature: `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-Coursegate-Signature-256";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("[notify] smtp_url `{url}`: {message}")]
    Smtp { url: String, message: String },
    #[error("[ticket] url `{url}`: {message}")]
    Http { url: String, message: String },
    #[error(transparent)]
    Template(#[from] super::render::TemplateError),
}

/// Sends e-mail to orderers.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    pub templates: Templates,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Mailer {
    pub fn new(cfg: &Notify) -> Result<Mailer, SetupError> {
        let bad = |message: String| SetupError::Smtp {
            url: cfg.smtp_url.clone(),
            message,
        };
        let (scheme, rest) = cfg
            .smtp_url
            .split_once("://")
            .ok_or_else(|| bad("not a URL".to_string()))?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                Some(
                    p.parse::<u16>()
                        .map_err(|_| bad(format!("`{p}` is not a port")))?,
                ),
            ),
            _ => (authority.to_string(), None),
        };
        if host.is_empty() {
            return Err(bad("no host".to_string()));
        }
        let mut tls = TlsParameters::builder(host.clone());
        if let Some(ca) = &cfg.tls_ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| bad(format!("cannot read tls_ca_file {}: {e}", ca.display())))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| bad(format!("tls_ca_file {}: {e}", ca.display())))?;
            tls = tls.add_root_certificate(cert);
        }
        let tls = tls.build().map_err(|e| bad(format!("TLS setup: {e}")))?;
        let loopback = crate::config::is_loopback_url(&cfg.smtp_url.replacen(scheme, "ldap", 1));
        let mut builder = match scheme {
            "smtps" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.as_str())
                .port(port.unwrap_or(465))
                .tls(Tls::Wrapper(tls)),
            _ => {
                // STARTTLS where offered; required when a password would otherwise cross the
                // network in clear text.
                let policy = if cfg.smtp_user.is_some() && !loopback {
                    Tls::Required(tls)
                } else {
                    Tls::Opportunistic(tls)
                };
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.as_str())
                    .port(port.unwrap_or(25))
                    .tls(policy)
            }
        };
        if let (Some(user), Some(file)) = (&cfg.smtp_user, &cfg.smtp_password_file) {
            let password = read_secret(file, "notify.smtp_password_file")?;
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose().to_string(),
            ));
        }
        let transport = builder.timeout(Some(cfg.timeout)).build();
        let from = cfg
            .from
            .parse::<Mailbox>()
            .map_err(|e| bad(format!("from `{}`: {e}", cfg.from)))?;
        let templates = Templates::load(cfg.language, cfg.templates_dir.as_deref())?;
        Ok(Mailer {
            transport,
            from,
            templates,
        })
    }

    /// Sends one message to its recipient.
    pub async fn send(&self, message: &Message) -> Result<(), String> {
        let to = message
            .to
            .as_deref()
            .ok_or_else(|| "no recipient".to_string())?;
        let to: Mailbox = to
            .parse()
            .map_err(|e| format!("recipient `{to}` is not an e-mail address: {e}"))?;
        let (subject, body) = self.templates.render(&message.event);
        let email = MailMessage::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{}@coursegate>", message.id)))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| format!("cannot build the message: {e}"))?;
        self.transport
            .send(email)
            .await
            .map(|_| ())
            .map_err(|e| format!("SMTP: {}", one_line(&e.to_string())))
    }
}

/// Posts ticket updates.
pub struct TicketClient {
    http: reqwest::Client,
    target: Target,
    /// Status texts are the rendered subject lines, in the notification language.
    templates: Templates,
}

enum Target {
    Easit {
        endpoint: String,
        api_key: Secret,
        import_handler: String,
    },
    Webhook {
        url: String,
        secret: Option<Secret>,
    },
}

impl std::fmt::Debug for TicketClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketClient").finish_non_exhaustive()
    }
}

impl TicketClient {
    pub fn new(cfg: &Ticket, templates: Templates) -> Result<TicketClient, SetupError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout())
            .connect_timeout(cfg.timeout().min(Duration::from_secs(10)))
            .user_agent(concat!("coursegate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SetupError::Http {
                url: cfg.url().to_string(),
                message: e.to_string(),
            })?;
        let target = match cfg {
            Ticket::Easit {
                url,
                api_key_file,
                import_handler,
                ..
            } => Target::Easit {
                endpoint: format!("{url}/integration-api/items"),
                api_key: read_secret(api_key_file, "ticket.api_key_file")?,
                import_handler: import_handler.clone(),
            },
            Ticket::Webhook {
                url, secret_file, ..
            } => Target::Webhook {
                url: url.clone(),
                secret: secret_file
                    .as_deref()
                    .map(|f| read_secret(f, "ticket.secret_file"))
                    .transpose()?,
            },
        };
        Ok(TicketClient {
            http,
            target,
            templates,
        })
    }

    /// Posts one update.
    pub async fn send(&self, message: &Message) -> Result<(), String> {
        let event = &message.event;
        let status = self.templates.render(event).0;
        let request = match &self.target {
            Target::Easit {
                endpoint,
                api_key,
                import_handler,
            } => self
                .http
                .post(endpoint)
                .basic_auth(api_key.expose(), Some(""))
                .json(&easit_body(import_handler, event, &status)),
            Target::Webhook { url, secret } => {
                let body = serde_json::to_vec(&webhook_body(message, &status))
                    .map_err(|e| e.to_string())?;
                let mut request = self
                    .http
                    .post(url)
                    .header("Content-Type", "application/json")
                    .header("X-Coursegate-Event", event.kind.as_str())
                    .header("X-Coursegate-Delivery", &message.id);
                if let Some(secret) = secret {
                    request = request.header(SIGNATURE_HEADER, sign(secret.expose(), &body));
                }
                request.body(body)
            }
        };
        let response = request
            .send()
            .await
            .map_err(|e| format!("HTTP: {}", one_line(&error_chain(&e))))?;
        let code = response.status();
        if code.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let snippet: String = one_line(&text).chars().take(200).collect();
        Err(format!("HTTP {code}: {snippet}"))
    }
}

/// The Easit GO import request: one item whose properties carry the ticket id and the status.
pub fn easit_body(import_handler: &str, event: &Event, status: &str) -> serde_json::Value {
    let mut properties = vec![
        json!({"name": "ticket", "content": event.ticket.clone().unwrap_or_default()}),
        json!({"name": "status", "content": status}),
        json!({"name": "event", "content": event.kind.as_str()}),
    ];
    if let Some(order) = &event.order {
        properties.push(json!({"name": "order", "content": order}));
    }
    if let Some(user) = &event.user {
        properties.push(json!({"name": "user", "content": user}));
    }
    if !event.access.is_empty() {
        let names: Vec<&str> = event.access.iter().map(|a| a.name.as_str()).collect();
        properties.push(json!({"name": "access", "content": names.join(",")}));
    }
    json!({
        "importHandlerIdentifier": import_handler,
        "itemToImport": [{"property": properties}],
    })
}

/// The webhook body: the event as stored, plus the delivery id and the status text.
pub fn webhook_body(message: &Message, status: &str) -> serde_json::Value {
    let mut body = serde_json::to_value(&message.event).unwrap_or_default();
    if let Some(map) = body.as_object_mut() {
        map.insert("event".into(), json!(message.event.kind.as_str()));
        map.insert("delivery".into(), json!(message.id));
        map.insert("status".into(), json!(status));
    }
    body
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2.
        let key = "Jefe";
        let body = b"what do ya want for nothing?";
        assert_eq!(
            sign(key, body),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
