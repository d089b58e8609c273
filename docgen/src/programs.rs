//! The three programs whose pages and completions are generated: each
//! one's clap definition (the same one its binary parses) and what its
//! top page says beyond the options: exit status, environment, files and
//! related pages.

use clap::CommandFactory;

/// A `(term, description)` entry of a man page's list section.
pub type Entry = (&'static str, &'static str);

/// One program.
pub struct Program {
    /// The command's name (its binary's).
    pub name: &'static str,
    /// Its command line, as its binary parses it.
    pub command: fn() -> clap::Command,
    /// `EXIT STATUS` of the top page.
    pub exit_status: &'static [Entry],
    /// `ENVIRONMENT` of the top page.
    pub environment: &'static [Entry],
    /// `FILES` of the top page.
    pub files: &'static [Entry],
    /// `SEE ALSO` of the top page.
    pub see_also: &'static [&'static str],
}

/// `uve-host`, `uvectl` (package uve-host) and `uve-agent` (package
/// uve-agent).
pub static ALL: [Program; 3] = [
    Program {
        name: "uve-host",
        command: uve_host::args::daemon::Cli::command,
        exit_status: &[
            ("0", "after a graceful shutdown (SIGTERM or SIGINT)."),
            (
                "1",
                "an error at start (configuration, store, listeners) or while running.",
            ),
        ],
        environment: &[
            (
                "UVE_LOG",
                "log filter (tracing-subscriber EnvFilter syntax, e.g. info or uve_host=debug); default info.",
            ),
            ("UVE_HOST_DATA_DIR", "data directory, as --data-dir."),
            ("UVE_HOST_SOCKET", "management API socket, as --api-socket."),
        ],
        files: &[
            (
                "/etc/uve/host.toml",
                "the configuration the packaged unit (uve-host.service) passes with --config: every option, commented out, with its default.",
            ),
            (
                "/var/lib/uve-host/",
                "the default data directory: VM registry, leases, the local UIF store, and api.sock, the management API socket.",
            ),
        ],
        see_also: &["uvectl(1)", "uve-agent(1)"],
    },
    Program {
        name: "uvectl",
        command: uve_host::args::uvectl::Cli::command,
        exit_status: &[
            ("0", "success."),
            ("1", "an error, including a daemon that is not running."),
            ("2", "usage error."),
            ("3", "not found."),
            ("4", "conflict."),
            ("5", "the agent of the VM is not connected."),
        ],
        environment: &[
            (
                "UVE_HOST_SOCKET",
                "the API socket when --socket is not given.",
            ),
            (
                "UVE_HOST_DATA_DIR",
                "without either, the API socket is $UVE_HOST_DATA_DIR/api.sock.",
            ),
            (
                "TZ",
                "tables show times as the local date and time: the zone TZ names, else /etc/localtime.",
            ),
        ],
        files: &[(
            "/var/lib/uve-host/api.sock",
            "the API socket of a daemon with the default data directory.",
        )],
        see_also: &["uve-host(1)"],
    },
    Program {
        name: "uve-agent",
        command: uve_agent::args::Cli::command,
        exit_status: &[
            (
                "0",
                "success (run: after a graceful shutdown; monitor-check: the user may monitor the session).",
            ),
            (
                "1",
                "the agent refused the request or it failed (monitor-check: the user may not).",
            ),
            (
                "2",
                "usage error, or the daemon could not start or could not be reached.",
            ),
        ],
        environment: &[(
            "UVE_LOG",
            "log filter of run: comma-separated levels (off, error, warn, info, debug, trace) or target=level directives; default info, and info with a warning when invalid.",
        )],
        files: &[
            (
                "/etc/uve/agent.toml",
                "the configuration the packaged unit (uve-agent.service) passes with --config: every option, commented out, with its default.",
            ),
            (
                "/run/uve-agent.sock",
                "the default control socket, which the verbs and the PAM hook use.",
            ),
            (
                "/var/lib/uve-agent/",
                "the default state directory: sessions, spooled updates, preserved copies, deployed UAs.",
            ),
            (
                "/usr/share/uve-agent/uve-pam-hook",
                "the PAM hook for pam_exec, which runs login and logout.",
            ),
        ],
        see_also: &["pam_exec(8)", "uvectl(1)"],
    },
];

/// The program called `name`.
pub fn find(name: &str) -> Option<&'static Program> {
    ALL.iter().find(|p| p.name == name)
}
