//! Making a retrieved UIF appear to the user and taking it back:
//! file mode runs the configured attach/detach hooks on the image (e.g. a
//! loop mount); directory mode unpacks the tar into the home directory and
//! repacks it at flush time honouring the exclude globs.
//!
//! Directory mode never follows a symlink and never acts on a path after
//! checking it, although the user (or a process of theirs left over after
//! logout) owns the home and can change it at any time:
//! - **unpack** goes into a fresh sibling `.<name>.uve-new` that root
//!   creates with mode 0700 and keeps owning until the archive is fully
//!   unpacked (fd-relative, ownership and modes set on descriptors, see
//!   [`crate::base::archive`]); only then is it chowned to the user and renamed
//!   in place of the home (the old one moved aside, locked — chowned to
//!   root, mode 0700 — then removed);
//! - **pack** runs in a child process with the privileges of the home's
//!   owner, watched without holding a thread (see [`super::home_pack`]).

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;

use super::UifError;
use crate::base::accounts::Account;
use crate::base::archive::{self, UnpackPolicy};
use crate::base::nofollow::{self, Kind};
use crate::config::{Config, UifMode};

/// Longest a hook may run.
const HOOK_LIMIT: Duration = Duration::from_secs(120);

/// Makes `user`'s UIF (already at `cfg.uif_path(user)`) available;
/// `account` is the user's entry in the user database, if it has one.
pub async fn attach(
    cfg: &Config,
    user: &str,
    account: Option<&Account>,
    session: &str,
    temporary: bool,
) -> Result<(), UifError> {
    match cfg.uif.mode {
        UifMode::File => run_hook(cfg, &cfg.uif.attach, user, session, temporary).await,
        UifMode::Directory => {
            let archive = cfg.uif_path(user);
            let home = cfg.home_path(user, account);
            let owner = cfg.owner(account);
            super::blocking(move || unpack_home(&archive, &home, owner)).await
        }
        UifMode::Disk => {
            let (disk, user) = (cfg.disk.clone(), user.to_string());
            let (image, home) = (cfg.uif_path(&user), cfg.home_path(&user, account));
            let owner = cfg.owner(account);
            super::blocking(move || super::disk_home::attach(&disk, &user, &image, &home, owner))
                .await
        }
    }
}

/// Takes `user`'s UIF back so its file is consistent: file mode runs the
/// detach hook (unless `keep_attached`, for checkpoints); directory mode
/// packs the home into the UIF file.
pub async fn detach(
    cfg: &Config,
    user: &str,
    account: Option<&Account>,
    session: &str,
    keep_attached: bool,
) -> Result<(), UifError> {
    match cfg.uif.mode {
        UifMode::File if keep_attached => Ok(()),
        UifMode::File => run_hook(cfg, &cfg.uif.detach, user, session, false).await,
        UifMode::Directory => {
            let archive = cfg.uif_path(user);
            let home = cfg.home_path(user, account);
            let excludes = cfg.uif.exclude.clone();
            let owner = cfg.owner(account);
            let floor = cfg.state_floor_mib << 20;
            super::home_pack::pack_home(user, home, archive, excludes, owner, floor).await
        }
        UifMode::Disk => {
            let (disk, user) = (cfg.disk.clone(), user.to_string());
            let (image, home) = (cfg.uif_path(&user), cfg.home_path(&user, account));
            let owner = cfg.owner(account);
            super::blocking(move || {
                super::disk_home::detach(&disk, &user, &image, &home, owner, keep_attached)
            })
            .await
        }
    }
}

/// After an agent restart within the same boot: takes up again what the
/// previous agent process served for `user` (disk mode: the profile
/// disk's device, whose home stayed mounted). Nothing in the other modes.
pub async fn reattach(cfg: &Config, user: &str) -> Result<(), UifError> {
    if cfg.uif.mode != UifMode::Disk {
        return Ok(());
    }
    let (user, image) = (user.to_string(), cfg.uif_path(user));
    super::blocking(move || super::disk_home::reattach(&user, &image).map(drop)).await
}

fn errno_at(what: &str, path: &Path) -> impl FnOnce(Errno) -> UifError {
    move |e| UifError::at(what, path, io::Error::from(e))
}

/// Refuses a home whose parent directory others could rearrange: it must
/// belong to root (or to us) and, if group- or world-writable, be sticky.
/// The renames of `.<name>.uve-new` and `.<name>.uve-old` rely on it.
fn check_home_parent(parent: &Path) -> Result<(), UifError> {
    let dir = nofollow::open_dir(parent).map_err(errno_at("open", parent))?;
    let st = nofollow::stat(dir.as_fd()).map_err(errno_at("stat", parent))?;
    let ours = st.st_uid == 0 || st.st_uid == nix::unistd::geteuid().as_raw();
    let shared = st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0;
    if ours && !shared {
        Ok(())
    } else {
        Err(UifError::at(
            "use home parent",
            parent,
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "must belong to root (or the agent's user) and not be writable by others unless sticky",
            ),
        ))
    }
}

/// Removes `path` (a leftover `.<name>.uve-new`, or a moved-aside home)
/// without following it. A directory is first locked (its top chowned to
/// root, mode 0700: the user's processes can no longer enter it) so a
/// leftover process of the user can hardly keep changing it while it is
/// removed; if removing still fails, the tree is renamed out of the way
/// (`<path>.<pid>-<nanos>`, with a warning) so the login goes on.
fn discard_tree(path: &Path) -> Result<(), UifError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return std::fs::remove_file(path).map_err(|e| UifError::at("remove", path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(UifError::at("stat", path, e)),
    }
    if let Ok(dir) = nofollow::open_dir(path) {
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        let _ = nofollow::chown_fd(dir.as_fd(), uid.as_raw(), gid.as_raw());
        let _ = nofollow::chmod_fd(dir.as_fd(), 0o700);
    }
    let mut last = None;
    for _ in 0..3 {
        match std::fs::remove_dir_all(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let trash = crate::base::fsutil::sibling(path, &format!(".{}-{nanos}", std::process::id()));
    tracing::warn!(
        path = %path.display(), trash = %trash.display(),
        error = %last.map(|e| e.to_string()).unwrap_or_default(),
        "cannot remove (changing under us?); moved aside"
    );
    std::fs::rename(path, &trash).map_err(|e| UifError::at("move aside", path, e))
}

/// Unpacks into `.<name>.uve-new` beside the home (root's, mode 0700, until it is whole;
/// then chowned to `owner`), then swaps it in place of `home`.
fn unpack_home(archive: &Path, home: &Path, owner: Option<(u32, u32)>) -> Result<(), UifError> {
    // Hidden names (`.alice.uve-new`): `bob.uve-old` is a valid user name,
    // whose home these must never be.
    let new = crate::base::fsutil::hidden_sibling(home, ".uve-new");
    let old = crate::base::fsutil::hidden_sibling(home, ".uve-old");
    if let Some(parent) = home.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| UifError::at("create", parent, e))?;
        check_home_parent(parent)?;
    }
    for leftover in [&new, &old] {
        discard_tree(leftover)?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&new)
        .map_err(|e| UifError::at("create", &new, e))?;
    let dir = nofollow::open_dir(&new).map_err(errno_at("open", &new))?;
    let st = nofollow::stat(dir.as_fd()).map_err(errno_at("stat", &new))?;
    if nofollow::kind(&st) != Kind::Dir || st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(UifError::at(
            "use",
            &new,
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not the directory we created",
            ),
        ));
    }
    let policy = UnpackPolicy {
        symlinks_anywhere: true,
        strict_types: false,
        owner,
    };
    let unpacked = nofollow::chmod_fd(dir.as_fd(), 0o700)
        .map_err(errno_at("chmod", &new))
        .and_then(|()| archive::unpack_into(archive, dir.as_fd(), policy).map_err(Into::into))
        .and_then(|_| match owner {
            // The user gets the tree only now that it is whole.
            Some((uid, gid)) => {
                nofollow::chown_fd(dir.as_fd(), uid, gid).map_err(errno_at("chown", &new))
            }
            None => Ok(()),
        });
    drop(dir);
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&new);
        return Err(e);
    }
    if std::fs::symlink_metadata(home).is_ok() {
        std::fs::rename(home, &old).map_err(|e| UifError::at("move aside", home, e))?;
    }
    std::fs::rename(&new, home).map_err(|e| UifError::at("move into place", home, e))?;
    if let Err(e) = discard_tree(&old) {
        tracing::warn!("previous home left behind: {e}");
    }
    Ok(())
}

/// Runs a hook argv with `{path}`, `{user}`, `{session}` substituted; the
/// same values are in `UVE_UIF_PATH`, `UVE_USER`, `UVE_SESSION`, plus
/// `UVE_UIF_TEMPORARY=1` for a temporary UIF. No hook configured = no-op.
async fn run_hook(
    cfg: &Config,
    argv: &[String],
    user: &str,
    session: &str,
    temporary: bool,
) -> Result<(), UifError> {
    let Some((prog, args)) = argv.split_first() else {
        return Ok(());
    };
    let path = cfg.uif_path(user);
    let subst = |s: &String| {
        s.replace("{path}", &path.to_string_lossy())
            .replace("{user}", user)
            .replace("{session}", session)
    };
    let mut cmd = tokio::process::Command::new(subst(prog));
    cmd.args(args.iter().map(subst))
        .env("UVE_UIF_PATH", &path)
        .env("UVE_USER", user)
        .env("UVE_SESSION", session)
        .env("UVE_UIF_TEMPORARY", if temporary { "1" } else { "0" })
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let status = tokio::time::timeout(HOOK_LIMIT, cmd.status())
        .await
        .map_err(|_| UifError::Hook(format!("{prog} did not finish within {HOOK_LIMIT:?}")))?
        .map_err(|e| UifError::Hook(format!("cannot run {prog}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(UifError::Hook(format!("{prog} exited with {status}")))
    }
}
