//! Where supervised UAs' cgroups live (cgroup v2 only), decided once when
//! the daemon starts.
//!
//! - **Delegated unit** (systemd, `Delegate=yes` on `uve-agent.service`,
//!   which marks the unit's cgroup with the `trusted.delegate` xattr): the
//!   subtree is the agent's. It moves itself into the leaf
//!   `<unit>/supervisor` and gives each UA `<unit>/ua/<session>`, so no
//!   process of its own sits beside the UA cgroups (cgroup v2's "no internal
//!   processes" rule, once an operator enables a controller there). No
//!   controller is enabled in the subtree: the freezer (`cgroup.freeze`)
//!   and `cgroup.kill` are core files of every cgroup, and systemd places
//!   the unit's helper processes (`ExecStartPost=`, `ExecReload=`) in the
//!   unit's root, which an enabled controller would forbid.
//! - **Root cgroup** (no cgroup manager: an initramfs, a container's
//!   namespace root): `/sys/fs/cgroup/uve-agent/<session>`.
//! - Otherwise (cgroup v1, not root, a systemd unit without delegation,
//!   whose cgroup systemd owns): no cgroups, suspend by signals; the log
//!   says why.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where cgroup v2 is mounted.
const MOUNT: &str = "/sys/fs/cgroup";
/// The agent's own leaf inside its delegated unit cgroup.
const SUPERVISOR: &str = "supervisor";
/// The parent of the UA cgroups inside the delegated unit cgroup.
const UA_DIR: &str = "ua";
/// The parent of the UA cgroups under the root cgroup (and, before
/// delegation, under systemd too: still adopted from there).
const ROOT_DIR: &str = "uve-agent";

/// Under a delegated unit: the parent of the per-user cgroups of the
/// children that pack directory-mode homes (`<unit>/pack/<user>`).
const PACK_DIR: &str = "pack";

/// In the root layout: the same parent, beside the UAs'.
const ROOT_PACK_DIR: &str = "uve-agent-pack";

/// The layout [`Cgroups::settle`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// The unit cgroup (absolute path under the mount) is delegated to us.
    Delegated(PathBuf),
    /// The agent runs in the root cgroup: no manager owns the tree.
    Root,
    /// No cgroups; the reason.
    Signals(String),
}

/// Where UA cgroups are made, and the agent's own place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    mount: PathBuf,
    /// The parent of the UA cgroups, if cgroups are used.
    base: Option<PathBuf>,
    /// The parent of the pack children's per-user cgroups, if used.
    pack: Option<PathBuf>,
}

impl Cgroups {
    /// No cgroups: suspend and resume by signals (the unit-test rig).
    pub fn none() -> Cgroups {
        Cgroups {
            mount: PathBuf::from(MOUNT),
            base: None,
            pack: None,
        }
    }

    /// Decides the layout from `/proc/self/cgroup` and, under a delegated
    /// unit, moves this process into `<unit>/supervisor`. Only for the
    /// daemon, run as root; logs what it decided.
    pub fn settle() -> Cgroups {
        if !nix::unistd::getuid().is_root() {
            return Cgroups::none();
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let cg = Cgroups::settle_at(Path::new(MOUNT), &own, &is_delegated);
        if let Some(base) = &cg.base {
            tracing::info!(base = %base.display(), "UA cgroups (cgroup v2 freezer)");
        }
        cg
    }

    /// [`Cgroups::settle`] on a cgroup2 tree mounted at `mount`, this
    /// process's `/proc/self/cgroup` text `own`, and the delegation test
    /// `delegated`.
    fn settle_at(mount: &Path, own: &str, delegated: &dyn Fn(&Path) -> bool) -> Cgroups {
        let (base, pack) = match layout(mount, own, delegated) {
            Layout::Delegated(unit) => {
                let leaf = unit.join(SUPERVISOR);
                // Writing 0 to a cgroup's cgroup.procs moves the writer.
                let moved = std::fs::create_dir_all(&leaf).and_then(|()| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(leaf.join("cgroup.procs"))?
                        .write_all(b"0")
                });
                match moved {
                    Ok(()) => tracing::info!(cgroup = %leaf.display(), "agent moved into its leaf"),
                    // Still correct while no controller is enabled in the
                    // unit's subtree (the agent never enables one).
                    Err(e) => tracing::warn!(
                        cgroup = %leaf.display(),
                        "cannot move the agent into its leaf, staying in the unit's root: {e}"
                    ),
                }
                (Some(unit.join(UA_DIR)), Some(unit.join(PACK_DIR)))
            }
            Layout::Root => (Some(mount.join(ROOT_DIR)), Some(mount.join(ROOT_PACK_DIR))),
            Layout::Signals(why) => {
                tracing::info!("UAs without cgroups (suspend by SIGSTOP/SIGCONT): {why}");
                (None, None)
            }
        };
        Cgroups {
            mount: mount.to_path_buf(),
            base,
            pack,
        }
    }

    /// The parent of the UA cgroups, if cgroups are used.
    pub fn base(&self) -> Option<&Path> {
        self.base.as_deref()
    }

    /// The parent of the per-user cgroups that directory-mode pack
    /// children run in, if cgroups are used (see
    /// [`crate::uif::home_pack`]).
    pub fn pack_base(&self) -> Option<&Path> {
        self.pack.as_deref()
    }

    /// Creates the cgroup of `session`'s UA; `None` if cgroups are not used
    /// or it cannot be made (the UA then runs without one).
    pub(super) fn create(&self, session: &str) -> Option<PathBuf> {
        let dir = self.base.as_ref()?.join(session);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(cgroup = %dir.display(), "cannot create the UA's cgroup: {e}");
            return None;
        }
        dir.join("cgroup.procs").exists().then_some(dir)
    }

    /// After an agent restart: the cgroup UA `pid` of `session` runs in, if
    /// it is the one made for it (`<base>/<session>`, or the root layout's
    /// `uve-agent/<session>` of an agent before delegation).
    pub(super) fn of_ua(&self, pid: i32, session: &str) -> Option<PathBuf> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        self.adoptable(&text, session)
    }

    /// [`Cgroups::of_ua`] on the UA's `/proc/<pid>/cgroup` text.
    fn adoptable(&self, text: &str, session: &str) -> Option<PathBuf> {
        let base = self.base.as_ref()?;
        let at = self.mount.join(unified_path(text)?.trim_start_matches('/'));
        let ours = [base.join(session), self.mount.join(ROOT_DIR).join(session)];
        (ours.contains(&at) && at.join("cgroup.procs").exists()).then_some(at)
    }
}

/// The layout for a process whose `/proc/self/cgroup` is `own`.
fn layout(mount: &Path, own: &str, delegated: &dyn Fn(&Path) -> bool) -> Layout {
    if !mount.join("cgroup.controllers").exists() {
        return Layout::Signals(format!("no cgroup v2 mounted at {}", mount.display()));
    }
    let Some(path) = unified_path(own) else {
        return Layout::Signals("no cgroup v2 entry in /proc/self/cgroup".into());
    };
    if path == "/" {
        return Layout::Root;
    }
    let dir = mount.join(path.trim_start_matches('/'));
    if delegated(&dir) {
        return Layout::Delegated(dir);
    }
    // Placed in the leaf already (systemd's DelegateSubgroup=supervisor).
    if dir.file_name().is_some_and(|n| n == SUPERVISOR)
        && let Some(unit) = dir.parent().filter(|u| delegated(u))
    {
        return Layout::Delegated(unit.to_path_buf());
    }
    Layout::Signals(format!(
        "cgroup {path} is not delegated to the agent (Delegate=yes in its systemd unit)"
    ))
}

/// The cgroup v2 path (`0::<path>`) of a `/proc/<pid>/cgroup` text.
fn unified_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
        .filter(|p| p.starts_with('/'))
}

/// Whether systemd marked cgroup `dir` as delegated: `trusted.delegate`
/// (or, set by newer systemd too, `user.delegate`) is `1`.
fn is_delegated(dir: &Path) -> bool {
    ["trusted.delegate", "user.delegate"]
        .iter()
        .any(|name| xattr(dir, name).is_some_and(|v| v == b"1"))
}

/// The value of extended attribute `name` of `path`, if set.
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    // SAFETY: both strings are NUL-terminated and live across the call;
    // the kernel writes at most `buf.len()` bytes into `buf`.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(len).ok()?;
    buf.get(..len).map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A fake cgroup2 mount: `cgroup.controllers` at the top and a
    /// `cgroup.procs` in each of `cgroups` (relative paths), as the kernel
    /// makes them.
    fn tree(cgroups: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        for cg in cgroups {
            std::fs::create_dir_all(t.path().join(cg)).unwrap();
            std::fs::write(t.path().join(cg).join("cgroup.procs"), "").unwrap();
        }
        t
    }

    const UNIT: &str = "system.slice/uve-agent.service";

    fn delegated_unit(mount: &Path) -> impl Fn(&Path) -> bool {
        let unit = mount.join(UNIT);
        move |p: &Path| p == unit
    }

    #[test]
    fn the_unified_entry_is_read_from_v2_only_and_hybrid_texts() {
        assert_eq!(
            unified_path("0::/system.slice/a.service\n"),
            Some("/system.slice/a.service")
        );
        let hybrid = "12:pids:/system.slice/a.service\n1:name=systemd:/system.slice/a.service\n0::/system.slice/a.service\n";
        assert_eq!(unified_path(hybrid), Some("/system.slice/a.service"));
        assert_eq!(unified_path("4:memory:/x\n1:name=systemd:/\n"), None);
        assert_eq!(unified_path(""), None);
    }

    #[test]
    fn a_delegated_unit_gives_ua_cgroups_beside_the_agents_leaf() {
        let t = tree(&[UNIT]);
        let m = t.path();
        let own = format!("0::/{UNIT}\n");
        assert_eq!(
            layout(m, &own, &delegated_unit(m)),
            Layout::Delegated(m.join(UNIT))
        );
        let cg = Cgroups::settle_at(m, &own, &delegated_unit(m));
        assert_eq!(cg.base(), Some(m.join(UNIT).join("ua").as_path()));
        assert_eq!(cg.pack_base(), Some(m.join(UNIT).join("pack").as_path()));
        assert!(m.join(UNIT).join("supervisor").is_dir(), "the agent's leaf");
        // Already in the leaf (DelegateSubgroup=supervisor, or a second
        // start): the same unit.
        let leaf = format!("0::/{UNIT}/supervisor\n");
        assert_eq!(
            layout(m, &leaf, &delegated_unit(m)),
            Layout::Delegated(m.join(UNIT))
        );
    }

    #[test]
    fn without_delegation_or_cgroup_v2_there_are_no_cgroups() {
        let t = tree(&[UNIT]);
        let m = t.path();
        let own = format!("0::/{UNIT}\n");
        match layout(m, &own, &|_: &Path| false) {
            Layout::Signals(why) => assert!(why.contains("Delegate=yes"), "{why}"),
            other => panic!("{other:?}"),
        }
        let cg = Cgroups::settle_at(m, &own, &|_: &Path| false);
        assert_eq!(cg.base(), None);
        assert_eq!(cg.pack_base(), None);
        assert_eq!(cg.create("s1"), None);
        assert!(!m.join(UNIT).join("supervisor").exists(), "nothing written");
        // Some other delegated unit's leaf named supervisor is not ours.
        let other = format!("0::/{UNIT}/x/supervisor\n");
        assert!(matches!(
            layout(m, &other, &delegated_unit(m)),
            Layout::Signals(_)
        ));
        // cgroup v1 (no cgroup.controllers at the mount).
        let v1 = tempfile::tempdir().unwrap();
        assert!(matches!(
            layout(v1.path(), &own, &|_: &Path| true),
            Layout::Signals(_)
        ));
    }

    #[test]
    fn in_the_root_cgroup_uas_go_under_uve_agent() {
        let t = tree(&[]);
        let m = t.path();
        assert_eq!(layout(m, "0::/\n", &|_: &Path| false), Layout::Root);
        let cg = Cgroups::settle_at(m, "0::/\n", &|_: &Path| false);
        assert_eq!(cg.base(), Some(m.join("uve-agent").as_path()));
        assert_eq!(cg.pack_base(), Some(m.join("uve-agent-pack").as_path()));
    }

    #[test]
    fn a_ua_is_adopted_only_from_its_own_sessions_cgroup() {
        let t = tree(&[
            UNIT,
            "system.slice/uve-agent.service/ua/s1",
            "uve-agent/s2",
            "user.slice/s1",
        ]);
        let m = t.path();
        let cg = Cgroups::settle_at(m, &format!("0::/{UNIT}\n"), &delegated_unit(m));
        assert_eq!(
            cg.adoptable(&format!("0::/{UNIT}/ua/s1\n"), "s1"),
            Some(m.join(UNIT).join("ua/s1"))
        );
        // Made by an agent before delegation: still frozen through it.
        assert_eq!(
            cg.adoptable("0::/uve-agent/s2\n", "s2"),
            Some(m.join("uve-agent/s2"))
        );
        assert_eq!(
            cg.adoptable(&format!("0::/{UNIT}/ua/s1\n"), "s2"),
            None,
            "another session's"
        );
        assert_eq!(cg.adoptable("0::/user.slice/s1\n", "s1"), None, "not ours");
        assert_eq!(
            cg.adoptable(&format!("0::/{UNIT}/ua/gone\n"), "gone"),
            None,
            "removed"
        );
        assert_eq!(
            Cgroups::none().adoptable(&format!("0::/{UNIT}/ua/s1\n"), "s1"),
            None
        );
    }
}
