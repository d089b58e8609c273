//! `UpdatePage`: the new version's chunk list, page by page, in order;
//! each page is checked (sizes, order, the smallest chunk) and answered
//! with the chunks the store lacks, which the upload then pins. The base
//! version's index for block deltas is built here too, once per upload.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use uve_protocol::defs::{MAX_CHUNK, MIN_CHUNK};
use uve_protocol::delta::BaseIndex;
use uve_protocol::manifest::{ChunkRef, Hash, chunks_per_page};
use uve_protocol::message::{ErrorCode, Response, WireError};

use super::{Listed, Upload, bad, get, quota_check, refused};
use crate::host::wire_store_error;

use crate::wire::uve5::{Handled, VmConnection};

/// `UpdatePage`: returns the indices (within the page) the store lacks.
pub async fn page(conn: &VmConnection, upload: u64, page: u32, chunks: Vec<ChunkRef>) -> Handled {
    let up = get(conn, upload)?;
    list_page(conn, &up, page, chunks).await.inspect_err(|e| {
        if e.code == ErrorCode::QuotaExceeded {
            // Final: its stage and quota charge go at once (the charge
            // explicitly: another handler of this upload may still hold it
            // for a moment, and the agent's next logout must not see it).
            conn.state().uploads.remove(&upload);
            quota_check::end_charge(&up);
        }
        refused(conn, &up.begin, e);
    })
}

/// Refuses a chunk shorter than [`MIN_CHUNK`] anywhere but at the end of
/// the manifest: the chunker never cuts one, and a manifest of tiny chunks
/// would make every later pass over it (signatures, commit, GC) cost a
/// million entries per MiB.
fn check_min_chunk(up: &Upload, first: u64, chunks: &[ChunkRef]) -> Result<(), WireError> {
    let last = u64::from(up.begin.header.chunk_count).saturating_sub(1);
    let short = chunks
        .iter()
        .enumerate()
        .find(|(i, c)| c.len < MIN_CHUNK && first + *i as u64 != last);
    match short {
        Some((i, c)) => Err(bad(
            ErrorCode::BadRequest,
            format!(
                "chunk {} is {} bytes; every chunk but the last must have at least {MIN_CHUNK}",
                first + i as u64,
                c.len
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses a page that is out of order, lists more chunks or bytes than
/// the header announced, or holds a chunk length out of range or below
/// the minimum chunk size.
fn check_page(
    conn: &VmConnection,
    up: &Upload,
    page: u32,
    chunks: &[ChunkRef],
) -> Result<(), WireError> {
    let per = chunks_per_page(conn.max_frame()) as usize;
    let listed_before = {
        let st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
        if page != st.next_page {
            return Err(bad(
                ErrorCode::BadRequest,
                format!("page {page} out of order, expected {}", st.next_page),
            ));
        }
        let total = st.chunks.len() + chunks.len();
        if chunks.len() > per || total > up.begin.header.chunk_count as usize {
            return Err(bad(
                ErrorCode::TooLarge,
                "page lists more chunks than announced",
            ));
        }
        st.chunks.len() as u64
    };
    let page_bytes: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
    let listed_bytes = up.state.lock().unwrap_or_else(PoisonError::into_inner).end;
    if listed_bytes + page_bytes > up.begin.header.size {
        return Err(bad(
            ErrorCode::TooLarge,
            format!(
                "pages list more than the {} bytes announced",
                up.begin.header.size
            ),
        ));
    }
    if let Some(c) = chunks.iter().find(|c| c.len == 0 || c.len > MAX_CHUNK) {
        return Err(bad(
            ErrorCode::BadRequest,
            format!("chunk length {} out of range", c.len),
        ));
    }
    check_min_chunk(up, listed_before, chunks)
}

async fn list_page(
    conn: &VmConnection,
    up: &Arc<Upload>,
    page: u32,
    chunks: Vec<ChunkRef>,
) -> Handled {
    check_page(conn, up, page, &chunks)?;
    let hashes: Vec<Hash> = chunks.iter().map(|c| c.hash).collect();
    // Pin first, then look: a chunk reported present cannot be swept
    // before the commit that references it.
    let pins = conn.host().store().pin(&hashes);
    let base_chunks = base_index(conn, up).await;
    let ask: Vec<Hash> = hashes
        .iter()
        .filter(|h| !base_chunks.contains(h))
        .copied()
        .collect();
    let answers = conn
        .host
        .store_call(move |s| s.has_chunks(&ask))
        .await
        .map_err(|e| wire_store_error(&e))?;
    let mut answers = answers.into_iter();
    let present: Vec<bool> = hashes
        .iter()
        .map(|h| base_chunks.contains(h) || answers.next().unwrap_or(false))
        .collect();
    let (missing, fresh) = {
        let mut st = up.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Checked whole before anything is recorded: a refused page leaves
        // the upload as it was, so the agent's corrected resend of it is
        // judged afresh.
        let mut lens: HashMap<Hash, u32> = HashMap::new();
        for c in &chunks {
            let known = st.listed.get(&c.hash).map(|l| l.len);
            if *lens.entry(c.hash).or_insert(known.unwrap_or(c.len)) != c.len {
                return Err(bad(
                    ErrorCode::BadRequest,
                    "one hash listed with two lengths",
                ));
            }
        }
        let mut missing = Vec::new();
        let mut fresh = Vec::new();
        for (i, (c, here)) in chunks.iter().zip(present).enumerate() {
            if st.listed.contains_key(&c.hash) {
                continue;
            }
            st.listed.insert(
                c.hash,
                Listed {
                    len: c.len,
                    awaited: !here,
                    signed: false,
                },
            );
            fresh.push(*c);
            if !here {
                missing.push(u32::try_from(i).unwrap_or(u32::MAX));
            }
        }
        for c in &chunks {
            let at = st.end;
            st.starts.push(at);
            st.end = at + u64::from(c.len);
        }
        st.chunks.extend_from_slice(&chunks);
        st.next_page += 1;
        st.pins.push(pins);
        (missing, fresh)
    };
    quota_check::count_page(conn, up, &fresh).await?;
    Ok(Response::Missing(missing))
}

/// The chunks of the upload's base version, loaded once (empty when
/// there is no base or it cannot be read: then the store is asked and no
/// chunk can be sent as a delta).
pub(super) async fn base_index(conn: &VmConnection, up: &Upload) -> Arc<BaseIndex> {
    if let Some(ix) = &up.state.lock().unwrap_or_else(PoisonError::into_inner).base {
        return ix.clone();
    }
    let ix = match up.begin.base {
        None => BaseIndex::default(),
        Some(base) => {
            let user = up.begin.user.clone();
            match conn
                .host()
                .store_call(move |s| s.manifest(&user, base))
                .await
            {
                Ok(m) => BaseIndex::new(&m),
                Err(e) => {
                    tracing::debug!(user = %up.begin.user, base, error = %e, "base manifest unavailable");
                    BaseIndex::default()
                }
            }
        }
    };
    let ix = Arc::new(ix);
    up.state.lock().unwrap_or_else(PoisonError::into_inner).base = Some(ix.clone());
    ix
}
