//! Names that arrive from peers and users: user ids, session ids, UA names
//! and versions. They end up in file names, object keys, logs and shell
//! hooks, so only a conservative alphabet is accepted and the error says
//! exactly what is wrong.
//!
//! Each kind is a newtype ([`UserName`], [`SessionId`], [`UaName`],
//! [`UaVersion`]) that cannot hold an invalid name: it is checked when it
//! is made or decoded (`serde(try_from = "String")`), and never again. On
//! the wire it is a plain string, so encodings are unchanged. A frame whose
//! decode fails on a name leaves the refusal here ([`take_refusal`]), so
//! the codec can answer that one request `InvalidName` and keep the link.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
    /// The name is one a kind reserves (a UA version may not be `current`
    /// or `previous`, the names of the agent's version links).
    #[error("{kind} name {name:?} is reserved")]
    Reserved {
        /// What kind of name.
        kind: &'static str,
        /// The name.
        name: String,
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

thread_local! {
    /// The last name a decode on this thread refused (see [`take_refusal`]).
    static REFUSED: RefCell<Option<NameError>> = const { RefCell::new(None) };
}

/// Forgets any refusal noted on this thread: called before a decode whose
/// failure may then be attributed to a name.
pub fn clear_refusal() {
    REFUSED.with(|r| r.borrow_mut().take());
}

/// The name a decode on this thread last refused, if any (and forgets it).
/// postcard keeps no message of a custom decode error, so the newtypes note
/// their refusal here when they are decoded.
pub fn take_refusal() -> Option<NameError> {
    REFUSED.with(|r| r.borrow_mut().take())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        name_type!($(#[$doc])* $name, $kind, &[]);
    };
    ($(#[$doc:meta])* $name:ident, $kind:literal, $reserved:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl $name {
            /// What kind of name this is, as error messages say it.
            pub const KIND: &'static str = $kind;

            /// Names this kind reserves.
            pub const RESERVED: &'static [&'static str] = $reserved;

            /// Checks `name` and makes one.
            pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
                let name = name.into();
                validate($kind, &name)?;
                if Self::RESERVED.contains(&name.as_str()) {
                    return Err(NameError::Reserved { kind: $kind, name });
                }
                Ok(Self(name))
            }

            /// A name written in the code, such as a fallback session id.
            ///
            /// # Panics
            /// If `name` is invalid: a bug in the code, never data (names
            /// from peers, files and users go through [`Self::new`]).
            pub fn literal(name: &'static str) -> Self {
                match Self::new(name) {
                    Ok(n) => n,
                    Err(e) => panic!("invalid {} literal {name:?}: {e}", $kind),
                }
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(name: String) -> Result<Self, NameError> {
                Self::new(name).inspect_err(|e| {
                    REFUSED.with(|r| *r.borrow_mut() = Some(e.clone()));
                })
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(name: &str) -> Result<Self, NameError> {
                Self::new(name)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(name: &str) -> Result<Self, NameError> {
                Self::new(name)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&self.0)
            }
        }

        impl AsRef<std::ffi::OsStr> for $name {
            fn as_ref(&self) -> &std::ffi::OsStr {
                std::ffi::OsStr::new(&self.0)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

name_type!(
    /// A user id: valid by type ([`validate`]), so safe as one path
    /// component, object key part or hook argument.
    UserName,
    "user"
);
name_type!(
    /// A session id, valid by type ([`validate`]).
    SessionId,
    "session"
);
name_type!(
    /// A UA's name, valid by type ([`validate`]).
    UaName,
    "UA"
);
name_type!(
    /// A UA's version string, valid by type ([`validate`]), and neither
    /// `current` nor `previous` (the agent's version links).
    UaVersion,
    "UA version",
    &["current", "previous"]
);

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
    fn newtypes_encode_as_strings_and_refuse_bad_names_when_decoded() {
        let name = UserName::new("alice").expect("valid");
        let as_newtype = postcard::to_allocvec(&name).expect("encode");
        let as_string = postcard::to_allocvec(&"alice".to_string()).expect("encode");
        assert_eq!(as_newtype, as_string, "same bytes as a String");
        let back: UserName = postcard::from_bytes(&as_string).expect("decode");
        assert_eq!(back, "alice");
        clear_refusal();
        let bad = postcard::to_allocvec(&"../etc".to_string()).expect("encode");
        assert!(postcard::from_bytes::<SessionId>(&bad).is_err());
        let noted = take_refusal().expect("the refusal is noted");
        assert!(
            noted.to_string().contains("session name contains '/'"),
            "{noted}"
        );
        assert!(take_refusal().is_none(), "taken once");
        assert!(serde_json::from_str::<UaName>("\"a b\"").is_err());
        assert_eq!(
            serde_json::to_string(&UaName::new("ua-1").expect("valid")).expect("json"),
            "\"ua-1\""
        );
    }

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
