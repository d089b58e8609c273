//! The fake host's answers to the agent's UVE-5 requests, one function per
//! request family: retrieve (grant, manifest pages, chunks), update
//! (begin, pages, whole chunks, block deltas, commit) and the session
//! reports.

use std::sync::Mutex;

use uve_protocol::defs::PROTOCOL_BLOCK_DELTA;
use uve_protocol::delta::{self, BaseIndex};
use uve_protocol::manifest::{Hash, Manifest, chunks_per_page};
use uve_protocol::message::{
    ChunkDelta, DisconnectNotice, ErrorCode, Request, Response, RetrieveGrant, UpdateBegin,
};

use super::{Commit, HostState, Upload, lock};

fn err(code: ErrorCode, msg: &str) -> Response {
    Response::Error(uve_protocol::WireError::new(code, msg))
}

/// The answer to `req`.
pub(super) fn handle(state: &Mutex<HostState>, req: Request) -> Response {
    let mut st = lock(state);
    match req {
        Request::UifRetrieve { user, .. } => retrieve(&mut st, user.into()),
        Request::ManifestPage {
            user,
            version,
            page,
        } => {
            let mf = st.max_frame;
            match st.versions.get(&(user.into(), version)) {
                Some(m) => match m.page(page, mf) {
                    Ok(p) => Response::ManifestPage(p.to_vec()),
                    Err(_) => err(ErrorCode::NotFound, "page"),
                },
                None => err(ErrorCode::NotFound, "version"),
            }
        }
        Request::ChunkFetch { hash, .. } => {
            st.chunk_fetches += 1;
            match st.chunks.get(&hash) {
                Some(d) => Response::Chunk(d.clone()),
                None => err(ErrorCode::NotFound, "chunk"),
            }
        }
        Request::UpdateBegin(begin) => update_begin(&mut st, begin),
        Request::UpdatePage {
            upload,
            page,
            chunks,
        } => update_page(&mut st, upload, page, chunks),
        Request::ChunkUpload { upload, hash, data } => chunk_upload(&mut st, upload, hash, data),
        Request::BlockSignatures { upload, chunks } => signatures(&mut st, upload, &chunks),
        Request::ChunkDelta(d) => chunk_delta(&mut st, &d),
        Request::UpdateCommit { upload } => commit(&mut st, upload),
        Request::UpdateAbort { upload } => {
            st.uploads.remove(&upload);
            Response::Ok
        }
        Request::SessionStarted { .. } if st.busy_session_starts > 0 => {
            st.busy_session_starts -= 1;
            err(ErrorCode::Busy, "over session_starts_per_minute")
        }
        Request::SessionStarted { session, .. } => {
            st.sessions_started.push(session.into());
            Response::Ok
        }
        Request::SessionEnded { session } => {
            st.sessions_ended.push(session.into());
            Response::Ok
        }
        Request::UnexpectedDisconnect(n) => notice(&mut st, n),
        _ => err(ErrorCode::Unsupported, "agent-side request"),
    }
}

fn retrieve(st: &mut HostState, user: String) -> Response {
    if st.unassigned.contains(&user) {
        return err(ErrorCode::NotAssigned, "not assigned");
    }
    st.retrieves += 1;
    let lease = {
        let l = st.leases.entry(user.clone()).or_insert(0);
        *l += 1;
        *l
    };
    let version = st.heads.get(&user).copied();
    let header = version.and_then(|v| st.versions.get(&(user.clone(), v)).map(|m| m.header));
    Response::Retrieve(RetrieveGrant {
        version,
        header,
        lease,
        handover_timed_out: false,
    })
}

fn update_begin(st: &mut HostState, begin: UpdateBegin) -> Response {
    if st.unassigned.contains(begin.user.as_str()) {
        return err(ErrorCode::NotAssigned, "not assigned");
    }
    if let Some(code) = st.refuse_updates {
        return err(code, "refused by the test host");
    }
    st.next_upload += 1;
    let id = st.next_upload;
    st.uploads.insert(
        id,
        Upload {
            begin,
            chunks: Vec::new(),
            starts: Vec::new(),
            end: 0,
        },
    );
    Response::UpdateAccepted { upload: id }
}

fn update_page(
    st: &mut HostState,
    upload: u64,
    page: u32,
    chunks: Vec<uve_protocol::manifest::ChunkRef>,
) -> Response {
    let per = chunks_per_page(st.max_frame) as usize;
    let missing: Vec<u32> = (0u32..)
        .zip(&chunks)
        .filter(|(_, c)| !st.chunks.contains_key(&c.hash))
        .map(|(i, _)| i)
        .collect();
    let Some(up) = st.uploads.get_mut(&upload) else {
        return err(ErrorCode::NotFound, "upload");
    };
    if up.chunks.len() != page as usize * per {
        return err(ErrorCode::BadRequest, "page out of order");
    }
    for c in &chunks {
        up.starts.push(up.end);
        up.end += u64::from(c.len);
    }
    up.chunks.extend(chunks);
    Response::Missing(missing)
}

fn chunk_upload(st: &mut HostState, upload: u64, hash: Hash, data: Vec<u8>) -> Response {
    if st.expire_uploads > 0 && st.uploads.remove(&upload).is_some() {
        st.expire_uploads -= 1;
    }
    if !st.uploads.contains_key(&upload) {
        return err(ErrorCode::NotFound, "upload");
    }
    if Hash::of(&data) != hash {
        return err(ErrorCode::BadChunk, "hash");
    }
    st.chunk_uploads += 1;
    st.upload_bytes += data.len() as u64;
    st.chunks.insert(hash, data);
    Response::Ok
}

/// The bytes the base version of `up` holds at `[at, at + len)`.
fn base_bytes(st: &HostState, up: &Upload, at: u64, len: u32) -> Option<Vec<u8>> {
    let base = up.begin.base?;
    let m = st.versions.get(&(up.begin.user.to_string(), base))?;
    let parts = BaseIndex::new(m).covering(at, len)?;
    delta::assemble(at, len as usize, &parts, |c| {
        st.chunks.get(&c.hash).cloned().ok_or(())
    })
    .ok()
    .flatten()
}

fn signatures(st: &mut HostState, upload: u64, chunks: &[u32]) -> Response {
    if st.protocol < PROTOCOL_BLOCK_DELTA {
        return err(ErrorCode::Unsupported, "protocol 1 host");
    }
    st.signature_requests += 1;
    if st.refuse_signatures > 0 {
        st.refuse_signatures -= 1;
        return err(ErrorCode::Internal, "cannot sign now");
    }
    let Some(up) = st.uploads.get(&upload) else {
        return err(ErrorCode::NotFound, "upload");
    };
    let mut out = Vec::new();
    for &i in chunks {
        let (Some(c), Some(at)) = (up.chunks.get(i as usize), up.starts.get(i as usize)) else {
            return err(ErrorCode::BadRequest, "chunk index not listed");
        };
        out.push(base_bytes(st, up, *at, c.len).map(|b| delta::block_digests(*at, &b)));
    }
    Response::BlockSignatures(out)
}

fn chunk_delta(st: &mut HostState, d: &ChunkDelta) -> Response {
    if st.protocol < PROTOCOL_BLOCK_DELTA {
        return err(ErrorCode::Unsupported, "protocol 1 host");
    }
    if st.refuse_deltas > 0 {
        st.refuse_deltas -= 1;
        return err(ErrorCode::NotFound, "base chunk gone");
    }
    let Some(up) = st.uploads.get(&d.upload) else {
        return err(ErrorCode::NotFound, "upload");
    };
    let i = d.index as usize;
    let (Some(c), Some(at)) = (up.chunks.get(i), up.starts.get(i)) else {
        return err(ErrorCode::BadRequest, "chunk index not listed");
    };
    if c.hash != d.hash {
        return err(ErrorCode::BadRequest, "not the chunk at that index");
    }
    let Some(old) = base_bytes(st, up, *at, c.len) else {
        return err(ErrorCode::BadRequest, "outside the base version");
    };
    let Ok(new) = delta::apply(*at, &old, &d.blocks) else {
        return err(ErrorCode::BadRequest, "malformed delta");
    };
    if Hash::of(&new) != d.hash {
        return err(ErrorCode::BadChunk, "hash");
    }
    st.chunk_deltas += 1;
    st.delta_bytes += d.blocks.iter().map(|b| b.data.len() as u64).sum::<u64>();
    st.chunks.insert(d.hash, new);
    Response::Ok
}

fn commit(st: &mut HostState, upload: u64) -> Response {
    let Some(up) = st.uploads.remove(&upload) else {
        return err(ErrorCode::NotFound, "upload");
    };
    let m = Manifest {
        header: up.begin.header,
        chunks: up.chunks,
    };
    if m.validate().is_err() {
        return err(ErrorCode::BadDigest, "manifest");
    }
    if m.chunks.iter().any(|c| !st.chunks.contains_key(&c.hash)) {
        return err(ErrorCode::BadRequest, "chunks missing");
    }
    let user = up.begin.user.clone();
    let head = st.heads.get(user.as_str()).copied();
    // As uve-host: the head already is this update (same bytes from the
    // same base: a re-delivery after the agent lost the commit's answer).
    if let Some(h) = head
        && head != up.begin.base
        && st
            .versions
            .get(&(user.to_string(), h))
            .map(|v| v.header.digest)
            == Some(m.header.digest)
        && st
            .commits
            .iter()
            .any(|c| c.user == user.as_str() && c.version == h && c.base == up.begin.base)
    {
        st.redelivered += 1;
        return Response::Committed { version: h };
    }
    st.next_version += 1;
    let v = st.next_version;
    st.versions.insert((user.to_string(), v), m);
    let lease_ok = st.leases.get(user.as_str()).copied().unwrap_or(0) == up.begin.lease;
    let ok = head == up.begin.base && (lease_ok || head.is_none());
    st.commits.push(Commit {
        user: user.to_string(),
        version: v,
        base: up.begin.base,
        cause: up.begin.cause,
        conflict: !ok,
    });
    if ok {
        st.heads.insert(user.into(), v);
        Response::Committed { version: v }
    } else {
        Response::Conflict { kept_as: v, head }
    }
}

fn notice(st: &mut HostState, n: DisconnectNotice) -> Response {
    // As the real host: free text is limited in bytes.
    if n.reason.len() > uve_protocol::defs::MAX_TEXT_LEN {
        return err(ErrorCode::TooLarge, "reason too long");
    }
    if st.busy_notices > 0 {
        st.busy_notices -= 1;
        return err(ErrorCode::Busy, "try later");
    }
    if st.refuse_notices > 0 {
        st.refuse_notices -= 1;
        return err(ErrorCode::TooLarge, "refused for good");
    }
    let seen = st.notices.entry(n.id).or_insert(0);
    *seen += 1;
    if *seen == 1 {
        st.notice_sessions.push((n.id, n.session.into(), n.reason));
    }
    Response::Ok
}
