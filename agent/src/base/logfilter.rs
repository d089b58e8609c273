//! The agent's log filter, read from `UVE_LOG`: comma-separated
//! directives, each a level (`debug`: the default for every target) or
//! `target=level` (`uve_agent::flush=trace`: that target and those below
//! it). Parsed here into `tracing-subscriber`'s regex-free [`Targets`]
//! filter rather than with its `env-filter` feature, whose regex engines
//! cost the static binary 285 KB (packaging/README.md, "Agent size").
//!
//! The syntax is the subset of `EnvFilter`'s that the agent documents
//! (agent/README.md): levels are `off`, `error`, `warn`, `info`, `debug`,
//! `trace` (any case) or `0`–`5`; a target matches every target that
//! starts with it and the longest matching target wins; a target not named
//! and not covered by a bare level is off; a bare target (`uve_agent`)
//! means all its levels, as `EnvFilter` has it. Blanks around directives
//! and empty directives are ignored. Span and field filters
//! (`target[span{field}]=level`) are not supported and are refused.

use std::str::FromStr;

use tracing_subscriber::filter::{LevelFilter, Targets};

/// The level of every target when `UVE_LOG` is unset, blank or invalid.
pub const DEFAULT: LevelFilter = LevelFilter::INFO;

/// A `UVE_LOG` value that is not a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// `target=level` with a level that is none of the known ones.
    #[error(
        "bad level {level:?} in log directive {directive:?} \
         (expected off, error, warn, info, debug or trace)"
    )]
    BadLevel {
        /// The whole directive.
        directive: String,
        /// The part after `=`.
        level: String,
    },
    /// `=level` without a target.
    #[error("log directive {0:?} has no target before '='")]
    NoTarget(String),
    /// More than one `=`, or a span/field filter (`[`, `]`, `{`, `}`).
    #[error("log directive {0:?} is not `level`, `target` or `target=level`")]
    Unsupported(String),
}

/// Parses a `UVE_LOG` value (see the module header for the syntax).
/// An empty value (or one of only blanks and commas) is an empty filter:
/// every target off.
pub fn parse(spec: &str) -> Result<Targets, FilterError> {
    let mut filter = Targets::new();
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let unsupported = || FilterError::Unsupported(directive.to_string());
        if directive.contains(['[', ']', '{', '}']) {
            return Err(unsupported());
        }
        match directive.split_once('=') {
            Some((target, level)) => {
                let (target, level) = (target.trim(), level.trim());
                if level.contains('=') {
                    return Err(unsupported());
                }
                if target.is_empty() {
                    return Err(FilterError::NoTarget(directive.to_string()));
                }
                filter = filter.with_target(target, level_of(directive, level)?);
            }
            None => match level_of(directive, directive) {
                Ok(level) => filter = filter.with_default(level),
                // Not a level: a bare target, all of its levels.
                Err(_) => filter = filter.with_target(directive, LevelFilter::TRACE),
            },
        }
    }
    Ok(filter)
}

/// The filter for the value of `UVE_LOG` (`None`: unset or not UTF-8):
/// [`DEFAULT`] for every target when it is unset or has no directive
/// (blanks and commas only), and also when it is invalid, with the error
/// to report once logging is up.
pub fn from_env_value(value: Option<&str>) -> (Targets, Option<FilterError>) {
    let default = || Targets::new().with_default(DEFAULT);
    match value {
        Some(spec) if spec.split(',').any(|d| !d.trim().is_empty()) => match parse(spec) {
            Ok(filter) => (filter, None),
            Err(e) => (default(), Some(e)),
        },
        _ => (default(), None),
    }
}

/// A level name or number; `directive` is for the error.
fn level_of(directive: &str, level: &str) -> Result<LevelFilter, FilterError> {
    let bad = || FilterError::BadLevel {
        directive: directive.to_string(),
        level: level.to_string(),
    };
    // LevelFilter reads "" as ERROR; a missing level is a mistake here.
    if level.is_empty() {
        return Err(bad());
    }
    LevelFilter::from_str(level).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tracing::Level;

    use super::*;

    /// Which of the five levels `filter` enables for `target`, as a string
    /// of initials, most severe first (`"ewi"` for info).
    fn enabled(filter: &Targets, target: &str) -> String {
        [
            (Level::ERROR, 'e'),
            (Level::WARN, 'w'),
            (Level::INFO, 'i'),
            (Level::DEBUG, 'd'),
            (Level::TRACE, 't'),
        ]
        .iter()
        .filter(|(l, _)| filter.would_enable(target, l))
        .map(|(_, c)| *c)
        .collect()
    }

    /// `filter` parses and enables, for each target, the levels given.
    fn check(filter: &str, expect: &[(&str, &str)]) {
        let f = parse(filter).unwrap();
        for (target, levels) in expect {
            assert_eq!(enabled(&f, target), *levels, "{filter:?} for {target}");
        }
    }

    #[test]
    fn a_bare_level_is_the_default_of_every_target() {
        check("debug", &[("uve_agent::flush", "ewid"), ("tokio", "ewid")]);
        check("WARN", &[("x", "ew")]);
        check("5", &[("x", "ewidt")]);
        check("off", &[("x", "")]);
    }

    #[test]
    fn target_directives_apply_to_the_target_and_below() {
        check(
            "info, uve_agent::flush=trace ,uve_agent::link=warn",
            &[
                ("uve_agent::flush", "ewidt"),
                ("uve_agent::flush::deliver", "ewidt"),
                ("uve_agent::link", "ew"),
                ("uve_agent::daemon", "ewi"),
                ("tokio", "ewi"),
            ],
        );
    }

    #[test]
    fn the_longest_matching_target_wins_whatever_the_order() {
        check(
            "uve_agent::uif=error,uve_agent=debug",
            &[
                ("uve_agent::uif::retrieve", "e"),
                ("uve_agent::stores", "ewid"),
            ],
        );
    }

    #[test]
    fn targets_not_named_are_off_without_a_bare_level() {
        check(
            "uve_agent=debug",
            &[("uve_agent::daemon", "ewid"), ("uve_protocol", "")],
        );
    }

    #[test]
    fn a_bare_target_enables_all_its_levels() {
        check(
            "warn,uve_agent::link",
            &[("uve_agent::link", "ewidt"), ("uve_agent::daemon", "ew")],
        );
    }

    #[test]
    fn empty_directives_and_blanks_are_ignored() {
        check(" , debug,, ", &[("x", "ewid")]);
        check("", &[("x", "")]);
    }

    #[test]
    fn malformed_directives_are_refused() {
        assert_eq!(
            parse("info,uve_agent=loud").unwrap_err(),
            FilterError::BadLevel {
                directive: "uve_agent=loud".into(),
                level: "loud".into()
            }
        );
        assert!(matches!(
            parse("uve_agent=").unwrap_err(),
            FilterError::BadLevel { .. }
        ));
        assert_eq!(
            parse("=debug").unwrap_err(),
            FilterError::NoTarget("=debug".into())
        );
        assert_eq!(
            parse("a=b=debug").unwrap_err(),
            FilterError::Unsupported("a=b=debug".into())
        );
        assert!(matches!(
            parse("uve_agent[flush{user}]=debug").unwrap_err(),
            FilterError::Unsupported(_)
        ));
    }

    #[test]
    fn the_environment_value_falls_back_to_info() {
        for (value, levels) in [
            (None, "ewi"),
            (Some("  "), "ewi"),
            (Some(" , "), "ewi"),
            (Some("debug"), "ewid"),
        ] {
            let (f, e) = from_env_value(value);
            assert_eq!(
                (enabled(&f, "x"), e),
                (levels.to_string(), None),
                "{value:?}"
            );
        }
        let (f, e) = from_env_value(Some("x=nope"));
        assert_eq!(enabled(&f, "x"), "ewi");
        assert!(matches!(e, Some(FilterError::BadLevel { .. })));
    }
}
