//! Looking up local users without NSS: the agent is a static binary, where
//! `getpwnam` cannot load NSS modules, so `/etc/passwd` is parsed directly.

use std::path::{Path, PathBuf};

/// One `/etc/passwd` entry's fields the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// Finds `user` in the passwd file at `path`; `None` if absent or unreadable.
pub fn lookup_in(path: &Path, user: &str) -> Option<PasswdEntry> {
    let text = std::fs::read_to_string(path).ok()?;
    parse(&text, user)
}

/// Finds `user` in `/etc/passwd`.
pub fn lookup(user: &str) -> Option<PasswdEntry> {
    lookup_in(Path::new("/etc/passwd"), user)
}

fn parse(text: &str, user: &str) -> Option<PasswdEntry> {
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != user {
            return None;
        }
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let _gecos = f.next()?;
        let home = PathBuf::from(f.next()?);
        Some(PasswdEntry { uid, gid, home })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_ignores_garbage() {
        let text = "root:x:0:0:root:/root:/bin/sh\n# comment\nbad line\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
        assert_eq!(
            parse(text, "nobody"),
            Some(PasswdEntry {
                uid: 65534,
                gid: 65534,
                home: "/nonexistent".into()
            })
        );
        assert_eq!(parse(text, "alice"), None);
        assert_eq!(parse("x:x:notanumber:0::/:", "x"), None);
    }
}
