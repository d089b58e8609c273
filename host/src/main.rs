//! `uve-host`: the host bridge daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use uve_host::config::Config;

#[derive(Parser)]
#[command(name = "uve-host", version, about = "uve host bridge daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM/SIGINT.
    Run {
        /// TOML configuration file (every field optional).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides the file; default /var/lib/uve-host).
        #[arg(long, env = "UVE_HOST_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Management API socket (overrides the file; default <data-dir>/api.sock).
        #[arg(long, env = "UVE_HOST_SOCKET")]
        api_socket: Option<PathBuf>,
    },
    /// Print the effective configuration (defaults merged with the file).
    Config {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UVE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            config,
            data_dir,
            api_socket,
        } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if api_socket.is_some() {
                cfg.api_socket = api_socket;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.worker_threads.max(1))
                .enable_all()
                .build()
                .context("start runtime")?;
            rt.block_on(uve_host::daemon::run(cfg))
        }
        Command::Config { config } => {
            let cfg = Config::load(config.as_deref())?;
            println!("{cfg:#?}");
            Ok(())
        }
    }
}
