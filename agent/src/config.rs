//! The agent's configuration file (TOML). Every field has a default, so the
//! agent runs without a file. Example with every field:
//!
//! ```toml
//! host = "vsock:2:7075"            # or "unix:/path" (tests), "hybrid:..."
//! state_dir = "/var/lib/uve-agent"
//! control_socket = "/run/uve-agent.sock"
//! control_socket_mode = "0600"     # octal; 0666 lets UAs run monitor-check
//!                                  # (each caller is checked by its uid)
//! login_timeout_secs = 30          # wait this long for the host at login
//! on_retrieve_failure = "fail"     # or "temporary": run on an empty UIF
//! checkpoint_interval_secs = 0     # 0 = no periodic checkpoints
//! fetch_parallel = 12              # ChunkFetch requests in flight
//! max_ua_bundle = 268435456        # refuse larger UA bundles
//! shutdown_flush_secs = 20         # SIGTERM: how long to try flushing
//! state_floor_mib = 256            # a pack never leaves less free on the
//!                                  # state filesystem (directory mode;
//!                                  # at most a tenth of it)
//! preserved_mib = 0                # refused updates kept aside, all users
//!                                  # (0 = half the state filesystem)
//! preserved_per_user_mib = 0       # one user's share (0 = a quarter);
//!                                  # over it the bytes are held in place
//! cache_mib = 0                    # working copies of users not logged
//!                                  # in here (0 = a quarter of the state
//!                                  # filesystem); LRU beyond it removed
//!
//! [uif]
//! mode = "file"                    # or "directory", "disk"
//! path = "/var/lib/uve-agent/uif/{user}.img"
//! attach = ["/usr/local/sbin/uif-attach", "{path}", "{user}"]
//! detach = ["/usr/local/sbin/uif-detach", "{path}", "{user}"]
//! home = "passwd"                 # directory mode: the user's entry's
//!                                  # home, else /home/{user}; or a
//!                                  # template such as "/home/{user}"
//! owner = "passwd"                 # or "1000:1000"
//! exclude = [".cache", "*.tmp"]
//!
//! [disk]                           # mode = "disk": a profile disk (ext4)
//! size_mib = 8192                  # size of a new disk (sparse)
//! mkfs_options = []                # extra mkfs.ext4 arguments
//! mount_options = "noatime"        # added to nosuid,nodev
//! logout_grace_secs = 10           # then the user's processes are killed
//! reattach_timeout_secs = 120      # the device waits for a restarted agent
//! reserve_mib = 0                  # free space needed to mount; 0 = room
//!                                  # for the disk to grow to its size
//!
//! [users]
//! fold_case = false                # true: `Alice` and `alice` are one user
//!                                  # (case-insensitive directories: AD)
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::base::accounts::Account;
use uve_protocol::transport::Endpoint;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error.
        source: toml::de::Error,
    },
    /// A value is out of range or malformed.
    #[error("invalid config value: {0}")]
    Value(String),
}

/// How a user's UIF appears in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UifMode {
    /// The UIF is an image file placed at `path` (hooks attach it).
    File,
    /// The UIF is a tar archive unpacked into the user's home.
    Directory,
    /// The UIF is a disk image (ext4) the agent serves to the kernel over
    /// NBD and mounts as the user's home (the `[disk]` section).
    Disk,
}

/// What to do when a retrieve fails at login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetrieveFailure {
    /// Login fails with the error.
    Fail,
    /// Login continues on an empty temporary UIF (its update has no base).
    Temporary,
}

/// The `[uif]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UifConfig {
    /// File or directory mode.
    pub mode: UifMode,
    /// Image path template (file mode); `{user}` is replaced.
    pub path: String,
    /// Attach hook argv (file mode); `{path}`, `{user}` are replaced.
    pub attach: Vec<String>,
    /// Detach hook argv (file mode).
    pub detach: Vec<String>,
    /// Home directory (directory mode): `passwd` for the user's entry's
    /// home (`/home/{user}` for a user the database does not know), or a
    /// template containing `{user}`.
    pub home: String,
    /// Owner of unpacked files: `passwd` (the user's entry) or `uid:gid`.
    pub owner: String,
    /// Glob patterns (relative to the home) left out when packing; the
    /// syntax is [`crate::base::archive::Excludes`]'s.
    pub exclude: Vec<String>,
}

impl Default for UifConfig {
    fn default() -> Self {
        UifConfig {
            mode: UifMode::File,
            path: "/var/lib/uve-agent/uif/{user}.img".into(),
            attach: Vec::new(),
            detach: Vec::new(),
            home: "passwd".into(),
            owner: "passwd".into(),
            exclude: Vec::new(),
        }
    }
}

/// The configuration in force, replaceable at run time (SIGHUP): readers
/// take a snapshot with [`get`](Self::get).
pub struct SharedConfig(std::sync::Mutex<std::sync::Arc<Config>>);

impl SharedConfig {
    /// Holds `config`.
    pub fn new(config: Config) -> SharedConfig {
        SharedConfig(std::sync::Mutex::new(std::sync::Arc::new(config)))
    }

    /// The configuration now.
    pub fn get(&self) -> std::sync::Arc<Config> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the configuration. The state dir and control socket keep
    /// their values until restart.
    pub fn reload(&self, mut config: Config) {
        let old = self.get();
        if config.state_dir != old.state_dir || config.control_socket != old.control_socket {
            tracing::warn!("state_dir and control_socket changes take effect after a restart");
            config.state_dir = old.state_dir.clone();
            config.control_socket = old.control_socket.clone();
        }
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(config);
        tracing::info!("configuration reloaded");
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Host endpoint to dial.
    pub host: String,
    /// Where the agent keeps its state (cache, spool, journals, UAs).
    pub state_dir: PathBuf,
    /// Local control socket for the CLI verbs.
    pub control_socket: PathBuf,
    /// Octal permission bits of the control socket.
    pub control_socket_mode: String,
    /// How long a login waits for a host connection.
    pub login_timeout_secs: u64,
    /// Behaviour when the retrieve fails.
    pub on_retrieve_failure: RetrieveFailure,
    /// Periodic checkpoint interval; 0 disables.
    pub checkpoint_interval_secs: u64,
    /// Chunk fetches kept in flight during a retrieve.
    pub fetch_parallel: usize,
    /// Largest UA bundle accepted.
    pub max_ua_bundle: u64,
    /// How long SIGTERM waits for the host to take the final flushes.
    pub shutdown_flush_secs: u64,
    /// MiB a directory-mode pack always leaves free on the state
    /// filesystem (at most a tenth of that filesystem): a pack that would
    /// go below is stopped, its temp archive removed and the logout
    /// refused (the home stays as it is).
    pub state_floor_mib: u64,
    /// MiB the preserved copies of refused updates may hold together; 0:
    /// half the state filesystem. A refused update over it (or over one
    /// user's share) is held in place instead, and that user's logins on
    /// this VM are refused until root resolves it.
    pub preserved_mib: u64,
    /// MiB one user's preserved copies may hold together; 0: a quarter of
    /// the state filesystem.
    pub preserved_per_user_mib: u64,
    /// MiB the working copies of users with no session on this VM may
    /// keep (caches that make their next login here warm); 0: a quarter
    /// of the state filesystem. Trimmed after each logout, least recently
    /// used first.
    pub cache_mib: u64,
    /// UIF materialisation.
    pub uif: UifConfig,
    /// How user names are read.
    pub users: UsersConfig,
    /// Profile disks (`[uif] mode = "disk"`).
    pub disk: DiskConfig,
}

/// The `[disk]` section: profile disks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskConfig {
    /// Size of a new disk, in MiB (sparse: it costs what the user's files
    /// take).
    pub size_mib: u64,
    /// Extra `mkfs.ext4` arguments for a new disk.
    pub mkfs_options: Vec<String>,
    /// Extra mount options (`nosuid,nodev` are always set).
    pub mount_options: String,
    /// At logout, how long the user's processes may keep the home busy
    /// before they are killed.
    pub logout_grace_secs: u64,
    /// After the agent dies, how long the kernel keeps the device (and
    /// the mounted home) waiting for the restarted agent.
    pub reattach_timeout_secs: u64,
    /// Free space the backing filesystem must have before a disk is
    /// mounted, in MiB; 0 means room for the disk to grow to its full size.
    pub reserve_mib: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            size_mib: 8192,
            mkfs_options: Vec::new(),
            mount_options: String::new(),
            logout_grace_secs: 10,
            reattach_timeout_secs: 120,
            reserve_mib: 0,
        }
    }
}

/// The `[users]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsersConfig {
    /// Lower-case names before they become store names, for directories
    /// that compare names case-insensitively (AD: `Alice` is `alice`).
    /// Off by default, so no existing name changes.
    pub fold_case: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: "vsock:2:7075".into(),
            state_dir: "/var/lib/uve-agent".into(),
            control_socket: "/run/uve-agent.sock".into(),
            control_socket_mode: "0600".into(),
            login_timeout_secs: 30,
            on_retrieve_failure: RetrieveFailure::Fail,
            checkpoint_interval_secs: 0,
            fetch_parallel: 12,
            max_ua_bundle: 256 << 20,
            shutdown_flush_secs: 20,
            state_floor_mib: 256,
            preserved_mib: 0,
            preserved_per_user_mib: 0,
            cache_mib: 0,
            uif: UifConfig::default(),
            users: UsersConfig::default(),
            disk: DiskConfig::default(),
        }
    }
}

impl Config {
    /// Loads `path`, or the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let cfg = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: p.to_path_buf(),
                    source,
                })?
            }
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.endpoint()?;
        self.socket_mode()?;
        if self.fetch_parallel == 0 || self.fetch_parallel > 64 {
            return Err(ConfigError::Value("fetch_parallel must be 1..=64".into()));
        }
        if self.uif.mode == UifMode::File && !self.uif.path.contains("{user}") {
            return Err(ConfigError::Value("uif.path must contain {user}".into()));
        }
        if self.uif.mode == UifMode::Directory
            && self.uif.home != "passwd"
            && !self.uif.home.contains("{user}")
        {
            return Err(ConfigError::Value(
                "uif.home must be `passwd` or contain {user}".into(),
            ));
        }
        crate::base::archive::Excludes::new(&self.uif.exclude)
            .map_err(|e| ConfigError::Value(format!("uif.exclude: {e}")))?;
        self.owner_override()?;
        Ok(())
    }

    /// The parsed host endpoint.
    pub fn endpoint(&self) -> Result<Endpoint, ConfigError> {
        self.host
            .parse()
            .map_err(|e| ConfigError::Value(format!("host: {e}")))
    }

    /// The control socket's permission bits.
    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        u32::from_str_radix(self.control_socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| ConfigError::Value("control_socket_mode must be octal".into()))
    }

    /// `Some((uid, gid))` when `uif.owner` names ids instead of `passwd`.
    pub fn owner_override(&self) -> Result<Option<(u32, u32)>, ConfigError> {
        if self.uif.owner == "passwd" {
            return Ok(None);
        }
        let bad = || ConfigError::Value("uif.owner must be `passwd` or `uid:gid`".into());
        let (u, g) = self.uif.owner.split_once(':').ok_or_else(bad)?;
        Ok(Some((
            u.parse().map_err(|_| bad())?,
            g.parse().map_err(|_| bad())?,
        )))
    }

    /// The uid and gid that own the files of the user whose entry is
    /// `account`: the `uif.owner` override, else the entry's; `None` if
    /// neither names one.
    pub fn owner(&self, account: Option<&Account>) -> Option<(u32, u32)> {
        match self.owner_override() {
            Ok(Some(ids)) => Some(ids),
            _ => account.map(|a| (a.uid, a.gid)),
        }
    }

    /// The cache budget in bytes on a state filesystem of `fs_size`
    /// bytes (`cache_mib`, or a quarter of it when 0).
    pub fn cache_budget(&self, fs_size: u64) -> u64 {
        if self.cache_mib == 0 {
            fs_size / 4
        } else {
            self.cache_mib.saturating_mul(1 << 20)
        }
    }

    /// The image path of `user`'s UIF in file mode; in directory mode the
    /// tar archive kept in the state dir; in disk mode the disk's working
    /// copy there.
    pub fn uif_path(&self, user: &str) -> PathBuf {
        match self.uif.mode {
            UifMode::File => PathBuf::from(self.uif.path.replace("{user}", user)),
            UifMode::Directory => self.state_dir.join("uif").join(format!("{user}.tar")),
            UifMode::Disk => self.state_dir.join("uif").join(format!("{user}.disk")),
        }
    }

    /// How this mode's UIF files are cut into chunks: a profile disk in
    /// fixed blocks ([`uve_protocol::defs::DISK_BLOCK`]: its blocks stay
    /// in place), the other modes by content.
    pub fn chunk_params(&self) -> uve_protocol::chunker::ChunkParams {
        match self.uif.mode {
            UifMode::Disk => {
                uve_protocol::chunker::ChunkParams::fixed(uve_protocol::defs::DISK_BLOCK)
            }
            UifMode::File | UifMode::Directory => uve_protocol::chunker::ChunkParams::default(),
        }
    }

    /// The home directory of `user` (whose entry is `account`) in
    /// directory and disk modes.
    pub fn home_path(&self, user: &str, account: Option<&Account>) -> PathBuf {
        match (self.uif.home.as_str(), account) {
            ("passwd", Some(a)) => a.home.clone(),
            ("passwd", None) => PathBuf::from(format!("/home/{user}")),
            (template, _) => PathBuf::from(template.replace("{user}", user)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let d = Config::load(None).unwrap();
        assert_eq!(
            d.endpoint().unwrap(),
            Endpoint::Vsock { cid: 2, port: 7075 }
        );
        assert_eq!(d.socket_mode().unwrap(), 0o600);
        let c: Config = toml::from_str(
            "host = \"unix:/tmp/x\"\n[uif]\nmode = \"directory\"\nowner = \"1:2\"\n",
        )
        .unwrap();
        c.check().unwrap();
        assert_eq!(c.owner_override().unwrap(), Some((1, 2)));
        assert_eq!(c.home_path("bob", None), PathBuf::from("/home/bob"));
        let entry = Account {
            name: "CORP\\bob".into(),
            uid: 20001,
            gid: 20001,
            groups: vec![20001],
            home: "/home/corp/bob".into(),
        };
        assert_eq!(
            c.home_path("CORP~5cbob", Some(&entry)),
            PathBuf::from("/home/corp/bob"),
            "the entry's home by default"
        );
        assert_eq!(c.owner(Some(&entry)), Some((1, 2)), "the override wins");
        assert!(!c.users.fold_case, "no name changes by default");
        let t: Config = toml::from_str(
            "[uif]\nmode = \"directory\"\nhome = \"/srv/homes/{user}\"\n[users]\nfold_case = true\n",
        )
        .unwrap();
        t.check().unwrap();
        assert_eq!(
            t.home_path("bob", Some(&entry)),
            PathBuf::from("/srv/homes/bob"),
            "a template overrides the entry"
        );
        assert_eq!(t.owner(Some(&entry)), Some((20001, 20001)));
        assert!(t.users.fold_case);
        let bad: Config = toml::from_str("[uif]\nmode = \"directory\"\nhome = \"/srv\"\n").unwrap();
        assert!(bad.check().is_err());
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
    }
}
