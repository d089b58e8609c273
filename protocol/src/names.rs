//! Validation of names that arrive from peers and users: user ids, session
//! ids, UA names and versions. They end up in file names, object keys, logs
//! and shell hooks, so only a conservative alphabet is accepted and the
//! error says exactly what is wrong.

use crate::defs::MAX_NAME_LEN;

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
