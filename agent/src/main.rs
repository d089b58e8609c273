//! `uve-agent`: the uve guest agent. `uve-agent run` is the daemon (dials
//! the host, serves UVE-2, materialises UIFs, supervises sessions); the
//! other verbs talk to a running daemon over its control socket.

mod agent;
mod archive;
mod cli;
mod config;
mod conn;
mod control;
mod dispatch;
mod fault;
mod flush;
mod fsutil;
mod lifecycle;
mod monitor;
mod nofollow;
mod notices;
mod passwd;
mod session;
mod supervise;
mod ua;
mod uif;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::ControlRequest;

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
        /// The user.
        #[arg(long)]
        user: String,
        /// The session id.
        #[arg(long)]
        session: String,
        /// Start and supervise this deployed UA for the session.
        #[arg(long)]
        ua: Option<String>,
    },
    /// End a session; returns when its UIF is committed or safely spooled.
    Logout {
        /// The session id.
        #[arg(long)]
        session: String,
    },
    /// Report an unexpected disconnect of a session.
    Disconnect {
        /// The session id.
        #[arg(long)]
        session: String,
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
        session: String,
        /// The would-be monitor.
        #[arg(long)]
        user: String,
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
            return run_daemon(cli.config.as_deref(), cli.socket).map(|()| 0);
        }
        Verb::PackHome { home, exclude } => {
            return crate::uif::materialise::pack_child(&home, &exclude).map(|()| 0);
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// Signals the daemon reacts to.
enum Sig {
    Terminate,
    Reload,
}

/// Forwards SIGTERM/SIGINT/SIGHUP from a small signal-hook thread.
fn signals() -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<Sig>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for s in signals.forever() {
                let sig = if s == SIGHUP {
                    Sig::Reload
                } else {
                    Sig::Terminate
                };
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}

fn run_daemon(config_path: Option<&Path>, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let mut cfg = Config::load(config_path)?;
    if let Some(s) = socket {
        cfg.control_socket = s;
    }
    let mut sigs = signals()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .thread_stack_size(256 * 1024)
        .build()?;
    rt.block_on(async move {
        let mode = cfg.socket_mode()?;
        let socket = cfg.control_socket.clone();
        let checkpoint = cfg.checkpoint_interval_secs;
        let agent = Arc::new(Agent::new(cfg).context("initialise state directory")?);
        let listener = control::bind(&socket, mode)
            .with_context(|| format!("bind control socket {}", socket.display()))?;
        tracing::info!(socket = %socket.display(), state = %agent.state_dir.display(), "uve-agent running");
        lifecycle::recover_after_reboot(&agent);
        supervise::adopt(&agent);
        let stop = CancellationToken::new();
        let conn_task = tokio::spawn(conn::run(agent.clone(), stop.clone()));
        tokio::spawn(agent::outbox(agent.clone()));
        let control_task = tokio::spawn(control::serve(agent.clone(), listener));
        if checkpoint > 0 {
            let a = agent.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(checkpoint));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    lifecycle::checkpoint(&a).await;
                }
            });
        }
        while let Some(Sig::Reload) = sigs.recv().await {
            match Config::load(config_path) {
                Ok(c) => agent.reload(c),
                Err(e) => tracing::error!("reload failed, keeping the old config: {e}"),
            }
        }
        tracing::info!("shutting down: flushing open sessions");
        control_task.abort();
        let limit = Duration::from_secs(agent.config().shutdown_flush_secs);
        if tokio::time::timeout(limit, lifecycle::shutdown(&agent)).await.is_err() {
            tracing::warn!("shutdown flush did not finish in time; what is left stays spooled");
        }
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), conn_task).await;
        let _ = std::fs::remove_file(&socket);
        tracing::info!("bye");
        anyhow::Ok(())
    })
}

use crate::agent::Agent;
