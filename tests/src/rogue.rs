//! The rogue guest's probes (run inside a QEMU guest by `e2e-guest rogue`):
//! each opens its own connection to the host and checks that the host
//! refuses or closes without serving anything.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uve_protocol::defs::{DEFAULT_PORT, HOST_CID, PROTOCOL_MAX};
use uve_protocol::message::{ErrorCode, Hello, Request};
use uve_protocol::transport::Endpoint;

use crate::fake_agent::{self, handshake_at};

fn hello() -> Hello {
    fake_agent::hello("rogue", PROTOCOL_MAX, [0x66; 16])
}

fn host() -> Endpoint {
    Endpoint::Vsock {
        cid: HOST_CID,
        port: DEFAULT_PORT,
    }
}

/// Runs every probe; returns 0 if all were contained.
pub async fn run(user: &str, limit: Duration) -> i32 {
    let mut failed = 0;
    for (name, outcome) in [
        ("unassigned-user", unassigned_user(user, limit).await),
        (
            "oversized-frame",
            raw_bytes(&u32::MAX.to_le_bytes(), limit).await,
        ),
        (
            "garbage",
            raw_bytes(
                &[7, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9],
                limit,
            )
            .await,
        ),
    ] {
        match outcome {
            Ok(what) => println!("ROGUE {name} contained: {what}"),
            Err(what) => {
                failed += 1;
                println!("ROGUE {name} NOT CONTAINED: {what}");
            }
        }
    }
    i32::from(failed > 0)
}

async fn unassigned_user(user: &str, limit: Duration) -> Result<String, String> {
    let link = fake_agent::start_link(handshake_at(&host(), hello(), limit).await?);
    let answer = link
        .handle
        .request_timeout(
            Request::UifRetrieve {
                user: crate::names::user(user),
                session: crate::names::session("rogue-session"),
            },
            limit,
        )
        .await;
    match answer {
        Err(e) if e.remote_code() == Some(ErrorCode::NotAssigned) => Ok(format!("refused: {e}")),
        Err(e) => Err(format!("unexpected error: {e}")),
        Ok(r) => Err(format!("host served the retrieve: {r:?}")),
    }
}

/// Sends a valid `Hello`, then `bytes`; the host must close the connection.
async fn raw_bytes(bytes: &[u8], limit: Duration) -> Result<String, String> {
    let (reader, writer, _) = handshake_at(&host(), hello(), limit).await?;
    let mut w = writer.into_inner();
    w.write_all(bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    // The host must drop us: read until EOF (heartbeats may arrive first).
    let closed = tokio::time::timeout(limit, async {
        let mut r = reader.into_inner();
        let mut sink = [0u8; 4096];
        loop {
            match r.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    match closed {
        Ok(()) => Ok("host closed the connection".into()),
        Err(_) => Err(format!("connection still open after {limit:?}")),
    }
}
