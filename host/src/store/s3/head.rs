//! The head object of each user and its compare-and-swap: how a commit
//! becomes a version on the shared store (see the parent's *Commit point*).

use std::time::Duration;

use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{CAS_ATTEMPTS, S3Store, remote};
use crate::store::{
    CommitOutcome, NewVersion, StoreError, StoreResult, UserEdit, UserState, quota,
};

/// A head object and the version tag to compare-and-swap against.
pub(super) struct Head {
    pub(super) state: UserState,
    pub(super) tag: Option<UpdateVersion>,
}

impl S3Store {
    pub(super) fn read_head(&self, user: &str) -> StoreResult<Head> {
        let key = self.head_key(user);
        let s3 = self.s3.clone();
        self.block_on(async move {
            match s3.get(&key).await {
                Ok(r) => {
                    let tag = UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    let bytes = r.bytes().await.map_err(|e| remote("read head object", e))?;
                    let state: UserState =
                        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                            path: key.to_string(),
                            why: e.to_string(),
                        })?;
                    Ok(Head {
                        state,
                        tag: Some(tag),
                    })
                }
                Err(object_store::Error::NotFound { .. }) => Ok(Head {
                    state: UserState {
                        next: 1,
                        ..UserState::default()
                    },
                    tag: None,
                }),
                Err(e) => Err(remote(format!("read {key}"), e)),
            }
        })
    }

    /// Writes the head object if it is still `prev`; `Ok(false)` if another
    /// writer got there first.
    fn write_head(
        &self,
        user: &str,
        state: &UserState,
        prev: Option<&UpdateVersion>,
    ) -> StoreResult<bool> {
        let key = self.head_key(user);
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Corrupt {
            path: key.to_string(),
            why: e.to_string(),
        })?;
        let mode = match prev {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion {
                e_tag: v.e_tag.as_deref().map(|t| self.if_match(t)),
                version: v.version.clone(),
            }),
        };
        let s3 = self.s3.clone();
        self.block_on(async move {
            match s3
                .put_opts(&key, PutPayload::from(bytes), PutOptions::from(mode))
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(remote(format!("write {key}"), e)),
            }
        })
    }

    /// Adds a version by compare-and-swap of the head object.
    pub(super) fn commit_cas(&self, new: &NewVersion<'_>) -> StoreResult<CommitOutcome> {
        new.check()?;
        let (user, manifest) = (new.user, new.manifest);
        // The manifest object is content-addressed: idempotent, and the PUT
        // makes it young for any GC that is looking at it.
        let digest = manifest.header.digest;
        let key = self.manifest_key(user, &digest);
        let bytes = postcard::to_stdvec(manifest).map_err(|e| StoreError::Corrupt {
            path: key.to_string(),
            why: e.to_string(),
        })?;
        let s3 = self.s3.clone();
        self.block_on(async move { s3.put(&key, PutPayload::from(bytes)).await })
            .map_err(|e| remote("write manifest", e))?;
        for attempt in 0..CAS_ATTEMPTS {
            let Head { mut state, tag } = self.read_head(user)?;
            let protected = self.referenced(user, &state)?;
            self.secure_chunks(manifest, &protected)?;
            if let Some(v) = state.redelivered(new) {
                return Ok(CommitOutcome::Redelivered(v));
            }
            let nonce = self.next_nonce();
            let (outcome, _) = state.add_version(&self.policy, new);
            let (CommitOutcome::Committed(v)
            | CommitOutcome::Redelivered(v)
            | CommitOutcome::Conflict { kept_as: v, .. }) = outcome;
            // Over the quota: refused before the head changes (manifests
            // are content-addressed; the one written above goes with GC).
            quota::fit(&self.policy, user, &mut state, v, manifest, |i| {
                self.load_manifest(user, &Self::version_digest(i)?)
            })?;
            state.writer = Some(nonce.clone());
            // A lost answer to a PUT that did land looks like a lost race:
            // the nonce is looked for at once, not after the back-off, since
            // another host's write in between would hide it and the version
            // would be added twice (one GET more per lost race; the next
            // attempt reads the head again after the back-off).
            let won = self.write_head(user, &state, tag.as_ref())?
                || self.read_head(user)?.state.writer.as_deref() == Some(nonce.as_str());
            if won {
                return Ok(outcome);
            }
            tracing::debug!(
                user,
                attempt,
                "head object changed under the commit; retrying"
            );
            std::thread::sleep(Duration::from_millis(5 + 10 * u64::from(attempt.min(10))));
        }
        Err(StoreError::Contended {
            user: user.to_string(),
            attempts: CAS_ATTEMPTS,
        })
    }

    /// Applies an operator's edit by compare-and-swap of the head object
    /// (a deleted version's manifest and chunks go with GC).
    pub(super) fn edit_cas(&self, user: &str, edit: UserEdit) -> StoreResult<()> {
        for attempt in 0..CAS_ATTEMPTS {
            let Head { mut state, tag } = self.read_head(user)?;
            edit.apply(user, &mut state)?;
            let nonce = self.next_nonce();
            state.writer = Some(nonce.clone());
            let won = self.write_head(user, &state, tag.as_ref())?
                || self.read_head(user)?.state.writer.as_deref() == Some(nonce.as_str());
            if won {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5 + 10 * u64::from(attempt.min(10))));
        }
        Err(StoreError::Contended {
            user: user.to_string(),
            attempts: CAS_ATTEMPTS,
        })
    }
}
