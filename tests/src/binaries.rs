//! Finds the release binaries (`uve-host`, `uvectl`, `uve-agent`) for the
//! demo, the benchmarks and the suites that run them. When started under
//! cargo (`cargo run`, `cargo nextest run`), it first asks cargo to build
//! them with exactly the command `.ci/run` uses (`cargo build --release
//! --workspace`): a no-op when they are fresh. Building only some packages
//! (`-p uve-host -p uve-agent`) would unify features differently and
//! compile the daemons in release a second time, inside a test.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Paths of the release binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `uve-host`.
    pub host: PathBuf,
    /// `uvectl`.
    pub uvectl: PathBuf,
    /// `uve-agent`.
    pub agent: PathBuf,
}

/// Whether `name` is a variable cargo sets for the crate being compiled or
/// tested (not one a user sets for cargo itself, like `CARGO_HOME`).
fn set_by_cargo_for_a_crate(name: &str) -> bool {
    const PREFIXES: [&str; 8] = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_BIN_",
        "CARGO_CRATE_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "CARGO_CFG_",
    ];
    name == "OUT_DIR" || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Builds (when run under cargo) and locates the release binaries.
pub fn release() -> Result<Binaries, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut build = Command::new(cargo);
        build.args(["build", "--release", "-q", "--workspace"]);
        // Cargo gives a test process the variables of the crate under test
        // (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, OUT_DIR, ...). Build scripts
        // watch some of them (ring's `rerun-if-env-changed`), so a build
        // that inherits them sees a changed environment and compiles again
        // what `.ci/run` built minutes earlier. The build runs as from a
        // shell.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(set_by_cargo_for_a_crate) {
                build.env_remove(&key);
            }
        }
        let st = build
            .current_dir(&repo)
            .status()
            .map_err(|e| format!("cargo build: {e}"))?;
        if !st.success() {
            return Err(format!("cargo build --release --workspace failed: {st}"));
        }
    }
    let dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| d.join("uve-host").exists())
        .unwrap_or_else(|| repo.join("target/release"));
    let b = Binaries {
        host: dir.join("uve-host"),
        uvectl: dir.join("uvectl"),
        agent: dir.join("uve-agent"),
    };
    for p in [&b.host, &b.uvectl, &b.agent] {
        if !p.exists() {
            return Err(format!(
                "{} not found; run cargo build --release --workspace",
                p.display()
            ));
        }
    }
    Ok(b)
}
