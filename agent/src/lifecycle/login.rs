//! Login: retrieve (after delivering any pending update of the user),
//! attach, record the session, start its UA if asked, announce it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uve_protocol::message::{Request, Version};
use uve_protocol::names::{SessionId, UaName, UserName};

use super::{Lifecycle, LifecycleError};
use crate::base::accounts::{self, Account, LookupError};
use crate::base::fsutil;
use crate::config::{Config, RetrieveFailure};
use crate::stores::cache;
use crate::stores::session::{SessionRecord, UaProcess, UifRecord, UserGuard};
use crate::uif::{UifError, blocking, materialise, retrieve, uif_err};

/// Pause before retrying an interrupted retrieve.
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// What a login did, for programs (the control answer's `login`) and, as
/// its `Display`, for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginReport {
    /// The user.
    pub user: UserName,
    /// The session.
    pub session: SessionId,
    /// How the user's UIF came to be attached.
    pub uif: Attached,
    /// Preserved copies of the user's refused updates on this VM, one line
    /// each (their `describe`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preserved: Vec<String>,
}

/// How a login found or made the user's UIF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Attached {
    /// The session was open already (a repeated login): nothing done.
    SessionAlreadyOpen,
    /// Another session of the user has the UIF attached.
    AlreadyAttached,
    /// The head version was retrieved.
    Retrieved {
        /// The version.
        version: Version,
        /// Chunks fetched from the host.
        fetched: usize,
        /// Chunks reused from the file already there.
        reused: usize,
        /// The file was patched in place rather than rewritten.
        patched: bool,
        /// The previous VM did not release the user in time: the head may
        /// miss its last changes.
        handover_timed_out: bool,
    },
    /// The user has no version yet: an empty UIF.
    NewUser,
    /// The retrieve failed and the session runs on an empty TEMPORARY UIF
    /// (`on_retrieve_failure = "temporary"`), which can only ever become a
    /// conflict version.
    Temporary {
        /// Why the retrieve failed.
        reason: String,
    },
}

impl std::fmt::Display for LoginReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.uif {
            Attached::SessionAlreadyOpen => {
                write!(f, "session {} is already open", self.session)?;
            }
            Attached::AlreadyAttached => write!(f, "UIF of {} already attached", self.user)?,
            Attached::Retrieved {
                version,
                fetched,
                reused,
                patched,
                handover_timed_out,
            } => {
                write!(
                    f,
                    "retrieved version {version} ({fetched} chunks fetched, {reused} reused{})",
                    if *patched { ", patched in place" } else { "" }
                )?;
                if *handover_timed_out {
                    f.write_str("; hand-over from the previous VM timed out")?;
                }
            }
            Attached::NewUser => f.write_str("new user: empty UIF")?,
            Attached::Temporary { reason } => write!(
                f,
                "retrieve failed ({reason}); running on an empty TEMPORARY UIF"
            )?,
        }
        if !self.preserved.is_empty() {
            write!(
                f,
                "; NOTE: {} earlier update(s) of {} were refused by the host and are preserved on this VM (root: `uve-agent preserved list`): {}",
                self.preserved.len(),
                self.user,
                self.preserved.join("; ")
            )?;
        }
        Ok(())
    }
}

impl Lifecycle {
    /// Opens a session for the user `spelling` names (as typed at the
    /// login prompt or as the directory spells it, `CORP\alice`):
    /// identifies the user ([`Self::identify`]), retrieves and attaches
    /// their UIF unless another session of theirs already has it, starts
    /// the UA if asked, announces the session.
    pub async fn login(
        &self,
        spelling: &str,
        session: &SessionId,
        ua: Option<&UaName>,
    ) -> Result<LoginReport, LifecycleError> {
        let (user, account) = self.identify(spelling).await?;
        let user = &user;
        if let Some(ua) = ua
            && self.uas.current(ua).is_none()
        {
            return Err(LifecycleError::UaNotDeployed(ua.to_string()));
        }
        let guard = self.locks.lock(user).await;
        if let Some(existing) = self.table.session(session) {
            return if existing.user == *user {
                Ok(LoginReport {
                    user: user.clone(),
                    session: session.clone(),
                    uif: Attached::SessionAlreadyOpen,
                    preserved: Vec::new(),
                })
            } else {
                Err(LifecycleError::SessionTaken(session.to_string()))
            };
        }
        let attached_now = self.table.uif(user).is_none();
        let uif = self.attach(&guard, account, session).await?;
        let record = SessionRecord {
            session: session.clone(),
            user: user.clone(),
            ua: ua.cloned(),
            started: fsutil::now_ms(),
            ua_process: None,
            ending: false,
        };
        if let Err(e) = self.table.open(&guard, record.clone()).await {
            // Nothing of this login is left recorded: the session is not
            // open, and a UIF it attached is not (its files stay where
            // they are; the next login retrieves again).
            let _ = self.table.end(&guard, session).await;
            if attached_now {
                let _ = self.table.detach(&guard).await;
            }
            return Err(e.into());
        }
        if let Some(ua) = ua
            && let Err(e) = self.start_ua(&guard, &record, ua).await
        {
            drop(guard);
            let _ = self.logout(session).await;
            return Err(e);
        }
        self.announce_start(&record).await;
        let report = LoginReport {
            user: user.clone(),
            session: session.clone(),
            uif,
            preserved: self
                .flusher
                .preserved()
                .for_user(user)
                .iter()
                .map(|c| c.describe())
                .collect(),
        };
        tracing::info!(%user, %session, "login: {report}");
        Ok(report)
    }

    /// Who `spelling` is: the user's store name and their entry in the
    /// user database. The entry's spelling (`pw_name`) is the canonical
    /// one, case-folded if `users.fold_case`, then made a name
    /// ([`UserName::from_directory`]). A user the database does not know
    /// keeps the spelling given, with no entry (file mode needs none); a
    /// database that cannot answer fails the login as transient.
    pub async fn identify(
        &self,
        spelling: &str,
    ) -> Result<(UserName, Option<Account>), LifecycleError> {
        let fold = self.config.get().users.fold_case;
        let asked = spelling.to_owned();
        let found = blocking(move || Ok(accounts::lookup(&asked)))
            .await
            .map_err(uif_err(spelling))?;
        match found {
            Ok(account) => Ok((
                UserName::from_directory(&account.name, fold)?,
                Some(account),
            )),
            Err(e @ LookupError::Unavailable { .. }) => Err(LifecycleError::Directory(e)),
            Err(e @ LookupError::Unknown { .. }) => {
                tracing::info!("{e}: no owner ids, groups or entry home for this login");
                Ok((UserName::from_directory(spelling, fold)?, None))
            }
        }
    }

    /// Attaches the user's UIF unless it already is.
    async fn attach(
        &self,
        guard: &UserGuard,
        account: Option<Account>,
        session: &SessionId,
    ) -> Result<Attached, LifecycleError> {
        let user = guard.user();
        if self.table.uif(user).is_some() {
            return Ok(Attached::AlreadyAttached);
        }
        self.refuse_if_held(user).await?;
        let cfg = self.config.get();
        self.make_room_for_disk(guard, &cfg)
            .await
            .map_err(uif_err(user))?;
        let (mut rec, attached) = self.obtain_uif(guard, &cfg, session).await?;
        rec.account = account;
        materialise::attach(&cfg, user, rec.account.as_ref(), session, rec.temporary)
            .await
            .map_err(uif_err(user))?;
        if let Err(e) = self.table.attach(guard, rec).await {
            // Not recorded as attached, in memory either: the login fails.
            let _ = self.table.detach(guard).await;
            return Err(e.into());
        }
        Ok(attached)
    }

    async fn start_ua(
        &self,
        guard: &UserGuard,
        record: &SessionRecord,
        ua: &UaName,
    ) -> Result<(), LifecycleError> {
        let socket = self.config.get().control_socket.clone();
        let account = self.table.uif(guard.user()).and_then(|r| r.account);
        let started = self
            .supervisor
            .start(&self.uas, &socket, record, account.as_ref(), ua)?;
        if let Some(start) = started.start {
            let process = UaProcess {
                pid: started.pid,
                start,
            };
            if self
                .table
                .set_ua_process(guard, &record.session, process)
                .await
                .is_err()
            {
                tracing::warn!(session = %record.session, "the UA runs and is supervised, but an agent restarted before the table is written cannot watch it");
            }
        }
        Ok(())
    }

    async fn announce_start(&self, record: &SessionRecord) {
        if let Some(c) = self.link.current() {
            let req = Request::SessionStarted {
                session: record.session.clone(),
                user: record.user.clone(),
                ua: record.ua.clone(),
            };
            if let Err(e) = c.link.request(req).await {
                tracing::warn!(
                    session = %record.session,
                    "SessionStarted not delivered (announced again shortly): {e}"
                );
                self.announce_again();
            }
        }
    }

    /// Fails the login when `user` has a refused update held in place: it
    /// sits where the retrieve (or a temporary UIF, or an unpack) would
    /// write. Fails closed when the preserved area cannot be read.
    async fn refuse_if_held(&self, user: &UserName) -> Result<(), LifecycleError> {
        let (preserved, u) = (self.flusher.preserved().clone(), user.to_string());
        let held = blocking(move || {
            preserved
                .held_for(&u)
                .map_err(|e| UifError::io("read the preserved records", e))
        })
        .await
        .map_err(uif_err(user))?;
        match held {
            Some(h) => Err(LifecycleError::Held(h.describe())),
            None => Ok(()),
        }
    }

    /// Retrieves the user's UIF (delivering any pending update of theirs
    /// first), or falls back to an empty temporary UIF if configured.
    async fn obtain_uif(
        &self,
        guard: &UserGuard,
        cfg: &Config,
        session: &SessionId,
    ) -> Result<(UifRecord, Attached), LifecycleError> {
        let user = guard.user();
        let dest = cfg.uif_path(user);
        match self.retrieve(guard, cfg, session, &dest).await? {
            Ok(r) => {
                let summary = match r.base {
                    Some(version) => Attached::Retrieved {
                        version,
                        fetched: r.fetched,
                        reused: r.reused,
                        patched: r.patched,
                        handover_timed_out: r.handover_timed_out,
                    },
                    None => Attached::NewUser,
                };
                let rec = UifRecord {
                    base: r.base,
                    lease: r.lease,
                    temporary: false,
                    base_digest: Some(r.digest),
                    account: None,
                };
                Ok((rec, summary))
            }
            Err(e)
                if cfg.on_retrieve_failure == RetrieveFailure::Temporary
                    && self.flusher.spooled_for(user) == 0 =>
            {
                self.refuse_if_held(user).await?;
                tracing::error!(%user, "retrieve failed, continuing on a temporary UIF: {e}");
                let (d2, state_dir, u2) = (dest.clone(), self.state_dir.clone(), user.to_string());
                blocking(move || {
                    retrieve::write_empty(&d2)?;
                    cache::forget(&state_dir, &u2);
                    Ok(())
                })
                .await
                .map_err(uif_err(user))?;
                let rec = UifRecord {
                    base: None,
                    lease: 0,
                    temporary: true,
                    base_digest: None,
                    account: None,
                };
                Ok((
                    rec,
                    Attached::Temporary {
                        reason: e.to_string(),
                    },
                ))
            }
            Err(e) => Err(uif_err(user)(e).into()),
        }
    }

    /// Retrieves into `dest`. A connection that drops (or a busy host)
    /// during the login is retried until the login timeout, so a host
    /// restart does not fail logins. The outer error: an earlier update
    /// of the user is still pending (nothing may overwrite its file).
    async fn retrieve(
        &self,
        guard: &UserGuard,
        cfg: &Config,
        session: &SessionId,
        dest: &std::path::Path,
    ) -> Result<Result<retrieve::Retrieved, UifError>, LifecycleError> {
        let user = guard.user();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.login_timeout_secs);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(c) = self.link.wait(left).await else {
                return Ok(Err(UifError::NotConnected));
            };
            let _ = self.flusher.deliver_user_spool(guard, &c).await;
            // Delivering may have ended in a refusal held in place.
            self.refuse_if_held(user).await?;
            let retry_possible = tokio::time::Instant::now() + RETRY_PAUSE < deadline;
            if self.flusher.spooled_for(user) > 0 {
                if c.link.is_closed() && retry_possible {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                return Err(LifecycleError::PendingUpdate(user.to_string()));
            }
            let parallel = cfg
                .fetch_parallel
                .min(
                    usize::try_from(c.welcome.limits.max_inflight)
                        .unwrap_or(1)
                        .saturating_sub(2),
                )
                .max(1);
            let got =
                retrieve::retrieve(&c.link, &self.state_dir, user, session, dest, parallel).await;
            match got {
                Err(e) if e.is_transient() && retry_possible => {
                    tracing::warn!(%user, "retrieve interrupted, retrying: {e}");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return Ok(other),
            }
        }
    }
}
