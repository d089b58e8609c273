//! `uve-host`: the host bridge daemon (its command line is
//! [`uve_host::args::daemon`]).

use anyhow::Context;
use clap::Parser;
use uve_host::args::daemon::{Cli, Command};
use uve_host::config::Config;

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
