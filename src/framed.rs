//! Checksummed, length-prefixed entries in append-only files (spool segments, journal index).
//!
//! Each entry is `magic u32 | body_len u32 | crc32c(body) u32 | body`, little-endian. Files are
//! only ever appended to and made durable with `fsync`, so after a crash only the tail that was
//! not yet fsynced can be damaged. Recovery rule, applied by [`scan_file`]:
//!
//! * an entry cut short by the end of the file is a **torn tail**: it was never acknowledged as
//!   durable, and the file is truncated to the last whole entry;
//! * an entry whose magic or checksum is wrong is a torn tail too, *unless* a whole, valid entry
//!   follows it: then bytes that were once durable have changed, which is **corruption**, and
//!   the caller must refuse to continue and say where.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const ENTRY_MAGIC: u32 = 0x544c_4531; // "TLE1"
pub const ENTRY_HEADER_BYTES: u64 = 12;
/// Largest body an entry may carry. Bounds every allocation made while reading a file.
pub const MAX_ENTRY_BODY_BYTES: u32 = 80 << 20;

/// Appends one entry holding `body` to `out`.
pub fn encode_entry(out: &mut Vec<u8>, body: &[u8]) {
    encode_entry_head(out, |o| o.extend_from_slice(body), &[]);
}

/// Appends the start of one entry whose body is what `write_head` appends to `out` followed by
/// `tail`, which the caller writes after `out` (with `writev`, so a large payload is not copied
/// into `out`). The checksum covers both. Returns the body length.
pub fn encode_entry_head(
    out: &mut Vec<u8>,
    write_head: impl FnOnce(&mut Vec<u8>),
    tail: &[u8],
) -> usize {
    let header_at = out.len();
    out.extend_from_slice(&[0u8; ENTRY_HEADER_BYTES as usize]);
    write_head(out);
    let body_at = header_at + ENTRY_HEADER_BYTES as usize;
    let body_len = out.len() - body_at + tail.len();
    debug_assert!(body_len <= MAX_ENTRY_BODY_BYTES as usize);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[body_at..]), tail);
    out[header_at..header_at + 4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    out[header_at + 4..header_at + 8].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[header_at + 8..body_at].copy_from_slice(&crc.to_le_bytes());
    body_len
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt at byte {offset}: {reason}, yet a valid entry follows; refusing to guess. Move the file aside and restart to drop everything from that byte on")]
    Corrupt {
        path: String,
        offset: u64,
        reason: &'static str,
    },
    #[error("{path} at byte {offset}: {message}")]
    Entry {
        path: String,
        offset: u64,
        message: String,
    },
}

/// How a scan ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanEnd {
    /// Bytes of whole, valid entries from the start of the file.
    pub valid_len_bytes: u64,
    /// Bytes after them: a torn tail to truncate (0 for a clean file).
    pub torn_bytes: u64,
}

enum Probe {
    Entry { body: Vec<u8> },
    Eof,
    Bad(&'static str),
}

fn probe(file: &File, offset: u64, file_len: u64) -> io::Result<Probe> {
    if offset == file_len {
        return Ok(Probe::Eof);
    }
    if file_len - offset < ENTRY_HEADER_BYTES {
        return Ok(Probe::Bad("header cut short"));
    }
    let mut header = [0u8; ENTRY_HEADER_BYTES as usize];
    file.read_exact_at(&mut header, offset)?;
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (magic, len, crc) = (word(0), word(4), word(8));
    if magic != ENTRY_MAGIC {
        return Ok(Probe::Bad("bad entry magic"));
    }
    if len > MAX_ENTRY_BODY_BYTES {
        return Ok(Probe::Bad("entry length out of range"));
    }
    if file_len - offset - ENTRY_HEADER_BYTES < u64::from(len) {
        return Ok(Probe::Bad("entry cut short"));
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact_at(&mut body, offset + ENTRY_HEADER_BYTES)?;
    if crc32c::crc32c(&body) != crc {
        return Ok(Probe::Bad("entry checksum mismatch"));
    }
    Ok(Probe::Entry { body })
}

/// Calls `visit(offset, body)` for every valid entry of the file at `path`, in order, and
/// reports where the valid entries end. Applies the module's recovery rule; does not truncate.
pub fn scan_file(
    path: &Path,
    visit: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<ScanEnd, ScanError> {
    scan(path, visit, true)
}

/// [`scan_file`] for a file whose unsynced tail may hold several entries written before one
/// sync (their pages may reach the disk in any order): everything from the first bad entry on
/// is the torn tail, whatever follows it. For a file whose every entry is checked again where
/// it is used, so that damage to a synced entry costs what it held, never a wrong answer.
pub fn scan_file_to_first_damage(
    path: &Path,
    visit: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<ScanEnd, ScanError> {
    scan(path, visit, false)
}

fn scan(
    path: &Path,
    mut visit: impl FnMut(u64, &[u8]) -> Result<(), String>,
    damage_before_valid_is_corruption: bool,
) -> Result<ScanEnd, ScanError> {
    let shown = path.display().to_string();
    let io_err = |source| ScanError::Io {
        path: shown.clone(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut offset = 0u64;
    loop {
        match probe(&file, offset, file_len).map_err(io_err)? {
            Probe::Eof => {
                return Ok(ScanEnd {
                    valid_len_bytes: offset,
                    torn_bytes: 0,
                })
            }
            Probe::Entry { body } => {
                visit(offset, &body).map_err(|message| ScanError::Entry {
                    path: shown.clone(),
                    offset,
                    message,
                })?;
                offset += ENTRY_HEADER_BYTES + body.len() as u64;
            }
            Probe::Bad(reason) => {
                if damage_before_valid_is_corruption
                    && valid_entry_follows(&file, offset, file_len).map_err(io_err)?
                {
                    return Err(ScanError::Corrupt {
                        path: shown,
                        offset,
                        reason,
                    });
                }
                return Ok(ScanEnd {
                    valid_len_bytes: offset,
                    torn_bytes: file_len - offset,
                });
            }
        }
    }
}

/// True when a whole valid entry starts somewhere after the bad entry at `bad_offset`, using
/// the bad entry's own length field when it is plausible, else searching for the magic.
fn valid_entry_follows(file: &File, bad_offset: u64, file_len: u64) -> io::Result<bool> {
    let mut header = [0u8; ENTRY_HEADER_BYTES as usize];
    if file_len - bad_offset >= ENTRY_HEADER_BYTES {
        file.read_exact_at(&mut header, bad_offset)?;
        let len = u64::from(u32::from_le_bytes([
            header[4], header[5], header[6], header[7],
        ]));
        let next = bad_offset + ENTRY_HEADER_BYTES + len;
        if len <= u64::from(MAX_ENTRY_BODY_BYTES) && next < file_len {
            if let Probe::Entry { .. } = probe(file, next, file_len)? {
                return Ok(true);
            }
        }
    }
    // Search the rest of the file (bounded: tails are small) for a magic that starts a valid entry.
    let search_len = (file_len - bad_offset).min(8 << 20);
    let mut rest = vec![0u8; search_len as usize];
    file.read_exact_at(&mut rest, bad_offset)?;
    let magic = ENTRY_MAGIC.to_le_bytes();
    for i in 1..rest.len().saturating_sub(3) {
        if rest[i..i + 4] == magic {
            if let Probe::Entry { .. } = probe(file, bad_offset + i as u64, file_len)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_entry_written_as_head_then_tail_is_the_entry_of_the_whole_body() {
        let (head, tail) = (b"head of the body".as_slice(), vec![0xa5u8; 3 * 4096 + 7]);
        let mut whole = Vec::new();
        encode_entry(&mut whole, &[head, &tail].concat());
        let mut split = Vec::new();
        let body_len = encode_entry_head(&mut split, |out| out.extend_from_slice(head), &tail);
        assert_eq!(body_len, head.len() + tail.len());
        split.extend_from_slice(&tail);
        assert_eq!(split, whole);
    }

    fn write(path: &Path, bodies: &[&[u8]]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for body in bodies {
            encode_entry(&mut bytes, body);
        }
        std::fs::File::create(path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        bytes
    }

    fn collect(path: &Path) -> Result<(Vec<Vec<u8>>, ScanEnd), ScanError> {
        let mut seen = Vec::new();
        let end = scan_file(path, |_, body| {
            seen.push(body.to_vec());
            Ok(())
        })?;
        Ok((seen, end))
    }

    #[test]
    fn clean_file_scans_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes = write(&path, &[b"one", b"two", b""]);
        let (seen, end) = collect(&path).unwrap();
        assert_eq!(seen, vec![b"one".to_vec(), b"two".to_vec(), vec![]]);
        assert_eq!(end.valid_len_bytes, bytes.len() as u64);
        assert_eq!(end.torn_bytes, 0);
    }

    #[test]
    fn every_cut_of_the_last_entry_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes = write(&path, &[b"first entry", b"second entry"]);
        let first_len = ENTRY_HEADER_BYTES as usize + 11;
        for cut in first_len..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let (seen, end) = collect(&path).unwrap();
            assert_eq!(seen, vec![b"first entry".to_vec()], "cut {cut}");
            assert_eq!(end.valid_len_bytes, first_len as u64);
            assert_eq!(end.torn_bytes, (cut - first_len) as u64);
        }
    }

    #[test]
    fn flipped_byte_before_a_valid_entry_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut bytes = write(&path, &[b"first entry", b"second entry"]);
        bytes[ENTRY_HEADER_BYTES as usize + 2] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = collect(&path).unwrap_err();
        assert!(matches!(err, ScanError::Corrupt { offset: 0, .. }), "{err}");
        assert!(err.to_string().contains("checksum"));
    }

    #[test]
    fn flipped_byte_in_the_last_entry_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut bytes = write(&path, &[b"first entry", b"second entry"]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (seen, end) = collect(&path).unwrap();
        assert_eq!(seen.len(), 1);
        assert!(end.torn_bytes > 0);
    }
}
