//! `uve-docgen`: writes the man pages and the bash, zsh and fish
//! completions of `uve-host`, `uvectl` and `uve-agent` from the clap
//! definitions their binaries parse (`uve_host::args`,
//! `uve_agent::args`). A build-time tool in no package:
//! `packaging/build-debs.sh` runs it, so no shipped binary links
//! clap_mangen or clap_complete (the static agent has a size bar).
//!
//! `uve-docgen OUT_DIR [PROGRAM...]` (default: all three) replaces
//! `OUT_DIR/<program>/` with
//!
//! - `man1/<program>.1`, `man1/<program>-<subcommand>.1` … (uncompressed;
//!   the packaging compresses them),
//! - `bash/<program>`, `zsh/_<program>`, `fish/<program>.fish`,
//!
//! and prints one line per program.

mod completions;
mod man;
mod programs;

use std::path::PathBuf;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        bail!("usage: uve-docgen OUT_DIR [PROGRAM...] (programs: uve-host, uvectl, uve-agent)");
    };
    let names: Vec<String> = args
        .map(|a| {
            a.into_string()
                .map_err(|a| anyhow::anyhow!("not UTF-8: {a:?}"))
        })
        .collect::<Result<_, _>>()?;
    let selected: Vec<&programs::Program> = if names.is_empty() {
        programs::ALL.iter().collect()
    } else {
        names
            .iter()
            .map(|n| programs::find(n).with_context(|| format!("unknown program {n:?}")))
            .collect::<Result<_, _>>()?
    };
    for p in selected {
        let dir = out.join(p.name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        let man_dir = dir.join("man1");
        std::fs::create_dir_all(&man_dir)
            .with_context(|| format!("create {}", man_dir.display()))?;
        let pages = man::write_pages(p, &man_dir).context("write man pages")?;
        let scripts = completions::write_completions(p, &dir).context("write completions")?;
        println!(
            "{}: {} man pages, {} completion scripts in {}",
            p.name,
            pages.len(),
            scripts.len(),
            dir.display()
        );
    }
    Ok(())
}
