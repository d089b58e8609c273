//! What the agent's integration tests share: the test kit's fake host
//! ([`TestHost`]) and agent process ([`AgentProc`]), bound here to the
//! `uve-agent` binary under test and to a fake host in the test's own
//! directory. Everything else comes from the kit (`uve_e2e`) as is.

#![allow(dead_code, unused_imports)] // not every test binary uses every helper

use std::path::{Path, PathBuf};

pub use uve_e2e::agent::{AgentProc, AgentSpec};
pub use uve_e2e::fake_host::{Commit, HostState, TestHost};
pub use uve_e2e::poll::{LONG, must};
pub use uve_e2e::process::{is_root, skip_unless_root, status_kib};
pub use uve_protocol::testdata::noise;

/// The agent binary under test; `UVE_AGENT_BIN` overrides it (e.g. to run
/// the suite against the static release build).
pub fn agent_bin() -> PathBuf {
    std::env::var_os("UVE_AGENT_BIN")
        .map_or_else(|| env!("CARGO_BIN_EXE_uve-agent").into(), PathBuf::from)
}

/// File-mode configuration: `extra` top-level lines, then a `[uif]`
/// table keeping each user's UIF at `<dir>/uif/<user>.img`.
pub fn file_cfg(dir: &Path, extra: &str) -> String {
    format!(
        "{extra}\n[uif]\nmode = \"file\"\npath = \"{}/uif/{{user}}.img\"\n",
        dir.display()
    )
}

/// Starts the agent under test in `dir`, dialing the [`TestHost`] of
/// `dir`, with `extra` TOML (e.g. a `[uif]` section) after a 5 s login
/// timeout; waits until its control socket answers.
pub fn start_agent(dir: &Path, extra: &str) -> AgentProc {
    start_agent_with_env(dir, extra, &[])
}

/// Like [`start_agent`], with extra environment variables.
pub fn start_agent_with_env(dir: &Path, extra: &str, env: &[(&str, &str)]) -> AgentProc {
    let mut spec = AgentSpec::new(
        &agent_bin(),
        &TestHost::endpoint(dir),
        &format!("login_timeout_secs = 5\n{extra}"),
    );
    spec.env = env
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    spec.log_level = "debug".into();
    AgentProc::start(dir, spec).unwrap()
}
