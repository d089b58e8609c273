//! Which paths of a home stay out of its UIF: the configured `exclude`
//! patterns, compiled once per pack (`globset`).

use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Compiled exclude patterns. A pattern without `/` matches any single
/// path component (like `.gitignore`); with `/` it matches the whole
/// relative path. `*` and `?` stay within a component, `**` crosses them;
/// a leading `./` and a trailing `/` are ignored.
#[derive(Debug, Clone, Default)]
pub struct Excludes {
    whole: GlobSet,
    component: GlobSet,
}

/// An exclude pattern that is not a valid glob.
#[derive(Debug, thiserror::Error)]
#[error("bad exclude pattern {pattern:?}: {why}")]
pub struct PatternError {
    /// The pattern as configured.
    pub pattern: String,
    /// What is wrong with it.
    pub why: String,
}

impl Excludes {
    /// Compiles `patterns`; fails on the first invalid one.
    pub fn new(patterns: &[String]) -> Result<Self, PatternError> {
        let mut whole = GlobSetBuilder::new();
        let mut component = GlobSetBuilder::new();
        let bad = |pattern: &str, e: &dyn std::fmt::Display| PatternError {
            pattern: pattern.to_string(),
            why: e.to_string(),
        };
        for raw in patterns {
            let p = raw.trim_start_matches("./").trim_end_matches('/');
            let glob = GlobBuilder::new(p)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| bad(raw, &e))?;
            if p.contains('/') {
                whole.add(glob);
            } else {
                component.add(glob);
            }
        }
        Ok(Excludes {
            whole: whole.build().map_err(|e| bad("(all)", &e))?,
            component: component.build().map_err(|e| bad("(all)", &e))?,
        })
    }

    /// True if `path` (relative to the home) is left out.
    pub fn matches(&self, path: &Path) -> bool {
        self.whole.is_match(path)
            || path
                .components()
                .any(|c| self.component.is_match(c.as_os_str()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn excluded(path: &Path, patterns: &[String]) -> bool {
        Excludes::new(patterns).unwrap().matches(path)
    }

    #[test]
    fn globs() {
        let ex = |p: &str, pats: &[&str]| {
            excluded(
                Path::new(p),
                &pats.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert!(ex(".cache/x/y", &[".cache"]));
        assert!(ex("a/b.tmp", &["*.tmp"]));
        assert!(!ex("a/b.tmpx", &["*.tmp"]));
        assert!(ex("a/b/c.log", &["a/**/*.log"]));
        assert!(ex("a/c.log", &["a/**/*.log"]));
        assert!(!ex("b/c.log", &["a/*.log"]));
    }

    #[test]
    fn invalid_patterns_are_refused_by_name() {
        let e = Excludes::new(&["ok".into(), "a/[b".into()]).unwrap_err();
        assert_eq!(e.pattern, "a/[b");
    }
}
