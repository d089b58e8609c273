//! The bulk pool: a few threads that run the store work of chunk transfers
//! (reading a chunk for `ChunkFetch`, staging one for `ChunkUpload`,
//! reading base bytes for `BlockSignatures`) at a lower CPU priority
//! ([`BULK_NICE`]) than the async workers, so heartbeats and notices are
//! answered first under a multi-GiB transfer.
//!
//! Fairness: each VM has its own queue, and the threads serve the VMs with
//! queued work one job at a time, the VM that used the bulk threads least
//! lately first: each VM's usage is the time its jobs took, halved every
//! [`USAGE_HALF_LIFE`]; ties go round-robin. A VM that floods bulk work
//! (or stages upload after upload) builds up usage and waits behind a VM
//! whose logout or login comes in a burst; it is still served whenever it
//! is the least used of those waiting, and its usage fades while it waits,
//! so it never starves. A VM's job waits at most for the jobs already
//! running, never for another VM's backlog. A VM may have at most `bulk_queue_per_vm` jobs queued
//! (more are refused; the dispatcher's `max_inflight` keeps a well-behaved
//! agent far below it). A job whose requester has gone (its connection
//! closed or was replaced, so the handler was dropped) is skipped, not run.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::fading::Fading;

/// Nice value of the bulk threads (the async workers keep 0).
pub const BULK_NICE: i32 = 10;

/// A VM's recorded bulk usage halves in this time.
pub const USAGE_HALF_LIFE: Duration = Duration::from_secs(1);

/// Usage entries kept before the faded ones are dropped.
const USAGE_ENTRIES: usize = 1024;

/// One unit of bulk work. It returns without doing anything if its
/// requester is gone (see [`BulkPool::submit`]).
pub type BulkJob = Box<dyn FnOnce() + Send + 'static>;

/// Why a job was not queued; it is handed back.
pub enum Refused {
    /// No bulk thread could be started: run it elsewhere.
    NoThreads(BulkJob),
    /// The VM has its whole queue (`bulk_queue_per_vm` jobs) queued.
    QueueFull,
}

struct Queues {
    per_vm: HashMap<String, VecDeque<BulkJob>>,
    /// VMs with queued work, in round-robin order (for ties).
    ring: VecDeque<String>,
    /// Each VM's recent bulk time (ns).
    usage: Fading,
    closed: bool,
}

impl Default for Queues {
    fn default() -> Self {
        Queues {
            per_vm: HashMap::new(),
            ring: VecDeque::new(),
            // A microsecond or less left: as good as none.
            usage: Fading::new(USAGE_HALF_LIFE, USAGE_ENTRIES, 1_000.0),
            closed: false,
        }
    }
}

impl Queues {
    /// Queues `job` behind `vm`'s others (the VM joins the ring with its
    /// first queued job).
    fn push(&mut self, vm: &str, job: BulkJob) {
        let mine = self.per_vm.entry(vm.to_string()).or_default();
        mine.push_back(job);
        if mine.len() == 1 {
            self.ring.push_back(vm.to_string());
        }
    }

    /// The next job: of the VM with queued work that used the bulk
    /// threads least lately (the first in the ring among equals).
    fn pop(&mut self) -> Option<(String, BulkJob)> {
        let now = Instant::now();
        let used = |vm: &String| self.usage.get(vm, now);
        let (at, _) = self
            .ring
            .iter()
            .enumerate()
            .map(|(i, vm)| (i, used(vm)))
            .fold(None::<(usize, f64)>, |best, (i, u)| match best {
                Some((_, b)) if b <= u => best,
                _ => Some((i, u)),
            })?;
        let vm = self.ring.remove(at)?;
        let queue = self.per_vm.get_mut(&vm)?;
        let job = queue.pop_front();
        if queue.is_empty() {
            self.per_vm.remove(&vm);
        } else {
            self.ring.push_back(vm.clone());
        }
        job.map(|j| (vm, j))
    }

    /// Records that a job of `vm` took `took`.
    fn charge(&mut self, vm: &str, took: Duration) {
        self.usage.add(vm, took.as_nanos() as f64, Instant::now());
    }
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
}

/// The bulk threads and their per-VM queues.
pub struct BulkPool {
    shared: Arc<Shared>,
    threads: usize,
    per_vm: usize,
}

impl BulkPool {
    /// Starts `threads` threads, each VM queueing at most `per_vm` jobs
    /// (at least 1); no threads if they cannot be created (then
    /// [`submit`](Self::submit) hands every job back).
    pub fn start(threads: usize, per_vm: usize) -> BulkPool {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
        });
        let mut started = 0;
        for _ in 0..threads {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("uve-bulk".into())
                .spawn(move || bulk_thread(&shared));
            if spawned.is_ok() {
                started += 1;
            }
        }
        BulkPool {
            shared,
            threads: started,
            per_vm: per_vm.max(1),
        }
    }

    /// Jobs one VM may have queued.
    pub fn per_vm(&self) -> usize {
        self.per_vm
    }

    /// Queues `job` behind the other jobs of `vm`.
    pub fn submit(&self, vm: &str, job: BulkJob) -> Result<(), Refused> {
        if self.threads == 0 {
            return Err(Refused::NoThreads(job));
        }
        let mut q = self
            .shared
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if q.per_vm
            .get(vm)
            .is_some_and(|mine| mine.len() >= self.per_vm)
        {
            return Err(Refused::QueueFull);
        }
        q.push(vm, job);
        drop(q);
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl Drop for BulkPool {
    fn drop(&mut self) {
        self.shared
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.shared.ready.notify_all();
    }
}

fn bulk_thread(shared: &Shared) {
    // Lower this thread's CPU priority (a thread's id is its own
    // scheduling entity on Linux; under BFQ its I/O priority follows).
    // The shipped unit allows setpriority(2) for this; should a filter
    // refuse it, bulk work competes at equal priority, which the operator
    // must know.
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), BULK_NICE) {
        tracing::warn!(
            nice = BULK_NICE,
            "bulk thread keeps its normal priority (setpriority: {e})"
        );
    }
    loop {
        let job = {
            let mut q = shared.queues.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if q.closed {
                    return;
                }
                if let Some(next) = q.pop() {
                    break next;
                }
                q = shared.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let (vm, job) = job;
        let started = Instant::now();
        // A panicking store call loses only its answer (the caller sees an
        // error), not the thread.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        shared
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .charge(&vm, started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A job that records `<vm><n>` in `order` when it runs.
    fn tagged(order: &Arc<Mutex<Vec<String>>>, vm: &str, n: u32) -> BulkJob {
        let (o, tag) = (order.clone(), format!("{vm}{n}"));
        Box::new(move || o.lock().unwrap().push(tag))
    }

    #[test]
    fn vms_are_served_round_robin_not_in_arrival_order() {
        let mut q = Queues::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let push = |q: &mut Queues, vm: &str, n: u32| q.push(vm, tagged(&order, vm, n));
        for n in 0..4 {
            push(&mut q, "flood", n);
        }
        push(&mut q, "good", 0);
        push(&mut q, "other", 0);
        while let Some((_, job)) = q.pop() {
            job();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["flood0", "good0", "other0", "flood1", "flood2", "flood3"]
        );
        assert!(q.per_vm.is_empty() && q.ring.is_empty());
    }

    #[test]
    fn the_vm_that_used_the_threads_least_lately_goes_first_and_usage_fades() {
        let mut q = Queues::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let push = |q: &mut Queues, vm: &str, n: u32| q.push(vm, tagged(&order, vm, n));
        // The stager has used the threads for a second lately, the other
        // for a millisecond; the newcomer not at all.
        q.charge("stager", Duration::from_secs(1));
        q.charge("other", Duration::from_millis(1));
        for n in 0..3 {
            push(&mut q, "stager", n);
        }
        push(&mut q, "other", 0);
        push(&mut q, "good", 0);
        push(&mut q, "good", 1);
        let run = |q: &mut Queues, took: Duration| {
            let (vm, job) = q.pop().unwrap();
            job();
            q.charge(&vm, took);
        };
        // good's jobs each take 0.1 ms: still below the others; other's
        // millisecond puts it before the stager's second.
        for _ in 0..3 {
            run(&mut q, Duration::from_micros(100));
        }
        assert_eq!(*order.lock().unwrap(), ["good0", "good1", "other0"]);
        // Alone, the stager is served at once.
        run(&mut q, Duration::from_millis(10));
        assert_eq!(order.lock().unwrap().last().unwrap(), "stager0");
        // Usage fades: half after one half-life.
        let mut u = Fading::new(USAGE_HALF_LIFE, USAGE_ENTRIES, 0.0);
        u.add("vm", 1e9, Instant::now() - USAGE_HALF_LIFE);
        let faded = u.get("vm", Instant::now());
        assert!((0.45e9..0.5e9).contains(&faded), "{faded}");
    }

    #[test]
    fn a_vm_past_its_queue_cap_is_refused_and_others_are_not() {
        // No threads run the jobs: the queue only fills.
        let pool = BulkPool {
            shared: Arc::new(Shared {
                queues: Mutex::new(Queues::default()),
                ready: Condvar::new(),
            }),
            threads: 1,
            per_vm: 8,
        };
        for _ in 0..8 {
            assert!(pool.submit("flood", Box::new(|| ())).is_ok());
        }
        assert!(matches!(
            pool.submit("flood", Box::new(|| ())),
            Err(Refused::QueueFull)
        ));
        assert!(pool.submit("good", Box::new(|| ())).is_ok());
    }
}
