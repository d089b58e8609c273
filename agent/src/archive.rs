//! Tar archives the agent reads and writes: home directories (directory
//! mode UIFs) and UA bundles. Unpacking never trusts the archive: only
//! plain relative paths are accepted (no `..`, no absolute paths), nothing
//! is ever written through a symlink (every parent is checked with
//! `lstat`), files are created fresh (`O_EXCL`), setuid/setgid bits are
//! dropped, and — for UA bundles — links may not point outside the tree.
//! Packing is deterministic (sorted, no owner ids) so an unchanged home
//! yields identical chunks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

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

/// How strict unpacking is.
#[derive(Debug, Clone, Copy)]
pub struct UnpackPolicy {
    /// Symlinks may point anywhere (a user's home) instead of only inside
    /// the tree (a UA bundle).
    pub symlinks_anywhere: bool,
    /// Refuse devices and fifos instead of skipping them.
    pub strict_types: bool,
    /// Give every unpacked entry this owner.
    pub owner: Option<(u32, u32)>,
}

/// Checks an archive path: relative, only normal components.
fn clean_path(raw: &Path) -> Result<PathBuf, ArchiveError> {
    let shown = raw.to_string_lossy().into_owned();
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ArchiveError::Unsafe {
                    path: shown,
                    why: "contains `..`",
                });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ArchiveError::Unsafe {
                    path: shown,
                    why: "is absolute",
                });
            }
        }
    }
    Ok(out)
}

/// True if `target`, a symlink's target placed at `link` (relative to the
/// root), stays inside the root.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.parent().map_or(0, |p| p.components().count() as i64);
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::CurDir => {}
            _ => return false,
        }
    }
    true
}

/// Makes sure every ancestor of `rel` below `root` is a real directory (not
/// a symlink), creating missing ones.
fn prepare_parents(root: &Path, rel: &Path, policy: &UnpackPolicy) -> Result<(), ArchiveError> {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(ArchiveError::Unsafe {
                    path: rel.to_string_lossy().into_owned(),
                    why: "a parent is not a directory (symlink?)",
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(io_err(format!("mkdir {}", cur.display())))?;
                chown(&cur, policy)?;
            }
            Err(e) => return Err(io_err(format!("stat {}", cur.display()))(e)),
        }
    }
    Ok(())
}

fn chown(path: &Path, policy: &UnpackPolicy) -> Result<(), ArchiveError> {
    if let Some((uid, gid)) = policy.owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// Unpacks `archive` into `root` (an existing, empty directory).
pub fn unpack(archive: &Path, root: &Path, policy: UnpackPolicy) -> Result<u64, ArchiveError> {
    let file = File::open(archive).map_err(io_err(format!("open {}", archive.display())))?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        return Ok(0);
    }
    let mut ar = tar::Archive::new(file);
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut count = 0u64;
    for entry in ar.entries().map_err(io_err("read archive"))? {
        let mut entry = entry.map_err(io_err("read archive entry"))?;
        let raw = entry.path().map_err(io_err("entry path"))?.into_owned();
        let rel = clean_path(&raw)?;
        if rel.as_os_str().is_empty() {
            continue; // the root itself ("./")
        }
        let shown = || rel.to_string_lossy().into_owned();
        prepare_parents(root, &rel, &policy)?;
        let dst = root.join(&rel);
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o1777;
        match header.entry_type() {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&dst) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => {
                        return Err(ArchiveError::Unsafe {
                            path: shown(),
                            why: "directory over an existing non-directory",
                        });
                    }
                    Err(_) => {
                        fs::create_dir(&dst).map_err(io_err(format!("mkdir {}", dst.display())))?
                    }
                }
                chown(&dst, &policy)?;
                dirs.push((dst, mode));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dst)
                    .map_err(io_err(format!("create {}", dst.display())))?;
                io::copy(&mut entry, &mut out)
                    .map_err(io_err(format!("write {}", dst.display())))?;
                if let Ok(mtime) = header.mtime() {
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    let _ = out.set_modified(t);
                }
                drop(out);
                chown(&dst, &policy)?;
                fs::set_permissions(&dst, fs::Permissions::from_mode(mode))
                    .map_err(io_err(format!("chmod {}", dst.display())))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(io_err("link name"))?
                    .ok_or(ArchiveError::Unsafe {
                        path: shown(),
                        why: "symlink without target",
                    })?
                    .into_owned();
                if !policy.symlinks_anywhere && !link_stays_inside(&rel, &target) {
                    return Err(ArchiveError::Unsafe {
                        path: shown(),
                        why: "symlink points outside the archive",
                    });
                }
                std::os::unix::fs::symlink(&target, &dst)
                    .map_err(io_err(format!("symlink {}", dst.display())))?;
                chown(&dst, &policy)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(io_err("link name"))?
                    .ok_or(ArchiveError::Unsafe {
                        path: shown(),
                        why: "hard link without target",
                    })?
                    .into_owned();
                let src = root.join(clean_path(&target)?);
                prepare_parents(root, &clean_path(&target)?, &policy)?;
                match fs::symlink_metadata(&src) {
                    Ok(m) if m.file_type().is_file() => {}
                    _ => {
                        return Err(ArchiveError::Unsafe {
                            path: shown(),
                            why: "hard link to something not unpacked as a regular file",
                        });
                    }
                }
                fs::hard_link(&src, &dst).map_err(io_err(format!("link {}", dst.display())))?;
            }
            _ if policy.strict_types => {
                return Err(ArchiveError::Unsafe {
                    path: shown(),
                    why: "device, fifo or unknown entry type",
                });
            }
            other => {
                tracing::warn!(path = %shown(), ?other, "skipping special archive entry");
                continue;
            }
        }
        count += 1;
    }
    // Directory modes last (deepest first), so read-only directories did
    // not block unpacking their children.
    for (dir, mode) in dirs.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("chmod {}", dir.display())))?;
    }
    Ok(count)
}

/// Packs the tree under `root` into `out` (deterministically: sorted, no
/// owner ids), leaving out paths matching `excludes`.
pub fn pack(root: &Path, out: &Path, excludes: &[String]) -> Result<u64, ArchiveError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(io_err(format!("create {}", out.display())))?;
    let mut b = tar::Builder::new(io::BufWriter::new(file));
    b.follow_symlinks(false);
    let mut count = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err(format!("list {}", dir.display())))?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = rel.join(&name);
            if excluded(&path, excludes) {
                continue;
            }
            let full = root.join(&path);
            let meta =
                fs::symlink_metadata(&full).map_err(io_err(format!("stat {}", full.display())))?;
            let mut h = tar::Header::new_gnu();
            h.set_mode(meta.mode() & 0o7777);
            h.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
            h.set_uid(0);
            h.set_gid(0);
            let ft = meta.file_type();
            if ft.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, &path, io::empty())
                    .map_err(io_err("write archive"))?;
                subdirs.push(path);
            } else if ft.is_file() {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(meta.len());
                let f = File::open(&full).map_err(io_err(format!("open {}", full.display())))?;
                b.append_data(&mut h, &path, f.take(meta.len()))
                    .map_err(io_err("write archive"))?;
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&full).map_err(io_err(format!("readlink {}", full.display())))?;
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &path, &target)
                    .map_err(io_err("write archive"))?;
            } else {
                continue; // sockets, fifos, devices: not part of a home
            }
            count += 1;
        }
        // Depth-first in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    let w = b.into_inner().map_err(io_err("finish archive"))?;
    let f = w
        .into_inner()
        .map_err(|e| io_err("flush archive")(e.into_error()))?;
    f.sync_all().map_err(io_err("fsync archive"))?;
    Ok(count)
}

/// True if `path` (relative) matches one of the glob patterns. A pattern
/// without `/` matches any single component (like `.gitignore`); with `/`
/// it matches the whole relative path. `*` and `?` stay within a
/// component, `**` crosses them.
pub fn excluded(path: &Path, patterns: &[String]) -> bool {
    let full = path.to_string_lossy();
    patterns.iter().any(|p| {
        let p = p.trim_start_matches("./").trim_end_matches('/');
        if p.contains('/') {
            glob(p.as_bytes(), full.as_bytes())
        } else {
            path.components()
                .any(|c| glob(p.as_bytes(), c.as_os_str().to_string_lossy().as_bytes()))
        }
    })
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') if p.get(1) == Some(&b'*') => {
            let rest = p.get(2..).unwrap_or_default();
            let rest = rest.strip_prefix(b"/").unwrap_or(rest);
            (0..=s.len()).any(|i| glob(rest, s.get(i..).unwrap_or_default()))
        }
        Some(b'*') => {
            let rest = p.get(1..).unwrap_or_default();
            (0..=s.len())
                .take_while(|&i| i == 0 || s.get(i - 1) != Some(&b'/'))
                .any(|i| glob(rest, s.get(i..).unwrap_or_default()))
        }
        Some(b'?') => {
            matches!(s.first(), Some(c) if *c != b'/')
                && glob(
                    p.get(1..).unwrap_or_default(),
                    s.get(1..).unwrap_or_default(),
                )
        }
        Some(c) => {
            s.first() == Some(c)
                && glob(
                    p.get(1..).unwrap_or_default(),
                    s.get(1..).unwrap_or_default(),
                )
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
    fn link_escape_detection() {
        assert!(link_stays_inside(Path::new("a/l"), Path::new("../b")));
        assert!(!link_stays_inside(Path::new("a/l"), Path::new("../../b")));
        assert!(!link_stays_inside(Path::new("l"), Path::new("/etc/passwd")));
        assert!(link_stays_inside(Path::new("l"), Path::new("x/y")));
    }

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
        let policy = UnpackPolicy {
            symlinks_anywhere: true,
            strict_types: false,
            owner: None,
        };
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
        let home = UnpackPolicy {
            symlinks_anywhere: true,
            strict_types: false,
            owner: None,
        };
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
