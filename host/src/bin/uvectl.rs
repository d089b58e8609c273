//! `uvectl`: operator / VMM CLI for the uve-host management API.
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict,
//! 5 VM not connected.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::{Method, StatusCode};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use uve_host::client::{self, Answer, ApiClient};

#[derive(Parser)]
#[command(name = "uvectl", version, about = "Control a uve-host daemon")]
struct Cli {
    /// API socket (default: $UVE_HOST_SOCKET, else $UVE_HOST_DATA_DIR/api.sock,
    /// else /var/lib/uve-host/api.sock — the daemon's default).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print the raw JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// VMs: list, add, show, rm, status, ping.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Assign a user to a VM (a VM switch asks the old VM to release the user).
    Assign {
        /// User.
        user: String,
        /// VM id.
        vm: String,
    },
    /// Remove a user's assignment.
    Unassign {
        /// User.
        user: String,
    },
    /// List assignments.
    Assignments,
    /// List open sessions.
    Sessions {
        /// Only this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// List users with a UIF.
    Users,
    /// List a user's versions.
    Versions {
        /// User.
        user: String,
    },
    /// Import a UIF file as the user's new head.
    Import {
        /// User.
        user: String,
        /// UIF file.
        file: PathBuf,
    },
    /// Export a version's bytes.
    Export {
        /// User.
        user: String,
        /// Version.
        version: u64,
        /// Output file (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Make a copy of an old version the head.
    Rollback {
        /// User.
        user: String,
        /// Version to restore.
        version: u64,
    },
    /// Garbage-collect unreferenced chunks.
    Gc {
        /// Spare unreferenced chunks younger than this (default: daemon's).
        #[arg(long)]
        grace_secs: Option<u64>,
    },
    /// Print events (JSON lines).
    Events {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep following new events.
        #[arg(long)]
        follow: bool,
    },
    /// Print Prometheus metrics.
    Metrics,
    /// User agents on a VM: deploy, rollback, rm.
    #[command(subcommand)]
    Ua(UaCmd),
    /// Suspend a session.
    Suspend {
        /// VM id.
        vm: String,
        /// Session id.
        session: String,
    },
    /// Resume a session.
    Resume {
        /// VM id.
        vm: String,
        /// Session id.
        session: String,
    },
    /// Monitoring grants: grant, revoke.
    #[command(subcommand)]
    Monitor(MonitorCmd),
}

#[derive(Subcommand)]
enum VmCmd {
    /// List VMs.
    List,
    /// Register a VM (exactly one of --cid, --uds-path, --unix).
    Add {
        /// VM id.
        id: String,
        /// AF_VSOCK CID.
        #[arg(long)]
        cid: Option<u32>,
        /// Hybrid-vsock socket of the VMM (host listens on <uds-path>_<port>).
        #[arg(long)]
        uds_path: Option<PathBuf>,
        /// Hybrid-vsock guest port (default 7075).
        #[arg(long)]
        port: Option<u32>,
        /// Plain Unix listen path.
        #[arg(long)]
        unix: Option<PathBuf>,
    },
    /// Show a VM (connection, sessions, assigned users).
    Show {
        /// VM id.
        id: String,
    },
    /// Unregister a VM.
    Rm {
        /// VM id.
        id: String,
    },
    /// Ask the VM's agent for its status.
    Status {
        /// VM id.
        id: String,
    },
    /// Round trip to the VM's agent.
    Ping {
        /// VM id.
        id: String,
    },
}

#[derive(Subcommand)]
enum UaCmd {
    /// Deploy (or --update) a UA from a tar bundle.
    Deploy {
        /// VM id.
        vm: String,
        /// Bundle (uncompressed tar).
        bundle: PathBuf,
        /// UA name.
        #[arg(long)]
        name: String,
        /// UA version.
        #[arg(long)]
        version: String,
        /// Entry command (whitespace-separated argv).
        #[arg(long, default_value = "")]
        entry: String,
        /// Update an existing UA.
        #[arg(long)]
        update: bool,
    },
    /// Switch a UA back to its previous version.
    Rollback {
        /// VM id.
        vm: String,
        /// UA name.
        name: String,
    },
    /// Delete a UA.
    Rm {
        /// VM id.
        vm: String,
        /// UA name.
        name: String,
        /// Stop sessions using it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum MonitorCmd {
    /// Allow MONITOR to monitor SESSION.
    Grant {
        /// VM id.
        vm: String,
        /// Session id.
        session: String,
        /// Monitoring user.
        monitor: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    /// Withdraw a grant.
    Revoke {
        /// VM id.
        vm: String,
        /// Session id.
        session: String,
        /// Monitoring user.
        monitor: String,
    },
}

fn default_socket() -> PathBuf {
    if let Some(s) = std::env::var_os("UVE_HOST_SOCKET") {
        return PathBuf::from(s);
    }
    let dir = std::env::var_os("UVE_HOST_DATA_DIR").map_or_else(
        || PathBuf::from(uve_host::config::DEFAULT_DATA_DIR),
        PathBuf::from,
    );
    dir.join("api.sock")
}

/// Percent-encodes a query value.
fn q(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn exit_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        200..=299 => 0,
        404 => 3,
        409 => 4,
        503 => 5,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("uvectl: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("uvectl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let api = ApiClient::new(cli.socket.clone().unwrap_or_else(default_socket));
    let c = &api;
    let answer = match cli.command {
        Cmd::Vm(VmCmd::List) => c.get("/v1/vms").await?,
        Cmd::Vm(VmCmd::Add {
            id,
            cid,
            uds_path,
            port,
            unix,
        }) => {
            let body =
                json!({"id": id, "cid": cid, "uds_path": uds_path, "port": port, "unix": unix});
            c.call(Method::POST, "/v1/vms", client::json(&body)).await?
        }
        Cmd::Vm(VmCmd::Show { id }) => c.get(&format!("/v1/vms/{}", q(&id))).await?,
        Cmd::Vm(VmCmd::Rm { id }) => {
            c.call(
                Method::DELETE,
                &format!("/v1/vms/{}", q(&id)),
                client::empty(),
            )
            .await?
        }
        Cmd::Vm(VmCmd::Status { id }) => c.get(&format!("/v1/vms/{}/status", q(&id))).await?,
        Cmd::Vm(VmCmd::Ping { id }) => {
            c.call(
                Method::POST,
                &format!("/v1/vms/{}/ping", q(&id)),
                client::empty(),
            )
            .await?
        }
        Cmd::Assign { user, vm } => {
            c.call(
                Method::PUT,
                &format!("/v1/assignments/{}", q(&user)),
                client::json(&json!({"vm": vm})),
            )
            .await?
        }
        Cmd::Unassign { user } => {
            c.call(
                Method::DELETE,
                &format!("/v1/assignments/{}", q(&user)),
                client::empty(),
            )
            .await?
        }
        Cmd::Assignments => c.get("/v1/assignments").await?,
        Cmd::Sessions { vm } => match vm {
            Some(vm) => c.get(&format!("/v1/sessions?vm={}", q(&vm))).await?,
            None => c.get("/v1/sessions").await?,
        },
        Cmd::Users => c.get("/v1/users").await?,
        Cmd::Versions { user } => c.get(&format!("/v1/users/{}/versions", q(&user))).await?,
        Cmd::Import { user, file } => {
            let len = std::fs::metadata(&file).map(|m| m.len()).ok();
            let bar = progress(len, &format!("import {user}"));
            let counter = bar.clone();
            let body = client::file_counted(&file, move |n| counter.inc(n)).await?;
            let answer = c
                .call(
                    Method::POST,
                    &format!("/v1/users/{}/import", q(&user)),
                    body,
                )
                .await;
            bar.finish_and_clear();
            answer?
        }
        Cmd::Export {
            user,
            version,
            output,
        } => return export(c, &user, version, output).await,
        Cmd::Rollback { user, version } => {
            c.call(
                Method::POST,
                &format!("/v1/users/{}/rollback", q(&user)),
                client::json(&json!({"version": version})),
            )
            .await?
        }
        Cmd::Gc { grace_secs } => {
            let path = match grace_secs {
                Some(g) => format!("/v1/gc?grace_secs={g}"),
                None => "/v1/gc".to_string(),
            };
            c.call(Method::POST, &path, client::empty()).await?
        }
        Cmd::Events { since, follow } => return events(c, since, follow).await,
        Cmd::Metrics => {
            let a = c.get("/metrics").await?;
            std::io::stdout().write_all(&a.body)?;
            return Ok(exit_for(a.status));
        }
        Cmd::Ua(UaCmd::Deploy {
            vm,
            bundle,
            name,
            version,
            entry,
            update,
        }) => {
            let path = format!(
                "/v1/vms/{}/ua?name={}&version={}&entry={}&update={update}",
                q(&vm),
                q(&name),
                q(&version),
                q(&entry)
            );
            let body = client::file(&bundle).await?;
            c.call(Method::POST, &path, body).await?
        }
        Cmd::Ua(UaCmd::Rollback { vm, name }) => {
            let path = format!("/v1/vms/{}/ua/{}/rollback", q(&vm), q(&name));
            c.call(Method::POST, &path, client::empty()).await?
        }
        Cmd::Ua(UaCmd::Rm { vm, name, force }) => {
            let path = format!("/v1/vms/{}/ua/{}?force={force}", q(&vm), q(&name));
            c.call(Method::DELETE, &path, client::empty()).await?
        }
        Cmd::Suspend { vm, session } => {
            let path = format!("/v1/vms/{}/sessions/{}/suspend", q(&vm), q(&session));
            c.call(Method::POST, &path, client::empty()).await?
        }
        Cmd::Resume { vm, session } => {
            let path = format!("/v1/vms/{}/sessions/{}/resume", q(&vm), q(&session));
            c.call(Method::POST, &path, client::empty()).await?
        }
        Cmd::Monitor(MonitorCmd::Grant {
            vm,
            session,
            monitor,
            ttl_secs,
        }) => {
            let body = json!({"session": session, "monitor": monitor, "ttl_secs": ttl_secs});
            c.call(
                Method::POST,
                &format!("/v1/vms/{}/monitor", q(&vm)),
                client::json(&body),
            )
            .await?
        }
        Cmd::Monitor(MonitorCmd::Revoke {
            vm,
            session,
            monitor,
        }) => {
            let path = format!(
                "/v1/vms/{}/monitor?session={}&monitor={}",
                q(&vm),
                q(&session),
                q(&monitor)
            );
            c.call(Method::DELETE, &path, client::empty()).await?
        }
    };
    Ok(print(&answer, cli.json))
}

/// Prints an answer (table or JSON) and returns the exit code.
fn print(a: &Answer, raw: bool) -> u8 {
    let code = exit_for(a.status);
    let v = a.json();
    if code != 0 {
        let msg = v["message"].as_str().map_or_else(
            || String::from_utf8_lossy(&a.body).into_owned(),
            str::to_string,
        );
        eprintln!(
            "uvectl: {} ({}): {msg}",
            a.status,
            v["error"].as_str().unwrap_or("error")
        );
        if raw {
            println!("{v}");
        }
        return code;
    }
    if !raw && v["versions"].is_array() {
        // `versions USER`: the head, then one row per retained version.
        println!("head: {}", v["head"]);
        table(&v["versions"]);
        return 0;
    }
    if raw || !v.is_array() {
        if raw {
            println!("{v}");
        } else if !v.is_null() {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        return 0;
    }
    table(&v);
    0
}

/// A table of an array of objects: scalar fields as columns.
fn table(v: &Value) {
    let rows: Vec<&serde_json::Map<String, Value>> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .collect();
    let Some(first) = rows.first() else {
        println!("(none)");
        return;
    };
    let cols: Vec<&String> = first
        .iter()
        .filter(|(_, x)| !x.is_object() && !x.is_array())
        .map(|(k, _)| k)
        .collect();
    let cell = |r: &serde_json::Map<String, Value>, k: &str| match r.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|k| {
            rows.iter()
                .map(|r| cell(r, k).len())
                .chain([k.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(cols.iter().map(|k| k.to_uppercase()).collect());
    for r in &rows {
        line(cols.iter().map(|k| cell(r, k)).collect());
    }
}

async fn export(
    c: &ApiClient,
    user: &str,
    version: u64,
    output: Option<PathBuf>,
) -> anyhow::Result<u8> {
    let path = format!("/v1/users/{}/versions/{version}/export", q(user));
    let (status, mut body) = c.send(Method::GET, &path, client::empty()).await?;
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Ok(print(
            &Answer {
                status,
                body: bytes,
            },
            false,
        ));
    }
    let mut out: Box<dyn Write> = match &output {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => Box::new(std::io::stdout().lock()),
    };
    let bar = progress(
        body.size_hint().exact(),
        &format!("export {user} v{version}"),
    );
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow::anyhow!("export interrupted: {e}"))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data)?;
            bar.inc(data.len() as u64);
        }
    }
    out.flush()?;
    bar.finish_and_clear();
    Ok(0)
}

/// A byte progress bar on stderr for long transfers; indicatif hides it
/// when stderr is not a terminal, so scripts see nothing of it.
fn progress(len: Option<u64>, what: &str) -> ProgressBar {
    let (bar, template) = match len {
        Some(n) => (
            ProgressBar::new(n),
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{msg} {bytes} {binary_bytes_per_sec}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

async fn events(c: &ApiClient, since: u64, follow: bool) -> anyhow::Result<u8> {
    let path = format!("/v1/events?since={since}&follow={follow}");
    let (status, mut body) = c.send(Method::GET, &path, client::empty()).await?;
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Ok(print(
            &Answer {
                status,
                body: bytes,
            },
            false,
        ));
    }
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow::anyhow!("event stream interrupted: {e}"))?;
        if let Ok(data) = frame.into_data() {
            out.write_all(&data)?;
            out.flush()?;
        }
    }
    Ok(0)
}
