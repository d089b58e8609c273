//! Tar archives the agent reads and writes: home directories (directory
//! mode UIFs) and UA bundles.
//!
//! Unpacking never trusts the archive: only plain relative paths are
//! accepted (no `..`, no absolute paths), every entry is created relative
//! to its parent directory's descriptor, each parent opened from the root
//! one component at a time with `O_NOFOLLOW` (a symlink on the way is
//! refused, nothing is ever written through one), files are created fresh
//! (`O_EXCL`), ownership and modes are set on the opened descriptors
//! (`lchown` only for symlinks), setuid/setgid bits are dropped, and — for
//! UA bundles — links may not point outside the tree. Before any of that,
//! [`bounds`] refuses an archive whose headers would make the unpacker
//! allocate without bound (a long name or PAX header of a gigabyte).
//!
//! Packing walks the tree the same way ([`crate::base::nofollow`]): directories
//! are listed through their descriptors, every entry is `fstatat`ed
//! without following, a file is opened `O_NOFOLLOW` relative to its parent
//! and packed only if the opened file is the one that was listed (same
//! device, inode and type), a symlink is recorded as a symlink. A regular
//! file with several hard links is packed only if all of its links were
//! found in the walked tree (then once, its other names as tar hard links
//! at the end of the archive): a link into the home to a file outside it
//! never carries that file out. Entries that cannot be read or changed
//! while packing are skipped with a warning. Packing is deterministic
//! (sorted, no owner ids) so an unchanged home yields identical chunks.

mod bounds;
mod exclude;
mod pack;
mod unpack;

use std::io;

use nix::errno::Errno;

pub use exclude::{Excludes, PatternError};
#[cfg(test)]
use pack::pack;
pub use pack::pack_to;
pub use unpack::{UnpackPolicy, unpack, unpack_into};

/// Why an archive was refused or could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// An entry would escape the destination or is of a refused kind.
    #[error("unsafe archive entry {path:?}: {why}")]
    Unsafe {
        /// The entry's path as written in the archive.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Reading or writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(context: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ArchiveError {
    move |source| ArchiveError::Io {
        context: context.to_string(),
        source,
    }
}

fn errno_err(context: impl std::fmt::Display) -> impl FnOnce(Errno) -> ArchiveError {
    move |e| io_err(context)(io::Error::from(e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    /// How a user's home is unpacked (symlinks anywhere, specials skipped).
    const HOME_POLICY: UnpackPolicy = UnpackPolicy {
        symlinks_anywhere: true,
        strict_types: false,
        owner: None,
    };
    use std::path::Path;

    #[test]
    fn pack_unpack_round_trip() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("d/e")).unwrap();
        fs::write(src.path().join("d/e/f.txt"), b"hello").unwrap();
        fs::write(src.path().join("skip.tmp"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", src.path().join("ln")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let ar = out.path().join("a.tar");
        pack(src.path(), &ar, &["*.tmp".into()]).unwrap();
        let dst = out.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let policy = HOME_POLICY;
        unpack(&ar, &dst, policy).unwrap();
        assert_eq!(fs::read(dst.join("d/e/f.txt")).unwrap(), b"hello");
        assert!(!dst.join("skip.tmp").exists());
        assert_eq!(
            fs::read_link(dst.join("ln")).unwrap(),
            Path::new("/etc/hostname")
        );
        // determinism
        let ar2 = out.path().join("b.tar");
        pack(src.path(), &ar2, &["*.tmp".into()]).unwrap();
        assert_eq!(fs::read(&ar).unwrap(), fs::read(&ar2).unwrap());
        // strict policy refuses the outward symlink
        let dst2 = out.path().join("dst2");
        fs::create_dir(&dst2).unwrap();
        let strict = UnpackPolicy {
            symlinks_anywhere: false,
            strict_types: true,
            owner: None,
        };
        assert!(matches!(
            unpack(&ar, &dst2, strict),
            Err(ArchiveError::Unsafe { .. })
        ));
    }

    #[test]
    fn hard_links_are_packed_only_when_all_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        fs::create_dir_all(home.join("sub")).unwrap();
        // One link inside, one outside: never packed.
        let outside = tmp.path().join("outside-secret");
        fs::write(&outside, b"OUTSIDE-BYTES-4d2a").unwrap();
        fs::hard_link(&outside, home.join("stolen")).unwrap();
        // Two links, both inside: packed once, linked once.
        fs::write(home.join("a"), b"shared content").unwrap();
        fs::hard_link(home.join("a"), home.join("sub/b")).unwrap();
        fs::write(home.join("plain"), b"plain").unwrap();
        let ar = tmp.path().join("h.tar");
        pack(&home, &ar, &[]).unwrap();
        let bytes = fs::read(&ar).unwrap();
        assert!(
            !bytes.windows(18).any(|w| w == b"OUTSIDE-BYTES-4d2a"),
            "the outside file was packed"
        );
        let mut kinds = Vec::new();
        for e in tar::Archive::new(&bytes[..]).entries().unwrap() {
            let e = e.unwrap();
            kinds.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
            ));
        }
        assert!(!kinds.iter().any(|(p, _)| p == "stolen"), "{kinds:?}");
        let regular = |p: &str| kinds.contains(&(p.to_string(), tar::EntryType::Regular));
        let linked = |p: &str| kinds.contains(&(p.to_string(), tar::EntryType::Link));
        assert!(
            (regular("a") && linked("sub/b")) || (regular("sub/b") && linked("a")),
            "{kinds:?}"
        );
        assert!(regular("plain"), "{kinds:?}");
        // Round trip: one inode, two names, the content once.
        let dst = tmp.path().join("dst");
        fs::create_dir(&dst).unwrap();
        let policy = HOME_POLICY;
        unpack(&ar, &dst, policy).unwrap();
        assert_eq!(fs::read(dst.join("a")).unwrap(), b"shared content");
        assert_eq!(fs::read(dst.join("sub/b")).unwrap(), b"shared content");
        let (a, b) = (
            fs::metadata(dst.join("a")).unwrap(),
            fs::metadata(dst.join("sub/b")).unwrap(),
        );
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
        assert_eq!(a.nlink(), 2);
        assert!(!dst.join("stolen").exists());
        // Deterministic too.
        let ar2 = tmp.path().join("h2.tar");
        pack(&home, &ar2, &[]).unwrap();
        assert_eq!(bytes, fs::read(&ar2).unwrap());
    }

    fn raw(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"x"
            } else {
                b""
            };
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn home_policy_still_refuses_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let home = HOME_POLICY;
        let out = outside.to_str().unwrap().to_string();
        let cases: Vec<Vec<u8>> = vec![
            raw(&[("../escape", tar::EntryType::Regular, "")]),
            raw(&[("/abs", tar::EntryType::Regular, "")]),
            raw(&[
                ("ln", tar::EntryType::Symlink, out.as_str()),
                ("ln/pwned", tar::EntryType::Regular, ""),
            ]),
            raw(&[
                ("f", tar::EntryType::Regular, ""),
                ("hl", tar::EntryType::Link, "../../etc/passwd"),
            ]),
        ];
        for (i, ar) in cases.iter().enumerate() {
            let path = tmp.path().join(format!("{i}.tar"));
            fs::write(&path, ar).unwrap();
            let dst = tmp.path().join(format!("dst{i}"));
            fs::create_dir(&dst).unwrap();
            assert!(
                matches!(unpack(&path, &dst, home), Err(ArchiveError::Unsafe { .. })),
                "case {i}"
            );
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!tmp.path().join("escape").exists());
    }
}
