//! The quota while an upload's pages arrive: each page's chunks that the
//! user does not hold yet are added to what the user holds (head and
//! history that retention keeps, plus the user's other uploads in flight)
//! and the update is refused with the final `QuotaExceeded` as soon as the
//! total passes the bound, before its bytes are sent. The store checks the
//! same bound again at commit (`store::quota`).
//!
//! It starts blind: the retained versions' logical sizes bound their unique
//! bytes, so an upload that fits with them needs no manifest read. Only
//! when that estimate passes the bound are the retained manifests read
//! (once per upload) and the new chunks counted exactly.

use std::sync::{Arc, PoisonError};

use uve_protocol::manifest::ChunkRef;
use uve_protocol::message::WireError;

use super::{Upload, UploadState};
use crate::budgets::quota_charges::QuotaCharge;
use crate::host::wire_store_error;
use crate::state::metrics;
use crate::store::{Charge, QuotaBase, StoreError, StoreResult, Tally, UifStore, quota_exceeded};
use crate::wire::uve5::VmConnection;

/// One upload's running quota count.
pub(super) struct QuotaCheck {
    base: QuotaBase,
    charge: Charge,
    /// The counted versions' chunks, once read (the exact count).
    tally: Option<Tally>,
    /// What this upload adds to what the user holds (an upper bound while
    /// blind), charged to the user's uploads in flight when it is the
    /// lease holder's.
    added: u64,
    held: Option<QuotaCharge>,
}

impl QuotaCheck {
    fn others(&self, conn: &VmConnection, user: &str) -> u64 {
        match &self.held {
            Some(mine) => conn
                .host()
                .quota_charges()
                .charged(user)
                .saturating_sub(mine.bytes()),
            None => 0,
        }
    }

    /// Unique bytes the user would hold with this upload as listed so far.
    fn total(&self, others: u64) -> u64 {
        let retained = if self.base.prunable {
            0
        } else {
            match &self.tally {
                Some(t) => t.bytes(),
                None => self.base.logical(),
            }
        };
        retained.saturating_add(self.added).saturating_add(others)
    }

    fn set_added(&mut self, added: u64) {
        if let Some(c) = &mut self.held {
            c.set(added);
        }
        self.added = added;
    }
}

/// Counts `fresh` (chunks of this page not listed before in the upload)
/// and refuses the upload if the user would hold more than the bound.
pub(super) async fn count_page(
    conn: &VmConnection,
    up: &Arc<Upload>,
    fresh: &[ChunkRef],
) -> Result<(), WireError> {
    let user = up.begin.user.to_string();
    if lock(up).quota.is_none() {
        let base = load_base(conn, up).await?;
        let mut st = lock(up);
        st.quota.get_or_insert(base);
    }
    let over = {
        let mut st = lock(up);
        let Some(q) = st.quota.as_mut() else {
            return Ok(());
        };
        let more: u64 = fresh
            .iter()
            .filter(|c| q.tally.as_ref().is_none_or(|t| !t.holds(&c.hash)))
            .map(|c| u64::from(c.len))
            .sum();
        q.set_added(q.added + more);
        let others = q.others(conn, &user);
        q.total(others) > q.base.bound && q.tally.is_none() && !q.base.prunable
    };
    if over {
        // The blind estimate no longer fits: count exactly.
        let counted = lock(up)
            .quota
            .as_ref()
            .map(|q| q.base.counted.clone())
            .unwrap_or_default();
        let u = user.clone();
        let tally = conn
            .host()
            .store_call(move |s| tally_of(s, &u, &counted))
            .await
            .map_err(|e| wire_store_error(&e))?;
        let mut st = lock(up);
        let added: u64 = st
            .listed
            .iter()
            .filter(|(h, _)| !tally.holds(h))
            .map(|(_, l)| u64::from(l.len))
            .sum();
        if let Some(q) = st.quota.as_mut() {
            q.tally = Some(tally);
            q.set_added(added);
        }
    }
    let st = lock(up);
    let Some(q) = st.quota.as_ref() else {
        return Ok(());
    };
    let total = q.total(q.others(conn, &user));
    if total > q.base.bound && (q.tally.is_some() || q.base.prunable) {
        let e = quota_exceeded(&user, &q.charge, total, q.base.bound);
        count_refusal(conn, &e);
        return Err(wire_store_error(&e));
    }
    Ok(())
}

/// The wire error of a failed commit, a quota refusal counted in its
/// metric.
pub(super) fn refusal(conn: &VmConnection, e: &StoreError) -> WireError {
    count_refusal(conn, e);
    wire_store_error(e)
}

/// Counts a quota refusal in its metric (the lease holder's quota, or a
/// writer's conflict bound).
fn count_refusal(conn: &VmConnection, e: &StoreError) {
    let m = conn.host().metrics();
    match e {
        StoreError::QuotaExceeded {
            conflict_origin: None,
            ..
        } => metrics::add(&m.quota_refused, 1),
        StoreError::QuotaExceeded { .. } => metrics::add(&m.conflict_quota_refused, 1),
        _ => {}
    }
}

fn lock(up: &Upload) -> std::sync::MutexGuard<'_, UploadState> {
    up.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The upload's charge: the user's quota if the VM holds the user's
/// current lease, else its origin's conflict bound.
async fn load_base(conn: &VmConnection, up: &Upload) -> Result<QuotaCheck, WireError> {
    let host = conn.host();
    let b = &up.begin;
    let lease_holder = host.leases().is_current(&b.user, b.lease, conn.vm());
    let charge = if lease_holder {
        Charge::Head
    } else {
        Charge::Conflict {
            origin: conn.origin(),
        }
    };
    let (user, c) = (b.user.to_string(), charge.clone());
    let base = host
        .store_call(move |s| s.quota_base(&user, &c))
        .await
        .map_err(|e| wire_store_error(&e))?;
    Ok(QuotaCheck {
        base,
        charge,
        tally: None,
        added: 0,
        held: lease_holder.then(|| host.quota_charges().open(&b.user)),
    })
}

/// The chunks of `counted` (retained versions of `user`).
fn tally_of(
    s: &dyn UifStore,
    user: &str,
    counted: &[crate::store::VersionInfo],
) -> StoreResult<Tally> {
    let mut t = Tally::default();
    for v in counted {
        match s.manifest(user, v.version) {
            Ok(m) => {
                t.add(&m.chunks);
            }
            // Pruned since the base was taken: held no more.
            Err(StoreError::NoSuchVersion { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(t)
}

/// Ends the upload's quota charge (at its commit: not when the reclaimer
/// thread drops the upload).
pub(super) fn end_charge(up: &Upload) {
    let charge = lock(up).quota.take();
    drop(charge);
}
