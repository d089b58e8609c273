//! What a long scenario keeps around it: a run directory that is removed
//! on success and kept (and printed) on failure, a step timer for its
//! log, and the set-up the QEMU scenarios share (a file-mode guest
//! configuration, the host with alice's first version imported).

use std::path::{Path, PathBuf};
use std::time::Instant;

use uve_protocol::testdata::noise;

use crate::host::HostDaemon;
use crate::ingredients::Ingredients;

/// The guest agent's configuration in file mode, dialing the host over
/// vsock: each user's UIF at `/var/lib/uve-agent/uif/<user>.img`.
pub const AGENT_FILE_MODE: &str = r#"
host = "vsock:2:7075"
[uif]
mode = "file"
path = "/var/lib/uve-agent/uif/{user}.img"
"#;

/// The host started in `run` with `vm-a` registered on
/// `<vm_dir>/v.sock` (so it listens on `<uds>_7075` before the guest
/// boots), alice assigned to it and her 4 MiB version `v1` imported from
/// `<run>/alice-v1.img`. Returns the host, that import file, `v1` and its
/// head version.
pub fn host_with_alice_imported(
    ing: &Ingredients,
    run: &RunDir,
    vm_dir: &Path,
) -> (HostDaemon, PathBuf, Vec<u8>, u64) {
    let host = match HostDaemon::start(ing, run.path(), "") {
        Ok(h) => h,
        Err(e) => panic!("host: {e}"),
    };
    host.add_vm("vm-a", &vm_dir.join("v.sock"));
    host.ok(&["assign", "alice", "vm-a"]);
    let v1 = noise(4 << 20, 1);
    let import = run.path().join("alice-v1.img");
    if let Err(e) = std::fs::write(&import, &v1) {
        panic!("write {}: {e}", import.display());
    }
    host.import("alice", &import);
    let v1_head = host.head("alice");
    (host, import, v1, v1_head)
}

/// A scenario's run directory under `/tmp`: kept (and printed) if the
/// test fails, removed otherwise.
pub struct RunDir(Option<tempfile::TempDir>);

impl RunDir {
    /// A fresh `uve-e2e-*` directory for scenario `name` (printed).
    pub fn new(name: &str) -> Self {
        let d = match tempfile::Builder::new()
            .prefix("uve-e2e-")
            .tempdir_in("/tmp")
        {
            Ok(d) => d,
            Err(e) => panic!("{name}: run dir: {e}"),
        };
        eprintln!("{name}: run directory {}", d.path().display());
        RunDir(Some(d))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        match &self.0 {
            Some(d) => d.path(),
            None => panic!("run directory already kept"),
        }
    }

    /// A subdirectory `name`, created.
    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        if let Err(e) = std::fs::create_dir_all(&p) {
            panic!("mkdir {}: {e}", p.display());
        }
        p
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.0.take()
        {
            eprintln!("kept {} for inspection", d.keep().display());
        }
    }
}

/// The start of scenario `name`: its ingredients (`None` when they are
/// missing: the test is skipped, see [`Ingredients::require`]), a fresh
/// run directory and the step timer.
pub fn begin(name: &str) -> Option<(Ingredients, RunDir, Instant)> {
    let ing = Ingredients::require(name)?;
    Some((ing, RunDir::new(name), Instant::now()))
}

/// Logs how long step `name` took since `t`, and restarts `t`.
pub fn step(name: &str, t: &mut Instant) {
    eprintln!("  step {name}: {:?}", t.elapsed());
    *t = Instant::now();
}
