//! The per-user quota over what a user holds: the unique bytes of the
//! user's retained versions, each chunk counted once however many
//! versions share it (so dedup and sparse zero ranges cost what they
//! occupy, not their logical size).
//!
//! Two kinds of bound, so that a writer without the user's lease can never
//! cause the lease holder's logout to be refused:
//!
//! - **The quota** (`quota_bytes`, or the user's override kept in the
//!   store's per-user state) counts the committed line: head and history.
//!   The host adds the user's own uploads in flight while they stage
//!   (`budgets::quota_charges`).
//! - **Conflict versions** count against a bound of their own *per origin*
//!   (`conflict_quota_bytes`, by default the user's quota): past it the
//!   *conflict* is refused, and nothing else is touched.
//!
//! Both stores apply [`fit`] when a version is added, after the retention
//! policy has pruned (history beyond `history_keep` goes first). A new head
//! over the quota is refused (`QuotaExceeded`) unless `quota_prunes_history`
//! is set, which drops the oldest history (never the new head) until it
//! fits. The host checks the same bound while an upload's pages arrive
//! ([`QuotaBase`]), so a refusal comes before the bytes are sent.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uve_protocol::manifest::{ChunkRef, Hash, Manifest};
use uve_protocol::message::Version;

use super::{StoreError, StorePolicy, StoreResult, UserState, VersionInfo, VersionKind, now_ms};

/// Which bound a new version is charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    /// The committed line (head and history): the user's quota.
    Head,
    /// Conflict versions of one origin (`vm:<id>`): their own bound.
    Conflict {
        /// The writer.
        origin: String,
    },
}

impl Charge {
    fn counts(&self, v: &VersionInfo) -> bool {
        match self {
            Charge::Head => v.kind == VersionKind::Committed,
            Charge::Conflict { origin } => v.kind == VersionKind::Conflict && v.origin == *origin,
        }
    }
}

/// The user's effective quota: the override in the store's state, else
/// the policy's.
pub(crate) fn quota_of(policy: &StorePolicy, state: &UserState) -> u64 {
    state.quota_bytes.unwrap_or(policy.quota_bytes)
}

/// The bound `charge` is held to.
pub(crate) fn bound_of(policy: &StorePolicy, state: &UserState, charge: &Charge) -> u64 {
    match charge {
        Charge::Head => quota_of(policy, state),
        Charge::Conflict { .. } => policy
            .conflict_quota_bytes
            .unwrap_or_else(|| quota_of(policy, state)),
    }
}

/// What a new version of a user will be counted with: the bound, and the
/// retained versions that will share it once the retention policy has made
/// room for the new one. The host takes it at `UpdateBegin` and adds each
/// page's new chunks ([`Tally`]).
#[derive(Debug, Clone)]
pub struct QuotaBase {
    /// The bound (the user's quota, or the per-origin conflict bound).
    pub bound: u64,
    /// The retained versions counted with the new one.
    pub counted: Vec<VersionInfo>,
    /// Whether the oldest history may be dropped to make room (then only
    /// the new version itself must fit).
    pub prunable: bool,
}

impl QuotaBase {
    /// The base for a new version of `charge` against `state`.
    pub(crate) fn of(policy: &StorePolicy, state: &UserState, charge: &Charge) -> QuotaBase {
        let mut after = UserState {
            head: state.head,
            next: state.next,
            versions: state.versions.clone(),
            writer: None,
            quota_bytes: state.quota_bytes,
        };
        // The new version as retention will see it (its manifest is not
        // needed to prune).
        let placeholder = after.next.max(1);
        let (kind, origin) = match charge {
            Charge::Head => (VersionKind::Committed, String::new()),
            Charge::Conflict { origin } => (VersionKind::Conflict, origin.clone()),
        };
        after.versions.push(VersionInfo {
            version: placeholder,
            kind,
            created_ms: now_ms(),
            size: 0,
            digest: String::new(),
            chunk_count: 0,
            base: None,
            origin,
        });
        if kind == VersionKind::Committed {
            after.head = Some(placeholder);
        }
        super::prune(policy, &mut after);
        QuotaBase {
            bound: bound_of(policy, state, charge),
            counted: after
                .versions
                .into_iter()
                .filter(|v| v.version != placeholder && charge.counts(v))
                .collect(),
            prunable: *charge == Charge::Head && policy.quota_prunes_history,
        }
    }

    /// The sum of the counted versions' logical sizes: an upper bound of
    /// their unique bytes, so a new version of `size` that fits with it
    /// needs no manifest read at all.
    pub fn logical(&self) -> u64 {
        self.counted
            .iter()
            .map(|v| v.size)
            .fold(0, u64::saturating_add)
    }

    /// True if a new version of logical `size` fits whatever its chunks.
    pub fn fits_blind(&self, size: u64) -> bool {
        let others = if self.prunable { 0 } else { self.logical() };
        others.saturating_add(size) <= self.bound
    }
}

/// Unique bytes of a set of versions, each chunk counted once, with
/// reference counts so a version can be taken out again.
#[derive(Debug, Default)]
pub struct Tally {
    refs: HashMap<Hash, (u32, u64)>,
    bytes: u64,
}

impl Tally {
    /// Unique bytes counted.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// True if the chunk is counted already.
    pub fn holds(&self, hash: &Hash) -> bool {
        self.refs.contains_key(hash)
    }

    /// Counts `chunks`; returns the bytes they added (chunks new to it).
    pub fn add(&mut self, chunks: &[ChunkRef]) -> u64 {
        let before = self.bytes;
        for c in chunks {
            let e = self.refs.entry(c.hash).or_insert((c.len, 0));
            if e.1 == 0 {
                self.bytes += u64::from(e.0);
            }
            e.1 += 1;
        }
        self.bytes - before
    }

    /// Takes `chunks` (once added) out again.
    pub fn remove(&mut self, chunks: &[ChunkRef]) {
        for c in chunks {
            if let Some(e) = self.refs.get_mut(&c.hash) {
                e.1 = e.1.saturating_sub(1);
                if e.1 == 0 {
                    self.bytes = self.bytes.saturating_sub(u64::from(e.0));
                    self.refs.remove(&c.hash);
                }
            }
        }
    }
}

/// The refusal of a version that does not fit `charge`'s bound.
pub fn exceeded(user: &str, charge: &Charge, held: u64, bound: u64) -> StoreError {
    StoreError::QuotaExceeded {
        user: user.to_string(),
        held,
        quota: bound,
        conflict_origin: match charge {
            Charge::Head => None,
            Charge::Conflict { origin } => Some(origin.clone()),
        },
    }
}

/// Makes `state` (to which version `new`, with manifest `manifest`, was
/// just added and the retention policy applied) fit its bound by unique
/// bytes. `load` reads a retained version's manifest (never called for
/// `new`). Returns the history pruned to make room (only with
/// `quota_prunes_history`), oldest first; `QuotaExceeded` if it does not
/// fit (then `state` must be discarded).
pub(crate) fn fit(
    policy: &StorePolicy,
    user: &str,
    state: &mut UserState,
    new: Version,
    manifest: &Manifest,
    mut load: impl FnMut(&VersionInfo) -> StoreResult<Arc<Manifest>>,
) -> StoreResult<Vec<Version>> {
    let charge = match state.versions.iter().find(|v| v.version == new) {
        Some(v) if v.kind == VersionKind::Conflict => Charge::Conflict {
            origin: v.origin.clone(),
        },
        _ => Charge::Head,
    };
    let bound = bound_of(policy, state, &charge);
    // Oldest first (the order versions are listed in).
    let counted: Vec<VersionInfo> = state
        .versions
        .iter()
        .filter(|v| v.version != new && charge.counts(v))
        .cloned()
        .collect();
    let logical = counted
        .iter()
        .map(|v| v.size)
        .fold(manifest.header.size, u64::saturating_add);
    if logical <= bound {
        return Ok(Vec::new());
    }
    let mut tally = Tally::default();
    tally.add(&manifest.chunks);
    let mut loaded = Vec::with_capacity(counted.len());
    for info in &counted {
        let m = load(info)?;
        tally.add(&m.chunks);
        loaded.push((info.version, m));
    }
    if tally.bytes() <= bound {
        return Ok(Vec::new());
    }
    if charge != Charge::Head || !policy.quota_prunes_history {
        return Err(exceeded(user, &charge, tally.bytes(), bound));
    }
    let mut pruned = Vec::new();
    for (v, m) in &loaded {
        if tally.bytes() <= bound {
            break;
        }
        tally.remove(&m.chunks);
        pruned.push(*v);
    }
    if tally.bytes() > bound {
        return Err(exceeded(user, &charge, tally.bytes(), bound));
    }
    state.versions.retain(|i| !pruned.contains(&i.version));
    tracing::info!(
        user,
        pruned = ?pruned,
        unique_bytes = tally.bytes(),
        quota = bound,
        "oldest history dropped to keep the user within the quota (quota_prunes_history)"
    );
    Ok(pruned)
}

/// What a user holds, for the operator (`GET /v1/users/{user}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdings {
    /// Unique bytes of head and history together.
    pub held_bytes: u64,
    /// The user's effective quota.
    pub quota_bytes: u64,
    /// The override kept for this user, if any.
    pub quota_override: Option<u64>,
    /// The bound of each origin's conflict versions.
    pub conflict_quota_bytes: u64,
    /// Unique bytes of each origin's conflict versions.
    pub conflicts: Vec<OriginHoldings>,
}

/// What one writer's conflict versions hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginHoldings {
    /// The writer (`vm:<id>`).
    pub origin: String,
    /// Its conflict versions.
    pub versions: usize,
    /// Their unique bytes together.
    pub held_bytes: u64,
}

/// Counts what `state`'s versions hold; `load` reads a manifest.
pub(crate) fn holdings(
    policy: &StorePolicy,
    state: &UserState,
    mut load: impl FnMut(&VersionInfo) -> StoreResult<Arc<Manifest>>,
) -> StoreResult<Holdings> {
    let mut head = Tally::default();
    let mut per_origin: Vec<(String, usize, Tally)> = Vec::new();
    for v in &state.versions {
        let m = load(v)?;
        if v.kind == VersionKind::Committed {
            head.add(&m.chunks);
            continue;
        }
        match per_origin.iter_mut().find(|(o, _, _)| *o == v.origin) {
            Some((_, n, t)) => {
                *n += 1;
                t.add(&m.chunks);
            }
            None => {
                let mut t = Tally::default();
                t.add(&m.chunks);
                per_origin.push((v.origin.clone(), 1, t));
            }
        }
    }
    Ok(Holdings {
        held_bytes: head.bytes(),
        quota_bytes: quota_of(policy, state),
        quota_override: state.quota_bytes,
        conflict_quota_bytes: bound_of(
            policy,
            state,
            &Charge::Conflict {
                origin: String::new(),
            },
        ),
        conflicts: per_origin
            .into_iter()
            .map(|(origin, versions, t)| OriginHoldings {
                origin,
                versions,
                held_bytes: t.bytes(),
            })
            .collect(),
    })
}

/// An operator's change to a user's state ([`super::UifStore::edit_user`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserEdit {
    /// Deletes a retained version (never the head).
    DeleteVersion(Version),
    /// Sets (`Some`) or clears (`None`) the user's quota override.
    SetQuota(Option<u64>),
}

impl UserEdit {
    /// Applies the edit; returns the version whose manifest may go.
    pub(crate) fn apply(self, user: &str, state: &mut UserState) -> StoreResult<Option<Version>> {
        match self {
            UserEdit::DeleteVersion(v) => {
                if !state.versions.iter().any(|i| i.version == v) {
                    return Err(StoreError::NoSuchVersion {
                        user: user.to_string(),
                        version: v,
                    });
                }
                if state.head == Some(v) {
                    return Err(StoreError::HeadVersion {
                        user: user.to_string(),
                        version: v,
                    });
                }
                state.versions.retain(|i| i.version != v);
                Ok(Some(v))
            }
            UserEdit::SetQuota(q) => {
                state.quota_bytes = q;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use uve_protocol::manifest::ChunkRef;

    fn chunk(tag: u8, len: u32) -> ChunkRef {
        ChunkRef {
            hash: Hash::of(&[tag; 4]),
            len,
        }
    }

    fn info(version: Version, kind: VersionKind, origin: &str, m: &Manifest) -> VersionInfo {
        VersionInfo {
            version,
            kind,
            created_ms: now_ms(),
            size: m.header.size,
            digest: m.header.digest.to_hex(),
            chunk_count: m.header.chunk_count,
            base: None,
            origin: origin.into(),
        }
    }

    fn policy(quota_bytes: u64) -> StorePolicy {
        StorePolicy {
            quota_bytes,
            ..StorePolicy::default()
        }
    }

    /// Versions 1..=n of `ms`, all committed from `vm:a`; the last is head.
    fn state(ms: &[Manifest]) -> UserState {
        let n = ms.len() as Version;
        UserState {
            head: Some(n),
            next: n + 1,
            versions: ms
                .iter()
                .enumerate()
                .map(|(i, m)| info(i as Version + 1, VersionKind::Committed, "vm:a", m))
                .collect(),
            ..UserState::default()
        }
    }

    fn run(p: &StorePolicy, st: &mut UserState, ms: &[Manifest]) -> StoreResult<Vec<Version>> {
        let new = ms.len() as Version;
        let all: Vec<Arc<Manifest>> = ms.iter().cloned().map(Arc::new).collect();
        fit(p, "alice", st, new, &ms[ms.len() - 1], |i| {
            assert_ne!(i.version, new, "the new version is never loaded");
            Ok(all[usize::try_from(i.version).unwrap() - 1].clone())
        })
    }

    #[test]
    fn shared_chunks_are_counted_once() {
        // Three versions of 3 chunks of 100 bytes, sharing two: 500 unique
        // bytes, 900 logical.
        let ms: Vec<Manifest> = (0..3)
            .map(|i| Manifest::from_chunks(vec![chunk(0, 100), chunk(1, 100), chunk(10 + i, 100)]))
            .collect();
        let mut st = state(&ms);
        assert_eq!(
            run(&policy(500), &mut st, &ms).unwrap(),
            Vec::<Version>::new()
        );
        let mut st = state(&ms);
        match run(&policy(499), &mut st, &ms) {
            Err(StoreError::QuotaExceeded {
                held,
                quota,
                conflict_origin: None,
                ..
            }) => assert_eq!((held, quota), (500, 499)),
            other => panic!("expected QuotaExceeded, got {other:?}"),
        }
    }

    #[test]
    fn a_sparse_version_costs_its_distinct_chunks() {
        // 1000 identical chunks are one chunk of storage.
        let ms = vec![Manifest::from_chunks(vec![chunk(0, 100); 1000])];
        let mut st = state(&ms);
        assert!(run(&policy(100), &mut st, &ms).is_ok());
    }

    #[test]
    fn history_is_dropped_for_room_only_when_configured() {
        let ms: Vec<Manifest> = (0..4)
            .map(|i| Manifest::from_chunks(vec![chunk(i, 100)]))
            .collect();
        let mut st = state(&ms);
        assert!(matches!(
            run(&policy(250), &mut st, &ms),
            Err(StoreError::QuotaExceeded { held: 400, .. })
        ));
        let mut p = policy(250);
        p.quota_prunes_history = true;
        let mut st = state(&ms);
        assert_eq!(run(&p, &mut st, &ms).unwrap(), vec![1, 2]);
        let left: Vec<Version> = st.versions.iter().map(|v| v.version).collect();
        assert_eq!(left, vec![3, 4]);
        assert_eq!(st.head, Some(4));
        // Not even alone: refused whatever the option.
        let mut st = state(&ms);
        assert!(matches!(
            run(&policy(50), &mut st, &ms),
            Err(StoreError::QuotaExceeded { held: 400, .. })
        ));
    }

    #[test]
    fn conflicts_count_per_origin_and_never_against_the_head() {
        // Head line: 2 × 100 bytes. vm:b's conflicts: 2 × 100 bytes.
        let ms: Vec<Manifest> = (0..5)
            .map(|i| Manifest::from_chunks(vec![chunk(i, 100)]))
            .collect();
        let mut st = state(&ms[..2]);
        for (i, m) in ms[2..].iter().enumerate() {
            st.versions
                .push(info(3 + i as Version, VersionKind::Conflict, "vm:b", m));
        }
        st.next = 6;
        let p = StorePolicy {
            conflict_quota_bytes: Some(250),
            ..policy(200)
        };
        // vm:b's third conflict (v5) is over its own bound of 250.
        match run(&p, &mut st, &ms) {
            Err(StoreError::QuotaExceeded {
                conflict_origin: Some(o),
                held: 300,
                quota: 250,
                ..
            }) => assert_eq!(o, "vm:b"),
            other => panic!("expected the conflict refused, got {other:?}"),
        }
        // The head line is charged only its own 200 bytes (fits exactly),
        // whatever vm:b holds.
        let base = QuotaBase::of(&p, &st, &Charge::Head);
        assert_eq!(base.bound, 200);
        assert_eq!(
            base.counted.iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let c = QuotaBase::of(
            &p,
            &st,
            &Charge::Conflict {
                origin: "vm:c".into(),
            },
        );
        assert!(c.counted.is_empty(), "another origin's conflicts: none");
    }

    #[test]
    fn the_base_counts_what_retention_keeps() {
        let ms: Vec<Manifest> = (0..3)
            .map(|i| Manifest::from_chunks(vec![chunk(i, 100)]))
            .collect();
        let st = state(&ms);
        let p = StorePolicy {
            history_keep: 2,
            ..policy(1000)
        };
        // Keep 2: the new head and v3; v1, v2 are pruned first.
        let base = QuotaBase::of(&p, &st, &Charge::Head);
        assert_eq!(
            base.counted.iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(base.logical(), 100);
        assert!(base.fits_blind(900));
        assert!(!base.fits_blind(901));
    }

    #[test]
    fn the_head_cannot_be_deleted_and_overrides_apply() {
        let ms: Vec<Manifest> = (0..2)
            .map(|i| Manifest::from_chunks(vec![chunk(i, 100)]))
            .collect();
        let mut st = state(&ms);
        assert!(matches!(
            UserEdit::DeleteVersion(2).apply("alice", &mut st),
            Err(StoreError::HeadVersion { version: 2, .. })
        ));
        assert!(matches!(
            UserEdit::DeleteVersion(7).apply("alice", &mut st),
            Err(StoreError::NoSuchVersion { version: 7, .. })
        ));
        assert_eq!(
            UserEdit::DeleteVersion(1).apply("alice", &mut st).unwrap(),
            Some(1)
        );
        UserEdit::SetQuota(Some(5)).apply("alice", &mut st).unwrap();
        assert_eq!(quota_of(&policy(1000), &st), 5);
    }
}
