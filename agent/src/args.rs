//! The command line of `uve-agent` (clap): every verb, its arguments and
//! their help text. `main.rs` parses it; `uve-docgen` (a build-time tool in
//! no package) renders the same definition as man pages and shell
//! completions, so the agent itself carries no generator.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use uve_protocol::names::{SessionId, UaName, UserName};

/// `uve-agent [--config FILE] [--socket PATH] <verb>`.
#[derive(Parser)]
#[command(name = "uve-agent", version, about = "uve guest agent", long_about = None)]
pub struct Cli {
    /// Configuration file (TOML); defaults apply without one.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Control socket (overrides the configuration).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// How long a verb waits for the agent's answer, in seconds. The wait
    /// ends (exit code 75); the agent's work does not: a logout the agent
    /// started still commits or spools (see `uve-agent status`).
    #[arg(long, global = true, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// The verbs: `run` is the daemon, the others its clients.
#[derive(Subcommand)]
pub enum Verb {
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
        /// What to do with them.
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

/// `uve-agent preserved ...`.
#[derive(Subcommand)]
pub enum PreservedVerb {
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
