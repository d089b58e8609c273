//! The staging room and its shares: how much of the staging filesystem's
//! free space uploads may fill, one VM's or user's share of it, and the
//! free-space floor that refuses a VM over its share first. Pure
//! arithmetic on the figures [`Staging`](super::Staging) measures.

use super::{StagingBudget, StagingRefused};

/// A per-VM or per-user staged-byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Configured: this many bytes.
    Fixed(u64),
    /// The default: one share of the staging room, but never below
    /// `at_least` (the largest UIF the host accepts, so that no user's
    /// logout is too large to stage whatever the free space).
    Share {
        /// The floor, bytes.
        at_least: u64,
    },
}

impl Cap {
    /// The budget when one share is `share` bytes (`None`: not measured
    /// yet).
    pub fn limit(self, share: Option<u64>) -> u64 {
        match self {
            Cap::Fixed(n) => n,
            Cap::Share { at_least } => share.map_or(at_least, |s| s.max(at_least)),
        }
    }

    /// What the budget is at the least, whatever the free space: an upload
    /// announcing more can never be staged (`UpdateBegin` refuses it).
    pub fn floor(self) -> u64 {
        match self {
            Cap::Fixed(n) | Cap::Share { at_least: n } => n,
        }
    }
}

/// The staging filesystem as one chunk's check sees it.
#[derive(Debug, Clone, Copy)]
pub struct Room {
    /// Free bytes once the chunk is written.
    pub after: u64,
    /// Bytes uploads may fill in all: what is staged now plus what is
    /// free, less the floor.
    pub room: u64,
    /// One VM's or user's share of it.
    pub share: u64,
}

impl Room {
    /// The room when the filesystem has `free` bytes free before a chunk of
    /// `len` bytes is written, `staged` bytes (this chunk's among them) are
    /// charged to uploads, the floor is `min_free` and the room is divided
    /// into `shares`.
    pub fn measured(free: u64, len: u64, staged: u64, min_free: u64, shares: u64) -> Room {
        Self::with_after(free.saturating_sub(len), staged, min_free, shares)
    }

    /// The room on a filesystem of `size` bytes that holds nothing but the
    /// `staged` bytes (the test-only `test_staging_free_bytes`).
    pub fn simulated(size: u64, staged: u64, min_free: u64, shares: u64) -> Room {
        Self::with_after(size.saturating_sub(staged), staged, min_free, shares)
    }

    fn with_after(after: u64, staged: u64, min_free: u64, shares: u64) -> Room {
        let room = after.saturating_add(staged).saturating_sub(min_free);
        Room {
            after,
            room,
            share: room / shares.max(1),
        }
    }

    /// The free-space floor for a chunk of `len` bytes of a VM that has
    /// `vm_staged` bytes staged (the chunk's among them): no chunk may take
    /// the free space below `min_free`, and a VM over its share may not take
    /// it below `min_free` plus one share, which is kept for the VMs within
    /// theirs.
    pub fn check(&self, vm_staged: u64, len: u64, min_free: u64) -> Result<(), StagingRefused> {
        if self.after < min_free {
            return Err(StagingRefused {
                budget: StagingBudget::FreeSpace,
                limit: min_free,
                len,
            });
        }
        if vm_staged > self.share && self.after < min_free.saturating_add(self.share) {
            return Err(StagingRefused {
                budget: StagingBudget::Share,
                limit: self.share,
                len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_default_cap_is_a_share_but_never_below_the_largest_uif() {
        let cap = Cap::Share { at_least: 8 * MIB };
        assert_eq!(cap.limit(None), 8 * MIB);
        assert_eq!(cap.limit(Some(2 * MIB)), 8 * MIB);
        assert_eq!(cap.limit(Some(100 * MIB)), 100 * MIB);
        assert_eq!(cap.floor(), 8 * MIB);
        assert_eq!(Cap::Fixed(MIB).limit(Some(100 * MIB)), MIB);
    }

    #[test]
    fn the_room_is_free_plus_staged_less_the_floor_in_eighths() {
        // 66 MiB free before a 1 MiB chunk, 9 MiB staged with it, 2 MiB floor.
        let r = Room::measured(66 * MIB, MIB, 9 * MIB, 2 * MIB, 8);
        assert_eq!(r.after, 65 * MIB);
        assert_eq!(r.room, 72 * MIB);
        assert_eq!(r.share, 9 * MIB);
        // The simulated filesystem's room does not move with what is staged.
        for staged in [0, 10 * MIB, 60 * MIB] {
            let r = Room::simulated(66 * MIB, staged, 2 * MIB, 8);
            assert_eq!((r.room, r.share), (64 * MIB, 8 * MIB));
        }
    }

    #[test]
    fn a_vm_over_its_share_is_refused_first_when_space_runs_low() {
        let (min_free, chunk) = (2 * MIB, MIB);
        // 64 MiB of room, 8 MiB shares; one VM has staged 55 MiB, 7 MiB free
        // are left above the floor (less than a share).
        let r = Room::simulated(66 * MIB, 57 * MIB, min_free, 8);
        assert_eq!(r.after, 9 * MIB);
        let over = r.check(55 * MIB, chunk, min_free).unwrap_err();
        assert_eq!((over.budget, over.limit), (StagingBudget::Share, 8 * MIB));
        // A VM within its share still stages, down to the floor itself.
        r.check(2 * MIB, chunk, min_free).unwrap();
        let full = Room::simulated(66 * MIB, 65 * MIB, min_free, 8);
        let e = full.check(MIB, chunk, min_free).unwrap_err();
        assert_eq!((e.budget, e.limit), (StagingBudget::FreeSpace, min_free));
        // With a share or more free above the floor, nobody is refused.
        let roomy = Room::simulated(66 * MIB, 40 * MIB, min_free, 8);
        roomy.check(40 * MIB, chunk, min_free).unwrap();
    }
}
