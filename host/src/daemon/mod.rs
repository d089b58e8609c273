//! Wiring and lifetime of the daemon: open the data directory (one daemon
//! per directory, enforced with `flock`), recover the store, load registry,
//! leases and the event journal, start listeners and the API, and on
//! SIGTERM/SIGINT shut down gracefully: stop accepting, refuse new updates,
//! let commits in flight finish, say `Goodbye` to every agent, close the
//! event journal, exit.

pub mod notify;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::host::Host;
use crate::state::events::{Event, Events};
use crate::state::leases::Leases;
use crate::state::registry::Registry;
#[cfg(feature = "s3")]
use crate::store::S3Store;
use crate::store::durable;
use crate::store::{LocalStore, UifStore};
use crate::wire::server::{self, VmListeners};

/// Takes an exclusive `flock` on `<data_dir>/lock` for the process lifetime.
fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .with_context(|| format!("open {}/lock", dir.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!("another uve-host is using {}", dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("lock {}/lock", dir.display()))
        }
    }
}

/// Opens the UIF store the configuration names: S3 when `[s3]` is set
/// (uploads staging under `<data_dir>/store/staging`), else the local
/// store under `<data_dir>/store`.
fn open_store(config: &Config, data: &Path) -> anyhow::Result<Arc<dyn UifStore>> {
    match &config.s3 {
        None => Ok(Arc::new(
            LocalStore::open(&data.join("store"), config.store_policy())
                .context("open UIF store")?,
        )),
        #[cfg(feature = "s3")]
        Some(s3) => {
            let grace = Duration::from_secs(config.gc_grace_secs);
            // Uploads stage on local disk, where the local store would.
            let staging = data.join("store").join("staging");
            let store = S3Store::open(s3, config.store_policy(), grace, &staging)
                .with_context(|| format!("open the S3 UIF store (bucket {:?})", s3.bucket))?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "s3"))]
        Some(_) => anyhow::bail!(
            "the configuration has an [s3] store but this uve-host was built without the `s3` feature"
        ),
    }
}

/// Opens everything and builds the daemon state (no tasks started).
pub fn open(config: Config) -> anyhow::Result<(Arc<ApiState>, File)> {
    let data = config.data_dir.clone();
    std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let lock = lock_data_dir(&data)?;
    let tmp = data.join("tmp");
    durable::clear_dir(&tmp).context("clear temp directory")?;
    let store = open_store(&config, &data)?;
    let registry = Registry::load(&data, &tmp, config.port)?.with_local_cid(config.allow_local_cid);
    let leases = Leases::load(&data, &tmp)?;
    let max_age = Some(config.event_journal_max_age_secs);
    let events = Events::open(
        &data,
        &tmp,
        config.event_ring,
        config.event_journal,
        max_age,
    )
    .context("open the event journal")?;
    let host = Arc::new(Host::new(config, tmp, store, registry, leases).with_events(events));
    Ok((
        Arc::new(ApiState {
            host,
            listeners: VmListeners::default(),
        }),
        lock,
    ))
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Opening may block on the network (S3 self-test): off the async workers.
    let (daemon, _lock) = tokio::task::spawn_blocking(move || open(config))
        .await
        .context("open task")??;
    let host = daemon.host.clone();
    for spec in host.registry().vms() {
        if let Err(e) = daemon.listeners.start(&host, &spec) {
            tracing::error!(vm = spec.id, error = %e, "cannot listen for VM");
        }
    }
    if host.config().vsock_listen {
        server::start_vsock(&host)?;
    }
    if host.config().gc_interval_secs > 0 {
        tokio::spawn(periodic_gc(host.clone()));
    }
    if host.config().scrub_interval_secs > 0 {
        tokio::spawn(periodic_scrub(host.clone()));
    }
    let api_stop = CancellationToken::new();
    let api_path = host.config().api_socket();
    let api_listener = api::bind(&api_path)?;
    let api = tokio::spawn(api::serve(
        daemon.clone(),
        api_listener,
        api_path,
        api_stop.clone(),
    ));
    tracing::info!(data_dir = %host.config().data_dir.display(), "uve-host running");
    // Listeners and API are bound: dependents (VMMs) may start now.
    crate::daemon::notify::notify("READY=1\nSTATUS=listening");
    wait_for_signal().await?;
    tracing::info!("shutting down");
    crate::daemon::notify::notify("STOPPING=1");
    host.shutdown().cancel();
    api_stop.cancel();
    let grace = Host::ms(host.config().shutdown_grace_ms);
    if !host.commits_drained(grace).await {
        tracing::warn!("commits still running after the shutdown grace period");
    }
    // Connections in the middle of their set-up finish installing first.
    let limit = Host::ms(host.config().handshake_timeout_ms);
    let _setup = tokio::time::timeout(limit, host.setup().write()).await;
    let goodbyes: Vec<_> = host
        .conns()
        .all()
        .into_iter()
        .map(|(_, c)| tokio::spawn(async move { c.handle.goodbye("host shutting down").await }))
        .collect();
    for g in goodbyes {
        let _ = g.await;
    }
    match tokio::time::timeout(Duration::from_secs(5), api).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "API server ended with an error"),
        Ok(_) => {}
        Err(_) => tracing::warn!("API server did not stop in time"),
    }
    // The journal's last batch and its clean-shutdown mark (numbering
    // then continues exactly at the next start).
    let closing = host.clone();
    let _ = tokio::task::spawn_blocking(move || closing.events().close()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs the store GC every `gc_interval_secs` until shutdown.
async fn periodic_gc(host: Arc<Host>) {
    let every = Duration::from_secs(host.config().gc_interval_secs);
    let grace = Duration::from_secs(host.config().gc_grace_secs);
    loop {
        tokio::select! {
            () = host.shutdown().cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match host.store_call(move |s| s.gc(grace)).await {
            Ok(report) => {
                host.emit(Event::Gc(report));
            }
            Err(e) => tracing::warn!(error = %e, "periodic GC failed"),
        }
    }
}

/// Scrubs the store every `scrub_interval_secs` until shutdown (a store
/// that verifies every read answers `Unsupported`: then never again). The
/// time of the last complete scrub is kept in `<data_dir>/scrubbed_at`
/// (milliseconds since the epoch; written at the first start when
/// absent), so a host restarted more often than the interval still
/// scrubs on time.
async fn periodic_scrub(host: Arc<Host>) {
    let every = Duration::from_secs(host.config().scrub_interval_secs);
    let stamp = host.config().data_dir.join("scrubbed_at");
    let last = match std::fs::read_to_string(&stamp) {
        Ok(text) => text.trim().parse::<u64>().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %stamp.display(), error = %e, "last scrub time unreadable: counting from now");
            None
        }
    };
    let now = crate::store::now_ms();
    let last = last.unwrap_or_else(|| {
        write_stamp(&host, &stamp, now);
        now
    });
    let mut wait = every.saturating_sub(Duration::from_millis(now.saturating_sub(last)));
    loop {
        tokio::select! {
            () = host.shutdown().cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = every;
        match host.scrub(None).await {
            Ok(report) if report.complete => write_stamp(&host, &stamp, crate::store::now_ms()),
            Ok(_) => {}
            Err(crate::store::StoreError::Unsupported(why)) => {
                tracing::info!("no periodic scrub: {why}");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "periodic scrub failed"),
        }
    }
}

/// Records when the last complete scrub ended (a failure to is logged:
/// the next start then scrubs an interval after it starts).
fn write_stamp(host: &Host, stamp: &std::path::Path, at_ms: u64) {
    if let Err(e) =
        crate::store::durable::write_atomic(host.tmp(), stamp, at_ms.to_string().as_bytes())
    {
        tracing::warn!(path = %stamp.display(), error = %e, "last scrub time not saved");
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
