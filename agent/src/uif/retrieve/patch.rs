//! Patching a UIF file in place (see the [module header](super)): plan
//! which chunks are in place, moved (read and verified before anything is
//! written) or to fetch, then write them behind the patch marker.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use uve_protocol::manifest::{ChunkRef, Hash, Manifest, ZERO_BLOCK};
use uve_protocol::names::UserName;

use super::fetch::{fetch_missing, write_chunk};
use super::{RELOCATE_BUDGET, record};
use crate::base::fsutil;
use crate::link::HostLink;
use crate::stores::cache;
use crate::uif::{UifError, blocking};

/// What an in-place patch has to write.
#[derive(Debug, Default)]
pub(super) struct PatchPlan {
    /// Chunks to fetch: hash → offsets in the new version.
    wanted: HashMap<Hash, Vec<u64>>,
    /// Fetch order (distinct hashes).
    order: Vec<ChunkRef>,
    /// Chunks found in the file at another offset, read before any write,
    /// and the zero block (never fetched): (bytes, offsets in the new
    /// version).
    moved: Vec<(Vec<u8>, Vec<u64>)>,
    /// Chunks already in place (after the shift, if any).
    in_place: usize,
    /// A range to insert or collapse before anything is written.
    shift: Option<Shift>,
}

impl PatchPlan {
    /// The range the patch inserts or collapses first, if any.
    pub(super) fn shift(&self) -> Option<Shift> {
        self.shift
    }
}

/// A range of whole filesystem blocks inserted into the file
/// (`FALLOC_FL_INSERT_RANGE`) or collapsed out of it
/// (`FALLOC_FL_COLLAPSE_RANGE`) before a patch writes, so that the chunks
/// after an insertion or a deletion are in place again instead of moved:
/// the filesystem moves extents, not bytes. ext4 and XFS do it; elsewhere
/// the patch falls back to rewriting the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shift {
    /// Where (a multiple of the filesystem's block size).
    at: u64,
    /// How many bytes (a multiple of the block size).
    len: u64,
    /// Inserted (the new version is longer) or collapsed.
    insert: bool,
}

/// Where the chunks of a layout sit: offset → chunk.
type Layout = Vec<(u64, ChunkRef)>;

/// A [`PatchPlan`] before the moved chunks are read.
#[derive(Default)]
struct Classified {
    wanted: HashMap<Hash, Vec<u64>>,
    order: Vec<ChunkRef>,
    /// hash → (offset in the file now, length, offsets in the new version)
    moved: HashMap<Hash, (u64, u32, Vec<u64>)>,
    zeroed: Vec<u64>,
    in_place: usize,
}

/// Plans patching `dest` (which holds `prev`) into `next`; `None` if more
/// than [`RELOCATE_BUDGET`] bytes moved (then rewriting is as cheap and
/// needs no memory). When the versions' sizes differ by whole filesystem
/// blocks, a [`Shift`] where they first differ is planned too, and kept if
/// it leaves more chunks in place. Moved chunks are read and verified
/// here, before the file is touched; one that does not verify is fetched
/// instead.
pub(super) fn plan_patch(prev: &Manifest, next: &Manifest, dest: &Path) -> Option<PatchPlan> {
    let held: Layout = prev.offsets().map(|(off, c)| (off, *c)).collect();
    let plain = classify(&held, &held, next);
    let shift = shift_for(prev, next, dest);
    let shifted = shift.and_then(|s| classify(&shifted(&held, s), &held, next));
    let (c, shift) = match (plain, shifted) {
        (Some(p), Some(s)) if s.in_place > p.in_place => (s, shift),
        (None, Some(s)) => (s, shift),
        (Some(p), _) => (p, None),
        (None, None) => return None,
    };
    read_moved(c, shift, dest)
}

/// Sorts `next`'s chunks into in place (where `at` has them), moved
/// (found in `anywhere`, the file as it is now) or to fetch; `None` past
/// the relocation budget.
fn classify(at: &Layout, anywhere: &Layout, next: &Manifest) -> Option<Classified> {
    let at: HashMap<u64, ChunkRef> = at.iter().copied().collect();
    let anywhere: HashMap<Hash, (u64, u32)> = anywhere
        .iter()
        .map(|(off, c)| (c.hash, (*off, c.len)))
        .collect();
    let mut out = Classified::default();
    let mut moved_bytes = 0u64;
    for (off, c) in next.offsets() {
        if at.get(&off) == Some(c) {
            out.in_place += 1;
        } else if c.is_zero_block() {
            // Never fetched: punched as a hole where the file holds
            // other bytes.
            out.zeroed.push(off);
        } else if let Some(places) = out.wanted.get_mut(&c.hash) {
            places.push(off);
        } else if let Some((_, _, places)) = out.moved.get_mut(&c.hash) {
            places.push(off);
        } else if let Some(&(from, len)) = anywhere.get(&c.hash).filter(|(_, l)| *l == c.len) {
            moved_bytes += u64::from(len);
            if moved_bytes > RELOCATE_BUDGET {
                return None;
            }
            out.moved.insert(c.hash, (from, len, vec![off]));
        } else {
            out.wanted.insert(c.hash, vec![off]);
            out.order.push(*c);
        }
    }
    Some(out)
}

/// Reads the moved chunks (from the file as it is now) into the plan.
fn read_moved(c: Classified, shift: Option<Shift>, dest: &Path) -> Option<PatchPlan> {
    let mut plan = PatchPlan {
        wanted: c.wanted,
        order: c.order,
        moved: Vec::new(),
        in_place: c.in_place,
        shift,
    };
    if !c.zeroed.is_empty() {
        plan.moved
            .push((vec![0; ZERO_BLOCK.len as usize], c.zeroed));
    }
    if !c.moved.is_empty() {
        let file = File::open(dest).ok()?;
        for (hash, (from, len, places)) in c.moved {
            let mut buf = vec![0u8; len as usize];
            let ok = file.read_exact_at(&mut buf, from).is_ok() && Hash::of(&buf) == hash;
            if ok {
                plan.moved.push((buf, places));
            } else {
                plan.order.push(ChunkRef { hash, len });
                plan.wanted.insert(hash, places);
            }
        }
    }
    Some(plan)
}

/// The shift that would put `prev`'s chunks after the first change where
/// `next` has them: when the sizes differ by whole blocks of `dest`'s
/// filesystem, that many bytes inserted or collapsed at the block where
/// the versions' chunks first differ.
fn shift_for(prev: &Manifest, next: &Manifest, dest: &Path) -> Option<Shift> {
    let (old, new) = (prev.header.size, next.header.size);
    let block = nix::sys::statvfs::statvfs(dest).ok()?.block_size();
    let len = old.abs_diff(new);
    if len == 0 || block == 0 || len % block != 0 {
        return None;
    }
    let same = prev
        .offsets()
        .zip(next.offsets())
        .take_while(|((a, x), (b, y))| a == b && x == y)
        .last()
        .map_or(0, |((off, c), _)| off + u64::from(c.len));
    let at = same - same % block;
    let insert = new > old;
    // An insertion starts inside the file; a collapse ends before its end.
    let fits = if insert { at < old } else { at + len < old };
    fits.then_some(Shift { at, len, insert })
}

/// Where `held`'s chunks are once `s` is applied; chunks it cuts are gone.
fn shifted(held: &Layout, s: Shift) -> Layout {
    held.iter()
        .filter_map(|&(off, c)| {
            if off + u64::from(c.len) <= s.at {
                Some((off, c))
            } else if s.insert && off >= s.at {
                Some((off + s.len, c))
            } else if !s.insert && off >= s.at + s.len {
                Some((off - s.len, c))
            } else {
                None
            }
        })
        .collect()
}

/// Applies `s` to `out`. `Ok(false)`: the filesystem cannot (not ext4 or
/// XFS, or a mode that forbids it); the file is unchanged.
fn apply_shift(out: &File, s: Shift) -> std::io::Result<bool> {
    use nix::fcntl::FallocateFlags;
    use std::os::fd::AsRawFd;
    let mode = if s.insert {
        FallocateFlags::FALLOC_FL_INSERT_RANGE
    } else {
        FallocateFlags::FALLOC_FL_COLLAPSE_RANGE
    };
    let (Ok(at), Ok(len)) = (i64::try_from(s.at), i64::try_from(s.len)) else {
        return Ok(false);
    };
    match nix::fcntl::fallocate(out.as_raw_fd(), mode, at, len) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Patches `dest` into `manifest` following `plan`, behind the patch
/// marker. Returns (chunks fetched, chunks reused), or `None` when the
/// plan's shift is not possible on this filesystem (nothing written: the
/// caller rewrites the file).
pub(super) async fn patch(
    link: &HostLink,
    state_dir: &Path,
    user: &UserName,
    dest: &Path,
    manifest: &Manifest,
    plan: PatchPlan,
    parallel: usize,
) -> Result<Option<(usize, usize)>, UifError> {
    let PatchPlan {
        wanted,
        order,
        moved,
        in_place,
        shift,
    } = plan;
    let reused = in_place + moved.len();
    let size = manifest.header.size;
    let out = {
        let (state_dir, user, dest) = (
            state_dir.to_path_buf(),
            user.to_string(),
            dest.to_path_buf(),
        );
        blocking(move || {
            let out = OpenOptions::new()
                .write(true)
                .open(&dest)
                .map_err(|e| UifError::at("open", &dest, e))?;
            cache::begin_patch(&state_dir, &user)
                .map_err(|e| UifError::at("mark patch of", &dest, e))?;
            if let Some(s) = shift
                && !apply_shift(&out, s).map_err(|e| UifError::at("shift", &dest, e))?
            {
                return Ok(None);
            }
            for (data, places) in &moved {
                for off in places {
                    write_chunk(&out, data, *off).map_err(|e| UifError::at("patch", &dest, e))?;
                }
            }
            out.set_len(size)
                .map_err(|e| UifError::at("resize", &dest, e))?;
            Ok(Some(out))
        })
        .await?
    };
    let Some(out) = out else {
        return Ok(None);
    };
    let fetched = fetch_missing(link, user, &out, wanted, order, parallel).await?;
    let dest2 = dest.to_path_buf();
    let written = blocking(move || {
        fsutil::sync(&out).map_err(|e| UifError::at("fsync", &dest2, e))?;
        out.metadata()
            .map(|m| m.len())
            .map_err(|e| UifError::at("stat", &dest2, e))
    })
    .await?;
    if written != size {
        return Err(UifError::Protocol(format!(
            "patched {written} bytes for {user}, expected {size}"
        )));
    }
    let (sd, u, d, m) = (
        state_dir.to_path_buf(),
        user.to_string(),
        dest.to_path_buf(),
        manifest.clone(),
    );
    blocking(move || record(&sd, &u, &d, &m)).await?;
    Ok(Some((fetched, reused)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use uve_protocol::testdata::noise;

    use super::*;

    fn manifest(data: &[u8]) -> Manifest {
        uve_protocol::chunker::chunk_stream(data, |_, _| Ok(())).unwrap()
    }

    /// `prev` on disk, planned into `next`.
    fn plan(prev: &[u8], next: &[u8]) -> (Option<PatchPlan>, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("uif.img");
        std::fs::write(&dest, prev).unwrap();
        let next_m = manifest(next);
        (plan_patch(&manifest(prev), &next_m, &dest), next_m)
    }

    #[test]
    fn a_small_overwrite_fetches_only_the_chunks_it_touched() {
        let prev = noise(4 << 20, 1);
        let mut next = prev.clone();
        next[2_000_000..2_004_096].copy_from_slice(&noise(4096, 2));
        let (p, next_m) = plan(&prev, &next);
        let p = p.unwrap();
        assert!(p.moved.is_empty(), "nothing moved");
        assert!(
            (1..=3).contains(&p.order.len()),
            "{} fetched",
            p.order.len()
        );
        assert_eq!(
            p.in_place + p.wanted.values().map(Vec::len).sum::<usize>(),
            next_m.chunks.len()
        );
    }

    #[test]
    fn an_insertion_moves_chunks_read_from_the_file_and_verified() {
        let prev = noise(4 << 20, 3);
        let mut next = noise(1000, 4);
        next.extend_from_slice(&prev);
        let (p, next_m) = plan(&prev, &next);
        let p = p.unwrap();
        assert!(!p.moved.is_empty());
        for (bytes, places) in &p.moved {
            let h = Hash::of(bytes);
            let offsets: Vec<u64> = next_m
                .offsets()
                .filter(|(_, c)| c.hash == h)
                .map(|(off, _)| off)
                .collect();
            assert_eq!(
                &offsets, places,
                "each moved chunk goes where the new version has it"
            );
        }
        assert!(p.order.len() <= 2, "{} fetched", p.order.len());
    }

    #[test]
    fn a_block_aligned_insertion_or_deletion_is_planned_as_a_shift() {
        // Past the relocation budget: without a shift, a rewrite.
        let prev = noise(24 << 20, 9);
        let mut next = prev[..1 << 20].to_vec();
        next.extend_from_slice(&noise(4096, 10));
        next.extend_from_slice(&prev[1 << 20..]);
        let (p, next_m) = plan(&prev, &next);
        let p = p.expect("a plan");
        let s = p.shift.expect("a shift");
        assert!(s.insert && s.len == 4096, "{s:?}");
        assert!(s.at <= 1 << 20 && s.at % 4096 == 0, "{s:?}");
        assert!(
            p.in_place + 4 >= next_m.chunks.len(),
            "{} of {} in place",
            p.in_place,
            next_m.chunks.len()
        );
        let mut shorter = prev[..2 << 20].to_vec();
        shorter.extend_from_slice(&prev[(2 << 20) + 8192..]);
        let (p, next_m) = plan(&prev, &shorter);
        let p = p.expect("a plan");
        let s = p.shift.expect("a shift");
        assert!(!s.insert && s.len == 8192 && s.at <= 2 << 20, "{s:?}");
        assert!(p.in_place + 4 >= next_m.chunks.len());
        // Not whole blocks: no shift, and too much moved to patch.
        let mut odd = noise(1000, 11);
        odd.extend_from_slice(&prev);
        assert!(plan(&prev, &odd).0.is_none());
    }

    #[test]
    fn beyond_the_relocation_budget_the_file_is_rewritten() {
        let big = usize::try_from(RELOCATE_BUDGET).unwrap() + (4 << 20);
        let prev = noise(big, 5);
        let mut next = noise(1000, 6);
        next.extend_from_slice(&prev);
        assert!(plan(&prev, &next).0.is_none());
    }

    #[test]
    fn a_moved_chunk_that_no_longer_verifies_is_fetched() {
        let prev = noise(2 << 20, 7);
        let mut next = noise(1000, 8);
        next.extend_from_slice(&prev);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("uif.img");
        // The file no longer holds what its manifest says.
        std::fs::write(&dest, vec![0u8; prev.len()]).unwrap();
        let p = plan_patch(&manifest(&prev), &manifest(&next), &dest).unwrap();
        assert!(p.moved.is_empty());
        assert_eq!(p.order.len(), manifest(&next).chunks.len() - p.in_place);
    }
}
