//! Preserved copies of refused updates, as root handles them through the
//! control socket: list, export, delete, and push to the host as a
//! conflict version once the operator fixed the cause.

use std::path::{Path, PathBuf};
use std::time::Duration;

use uve_protocol::message::{UpdateBegin, UpdateCause};

use super::{Lifecycle, LifecycleError};
use crate::config::UifMode;
use crate::flush::FlushOutcome;
use crate::stores::preserve::PreservedCopy;
use crate::uif::update::{self, UpdateOutcome};
use crate::uif::{UifError, blocking, home_pack, uif_err};

impl Lifecycle {
    /// Every preserved copy, oldest first.
    pub fn preserved(&self) -> Vec<PreservedCopy> {
        self.flusher.preserved().list()
    }

    /// Copies the bytes of preserved copy `id` to the new file `to`;
    /// returns their size.
    pub async fn export_preserved(&self, id: &str, to: &Path) -> Result<u64, UifError> {
        let (preserved, id2, to2) = (
            self.flusher.preserved().clone(),
            id.to_string(),
            to.to_path_buf(),
        );
        blocking(move || {
            preserved
                .export(&id2, &to2)
                .map_err(|e| UifError::io(format!("export preserved copy {id2}"), e))
        })
        .await
    }

    /// Deletes preserved copy `id`, bytes and record.
    pub async fn delete_preserved(&self, id: &str) -> Result<(), UifError> {
        let (preserved, id2) = (self.flusher.preserved().clone(), id.to_string());
        blocking(move || {
            preserved
                .remove(&id2)
                .map_err(|e| UifError::io(format!("delete preserved copy {id2}"), e))
        })
        .await
    }

    /// Sends preserved copy `id` to the host as a conflict version (base
    /// `None`, so it can never replace the user's head; a user without
    /// any version yet gets it as their first). Removes the copy once the
    /// host took it, unless `keep`. A refusal leaves the copy as it is.
    /// A copy held in place in a home (directory mode) is packed again
    /// first, as a logout would.
    pub async fn push_preserved(
        &self,
        id: &str,
        keep: bool,
    ) -> Result<FlushOutcome, LifecycleError> {
        let preserved = self.flusher.preserved();
        let copy = preserved
            .get(id)
            .ok_or_else(|| LifecycleError::NoSuchPreserved(id.into()))?;
        let user = copy.user.clone();
        let _guard = self.locks.lock(&user).await;
        let wait = Duration::from_secs(self.config.get().login_timeout_secs);
        let c = self
            .link
            .wait(wait)
            .await
            .ok_or_else(|| uif_err(&user)(UifError::NotConnected))?;
        let path = self.pushable(&copy).await?;
        let packed = path != copy.bytes;
        let params = self.config.get().chunk_params();
        let at = path.clone();
        let manifest = blocking(move || {
            uve_protocol::chunker::chunk_file_with(&at, params)
                .map_err(|e| UifError::at("chunk", &at, e))
        })
        .await
        .map_err(uif_err(&user))?;
        let begin = UpdateBegin {
            user: user.clone(),
            session: copy.session.clone(),
            base: None,
            lease: 0,
            header: manifest.header,
            cause: UpdateCause::Spooled,
        };
        let outcome = update::upload(&c.link, &path, &manifest, begin, None)
            .await
            .map_err(uif_err(&user))?;
        let outcome = match outcome {
            UpdateOutcome::Committed(v) => FlushOutcome::Committed(v),
            UpdateOutcome::Conflict { kept_as, head } => FlushOutcome::Conflict { kept_as, head },
        };
        tracing::info!(%user, id, "preserved copy pushed: {outcome}");
        if packed {
            let _ = std::fs::remove_file(&path);
        }
        if !keep {
            let (preserved, id) = (preserved.clone(), id.to_string());
            blocking(move || {
                preserved
                    .remove(&id)
                    .map_err(|e| UifError::io(format!("remove preserved copy {id}"), e))
            })
            .await
            .map_err(uif_err(&user))?;
        }
        Ok(outcome)
    }

    /// The file to send for `copy`: its bytes, or for a copy held in place
    /// in a home, that home packed into the user's archive path.
    async fn pushable(&self, copy: &PreservedCopy) -> Result<PathBuf, LifecycleError> {
        let held_home =
            copy.held.is_some() && std::fs::symlink_metadata(&copy.bytes).is_ok_and(|m| m.is_dir());
        if !held_home {
            return Ok(copy.bytes.clone());
        }
        let user = &copy.user;
        let cfg = self.config.get();
        if cfg.uif.mode != UifMode::Directory {
            return Err(uif_err(user)(UifError::io(
                format!("push held copy {}", copy.id),
                std::io::Error::other(format!(
                    "it is held in the home {}, but uif.mode is no longer \"directory\": copy the files from there",
                    copy.bytes.display()
                )),
            ))
            .into());
        }
        // The home held, as the pack at logout ran: as its owner.
        let (_, account) = self.identify(user).await?;
        let archive = cfg.uif_path(user);
        home_pack::pack_home(
            user,
            copy.bytes.clone(),
            archive.clone(),
            cfg.uif.exclude.clone(),
            cfg.owner(account.as_ref()),
            cfg.state_floor_mib << 20,
        )
        .await
        .map_err(uif_err(user))?;
        Ok(archive)
    }
}
