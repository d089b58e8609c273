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

/// A fresh test directory and the fake host listening in it.
pub fn host_in_tempdir() -> (tempfile::TempDir, TestHost) {
    let dir = tempfile::tempdir().unwrap();
    let host = TestHost::start(dir.path());
    (dir, host)
}

/// `user`'s UIF under the file-mode configuration of [`file_cfg`] in
/// `dir`.
pub fn uif(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("uif/{user}.img"))
}

/// [`start_agent`], then waits until the agent is connected to the host.
pub fn connected_agent(dir: &Path, extra: &str) -> AgentProc {
    let agent = start_agent(dir, extra);
    agent.wait_connected();
    agent
}

/// A file-mode agent ([`file_cfg`] without extra lines), connected.
pub fn file_agent(dir: &Path) -> AgentProc {
    connected_agent(dir, &file_cfg(dir, ""))
}

/// A test directory with its fake host holding `user`'s version `seed`,
/// and a file-mode agent, connected, on which `user` logged in to
/// `session`.
pub fn logged_in(
    user: &str,
    seed: &[u8],
    session: &str,
) -> (tempfile::TempDir, TestHost, AgentProc) {
    let (dir, host) = host_in_tempdir();
    host.with(|h| h.seed(user, seed));
    let agent = file_agent(dir.path());
    agent.ok(&["login", "--user", user, "--session", session]);
    (dir, host, agent)
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
