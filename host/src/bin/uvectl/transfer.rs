//! The streaming commands of `uvectl`: import (file → request body) and
//! export (answer body → file) with a progress bar, the event stream and
//! the metrics text, none of them buffered whole in memory.

use std::io::Write;
use std::path::{Path, PathBuf};

use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::{Body as _, Incoming};
use indicatif::{ProgressBar, ProgressStyle};
use uve_host::api::client::{self, Answer, ApiClient};
use uve_host::api::types::{EventsQuery, ImportQuery};

use crate::commands::{self, seg, with_query};
use crate::output::{self, exit_for};

/// `uvectl import USER FILE`. A file of length 0 (an empty file, or a
/// pipe, whose length is unknown) is sent with `empty=true`: the daemon
/// refuses an empty body without it, and here it is what the file holds.
pub async fn import(c: &ApiClient, user: &str, file: &Path, raw: bool) -> anyhow::Result<u8> {
    let len = std::fs::metadata(file).map(|m| m.len()).ok();
    let bar = progress(len, &format!("import {user}"));
    let counter = bar.clone();
    let body = client::file_counted(file, move |n| counter.inc(n)).await?;
    let query = ImportQuery {
        empty: len == Some(0),
    };
    let path = with_query(&format!("/v1/users/{}/import", seg(user)), &query)?;
    let answer = c.call(Method::POST, &path, body).await;
    bar.finish_and_clear();
    Ok(commands::imported(&answer?, raw))
}

/// `uvectl export USER V [-o FILE]`.
pub async fn export(
    c: &ApiClient,
    user: &str,
    version: u64,
    output: Option<PathBuf>,
) -> anyhow::Result<u8> {
    let path = format!("/v1/users/{}/versions/{version}/export", seg(user));
    let (status, mut body) = c.send(Method::GET, &path, client::empty()).await?;
    if !status.is_success() {
        return Ok(failed(status, body).await);
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

/// `uvectl events [--since N] [--follow]`: the JSON lines as they come.
pub async fn events(c: &ApiClient, since: u64, follow: bool) -> anyhow::Result<u8> {
    let path = with_query("/v1/events", &EventsQuery { since, follow })?;
    let (status, mut body) = c.send(Method::GET, &path, client::empty()).await?;
    if !status.is_success() {
        return Ok(failed(status, body).await);
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

/// `uvectl metrics`: the Prometheus text as it is.
pub async fn metrics(c: &ApiClient) -> anyhow::Result<u8> {
    let a = c.get("/metrics").await?;
    std::io::stdout().write_all(&a.body)?;
    Ok(exit_for(a.status))
}

/// Shows the error answer of a streaming request.
async fn failed(status: hyper::StatusCode, body: Incoming) -> u8 {
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    output::error(&Answer { status, body }, false)
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
