//! Unit-test rig: every part of the agent built on a temporary state
//! directory, connected to a fake host ([`crate::link::testing`]) that
//! answers like a real one (an update is accepted, every chunk reported
//! missing, the commit becomes version [`COMMITTED`]) unless told to
//! refuse, and records every request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uve_protocol::message::{ErrorCode, Request, Response, RetrieveGrant, WireError};

use crate::config::{Config, SharedConfig, UifMode};
use crate::lifecycle::Lifecycle;
use crate::link::LinkWatch;
use crate::supervise::UaExited;

/// The version every commit of the fake host becomes.
pub const COMMITTED: u64 = 7;

/// What the fake host saw and how it answers.
#[derive(Default)]
pub struct FakeHost {
    /// Every request, in order.
    pub requests: Vec<Request>,
    /// Refuse `UpdateBegin` with this code.
    pub refuse_updates: Option<ErrorCode>,
}

/// The parts, on a temporary directory.
pub struct Rig {
    /// The temporary directory (state under `state/`, UIFs under `uif/`).
    pub dir: tempfile::TempDir,
    /// The fake host's record.
    pub host: Arc<Mutex<FakeHost>>,
    /// The lifecycles (and through them every other part).
    pub lifecycle: Arc<Lifecycle>,
    /// What the supervisor reports.
    pub exits: tokio::sync::mpsc::UnboundedReceiver<UaExited>,
    /// The state directory.
    state: PathBuf,
}

fn answer(host: &Mutex<FakeHost>, request: Request) -> Response {
    let mut h = host.lock().unwrap();
    h.requests.push(request.clone());
    match request {
        Request::UifRetrieve { .. } => Response::Retrieve(RetrieveGrant {
            version: None,
            header: None,
            lease: 1,
            handover_timed_out: false,
        }),
        Request::UpdateBegin(_) => match h.refuse_updates {
            Some(code) => Response::Error(WireError::new(code, "refused by the fake host")),
            None => Response::UpdateAccepted { upload: 1 },
        },
        Request::UpdatePage { chunks, .. } => {
            Response::Missing((0..u32::try_from(chunks.len()).unwrap()).collect())
        }
        Request::UpdateCommit { .. } => Response::Committed { version: COMMITTED },
        Request::BlockSignatures { chunks, .. } => {
            Response::BlockSignatures(vec![None; chunks.len()])
        }
        _ => Response::Ok,
    }
}

impl Default for Rig {
    fn default() -> Self {
        Rig::new()
    }
}

impl Rig {
    /// A rig in file mode, connected to the fake host. Call it on the
    /// test's runtime thread: it marks that thread, so a durable write that
    /// slips back onto it aborts the test (see
    /// [`crate::base::fsutil::mark_runtime_thread`]).
    pub fn new() -> Rig {
        crate::base::fsutil::mark_runtime_thread();
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            state_dir: dir.path().join("state"),
            control_socket: dir.path().join("ctl.sock"),
            login_timeout_secs: 5,
            uif: crate::config::UifConfig {
                mode: UifMode::File,
                path: format!("{}/uif/{{user}}.img", dir.path().display()),
                ..Default::default()
            },
            ..Config::default()
        };
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let host = Arc::new(Mutex::new(FakeHost::default()));
        let state = cfg.state_dir.clone();
        let (lifecycle, exits) = Self::wire(cfg, &host);
        Rig {
            dir,
            host,
            lifecycle,
            exits,
            state,
        }
    }

    /// The agent's parts on `cfg`, through the daemon's own wiring
    /// ([`Lifecycle::open`]), with the fake host `host` as the link.
    fn wire(
        cfg: Config,
        host: &Arc<Mutex<FakeHost>>,
    ) -> (
        Arc<Lifecycle>,
        tokio::sync::mpsc::UnboundedReceiver<UaExited>,
    ) {
        let h2 = host.clone();
        let link = Arc::new(LinkWatch::default());
        link.publish(Some(crate::link::testing::fake_host(move |r| {
            answer(&h2, r)
        })));
        let config = Arc::new(SharedConfig::new(cfg));
        // No cgroups: the supervisor's tests see signals, on any machine.
        Lifecycle::open(
            config,
            link,
            crate::supervise::Cgroups::none(),
            &TaskTracker::new(),
            &CancellationToken::new(),
        )
    }

    /// What a restarted agent is: every part built again on the same state
    /// directory and UIFs, connected to the same fake host. The old parts
    /// are dropped, as a killed agent's are.
    pub fn restart(&mut self) {
        let cfg = self.lifecycle.config().as_ref().clone();
        let (lifecycle, exits) = Self::wire(cfg, &self.host);
        (self.lifecycle, self.exits) = (lifecycle, exits);
    }

    /// `user`'s UIF file.
    pub fn uif(&self, user: &str) -> PathBuf {
        self.lifecycle.config().uif_path(user)
    }

    /// The state directory.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// Logs `user` in to `session` (no UA) and writes `work` into the UIF.
    pub async fn login_and_write(&self, user: &str, session: &str, work: &[u8]) {
        self.lifecycle
            .login(user, &name(session), None)
            .await
            .unwrap();
        std::fs::write(self.uif(user), work).unwrap();
    }

    /// Makes the fake host refuse every update with `code` (`None`: stop
    /// refusing).
    pub fn refuse_updates(&self, code: Option<ErrorCode>) {
        self.host.lock().unwrap().refuse_updates = code;
    }

    /// How many requests matched `f`.
    pub fn count(&self, f: impl Fn(&Request) -> bool) -> usize {
        self.host
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| f(r))
            .count()
    }
}

/// `s` as a name newtype, for test code whose names are valid.
pub fn name<T: TryFrom<String>>(s: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(s.to_string()).unwrap()
}
