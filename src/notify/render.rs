//! Message texts from template files.
//!
//! The shipped templates live in `templates/<language>/<event>.txt` (Swedish and English) and are
//! built into the binary; `[notify] templates_dir` points at a directory with the same layout
//! whose files replace them one by one. A template's first line is `Subject: …`, then an empty
//! line, then the plain-text body. `{name}` placeholders are filled in; an unknown placeholder is
//! a config error when the templates are loaded, not a surprise in a sent mail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::events::{Event, EventKind, RevokeCause};
use crate::config::Language;

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "order",
    "user",
    "ordered_by",
    "ticket",
    "ticket_line",
    "access",
    "courses",
    "at",
    "valid_until",
    "valid_until_line",
    "file",
    "reason",
];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot read template {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    subject: String,
    body: String,
}

/// The templates of one language, one per event kind.
#[derive(Debug, Clone)]
pub struct Templates {
    language: Language,
    by_kind: HashMap<EventKind, Template>,
}

fn shipped(language: Language, kind: EventKind) -> &'static str {
    macro_rules! pick {
        ($lang:literal) => {
            match kind {
                EventKind::CourseNeeded => {
                    include_str!(concat!("../../templates/", $lang, "/course-needed.txt"))
                }
                EventKind::Granted => {
                    include_str!(concat!("../../templates/", $lang, "/granted.txt"))
                }
                EventKind::Invalid => {
                    include_str!(concat!("../../templates/", $lang, "/invalid.txt"))
                }
                EventKind::Expiring => {
                    include_str!(concat!("../../templates/", $lang, "/expiring.txt"))
                }
                EventKind::Revoked => {
                    include_str!(concat!("../../templates/", $lang, "/revoked.txt"))
                }
                EventKind::Unauthorized => {
                    include_str!(concat!("../../templates/", $lang, "/unauthorized.txt"))
                }
            }
        };
    }
    match language {
        Language::Sv => pick!("sv"),
        Language::En => pick!("en"),
    }
}

fn parse(path: &Path, text: &str) -> Result<Template, TemplateError> {
    let invalid = |message: String| TemplateError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let text = text.replace("\r\n", "\n");
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let Some(subject) = first.strip_prefix("Subject:") else {
        return Err(invalid("the first line must be `Subject: …`".to_string()));
    };
    let body = rest.strip_prefix('\n').unwrap_or(rest);
    for part in [subject, body] {
        let mut rest = part;
        while let Some(start) = rest.find('{') {
            let after = &rest[start + 1..];
            let Some(end) = after.find('}') else { break };
            let name = &after[..end];
            if !PLACEHOLDERS.contains(&name) {
                return Err(invalid(format!(
                    "unknown placeholder {{{name}}}; known: {}",
                    PLACEHOLDERS.join(", ")
                )));
            }
            rest = &after[end + 1..];
        }
    }
    Ok(Template {
        subject: subject.trim().to_string(),
        body: body.to_string(),
    })
}

impl Templates {
    /// The templates for `language`: the shipped ones, replaced by files in `dir/<language>/`.
    pub fn load(language: Language, dir: Option<&Path>) -> Result<Templates, TemplateError> {
        let mut by_kind = HashMap::new();
        for kind in EventKind::ALL {
            let name = format!("{}.txt", kind.as_str());
            let custom = dir.map(|d| d.join(language.code()).join(&name));
            let template = match custom.filter(|p| p.exists()) {
                Some(path) => {
                    let text =
                        std::fs::read_to_string(&path).map_err(|source| TemplateError::Read {
                            path: path.clone(),
                            source,
                        })?;
                    parse(&path, &text)?
                }
                None => parse(
                    &Path::new("templates").join(language.code()).join(&name),
                    shipped(language, kind),
                )?,
            };
            by_kind.insert(kind, template);
        }
        Ok(Templates { language, by_kind })
    }

    /// (subject, body) for an event.
    pub fn render(&self, event: &Event) -> (String, String) {
        let template = &self.by_kind[&event.kind];
        let values = self.values(event);
        (
            fill(&template.subject, &values).replace(['\r', '\n'], " "),
            fill(&template.body, &values),
        )
    }

    fn values(&self, e: &Event) -> HashMap<&'static str, String> {
        let sv = self.language == Language::Sv;
        let date = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d").to_string();
        let mut v = HashMap::new();
        v.insert("order", e.order.clone().unwrap_or_else(|| "?".to_string()));
        v.insert("user", e.user.clone().unwrap_or_else(|| "?".to_string()));
        v.insert("ordered_by", e.ordered_by.clone().unwrap_or_default());
        v.insert("ticket", e.ticket.clone().unwrap_or_default());
        v.insert(
            "ticket_line",
            match &e.ticket {
                Some(t) if sv => format!("Ärende: {t}\n"),
                Some(t) => format!("Ticket: {t}\n"),
                None => String::new(),
            },
        );
        let titles: Vec<&str> = e.access.iter().map(|a| a.title.as_str()).collect();
        v.insert("access", titles.join(if sv { " och " } else { " and " }));
        let courses: Vec<String> = e
            .courses
            .iter()
            .map(|c| match &c.url {
                Some(url) => format!("  • {}\n    {url}", c.title),
                None => format!("  • {}", c.title),
            })
            .collect();
        v.insert("courses", courses.join("\n"));
        v.insert("at", e.at.format("%Y-%m-%d %H:%M UTC").to_string());
        v.insert("valid_until", e.valid_until.map(date).unwrap_or_default());
        v.insert(
            "valid_until_line",
            match e.valid_until {
                Some(t) if sv => format!("Gäller till och med: {}\n", date(t)),
                Some(t) => format!("Valid until: {}\n", date(t)),
                None => String::new(),
            },
        );
        v.insert("file", e.file.clone().unwrap_or_default());
        let reason = match (e.cause, sv) {
            (Some(RevokeCause::Withdrawn), true) => "beställningen har återkallats".to_string(),
            (Some(RevokeCause::Withdrawn), false) => "the order was withdrawn".to_string(),
            (Some(RevokeCause::Expired), true) => "beställningen har gått ut".to_string(),
            (Some(RevokeCause::Expired), false) => "the order has expired".to_string(),
            (Some(RevokeCause::NoLongerOrdered), true) => {
                "beställningen omfattar inte längre behörigheten".to_string()
            }
            (Some(RevokeCause::NoLongerOrdered), false) => {
                "the order no longer names this access".to_string()
            }
            (Some(RevokeCause::AccountGone), true) => {
                "kontot finns inte längre (eller är spärrat) i katalogen".to_string()
            }
            (Some(RevokeCause::AccountGone), false) => {
                "the account no longer exists (or is disabled) in the directory".to_string()
            }
            (Some(RevokeCause::Other), true) => {
                "kraven för behörigheten uppfylls inte längre".to_string()
            }
            (Some(RevokeCause::Other), false) => {
                "the requirements for the access are no longer met".to_string()
            }
            (None, _) => e.reason.clone().unwrap_or_default(),
        };
        v.insert("reason", reason);
        v
    }
}

fn fill(template: &str, values: &HashMap<&'static str, String>) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}').map(|end| (&after[..end], end)) {
            Some((name, end)) if values.contains_key(name) => {
                out.push_str(&values[name]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::events::{AccessRef, CourseRef};

    fn event(kind: EventKind) -> Event {
        Event {
            kind,
            key: "k".into(),
            order: Some("BEST-2026-0042".into()),
            file: Some("BEST-2026-0042.toml".into()),
            user: Some("anna.andersson".into()),
            ordered_by: Some("karin.chef".into()),
            ticket: Some("EASIT-123456".into()),
            access: vec![AccessRef {
                name: "wim".into(),
                title: "Wim (RIS)".into(),
            }],
            courses: vec![CourseRef {
                title: "Wim – grundkurs för läkare".into(),
                url: Some("https://pingpong.example.org/courseId/12345".into()),
            }],
            at: chrono::Utc::now(),
            valid_until: None,
            reason: None,
            cause: None,
        }
    }

    #[test]
    fn every_shipped_template_parses_and_fills_every_placeholder() {
        for language in [Language::Sv, Language::En] {
            let t = Templates::load(language, None).unwrap();
            for kind in EventKind::ALL {
                let (subject, body) = t.render(&event(kind));
                assert!(!subject.is_empty() && !body.is_empty());
                for p in PLACEHOLDERS {
                    let ph = format!("{{{p}}}");
                    assert!(
                        !subject.contains(&ph) && !body.contains(&ph),
                        "{kind:?}: {body}"
                    );
                }
            }
        }
    }

    #[test]
    fn course_needed_names_course_title_and_link() {
        let t = Templates::load(Language::Sv, None).unwrap();
        let (subject, body) = t.render(&event(EventKind::CourseNeeded));
        assert!(
            subject.contains("anna.andersson") && subject.contains("Wim (RIS)"),
            "{subject}"
        );
        assert!(body.contains("Wim – grundkurs för läkare"), "{body}");
        assert!(
            body.contains("https://pingpong.example.org/courseId/12345"),
            "{body}"
        );
        assert!(body.contains("automatiskt"), "{body}");
    }

    #[test]
    fn a_custom_template_replaces_the_shipped_one_and_typos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("en")).unwrap();
        std::fs::write(
            dir.path().join("en/granted.txt"),
            "Subject: Done: {access}\n\n{user} may now use {access}.\n",
        )
        .unwrap();
        let t = Templates::load(Language::En, Some(dir.path())).unwrap();
        let (subject, body) = t.render(&event(EventKind::Granted));
        assert_eq!(subject, "Done: Wim (RIS)");
        assert_eq!(body, "anna.andersson may now use Wim (RIS).\n");
        std::fs::write(dir.path().join("en/revoked.txt"), "Subject: x\n\n{usr}\n").unwrap();
        let err = Templates::load(Language::En, Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("revoked.txt") && err.contains("{usr}"),
            "{err}"
        );
    }
}
