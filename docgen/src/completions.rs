//! Shell completions (clap_complete) for bash, zsh and fish, each under
//! the name and in the directory its shell loads it from on Debian.
//! Hidden subcommands (`uve-agent pack-home`, run by the agent itself) are
//! left out, as `--help` and the man pages leave them out.

use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

use crate::programs::Program;

/// The file name of a program's script for one shell.
pub type FileName = fn(&str) -> String;

/// The shells, their subdirectory of the output and their file name for
/// a program `P` (`P`, `_P`, `P.fish`, as installed under
/// `/usr/share/bash-completion/completions/`,
/// `/usr/share/zsh/vendor-completions/` and
/// `/usr/share/fish/vendor_completions.d/`).
pub const SHELLS: [(Shell, &str, FileName); 3] = [
    (Shell::Bash, "bash", |p| p.to_string()),
    (Shell::Zsh, "zsh", |p| format!("_{p}")),
    (Shell::Fish, "fish", |p| format!("{p}.fish")),
];

/// Writes the completions of `p` under `dir` (`bash/`, `zsh/`, `fish/`
/// are created); returns their paths.
pub fn write_completions(p: &Program, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (shell, sub, file) in SHELLS {
        let dir = dir.join(sub);
        std::fs::create_dir_all(&dir)?;
        let cmd = without_hidden((p.command)());
        let script = if shell == Shell::Bash {
            bash(cmd, p.name)?
        } else {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), p.name, &mut script);
            script
        };
        let path = dir.join(file(p.name));
        std::fs::write(&path, script)?;
        written.push(path);
    }
    Ok(written)
}

/// The bash script for `cmd`, called `name`. clap_complete spells the
/// state of a program whose name has a hyphen two ways (clap issue 6421:
/// `uve__agent__subcmd__login` in the loop, `uve__subcmd__agent__…` in the
/// arms), so nothing after a subcommand would complete; the script is made
/// for the name with `_` instead and then registered (`complete -F`) for
/// the real name, which is all bash knows it by.
fn bash(cmd: clap::Command, name: &str) -> io::Result<Vec<u8>> {
    let alias = name.replace('-', "_");
    let mut script = Vec::new();
    let alias_static = leak(&alias);
    clap_complete::generate(
        Shell::Bash,
        &mut cmd.name(alias_static).bin_name(alias_static),
        alias_static,
        &mut script,
    );
    if alias == name {
        return Ok(script);
    }
    let text = String::from_utf8(script).map_err(io::Error::other)?;
    let suffix = format!(" {alias}");
    let mut registered = 0;
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.strip_suffix(&suffix) {
            Some(head) if line.trim_start().starts_with("complete -F ") => {
                registered += 1;
                out.push_str(head);
                out.push(' ');
                out.push_str(name);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    if registered == 0 {
        return Err(io::Error::other(format!(
            "the bash script for {name} has no `complete -F … {alias}` line to register it"
        )));
    }
    Ok(out.into_bytes())
}

/// `cmd` without its hidden subcommands, at every level: clap_complete
/// would offer them (clap issue 1335), and `clap::Command` cannot remove a
/// subcommand, so a command that has one is put together again from its
/// name, version, about text, settings, arguments and visible subcommands
/// (all that the completion scripts are made of). A command without one is
/// returned as it is.
fn without_hidden(cmd: clap::Command) -> clap::Command {
    if !has_hidden(&cmd) {
        return cmd;
    }
    let subs: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .map(without_hidden)
        .collect();
    let mut out = clap::Command::new(leak(cmd.get_name()))
        .args(cmd.get_arguments().cloned())
        .subcommands(subs)
        .subcommand_required(cmd.is_subcommand_required_set())
        .arg_required_else_help(cmd.is_arg_required_else_help_set());
    if let Some(v) = cmd.get_version() {
        out = out.version(leak(v));
    }
    if let Some(a) = cmd.get_about() {
        out = out.about(a.clone());
    }
    out
}

/// Whether `cmd` or a command below it has a hidden subcommand.
fn has_hidden(cmd: &clap::Command) -> bool {
    cmd.get_subcommands()
        .any(|s| s.is_hide_set() || has_hidden(s))
}

/// A `'static` copy of `s`: clap takes names and versions as `'static`
/// strings unless its `string` feature is on, which would change the
/// shipped binaries' clap too; this short-lived tool leaks the few it
/// copies instead.
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}
