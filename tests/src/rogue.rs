//! The rogue guest's probes (run inside a QEMU guest by `e2e-guest rogue`):
//! each opens its own connection to the host and checks that the host
//! refuses or closes without serving anything.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{FramedRead, FramedWrite};
use uve_protocol::codec::FrameCodec;
use uve_protocol::defs::{DEFAULT_MAX_FRAME, DEFAULT_PORT, HOST_CID, PROTOCOL_MAX, PROTOCOL_MIN};
use uve_protocol::handshake;
use uve_protocol::link::{self, LinkConfig};
use uve_protocol::message::{ErrorCode, Hello, Request};
use uve_protocol::transport::{Endpoint, dial};

fn hello() -> Hello {
    Hello {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        agent_version: "rogue".into(),
        boot_id: [0x66; 16],
        capabilities: 0,
        max_frame: DEFAULT_MAX_FRAME,
    }
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
    let s = dial(&host(), limit)
        .await
        .map_err(|e| format!("dial: {e}"))?;
    let (r, w) = tokio::io::split(s);
    let mut reader = FramedRead::new(r, FrameCodec::default());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    let welcome = handshake::client(&mut reader, &mut writer, hello(), limit)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let cfg = LinkConfig::new(
        Duration::from_millis(u64::from(welcome.heartbeat_ms)),
        welcome.max_frame,
    );
    let (h, _incoming) = link::spawn(reader, writer.into_inner(), cfg);
    let answer = h
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
    let s = dial(&host(), limit)
        .await
        .map_err(|e| format!("dial: {e}"))?;
    let (r, w) = tokio::io::split(s);
    let mut reader = FramedRead::new(r, FrameCodec::default());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    handshake::client(&mut reader, &mut writer, hello(), limit)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
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
