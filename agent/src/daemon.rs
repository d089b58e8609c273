//! `uve-agent run`: builds every part of the agent, runs each long-lived
//! task under one [`TaskTracker`] and [`CancellationToken`], and shuts
//! down in order: stop taking control requests → flush every attached
//! UIF (bounded by `shutdown_flush_secs`) → cancel everything (the link
//! says goodbye) → join the tasks.
//!
//! One runtime thread serves everything (heartbeats included); it never
//! blocks on a disk: durable writes run on blocking threads, and debug
//! builds abort on one that does not (see [`fsutil::mark_runtime_thread`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adapters::control::{self, Control};
use crate::adapters::dispatch::Dispatcher;
use crate::adapters::{Backend, conn, outbox};
use crate::base::fsutil;
use crate::config::{Config, SharedConfig};
use crate::lifecycle::Lifecycle;
use crate::link::LinkWatch;
use crate::stores::monitor::Grants;
use crate::supervise::Cgroups;

/// Signals the daemon reacts to.
enum Sig {
    Terminate,
    Reload,
}

/// Forwards SIGTERM/SIGINT/SIGHUP from a small signal-hook thread.
fn signals() -> anyhow::Result<mpsc::UnboundedReceiver<Sig>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for s in signals.forever() {
                let sig = if s == SIGHUP {
                    Sig::Reload
                } else {
                    Sig::Terminate
                };
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(config_path: Option<&Path>, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let mut cfg = Config::load(config_path)?;
    if let Some(s) = socket {
        cfg.control_socket = s;
    }
    let sigs = signals()?;
    // Before the runtime's threads exist; moves the agent into its leaf
    // cgroup under a delegated unit.
    let cgroups = Cgroups::settle();
    if let Some(pack) = cgroups.pack_base() {
        crate::uif::home_pack::use_cgroups(pack.to_path_buf());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .thread_stack_size(256 * 1024)
        .build()?;
    fsutil::mark_runtime_thread();
    rt.block_on(serve(cfg, config_path, cgroups, sigs))
}

/// The agent's parts, built from the configuration.
struct Parts {
    lifecycle: Arc<Lifecycle>,
    config: Arc<SharedConfig>,
    link: Arc<LinkWatch>,
    grants: Arc<Grants>,
    boot_id: [u8; 16],
    exits: mpsc::UnboundedReceiver<crate::supervise::UaExited>,
}

fn build(
    cfg: Config,
    cgroups: Cgroups,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> std::io::Result<Parts> {
    let state_dir = cfg.state_dir.clone();
    // Traverse-only for others: UAs running as the session's user must
    // reach `ua/`; everything else below is 0700.
    fsutil::ensure_dir_mode(&state_dir, 0o711)?;
    let boot_id = match kernel_boot_id() {
        Some(id) => id,
        None => fsutil::random_bytes::<16>()?,
    };
    let config = Arc::new(SharedConfig::new(cfg));
    let link = Arc::new(LinkWatch::default());
    let (lifecycle, exits) = Lifecycle::open(config.clone(), link.clone(), cgroups, tasks, stop);
    Ok(Parts {
        lifecycle,
        config,
        link,
        grants: Arc::new(Grants::load(&state_dir)),
        boot_id,
        exits,
    })
}

async fn serve(
    cfg: Config,
    config_path: Option<&Path>,
    cgroups: Cgroups,
    mut sigs: mpsc::UnboundedReceiver<Sig>,
) -> anyhow::Result<()> {
    let mode = cfg.socket_mode()?;
    let socket = cfg.control_socket.clone();
    let checkpoint = cfg.checkpoint_interval_secs;
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let state_dir = cfg.state_dir.clone();
    let Parts {
        lifecycle,
        config,
        link,
        grants,
        boot_id,
        exits,
    } = build(cfg, cgroups, &tasks, &stop).context("initialise state directory")?;
    let listener = control::bind(&socket, mode)
        .with_context(|| format!("bind control socket {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), state = %state_dir.display(), "uve-agent running");
    lifecycle.recover_at_start().await;
    let (conns_tx, conns_rx) = mpsc::channel(4);
    let s = stop.clone();
    tasks.spawn(async move { conn::run(&config, boot_id, &link, conns_tx, s).await });
    let backend = Backend {
        lifecycle: lifecycle.clone(),
        grants,
        tasks: tasks.clone(),
    };
    let dispatcher = Arc::new(Dispatcher {
        backend: backend.clone(),
    });
    tasks.spawn(dispatcher.run(conns_rx, stop.clone()));
    tasks.spawn(outbox::run(lifecycle.clone(), stop.clone()));
    tasks.spawn(ua_exits(lifecycle.clone(), exits, stop.clone()));
    let control_stop = CancellationToken::new();
    let control = Arc::new(Control {
        backend,
        admission: Arc::default(),
    });
    tasks.spawn(control.serve(listener, control_stop.clone()));
    if checkpoint > 0 {
        tasks.spawn(checkpoints(lifecycle.clone(), checkpoint, stop.clone()));
    }
    while let Some(Sig::Reload) = sigs.recv().await {
        match Config::load(config_path) {
            Ok(c) => lifecycle.reload(c),
            Err(e) => tracing::error!("reload failed, keeping the old config: {e}"),
        }
    }
    tracing::info!("shutting down: flushing open sessions");
    control_stop.cancel();
    let limit = Duration::from_secs(lifecycle.config().shutdown_flush_secs);
    if tokio::time::timeout(limit, lifecycle.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown flush did not finish in time; what is left stays spooled");
    }
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(3), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(left = tasks.len(), "tasks still running at exit");
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("bye");
    Ok(())
}

/// Turns the supervisor's reports of UAs that ended into disconnects.
async fn ua_exits(
    lc: Arc<Lifecycle>,
    mut exits: mpsc::UnboundedReceiver<crate::supervise::UaExited>,
    stop: CancellationToken,
) {
    loop {
        let exit = tokio::select! {
            e = exits.recv() => e,
            () = stop.cancelled() => None,
        };
        let Some(exit) = exit else { return };
        let lc2 = lc.clone();
        lc.spawn(async move { lc2.on_ua_exit(exit).await });
    }
}

/// Periodic checkpoints every `secs` seconds.
async fn checkpoints(lc: Arc<Lifecycle>, secs: u64, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(secs));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => lc.checkpoint().await,
            () = stop.cancelled() => return,
        }
    }
}

/// The kernel's random per-boot id (a UUID), so `Hello.boot_id` tells the
/// host a VM reboot from an agent restart or reconnect.
fn kernel_boot_id() -> Option<[u8; 16]> {
    let text = fsutil::kernel_boot()?;
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (hex.len() == 32).then_some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_boot_id_is_stable_within_a_boot() {
        let a = super::kernel_boot_id();
        assert!(a.is_some(), "/proc/sys/kernel/random/boot_id unreadable");
        assert_eq!(a, super::kernel_boot_id());
    }
}
