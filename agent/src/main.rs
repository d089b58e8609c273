//! `uve-agent`: the uve guest agent's binary — command-line parsing only
//! (the command line itself is [`uve_agent::args`]).
//! `uve-agent run` is the daemon ([`uve_agent::daemon`]); the other verbs
//! talk to a running daemon over its control socket ([`uve_agent::cli`]).

use anyhow::Context;
use clap::Parser;
use uve_agent::adapters::control::ControlRequest;
use uve_agent::args::{Cli, PreservedVerb, Verb};
use uve_agent::base::logfilter;
use uve_agent::config::Config;
use uve_agent::{cli, daemon};

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
            return uve_agent::uif::home_pack::pack_child(&home, &exclude).map(|()| 0);
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
    cli::run(
        &socket,
        req,
        json,
        std::time::Duration::from_secs(cli.timeout),
    )
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
