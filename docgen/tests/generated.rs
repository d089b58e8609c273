//! `uve-docgen` as packaging/build-debs.sh runs it: the files it writes,
//! what the man pages say (as `man` renders them when it is installed; it
//! is wherever lintian is, as in CI) and what the bash completion
//! completes when bash runs it. Hidden subcommands appear nowhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Subcommands with subcommands of their own, and those.
type Nested = &'static [(&'static str, &'static [&'static str])];

/// Each program, its subcommands in `--help` order, and the nested ones.
const PROGRAMS: [(&str, &[&str], Nested); 3] = [
    ("uve-host", &["run", "config"], &[]),
    (
        "uvectl",
        &[
            "vm",
            "assign",
            "unassign",
            "assignments",
            "sessions",
            "users",
            "user",
            "versions",
            "import",
            "export",
            "rollback",
            "gc",
            "scrub",
            "events",
            "metrics",
            "ua",
            "suspend",
            "resume",
            "monitor",
        ],
        &[
            ("vm", &["list", "add", "show", "rm", "status", "ping"]),
            ("ua", &["deploy", "rollback", "rm"]),
            ("monitor", &["grant", "revoke"]),
            ("user", &["show", "rm-version", "quota"]),
        ],
    ),
    (
        "uve-agent",
        &[
            "run",
            "login",
            "logout",
            "disconnect",
            "status",
            "monitor-check",
            "preserved",
        ],
        &[("preserved", &["list", "export", "push", "delete"])],
    ),
];

/// Runs `uve-docgen` into a new directory.
fn generate() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_uve-docgen"))
        .arg(out.path())
        .env("SOURCE_DATE_EPOCH", "1796623199")
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let said = String::from_utf8_lossy(&run.stdout);
    for (p, _, _) in PROGRAMS {
        assert!(said.contains(&format!("{p}: ")), "{said}");
    }
    out
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// The subcommand names a page's SUBCOMMANDS section lists, in order
/// (`.TP` then `uvectl\-vm(1)`).
fn listed_subcommands(page: &str, program: &str) -> Vec<String> {
    let escaped = program.replace('-', "\\-");
    let section = page
        .split(".SH SUBCOMMANDS\n")
        .nth(1)
        .unwrap_or_default()
        .split("\n.SH ")
        .next()
        .unwrap_or_default();
    section
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{escaped}\\-")))
        .filter_map(|l| l.strip_suffix("(1)"))
        .map(|s| s.replace("\\-", "-"))
        .collect()
}

/// `man -l PAGE` as plain text with every run of blanks as one space
/// (man justifies lines), after checking that groff warns of nothing, as
/// lintian checks; `None` where man is not installed.
fn rendered(page: &Path) -> Option<String> {
    let out = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-l"])
        .arg(page)
        .env("MANWIDTH", "200")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .ok()?;
    assert!(out.status.success(), "man -l {}: {out:?}", page.display());
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(warnings.trim().is_empty(), "{}: {warnings}", page.display());
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The pages of one program: one per visible (sub)command, each section
/// of subcommands listing exactly the expected ones; rendered by man
/// (where installed) with its NAME and, below the top, its parent under
/// SEE ALSO. Returns whether man rendered them.
fn check_pages(out: &Path, program: &str, subs: &[&str], nested: Nested) -> bool {
    let man1 = out.join(program).join("man1");
    let mut expected: BTreeSet<String> = [format!("{program}.1")].into();
    expected.extend(subs.iter().map(|s| format!("{program}-{s}.1")));
    for (parent, children) in nested {
        expected.extend(children.iter().map(|c| format!("{program}-{parent}-{c}.1")));
    }
    assert_eq!(
        files(&man1),
        expected,
        "{program}: one page per visible (sub)command"
    );

    let top = std::fs::read_to_string(man1.join(format!("{program}.1"))).unwrap();
    assert_eq!(
        listed_subcommands(&top, program),
        subs,
        "{program}.1 SUBCOMMANDS"
    );
    assert!(
        top.contains(&format!(
            " 2026-12-07 \"uve {}\" uve\n",
            env!("CARGO_PKG_VERSION")
        )),
        "dated from SOURCE_DATE_EPOCH: {top}"
    );
    for section in ["\"EXIT STATUS\"", "ENVIRONMENT", "FILES", "\"SEE ALSO\""] {
        assert!(
            top.contains(&format!("\n.SH {section}\n")),
            "{program}.1 lacks {section}"
        );
    }
    for (parent, children) in nested {
        let page = std::fs::read_to_string(man1.join(format!("{program}-{parent}.1"))).unwrap();
        assert_eq!(
            listed_subcommands(&page, &format!("{program}-{parent}")),
            *children,
            "{program}-{parent}.1 SUBCOMMANDS"
        );
    }

    let mut rendered_all = true;
    for page in &expected {
        let path = man1.join(page);
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(
            !raw.contains("pack\\-home"),
            "{page} names a hidden subcommand"
        );
        let Some(text) = rendered(&path) else {
            rendered_all = false;
            continue;
        };
        let name = page.trim_end_matches(".1");
        assert!(
            text.contains(&format!(" NAME {name} - ")),
            "{page}:\n{text}"
        );
        if name != program {
            // The longest shorter name with a page (a subcommand's own
            // name may hold a '-', as `user rm-version`).
            let mut parent: &str = name;
            while let Some((p, _)) = parent.rsplit_once('-') {
                parent = p;
                if expected.contains(&format!("{parent}.1")) {
                    break;
                }
            }
            let parent = if expected.contains(&format!("{parent}.1")) {
                parent
            } else {
                program
            };
            assert!(
                text.contains(&format!(" SEE ALSO {parent}(1)")),
                "{page}:\n{text}"
            );
        }
    }
    rendered_all
}

#[test]
fn man_pages_name_every_subcommand_and_only_the_visible_ones() {
    let out = generate();
    let mut rendered = true;
    for (program, subs, nested) in PROGRAMS {
        rendered &= check_pages(out.path(), program, subs, nested);
    }
    if !rendered {
        eprintln!("man is not installed: pages not rendered (apt-get install man-db)");
    }
}

#[test]
fn man_pages_say_options_exit_status_environment_and_files() {
    let out = generate();
    // As man shows them.
    let man1 = out.path().join("uvectl/man1");
    if let Some(add) = rendered(&man1.join("uvectl-vm-add.1")) {
        for option in [
            "--cid <CID>",
            "--uds-path <UDS_PATH>",
            "--port <PORT>",
            "--unix <UNIX>",
            "<ID>",
        ] {
            assert!(
                add.contains(option),
                "uvectl-vm-add(1) lacks {option}:\n{add}"
            );
        }
        let top = rendered(&man1.join("uvectl.1")).unwrap();
        for (code, meaning) in [
            ("0", "success."),
            ("1", "an error, including a daemon that is not running."),
            ("2", "usage error."),
            ("3", "not found."),
            ("4", "conflict."),
            ("5", "the agent of the VM is not connected."),
        ] {
            assert!(
                top.contains(&format!(" {code} {meaning}")),
                "uvectl(1) exit status {code}:\n{top}"
            );
        }
        let run = rendered(&out.path().join("uve-host/man1/uve-host-run.1")).unwrap();
        assert!(
            run.contains("May also be specified with the UVE_HOST_DATA_DIR environment variable."),
            "{run}"
        );
    }
    let agent = std::fs::read_to_string(out.path().join("uve-agent/man1/uve-agent.1")).unwrap();
    assert!(agent.contains("/etc/uve/agent.toml"), "{agent}");
}

/// What bash's completion of `words` (the last one being completed)
/// offers, with the program's generated script loaded: the function its
/// `complete -F` registered for the program, called as bash calls it.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cword = words.len() - 1;
    let cur = words[cword];
    let prev = if cword > 0 { words[cword - 1] } else { "" };
    let program = format!(
        "set -e\n\
         source '{script}'\n\
         function=$(complete -p '{name}' | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')\n\
         COMP_WORDS=({words})\n\
         COMP_CWORD={cword}\n\
         COMP_LINE=\"${{COMP_WORDS[*]}}\"\n\
         COMP_POINT=${{#COMP_LINE}}\n\
         \"$function\" '{name}' '{cur}' '{prev}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script = script.display(),
        name = words[0],
        words = quoted.join(" "),
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(program)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completion_completes_subcommands_and_options() {
    let out = generate();
    let ctl: PathBuf = out.path().join("uvectl/bash/uvectl");
    let agent: PathBuf = out.path().join("uve-agent/bash/uve-agent");
    let host: PathBuf = out.path().join("uve-host/bash/uve-host");
    let all = bash_complete(&ctl, &["uvectl", ""]);
    for (_, subs, _) in &PROGRAMS[1..2] {
        for s in *subs {
            assert!(
                all.iter().any(|c| c == s),
                "uvectl <TAB> lacks {s}: {all:?}"
            );
        }
    }
    assert_eq!(bash_complete(&ctl, &["uvectl", "vm", "a"]), ["add"]);
    assert_eq!(
        bash_complete(&ctl, &["uvectl", "as"]),
        ["assign", "assignments"]
    );
    let add = bash_complete(&ctl, &["uvectl", "vm", "add", "vm1", "--"]);
    for o in [
        "--cid",
        "--uds-path",
        "--port",
        "--unix",
        "--socket",
        "--json",
    ] {
        assert!(
            add.iter().any(|c| c == o),
            "uvectl vm add --<TAB> lacks {o}: {add:?}"
        );
    }
    let verbs = bash_complete(&agent, &["uve-agent", ""]);
    assert!(verbs.iter().any(|c| c == "monitor-check"), "{verbs:?}");
    assert!(
        !verbs.iter().any(|c| c.contains("pack")),
        "hidden verb offered: {verbs:?}"
    );
    assert_eq!(
        bash_complete(&agent, &["uve-agent", "preserved", ""])
            .into_iter()
            .filter(|c| !c.starts_with('-'))
            .collect::<Vec<_>>(),
        ["list", "export", "push", "delete", "help"]
    );
    assert_eq!(bash_complete(&host, &["uve-host", "r"]), ["run"]);
    // Below a subcommand of a program with a hyphen in its name (clap
    // issue 6421 left these empty).
    for (script, words, wanted) in [
        (
            &host,
            &["uve-host", "run", "--"][..],
            &["--config", "--data-dir", "--api-socket"][..],
        ),
        (
            &agent,
            &["uve-agent", "login", "--"],
            &["--user", "--session", "--ua"],
        ),
        (
            &agent,
            &["uve-agent", "preserved", "export", "--"],
            &["--id", "--to"],
        ),
    ] {
        let offered = bash_complete(script, words);
        for w in wanted {
            assert!(
                offered.iter().any(|o| o == w),
                "{words:?}: {w} not in {offered:?}"
            );
        }
    }
}

#[test]
fn zsh_and_fish_completions_are_for_their_shells() {
    let out = generate();
    for (program, subs, _) in PROGRAMS {
        let dir = out.path().join(program);
        let zsh = std::fs::read_to_string(dir.join(format!("zsh/_{program}"))).unwrap();
        assert!(zsh.starts_with(&format!("#compdef {program}\n")), "{zsh}");
        let fish = std::fs::read_to_string(dir.join(format!("fish/{program}.fish"))).unwrap();
        for s in subs {
            assert!(zsh.contains(&format!("'{s}:")), "_{program} lacks {s}");
            assert!(
                fish.contains(&format!("complete -c {program} "))
                    && fish.contains(&format!("-a \"{s}\"")),
                "{program}.fish lacks {s}"
            );
        }
        assert!(
            !zsh.contains("pack-home") && !fish.contains("pack-home"),
            "{program}: hidden verb offered"
        );
        for (shell, file) in [
            ("zsh", format!("zsh/_{program}")),
            ("fish", format!("fish/{program}.fish")),
        ] {
            let check = if shell == "zsh" { "-n" } else { "--no-execute" };
            if let Ok(o) = Command::new(shell).arg(check).arg(dir.join(&file)).output() {
                assert!(o.status.success(), "{shell} {check} {file}: {o:?}");
            }
        }
    }
}
