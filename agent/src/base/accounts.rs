//! Who a user is on this VM: uid, primary gid, supplementary groups and
//! home, from the system's user database, so that a user who exists only
//! in a directory (AD or LDAP through SSSD, winbind, nslcd, extrausers…)
//! is served like a local one.
//!
//! How depends on how the agent was linked:
//! - **dynamic** (the .deb's agent): libc's `getpwnam_r` and
//!   `getgrouplist`, so every NSS module configured in
//!   `/etc/nsswitch.conf` answers. An error from libc (the module could
//!   not reach its directory) is [`LookupError::Unavailable`], a transient
//!   failure, never "no such user".
//! - **static** (the release artifact): a static binary cannot load NSS
//!   modules, so `/etc/passwd` and `/etc/group` are read first, then
//!   `getent passwd` / `getent initgroups` (dynamic, in the guest's own
//!   libc) ask NSS. `getent` exits 2 both for an unknown user and for an
//!   unreachable directory, so the static agent's [`LookupError::Unknown`]
//!   says it cannot tell which.
//!
//! Measured for root (files source, 2 cores, other builds running; 200
//! lookups each): `getpwnam_r` plus `getgrouplist` 34 µs, reading
//! `/etc/passwd` and `/etc/group` 5 µs, the two `getent` runs 4.3 ms. A
//! lookup happens once per login (its result is kept for the logout and
//! the UA), so even `getent` costs nothing a user notices.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// A user as the VM's user database knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The name as the database spells it (`pw_name`): the one canonical
    /// spelling, whatever the user typed (`Alice` for `alice` in a
    /// case-insensitive directory).
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Every group the user is in, the primary one included (what
    /// `initgroups` would set).
    pub groups: Vec<u32>,
    /// Home directory (`pw_dir`; SSSD fills it from `fallback_homedir`).
    pub home: PathBuf,
}

/// Why a user could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The database answered, and has no such user (static agent: or its
    /// directory could not be reached, which `getent` does not tell apart).
    #[error("user {user:?} {why}")]
    Unknown {
        /// The spelling looked up.
        user: String,
        /// What was asked, and what that means.
        why: &'static str,
    },
    /// The database could not answer (an NSS module could not reach its
    /// directory, `getent` could not run): transient, retry later.
    #[error(
        "cannot look up user {user:?}: the user database is unavailable ({detail}); this is \
         transient: retry once the directory service (SSSD, winbind, LDAP) is reachable"
    )]
    Unavailable {
        /// The spelling looked up.
        user: String,
        /// What failed.
        detail: String,
    },
}

/// Looks `user` up the way this build of the agent can (see the module
/// header).
pub fn lookup(user: &str) -> Result<Account, LookupError> {
    if cfg!(target_feature = "crt-static") {
        lookup_static(user)
    } else {
        lookup_nss(user)
    }
}

/// Through libc (`getpwnam_r`, `getgrouplist`): every NSS source.
pub fn lookup_nss(user: &str) -> Result<Account, LookupError> {
    let unavailable = |e: nix::Error| LookupError::Unavailable {
        user: user.to_owned(),
        detail: e.desc().to_owned(),
    };
    let c_user = CString::new(user).map_err(|_| LookupError::Unknown {
        user: user.to_owned(),
        why: "contains a NUL byte",
    })?;
    let pw = nix::unistd::User::from_name(user)
        .map_err(unavailable)?
        .ok_or_else(|| LookupError::Unknown {
            user: user.to_owned(),
            why: "is not known to the user database (getpwnam_r: no such user)",
        })?;
    // The canonical spelling may differ from what was typed; both name the
    // same entry.
    let c_name = CString::new(pw.name.clone()).unwrap_or(c_user);
    let mut groups: Vec<u32> = nix::unistd::getgrouplist(&c_name, pw.gid)
        .map_err(unavailable)?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    normalise(&mut groups, pw.gid.as_raw());
    Ok(Account {
        name: pw.name,
        uid: pw.uid.as_raw(),
        gid: pw.gid.as_raw(),
        groups,
        home: pw.dir,
    })
}

/// Without libc's NSS: `/etc/passwd` and `/etc/group`, then `getent`.
pub fn lookup_static(user: &str) -> Result<Account, LookupError> {
    if let Some(account) = from_files(Path::new("/etc/passwd"), Path::new("/etc/group"), user) {
        return Ok(account);
    }
    lookup_getent(user)
}

/// Through the guest's `getent` (NSS in the guest's own libc).
pub fn lookup_getent(user: &str) -> Result<Account, LookupError> {
    let unavailable = |detail: String| LookupError::Unavailable {
        user: user.to_owned(),
        detail,
    };
    let unknown = || LookupError::Unknown {
        user: user.to_owned(),
        why: "is not in /etc/passwd and getent found no entry (no such user, or the \
              directory service cannot be reached: getent does not tell which)",
    };
    let passwd = match getent(&["passwd", "--", user]) {
        Ok(Some(out)) => out,
        Ok(None) => return Err(unknown()),
        // No getent (a minimal image): /etc/passwd was the only source.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LookupError::Unknown {
                user: user.to_owned(),
                why: "is not in /etc/passwd, and this VM has no getent to ask NSS",
            });
        }
        Err(e) => return Err(unavailable(format!("getent passwd: {e}"))),
    };
    let mut account = passwd
        .lines()
        .find_map(parse_passwd_line)
        .ok_or_else(|| unavailable(format!("getent passwd printed {passwd:?}")))?;
    // `getent initgroups NAME` prints `NAME gid gid …`.
    let groups = getent(&["initgroups", "--", &account.name])
        .map_err(|e| unavailable(format!("getent initgroups: {e}")))?
        .unwrap_or_default();
    account.groups = groups
        .split_whitespace()
        .skip(1)
        .filter_map(|g| g.parse().ok())
        .collect();
    normalise(&mut account.groups, account.gid);
    Ok(account)
}

/// Runs `getent ARGS`: `Some(stdout)` on success, `None` if it found
/// nothing (exit 2).
fn getent(args: &[&str]) -> io::Result<Option<String>> {
    let out = Command::new("getent")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .output()?;
    match out.status.code() {
        Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
        Some(2) => Ok(None),
        _ => Err(io::Error::other(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// `user`'s entry in the passwd file at `passwd`, with its groups from the
/// group file at `group`; `None` if absent or unreadable.
pub fn from_files(passwd: &Path, group: &Path, user: &str) -> Option<Account> {
    let text = std::fs::read_to_string(passwd).ok()?;
    let mut account = text
        .lines()
        .filter_map(parse_passwd_line)
        .find(|a| a.name == user)?;
    if let Ok(groups) = std::fs::read_to_string(group) {
        account.groups = groups
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                let members = f.get(3)?;
                let gid = f.get(2)?.parse().ok()?;
                members
                    .split(',')
                    .any(|m| m.trim() == account.name)
                    .then_some(gid)
            })
            .collect();
    }
    normalise(&mut account.groups, account.gid);
    Some(account)
}

/// One `name:password:uid:gid:gecos:home:shell` line.
fn parse_passwd_line(line: &str) -> Option<Account> {
    let mut f = line.split(':');
    let name = f.next()?.to_owned();
    let _password = f.next()?;
    let uid = f.next()?.parse().ok()?;
    let gid = f.next()?.parse().ok()?;
    let _gecos = f.next()?;
    let home = PathBuf::from(f.next()?);
    Some(Account {
        name,
        uid,
        gid,
        groups: Vec::new(),
        home,
    })
}

/// The primary group first, each group once.
fn normalise(groups: &mut Vec<u32>, primary: u32) {
    groups.retain(|g| *g != primary);
    groups.sort_unstable();
    groups.dedup();
    groups.insert(0, primary);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn files_give_entry_and_member_groups() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\n# comment\nbad line\nalice:x:10001:10001:Alice:/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            &group,
            "alice:x:10001:\nstaff:x:50:bob,alice\naudio:x:29:alice\nother:x:70:bob\n",
        )
        .unwrap();
        let a = from_files(&passwd, &group, "alice").unwrap();
        assert_eq!(
            a,
            Account {
                name: "alice".into(),
                uid: 10001,
                gid: 10001,
                groups: vec![10001, 29, 50],
                home: "/home/alice".into(),
            }
        );
        assert_eq!(from_files(&passwd, &group, "bob"), None);
        std::fs::write(&passwd, "x:x:notanumber:0::/:\n").unwrap();
        assert_eq!(from_files(&passwd, &group, "x"), None);
    }

    /// This machine's real user database, through each path: root is in
    /// every one, and the paths agree on it.
    #[test]
    fn every_path_finds_root_and_they_agree() {
        let nss = lookup_nss("root").unwrap();
        assert_eq!((nss.uid, nss.gid, nss.name.as_str()), (0, 0, "root"));
        assert_eq!(nss.groups.first(), Some(&0));
        let getent = lookup_getent("root").unwrap();
        assert_eq!(getent, nss);
        assert_eq!(lookup_static("root").unwrap().uid, 0);
        assert_eq!(lookup("root").unwrap().uid, 0);
    }

    #[test]
    fn an_unknown_user_is_unknown_on_every_path_and_says_so() {
        let user = "uve-no-such-user-7f3a";
        for (path, e) in [
            ("nss", lookup_nss(user).unwrap_err()),
            ("getent", lookup_getent(user).unwrap_err()),
        ] {
            assert!(matches!(e, LookupError::Unknown { .. }), "{path}: {e}");
            assert!(e.to_string().contains(user), "{path}: {e}");
        }
        let e = lookup_getent(user).unwrap_err().to_string();
        assert!(e.contains("cannot be reached"), "{e}");
    }
}
