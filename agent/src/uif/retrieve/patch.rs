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
    /// Chunks already in place.
    in_place: usize,
}

/// Plans patching `dest` (which holds `prev`) into `next`; `None` if more
/// than [`RELOCATE_BUDGET`] bytes moved (then rewriting is as cheap and
/// needs no memory). Moved chunks are read and verified here, before the
/// file is touched; one that does not verify is fetched instead.
pub(super) fn plan_patch(prev: &Manifest, next: &Manifest, dest: &Path) -> Option<PatchPlan> {
    let at: HashMap<u64, ChunkRef> = prev.offsets().map(|(off, c)| (off, *c)).collect();
    let anywhere: HashMap<Hash, (u64, u32)> = prev
        .offsets()
        .map(|(off, c)| (c.hash, (off, c.len)))
        .collect();
    let mut plan = PatchPlan::default();
    let mut moved: HashMap<Hash, (u64, u32, Vec<u64>)> = HashMap::new();
    let mut moved_bytes = 0u64;
    let mut zeroed = Vec::new();
    for (off, c) in next.offsets() {
        if at.get(&off) == Some(c) {
            plan.in_place += 1;
        } else if c.is_zero_block() {
            // Never fetched: punched as a hole where the file holds
            // other bytes.
            zeroed.push(off);
        } else if let Some(places) = plan.wanted.get_mut(&c.hash) {
            places.push(off);
        } else if let Some((_, _, places)) = moved.get_mut(&c.hash) {
            places.push(off);
        } else if let Some(&(from, len)) = anywhere.get(&c.hash).filter(|(_, l)| *l == c.len) {
            moved_bytes += u64::from(len);
            if moved_bytes > RELOCATE_BUDGET {
                return None;
            }
            moved.insert(c.hash, (from, len, vec![off]));
        } else {
            plan.wanted.insert(c.hash, vec![off]);
            plan.order.push(*c);
        }
    }
    if !zeroed.is_empty() {
        plan.moved.push((vec![0; ZERO_BLOCK.len as usize], zeroed));
    }
    if !moved.is_empty() {
        let file = File::open(dest).ok()?;
        for (hash, (from, len, places)) in moved {
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

/// Patches `dest` into `manifest` following `plan`, behind the patch
/// marker. Returns (chunks fetched, chunks reused).
pub(super) async fn patch(
    link: &HostLink,
    state_dir: &Path,
    user: &UserName,
    dest: &Path,
    manifest: &Manifest,
    plan: PatchPlan,
    parallel: usize,
) -> Result<(usize, usize), UifError> {
    let PatchPlan {
        wanted,
        order,
        moved,
        in_place,
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
            for (data, places) in &moved {
                for off in places {
                    write_chunk(&out, data, *off).map_err(|e| UifError::at("patch", &dest, e))?;
                }
            }
            out.set_len(size)
                .map_err(|e| UifError::at("resize", &dest, e))?;
            Ok(out)
        })
        .await?
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
    Ok((fetched, reused))
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
