//! Making a retrieved UIF appear to the user and taking it back:
//! file mode runs the configured attach/detach hooks on the image (e.g. a
//! loop mount); directory mode unpacks the tar into the home directory
//! (fresh sibling directory, then swapped in) with the user's ownership, and
//! repacks it at flush time honouring the exclude globs.

use std::path::Path;
use std::time::Duration;

use super::UifError;
use crate::archive::{self, UnpackPolicy};
use crate::config::{Config, UifMode};

/// Longest a hook may run.
const HOOK_LIMIT: Duration = Duration::from_secs(120);

/// Makes `user`'s UIF (already at `cfg.uif_path(user)`) available.
pub async fn attach(
    cfg: &Config,
    user: &str,
    session: &str,
    temporary: bool,
) -> Result<(), UifError> {
    match cfg.uif.mode {
        UifMode::File => run_hook(cfg, &cfg.uif.attach, user, session, temporary).await,
        UifMode::Directory => {
            let archive = cfg.uif_path(user);
            let home = cfg.home_path(user);
            let owner = owner_of(cfg, user);
            super::blocking(move || unpack_home(&archive, &home, owner)).await
        }
    }
}

/// Takes `user`'s UIF back so its file is consistent: file mode runs the
/// detach hook (unless `keep_attached`, for checkpoints); directory mode
/// packs the home into the UIF file.
pub async fn detach(
    cfg: &Config,
    user: &str,
    session: &str,
    keep_attached: bool,
) -> Result<(), UifError> {
    match cfg.uif.mode {
        UifMode::File if keep_attached => Ok(()),
        UifMode::File => run_hook(cfg, &cfg.uif.detach, user, session, false).await,
        UifMode::Directory => {
            let archive = cfg.uif_path(user);
            let home = cfg.home_path(user);
            let excludes = cfg.uif.exclude.clone();
            super::blocking(move || pack_home(&home, &archive, &excludes)).await
        }
    }
}

fn owner_of(cfg: &Config, user: &str) -> Option<(u32, u32)> {
    match cfg.owner_override() {
        Ok(Some(ids)) => Some(ids),
        _ => crate::passwd::lookup(user).map(|p| (p.uid, p.gid)),
    }
}

/// Unpacks into `<home>.uve-new`, then swaps it in place of `home`.
fn unpack_home(archive: &Path, home: &Path, owner: Option<(u32, u32)>) -> Result<(), UifError> {
    use std::os::unix::fs::PermissionsExt;
    let new = crate::fsutil::sibling(home, ".uve-new");
    let old = crate::fsutil::sibling(home, ".uve-old");
    for leftover in [&new, &old] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover).map_err(|e| UifError::at("remove", leftover, e))?;
        }
    }
    if let Some(parent) = home.parent() {
        std::fs::create_dir_all(parent).map_err(|e| UifError::at("create", parent, e))?;
    }
    std::fs::create_dir(&new).map_err(|e| UifError::at("create", &new, e))?;
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| UifError::at("chmod", &new, e))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(&new, Some(uid), Some(gid))
            .map_err(|e| UifError::at("chown", &new, e))?;
    }
    let policy = UnpackPolicy {
        symlinks_anywhere: true,
        strict_types: false,
        owner,
    };
    if let Err(e) = archive::unpack(archive, &new, policy) {
        let _ = std::fs::remove_dir_all(&new);
        return Err(e.into());
    }
    if std::fs::symlink_metadata(home).is_ok() {
        std::fs::rename(home, &old).map_err(|e| UifError::at("move aside", home, e))?;
    }
    std::fs::rename(&new, home).map_err(|e| UifError::at("move into place", home, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Packs `home` into `archive` (temp + rename, so the previous archive,
/// which is also the chunk cache, stays intact until the new one is whole).
fn pack_home(home: &Path, archive: &Path, excludes: &[String]) -> Result<(), UifError> {
    if let Some(dir) = archive.parent() {
        crate::fsutil::ensure_dir(dir).map_err(|e| UifError::at("create", dir, e))?;
    }
    let tmp = crate::fsutil::sibling(archive, ".uve-pack");
    if !home.is_dir() {
        return Err(UifError::at(
            "pack home",
            home,
            std::io::Error::new(std::io::ErrorKind::NotFound, "home directory is missing"),
        ));
    }
    archive::pack(home, &tmp, excludes)?;
    std::fs::rename(&tmp, archive).map_err(|e| UifError::at("rename", archive, e))?;
    crate::fsutil::sync_parent(archive).map_err(|e| UifError::at("fsync dir of", archive, e))
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

/// The `pack-home` child: packs `home` as a tar archive to stdout. Runs
/// with the privileges of the home's user (see [`detach`]).
pub fn pack_child(home: &Path, excludes: &[String]) -> anyhow::Result<()> {
    let _ = (home, excludes);
    anyhow::bail!("pack-home is not implemented yet")
}
