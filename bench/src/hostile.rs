//! Hostile benchmark: good VMs log their users in and out against the real
//! `uve-host` binary, first alone, then beside hostile VMs (each a child
//! process at nice 19 — a guest's CPU is not the host's — speaking the
//! protocol over real Unix sockets), each kind twice by default: a VM that floods requests and stops reading, one that
//! stages uploads and abandons them, one that floods pings, one that floods
//! chunk fetches (bulk work) and one that floods session starts and
//! unexpected-disconnect notices. Reports the good VMs' login+logout time
//! with the hostile VMs ÷ without, the host's peak RSS growth, the staged
//! bytes left `settle` after the hostile VMs disconnect, and whether the
//! `update_refused` event each good VM caused before the attack is still
//! listed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use uve_e2e::binaries::Binaries;
use uve_e2e::fake_agent::TestAgent;
use uve_e2e::host::HostDaemon;
use uve_e2e::names::valid;
use uve_e2e::raw_peer::{RawPeer, write_until_closed};
use uve_protocol::message::{DisconnectNotice, ErrorCode, Request, Response};

use crate::{Row, data, scale, sys};

/// Parameters of a hostile run.
pub struct Params {
    /// Good VMs.
    pub good: usize,
    /// Hostile VMs (of the five kinds in turn).
    pub hostile: usize,
    /// The good users' UIF size.
    pub size: usize,
    /// Login+logout rounds of each good VM per phase.
    pub rounds: usize,
    /// How long after the hostile VMs disconnect the staged bytes are read.
    pub settle: Duration,
    /// The kinds the hostile VMs take in turn (indices into [`KINDS`]).
    pub kinds: Vec<usize>,
}

/// What the hostile VMs got done (counted for the table).
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    busy: AtomicU64,
    refused: AtomicU64,
    staged: AtomicU64,
}

/// The five kinds of hostile VM.
pub const KINDS: [&str; 5] = [
    "floods and stops reading",
    "stages and abandons uploads",
    "floods pings",
    "floods chunk fetches",
    "floods session starts and notices",
];

fn sock(root: &Path, vm: &str) -> PathBuf {
    root.join(vm).join("v.sock")
}

fn link(root: &Path, vm: &str) -> PathBuf {
    root.join(vm).join("v.sock_7075")
}

/// Registers the VMs and assigns their users: good VM `g<i>` has `gd<i>`
/// (logs in and out) and `ov<i>` (a 1 MiB quota: its logout is refused),
/// hostile VM `h<i>` has `hs<i>`.
fn register(host: &HostDaemon, root: &Path, p: &Params) -> Result<(), String> {
    let vms = (0..p.good)
        .map(|i| format!("g{i}"))
        .chain((0..p.hostile).map(|i| format!("h{i}")));
    for vm in vms {
        std::fs::create_dir_all(root.join(&vm)).map_err(|e| e.to_string())?;
        let path = sock(root, &vm).display().to_string();
        host.ok(&["vm", "add", &vm, "--uds-path", &path]);
    }
    for i in 0..p.good {
        host.ok(&["assign", &format!("gd{i}"), &format!("g{i}")]);
        host.ok(&["assign", &format!("ov{i}"), &format!("g{i}")]);
        host.ok(&["user", "quota", &format!("ov{i}"), "1MiB"]);
    }
    for i in 0..p.hostile {
        host.ok(&["assign", &format!("hs{i}"), &format!("h{i}")]);
    }
    Ok(())
}

/// Each good VM's `ov<i>` logout, refused over its quota (the operator's
/// evidence the hostile VMs must not erase).
async fn refused_logouts(good: &[Arc<TestAgent>]) -> Result<(), String> {
    for (i, a) in good.iter().enumerate() {
        let user = format!("ov{i}");
        a.retrieve(&user, "o1").await.map_err(|e| e.to_string())?;
        let data = data::random(2 << 20, 9000 + i as u64);
        match a.update_from_lease(&user, &data).await {
            Err(e) if e.remote_code() == Some(ErrorCode::QuotaExceeded) => {}
            other => return Err(format!("{user}'s logout over the quota: {other:?}")),
        }
    }
    Ok(())
}

/// One login+logout of good VM `i`: a full retrieve, then an update with
/// a tenth of the UIF rewritten.
async fn round(a: &TestAgent, i: usize, size: usize, n: u64) -> Result<Duration, String> {
    let user = format!("gd{i}");
    let t = Instant::now();
    let (_, mut bytes) = a
        .retrieve(&user, &format!("r{n}"))
        .await
        .map_err(|e| format!("{user} login: {e}"))?;
    if bytes.len() != size {
        bytes = data::random(size, i as u64);
    }
    let at = (n as usize * 7919) % (size - size / 10);
    bytes[at..at + size / 10].copy_from_slice(&data::random(size / 10, n * 31 + i as u64));
    let r = a
        .update_from_lease(&user, &bytes)
        .await
        .map_err(|e| format!("{user} logout: {e}"))?;
    match r.answer {
        Response::Committed { .. } => Ok(t.elapsed()),
        other => Err(format!("{user} logout answered {other:?}")),
    }
}

/// All good VMs' rounds at once; returns every round's time.
async fn good_phase(good: &[Arc<TestAgent>], p: &Params, phase: u64) -> Result<Vec<f64>, String> {
    let mut tasks = JoinSet::new();
    for (i, a) in good.iter().enumerate() {
        let (a, size, rounds) = (a.clone(), p.size, p.rounds);
        tasks.spawn(async move {
            let mut times = Vec::new();
            for r in 0..rounds {
                times.push(round(&a, i, size, phase * 1000 + r as u64).await?);
            }
            Ok::<_, String>(times)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(
            r.map_err(|e| e.to_string())??
                .iter()
                .map(Duration::as_secs_f64),
        );
    }
    Ok(all)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Counts one hostile request's answer.
fn count(t: &Tally, r: &Result<Response, uve_protocol::link::LinkError>) {
    t.sent.fetch_add(1, Ordering::Relaxed);
    match r {
        Ok(_) => {}
        Err(e) if e.remote_code() == Some(ErrorCode::Busy) => {
            t.busy.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            t.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Kind 0: floods retrieves of a user it has no right to and never reads;
/// reconnects when cut off, until `stop`.
async fn non_reader(path: PathBuf, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut peer) = RawPeer::connect(&path, "non-reader").await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let flood = peer.encode_flood(50_000, || Request::UifRetrieve {
            user: valid("gd0"),
            session: valid("x"),
        });
        t.sent.fetch_add(50_000, Ordering::Relaxed);
        let (mut w, _r) = peer.into_raw_writer();
        let _ = write_until_closed(&mut w, &flood, 64 << 10).await;
    }
}

/// Kind 1: opens 64 MiB uploads, stages every chunk and drops the
/// connection before the commit, until `stop` (the UIF is chunked once:
/// the attack costs the host, not this process).
async fn stager(path: PathBuf, i: usize, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    let user = format!("hs{i}");
    let data = Arc::new(data::random(64 << 20, 7000 + i as u64));
    let (manifest, _) = uve_e2e::fake_agent::manifest_of(&data);
    while !stop.load(Ordering::Relaxed) {
        let Ok(a) = TestAgent::connect(&path).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        t.sent.fetch_add(1, Ordering::Relaxed);
        let staged = match scale::begin_update(&a.handle, &user, manifest.header).await {
            Ok(upload) => scale::send_pages(&a.handle, upload, &manifest, &data).await,
            Err(e) => Err(e),
        };
        match staged {
            Ok(bytes) => {
                t.staged.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) if e.contains("Busy") => {
                t.busy.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                t.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        a.handle.close();
    }
}

/// Kinds 2 and 3: `make` requests, 32 in flight, until `stop`.
async fn flood(
    a: Arc<TestAgent>,
    stop: Arc<AtomicBool>,
    t: Arc<Tally>,
    make: Arc<dyn Fn(u64) -> Request + Send + Sync>,
) {
    let mut tasks = JoinSet::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && !a.handle.is_closed() {
        while tasks.len() < 32 {
            n += 1;
            let (a, t, req) = (a.clone(), t.clone(), make(n));
            tasks.spawn(async move { count(&t, &a.request(req).await) });
        }
        let _ = tasks.join_next().await;
    }
}

/// Kind 4: a fresh session and its unexpected disconnect, again and again,
/// 16 sessions at a time, until `stop`.
async fn notice_flood(a: Arc<TestAgent>, i: usize, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    let user = format!("hs{i}");
    let make = Arc::new(move |n: u64| {
        let session = valid(&format!("f{n}"));
        if n.is_multiple_of(2) {
            Request::SessionStarted {
                session,
                user: valid(&user),
                ua: None,
            }
        } else {
            Request::UnexpectedDisconnect(DisconnectNotice {
                id: n,
                session: valid(&format!("f{}", n - 1)),
                user: valid(&user),
                ua: None,
                reason: "flood".into(),
                at: 0,
            })
        }
    });
    flood(a, stop, t, make).await;
}

/// Starts hostile VM `i`'s attack (in the `hostile-vm` child process);
/// its set-up (a head to fetch from) is done before it returns.
async fn start_hostile(
    root: &Path,
    (i, kind): (usize, usize),
    stop: &Arc<AtomicBool>,
    t: &Arc<Tally>,
    tasks: &mut JoinSet<()>,
) -> Result<(), String> {
    let path = link(root, &format!("h{i}"));
    let (stop, t) = (stop.clone(), t.clone());
    match kind {
        0 => {
            tasks.spawn(non_reader(path, stop, t));
        }
        1 => {
            tasks.spawn(stager(path, i, stop, t));
        }
        _ => {
            let a = Arc::new(TestAgent::connect(&path).await?);
            let user = format!("hs{i}");
            match kind {
                2 => {
                    let make = Arc::new(|n| Request::Ping { nonce: n });
                    tasks.spawn(flood(a, stop, t, make));
                }
                3 => {
                    a.retrieve(&user, "b0").await.map_err(|e| e.to_string())?;
                    let head = data::random(8 << 20, 8000 + i as u64);
                    a.update_from_lease(&user, &head)
                        .await
                        .map_err(|e| e.to_string())?;
                    let (l, _) = uve_e2e::fake_agent::manifest_of(&head);
                    let hashes: Vec<_> = l.chunks.iter().map(|c| c.hash).collect();
                    let make = Arc::new(move |n: u64| Request::ChunkFetch {
                        user: valid(&user),
                        hash: hashes[n as usize % hashes.len()],
                    });
                    a.retrieve(&format!("hs{i}"), "b1")
                        .await
                        .map_err(|e| e.to_string())?;
                    tasks.spawn(flood(a, stop, t, make));
                }
                _ => {
                    tasks.spawn(notice_flood(a, i, stop, t));
                }
            }
        }
    }
    Ok(())
}

/// The `hostile-vm` child: `uve-bench hostile-vm ROOT I KIND` attacks as
/// hostile VM `h<I>` until its stdin closes, then prints what it sent.
/// The parent runs each hostile VM in such a child at nice 19, so that the
/// attackers' own CPU (a guest's, on a real hypervisor) is not taken from
/// the host and the good VMs it measures; the host's work for them is.
pub fn vm_main(args: &[String]) -> Result<(), String> {
    let [root, i, kind] = args else {
        return Err("usage: uve-bench hostile-vm ROOT INDEX KIND".into());
    };
    let i: usize = i.parse().map_err(|e| format!("index: {e}"))?;
    let kind: usize = kind.parse().map_err(|e| format!("kind: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let t = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        let mut tasks = JoinSet::new();
        start_hostile(Path::new(root), (i, kind), &stop, &t, &mut tasks).await?;
        println!("ready");
        let s2 = stop.clone();
        let stdin_closed = tokio::task::spawn_blocking(move || {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            s2.store(true, Ordering::Relaxed);
        });
        let _ = stdin_closed.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        Ok::<_, String>(())
    })?;
    println!(
        "tally {} {} {} {}",
        t.sent.load(Ordering::Relaxed),
        t.busy.load(Ordering::Relaxed),
        t.refused.load(Ordering::Relaxed),
        t.staged.load(Ordering::Relaxed)
    );
    Ok(())
}

/// A hostile VM's child process (killed if still running when dropped).
struct Child {
    proc: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// Starts hostile VM `i` of `kind` in a child at nice 19 and waits until
/// it is set up.
fn spawn_child(root: &Path, i: usize, kind: usize) -> Result<Child, String> {
    use std::io::BufRead;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut proc = std::process::Command::new("nice")
        .args(["-n", "19"])
        .arg(exe)
        .arg("hostile-vm")
        .arg(root)
        .args([i.to_string(), kind.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("hostile VM {i}: {e}"))?;
    let out = proc.stdout.take().ok_or("no stdout")?;
    let mut child = Child {
        proc,
        out: std::io::BufReader::new(out),
    };
    let mut line = String::new();
    child
        .out
        .read_line(&mut line)
        .map_err(|e| format!("hostile VM {i}: {e}"))?;
    if line.trim() != "ready" {
        return Err(format!("hostile VM {i} did not set up: {line:?}"));
    }
    Ok(child)
}

/// Ends a child (its stdin closed) and adds what it sent to `t`.
fn end_child(mut c: Child, t: &Tally) {
    use std::io::BufRead;
    drop(c.proc.stdin.take());
    let mut line = String::new();
    while c.out.read_line(&mut line).is_ok_and(|n| n > 0) {
        if let Some(rest) = line.trim().strip_prefix("tally ") {
            let v: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
            if let [sent, busy, refused, staged] = v[..] {
                t.sent.fetch_add(sent, Ordering::Relaxed);
                t.busy.fetch_add(busy, Ordering::Relaxed);
                t.refused.fetch_add(refused, Ordering::Relaxed);
                t.staged.fetch_add(staged, Ordering::Relaxed);
            }
        }
        line.clear();
    }
}

/// The update_refused events of the good VMs' `ov<i>` users still listed.
fn refusals_listed(host: &HostDaemon, good: usize) -> usize {
    let events = host.events(0);
    (0..good)
        .filter(|i| {
            let user = format!("ov{i}");
            events
                .iter()
                .any(|e| e["kind"] == "update_refused" && e["user"] == user.as_str())
        })
        .count()
}

/// What one run measured.
struct Measured {
    alone: Vec<f64>,
    attacked: Vec<f64>,
    rss_before: u64,
    rss_peak: u64,
    gone_at: Instant,
}

/// The two phases: the good VMs alone, then beside the hostile VMs while
/// the host's RSS is sampled; the hostile VMs are gone when it returns.
async fn phases(root: &Path, p: &Params, pid: u32, t: &Arc<Tally>) -> Result<Measured, String> {
    let mut good = Vec::new();
    for i in 0..p.good {
        good.push(Arc::new(
            TestAgent::connect(&link(root, &format!("g{i}"))).await?,
        ));
    }
    refused_logouts(&good).await?;
    let alone = good_phase(&good, p, 1).await?;
    let rss_before = sys::status_kib(pid, "VmRSS").unwrap_or(0);
    let (r2, kinds) = (root.to_path_buf(), p.kinds.clone());
    let n = p.hostile;
    let children = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|i| spawn_child(&r2, i, kinds[i % kinds.len()]))
            .collect::<Result<Vec<_>, String>>()
    })
    .await
    .map_err(|e| e.to_string())??;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while !s2.load(Ordering::Relaxed) {
            peak = peak.max(sys::status_kib(pid, "VmRSS").unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    });
    let attacked = good_phase(&good, p, 2).await?;
    stop.store(true, Ordering::Relaxed);
    let rss_peak = sampler.await.map_err(|e| e.to_string())?;
    let t = t.clone();
    tokio::task::spawn_blocking(move || {
        for c in children {
            end_child(c, &t);
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(Measured {
        alone,
        attacked,
        rss_before,
        rss_peak,
        gone_at: Instant::now(),
    })
}

/// Runs the hostile benchmark; returns rows (`Err` if a good VM failed).
pub fn run(bins: &Binaries, work: &Path, p: &Params) -> Result<Vec<Row>, String> {
    if p.kinds.iter().any(|k| *k >= KINDS.len()) || p.kinds.is_empty() {
        return Err(format!("hostile kinds are 0..{}", KINDS.len() - 1));
    }
    sys::raise_nofile();
    let host = HostDaemon::start_with(
        &bins.host,
        &bins.uvectl,
        work,
        "heartbeat_ms = 1000\nwrite_deadline_ms = 3000\n",
    )?;
    let root = work.join("h");
    register(&host, &root, p)?;
    let pid = host.pid().ok_or("host not running")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let t = Arc::new(Tally::default());
    let mut m = rt.block_on(phases(&root, p, pid, &t))?;
    drop(rt);
    let wait = p.settle.saturating_sub(m.gone_at.elapsed());
    eprintln!("  hostile VMs gone; reading the staged bytes in {wait:?}");
    std::thread::sleep(wait);
    Ok(rows(&host, p, &mut m, &t))
}

/// The table rows of one run.
fn rows(host: &HostDaemon, p: &Params, m: &mut Measured, t: &Tally) -> Vec<Row> {
    let staged = host.metric("uve_staged_bytes");
    let listed = refusals_listed(host, p.good);
    let (attacked, alone) = (median(&mut m.attacked), median(&mut m.alone));
    let kinds: Vec<&str> = (0..p.hostile)
        .map(|i| KINDS[p.kinds[i % p.kinds.len()]])
        .collect();
    let mib = |kib: u64| kib as f64 / 1024.0;
    vec![
        Row::new(
            format!(
                "{} good VMs, login+logout of {} MiB beside {} hostile VMs: median (s)",
                p.good,
                p.size >> 20,
                p.hostile
            ),
            attacked,
            "the same, no hostile VM",
            alone,
            false,
        ),
        Row::text("hostile VMs", kinds.join("; "), "", ""),
        Row::text(
            "hostile requests sent / answered Busy / refused",
            format!(
                "{} / {} / {}",
                t.sent.load(Ordering::Relaxed),
                t.busy.load(Ordering::Relaxed),
                t.refused.load(Ordering::Relaxed)
            ),
            "",
            "",
        ),
        Row::text(
            "good-VM time ratio",
            format!("{:.2}", attacked / alone),
            "goal",
            "<= 1.5",
        ),
        Row::text(
            "host peak RSS growth during the attack (MiB)",
            format!("{:.1}", mib(m.rss_peak.saturating_sub(m.rss_before))),
            "goal",
            "< 64",
        ),
        Row::text(
            format!(
                "staged bytes {:?} after the hostile VMs disconnect (of {:.1} MB they staged)",
                p.settle,
                t.staged.load(Ordering::Relaxed) as f64 / 1e6
            ),
            staged.to_string(),
            "goal",
            "0",
        ),
        Row::text(
            "good VMs' update_refused events still listed",
            format!("{listed}/{}", p.good),
            "goal",
            "all",
        ),
        Row::text(
            "VMs cut off for not reading",
            host.metric("uve_stalled_cut_off_total").to_string(),
            "",
            "",
        ),
    ]
}
