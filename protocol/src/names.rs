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
/// syntax alike), together with a length of 1 to [`MAX_NAME_LEN`] bytes
/// (`minLength`/`maxLength` in the API's document): characters of
/// `[A-Za-z0-9._@-]`, the first not `.` or `-`, and `~xx` escapes (two
/// lowercase hex digits) of the bytes that are not, which is how a
/// directory's spelling of a user (`CORP\alice`, `Jane Doe`) becomes a name
/// ([`UserName::from_directory`]). An escape of a byte that needs none
/// (`~61` for `a`) is refused, so every spelling has exactly one name. The
/// management API's OpenAPI document carries this as the `pattern` of every
/// user, VM, UA and session name (a test there keeps the two equal).
/// [`validate`] stays the check; a test here shows they agree.
pub const NAME_PATTERN: &str = "^(?:[A-Za-z0-9_@]|~(?:[01][0-9a-f]|2[0-9a-f]|3[a-f]|5[b-e]|60|7[b-f]|[89a-f][0-9a-f]))(?:[A-Za-z0-9._@-]|~(?:[01][0-9a-f]|2[0-9a-cf]|3[a-f]|5[b-e]|60|7[b-f]|[89a-f][0-9a-f]))*$";

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
    /// The name contains a character outside `[A-Za-z0-9._@-]` that is not
    /// a `~xx` escape.
    #[error(
        "{kind} name contains {ch:?}; allowed are letters, digits, . _ @ - and ~xx escapes of other bytes"
    )]
    BadChar {
        /// What kind of name.
        kind: &'static str,
        /// The first offending character.
        ch: char,
    },
    /// A `~` that is not followed by two lowercase hex digits of a byte that
    /// needs escaping (so that each spelling has one name).
    #[error(
        "{kind} name has a bad escape at byte {at}: `~` must be followed by two lowercase hex digits of a byte outside [A-Za-z0-9._@-] (or a leading . or -)"
    )]
    BadEscape {
        /// What kind of name.
        kind: &'static str,
        /// The escape's byte offset.
        at: usize,
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

/// Checks a name of the given kind: 1..=128 bytes of `[A-Za-z0-9._@-]`
/// and `~xx` escapes ([`NAME_PATTERN`]), not starting with `.` or `-`. This
/// excludes `/`, `..`, NUL, whitespace and shell metacharacters, so a valid
/// name is safe as a single path component.
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
    let bytes = name.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let c = bytes[at];
        if c == b'~' {
            match unhex(bytes.get(at + 1..at + 3)) {
                Some(e) if needs_escape(e, at == 0) => at += 3,
                _ => return Err(NameError::BadEscape { kind, at }),
            }
        } else if plain(c) {
            at += 1;
        } else {
            let ch = name[at..].chars().next().unwrap_or('\0');
            return Err(NameError::BadChar { kind, ch });
        }
    }
    let first = bytes[0];
    if first == b'.' || first == b'-' {
        return Err(NameError::BadStart {
            kind,
            first: char::from(first),
        });
    }
    Ok(())
}

/// A byte that stands for itself in a name.
fn plain(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'@' | b'-')
}

/// Whether byte `c` is written `~xx` (at the start, `.` and `-` are too).
fn needs_escape(c: u8, first: bool) -> bool {
    !plain(c) || (first && matches!(c, b'.' | b'-'))
}

/// The byte of two lowercase hex digits.
fn unhex(pair: Option<&[u8]>) -> Option<u8> {
    let digit = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    match pair? {
        [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
        _ => None,
    }
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

impl UserName {
    /// The name of a user as a directory spells it (`alice`, `CORP\alice`,
    /// `alice@corp.example`, `Jane Doe`): lower-cased first if `fold_case`
    /// (for case-insensitive directories such as AD), then every byte
    /// outside the name alphabet (and a leading `.` or `-`) written `~xx`.
    /// Names already in the alphabet stay as they are, and two spellings
    /// never share a name: `CORP\alice` is `CORP~5calice`, while
    /// `alice@corp` stays `alice@corp`.
    pub fn from_directory(spelling: &str, fold_case: bool) -> Result<Self, NameError> {
        let spelling = if fold_case {
            spelling.to_lowercase()
        } else {
            spelling.to_owned()
        };
        let mut name = String::with_capacity(spelling.len());
        for (i, &c) in spelling.as_bytes().iter().enumerate() {
            if needs_escape(c, i == 0) {
                name.push_str(&format!("~{c:02x}"));
            } else {
                name.push(char::from(c));
            }
        }
        Self::new(name)
    }

    /// The directory's spelling this name stands for (the escapes undone;
    /// bytes that are not UTF-8 shown as U+FFFD).
    pub fn spelling(&self) -> String {
        let bytes = self.0.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut at = 0;
        while at < bytes.len() {
            match (bytes[at], unhex(bytes.get(at + 1..at + 3))) {
                (b'~', Some(e)) => {
                    out.push(e);
                    at += 3;
                }
                (c, _) => {
                    out.push(c);
                    at += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
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

/// [`NAME_PATTERN`] (with the length bound the API's document adds)
/// against [`validate`], by a real regex engine: a change to either that
/// makes them disagree fails here.
#[cfg(test)]
mod pattern {
    use super::{MAX_NAME_LEN, NAME_PATTERN, UserName, validate};

    fn matches(name: &str) -> bool {
        let re = regex::Regex::new(NAME_PATTERN).expect("the pattern compiles");
        (1..=MAX_NAME_LEN).contains(&name.len()) && re.is_match(name)
    }

    #[test]
    fn the_pattern_says_what_validate_accepts() {
        let max = "a".repeat(MAX_NAME_LEN);
        let over = "a".repeat(MAX_NAME_LEN + 1);
        let cases: [(&str, bool); 32] = [
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
            ("CORP~5calice", true),
            ("jane~20doe", true),
            ("~2ehidden", true),
            ("~2d", true),
            ("a~7e", true),
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
            ("~61lice", false),
            ("a~2e", false),
            ("a~5C", false),
            ("a~5", false),
            ("a~", false),
        ];
        for (name, valid) in cases {
            assert_eq!(matches(name), valid, "pattern on {name:?}");
            assert_eq!(
                validate("user", name).is_ok(),
                valid,
                "validate on {name:?}"
            );
        }
    }

    #[test]
    fn the_pattern_and_validate_agree_on_every_character_and_escape() {
        let mut names = Vec::new();
        for c in (0u32..0x300).filter_map(char::from_u32) {
            names.extend([
                c.to_string(),
                format!("a{c}"),
                format!("{c}a"),
                format!("a{c}\n"),
            ]);
        }
        for b in 0u8..=255 {
            for hex in [format!("{b:02x}"), format!("{b:02X}")] {
                names.extend([format!("~{hex}"), format!("a~{hex}"), format!("~{hex}a")]);
            }
        }
        for name in names {
            assert_eq!(matches(&name), validate("user", &name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn directory_spellings_map_to_one_name_each_and_back() {
        let cases = [
            ("alice", false, "alice"),
            ("alice@corp.example", false, "alice@corp.example"),
            ("CORP\\alice", false, "CORP~5calice"),
            ("CORP\\Alice", true, "corp~5calice"),
            ("Alice@CORP.EXAMPLE", true, "alice@corp.example"),
            ("Jane Doe", false, "Jane~20Doe"),
            (".x", false, "~2ex"),
            ("a~b", false, "a~7eb"),
            ("zoë", false, "zo~c3~ab"),
        ];
        for (spelling, fold, name) in cases {
            let n = UserName::from_directory(spelling, fold).expect(spelling);
            assert_eq!(n, name, "{spelling:?}");
            let expected = if fold {
                spelling.to_lowercase()
            } else {
                spelling.to_owned()
            };
            assert_eq!(n.spelling(), expected, "{name} back");
        }
        // No two spellings share a name: the escapes of `~` and of the
        // domain separator keep `CORP\alice`, `CORP~5calice` and
        // `alice@CORP` apart.
        let a = UserName::from_directory("CORP\\alice", false).expect("a");
        let b = UserName::from_directory("CORP~5calice", false).expect("b");
        let c = UserName::from_directory("alice@CORP", false).expect("c");
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        let long = format!("CORP\\{}", "a".repeat(130));
        assert!(UserName::from_directory(&long, false).is_err());
    }
}
