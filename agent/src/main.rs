//! `uve-agent`: the uve guest agent's binary — command-line parsing only.
//! `uve-agent run` is the daemon ([`uve_agent::daemon`]); the other verbs
//! talk to a running daemon over its control socket ([`uve_agent::cli`]).

use std::path::PathBuf;
use uve_protocol::names::{SessionId, UaName, UserName};

use anyhow::Context;
use clap::{Parser, Subcommand};
use uve_agent::adapters::control::ControlRequest;
use uve_agent::base::logfilter;
use uve_agent::config::Config;
use uve_agent::{cli, daemon};

#[derive(Parser)]
#[command(name = "uve-agent", version, about = "uve guest agent")]
struct Cli {
    /// Configuration file (TOML); defaults apply without one.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Control socket (overrides the configuration).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Run the daemon.
    Run,
    /// Open a session; returns when the user's UIF is ready.
    Login {
        /// The user, as typed at the login prompt or as the directory
        /// spells them (`alice`, `CORP\\alice`, `alice@corp.example`).
        #[arg(long)]
        user: String,
        /// The session id.
        #[arg(long)]
        session: SessionId,
        /// Start and supervise this deployed UA for the session.
        #[arg(long)]
        ua: Option<UaName>,
    },
    /// End a session; returns when its UIF is committed or safely spooled.
    Logout {
        /// The session id.
        #[arg(long)]
        session: SessionId,
    },
    /// Report an unexpected disconnect of a session.
    Disconnect {
        /// The session id.
        #[arg(long)]
        session: SessionId,
        /// What happened.
        #[arg(long)]
        reason: String,
    },
    /// Show the agent's state.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if USER may monitor SESSION, 1 if not.
    MonitorCheck {
        /// The monitored session.
        #[arg(long)]
        session: SessionId,
        /// The would-be monitor.
        #[arg(long)]
        user: UserName,
    },
    /// Preserved copies of updates the host refused for good (root only).
    Preserved {
        #[command(subcommand)]
        verb: PreservedVerb,
    },
    /// Internal: packs a home directory as a tar to stdout. The daemon runs
    /// it as the home's user (privileges dropped), never as root.
    #[command(hide = true)]
    PackHome {
        /// The home directory.
        #[arg(long)]
        home: PathBuf,
        /// Glob patterns left out.
        #[arg(long)]
        exclude: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PreservedVerb {
    /// List them: id, user, size, why, where.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Copy one's bytes to a new file.
    Export {
        /// The copy's id.
        #[arg(long)]
        id: String,
        /// The new file (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Send one to the host as a conflict version (once the cause of the
    /// refusal is fixed); removes it once the host took it.
    Push {
        /// The copy's id.
        #[arg(long)]
        id: String,
        /// Keep the copy after the host took it.
        #[arg(long)]
        keep: bool,
    },
    /// Delete one for good.
    Delete {
        /// The copy's id.
        #[arg(long)]
        id: String,
    },
}

fn main() {
    let code = match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("uve-agent: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn real_main() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    let (req, json) = match cli.verb {
        Verb::Run => {
            init_logging();
            return daemon::run(cli.config.as_deref(), cli.socket).map(|()| 0);
        }
        Verb::PackHome { home, exclude } => {
            return uve_agent::uif::materialise::pack_child(&home, &exclude).map(|()| 0);
        }
        Verb::Login { user, session, ua } => (ControlRequest::Login { user, session, ua }, false),
        Verb::Logout { session } => (ControlRequest::Logout { session }, false),
        Verb::Disconnect { session, reason } => {
            (ControlRequest::Disconnect { session, reason }, false)
        }
        Verb::Status { json } => (ControlRequest::Status, json),
        Verb::MonitorCheck { session, user } => {
            (ControlRequest::MonitorCheck { session, user }, false)
        }
        Verb::Preserved { verb } => match verb {
            PreservedVerb::List { json } => (ControlRequest::PreservedList, json),
            PreservedVerb::Export { id, to } => {
                let to = std::path::absolute(&to)
                    .with_context(|| format!("resolve {}", to.display()))?;
                (ControlRequest::PreservedExport { id, to }, false)
            }
            PreservedVerb::Push { id, keep } => (ControlRequest::PreservedPush { id, keep }, false),
            PreservedVerb::Delete { id } => (ControlRequest::PreservedDelete { id }, false),
        },
    };
    let socket = match cli.socket {
        Some(s) => s,
        None => Config::load(cli.config.as_deref())?.control_socket,
    };
    cli::run(&socket, req, json)
}

/// Logs to stderr, filtered by `UVE_LOG` ([`uve_agent::base::logfilter`]);
/// an invalid value is reported and logging stays at info.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let value = std::env::var("UVE_LOG").ok();
    let (filter, bad) = logfilter::from_env_value(value.as_deref());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .init();
    if let Some(e) = bad {
        tracing::warn!(error = %e, "UVE_LOG ignored; logging at info");
    }
}
