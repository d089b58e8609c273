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
}

impl PreservedCopy {
    /// One line for people: what, whose, why, where.
    pub fn describe(&self) -> String {
        format!(
            "preserved copy {} of {}'s UIF ({}, from session {}) at {}; the host refused it: {:?}: {}",
            self.id,
            self.user,
            human_size(self.size),
            self.session,
            self.bytes.display(),
            self.code,
            self.reason
        )
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

    /// Moves the refused update's file into the preserved area (see the
    /// module header for the order of writes) and returns its record.
    pub fn keep(&self, what: &Refused<'_>) -> io::Result<PreservedCopy> {
        fsutil::ensure_dir(&self.dir)?;
        let raw = fsutil::random_u64();
        let id = format!("{raw:016x}");
        let size = std::fs::symlink_metadata(what.file)?.len();
        let mut copy = PreservedCopy {
            id: id.clone(),
            user: what.user.clone(),
            session: what.session.clone(),
            cause: what.cause,
            base: what.base,
            code: what.refusal.code,
            reason: what.refusal.message.clone(),
            size,
            bytes: self.dir.join(format!("{id}.uif")),
            origin: what.file.to_path_buf(),
            created: fsutil::now_ms(),
        };
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
            size,
            "update refused for good; its bytes are preserved"
        );
        Ok(copy)
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
            .filter(|c| std::fs::symlink_metadata(&c.bytes).is_ok_and(|m| m.is_file()))
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

    /// Deletes copy `id`: its bytes, then its record.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let copy = self
            .get(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such preserved copy"))?;
        std::fs::remove_file(&copy.bytes)?;
        fsutil::sync_parent(&copy.bytes)?;
        std::fs::remove_file(self.record_path(id))?;
        fsutil::sync_parent(&self.record_path(id))
    }

    /// Copies the bytes of copy `id` to a new file `to` (never replacing an
    /// existing one), durably. Returns the number of bytes.
    pub fn export(&self, id: &str, to: &Path) -> io::Result<u64> {
        let copy = self
            .get(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such preserved copy"))?;
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
    fn human_sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(2_621_440), "2.5 MiB");
    }
}
