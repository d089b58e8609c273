//! The VM registry and the user ↔ VM assignments, persisted together in
//! `<data_dir>/registry.json` (durable replace on every change). A change
//! is made in memory under the registry's mutex, which async handlers take
//! (every `ChunkFetch` and `ManifestPage` checks an assignment); the file
//! is written by the registry's one writer ([`TableWriter`]) after the
//! mutex is released, and each change returns a [`Staged`] value that its
//! caller awaits.
//!
//! A VM is reached through exactly one transport: an AF_VSOCK `cid`, a
//! hybrid-vsock `uds_path` (the host listens on `<uds_path>_<port>`), or a
//! plain `unix` listen path (tests, local tools). The transport, never the
//! guest, decides which VM a connection belongs to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use uve_protocol::names;
use uve_protocol::transport::hybrid;

use crate::state::table::{Staged, TableError, TableWriter};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A name failed validation.
    #[error(transparent)]
    InvalidName(#[from] names::NameError),
    /// The VM spec is not exactly one transport.
    #[error("a VM needs exactly one of cid, uds_path or unix")]
    BadTransport,
    /// A transport path is empty.
    #[error("{0} is empty: a VM's socket needs a path")]
    EmptyPath(&'static str),
    /// The CID is not a guest's.
    #[error("CID {cid} cannot be a VM's: {why}")]
    ReservedCid {
        /// The CID.
        cid: u32,
        /// What it is instead.
        why: &'static str,
    },
    /// The id or the transport address is already registered.
    #[error("{0}")]
    Duplicate(String),
    /// No such VM.
    #[error("no VM {0}")]
    NoSuchVm(String),
    /// The user is not assigned.
    #[error("user {0} is not assigned")]
    NotAssigned(String),
    /// The registry file could not be read or written.
    #[error("registry file: {0}")]
    Io(String),
}

impl From<TableError> for RegistryError {
    fn from(e: TableError) -> Self {
        RegistryError::Io(e.to_string())
    }
}

/// A registered VM. A field it does not know is an error (a typo in a
/// `POST /v1/vms` body is refused, not ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// VM id (a name: `[A-Za-z0-9._@-]`).
    pub id: String,
    /// AF_VSOCK context id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<u32>,
    /// Hybrid-vsock socket of the VMM; the host listens on `<uds_path>_<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uds_path: Option<PathBuf>,
    /// Guest port for hybrid vsock (default: the configured port, 7075).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Plain Unix listen path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<PathBuf>,
}

/// Why `cid` cannot name a guest, if it cannot: 0 is the hypervisor, 1
/// the host's own loopback (accepted only with `allow_local`, for tests
/// over `vsock_loopback`), 2 the host, `u32::MAX` "any".
pub fn cid_refusal(cid: u32, allow_local: bool) -> Option<&'static str> {
    match cid {
        0 => Some("CID 0 is the hypervisor"),
        1 if !allow_local => {
            Some("CID 1 is the host's own loopback (allow_local_cid = true admits it, for tests)")
        }
        2 => Some("CID 2 is the host itself"),
        u32::MAX => Some("CID 4294967295 means any CID"),
        _ => None,
    }
}

impl VmSpec {
    /// Checks the id, that exactly one transport is given, and that a CID
    /// is a guest's (`allow_local`: CID 1 too).
    pub fn validate(&self, allow_local: bool) -> Result<(), RegistryError> {
        names::validate("VM", &self.id)?;
        let n = usize::from(self.cid.is_some())
            + usize::from(self.uds_path.is_some())
            + usize::from(self.unix.is_some());
        if n != 1 || (self.port.is_some() && self.uds_path.is_none()) {
            return Err(RegistryError::BadTransport);
        }
        for (field, path) in [("uds_path", &self.uds_path), ("unix", &self.unix)] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(RegistryError::EmptyPath(field));
            }
        }
        if let Some(cid) = self.cid
            && let Some(why) = cid_refusal(cid, allow_local)
        {
            return Err(RegistryError::ReservedCid { cid, why });
        }
        Ok(())
    }

    /// The Unix socket the host listens on for this VM, if it is not vsock.
    pub fn listen_path(&self, default_port: u32) -> Option<PathBuf> {
        if let Some(p) = &self.unix {
            return Some(p.clone());
        }
        self.uds_path
            .as_ref()
            .map(|u| hybrid::listen_path(u, self.port.unwrap_or(default_port)))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RegistryData {
    vms: BTreeMap<String, VmSpec>,
    assignments: BTreeMap<String, String>,
}

/// VMs and assignments.
pub struct Registry {
    writer: Arc<TableWriter>,
    default_port: u32,
    allow_local_cid: bool,
    data: Mutex<RegistryData>,
}

impl Registry {
    /// Loads `<data_dir>/registry.json` (empty if absent).
    pub fn load(data_dir: &Path, tmp: &Path, default_port: u32) -> Result<Self, RegistryError> {
        let path = data_dir.join("registry.json");
        let data = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| RegistryError::Io(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryData::default(),
            Err(e) => return Err(RegistryError::Io(format!("{}: {e}", path.display()))),
        };
        Ok(Registry {
            writer: TableWriter::new(path, tmp.to_path_buf()),
            default_port,
            allow_local_cid: false,
            data: Mutex::new(data),
        })
    }

    /// An empty registry that is never written anywhere (tests and the
    /// fuzz targets).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn in_memory(default_port: u32) -> Self {
        Registry {
            writer: TableWriter::in_memory(),
            default_port,
            allow_local_cid: false,
            data: Mutex::new(RegistryData::default()),
        }
    }

    /// Admits CID 1 (the host's loopback) for VMs registered from now on,
    /// and for connections from it.
    pub fn with_local_cid(mut self, allow: bool) -> Self {
        self.allow_local_cid = allow;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryData> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` on the data under the lock and hands the result to
    /// the writer, unless `change` refused (then it must have changed
    /// nothing). The file is written after the lock is released.
    fn change<T>(
        &self,
        change: impl FnOnce(&mut RegistryData) -> Result<T, RegistryError>,
    ) -> Result<Staged<T>, RegistryError> {
        let mut data = self.lock();
        let out = change(&mut data)?;
        Ok(self.writer.stage(out, || {
            let data = data.clone();
            Box::new(move || serde_json::to_vec_pretty(&data).map_err(|e| e.to_string()))
        }))
    }

    /// All VMs.
    pub fn vms(&self) -> Vec<VmSpec> {
        self.lock().vms.values().cloned().collect()
    }

    /// One VM.
    pub fn vm(&self, id: &str) -> Option<VmSpec> {
        self.lock().vms.get(id).cloned()
    }

    /// The VM with this vsock CID.
    pub fn vm_by_cid(&self, cid: u32) -> Option<String> {
        self.lock()
            .vms
            .values()
            .find(|v| v.cid == Some(cid) && cid_refusal(cid, self.allow_local_cid).is_none())
            .map(|v| v.id.clone())
    }

    /// Registers a VM; refuses duplicate ids, CIDs and listen paths.
    pub fn add_vm(&self, spec: VmSpec) -> Result<Staged<()>, RegistryError> {
        spec.validate(self.allow_local_cid)?;
        self.change(|data| {
            if data.vms.contains_key(&spec.id) {
                return Err(RegistryError::Duplicate(format!(
                    "VM {} is already registered",
                    spec.id
                )));
            }
            let path = spec.listen_path(self.default_port);
            for other in data.vms.values() {
                if (spec.cid.is_some() && other.cid == spec.cid)
                    || (path.is_some() && other.listen_path(self.default_port) == path)
                {
                    return Err(RegistryError::Duplicate(format!(
                        "VM {} already uses that transport address",
                        other.id
                    )));
                }
            }
            data.vms.insert(spec.id.clone(), spec);
            Ok(())
        })
    }

    /// Unregisters a VM and drops its assignments; returns its spec.
    pub fn remove_vm(&self, id: &str) -> Result<Staged<VmSpec>, RegistryError> {
        self.change(|data| {
            let spec = data.vms.remove(id);
            let spec = spec.ok_or_else(|| RegistryError::NoSuchVm(id.to_string()))?;
            data.assignments.retain(|_, vm| vm != id);
            Ok(spec)
        })
    }

    /// Assigns `user` to `vm`; returns the previous VM.
    pub fn assign(&self, user: &str, vm: &str) -> Result<Staged<Option<String>>, RegistryError> {
        names::user(user)?;
        self.change(|data| {
            if !data.vms.contains_key(vm) {
                return Err(RegistryError::NoSuchVm(vm.to_string()));
            }
            Ok(data.assignments.insert(user.to_string(), vm.to_string()))
        })
    }

    /// Removes `user`'s assignment; returns the VM it was assigned to.
    pub fn unassign(&self, user: &str) -> Result<Staged<String>, RegistryError> {
        self.change(|data| {
            let prev = data.assignments.remove(user);
            prev.ok_or_else(|| RegistryError::NotAssigned(user.to_string()))
        })
    }

    /// The VM `user` is assigned to.
    pub fn assignment(&self, user: &str) -> Option<String> {
        self.lock().assignments.get(user).cloned()
    }

    /// All assignments, user → VM.
    pub fn assignments(&self) -> BTreeMap<String, String> {
        self.lock().assignments.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn spec(id: &str, unix: &str) -> VmSpec {
        VmSpec {
            id: id.into(),
            cid: None,
            uds_path: None,
            port: None,
            unix: Some(unix.into()),
        }
    }

    #[test]
    fn persists_vms_and_assignments() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::load(dir.path(), dir.path(), 7075).unwrap();
        r.add_vm(spec("vm1", "/tmp/a"))
            .unwrap()
            .durable_blocking()
            .unwrap();
        r.add_vm(VmSpec {
            id: "vm2".into(),
            cid: None,
            uds_path: Some("/run/fc/v.sock".into()),
            port: None,
            unix: None,
        })
        .unwrap()
        .durable_blocking()
        .unwrap();
        assert!(r.add_vm(spec("vm1", "/tmp/b")).is_err());
        assert!(r.add_vm(spec("vm3", "/tmp/a")).is_err());
        assert!(r.add_vm(spec("../x", "/tmp/c")).is_err());
        assert_eq!(
            r.vm("vm2").unwrap().listen_path(7075),
            Some(PathBuf::from("/run/fc/v.sock_7075"))
        );
        let previous = r.assign("alice", "vm1").unwrap();
        assert_eq!(previous.durable_blocking().unwrap(), None);
        assert!(r.assign("bob", "nope").is_err());
        assert!(r.assign("a/b", "vm1").is_err());
        let r = Registry::load(dir.path(), dir.path(), 7075).unwrap();
        assert_eq!(r.vms().len(), 2);
        assert_eq!(r.assignment("alice").as_deref(), Some("vm1"));
        r.remove_vm("vm1").unwrap().durable_blocking().unwrap();
        assert_eq!(r.assignment("alice"), None);
        let r = Registry::load(dir.path(), dir.path(), 7075).unwrap();
        assert_eq!(r.vms().len(), 1, "the removal is on disk");
    }

    #[test]
    fn spec_needs_exactly_one_transport() {
        let mut s = spec("vm", "/x");
        s.cid = Some(3);
        assert!(s.validate(false).is_err());
        s.unix = None;
        assert!(s.validate(false).is_ok());
        s.cid = None;
        assert!(s.validate(false).is_err());
    }

    #[test]
    fn empty_paths_and_unknown_fields_are_refused() {
        let s = spec("vm", "");
        assert!(matches!(
            s.validate(false),
            Err(RegistryError::EmptyPath("unix"))
        ));
        let mut s = spec("vm", "/x");
        s.unix = None;
        s.uds_path = Some(PathBuf::new());
        assert!(matches!(
            s.validate(false),
            Err(RegistryError::EmptyPath("uds_path"))
        ));
        let typo = serde_json::from_str::<VmSpec>(r#"{"id": "vm", "uds-path": "/x"}"#);
        assert!(typo.is_err(), "an unknown field is an error");
    }

    #[test]
    fn cids_that_are_not_guests_are_refused() {
        let mut s = spec("vm", "/x");
        s.unix = None;
        for cid in [0, 2, u32::MAX] {
            s.cid = Some(cid);
            for local in [false, true] {
                let e = s.validate(local).expect_err("reserved");
                assert!(matches!(e, RegistryError::ReservedCid { cid: c, .. } if c == cid));
            }
        }
        s.cid = Some(1);
        assert!(s.validate(false).is_err(), "CID 1 needs allow_local_cid");
        assert!(s.validate(true).is_ok());
        s.cid = Some(3);
        assert!(s.validate(false).is_ok());
    }
}
