//! The start-up self-test of the bucket's conditional writes (see the
//! parent's *Start-up self-test*).

use futures_util::TryStreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, PutResult, UpdateVersion};

use super::{S3Store, remote};
use crate::store::{StoreError, StoreResult};

impl S3Store {
    /// Checks that the bucket honours `If-None-Match: *` and `If-Match`, and
    /// whether `If-Match` wants a quoted ETag. Returns that quoting.
    pub(super) fn self_test(&self) -> StoreResult<bool> {
        let key = self.key(&format!("selftest/{}", self.next_nonce()));
        let s3 = self.s3.clone();
        let result = self.block_on(async move {
            creates_once(&s3, &key).await?;
            let (quote, bare) = quoting(&s3, &key).await?;
            refuses_stale(&s3, &key, quote, &bare).await?;
            Ok(quote)
        });
        let key = self.key("selftest");
        let s3 = self.s3.clone();
        // Best effort: GC also sweeps old self-test objects.
        let _ = self.block_on(async move {
            let metas: Vec<_> = s3.list(Some(&key)).try_collect().await?;
            for m in metas {
                let _ = s3.delete(&m.location).await;
            }
            Ok::<_, object_store::Error>(())
        });
        result
    }
}

/// A conditional update of `key` to `body` if its ETag is `e_tag`.
async fn update_if(
    s3: &AmazonS3,
    key: &Path,
    body: &'static str,
    e_tag: String,
) -> object_store::Result<PutResult> {
    let mode = PutMode::Update(UpdateVersion {
        e_tag: Some(e_tag),
        version: None,
    });
    s3.put_opts(key, PutPayload::from(body), mode.into()).await
}

/// A first create of `key` succeeds and a second one fails.
async fn creates_once(s3: &AmazonS3, key: &Path) -> StoreResult<()> {
    let create =
        |body: &'static str| s3.put_opts(key, PutPayload::from(body), PutMode::Create.into());
    create("a")
        .await
        .map_err(|e| remote("self-test: first create of a new object", e))?;
    match create("b").await {
        Err(object_store::Error::AlreadyExists { .. })
        | Err(object_store::Error::Precondition { .. }) => Ok(()),
        Ok(_) => Err(StoreError::UnsafeStore(
            "it ignores `If-None-Match: *`: a second create of the same key \
             succeeded and overwrote the first"
                .into(),
        )),
        Err(e) => Err(remote("self-test: second create", e)),
    }
}

/// Whether `If-Match` with the current ETag succeeds quoted or bare; also
/// the bare ETag it was given.
async fn quoting(s3: &AmazonS3, key: &Path) -> StoreResult<(bool, String)> {
    let meta = s3
        .head(key)
        .await
        .map_err(|e| remote("self-test: read back", e))?;
    let Some(tag) = meta.e_tag else {
        return Err(StoreError::UnsafeStore(
            "it returns no ETag, so If-Match cannot be used".into(),
        ));
    };
    let bare = tag.trim_matches('"').to_string();
    for (quote, form) in [(true, format!("\"{bare}\"")), (false, bare.clone())] {
        match update_if(s3, key, "c", form).await {
            Ok(_) => return Ok((quote, bare)),
            Err(object_store::Error::Precondition { .. }) => {}
            Err(e) => return Err(remote("self-test: conditional update", e)),
        }
    }
    Err(StoreError::UnsafeStore(
        "it refuses `If-Match` with the object's current ETag, quoted or bare".into(),
    ))
}

/// An update with the ETag of before the last update fails.
async fn refuses_stale(s3: &AmazonS3, key: &Path, quote: bool, bare: &str) -> StoreResult<()> {
    let stale = if quote {
        format!("\"{bare}\"")
    } else {
        bare.to_string()
    };
    match update_if(s3, key, "d", stale).await {
        Err(object_store::Error::Precondition { .. }) => Ok(()),
        Ok(_) => Err(StoreError::UnsafeStore(
            "it ignores `If-Match`: an update with a stale ETag succeeded".into(),
        )),
        Err(e) => Err(remote("self-test: stale update", e)),
    }
}
