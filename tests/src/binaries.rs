//! Finds the release binaries (`uve-host`, `uvectl`, `uve-agent`) for the
//! demo and the benchmarks. When started by `cargo run`, it first asks
//! cargo to build them (a no-op when they are fresh), so one command is
//! enough on a fresh clone.

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

/// Builds (when run under cargo) and locates the release binaries.
pub fn release() -> Result<Binaries, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    if let Some(cargo) = std::env::var_os("CARGO") {
        let st = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "uve-host",
                "-p",
                "uve-agent",
            ])
            .current_dir(&repo)
            .status()
            .map_err(|e| format!("cargo build: {e}"))?;
        if !st.success() {
            return Err(format!(
                "cargo build --release -p uve-host -p uve-agent failed: {st}"
            ));
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
