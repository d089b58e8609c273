//! Scale benchmark: many simulated agents (in this process, speaking the
//! real protocol over real Unix sockets, one registered VM each) hold
//! connections with heartbeats against the real `uve-host` binary, send
//! pings and unexpected-disconnect notices, while a few of them push large
//! UIF updates. Reports the host's RSS and CPU and the latency of control
//! requests under bulk load.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use uve_e2e::binaries::Binaries;
use uve_e2e::fake_agent::{self, AgentLink};
use uve_e2e::host::HostDaemon;
use uve_protocol::chunker::chunk_stream;
use uve_protocol::defs::PROTOCOL_MAX;
use uve_protocol::link::LinkHandle;
use uve_protocol::manifest::{Manifest, ManifestHeader, chunks_per_page};
use uve_protocol::message::{DisconnectNotice, Request, Response, UpdateBegin, UpdateCause};

use crate::Row;
use crate::data;
use crate::sys;
use uve_e2e::names::valid;

/// Parameters of a scale run.
pub struct Params {
    /// Simulated agents (VMs).
    pub agents: usize,
    /// Agents that push updates meanwhile.
    pub bulk_agents: usize,
    /// Size of each update.
    pub bulk_size: usize,
    /// Length of the measured phase.
    pub phase: Duration,
}

#[derive(Default)]
struct Samples {
    start_us: Vec<u64>,
    ping_us: Vec<u64>,
    notice_us: Vec<u64>,
    bulk_bytes: u64,
    bulk_commits: u64,
    errors: Vec<String>,
}

fn vm_dir(root: &Path, i: usize) -> PathBuf {
    root.join(format!("v{i:04}"))
}

async fn connect(root: &Path, i: usize) -> Result<LinkHandle, String> {
    let path = vm_dir(root, i).join("v.sock_7075");
    let hello = fake_agent::hello("uve-bench", PROTOCOL_MAX, [0; 16]);
    let AgentLink {
        handle: h,
        mut incoming,
        ..
    } = fake_agent::dial_as_agent(&path, hello, Duration::from_secs(30))
        .await
        .map_err(|e| format!("vm {i}: {e}"))?;
    tokio::spawn(async move {
        while let Some(inc) = incoming.recv().await {
            let _ = inc.responder.send(Response::Ok).await;
        }
    });
    Ok(h)
}

/// Sends `req` (within 10 s) and records its round trip (µs) in the
/// samples `kept` picks, or the error as `vm <i> <what>: …`.
async fn timed(
    h: &LinkHandle,
    req: Request,
    samples: &Mutex<Samples>,
    (i, what): (usize, &str),
    kept: fn(&mut Samples) -> &mut Vec<u64>,
) {
    let t = Instant::now();
    let r = h.request_timeout(req, Duration::from_secs(10)).await;
    let us = t.elapsed().as_micros() as u64;
    let mut s = samples.lock().unwrap_or_else(PoisonError::into_inner);
    match r {
        Ok(_) => kept(&mut s).push(us),
        Err(e) => s.errors.push(format!("vm {i} {what}: {e}")),
    }
}

/// One agent's control traffic, as a real agent's: its user's session
/// announced first (`SessionStarted`; the host accepts notices only for
/// sessions the sending VM has announced), then a ping about every second
/// and one unexpected-disconnect notice of that session at a random moment.
/// `tag` names the phase (its sessions are its own).
async fn control_loop(
    h: LinkHandle,
    (i, tag): (usize, &'static str),
    phase: Duration,
    samples: Arc<Mutex<Samples>>,
) {
    let start = Instant::now();
    let seed = if tag == "s" { 0 } else { 1 << 32 };
    let mut rng = data::Rng::new(seed + i as u64 + 1);
    let started = Request::SessionStarted {
        session: valid(&format!("{tag}{i}")),
        user: valid(&format!("user{i}")),
        ua: Some(valid("desk")),
    };
    timed(&h, started, &samples, (i, "session start"), |s| {
        &mut s.start_us
    })
    .await;
    let notice_at = Duration::from_millis(rng.next() % phase.as_millis().max(1) as u64);
    tokio::time::sleep(Duration::from_millis(rng.next() % 1000)).await;
    let mut noticed = false;
    while start.elapsed() < phase {
        let ping = Request::Ping { nonce: i as u64 };
        timed(&h, ping, &samples, (i, "ping"), |s| &mut s.ping_us).await;
        if !noticed && start.elapsed() >= notice_at {
            noticed = true;
            let n = DisconnectNotice {
                id: rng.next(),
                session: valid(&format!("{tag}{i}")),
                user: valid(&format!("user{i}")),
                ua: Some(valid("desk")),
                reason: "simulated UA crash".into(),
                at: 0,
            };
            let notice = Request::UnexpectedDisconnect(n);
            timed(&h, notice, &samples, (i, "notice"), |s| &mut s.notice_us).await;
        }
        tokio::time::sleep(Duration::from_millis(900 + rng.next() % 200)).await;
    }
}

/// Pushes fresh `size`-byte UIFs for `user` until the phase ends.
async fn bulk_loop(
    h: LinkHandle,
    i: usize,
    size: usize,
    phase: Duration,
    samples: Arc<Mutex<Samples>>,
) {
    let start = Instant::now();
    let user = format!("bulk{i}");
    let mut round = 0u64;
    while start.elapsed() < phase {
        round += 1;
        match one_update(&h, &user, size, i as u64 * 1000 + round).await {
            Ok(bytes) => {
                let mut s = samples.lock().unwrap_or_else(PoisonError::into_inner);
                s.bulk_bytes += bytes;
                s.bulk_commits += 1;
            }
            Err(e) => {
                samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .errors
                    .push(format!("bulk {i}: {e}"));
                return;
            }
        }
    }
}

async fn one_update(h: &LinkHandle, user: &str, size: usize, seed: u64) -> Result<u64, String> {
    let bytes = tokio::task::spawn_blocking(move || data::random(size, seed))
        .await
        .map_err(|e| e.to_string())?;
    let bytes = Arc::new(bytes);
    let b2 = bytes.clone();
    let manifest = tokio::task::spawn_blocking(move || chunk_stream(&b2[..], |_, _| Ok(())))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let upload = begin_update(h, user, manifest.header).await?;
    let sent = send_pages(h, upload, &manifest, &bytes).await?;
    match h
        .request(Request::UpdateCommit { upload })
        .await
        .map_err(|e| format!("commit: {e}"))?
    {
        Response::Committed { .. } => Ok(sent),
        other => Err(format!("commit answered {other:?}")),
    }
}

/// Retrieves `user`'s head and begins an update on it; returns the upload id.
pub(crate) async fn begin_update(
    h: &LinkHandle,
    user: &str,
    header: ManifestHeader,
) -> Result<u64, String> {
    let grant = match h
        .request(Request::UifRetrieve {
            user: valid(user),
            session: valid(&format!("{user}-s")),
        })
        .await
        .map_err(|e| format!("retrieve: {e}"))?
    {
        Response::Retrieve(g) => g,
        other => return Err(format!("retrieve answered {other:?}")),
    };
    match h
        .request(Request::UpdateBegin(UpdateBegin {
            user: valid(user),
            session: valid(&format!("{user}-s")),
            base: grant.version,
            lease: grant.lease,
            header,
            cause: UpdateCause::Checkpoint,
        }))
        .await
        .map_err(|e| format!("begin: {e}"))?
    {
        Response::UpdateAccepted { upload } => Ok(upload),
        other => Err(format!("begin answered {other:?}")),
    }
}

/// Sends the manifest's pages and uploads the chunks the host misses, at
/// most 8 at a time; returns the bytes uploaded.
pub(crate) async fn send_pages(
    h: &LinkHandle,
    upload: u64,
    manifest: &Manifest,
    bytes: &Arc<Vec<u8>>,
) -> Result<u64, String> {
    let per = chunks_per_page(h.max_frame()) as usize;
    let offsets: Vec<usize> = manifest.offsets().map(|(o, _)| o as usize).collect();
    let mut sent = 0u64;
    for (p, page) in manifest.chunks.chunks(per).enumerate() {
        let missing = match h
            .request(Request::UpdatePage {
                upload,
                page: p as u32,
                chunks: page.to_vec(),
            })
            .await
            .map_err(|e| format!("page: {e}"))?
        {
            Response::Missing(m) => m,
            other => return Err(format!("page answered {other:?}")),
        };
        let mut inflight = JoinSet::new();
        for idx in missing {
            let k = p * per + idx as usize;
            let c = manifest.chunks.get(k).copied().ok_or("bad missing index")?;
            let off = offsets[k];
            let data = bytes[off..off + c.len as usize].to_vec();
            sent += u64::from(c.len);
            let h = h.clone();
            inflight.spawn(async move {
                h.request(Request::ChunkUpload {
                    upload,
                    hash: c.hash,
                    data,
                })
                .await
            });
            while inflight.len() >= 8 {
                if let Some(r) = inflight.join_next().await {
                    r.map_err(|e| e.to_string())?
                        .map_err(|e| format!("upload: {e}"))?;
                }
            }
        }
        while let Some(r) = inflight.join_next().await {
            r.map_err(|e| e.to_string())?
                .map_err(|e| format!("upload: {e}"))?;
        }
    }
    Ok(sent)
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let k = ((v.len() - 1) as f64 * p).round() as usize;
    v[k] as f64 / 1000.0
}

/// Registers `p.agents` VMs (one Unix socket directory each under `root`)
/// and assigns the bulk users to the first ones.
fn register_vms(host: &HostDaemon, root: &Path, p: &Params) -> Result<(), String> {
    let t = Instant::now();
    for i in 0..p.agents {
        let d = vm_dir(root, i);
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        host.ok(&[
            "vm",
            "add",
            &format!("vm{i:04}"),
            "--uds-path",
            &d.join("v.sock").display().to_string(),
        ]);
    }
    for i in 0..p.bulk_agents {
        host.ok(&["assign", &format!("bulk{i}"), &format!("vm{i:04}")]);
    }
    // Each agent's session user, whose session it announces and ends.
    for i in 0..p.agents {
        host.ok(&["assign", &format!("user{i}"), &format!("vm{i:04}")]);
    }
    eprintln!("  registered {} VMs in {:?}", p.agents, t.elapsed());
    Ok(())
}

/// What the host process did: RSS (KiB) at each point, CPU seconds and the
/// phase's wall time, and how many connections lived through it.
struct HostFigures {
    idle_rss: u64,
    connected_rss: u64,
    rss_peak: u64,
    hwm: u64,
    cpu: f64,
    wall: Duration,
    alive: usize,
}

/// Connects every agent, runs the control loops (and, with `bulk`, the
/// bulk loops) for the phase while sampling the host's RSS, and measures
/// the host (`pid`).
fn measured_phase(
    root: &Path,
    p: &Params,
    (pid, idle_rss): (u32, u64),
    bulk: bool,
    samples: &Arc<Mutex<Samples>>,
) -> Result<HostFigures, String> {
    let tag = if bulk { "s" } else { "q" };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (handles, connected_rss, cpu0, rss_peak, wall) = rt.block_on(async {
        let mut handles = Vec::with_capacity(p.agents);
        for i in 0..p.agents {
            handles.push(connect(root, i).await?);
        }
        let connected_rss = sys::status_kib(pid, "VmRSS").unwrap_or(0);
        let cpu0 = sys::cpu_secs(pid).unwrap_or(0.0);
        let t0 = Instant::now();
        let mut tasks = JoinSet::new();
        for (i, h) in handles.iter().enumerate() {
            tasks.spawn(control_loop(h.clone(), (i, tag), p.phase, samples.clone()));
            if bulk && i < p.bulk_agents {
                tasks.spawn(bulk_loop(h.clone(), i, p.bulk_size, p.phase, samples.clone()));
            }
        }
        let mut rss_peak = connected_rss;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while !tasks.is_empty() {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = tick.tick() => rss_peak = rss_peak.max(sys::status_kib(pid, "VmRSS").unwrap_or(0)),
            }
        }
        Ok::<_, String>((handles, connected_rss, cpu0, rss_peak, t0.elapsed()))
    })?;
    let cpu = sys::cpu_secs(pid).unwrap_or(0.0) - cpu0;
    let alive = handles.iter().filter(|h| !h.is_closed()).count();
    let hwm = sys::status_kib(pid, "VmHWM").unwrap_or(0);
    drop(handles);
    drop(rt);
    Ok(HostFigures {
        idle_rss,
        connected_rss,
        rss_peak,
        hwm,
        cpu,
        wall,
        alive,
    })
}

/// Runs the scale benchmark; returns rows.
pub fn run(bins: &Binaries, work: &Path, p: &Params) -> Result<Vec<Row>, String> {
    let limit = sys::raise_nofile();
    if limit < (p.agents as u64) * 3 + 100 {
        return Err(format!(
            "open-file limit {limit} too low for {} agents",
            p.agents
        ));
    }
    let host = HostDaemon::start_with(
        &bins.host,
        &bins.uvectl,
        work,
        "heartbeat_ms = 1000\nmax_uploads_per_vm = 4\n",
    )?;
    let root = work.join("s");
    register_vms(&host, &root, p)?;
    let pid = host.pid().ok_or("host not running")?;
    let idle_rss = sys::status_kib(pid, "VmRSS").unwrap_or(0);

    // The same control traffic without the bulk load first: the
    // baseline of the latencies under load.
    let quiet = Arc::new(Mutex::new(Samples::default()));
    measured_phase(&root, p, (pid, idle_rss), false, &quiet)?;
    let mut q = quiet.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(first) = q.errors.first() {
        return Err(format!(
            "{} requests failed without the bulk load, first: {first}",
            q.errors.len()
        ));
    }
    let samples = Arc::new(Mutex::new(Samples::default()));
    let f = measured_phase(&root, p, (pid, idle_rss), true, &samples)?;
    let mut s = samples.lock().unwrap_or_else(PoisonError::into_inner);
    let mut rows = result_rows(p, &f, &mut s);
    rows.insert(
        5,
        against_quiet("ping round trip", &mut s.ping_us, &mut q.ping_us),
    );
    rows.insert(
        6,
        against_quiet("disconnect notice ack", &mut s.notice_us, &mut q.notice_us),
    );
    if let Some(first) = s.errors.first() {
        // A figure built on failed requests is no figure: the run fails.
        return Err(format!(
            "{} requests failed, first: {first}; figures so far: {}",
            s.errors.len(),
            rows.iter()
                .map(|r| format!("{}: {}", r.what, r.ours))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if s.notice_us.len() < p.agents / 2 || s.start_us.len() != p.agents {
        return Err(format!(
            "only {} of {} agents announced a session and {} sent their notice: the phase ({:?}) is too short to measure",
            s.start_us.len(),
            p.agents,
            s.notice_us.len(),
            p.phase
        ));
    }
    Ok(rows)
}

/// The row of a latency (`what`): p50 / p99 / max of `samples` in ms,
/// against the goal p99 < 10 ms.
fn latency_row(what: &str, samples: &mut [u64]) -> Row {
    Row::text(
        format!("{what} p50 / p99 / max (ms)"),
        format!(
            "{:.2} / {:.2} / {:.2}",
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            percentile(samples, 1.0)
        ),
        "goal p99",
        "< 10",
    )
}

/// The p99 of `loaded` against the same without the bulk load (`quiet`),
/// in ms (the goal: at most 10 times).
fn against_quiet(what: &str, loaded: &mut [u64], quiet: &mut [u64]) -> Row {
    Row::new(
        format!("{what} p99 under the bulk load (ms)"),
        percentile(loaded, 0.99),
        "the same without it",
        percentile(quiet, 0.99),
        false,
    )
}

/// The table rows of one scale run.
fn result_rows(p: &Params, f: &HostFigures, s: &mut Samples) -> Vec<Row> {
    let n = p.agents;
    let mb = |kib: u64| kib as f64 / 1024.0;
    vec![
        Row::text(
            format!("{n} agents: connections alive after {:?}", p.phase),
            format!("{}/{n}", f.alive),
            "all",
            "",
        ),
        Row::text(
            format!(
                "{} agents × {} MiB updates meanwhile",
                p.bulk_agents,
                p.bulk_size >> 20
            ),
            format!(
                "{} commits, {:.0} MB/s",
                s.bulk_commits,
                s.bulk_bytes as f64 / 1e6 / f.wall.as_secs_f64()
            ),
            "",
            "",
        ),
        latency_row("ping round trip", &mut s.ping_us),
        latency_row("session start ack", &mut s.start_us),
        latency_row("disconnect notice ack", &mut s.notice_us),
        Row::text(
            "host RSS idle / connected / peak (MiB)",
            format!(
                "{:.1} / {:.1} / {:.1} (VmHWM {:.1})",
                mb(f.idle_rss),
                mb(f.connected_rss),
                mb(f.rss_peak),
                mb(f.hwm)
            ),
            "goal",
            "< 256",
        ),
        Row::text(
            "host CPU during the phase",
            format!("{:.0} % of one core", f.cpu * 100.0 / f.wall.as_secs_f64()),
            "",
            "",
        ),
        Row::text("errors", s.errors.len().to_string(), "", "0"),
    ]
}
