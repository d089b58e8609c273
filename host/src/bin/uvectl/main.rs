//! `uvectl`: operator / VMM CLI for the uve-host management API. It speaks
//! the API's types (`uve_host::api::types`): its command line is
//! `uve_host::args::uvectl` (shared with the man-page generator),
//! `commands` the request-and-answer commands, `transfer` the streaming
//! ones, `output` how answers are shown, `table` the tables of lists.
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict,
//! 5 VM not connected.

mod commands;
mod output;
mod table;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use uve_host::api::client::ApiClient;
use uve_host::api::types::SessionAction;
use uve_host::args::uvectl::{Cli, Cmd};

fn default_socket() -> PathBuf {
    if let Some(s) = std::env::var_os("UVE_HOST_SOCKET") {
        return PathBuf::from(s);
    }
    let dir = std::env::var_os("UVE_HOST_DATA_DIR").map_or_else(
        || PathBuf::from(uve_host::config::DEFAULT_DATA_DIR),
        PathBuf::from,
    );
    dir.join("api.sock")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("uvectl: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("uvectl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let api = ApiClient::new(cli.socket.clone().unwrap_or_else(default_socket));
    let (c, raw) = (&api, cli.json);
    match cli.command {
        Cmd::Vm(cmd) => commands::vm(c, cmd, raw).await,
        Cmd::Assign { user, vm } => commands::assign(c, &user, vm, raw).await,
        Cmd::Unassign { user } => commands::unassign(c, &user, raw).await,
        Cmd::Assignments => commands::assignments(c, raw).await,
        Cmd::Sessions { vm } => commands::sessions(c, vm, raw).await,
        Cmd::Users => commands::users(c, raw).await,
        Cmd::User(cmd) => commands::user(c, cmd, raw).await,
        Cmd::Versions { user } => commands::versions(c, &user, raw).await,
        Cmd::Import { user, file } => transfer::import(c, &user, &file, raw).await,
        Cmd::Export {
            user,
            version,
            output,
        } => transfer::export(c, &user, version, output).await,
        Cmd::Rollback { user, version } => commands::rollback(c, &user, version, raw).await,
        Cmd::Gc { grace_secs } => commands::gc(c, grace_secs, raw).await,
        Cmd::Scrub { mib_per_sec } => commands::scrub(c, mib_per_sec, raw).await,
        Cmd::Events { since, follow } => transfer::events(c, since, follow).await,
        Cmd::Metrics => transfer::metrics(c).await,
        Cmd::Ua(cmd) => commands::ua(c, cmd, raw).await,
        Cmd::Suspend { vm, session } => {
            commands::session_action(c, &vm, &session, SessionAction::Suspend, raw).await
        }
        Cmd::Resume { vm, session } => {
            commands::session_action(c, &vm, &session, SessionAction::Resume, raw).await
        }
        Cmd::Monitor(cmd) => commands::monitor(c, cmd, raw).await,
    }
}
