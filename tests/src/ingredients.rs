//! Locates everything a QEMU scenario needs, all cached inside the repo
//! (`target/e2e-cache`, `target/static`, `target/release`) by
//! `tests/prepare.sh`. A missing piece is either a clear "skipped: …" (a
//! developer without QEMU) or a failure when `E2E_REQUIRE=1` (CI).

use std::path::{Path, PathBuf};

/// Paths of every ingredient.
#[derive(Debug, Clone)]
pub struct Ingredients {
    /// Repository root.
    pub repo: PathBuf,
    /// Uncompressed kernel ELF.
    pub vmlinux: PathBuf,
    /// `lib/modules/<version>/kernel` of the unpacked kernel package.
    pub modules: PathBuf,
    /// `busybox` (static).
    pub busybox: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `vhost-device-vsock`.
    pub vhost: PathBuf,
    /// Static `uve-agent` (`UVE_E2E_AGENT` overrides the path).
    pub agent: PathBuf,
    /// Static `e2e-guest`.
    pub guest: PathBuf,
    /// `uve-host` (release build).
    pub host: PathBuf,
    /// `uvectl` (release build).
    pub uvectl: PathBuf,
}

fn repo_root() -> PathBuf {
    // tests/ is one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

impl Ingredients {
    /// Finds every ingredient, or lists what is missing.
    pub fn find() -> Result<Self, String> {
        let repo = repo_root();
        let cache = repo.join("target/e2e-cache");
        let mut missing = Vec::new();
        let mut need = |p: PathBuf, what: &str| -> PathBuf {
            if !p.exists() {
                missing.push(format!("{what} ({})", p.display()));
            }
            p
        };
        let modules = std::fs::read_dir(cache.join("kernel/root/lib/modules"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(Result::ok)
            .map(|e| e.path().join("kernel"))
            .unwrap_or_else(|| cache.join("kernel/root/lib/modules/<none>/kernel"));
        let static_dir = repo.join("target/static/x86_64-unknown-linux-gnu/release");
        let found = Ingredients {
            vmlinux: need(cache.join("kernel/vmlinux"), "kernel"),
            modules: need(modules, "kernel modules"),
            busybox: need(PathBuf::from("/bin/busybox"), "busybox-static"),
            qemu: need(
                which("qemu-system-x86_64").unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
                "qemu-system-x86",
            ),
            vhost: need(
                cache.join("vhost/bin/vhost-device-vsock"),
                "vhost-device-vsock",
            ),
            // `UVE_E2E_AGENT` puts another static agent build into the
            // guests (e.g. one with a local experiment).
            agent: need(
                std::env::var_os("UVE_E2E_AGENT")
                    .map_or_else(|| static_dir.join("uve-agent"), PathBuf::from),
                "static uve-agent",
            ),
            guest: need(static_dir.join("e2e-guest"), "static e2e-guest"),
            host: need(
                repo.join("target/release/uve-host"),
                "uve-host release build",
            ),
            uvectl: need(repo.join("target/release/uvectl"), "uvectl release build"),
            repo,
        };
        if missing.is_empty() {
            Ok(found)
        } else {
            Err(format!(
                "missing {}; run tests/prepare.sh",
                missing.join(", ")
            ))
        }
    }

    /// The ingredients, or `None` after printing why the scenario is
    /// skipped. With `E2E_REQUIRE=1` a missing ingredient panics instead.
    pub fn require(scenario: &str) -> Option<Self> {
        required(scenario, Self::find())
    }

    /// A tool a scenario runs on this machine (searched in `PATH`, then in
    /// `/usr/sbin` and `/sbin`), such as `mkfs.ext4` from `package`; a
    /// missing one is handled like a missing ingredient (see
    /// [`require`](Self::require)).
    pub fn require_tool(scenario: &str, name: &str, package: &str) -> Option<PathBuf> {
        let found = which(name)
            .or_else(|| {
                ["/usr/sbin", "/sbin"]
                    .iter()
                    .map(|d| Path::new(d).join(name))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| format!("missing {name} (apt-get install {package})"));
        required(scenario, found)
    }
}

fn required<T>(scenario: &str, found: Result<T, String>) -> Option<T> {
    match found {
        Ok(i) => Some(i),
        Err(why) if std::env::var("E2E_REQUIRE").as_deref() == Ok("1") => {
            panic!("{scenario}: E2E_REQUIRE=1 but {why}")
        }
        Err(why) => {
            eprintln!("skipped: {scenario}: {why}");
            None
        }
    }
}
