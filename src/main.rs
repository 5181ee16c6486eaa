//! The `coursegate` command line (SPEC §7): parse arguments, load the config, call the library,
//! map the outcome to an exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coursegate::config::{self, Config};
use coursegate::reconcile::{self, ApplyOptions};
use coursegate::{Error, audit, order, report};

/// mimalloc rather than glibc's malloc: a pass over 20,000 orders makes millions of small
/// allocations, and with mimalloc a first run took about a tenth less time and the daemon's peak
/// RSS was lower (BENCHMARKS.md, issue 8).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit codes of SPEC §7.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "coursegate",
    version,
    about = "Grants access to imaging systems only to people who passed the required e-course"
)]
struct Cli {
    /// The config file.
    #[arg(short, long, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Log lines on standard error as human-readable text or as JSON objects.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and the given (or all) order files; exit 2 on any error.
    Check { files: Vec<PathBuf> },
    /// Show what a run would change; change nothing.
    Plan {
        /// One JSON object on standard output.
        #[arg(long)]
        json: bool,
        /// Preview an `apply --allow-revocations N`.
        #[arg(long, value_name = "N")]
        allow_revocations: Option<usize>,
    },
    /// One reconcile pass, then exit.
    Apply {
        /// Let a reviewed run revoke up to N memberships whatever the brakes say.
        #[arg(long, value_name = "N")]
        allow_revocations: Option<usize>,
    },
    /// The daemon: watch, reconcile, resync, until SIGTERM.
    Run,
    /// Every profile the user has, wants or waits for, and why.
    Explain { user: String },
    /// Orders by phase (granted, waiting for a course, on hold, invalid).
    Status,
    /// The audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the audit log's hash chain and its anchor.
    Verify,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        LogFormat::Json => logs.json().with_current_span(true).init(),
        // Colour codes only on a terminal: journald and log files get plain text.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let result = runtime.block_on(run(cli.command, &cli.config, &config));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            let code = match e.downcast_ref::<Error>() {
                Some(Error::Config(_)) => EXIT_CONFIG,
                _ => EXIT_RUNTIME,
            };
            ExitCode::from(code)
        }
    }
}

async fn run(command: Command, config_path: &Path, config: &Config) -> anyhow::Result<u8> {
    match command {
        Command::Check { files } => Ok(check(config, &files)),
        Command::Plan {
            json,
            allow_revocations,
        } => {
            let (observed, plan) = reconcile::dry_run(config, allow_revocations).await?;
            if json {
                println!("{}", report::plan_json(&plan, &observed));
            } else {
                print!("{}", report::plan_text(&plan, &observed));
            }
            Ok(if plan.brake.is_some() {
                3
            } else if plan.has_holds() {
                EXIT_RUNTIME
            } else {
                0
            })
        }
        Command::Apply { allow_revocations } => {
            let run = reconcile::apply(config, ApplyOptions { allow_revocations }).await?;
            print!("{}", report::plan_text(&run.plan, &run.observed));
            println!(
                "Applied: {} granted, {} revoked, {} failed.",
                run.applied.granted.len(),
                run.applied.revoked.len(),
                run.applied.failed.len()
            );
            for (change, why) in &run.applied.failed {
                println!(
                    "  failed: {} {} {}: {why}",
                    change.action.as_str(),
                    change.user,
                    change.access
                );
            }
            let code = u8::try_from(run.exit_code()).unwrap_or(EXIT_RUNTIME);
            reconcile::drop_in_background(run);
            Ok(code)
        }
        Command::Run => {
            coursegate::daemon::run(config_path, config.clone()).await?;
            Ok(0)
        }
        Command::Explain { user } => {
            let (observed, plan) = reconcile::dry_run_for_user(config, &user).await?;
            print!("{}", report::explain_text(&user, config, &plan, &observed));
            Ok(0)
        }
        Command::Status => {
            if let Some(text) = daemon_status(config) {
                print!("{text}");
                return Ok(0);
            }
            let (observed, plan) = reconcile::dry_run(config, None).await?;
            print!("{}", report::status_text(&plan, &observed));
            Ok(0)
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let anchor = coursegate::state::FileStore::open_read_only(&config.daemon.state_dir)
                .anchor_path();
            match audit::verify(&config.daemon.audit_log, &anchor) {
                Ok(summary) => {
                    println!(
                        "audit log {} is intact: {} records, last seq {}, last hash {}",
                        config.daemon.audit_log.display(),
                        summary.records,
                        summary.last_seq,
                        summary.last_hash
                    );
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("audit log verification FAILED: {e}");
                    Ok(EXIT_RUNTIME)
                }
            }
        }
    }
}

/// The running daemon's status, if a daemon holds the state lock and has published one.
fn daemon_status(config: &Config) -> Option<String> {
    let store = coursegate::state::FileStore::open_read_only(&config.daemon.state_dir);
    let running = matches!(
        store.lock(),
        Err(coursegate::state::StateError::Locked { .. })
    );
    if !running {
        return None;
    }
    let text = std::fs::read_to_string(store.dir().join(coursegate::daemon::STATUS_FILE)).ok()?;
    let status: serde_json::Value = serde_json::from_str(&text).ok()?;
    let readiness = match status["not_ready_reason"].as_str() {
        Some(why) => format!("NOT READY: {why}"),
        None => "ready".to_string(),
    };
    Some(format!(
        "coursegate daemon (pid {}), {readiness}, as of {}\n{}",
        status["pid"],
        status["updated_at"].as_str().unwrap_or("?"),
        status["text"].as_str().unwrap_or("")
    ))
}

/// `check`: config (already loaded) and order files. Exit 2 on any invalid file.
fn check(config: &Config, files: &[PathBuf]) -> u8 {
    let is_profile = |name: &str| config.access.contains_key(name);
    let bad;
    let good;
    if files.is_empty() {
        let dir = &config.daemon.desired_dir;
        match order::scan(dir, &is_profile, &Default::default()) {
            Ok(scan) => {
                for (file, why) in &scan.ignored {
                    eprintln!("warning: {}: {why}", dir.join(file).display());
                }
                for i in &scan.invalid {
                    eprintln!("{}: {}", dir.join(&i.file).display(), i.message);
                }
                bad = scan.invalid.len();
                good = scan.orders.len();
            }
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_CONFIG;
            }
        }
    } else {
        let mut parsed: Vec<(String, String)> = Vec::new();
        let mut invalid = 0usize;
        for file in files {
            match order::load_file(file, &is_profile) {
                Ok(o) => parsed.push((file.display().to_string(), o.id)),
                Err(message) => {
                    eprintln!("{}: {message}", file.display());
                    invalid += 1;
                }
            }
        }
        let duplicates =
            order::duplicate_ids(parsed.iter().map(|(f, id)| (f.as_str(), id.as_str())));
        for (file, message) in &duplicates {
            eprintln!("{file}: {message}");
        }
        bad = invalid + duplicates.len();
        good = parsed.len() - duplicates.len();
    }
    println!(
        "config {} is valid; {good} valid order file(s), {bad} invalid",
        config.path.display()
    );
    if bad > 0 { EXIT_CONFIG } else { 0 }
}
