//! Validation of names that arrive from peers and users: user ids, session
//! ids, UA names and versions. They end up in file names, object keys, logs
//! and shell hooks, so only a conservative alphabet is accepted and the
//! error says exactly what is wrong.

use crate::defs::MAX_NAME_LEN;

/// Every valid name as a regular expression (ECMA-262 and Rust `regex`
/// syntax alike): a first character of `[A-Za-z0-9_@]`, then up to
/// [`MAX_NAME_LEN`]` - 1` of `[A-Za-z0-9._@-]`. It says what [`validate`]
/// accepts, for those who check names elsewhere: the management API's
/// OpenAPI document carries it as the `pattern` of every user, VM, UA and
/// session name (a test there keeps the two equal), and the name newtypes
/// will use it. [`validate`] stays the check; a test here shows they agree.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_@][A-Za-z0-9._@-]{0,127}$";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty {
        /// What kind of name (user, session, ...).
        kind: &'static str,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("{kind} name is {len} bytes long, the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// What kind of name.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The name contains a character outside `[A-Za-z0-9._@-]`.
    #[error("{kind} name contains {ch:?}; allowed are letters, digits and . _ @ -")]
    BadChar {
        /// What kind of name.
        kind: &'static str,
        /// The first offending character.
        ch: char,
    },
    /// The name starts with `.` or `-` (hidden files, `..`, option injection).
    #[error("{kind} name must not start with {first:?}")]
    BadStart {
        /// What kind of name.
        kind: &'static str,
        /// The offending first character.
        first: char,
    },
}

/// Checks a name of the given kind: 1..=128 bytes of `[A-Za-z0-9._@-]`, not
/// starting with `.` or `-`. This excludes `/`, `..`, NUL, whitespace and
/// shell metacharacters, so a valid name is safe as a single path component.
pub fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            kind,
            len: name.len(),
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-')))
    {
        return Err(NameError::BadChar { kind, ch });
    }
    let first = name.chars().next().unwrap_or('.');
    if first == '.' || first == '-' {
        return Err(NameError::BadStart { kind, first });
    }
    Ok(())
}

/// Validates a user id.
pub fn user(name: &str) -> Result<(), NameError> {
    validate("user", name)
}

/// Validates a session id.
pub fn session(name: &str) -> Result<(), NameError> {
    validate("session", name)
}

/// Validates a UA name or UA version string.
pub fn ua(name: &str) -> Result<(), NameError> {
    validate("UA", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["alice", "bob.smith@corp", "u-1_2", "S-0001", "a"] {
            assert_eq!(validate("user", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_hostile_names() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        let cases: [(&str, &str); 9] = [
            ("", "empty"),
            ("..", "must not start"),
            (".hidden", "must not start"),
            ("-rf", "must not start"),
            ("a/b", "contains '/'"),
            ("../../etc/passwd", "contains '/'"),
            ("a\0b", "contains '\\0'"),
            ("a b", "contains ' '"),
            (&long, "129 bytes"),
        ];
        for (n, why) in cases {
            let err = validate("user", n).expect_err(n).to_string();
            assert!(err.contains(why), "{n:?}: {err}");
        }
    }
}

/// [`NAME_PATTERN`] evaluated without a regex engine: the test reads the
/// pattern's own text (two bracket classes and one `{min,max}` bound) and
/// matches names with it, so a change to either the pattern or
/// [`validate`] that makes them disagree fails here.
#[cfg(test)]
mod pattern {
    use super::{MAX_NAME_LEN, NAME_PATTERN, validate};

    /// A parsed `^[first][rest]{min,max}$`.
    struct Pattern {
        first: Vec<(char, char)>,
        rest: Vec<(char, char)>,
        min: usize,
        max: usize,
    }

    /// The ranges of a bracket class body (`A-Za-z0-9._@-`); a `-` first
    /// or last is a literal.
    fn class(body: &str) -> Vec<(char, char)> {
        let chars: Vec<char> = body.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            if i + 2 < chars.len() && chars[i + 1] == '-' {
                out.push((chars[i], chars[i + 2]));
                i += 3;
            } else {
                out.push((chars[i], chars[i]));
                i += 1;
            }
        }
        out
    }

    fn parse(p: &str) -> Pattern {
        let inner = p
            .strip_prefix("^[")
            .and_then(|s| s.strip_suffix('$'))
            .expect("^[...]...$");
        let (first, inner) = inner.split_once("][").expect("two classes");
        let (rest, bound) = inner.split_once("]{").expect("a bound");
        let (min, max) = bound
            .strip_suffix('}')
            .and_then(|b| b.split_once(','))
            .expect("{min,max}");
        Pattern {
            first: class(first),
            rest: class(rest),
            min: min.parse().expect("min"),
            max: max.parse().expect("max"),
        }
    }

    fn within(ranges: &[(char, char)], c: char) -> bool {
        ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c))
    }

    impl Pattern {
        fn matches(&self, name: &str) -> bool {
            let mut chars = name.chars();
            let Some(c) = chars.next() else {
                return false;
            };
            let rest: Vec<char> = chars.collect();
            within(&self.first, c)
                && (self.min..=self.max).contains(&rest.len())
                && rest.iter().all(|c| within(&self.rest, *c))
        }
    }

    #[test]
    fn the_pattern_says_what_validate_accepts() {
        let p = parse(NAME_PATTERN);
        assert_eq!(p.max + 1, MAX_NAME_LEN, "the bound follows MAX_NAME_LEN");
        let max = "a".repeat(MAX_NAME_LEN);
        let over = "a".repeat(MAX_NAME_LEN + 1);
        let cases: [(&str, bool); 22] = [
            ("alice", true),
            ("bob.smith@corp", true),
            ("u-1_2", true),
            ("S-0001", true),
            ("a", true),
            ("_x", true),
            ("@home", true),
            ("9.9.9", true),
            ("a..b", true),
            ("a-", true),
            (&max, true),
            ("", false),
            (".", false),
            ("..", false),
            (".hidden", false),
            ("-rf", false),
            ("a/b", false),
            ("a b", false),
            ("a\0b", false),
            ("a\nb", false),
            ("é", false),
            (&over, false),
        ];
        for (name, valid) in cases {
            assert_eq!(p.matches(name), valid, "pattern on {name:?}");
            assert_eq!(
                validate("user", name).is_ok(),
                valid,
                "validate on {name:?}"
            );
        }
    }

    #[test]
    fn the_pattern_and_validate_agree_on_every_character() {
        let p = parse(NAME_PATTERN);
        for c in (0u32..0x300).filter_map(char::from_u32) {
            for name in [
                c.to_string(),
                format!("a{c}"),
                format!("{c}a"),
                format!("a{c}\n"),
            ] {
                assert_eq!(
                    p.matches(&name),
                    validate("user", &name).is_ok(),
                    "{name:?}"
                );
            }
        }
    }
}
