//! The CLI verbs' side of the control socket: send one request line, read
//! one response line, print it, turn it into an exit code. Blocking std
//! i/o: a verb needs no async runtime.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;

use crate::adapters::control::{ControlRequest, ControlResponse};

/// Sends `req` to the agent at `socket` and returns its answer.
pub fn call(socket: &Path, req: &ControlRequest) -> anyhow::Result<ControlResponse> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the uve-agent daemon at {} (is it running?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line).context("send request")?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer).context("read answer")?;
    if answer.trim().is_empty() {
        anyhow::bail!("the agent closed the connection without answering");
    }
    serde_json::from_str(answer.trim()).context("malformed answer from the agent")
}

/// Exit code of a verb whose answer did not come within `--timeout`
/// (`EX_TEMPFAIL`).
pub const EXIT_NO_ANSWER: i32 = 75;

/// Runs a verb, waiting at most `timeout` for the answer: prints the
/// outcome, returns the process exit code.
pub fn run(
    socket: &Path,
    req: ControlRequest,
    json: bool,
    timeout: std::time::Duration,
) -> anyhow::Result<i32> {
    let is_check = matches!(req, ControlRequest::MonitorCheck { .. });
    let is_status = matches!(req, ControlRequest::Status);
    let is_list = matches!(req, ControlRequest::PreservedList);
    // The call on a thread of its own: the wait ends at the timeout, even
    // in connect(2) on a full backlog; the process exits, the agent's work
    // on the request goes on.
    let (tx, rx) = std::sync::mpsc::channel();
    let (path, request) = (socket.to_path_buf(), req.clone());
    std::thread::spawn(move || {
        let _ = tx.send(call(&path, &request));
    });
    let resp = match rx.recv_timeout(timeout) {
        Ok(answer) => answer?,
        Err(_) => {
            eprintln!(
                "uve-agent: no answer from the agent within {}s; it goes on with the request \
                 (see `uve-agent status`)",
                timeout.as_secs()
            );
            return Ok(EXIT_NO_ANSWER);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else if is_status {
        print_status(&resp);
    } else if is_list && resp.ok {
        print_preserved(&resp);
    } else if resp.ok {
        println!("{}", resp.message);
    } else {
        eprintln!("uve-agent: {}", resp.message);
    }
    if is_check {
        return Ok(if resp.allowed == Some(true) { 0 } else { 1 });
    }
    Ok(if resp.ok { 0 } else { 1 })
}

fn print_preserved(resp: &ControlResponse) {
    let list = resp.preserved.as_deref().unwrap_or_default();
    if list.is_empty() {
        println!("no preserved copies");
        return;
    }
    println!("ID                USER             SIZE        PRESERVED            REASON / WHERE");
    for c in list {
        println!(
            "{:<17} {:<16} {:<11} {:<20} {:?}: {}",
            c.id,
            c.user,
            crate::stores::preserve::human_size(c.size),
            crate::base::fsutil::utc(c.created),
            c.code,
            c.reason
        );
        println!("{:<67} {}", "", c.bytes.display());
    }
}

fn print_status(resp: &ControlResponse) {
    let Some(s) = &resp.status else {
        eprintln!("uve-agent: {}", resp.message);
        return;
    };
    println!(
        "host {} ({}{})",
        s.host,
        if s.connected {
            "connected"
        } else {
            "NOT connected"
        },
        s.vm_id
            .as_ref()
            .map(|v| format!(", vm {v}"))
            .unwrap_or_default()
    );
    println!("sessions: {}", s.sessions.len());
    for x in &s.sessions {
        println!(
            "  {} user={} ua={} pid={} {}",
            x.session,
            x.user,
            x.ua.as_deref().unwrap_or("-"),
            x.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            if x.suspended { "SUSPENDED" } else { "" }
        );
    }
    println!("attached UIFs: {}", s.attached.join(", "));
    let Some(s) = &s.vm else {
        println!("(the VM-wide figures are shown to root only)");
        return;
    };
    for ua in &s.uas {
        println!(
            "UA {}: current {}, previous {}",
            ua.name,
            ua.current,
            ua.previous.as_deref().unwrap_or("-")
        );
    }
    println!(
        "spooled updates: {}, pending disconnect notices: {}, monitor grants: {}",
        s.spooled_updates, s.pending_notices, s.monitor_grants
    );
    if s.preserved > 0 {
        println!(
            "PRESERVED copies of refused updates: {} ({}); see `uve-agent preserved list`",
            s.preserved,
            crate::stores::preserve::human_size(s.preserved_bytes)
        );
    }
    if s.held > 0 {
        println!(
            "HELD refused updates (over the preserved area's budget; their users cannot log in here): {}; see `uve-agent preserved list`",
            s.held
        );
    }
}
