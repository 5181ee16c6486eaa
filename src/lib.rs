//! coursegate: grants and revokes directory group membership for the imaging systems (Wim, PACS,
//! KardioPACS) only when the person has passed the required e-course.
//!
//! The crate is a pure decision core ([`plan`]) with thin edges: configuration ([`config`]),
//! access orders ([`order`]), course results ([`lms`]), the directory ([`directory`]), the
//! durable state ([`state`]), the audit log ([`audit`]) and the reconcile pass that ties them
//! together ([`reconcile`]). `main.rs` only parses arguments and maps errors to exit codes.

#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod daemon;
pub mod directory;
pub mod lms;
pub mod metrics;
pub mod notify;
pub mod order;
pub mod orderers;
pub mod plan;
pub mod queue;
pub mod reconcile;
pub mod report;
pub mod state;

/// Every failure the library reports, one variant per concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Directory(#[from] directory::DirectoryError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Orders(#[from] order::ScanError),
    #[error("crash recovery failed: {0}")]
    Recovery(String),
    #[error("{0}")]
    Daemon(String),
    /// Something that cannot happen did (a bug); what was done is in the audit log.
    #[error("internal error (a bug): {0}")]
    Internal(String),
}

impl Error {
    /// A short, stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Directory(_) => "directory",
            Error::Audit(_) => "audit",
            Error::State(_) => "state",
            Error::Orders(_) => "orders",
            Error::Recovery(_) => "recovery",
            Error::Daemon(_) => "daemon",
            Error::Internal(_) => "internal",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
