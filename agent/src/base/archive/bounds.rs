//! Bounds on an archive before anything of it is read into memory: a
//! pass over its headers alone (one 512-byte read per entry, the data
//! skipped) refuses an archive whose GNU long-name or long-link entry
//! exceeds [`MAX_LONG_NAME`], whose PAX header exceeds [`MAX_PAX`] (both
//! are read whole into memory by the unpacker), that holds GNU sparse
//! entries (the packer never writes them, and an unpacker that skipped
//! them would lose the file), or whose entries run past its end. A
//! crafted archive is thus refused with an error naming the entry, before
//! the unpacker allocates for it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::ArchiveError;

/// Longest GNU long-name or long-link entry accepted (Linux's `PATH_MAX`).
pub const MAX_LONG_NAME: u64 = 4096;

/// Longest PAX extended header accepted.
pub const MAX_PAX: u64 = 64 * 1024;

/// The size field of a tar header: octal digits (NUL or space padded), or
/// base-256 when its first byte has the high bit set.
fn size_of(header: &[u8; 512]) -> Option<u64> {
    let field = &header[124..136];
    if field[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let digits = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ');
    let mut v = 0u64;
    for b in digits {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// The entry's path as the header's name field spells it (for messages).
fn name_of(header: &[u8; 512]) -> String {
    let name = &header[..100];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

fn refused(header: &[u8; 512], offset: u64, why: &'static str) -> ArchiveError {
    ArchiveError::Unsafe {
        path: format!("{} (header at byte {offset})", name_of(header)),
        why,
    }
}

/// Checks every header of `archive` (see the module header).
pub fn check(archive: &File) -> Result<(), ArchiveError> {
    let len = archive
        .metadata()
        .map_err(super::io_err("stat archive"))?
        .len();
    let mut offset = 0u64;
    let mut header = [0u8; 512];
    while offset + 512 <= len {
        archive
            .read_exact_at(&mut header, offset)
            .map_err(super::io_err("read archive header"))?;
        if header.iter().all(|&b| b == 0) {
            return Ok(()); // the end-of-archive blocks
        }
        let size =
            size_of(&header).ok_or_else(|| refused(&header, offset, "unreadable size field"))?;
        match header[156] {
            b'L' | b'K' if size > MAX_LONG_NAME => {
                return Err(refused(
                    &header,
                    offset,
                    "GNU long name or link longer than 4096 bytes",
                ));
            }
            b'x' | b'g' if size > MAX_PAX => {
                return Err(refused(&header, offset, "PAX header longer than 64 KiB"));
            }
            b'S' => {
                return Err(refused(
                    &header,
                    offset,
                    "GNU sparse entries are not accepted",
                ));
            }
            _ => {}
        }
        let data = size.div_ceil(512).saturating_mul(512);
        offset = offset
            .checked_add(512)
            .and_then(|o| o.checked_add(data))
            .ok_or_else(|| refused(&header, offset, "size past any file"))?;
        if offset > len {
            return Err(refused(
                &header,
                offset,
                "entry runs past the end of the archive",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A header of `kind` for `name` declaring `size` bytes, with its
    /// checksum.
    fn header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    /// An archive file holding `h` followed by `data_len` bytes of holes
    /// (sparse: costs nothing on disk) and the end blocks.
    fn archive_with(h: &tar::Header, data_len: u64) -> (tempfile::NamedTempFile, File) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().write_all_at(h.as_bytes(), 0).unwrap();
        f.as_file()
            .set_len(512 + data_len.div_ceil(512) * 512 + 1024)
            .unwrap();
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    #[test]
    fn a_gigabyte_long_name_or_pax_header_is_refused_before_it_is_read() {
        for (kind, what) in [
            (tar::EntryType::GNULongName, "long name"),
            (tar::EntryType::XHeader, "PAX header"),
        ] {
            let (_f, file) = archive_with(&header("x", kind, 1 << 30), 1 << 30);
            let e = check(&file).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("header at byte 0"), "{e}");
        }
    }

    #[test]
    fn sizes_past_the_end_and_sparse_entries_are_refused() {
        let (_f, file) = archive_with(&header("big", tar::EntryType::Regular, 1 << 40), 0);
        let e = check(&file).unwrap_err().to_string();
        assert!(e.contains("past the end"), "{e}");
        let (_f, file) = archive_with(&header("s", tar::EntryType::GNUSparse, 0), 0);
        assert!(check(&file).unwrap_err().to_string().contains("sparse"));
    }

    #[test]
    fn what_the_packer_writes_passes() {
        let dir = tempfile::tempdir().unwrap();
        // A path over the header's 100 bytes: the packer writes a long name.
        let deep = dir.path().join("a".repeat(80)).join("b".repeat(80));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("c".repeat(80)), b"long name").unwrap();
        std::fs::write(dir.path().join("small"), vec![7u8; 10_000]).unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        super::super::pack(dir.path(), out.path(), &[]).unwrap();
        check(&File::open(out.path()).unwrap()).unwrap();
        assert_eq!(
            size_of(header("a", tar::EntryType::Regular, 1 << 34).as_bytes()),
            Some(1 << 34)
        );
    }
}
