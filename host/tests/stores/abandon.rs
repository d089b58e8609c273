//! Abandoned uploads against the reuse race, on both backends: reclaiming
//! an upload's stage never deletes a chunk that another upload, on the same
//! host or on another host of a shared store, is about to reference.

use std::sync::Barrier;
use std::time::Duration;

use uve_host::store::StageId;
use uve_protocol::manifest::Hash;

use super::{Backend, committed, policy, read_all};
use crate::common::{manifest_of, noise};

/// How the abandoned upload's discard falls against the other upload.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// Both run at once, unsynchronised after the start.
    Free,
    /// The discard lands after the other upload asked what is stored and
    /// staged what was missing, before it publishes and commits.
    BeforePublish,
    /// The discard lands after the other upload has committed.
    AfterCommit,
}

/// Host 1 stages an upload and abandons it (`discard`, as the reclaimer
/// does); host 2 uploads the same bytes at the same time and commits them.
/// Half of each round's bytes are new, half are stored already (the
/// previous rounds' versions). Every round, host 2's version reads back
/// whole from both hosts; at the end, also after a GC on each.
pub fn abandoned_upload_never_deletes_a_chunk_another_host_commits(b: &dyn Backend, rounds: u32) {
    let (h1, h2) = b.open_pair("abandon", policy(10), Duration::from_secs(3600));
    let common = noise(200_000, 700);
    let mut base = None;
    let mut last = Vec::new();
    let mut discarded_in_all = 0;
    for round in 0..rounds {
        let order = [Order::Free, Order::BeforePublish, Order::AfterCommit][round as usize % 3];
        let mut data = common.clone();
        data.extend(noise(200_000, 701 + u64::from(round)));
        let (m, bytes) = manifest_of(&data);
        let hashes: Vec<Hash> = m.chunks.iter().map(|c| c.hash).collect();
        let (start, staged, committed_now) = (Barrier::new(2), Barrier::new(2), Barrier::new(2));
        let discarded = std::thread::scope(|s| {
            let abandoned = s.spawn(|| {
                let stage = StageId::fresh();
                let present = h1.has_chunks(&hashes).unwrap();
                start.wait();
                let mut mine = Vec::new();
                for (h, _) in hashes.iter().zip(&present).filter(|(_, p)| !**p) {
                    if !mine.contains(h) && h1.stage_chunk(&stage, h, &bytes[h]).unwrap() > 0 {
                        mine.push(*h);
                    }
                }
                match order {
                    Order::Free => {}
                    Order::BeforePublish => {
                        staged.wait();
                    }
                    Order::AfterCommit => {
                        committed_now.wait();
                    }
                }
                h1.discard(&stage, &mine).unwrap();
                if let Order::BeforePublish = order {
                    staged.wait();
                }
                mine.len()
            });
            let stage = StageId::fresh();
            start.wait();
            let present = h2.has_chunks(&hashes).unwrap();
            let mut mine = Vec::new();
            for (h, _) in hashes.iter().zip(&present).filter(|(_, p)| !**p) {
                if !mine.contains(h) && h2.stage_chunk(&stage, h, &bytes[h]).unwrap() > 0 {
                    mine.push(*h);
                }
            }
            if let Order::BeforePublish = order {
                // Host 1 discards now, then the commit goes on.
                staged.wait();
                staged.wait();
            }
            h2.publish(&stage, &mine).unwrap();
            let v = committed(h2.commit("hal", &m, base, true, "vm:b").unwrap());
            if let Order::AfterCommit = order {
                committed_now.wait();
            }
            base = Some(v);
            abandoned.join().unwrap()
        });
        let v = base.unwrap_or_default();
        for (n, s) in [(1, &h1), (2, &h2)] {
            assert!(
                read_all(s.as_ref(), "hal", v) == data,
                "{} round {round} ({order:?}): host {n} reads v{v} wrong",
                b.name()
            );
        }
        discarded_in_all += discarded;
        last = data;
    }
    assert!(discarded_in_all > 0, "host 1 never staged a chunk");
    let v = base.unwrap_or_default();
    for s in [&h1, &h2] {
        s.gc(Duration::ZERO).unwrap();
        assert!(read_all(s.as_ref(), "hal", v) == last, "{}", b.name());
    }
}
