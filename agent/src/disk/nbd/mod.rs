//! The agent's NBD server: serves one [`BlockDevice`] as one export to
//! NBD clients, over a Unix socket (any client: `qemu-io`, `nbdcopy`,
//! `nbdinfo`) or, later, over a socket pair handed to the kernel's `nbd`
//! driver (transmission only; the kernel does no handshake).
//!
//! Written here rather than taken from the `nbd` crate, which serves a
//! `Read + Write + Seek` without FLUSH, FUA, TRIM, WRITE_ZEROES, block
//! sizes or bounds on what a client sends.
//!
//! Every connection is served by its own thread, which runs with
//! `PR_SET_IO_FLUSHER` where the agent holds `CAP_SYS_RESOURCE` (its
//! allocations then never wait on the writeback of the device it serves),
//! holds one payload buffer of [`MAX_PAYLOAD`] bytes, and answers
//! requests in order. The export advertises FLUSH, FUA, TRIM and
//! WRITE_ZEROES (so the kernel does not treat the device as
//! write-through) and multi-connection consistency (a FLUSH makes the
//! whole backing file durable).

pub mod handshake;
pub mod kernel;
pub mod transmit;
pub mod wire;

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::disk::device::BlockDevice;
use crate::disk::front_end::{Disk, FrontEnd, FrontEndError, Presented};
pub use transmit::Ended;
use wire::tflag;

/// Largest read or write payload served, advertised as the maximum block
/// size (the kernel's default request limit, `max_sectors_kb`, is below).
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Time a client has for the whole handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed, or the client closed it mid-message.
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the connection is closed.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
}

/// One export: a device under a name.
pub struct Export {
    /// The name clients ask for (the empty name also selects it).
    pub name: String,
    /// What is served.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes, trims and write-zeroes.
    pub read_only: bool,
}

impl Export {
    /// The transmission flags this export advertises.
    pub fn flags(&self) -> u16 {
        let mut f = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::SEND_TRIM
            | tflag::SEND_WRITE_ZEROES
            | tflag::CAN_MULTI_CONN;
        if self.read_only {
            f |= tflag::READ_ONLY;
        }
        f
    }
}

/// Marks the calling thread as one that serves block I/O
/// (`PR_SET_IO_FLUSHER`); false where the agent lacks `CAP_SYS_RESOURCE`.
pub fn mark_io_flusher() -> bool {
    rustix::process::configure_io_flusher_behavior(true).is_ok()
}

/// Serves one client on `stream`: the handshake (within
/// [`HANDSHAKE_TIMEOUT`]), then transmission until it disconnects.
pub fn serve_client(mut stream: UnixStream, export: &Export) -> Result<Ended, NbdError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let offer = handshake::Offer {
        name: &export.name,
        size: export.device.size(),
        flags: export.flags(),
        max_payload: MAX_PAYLOAD,
    };
    if handshake::negotiate(&mut stream, &offer)? == handshake::Outcome::Aborted {
        return Ok(Ended::Disconnected);
    }
    stream.set_read_timeout(None)?;
    let mut buf = vec![0u8; MAX_PAYLOAD as usize];
    transmit::serve(
        &mut stream,
        export.device.as_ref(),
        export.read_only,
        &mut buf,
    )
}

/// A listening NBD server on a Unix socket. Dropping it stops accepting,
/// closes every connection and removes the socket.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    open: Open,
    /// The listening socket, shut down to end the accept loop.
    listening: UnixListener,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `path` (created mode 0600 by the umask's caller; an old
    /// socket there is replaced) and serves `export` to every client.
    pub fn listen(path: &Path, export: Arc<Export>) -> io::Result<Server> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        let listening = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open = Open::default();
        let (stop2, open2) = (stop.clone(), open.clone());
        let accept = std::thread::Builder::new()
            .name("uve-nbd-accept".into())
            .spawn(move || accept_loop(&listener, &export, &stop2, &open2))?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            open,
            listening,
            accept: Some(accept),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop (its accept fails), which then sees `stop`.
        let _ = nix::sys::socket::shutdown(
            self.listening.as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(PoisonError::into_inner));
        for s in open.into_values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The connections being served, by number: the server shuts them down
/// when dropped; each serving thread removes (and shuts) its own.
type Open = Arc<Mutex<HashMap<u64, UnixStream>>>;

fn accept_loop(listener: &UnixListener, export: &Arc<Export>, stop: &AtomicBool, open: &Open) {
    let mut next = 0u64;
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!("NBD accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Ok(kept) = stream.try_clone() else {
            continue;
        };
        {
            let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
            if open.len() >= MAX_CONNECTIONS {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "NBD connection refused: too many connections"
                );
                continue;
            }
            next += 1;
            open.insert(next, kept);
        }
        let (export, mine, id) = (export.clone(), open.clone(), next);
        let spawned = std::thread::Builder::new()
            .name("uve-nbd-serve".into())
            .spawn(move || {
                if !mark_io_flusher() {
                    tracing::debug!(
                        "NBD serving thread without PR_SET_IO_FLUSHER (no CAP_SYS_RESOURCE)"
                    );
                }
                match serve_client(stream, &export) {
                    Ok(ended) => tracing::debug!(?ended, "NBD client done"),
                    Err(e) => tracing::warn!(export = %export.name, "NBD client dropped: {e}"),
                }
                let kept = mine
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                if let Some(s) = kept {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            });
        if spawned.is_err() {
            tracing::warn!("NBD connection refused: no thread for it");
            open.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    }
}

/// A device served to the kernel: `/dev/nbd<index>`, whose requests a
/// thread of this process serves on its end of a socket pair.
pub struct KernelDevice {
    index: u32,
    ours: UnixStream,
    serving: Option<JoinHandle<()>>,
}

impl KernelDevice {
    /// Serves `export` as a new `/dev/nbdN` (the kernel picks N).
    pub fn attach(
        export: Arc<Export>,
        how: &kernel::Attach,
    ) -> Result<KernelDevice, kernel::KernelError> {
        Self::hand_over(export, |theirs| kernel::connect(theirs, how))
    }

    /// Serves `export` again as `/dev/nbd<index>`, whose connection died
    /// with an earlier agent process (`NBD_CMD_RECONFIGURE`).
    pub fn reattach(index: u32, export: Arc<Export>) -> Result<KernelDevice, kernel::KernelError> {
        Self::hand_over(export, |theirs| {
            kernel::reconfigure(index, theirs).map(|()| index)
        })
    }

    /// Starts serving our end of a new socket pair, then hands the other
    /// end to the kernel with `give` (which answers the device's index);
    /// if the kernel refuses, the serving thread is stopped.
    fn hand_over(
        export: Arc<Export>,
        give: impl FnOnce(&std::os::fd::OwnedFd) -> Result<u32, kernel::KernelError>,
    ) -> Result<KernelDevice, kernel::KernelError> {
        let (ours, theirs) = UnixStream::pair()?;
        let serving = serve_kernel_end(ours.try_clone()?, export)?;
        match give(&std::os::fd::OwnedFd::from(theirs)) {
            Ok(index) => Ok(KernelDevice {
                index,
                ours,
                serving: Some(serving),
            }),
            Err(e) => {
                let _ = ours.shutdown(std::net::Shutdown::Both);
                let _ = serving.join();
                Err(e)
            }
        }
    }

    /// The device's number N (`/dev/nbdN`).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device's path.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    /// Disconnects the device (unmount it first): the kernel sends its
    /// last requests and `NBD_CMD_DISC`, then frees the device.
    pub fn detach(mut self) -> Result<(), kernel::KernelError> {
        let r = kernel::disconnect(self.index);
        if r.is_err() {
            let _ = self.ours.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.serving.take() {
            let _ = t.join();
        }
        r
    }
}

fn serve_kernel_end(mut stream: UnixStream, export: Arc<Export>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("uve-nbd-kernel".into())
        .spawn(move || {
            if !mark_io_flusher() {
                tracing::warn!(
                    "NBD kernel device served without PR_SET_IO_FLUSHER (no CAP_SYS_RESOURCE)"
                );
            }
            let mut buf = vec![0u8; MAX_PAYLOAD as usize];
            match transmit::serve(
                &mut stream,
                export.device.as_ref(),
                export.read_only,
                &mut buf,
            ) {
                Ok(ended) => {
                    tracing::debug!(?ended, export = %export.name, "kernel NBD connection done")
                }
                Err(e) => tracing::warn!(export = %export.name, "kernel NBD connection ended: {e}"),
            }
        })
}

/// The kernel's `nbd` driver as a [`FrontEnd`]: each disk a
/// [`KernelDevice`] whose record is its index N.
pub struct NbdKernel;

fn export_of(disk: Disk) -> (Arc<Export>, Duration) {
    let export = Arc::new(Export {
        name: disk.name,
        device: disk.device,
        read_only: false,
    });
    (export, disk.reattach_timeout)
}

impl FrontEnd for NbdKernel {
    fn present(&self, disk: Disk) -> Result<Box<dyn Presented>, FrontEndError> {
        let (export, reattach_timeout) = export_of(disk);
        let how = kernel::Attach {
            size: export.device.size(),
            block_size: 4096,
            flags: export.flags(),
            request_timeout: Duration::ZERO,
            dead_conn_timeout: reattach_timeout,
        };
        let dev = KernelDevice::attach(export, &how).map_err(|e| FrontEndError(e.to_string()))?;
        Ok(Box::new(dev))
    }

    fn represent(&self, record: &str, disk: Disk) -> Result<Box<dyn Presented>, FrontEndError> {
        let index = record
            .trim()
            .parse::<u32>()
            .map_err(|_| FrontEndError(format!("{record:?} names no NBD device")))?;
        let (export, _) = export_of(disk);
        let dev =
            KernelDevice::reattach(index, export).map_err(|e| FrontEndError(e.to_string()))?;
        Ok(Box::new(dev))
    }
}

impl Presented for KernelDevice {
    fn path(&self) -> PathBuf {
        KernelDevice::path(self)
    }

    fn wait_ready(&self, limit: Duration) -> Result<(), FrontEndError> {
        let size = PathBuf::from(format!("/sys/block/nbd{}/size", self.index));
        let until = std::time::Instant::now() + limit;
        loop {
            let ready = std::fs::read_to_string(&size)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0);
            if ready && KernelDevice::path(self).exists() {
                // Requests no larger than this server takes (the driver's
                // own limit is 32 MiB).
                let limit = format!("/sys/block/nbd{}/queue/max_sectors_kb", self.index);
                if let Err(e) = std::fs::write(&limit, (MAX_PAYLOAD / 1024).to_string()) {
                    tracing::warn!("{limit}: {e}");
                }
                return Ok(());
            }
            if std::time::Instant::now() > until {
                return Err(FrontEndError(format!(
                    "/dev/nbd{} did not appear within {limit:?}",
                    self.index
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn record(&self) -> String {
        self.index.to_string()
    }

    fn withdraw(self: Box<Self>) -> Result<(), FrontEndError> {
        self.detach().map_err(|e| FrontEndError(e.to_string()))
    }
}
