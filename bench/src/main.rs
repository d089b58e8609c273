//! `uve-bench`: measures uve against baselines run side by side on the same
//! data in the same run, and prints one table (see `bench/README.md`).
//!
//! `cargo run --release -p uve-bench -- all` (1 GiB UIFs, 1,000 agents;
//! a few minutes on 2 cores). `--size-mib` and `--agents` shrink it (CI
//! runs a smoke size so the harness cannot rot).

// A benchmark program: a broken setup should stop it loudly.
#![allow(clippy::expect_used, clippy::cast_possible_truncation)]

mod data;
mod hostile;
mod incremental;
mod rig;
mod s3store;
mod scale;
mod sys;
mod transfer;

use std::path::Path;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

/// One line of the result table.
pub struct Row {
    what: String,
    ours: String,
    baseline: String,
    theirs: String,
    ratio: String,
}

impl Row {
    /// A measured row with a numeric baseline; ratio = ours / baseline.
    pub fn new(
        what: impl Into<String>,
        ours: f64,
        baseline: &str,
        theirs: f64,
        _throughput: bool,
    ) -> Self {
        Row {
            what: what.into(),
            ours: fmt(ours),
            baseline: baseline.into(),
            theirs: fmt(theirs),
            ratio: if theirs > 0.0 {
                format!("{:.2}", ours / theirs)
            } else {
                "-".into()
            },
        }
    }

    /// A row with a time and a byte count and no baseline.
    pub fn info(what: impl Into<String>, took: Duration, bytes: u64) -> Self {
        Row::text(
            what,
            format!("{:.2} s / {:.1} MB", took.as_secs_f64(), bytes as f64 / 1e6),
            "",
            "",
        )
    }

    /// A free-form row.
    pub fn text(
        what: impl Into<String>,
        ours: impl Into<String>,
        baseline: &str,
        theirs: &str,
    ) -> Self {
        Row {
            what: what.into(),
            ours: ours.into(),
            baseline: baseline.into(),
            theirs: theirs.into(),
            ratio: String::new(),
        }
    }
}

fn fmt(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    All,
    Transfer,
    Incremental,
    Scale,
    Footprint,
    Chunking,
    /// S3 store on a real Ceph RGW vs the local store (not in `all`).
    S3,
    /// Good VMs beside hostile ones (not in `all`).
    Hostile,
}

#[derive(Parser)]
#[command(about = "uve benchmarks, side by side with their baselines")]
struct Cli {
    /// Which benchmark.
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// UIF size for transfer / incremental / chunking (MiB).
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Simulated agents in the scale benchmark.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Agents pushing updates during the scale benchmark.
    #[arg(long, default_value_t = 4)]
    bulk_agents: usize,
    /// Size of each update in the scale benchmark (MiB).
    #[arg(long, default_value_t = 256)]
    bulk_mib: usize,
    /// Length of the scale benchmark's measured phase (s).
    #[arg(long, default_value_t = 20)]
    phase_secs: u64,
    /// Good and hostile VMs in the hostile benchmark (each).
    #[arg(long, default_value_t = 10)]
    vms: usize,
    /// Login+logout rounds of each good VM per phase (hostile benchmark).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds after the hostile VMs disconnect before the staged bytes
    /// are read (hostile benchmark).
    #[arg(long, default_value_t = 60)]
    settle_secs: u64,
    /// The kinds the hostile VMs take in turn: 0 floods and stops reading,
    /// 1 stages and abandons uploads, 2 floods pings, 3 floods chunk
    /// fetches, 4 floods session starts and notices.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,4")]
    hostile_kinds: Vec<usize>,
    /// Work directory (default: a temporary directory under target/).
    #[arg(long)]
    work: Option<std::path::PathBuf>,
    /// Keep the work directory (logs of host and agent) instead of
    /// removing it at the end; its path is printed.
    #[arg(long)]
    keep: bool,
}

fn chunking(work: &Path, size: usize) -> Vec<Row> {
    let f = work.join("chunking.img");
    data::write_file(&f, &data::random(size, 31)).expect("write");
    let best = |mut run: Box<dyn FnMut()>| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let p = f.clone();
    let ours = best(Box::new(move || {
        uve_protocol::chunker::chunk_file(&p).expect("chunk");
    }));
    let p = f.clone();
    let b3 = best(Box::new(move || {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(&p).expect("open"))
            .expect("read");
        std::hint::black_box(h.finalize());
    }));
    let mut rows = vec![Row::new(
        format!("chunk + hash {} MiB (MB/s)", size >> 20),
        size as f64 / 1e6 / ours,
        "plain BLAKE3 of the file",
        size as f64 / 1e6 / b3,
        true,
    )];
    let t = Instant::now();
    if let Ok(o) = std::process::Command::new("sha256sum").arg(&f).output()
        && o.status.success()
    {
        let secs = t.elapsed().as_secs_f64();
        rows.push(Row::new(
            format!("chunk + hash {} MiB (MB/s)", size >> 20),
            size as f64 / 1e6 / ours,
            "sha256sum",
            size as f64 / 1e6 / secs,
            true,
        ));
    }
    let _ = std::fs::remove_file(&f);
    rows
}

fn footprint(
    bins: &uve_e2e::binaries::Binaries,
    rig: Option<&rig::Rig>,
    flush_hwm: Option<u64>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let static_bin = repo.join("target/static/x86_64-unknown-linux-gnu/release/uve-agent");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6).ok();
    match size(&static_bin) {
        Some(s) => rows.push(Row::text(
            "agent static binary, stripped (MB)",
            format!("{s:.2}"),
            "",
            "",
        )),
        None => rows.push(Row::text(
            "agent release binary, dynamic (MB)",
            format!("{:.2}", size(&bins.agent).unwrap_or(0.0)),
            "static build: tests/prepare.sh",
            "",
        )),
    }
    if let Some(pid) = rig.and_then(|r| r.agent.pid()) {
        let rss = sys::status_kib(pid, "VmRSS").unwrap_or(0);
        rows.push(Row::text(
            "agent RSS, connected and idle (MiB)",
            format!("{:.1}", rss as f64 / 1024.0),
            "goal",
            "<= 8",
        ));
    }
    if let Some(hwm) = flush_hwm {
        rows.push(Row::text(
            "agent peak RSS through a full update (MiB)",
            format!("{:.1}", hwm as f64 / 1024.0),
            "",
            "",
        ));
    }
    rows
}

/// The run's work directory: a fresh one under `--work` (default target/).
fn work_dir(cli: &Cli) -> tempfile::TempDir {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let base = cli.work.clone().unwrap_or_else(|| repo.join("target"));
    std::fs::create_dir_all(&base).expect("work base");
    tempfile::Builder::new()
        .prefix("bench-")
        .tempdir_in(&base)
        .expect("work dir")
}

/// Whether `w` is to run: chosen itself, or part of `all` (S3 is not).
fn selected(cli: &Cli, w: Which) -> bool {
    (cli.which == Which::All && w != Which::S3 && w != Which::Hostile) || cli.which == w
}

/// Transfer and footprint share one rig; returns the footprint's peak RSS
/// through a full update when transfer ran.
fn transfer_and_footprint(
    cli: &Cli,
    bins: &uve_e2e::binaries::Binaries,
    work: &Path,
    size: usize,
    rows: &mut Vec<Row>,
) -> Option<u64> {
    let run = |w: Which| selected(cli, w);
    let mut flush_hwm = None;
    eprintln!("transfer…");
    let dir = work.join("transfer");
    std::fs::create_dir_all(&dir).expect("dir");
    let rig = rig::Rig::start(bins, &dir, false).expect("start host + agent");
    if run(Which::Footprint) {
        std::thread::sleep(Duration::from_secs(1));
        rows.extend(footprint(bins, Some(&rig), None));
    }
    if run(Which::Transfer) {
        let (r, hwm) = transfer::run(&rig, &dir, size);
        rows.extend(r);
        flush_hwm = hwm;
        if run(Which::Footprint) {
            rows.extend(footprint(bins, None, flush_hwm).into_iter().skip(1));
        }
    }
    flush_hwm
}

/// The scale benchmark, in a short-named directory under /tmp; a failed
/// run is one row saying why, and `Err` with it (the bench then exits 1).
fn scale_rows(cli: &Cli, bins: &uve_e2e::binaries::Binaries) -> Result<Vec<Row>, Vec<Row>> {
    eprintln!("scale…");
    // Unix socket paths are limited to 108 bytes: keep this one short.
    let dir = tempfile::Builder::new()
        .prefix("ub-")
        .tempdir_in("/tmp")
        .expect("scale dir");
    let p = scale::Params {
        agents: cli.agents,
        bulk_agents: cli.bulk_agents.min(cli.agents),
        bulk_size: cli.bulk_mib << 20,
        phase: Duration::from_secs(cli.phase_secs),
    };
    scale::run(bins, dir.path(), &p)
        .map_err(|e| vec![Row::text("scale", format!("failed: {e}"), "", "")])
}

/// The hostile benchmark, in a short-named directory under `--work` or
/// /tmp (Unix socket paths are limited to 108 bytes: keep `--work` short);
/// a failed good VM is one row saying why, and `Err`.
fn hostile_rows(cli: &Cli, bins: &uve_e2e::binaries::Binaries) -> Result<Vec<Row>, Vec<Row>> {
    let dir = tempfile::Builder::new()
        .prefix("uh-")
        .tempdir_in(cli.work.as_deref().unwrap_or(Path::new("/tmp")))
        .expect("hostile dir");
    let p = hostile::Params {
        good: cli.vms,
        hostile: cli.vms,
        size: cli.size_mib << 20,
        rounds: cli.rounds,
        settle: Duration::from_secs(cli.settle_secs),
        kinds: cli.hostile_kinds.clone(),
    };
    hostile::run(bins, dir.path(), &p)
        .map_err(|e| vec![Row::text("hostile", format!("failed: {e}"), "", "")])
}

/// Prints the result table and the run's footer.
fn print_table(cli: &Cli, rows: &[Row], started: Instant) {
    println!("\n| benchmark | uve | baseline | baseline figure | uve / baseline |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.ours, r.baseline, r.theirs, r.ratio
        );
    }
    println!(
        "\n{} cores, {} MiB UIFs, total {:.0} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cli.size_mib,
        started.elapsed().as_secs_f64()
    );
}

fn main() {
    // A hostile VM of `uve-bench hostile`, run as a child process.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("hostile-vm") {
        if let Err(e) = hostile::vm_main(&args[1..]) {
            eprintln!("uve-bench hostile-vm: {e}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    let bins = match uve_e2e::binaries::release() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("uve-bench: {e}");
            std::process::exit(1);
        }
    };
    let work = work_dir(&cli);
    let size = cli.size_mib << 20;
    let run = |w: Which| selected(&cli, w);
    let mut rows = Vec::new();
    let started = Instant::now();

    if run(Which::Chunking) {
        eprintln!("chunking…");
        rows.extend(chunking(work.path(), size));
    }
    let mut flush_hwm = None;
    if run(Which::Transfer) || run(Which::Footprint) {
        flush_hwm = transfer_and_footprint(&cli, &bins, work.path(), size, &mut rows);
    }
    if run(Which::Incremental) {
        eprintln!("incremental…");
        let dir = work.path().join("incremental");
        std::fs::create_dir_all(&dir).expect("dir");
        let rig = rig::Rig::start(&bins, &dir, true).expect("start host + agent");
        rows.extend(incremental::run(&rig, &dir, size));
    }
    let mut failed = false;
    if run(Which::Scale) {
        match scale_rows(&cli, &bins) {
            Ok(r) => rows.extend(r),
            Err(r) => {
                failed = true;
                rows.extend(r);
            }
        }
    }
    let _ = flush_hwm;
    if run(Which::S3) {
        eprintln!("S3 store (Ceph RGW) vs local store…");
        rows.extend(s3store::run(&bins, work.path(), size));
    }
    if run(Which::Hostile) {
        eprintln!("hostile VMs beside good ones…");
        match hostile_rows(&cli, &bins) {
            Ok(r) => rows.extend(r),
            Err(r) => {
                failed = true;
                rows.extend(r);
            }
        }
    }
    if cli.keep {
        eprintln!("work directory kept: {}", work.keep().display());
    }
    print_table(&cli, &rows, started);
    if failed {
        eprintln!("uve-bench: a benchmark failed (its row says why)");
        std::process::exit(1);
    }
}
