//! What a long scenario keeps around it: a run directory that is removed
//! on success and kept (and printed) on failure, and a step timer for its
//! log.

use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// Logs how long step `name` took since `t`, and restarts `t`.
pub fn step(name: &str, t: &mut Instant) {
    eprintln!("  step {name}: {:?}", t.elapsed());
    *t = Instant::now();
}
