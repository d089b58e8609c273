//! How fast the VMs that move bulk bytes heavily go while other VMs have
//! bulk work: one share for the bytes VMs stage (`heavy_staging_bytes_per_sec`,
//! used by `staging`), one for the chunks they fetch
//! (`heavy_fetch_bytes_per_sec`, used by the host's dispatcher).
//!
//! The other budgets bound what a VM holds, not what its traffic costs
//! the others meanwhile: bytes received, copied into the page cache,
//! written back (staging), or read, framed and sent (fetching). Measured
//! with ten VMs staging 64 MiB uploads beside ten VMs logging in and out
//! (4 MiB UIFs): the good VMs' logins and logouts took 2–3.5 times as long
//! while the bulk threads were mostly idle — they waited for the other
//! VMs' bytes in flight, which the bulk pool's order does not reach. Ten
//! VMs fetching chunks as fast as they could cost the good VMs 1.7–2.4
//! times their time the same way (CPU on the host's runtime threads).
//!
//! So a VM is *heavy* in a share while the bytes it moved lately (halving
//! every [`HALF_LIFE`]) exceed the share's threshold: [`HEAVY_STAGED`],
//! about 5.5 MB/s kept up, or [`HEAVY_FETCHED`], four times that (a
//! login reads more than a logout writes); a login's or logout's burst of
//! a few MiB is not. While some VM that is heavy in neither share had
//! bulk work within [`CONTENTION`] (a VM staging heavily is no light
//! worker for the fetchers, nor the other way round), the heavy VMs together
//! move at most the share's rate (one bucket, a quarter second's worth as
//! burst): the host reads their next request later, so their other
//! requests wait with it. Nothing is refused. Alone on the host — one
//! large login or logout, or several — a heavy VM goes at full speed.

use std::time::{Duration, Instant};

use crate::budgets::bucket::TokenBucket;
use crate::budgets::fading::Fading;

/// A VM's recently moved bytes halve in this time.
pub const HALF_LIFE: Duration = Duration::from_secs(1);

/// Recently staged bytes past which a VM is heavy in the staging share.
pub const HEAVY_STAGED: u64 = 8 << 20;

/// Recently fetched bytes past which a VM is heavy in the fetch share.
pub const HEAVY_FETCHED: u64 = 32 << 20;

/// How recent a light VM's bulk work must be for the rate to apply.
pub const CONTENTION: Duration = Duration::from_secs(1);

/// VMs tracked before the faded ones are dropped.
const ENTRIES: usize = 1024;

/// The VMs' recent bulk bytes in one direction and the heavy VMs' shared
/// bucket.
pub struct HeavyShare {
    /// Recent bytes past which a VM is heavy.
    heavy_bytes: f64,
    per_sec: f64,
    /// Bytes each VM moved lately.
    recent: Fading,
    heavy: Option<TokenBucket>,
    /// The two VMs that last had bulk work while not heavy (distinct;
    /// the newest first), and when: whether *another* VM works is then
    /// known for any VM.
    light: [Option<(String, Instant)>; 2],
}

impl HeavyShare {
    /// The heavy VMs share `per_sec` bytes a second under contention (0:
    /// no limit).
    pub fn new(per_sec: u64, heavy_bytes: u64) -> Self {
        HeavyShare {
            heavy_bytes: heavy_bytes as f64,
            per_sec: per_sec as f64,
            recent: Fading::new(HALF_LIFE, ENTRIES, 1.0),
            heavy: None,
            light: [None, None],
        }
    }

    /// Whether `vm` is heavy in this share now.
    pub fn is_heavy(&self, vm: &str, now: Instant) -> bool {
        self.recent.get(vm, now) > self.heavy_bytes
    }

    /// Records that `vm` has bulk work now; `heavy_elsewhere`: it is
    /// heavy in the other share (then it is no light worker here either).
    pub fn active(&mut self, vm: &str, now: Instant, heavy_elsewhere: bool) {
        if heavy_elsewhere || self.is_heavy(vm, now) {
            return;
        }
        match &mut self.light[0] {
            Some((last, at)) if last == vm => *at = now,
            _ => {
                self.light[1] = self.light[0].take();
                self.light[0] = Some((vm.to_string(), now));
            }
        }
    }

    /// Whether a light VM other than `vm` had bulk work lately.
    fn others_work(&self, vm: &str, now: Instant) -> bool {
        self.light
            .iter()
            .flatten()
            .any(|(other, at)| other != vm && now.saturating_duration_since(*at) < CONTENTION)
    }

    /// Records that `vm` is about to move `bytes`; the wait before the
    /// host reads on (`None`: at once).
    pub fn take(&mut self, vm: &str, bytes: u64, now: Instant) -> Option<Duration> {
        let before = self.recent.add(vm, bytes as f64, now);
        if self.per_sec <= 0.0 || before <= self.heavy_bytes || !self.others_work(vm, now) {
            return None;
        }
        let per_sec = self.per_sec;
        self.heavy
            .get_or_insert_with(|| TokenBucket::full(per_sec / 4.0, per_sec, now))
            .take_n_or_wait(bytes as f64, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn heavy_vms_share_the_rate_only_while_a_light_vm_works() {
        let t0 = Instant::now();
        let mut i = HeavyShare::new(64 * MIB, HEAVY_STAGED);
        // Alone, a VM stages as fast as it sends (its own bulk work while
        // it was light does not count as another's).
        i.active("big", t0, false);
        assert!((0..100).all(|_| i.take("big", MIB, t0).is_none()));
        i.active("big", t0, false);
        // A light VM's bulk work: the heavy VMs now share 64 MiB/s, a
        // quarter second's worth at once.
        i.active("good", t0, false);
        let mut free = 0;
        while i.take("big", MIB, t0).is_none() {
            free += 1;
        }
        assert_eq!(free, 16, "16 MiB of burst, the 17th MiB waits");
        // Another VM is light for its first 8 MiB, then shares the same
        // (empty) bucket.
        let light = (0..100)
            .take_while(|_| i.take("other", MIB, t0).is_none())
            .count();
        assert_eq!(light, 9);
        // A logout's burst of a few MiB is never slowed.
        assert!((0..8).all(|_| i.take("good", MIB, t0).is_none()));
        // The heavy VM's own work does not count as a light VM's.
        let later = t0 + CONTENTION * 2;
        i.active("big", later, false);
        assert_eq!(i.take("big", MIB, later), None, "no light VM lately");
        // What it staged fades: half a minute later it is light again.
        let much_later = t0 + HALF_LIFE * 30;
        i.active("good", much_later, false);
        assert_eq!(i.take("big", MIB, much_later), None);
        // A VM heavy in the other share (a stager, for the fetchers) is
        // no light worker: it makes no contention here.
        let t9 = much_later + HALF_LIFE * 30;
        let mut j = HeavyShare::new(64 * MIB, HEAVY_STAGED);
        for _ in 0..40 {
            j.take("big", MIB, t9);
        }
        j.active("stager", t9, true);
        assert_eq!(j.take("big", MIB, t9), None);
        j.active("good", t9, false);
        assert!((0..40).any(|_| j.take("big", MIB, t9).is_some()));
        let mut off = HeavyShare::new(0, HEAVY_STAGED);
        off.active("good", t0, false);
        assert!((0..100).all(|_| off.take("big", MIB, t0).is_none()));
    }
}
