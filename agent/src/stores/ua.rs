//! Deployed UAs (UVE-2 `UaBegin`/`UaBundleData`/`UaCommit`/`UaRollback`/
//! `UaDelete`). Layout under `<state>/ua/<name>/`: one directory per
//! version, `.<version>.entry` (its entry argv, JSON), and the symlinks
//! `current` and `previous` (switched with rename, so a reader always sees
//! a complete version). Bundles arrive into `<state>/ua/.incoming/`, size
//! bounded by the announced size and the configured maximum, are verified
//! (size, BLAKE3) and unpacked with [`crate::base::archive`]'s strict policy.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use uve_protocol::message::{ErrorCode, UaBundle, UaInfo, WireError};
use uve_protocol::names::{UaName, UaVersion};

use crate::base::archive::{self, UnpackPolicy};
use crate::base::fsutil;

struct Transfer {
    bundle: UaBundle,
    path: PathBuf,
    file: File,
    written: u64,
    hasher: blake3::Hasher,
}

/// The UA directory and the transfers in progress.
pub struct UaStore {
    root: PathBuf,
    max_bundle: u64,
    transfers: Mutex<HashMap<u64, Transfer>>,
}

fn err(code: ErrorCode, msg: impl std::fmt::Display) -> WireError {
    WireError::new(code, msg)
}

fn internal(context: &str) -> impl FnOnce(std::io::Error) -> WireError + '_ {
    move |e| err(ErrorCode::Internal, format!("{context}: {e}"))
}

impl UaStore {
    /// The store under `state_dir`.
    pub fn new(state_dir: &Path, max_bundle: u64) -> UaStore {
        let root = state_dir.join("ua");
        // Bundles interrupted by a restart are useless: the host restarts
        // the transfer.
        let _ = fs::remove_dir_all(root.join(".incoming"));
        UaStore {
            root,
            max_bundle,
            transfers: Mutex::new(HashMap::new()),
        }
    }

    fn transfers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Transfer>> {
        self.transfers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts receiving a bundle.
    pub fn begin(&self, bundle: UaBundle) -> Result<(), WireError> {
        if bundle.entry.is_empty() || bundle.entry.iter().any(|a| a.contains('\0')) {
            return Err(err(ErrorCode::BadRequest, "empty or invalid entry command"));
        }
        if Path::new(&bundle.entry[0])
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(err(
                ErrorCode::BadRequest,
                "entry command may not contain `..`",
            ));
        }
        if bundle.entry.len() > 256 || bundle.entry.iter().map(String::len).sum::<usize>() > 65536 {
            return Err(err(ErrorCode::TooLarge, "entry command too long"));
        }
        if bundle.size > self.max_bundle {
            return Err(err(
                ErrorCode::TooLarge,
                format!(
                    "bundle of {} bytes exceeds the limit {}",
                    bundle.size, self.max_bundle
                ),
            ));
        }
        let incoming = self.root.join(".incoming");
        fsutil::ensure_dir(&incoming).map_err(internal("create incoming dir"))?;
        let path = incoming.join(format!("{}.tar", bundle.transfer));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(internal("create bundle file"))?;
        let mut t = self.transfers();
        if let Some(old) = t.remove(&bundle.transfer).filter(|o| o.path != path) {
            let _ = fs::remove_file(&old.path);
        }
        t.insert(
            bundle.transfer,
            Transfer {
                bundle,
                path,
                file,
                written: 0,
                hasher: blake3::Hasher::new(),
            },
        );
        Ok(())
    }

    /// Appends bundle bytes (must arrive in order, within the size).
    pub fn data(&self, transfer: u64, offset: u64, data: &[u8]) -> Result<(), WireError> {
        let mut t = self.transfers();
        let tr = t
            .get_mut(&transfer)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no transfer {transfer}")))?;
        if offset != tr.written {
            return Err(err(
                ErrorCode::BadRequest,
                format!("expected offset {}, got {offset}", tr.written),
            ));
        }
        let len = data.len() as u64;
        if tr.written + len > tr.bundle.size {
            let path = tr.path.clone();
            t.remove(&transfer);
            let _ = fs::remove_file(path);
            return Err(err(
                ErrorCode::TooLarge,
                "more bytes than the announced size",
            ));
        }
        tr.file.write_all(data).map_err(internal("write bundle"))?;
        tr.hasher.update(data);
        tr.written += len;
        Ok(())
    }

    /// Verifies and unpacks the bundle, switches `current`, returns the
    /// version now current.
    pub async fn commit(&self, transfer: u64) -> Result<UaVersion, WireError> {
        let tr = self
            .transfers()
            .remove(&transfer)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no transfer {transfer}")))?;
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let result = verify(&tr);
            let (bundle, path) = (tr.bundle.clone(), tr.path.clone());
            drop(tr);
            if let Err(e) = result {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            install(&root, &bundle, &path)
        })
        .await
        .map_err(|e| err(ErrorCode::Internal, e))?
    }

    /// Points `current` back at `previous`; returns the version now current.
    pub async fn rollback(&self, name: &UaName) -> Result<UaVersion, WireError> {
        let dir = self.root.join(name);
        tokio::task::spawn_blocking(move || switch_back(&dir))
            .await
            .map_err(|e| err(ErrorCode::Internal, e))?
    }

    /// Removes every file of UA `name`.
    pub async fn remove(&self, name: &UaName) -> Result<(), WireError> {
        let dir = self.root.join(name);
        if !dir.exists() {
            return Err(err(
                ErrorCode::NotFound,
                format!("UA {name} is not deployed"),
            ));
        }
        tokio::task::spawn_blocking(move || fs::remove_dir_all(&dir))
            .await
            .map_err(|e| err(ErrorCode::Internal, e))?
            .map_err(internal("remove UA"))
    }

    /// The current version's directory and entry argv of UA `name`.
    pub fn current(&self, name: &UaName) -> Option<(PathBuf, Vec<String>)> {
        let dir = self.root.join(name);
        let version = read_link_name(&dir.join("current"))?;
        let entry: Vec<String> =
            fsutil::read_json(&dir.join(format!(".{version}.entry"))).ok()??;
        Some((dir.join(&version), entry))
    }

    /// Every deployed UA.
    pub fn list(&self) -> Vec<UaInfo> {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<UaInfo> = rd
            .filter_map(Result::ok)
            .filter_map(|e| {
                // Only what this store made: valid names.
                let name = UaName::new(e.file_name().to_str()?).ok()?;
                let current = read_link_name(&e.path().join("current"))?;
                let previous = read_link_name(&e.path().join("previous"));
                Some(UaInfo {
                    name,
                    current,
                    previous,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

fn read_link_name(link: &Path) -> Option<UaVersion> {
    let target = fs::read_link(link).ok()?;
    UaVersion::new(target.to_str()?).ok()
}

/// Checks a received bundle: size, durability, digest.
fn verify(tr: &Transfer) -> Result<(), WireError> {
    if tr.written != tr.bundle.size {
        return Err(err(
            ErrorCode::BadRequest,
            format!("bundle has {} of {} bytes", tr.written, tr.bundle.size),
        ));
    }
    fsutil::sync(&tr.file).map_err(internal("fsync bundle"))?;
    if *tr.hasher.finalize().as_bytes() != tr.bundle.digest.0 {
        return Err(err(ErrorCode::BadDigest, "bundle digest mismatch"));
    }
    Ok(())
}

/// Points `dir/current` back at `dir/previous` (durably); returns the
/// version now current.
fn switch_back(dir: &Path) -> Result<UaVersion, WireError> {
    let prev = read_link_name(&dir.join("previous")).ok_or_else(|| {
        err(
            ErrorCode::NotFound,
            format!("UA {} has no previous version", dir.display()),
        )
    })?;
    let cur = read_link_name(&dir.join("current"));
    set_link(dir, "current", &prev).map_err(internal("switch current"))?;
    match cur {
        Some(c) => set_link(dir, "previous", &c).map_err(internal("switch previous"))?,
        None => {
            let _ = fs::remove_file(dir.join("previous"));
        }
    }
    Ok(prev)
}

/// Atomically and durably points `<dir>/<link>` at `target` (a sibling
/// name).
fn set_link(dir: &Path, link: &str, target: &str) -> std::io::Result<()> {
    fsutil::replace_symlink(dir, link, target)
}

/// Unpacks a verified bundle into `<root>/<name>/<version>` and switches
/// `current`; versions other than the new current and previous are removed.
fn install(root: &Path, b: &UaBundle, bundle: &Path) -> Result<UaVersion, WireError> {
    let dir = root.join(&b.name);
    // Readable by everyone: the UA runs as the session's user.
    fsutil::ensure_dir_mode(root, 0o755).map_err(internal("create UA dir"))?;
    fsutil::ensure_dir_mode(&dir, 0o755).map_err(internal("create UA dir"))?;
    let staging = dir.join(format!(".staging-{}", b.transfer));
    let _ = fs::remove_dir_all(&staging);
    fsutil::ensure_dir_mode(&staging, 0o755).map_err(internal("create staging dir"))?;
    let policy = UnpackPolicy {
        symlinks_anywhere: false,
        strict_types: true,
        owner: None,
    };
    let unpacked = archive::unpack(bundle, &staging, policy);
    let _ = fs::remove_file(bundle);
    if let Err(e) = unpacked {
        let _ = fs::remove_dir_all(&staging);
        return Err(match e {
            archive::ArchiveError::Unsafe { .. } => err(ErrorCode::BundleRejected, e),
            archive::ArchiveError::Io { .. } => err(ErrorCode::BundleRejected, e),
        });
    }
    let target = dir.join(&b.version);
    let cur = read_link_name(&dir.join("current"));
    if target.exists() {
        if cur.as_deref() == Some(b.version.as_str()) {
            // Redeploying the running version: replace it under a new name
            // is not possible without breaking `current`; refuse.
            let _ = fs::remove_dir_all(&staging);
            return Err(err(
                ErrorCode::BadRequest,
                format!("version {} is current", b.version),
            ));
        }
        fs::remove_dir_all(&target).map_err(internal("replace version"))?;
    }
    fs::rename(&staging, &target).map_err(internal("move version into place"))?;
    fsutil::write_json(&dir.join(format!(".{}.entry", b.version)), &b.entry)
        .map_err(internal("write entry"))?;
    set_link(&dir, "current", &b.version).map_err(internal("switch current"))?;
    if let Some(c) = &cur {
        set_link(&dir, "previous", c).map_err(internal("switch previous"))?;
    }
    // Keep only current and previous.
    let keep = [Some(b.version.clone()), cur];
    if let Ok(rd) = fs::read_dir(&dir) {
        for e in rd.filter_map(Result::ok) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n == "current" || n == "previous" || n.starts_with('.') {
                continue;
            }
            if !keep.iter().any(|k| k.as_deref() == Some(n.as_str())) {
                let _ = fs::remove_dir_all(e.path());
                let _ = fs::remove_file(dir.join(format!(".{n}.entry")));
            }
        }
    }
    Ok(b.version.clone())
}
