//! Which paths of a home stay out of its UIF: the configured `exclude`
//! patterns, checked once (`fast-glob`'s `validate`) and matched without
//! a regex engine (`fast-glob`, which replaced `globset` and its regex
//! engines to keep the static agent small: packaging/README.md, "Agent
//! size").

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Compiled exclude patterns. A pattern without `/` matches any single
/// path component (like `.gitignore`); with `/` it matches the whole
/// relative path. `*` and `?` stay within a component, `**` crosses them;
/// a leading `./` and a trailing `/` are ignored.
///
/// The syntax is the one `globset` gave these patterns before: `*` (any
/// bytes but `/`), `?` (one byte but `/`), `[abc]`, `[a-z]`, `[!a]` or
/// `[^a]` (one byte of, or not of, the set), `{a,b}` (either
/// alternative), `**` as a whole component (any number of components,
/// none included), `\` before a character matches that character. A
/// leading `!` is a literal `!` (not a negation). Paths are matched as
/// bytes, so names that are not UTF-8 are matched too. Differences from
/// `globset`, all in patterns nobody writes on purpose: a `}` without `{`
/// is a literal (was refused), an empty alternative (`{a,}`) matches the
/// empty string, `\` inside `[…]` escapes, and a reversed range (`[z-a]`)
/// matches nothing (was refused); a differential run of random patterns
/// and paths against `globset` found no other difference but `**` as an
/// alternative inside `{…}`.
#[derive(Debug, Clone, Default)]
pub struct Excludes {
    whole: Vec<Vec<u8>>,
    component: Vec<Vec<u8>>,
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
        let mut excludes = Excludes::default();
        for raw in patterns {
            let p = raw.trim_start_matches("./").trim_end_matches('/');
            let glob = normalise(p);
            fast_glob::validate(&glob).map_err(|e| PatternError {
                pattern: raw.clone(),
                why: why(e.kind),
            })?;
            if p.contains('/') {
                excludes.whole.push(glob);
            } else {
                excludes.component.push(glob);
            }
        }
        Ok(excludes)
    }

    /// True if `path` (relative to the home) is left out.
    pub fn matches(&self, path: &Path) -> bool {
        let whole = path.as_os_str().as_bytes();
        self.whole.iter().any(|g| fast_glob::glob_match(g, whole))
            || (!self.component.is_empty()
                && path.components().any(|c| {
                    let name = c.as_os_str().as_bytes();
                    self.component
                        .iter()
                        .any(|g| fast_glob::glob_match(g, name))
                }))
    }
}

/// `pattern` in `fast-glob`'s dialect with `globset`'s meaning: a leading
/// `!` (a negation for `fast-glob`) is escaped, and the backslash of an
/// escaped letter or digit is dropped (`fast-glob` reads `\n`, `\t`,
/// `\b`… as control characters, `globset` as the letter itself).
fn normalise(pattern: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(pattern.len() + 1);
    if pattern.starts_with('!') {
        out.push(b'\\');
    }
    let mut bytes = pattern.bytes().peekable();
    while let Some(b) = bytes.next() {
        match (b, bytes.peek()) {
            (b'\\', Some(next)) if next.is_ascii_alphanumeric() => {}
            (b'\\', Some(&next)) => {
                out.extend([b, next]);
                bytes.next();
            }
            _ => out.push(b),
        }
    }
    out
}

/// What is wrong with a pattern `fast-glob` refused.
fn why(kind: fast_glob::ErrorKind) -> String {
    use fast_glob::ErrorKind;
    match kind {
        ErrorKind::UnclosedBrace => "'{' without its '}'".into(),
        ErrorKind::UnclosedBracket => "'[' without its ']'".into(),
        ErrorKind::TrailingBackslash => "'\\' at the end escapes nothing".into(),
        ErrorKind::BraceNestingTooDeep => "'{…}' nested more than 10 deep".into(),
        ErrorKind::TooManyBraceGroups => "more than 10 '{…}' groups".into(),
        other => format!("{other:?}"),
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

    /// Which of `paths` the patterns leave out.
    fn left_out<'a>(patterns: &[&str], paths: &[&'a str]) -> Vec<&'a str> {
        let ex =
            Excludes::new(&patterns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        paths
            .iter()
            .copied()
            .filter(|p| ex.matches(Path::new(p)))
            .collect()
    }

    const TREE: &[&str] = &[
        "a",
        "a/b",
        "a/b/c.log",
        "a/c.log",
        "a/b/d/c.log",
        "b/c.log",
        "c.log",
        "x.tmp",
        "x.swp",
        "x.txt",
        "d/x.tmp",
    ];

    /// For each (pattern, expected): that pattern alone leaves out exactly
    /// the expected ones of `paths`, in their order.
    fn check(paths: &[&str], cases: &[(&str, &[&str])]) {
        for (pattern, expected) in cases {
            assert_eq!(left_out(&[*pattern], paths), *expected, "{pattern}");
        }
    }

    #[test]
    fn a_pattern_without_slash_matches_any_component() {
        check(
            TREE,
            &[
                ("b", &["a/b", "a/b/c.log", "a/b/d/c.log", "b/c.log"]),
                ("*.tmp", &["x.tmp", "d/x.tmp"]),
                ("?.tmp", &["x.tmp", "d/x.tmp"]),
            ],
        );
        // `?` and `*` never match a `/`.
        check(&["a/b"], &[("a?b", &[])]);
    }

    #[test]
    fn a_pattern_with_slash_matches_the_whole_path() {
        check(
            TREE,
            &[
                ("a/*.log", &["a/c.log"]),
                ("*/c.log", &["a/c.log", "b/c.log"]),
                ("a/b", &["a/b"]),
                // `**` is any number of components, none included.
                ("a/**/c.log", &["a/b/c.log", "a/c.log", "a/b/d/c.log"]),
                (
                    "**/c.log",
                    &["a/b/c.log", "a/c.log", "a/b/d/c.log", "b/c.log", "c.log"],
                ),
                ("a/**", &["a/b", "a/b/c.log", "a/c.log", "a/b/d/c.log"]),
                // A `**` inside a component is a `*`.
                ("a/b**", &["a/b"]),
            ],
        );
    }

    #[test]
    fn leading_dot_slash_and_trailing_slash_are_ignored() {
        check(
            TREE,
            &[
                ("./a/b/", &["a/b"]),
                ("b/", &["a/b", "a/b/c.log", "a/b/d/c.log", "b/c.log"]),
            ],
        );
    }

    #[test]
    fn classes_alternatives_and_escapes() {
        check(
            TREE,
            &[
                ("x.[st]*", &["x.tmp", "x.swp", "x.txt", "d/x.tmp"]),
                ("x.[!s]*", &["x.tmp", "x.txt", "d/x.tmp"]),
                ("x.[^s]*", &["x.tmp", "x.txt", "d/x.tmp"]),
                ("x.[a-s]*", &["x.swp"]),
                ("*.{tmp,swp}", &["x.tmp", "x.swp", "d/x.tmp"]),
                ("{a,d}/*.{log,tmp}", &["a/c.log", "d/x.tmp"]),
            ],
        );
        check(
            &["*", "a*", "ab", "[x]", "x", "!x", "y", "tab", "b"],
            &[
                (r"\*", &["*"]),
                (r"a\*", &["a*"]),
                (r"\[x]", &["[x]"]),
                // An escaped letter is the letter (not a control character).
                (r"\b", &["b"]),
                (r"\tab", &["tab"]),
            ],
        );
    }

    #[test]
    fn a_leading_bang_is_a_literal_not_a_negation() {
        check(
            &["!x", "x", "y"],
            &[("!x", &["!x"]), ("!*", &["!x"]), (r"\!x", &["!x"])],
        );
    }

    #[test]
    fn names_that_are_not_utf8_are_matched_as_bytes() {
        use std::ffi::OsStr;
        let name = OsStr::from_bytes(b"caf\xe9.tmp");
        let ex = Excludes::new(&["*.tmp".into(), "caf?.log".into()]).unwrap();
        assert!(ex.matches(&Path::new("d").join(name)));
        assert!(ex.matches(Path::new(OsStr::from_bytes(b"caf\xff.log"))));
        assert!(!ex.matches(Path::new(OsStr::from_bytes(b"caf\xff.txt"))));
    }

    #[test]
    fn no_pattern_leaves_nothing_out() {
        assert!(left_out(&[], TREE).is_empty());
    }

    #[test]
    fn every_kind_of_invalid_pattern_is_refused() {
        for bad in ["a/[b", "*.{tmp,swp", r"a\", "{a,{b,[c}}"] {
            let e = Excludes::new(&[bad.to_string()]).unwrap_err();
            assert_eq!(e.pattern, bad);
            assert!(!e.why.is_empty());
        }
        // A `}` without `{` is an ordinary character.
        assert_eq!(left_out(&["a}"], &["a}", "a"]), ["a}"]);
    }
}
