//! The local chunk cache: the previous version of a user's UIF stays on
//! disk (the image in file mode, the tar in directory mode) together with
//! its manifest. A retrieve reads every chunk it lists from that file by
//! offset instead of fetching it. The manifest is only a hint: every chunk
//! read from the cache is verified against its hash, so a file changed
//! behind the agent's back costs a fetch, never wrong bytes.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uve_protocol::manifest::{Hash, Manifest};

/// Where the manifest describing `user`'s UIF file is kept.
pub fn manifest_path(state_dir: &Path, user: &str) -> PathBuf {
    state_dir.join("cache").join(format!("{user}.manifest"))
}

/// Records that `user`'s UIF file currently holds `manifest`.
pub fn save(state_dir: &Path, user: &str, manifest: &Manifest) -> std::io::Result<()> {
    let path = manifest_path(state_dir, user);
    if let Some(dir) = path.parent() {
        crate::fsutil::ensure_dir(dir)?;
    }
    let bytes = postcard::to_stdvec(manifest).map_err(std::io::Error::other)?;
    crate::fsutil::atomic_write(&path, &bytes)
}

/// The recorded manifest of `user`'s UIF file, if any and readable.
pub fn load(state_dir: &Path, user: &str) -> Option<Manifest> {
    let bytes = std::fs::read(manifest_path(state_dir, user)).ok()?;
    let m: Manifest = postcard::from_bytes(&bytes).ok()?;
    m.validate().ok().map(|()| m)
}

/// Forgets the cache of `user` (its file no longer matches any manifest).
pub fn forget(state_dir: &Path, user: &str) {
    let _ = std::fs::remove_file(manifest_path(state_dir, user));
}

/// Chunks available locally, by hash.
pub struct ChunkCache {
    file: Option<File>,
    index: HashMap<Hash, (u64, u32)>,
}

impl ChunkCache {
    /// Opens the cache of `file` described by `manifest`; empty if either
    /// is missing.
    pub fn open(file: &Path, manifest: Option<Manifest>) -> ChunkCache {
        let (Some(m), Ok(f)) = (manifest, File::open(file)) else {
            return ChunkCache {
                file: None,
                index: HashMap::new(),
            };
        };
        let index = m.offsets().map(|(off, c)| (c.hash, (off, c.len))).collect();
        ChunkCache {
            file: Some(f),
            index,
        }
    }

    /// The verified bytes of chunk `hash`, if the cache has it intact.
    pub fn get(&self, hash: &Hash) -> Option<Vec<u8>> {
        let (off, len) = *self.index.get(hash)?;
        let mut buf = vec![0u8; len as usize];
        self.file.as_ref()?.read_exact_at(&mut buf, off).ok()?;
        (Hash::of(&buf) == *hash).then_some(buf)
    }
}
