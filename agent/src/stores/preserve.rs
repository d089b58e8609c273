//! Preserved copies: the bytes of an update the host refused for good
//! (quota exceeded, user not assigned, UIF too large, ...). Nothing the
//! user wrote may be lost, and the next retrieve of the same user writes
//! the UIF path, so before anything else can touch it the image (file
//! mode) or packed home (directory mode) is *moved* — a rename, which
//! needs no free space — into `<state>/preserved/<id>.uif`. When the UIF
//! path is on another filesystem than the state directory the image is
//! renamed next to it instead (`<path>.uve-preserved-<id>`), still without
//! copying a byte.
//!
//! Order of writes: the record (`<id>.json`, naming where the bytes will
//! be) first, then the rename, then both directories are fsynced, and only
//! then does the caller drop the spool entry. A crash before the rename
//! leaves a record without bytes, which is ignored (the spool entry is
//! still there and is refused and preserved again); a crash after it
//! leaves a valid copy.
//!
//! A preserved copy is never deleted by the agent on its own: only
//! `uve-agent preserved push` (once the host took it) or `preserved
//! delete` remove one. Copies keep their disk space until then; when the
//! disk is full, retrieves fail with an error instead of reclaiming it.
//!
//! The area has a budget ([`Budget`]: all copies together, and one user's
//! share, so that one user's refusals cannot take the room another's
//! would need). A refused update that does not fit is **held in place**
//! instead: its bytes stay where the user left them (the image at the UIF
//! path; in directory mode the home, whose temporary archive is removed),
//! and a record with `held` saying why marks them. While a user has a
//! held copy, their logins on this VM are refused, because a retrieve
//! would overwrite the held bytes; `preserved push` or `preserved delete`
//! resolves it.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uve_protocol::message::{ErrorCode, UpdateCause, Version, WireError};
use uve_protocol::names::{SessionId, UserName};

use crate::base::fsutil;

/// One preserved copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreservedCopy {
    /// Its id (16 hex digits), used by the `preserved` verbs.
    pub id: String,
    /// Whose UIF.
    pub user: UserName,
    /// The session whose update was refused.
    pub session: SessionId,
    /// Why the update was made.
    pub cause: UpdateCause,
    /// The version it was based on.
    pub base: Option<Version>,
    /// The host's error code.
    pub code: ErrorCode,
    /// The host's message.
    pub reason: String,
    /// Size of the bytes, in bytes.
    pub size: u64,
    /// Where the bytes are now.
    pub bytes: PathBuf,
    /// The UIF path they were taken from.
    pub origin: PathBuf,
    /// When they were preserved (Unix ms).
    pub created: u64,
    /// Set when the copy did not fit the preserved area's budget: the
    /// bytes are held in place at `bytes` (the UIF path, or the home in
    /// directory mode, a directory) and this says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

impl PreservedCopy {
    /// One line for people: what, whose, why, where.
    pub fn describe(&self) -> String {
        let what = match &self.held {
            None => "preserved copy",
            Some(_) => "held copy",
        };
        let mut line = format!(
            "{what} {} of {}'s UIF ({}, from session {}) at {}; the host refused it: {:?}: {}",
            self.id,
            self.user,
            human_size(self.size),
            self.session,
            self.bytes.display(),
            self.code,
            self.reason
        );
        if let Some(why) = &self.held {
            line.push_str(&format!(
                "; held in place, not preserved ({why}): logins of {} on this VM are refused \
                 until root runs `uve-agent preserved push --id {}` (once the cause is fixed) \
                 or `preserved delete --id {}` (discarding these bytes)",
                self.user, self.id, self.id
            ));
        }
        line
    }
}

/// How many bytes the preserved area may hold (held copies count for
/// nothing: their bytes are where they would be anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// All copies together.
    pub all: u64,
    /// One user's copies together.
    pub per_user: u64,
}

impl Budget {
    /// The budget from the configured MiB (0: the default share of the
    /// state filesystem, `fs_size` bytes: half for all copies, a quarter
    /// for one user's).
    pub fn new(all_mib: u64, per_user_mib: u64, fs_size: u64) -> Budget {
        let or = |mib: u64, share: u64| {
            if mib == 0 {
                fs_size / share
            } else {
                mib.saturating_mul(1 << 20)
            }
        };
        Budget {
            all: or(all_mib, 2),
            per_user: or(per_user_mib, 4),
        }
    }
}

/// `n` bytes in binary units, e.g. `2.5 MiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// What is being preserved.
#[derive(Debug, Clone)]
pub struct Refused<'a> {
    /// Whose UIF.
    pub user: &'a UserName,
    /// The session whose update was refused.
    pub session: &'a SessionId,
    /// Why the update was made.
    pub cause: UpdateCause,
    /// Its base version.
    pub base: Option<Version>,
    /// The UIF file holding the bytes.
    pub file: &'a Path,
    /// The host's refusal.
    pub refusal: &'a WireError,
}

/// The preserved area of the state directory.
#[derive(Debug, Clone)]
pub struct Preserved {
    dir: PathBuf,
}

impl Preserved {
    /// The area under `state_dir`.
    pub fn new(state_dir: &Path) -> Preserved {
        Preserved {
            dir: state_dir.join("preserved"),
        }
    }

    /// Why `size` more bytes of `user` do not fit `budget`, or `None`
    /// when they do.
    pub fn no_room(&self, user: &str, size: u64, budget: Budget) -> Option<String> {
        let kept = self.list();
        let sum = |mine: bool| -> u64 {
            kept.iter()
                .filter(|c| c.held.is_none() && (!mine || c.user == user))
                .map(|c| c.size)
                .sum()
        };
        let (all, theirs) = (sum(false), sum(true));
        if theirs.saturating_add(size) > budget.per_user {
            Some(format!(
                "{user}'s preserved copies hold {} and this one is {}: over one user's share of \
                 {} (preserved_per_user_mib)",
                human_size(theirs),
                human_size(size),
                human_size(budget.per_user)
            ))
        } else if all.saturating_add(size) > budget.all {
            Some(format!(
                "the preserved copies on this VM hold {} and this one is {}: over their budget \
                 of {} (preserved_mib)",
                human_size(all),
                human_size(size),
                human_size(budget.all)
            ))
        } else {
            None
        }
    }

    /// `user`'s copy held in place, if any (their logins must not
    /// retrieve over it, nothing may evict it). Fails closed: an error
    /// when the area cannot be listed (an unreadable record is skipped
    /// with a warning: whose it is cannot be told).
    pub fn held_for(&self, user: &str) -> io::Result<Option<PreservedCopy>> {
        Ok(self.held()?.into_iter().find(|c| c.user == user))
    }

    /// Every copy held in place; an error when the area cannot be listed.
    pub fn held(&self) -> io::Result<Vec<PreservedCopy>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut held = Vec::new();
        for e in rd {
            let path = e?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match fsutil::read_json::<PreservedCopy>(&path) {
                Ok(Some(c)) if c.held.is_some() => held.push(c),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(record = %path.display(), "unreadable preserved record: {e}")
                }
            }
        }
        Ok(held)
    }

    /// Moves the refused update's file into the preserved area (see the
    /// module header for the order of writes) and returns its record.
    pub fn keep(&self, what: &Refused<'_>) -> io::Result<PreservedCopy> {
        let mut copy = self.record(what)?;
        let id = copy.id.clone();
        copy.bytes = self.dir.join(format!("{id}.uif"));
        fsutil::write_json(&self.record_path(&id), &copy)?;
        match std::fs::rename(what.file, &copy.bytes) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                copy.bytes = fsutil::sibling(what.file, &format!(".uve-preserved-{id}"));
                fsutil::write_json(&self.record_path(&id), &copy)?;
                std::fs::rename(what.file, &copy.bytes)?;
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.record_path(&id));
                return Err(e);
            }
        }
        fsutil::sync_parent(&copy.bytes)?;
        fsutil::sync_parent(what.file)?;
        tracing::warn!(
            user = %what.user,
            id,
            bytes = %copy.bytes.display(),
            size = copy.size,
            "update refused for good; its bytes are preserved"
        );
        Ok(copy)
    }

    /// Records, durably, the refused update as held in place at `at` (the
    /// UIF file itself, or the home the archive was packed from) because
    /// of `why`. An archive the home stands in for is the caller's to
    /// remove, after the spool entry (a crash between leaves the archive,
    /// never an entry without its file).
    pub fn hold(&self, what: &Refused<'_>, at: &Path, why: String) -> io::Result<PreservedCopy> {
        let mut copy = self.record(what)?;
        copy.bytes = at.to_path_buf();
        copy.held = Some(why);
        fsutil::write_json(&self.record_path(&copy.id), &copy)?;
        tracing::error!(
            user = %what.user,
            id = copy.id,
            bytes = %copy.bytes.display(),
            size = copy.size,
            why = copy.held.as_deref().unwrap_or_default(),
            "update refused for good and over the preserved area's budget: held in place; \
             the user's logins on this VM are refused until it is pushed or deleted"
        );
        Ok(copy)
    }

    /// A new record (not yet written) for `what`, with a fresh id.
    fn record(&self, what: &Refused<'_>) -> io::Result<PreservedCopy> {
        fsutil::ensure_dir(&self.dir)?;
        let id = format!("{:016x}", fsutil::random_u64());
        let size = std::fs::symlink_metadata(what.file)?.len();
        Ok(PreservedCopy {
            id,
            user: what.user.clone(),
            session: what.session.clone(),
            cause: what.cause,
            base: what.base,
            code: what.refusal.code,
            reason: what.refusal.message.clone(),
            size,
            bytes: PathBuf::new(),
            origin: what.file.to_path_buf(),
            created: fsutil::now_ms(),
            held: None,
        })
    }

    /// Every copy whose bytes exist, oldest first.
    pub fn list(&self) -> Vec<PreservedCopy> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<PreservedCopy> = rd
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| fsutil::read_json::<PreservedCopy>(&e.path()).ok().flatten())
            .filter(|c| {
                std::fs::symlink_metadata(&c.bytes)
                    .is_ok_and(|m| m.is_file() || (c.held.is_some() && m.is_dir()))
            })
            .collect();
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        out
    }

    /// Copies of one user.
    pub fn for_user(&self, user: &str) -> Vec<PreservedCopy> {
        self.list().into_iter().filter(|c| c.user == user).collect()
    }

    /// The copy `id`, if it exists.
    pub fn get(&self, id: &str) -> Option<PreservedCopy> {
        self.list().into_iter().find(|c| c.id == id)
    }

    /// Deletes copy `id`: its bytes, then its record. A held copy's bytes
    /// are the user's own UIF file or home: only its record goes (the
    /// user's next login retrieves over them).
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let copy = self
            .get(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such preserved copy"))?;
        if copy.held.is_none() {
            std::fs::remove_file(&copy.bytes)?;
            fsutil::sync_parent(&copy.bytes)?;
        }
        std::fs::remove_file(self.record_path(id))?;
        fsutil::sync_parent(&self.record_path(id))
    }

    /// Copies the bytes of copy `id` to a new file `to` (never replacing an
    /// existing one), durably. Returns the number of bytes.
    pub fn export(&self, id: &str, to: &Path) -> io::Result<u64> {
        let copy = self
            .get(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such preserved copy"))?;
        if !std::fs::symlink_metadata(&copy.bytes)?.is_file() {
            return Err(io::Error::other(format!(
                "copy {id} is held in place in the home {}: copy the files from there",
                copy.bytes.display()
            )));
        }
        let mut src = std::fs::File::open(&copy.bytes)?;
        let mut out = fsutil::create_private(to)?;
        let n = io::copy(&mut src, &mut out)?;
        fsutil::sync(&out)?;
        fsutil::sync_parent(to)?;
        Ok(n)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keep_moves_the_bytes_and_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let uif = dir.path().join("uif/alice.img");
        std::fs::create_dir_all(uif.parent().unwrap()).unwrap();
        std::fs::write(&uif, b"alice's work").unwrap();
        let p = Preserved::new(&state);
        let refusal = WireError::new(ErrorCode::QuotaExceeded, "over quota");
        let copy = p
            .keep(&Refused {
                user: &UserName::literal("alice"),
                session: &SessionId::literal("s1"),
                cause: UpdateCause::Logout,
                base: Some(3),
                file: &uif,
                refusal: &refusal,
            })
            .unwrap();
        assert!(!uif.exists(), "the UIF path is free for the next retrieve");
        assert_eq!(std::fs::read(&copy.bytes).unwrap(), b"alice's work");
        assert_eq!(copy.size, 12);
        assert_eq!(p.list(), vec![copy.clone()]);
        assert_eq!(p.for_user("bob"), Vec::new());
        let out = dir.path().join("export.img");
        assert_eq!(p.export(&copy.id, &out).unwrap(), 12);
        assert_eq!(std::fs::read(&out).unwrap(), b"alice's work");
        assert!(p.export(&copy.id, &out).is_err(), "never overwrites");
        p.remove(&copy.id).unwrap();
        assert!(p.list().is_empty());
        assert!(!copy.bytes.exists());
    }

    #[test]
    fn the_budget_bounds_each_user_and_all_and_held_copies_count_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = Preserved::new(&dir.path().join("state"));
        let refusal = WireError::new(ErrorCode::QuotaExceeded, "over quota");
        let keep = |user: &'static str, len: usize, held: bool| {
            let uif = dir.path().join(format!("{user}-{len}.img"));
            std::fs::write(&uif, vec![7u8; len]).unwrap();
            let what = Refused {
                user: &UserName::literal(user),
                session: &SessionId::literal("s"),
                cause: UpdateCause::Logout,
                base: None,
                file: &uif,
                refusal: &refusal,
            };
            if held {
                p.hold(&what, &uif, "test".into()).unwrap()
            } else {
                p.keep(&what).unwrap()
            }
        };
        let budget = Budget {
            all: 1000,
            per_user: 600,
        };
        keep("ann", 500, false);
        let why = p.no_room("ann", 101, budget).unwrap();
        assert!(why.contains("share"), "{why}");
        assert_eq!(p.no_room("ann", 100, budget), None);
        assert_eq!(p.no_room("bob", 500, budget), None);
        keep("bob", 450, false);
        let why = p.no_room("cyd", 51, budget).unwrap();
        assert!(why.contains("preserved_mib"), "{why}");
        // A held copy stays where it is: it takes no room of the area,
        // and deleting it drops the record only.
        let held = keep("cyd", 5000, true);
        assert_eq!(p.no_room("cyd", 50, budget), None);
        assert_eq!(p.held_for("cyd").unwrap(), Some(held.clone()));
        p.remove(&held.id).unwrap();
        assert!(held.bytes.exists(), "the user's bytes stay");
        assert_eq!(p.held_for("cyd").unwrap(), None);
        assert_eq!(
            Budget::new(0, 0, 4 << 30),
            Budget {
                all: 2 << 30,
                per_user: 1 << 30
            }
        );
        assert_eq!(Budget::new(3, 1, 4 << 30).per_user, 1 << 20);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(2_621_440), "2.5 MiB");
    }
}
