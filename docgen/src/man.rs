//! Man pages (clap_mangen), git-style: `P.1` for the program and
//! `P-SUB.1` (`uvectl-vm-add.1`) for every visible subcommand, nested ones
//! too. The top page also gets `EXIT STATUS`, `ENVIRONMENT`, `FILES` and
//! `SEE ALSO`; a subcommand's page points to its parent's.

use std::io;
use std::path::{Path, PathBuf};

use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

use crate::programs::{Entry, Program};

/// The manual every page belongs to (the centre of its header).
const MANUAL: &str = "uve";

/// Writes every page of `p` into `dir` (which must exist); returns their
/// paths, the top page last.
pub fn write_pages(p: &Program, dir: &Path) -> io::Result<Vec<PathBuf>> {
    // Without the `help` subcommand clap adds: it is `--help` again.
    let mut cmd = (p.command)().disable_help_subcommand(true);
    cmd.build();
    let source = format!("uve {}", cmd.get_version().unwrap_or_default());
    let date = page_date();
    let mut written = Vec::new();
    write_tree(&cmd, None, (&date, &source), dir, &mut written)?;
    let top = written.last().cloned().unwrap_or_default();
    let mut page = std::fs::read(&top)?;
    page.extend_from_slice(roff_text(&top_sections(p)).as_bytes());
    std::fs::write(&top, page)?;
    Ok(written)
}

/// The pages of `cmd` and its subcommands, children first. `parent` is
/// the page name of the command above, if any.
fn write_tree(
    cmd: &clap::Command,
    parent: Option<&str>,
    (date, source): (&str, &str),
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_tree(sub, Some(name), (date, source), dir, written)?;
    }
    let man = Man::new(cmd.clone())
        .date(date)
        .source(source)
        .manual(MANUAL);
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    if let Some(parent) = parent {
        let mut see = Roff::new();
        see.control("SH", ["SEE ALSO"]);
        see.text([bold(parent), roman("(1)")]);
        page.extend_from_slice(roff_text(&see).as_bytes());
    }
    std::fs::write(&path, page)?;
    written.push(path);
    Ok(())
}

/// The pages' date (`.TH`'s third field; clap_mangen would leave it out,
/// and the fields after it would shift): the day of `SOURCE_DATE_EPOCH`,
/// which packaging/build-debs.sh sets to the last commit's time so that
/// the packages are reproducible, else today (UTC).
fn page_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    let (y, m, d) = civil_from_days(secs / 86_400);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of day `days` since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// A section of `(term, description)` entries.
fn list(roff: &mut Roff, title: &str, entries: &[Entry]) {
    if entries.is_empty() {
        return;
    }
    roff.control("SH", [title]);
    for (term, text) in entries {
        roff.control("TP", []);
        roff.text([bold(*term)]);
        roff.text([roman(*text)]);
    }
}

/// The source of sections appended to a page clap_mangen rendered: the
/// page's preamble already defines `\*(Aq`, the upright apostrophe its own
/// text uses, so this text uses it too.
fn roff_text(roff: &Roff) -> String {
    roff.to_roff().replace('\'', "\\*(Aq")
}

/// What the top page says beyond clap's sections.
fn top_sections(p: &Program) -> Roff {
    let mut roff = Roff::new();
    list(&mut roff, "EXIT STATUS", p.exit_status);
    list(&mut roff, "ENVIRONMENT", p.environment);
    list(&mut roff, "FILES", p.files);
    if !p.see_also.is_empty() {
        roff.control("SH", ["SEE ALSO"]);
        let mut refs = Vec::new();
        for (i, page) in p.see_also.iter().enumerate() {
            let (name, section) = page.split_once('(').unwrap_or((page, ""));
            if i > 0 {
                refs.push(roman(", "));
            }
            refs.push(bold(name));
            refs.push(roman(format!("({section}")));
        }
        roff.text(refs);
    }
    roff
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn days_since_the_epoch_are_calendar_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_794), (2026, 12, 7));
        assert_eq!(civil_from_days(1_796_623_199 / 86_400), (2026, 12, 7));
    }
}
