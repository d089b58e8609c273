//! The command lines of the crate's binaries (clap): [`daemon`] of
//! `uve-host`, [`uvectl`] of the CLI. The binaries parse them; `uve-docgen`
//! (a build-time tool in no package) renders the same definitions as man
//! pages and shell completions. Nothing here imports the rest of the crate.

pub mod daemon;
pub mod uvectl;
