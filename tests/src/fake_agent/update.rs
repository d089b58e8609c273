//! UVE-5 flows as an agent drives them against the host: a whole retrieve
//! (grant, every manifest page, every chunk, each checked), a whole update
//! (begin, every page, the missing chunks, commit), an update stopped
//! after listing, and an update that sends block deltas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uve_protocol::chunker::chunk_stream;
use uve_protocol::link::{LinkError, LinkHandle};
use uve_protocol::manifest::{Hash, Manifest, digest_of};
use uve_protocol::message::{
    BlockDigest, ChunkDelta, Request, Response, RetrieveGrant, UpdateBegin, UpdateCause, Version,
};

use super::{AgentState, lock};
use crate::names;

/// Outcome of a test update.
#[derive(Debug)]
pub struct Updated {
    /// The host's answer to the commit.
    pub answer: Response,
    /// How many chunks the host said it lacked.
    pub missing: usize,
}

/// A request the flows expect to be answered with a specific variant.
fn unexpected(other: &Response) -> ! {
    panic!("unexpected {other:?}")
}

/// Full retrieve of `user`; records the grant's base and lease in
/// `state`, verifies every chunk and the manifest digest.
pub async fn retrieve(
    handle: &LinkHandle,
    state: &Arc<Mutex<AgentState>>,
    user: &str,
    session: &str,
) -> Result<(RetrieveGrant, Vec<u8>), LinkError> {
    let grant = match names::send(handle, |n| Request::UifRetrieve {
        user: n.user(user),
        session: n.session(session),
    })
    .await?
    {
        Response::Retrieve(g) => g,
        other => unexpected(&other),
    };
    lock(state)
        .leases
        .insert(user.into(), (grant.version, grant.lease));
    let (Some(version), Some(header)) = (grant.version, grant.header) else {
        return Ok((grant, Vec::new()));
    };
    let pages = uve_protocol::manifest::page_count(header.chunk_count, handle.max_frame());
    let mut chunks = Vec::new();
    for page in 0..pages {
        match handle
            .request(Request::ManifestPage {
                user: names::user(user),
                version,
                page,
            })
            .await?
        {
            Response::ManifestPage(refs) => chunks.extend(refs),
            other => unexpected(&other),
        }
    }
    assert_eq!(digest_of(&chunks), header.digest, "manifest digest");
    let mut data = Vec::with_capacity(usize::try_from(header.size).unwrap_or(0));
    for c in &chunks {
        match handle
            .request(Request::ChunkFetch {
                user: names::user(user),
                hash: c.hash,
            })
            .await?
        {
            Response::Chunk(bytes) => {
                assert!(uve_protocol::chunker::chunk_matches(c, &bytes));
                data.extend_from_slice(&bytes);
            }
            other => unexpected(&other),
        }
    }
    Ok((grant, data))
}

/// The manifest of `data` and the bytes of each of its chunks.
pub fn manifest_of(data: &[u8]) -> (Manifest, HashMap<Hash, Vec<u8>>) {
    let mut bytes = HashMap::new();
    let m = chunk_stream(data, |c, b| {
        bytes.insert(c.hash, b.to_vec());
        Ok(())
    })
    .unwrap_or_else(|e| panic!("chunk {} bytes: {e}", data.len()));
    (m, bytes)
}

/// Completes an update [`begin_and_list`] began and listed: the missing
/// chunks whole, then the commit.
pub async fn update(handle: &LinkHandle, l: Listed) -> Result<Updated, LinkError> {
    for &i in &l.missing {
        let hash = l.manifest.chunks[i].hash;
        handle
            .request(Request::ChunkUpload {
                upload: l.upload,
                hash,
                data: l.bytes[&hash].clone(),
            })
            .await?;
    }
    let answer = handle
        .request(Request::UpdateCommit { upload: l.upload })
        .await?;
    Ok(Updated {
        answer,
        missing: l.missing.len(),
    })
}

/// An update begun and fully listed, its chunks not yet sent.
pub struct Listed {
    /// Upload id.
    pub upload: u64,
    /// The new version's manifest.
    pub manifest: Manifest,
    /// The bytes of each chunk.
    pub bytes: HashMap<Hash, Vec<u8>>,
    /// Indices (into the whole chunk list) the host said it lacks.
    pub missing: Vec<usize>,
}

impl Listed {
    /// File offset of chunk `i`.
    pub fn offset(&self, i: usize) -> u64 {
        self.manifest.chunks[..i]
            .iter()
            .map(|c| u64::from(c.len))
            .sum()
    }
}

/// `UpdateBegin` + every `UpdatePage` of `data`; no chunk sent.
pub async fn begin_and_list(
    handle: &LinkHandle,
    user: &str,
    session: &str,
    base: Option<Version>,
    lease: u64,
    data: &[u8],
) -> Result<Listed, LinkError> {
    let (manifest, bytes) = manifest_of(data);
    let begin = UpdateBegin {
        user: names::user(user),
        session: names::session(session),
        base,
        lease,
        header: manifest.header,
        cause: UpdateCause::Logout,
    };
    let upload = match handle.request(Request::UpdateBegin(begin)).await? {
        Response::UpdateAccepted { upload } => upload,
        other => unexpected(&other),
    };
    let per = uve_protocol::manifest::chunks_per_page(handle.max_frame()) as usize;
    let mut missing = Vec::new();
    for (p, page) in (0u32..).zip(manifest.chunks.chunks(per.max(1))) {
        match handle
            .request(Request::UpdatePage {
                upload,
                page: p,
                chunks: page.to_vec(),
            })
            .await?
        {
            Response::Missing(idx) => {
                missing.extend(idx.iter().map(|i| p as usize * per + *i as usize));
            }
            other => unexpected(&other),
        }
    }
    Ok(Listed {
        upload,
        manifest,
        bytes,
        missing,
    })
}

/// What an update by block deltas sent.
#[derive(Debug)]
pub struct DeltaUpdated {
    /// The host's answer to the commit.
    pub answer: Response,
    /// How many chunks the host said it lacked.
    pub missing: usize,
    /// How many of those went as deltas.
    pub deltas: usize,
    /// Block bytes sent in deltas.
    pub delta_bytes: usize,
    /// Bytes of the chunks sent whole.
    pub whole_bytes: usize,
}

/// An update as a protocol-2 agent sends it: block signatures for the
/// missing chunks, then each as a delta when the host named a base chunk,
/// else whole.
pub async fn update_with_deltas(
    handle: &LinkHandle,
    user: &str,
    base: Option<Version>,
    lease: u64,
    data: &[u8],
) -> Result<DeltaUpdated, LinkError> {
    let l = begin_and_list(handle, user, "s1", base, lease, data).await?;
    let mut out = DeltaUpdated {
        answer: Response::Ok,
        missing: l.missing.len(),
        deltas: 0,
        delta_bytes: 0,
        whole_bytes: 0,
    };
    let batch = uve_protocol::defs::MAX_SIGNATURE_BATCH as usize;
    for idx in l.missing.chunks(batch) {
        let listed: Vec<u32> = idx.iter().map(|&i| index(i)).collect();
        let sigs = match handle
            .request(Request::BlockSignatures {
                upload: l.upload,
                chunks: listed,
            })
            .await?
        {
            Response::BlockSignatures(s) => s,
            other => unexpected(&other),
        };
        assert_eq!(sigs.len(), idx.len());
        for (&i, sig) in idx.iter().zip(sigs) {
            let request = chunk_request(&l, i, sig, &mut out);
            match handle.request(request).await? {
                Response::Ok => {}
                other => unexpected(&other),
            }
        }
    }
    out.answer = handle
        .request(Request::UpdateCommit { upload: l.upload })
        .await?;
    Ok(out)
}

/// A chunk index as the protocol carries it.
fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or_else(|_| panic!("chunk index {i} beyond u32"))
}

/// Chunk `i` of `l` as a delta against `sig` when the host named a base
/// chunk, else whole; counted in `out`.
fn chunk_request(
    l: &Listed,
    i: usize,
    sig: Option<Vec<BlockDigest>>,
    out: &mut DeltaUpdated,
) -> Request {
    let c = l.manifest.chunks[i];
    let offset = l.offset(i);
    let data = l.bytes[&c.hash].clone();
    match sig {
        Some(digests) => {
            let blocks = uve_protocol::delta::diff(offset, &data, &digests)
                .unwrap_or_else(|| panic!("diff chunk {i}: the signature does not fit"));
            out.deltas += 1;
            out.delta_bytes += blocks.iter().map(|b| b.data.len()).sum::<usize>();
            Request::ChunkDelta(ChunkDelta {
                upload: l.upload,
                index: index(i),
                hash: c.hash,
                blocks,
            })
        }
        None => {
            out.whole_bytes += data.len();
            Request::ChunkUpload {
                upload: l.upload,
                hash: c.hash,
                data,
            }
        }
    }
}
