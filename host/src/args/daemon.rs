//! The command line of the daemon `uve-host` (clap): its commands, their
//! arguments and help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `uve-host <command>`.
#[derive(Parser)]
#[command(name = "uve-host", version, about = "uve host bridge daemon", long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
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
