//! NBD wire format: constants, fixed-size headers and their encoding.
//!
//! Everything that touches raw protocol bytes lives here so that the server and the client share
//! one definition of every magic number and field offset, and so that parsing can be unit-tested
//! without sockets. Parsing never panics: fixed-size headers are taken as `&[u8; N]`, and
//! variable-length option payloads go through [`Cursor`], which reports truncation as an error.
//! All integers are big-endian (doc/proto.md of the NetworkBlockDevice project).

use bytes::{BufMut, BytesMut};
use std::io;

// ---- handshake ---------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also prefixes every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server -> client, u16).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client -> server, u32).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option numbers.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Whether an option reply type is an error (bit 31 set).
pub fn is_option_error(reply_type: u32) -> bool {
    reply_type & REP_ERR != 0
}

/// `NBD_INFO_*` items of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The only metadata context this server knows.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Bytes after `EXPORT_NAME`'s size and flags unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING: usize = 124;

// ---- transmission ------------------------------------------------------------------------------

/// Transmission flags (u16).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flags (u16).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Largest string (export name, query, message) the spec allows.
pub const MAX_STRING_BYTES: usize = 4096;

// ---- errors ------------------------------------------------------------------------------------

/// The error values NBD allows on the wire. They equal the Linux errno values, so a client can
/// turn one into an `io::Error` with `from_raw_os_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    /// Only for `FAST_ZERO` requests that cannot be made fast.
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    pub fn wire(self) -> u32 {
        self as u32
    }

    /// Maps an error from an export to the closest NBD error value (EIO when nothing fits).
    pub fn from_io_error(err: &io::Error) -> Errno {
        if let Some(code) = err.raw_os_error() {
            return Self::from_os_errno(code);
        }
        match err.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Errno::Perm,
            io::ErrorKind::InvalidInput => Errno::Inval,
            io::ErrorKind::OutOfMemory => Errno::NoMem,
            io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => Errno::NoSpc,
            _ => Errno::Io,
        }
    }

    fn from_os_errno(code: i32) -> Errno {
        match code {
            libc::EPERM | libc::EACCES | libc::EROFS => Errno::Perm,
            libc::ENOMEM => Errno::NoMem,
            libc::EINVAL => Errno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
            libc::EOVERFLOW => Errno::Overflow,
            libc::ESHUTDOWN => Errno::Shutdown,
            _ => Errno::Io,
        }
    }
}

/// A protocol message that cannot be parsed; the peer is out of sync.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { found: u64, expected: u64 },
    #[error("message truncated: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("string is not valid UTF-8")]
    BadUtf8,
    #[error("string longer than {MAX_STRING_BYTES} bytes")]
    StringTooLong,
}

impl From<ProtoError> for io::Error {
    fn from(err: ProtoError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }
}

// ---- transmission headers ----------------------------------------------------------------------

/// A request header (28 bytes), before any WRITE payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub const LEN: usize = 28;

    pub fn parse(buf: &[u8; Self::LEN]) -> Result<RequestHeader, ProtoError> {
        let magic = be_u32(buf, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                found: magic.into(),
                expected: REQUEST_MAGIC.into(),
            });
        }
        Ok(RequestHeader {
            flags: be_u16(buf, 4),
            kind: be_u16(buf, 6),
            cookie: be_u64(buf, 8),
            offset: be_u64(buf, 16),
            len: be_u32(buf, 24),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// A simple reply header (16 bytes); a successful READ's data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn parse(buf: &[u8; Self::LEN]) -> Result<SimpleReply, ProtoError> {
        let magic = be_u32(buf, 0);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                found: magic.into(),
                expected: SIMPLE_REPLY_MAGIC.into(),
            });
        }
        Ok(SimpleReply {
            error: be_u32(buf, 4),
            cookie: be_u64(buf, 8),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }
}

/// A structured reply chunk header (20 bytes); `len` payload bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub const LEN: usize = 20;

    pub fn parse(buf: &[u8; Self::LEN]) -> Result<ChunkHeader, ProtoError> {
        let magic = be_u32(buf, 0);
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                found: magic.into(),
                expected: STRUCTURED_REPLY_MAGIC.into(),
            });
        }
        Ok(ChunkHeader {
            flags: be_u16(buf, 4),
            kind: be_u16(buf, 6),
            cookie: be_u64(buf, 8),
            len: be_u32(buf, 16),
        })
    }

    pub fn put(&self, out: &mut BytesMut) {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u32(self.len);
    }
}

// ---- handshake headers -------------------------------------------------------------------------

/// An option request header (16 bytes); `len` bytes of option data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn parse(buf: &[u8; Self::LEN]) -> Result<OptionHeader, ProtoError> {
        let magic = be_u64(buf, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                found: magic,
                expected: IHAVEOPT,
            });
        }
        Ok(OptionHeader {
            option: be_u32(buf, 8),
            len: be_u32(buf, 12),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// An option reply header (20 bytes); `len` bytes of reply data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn parse(buf: &[u8; Self::LEN]) -> Result<OptionReplyHeader, ProtoError> {
        let magic = be_u64(buf, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                found: magic,
                expected: OPTION_REPLY_MAGIC,
            });
        }
        Ok(OptionReplyHeader {
            option: be_u32(buf, 8),
            reply_type: be_u32(buf, 12),
            len: be_u32(buf, 16),
        })
    }
}

/// Appends one option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    // Option replies are built by the server from bounded data (≤ 64 KiB of names and
    // messages), so the length always fits; saturate rather than panic all the same.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(len);
    out.put_slice(data);
}

// ---- variable-length data ----------------------------------------------------------------------

/// Reads big-endian fields from untrusted option data without panicking.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(ProtoError::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        let hi = u64::from(self.u32()?);
        let lo = u64::from(self.u32()?);
        Ok(hi << 32 | lo)
    }

    /// A string prefixed by its u32 length.
    pub fn string_u32(&mut self) -> Result<&'a str, ProtoError> {
        let len = usize::try_from(self.u32()?).map_err(|_| ProtoError::StringTooLong)?;
        if len > MAX_STRING_BYTES {
            return Err(ProtoError::StringTooLong);
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| ProtoError::BadUtf8)
    }
}

fn be_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn be_u64(buf: &[u8], at: usize) -> u64 {
    u64::from(be_u32(buf, at)) << 32 | u64::from(be_u32(buf, at + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let hdr = RequestHeader {
            flags: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            kind: CMD_WRITE_ZEROES,
            cookie: 0x0102_0304_0506_0708,
            offset: 0xdead_beef_0000_1000,
            len: 0x0010_0000,
        };
        let bytes = hdr.encode();
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&bytes[4..6], &[0, 3]);
        assert_eq!(&bytes[6..8], &[0, 6]);
        assert_eq!(&bytes[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&bytes[24..28], &[0, 0x10, 0, 0]);
        assert_eq!(RequestHeader::parse(&bytes), Ok(hdr));
    }

    #[test]
    fn request_header_rejects_bad_magic() {
        let mut bytes = RequestHeader {
            flags: 0,
            kind: 0,
            cookie: 1,
            offset: 0,
            len: 1,
        }
        .encode();
        bytes[0] ^= 0xff;
        let err = RequestHeader::parse(&bytes).expect_err("bad magic must be rejected");
        assert!(matches!(err, ProtoError::BadMagic { expected, .. } if expected == 0x2560_9513));
    }

    #[test]
    fn simple_reply_round_trips() {
        let reply = SimpleReply {
            error: Errno::NoSpc.wire(),
            cookie: u64::MAX,
        };
        let bytes = reply.encode();
        assert_eq!(&bytes[0..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28]);
        assert_eq!(SimpleReply::parse(&bytes), Ok(reply));
        let mut bad = bytes;
        bad[3] = 0;
        assert!(SimpleReply::parse(&bad).is_err());
    }

    #[test]
    fn chunk_header_round_trips() {
        let hdr = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: 42,
            len: 8 + 4096,
        };
        let mut out = BytesMut::new();
        hdr.put(&mut out);
        assert_eq!(out.len(), ChunkHeader::LEN);
        assert_eq!(&out[0..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1]);
        let mut fixed = [0u8; ChunkHeader::LEN];
        fixed.copy_from_slice(&out);
        assert_eq!(ChunkHeader::parse(&fixed), Ok(hdr));
    }

    #[test]
    fn option_header_round_trips_and_checks_magic() {
        let hdr = OptionHeader {
            option: OPT_GO,
            len: 7,
        };
        let bytes = hdr.encode();
        assert_eq!(&bytes[0..8], b"IHAVEOPT");
        assert_eq!(OptionHeader::parse(&bytes), Ok(hdr));
        let mut bad = bytes;
        bad[0] = b'X';
        assert!(OptionHeader::parse(&bad).is_err());
    }

    #[test]
    fn option_reply_encodes_and_parses() {
        let mut out = BytesMut::new();
        put_option_reply(&mut out, OPT_LIST, REP_SERVER, b"\0\0\0\x03vol");
        assert_eq!(out.len(), OptionReplyHeader::LEN + 7);
        let mut fixed = [0u8; OptionReplyHeader::LEN];
        fixed.copy_from_slice(&out[..OptionReplyHeader::LEN]);
        let hdr = OptionReplyHeader::parse(&fixed).expect("valid header");
        assert_eq!(
            hdr,
            OptionReplyHeader {
                option: OPT_LIST,
                reply_type: REP_SERVER,
                len: 7
            }
        );
        assert!(!is_option_error(REP_ACK));
        assert!(is_option_error(REP_ERR_UNSUP));
        assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
    }

    #[test]
    fn cursor_reports_truncation_instead_of_panicking() {
        let data = [0u8, 0, 0, 9, b'a', b'b'];
        let mut cur = Cursor::new(&data);
        assert_eq!(cur.string_u32(), Err(ProtoError::Truncated { needed: 7 }));
        let mut cur = Cursor::new(&[0u8, 0, 0, 2, 0xff, 0xfe]);
        assert_eq!(cur.string_u32(), Err(ProtoError::BadUtf8));
        let mut cur = Cursor::new(&[0xffu8, 0xff, 0xff, 0xff]);
        assert_eq!(cur.string_u32(), Err(ProtoError::StringTooLong));
        let mut cur = Cursor::new(&[0u8, 0, 0, 0, 0, 0, 0, 5, 0, 1]);
        assert_eq!(cur.u64(), Ok(5));
        assert_eq!(cur.u16(), Ok(1));
        assert_eq!(cur.remaining(), 0);
        assert!(cur.u16().is_err());
    }

    #[test]
    fn io_errors_map_to_nbd_errno() {
        let map = |code| Errno::from_io_error(&io::Error::from_raw_os_error(code));
        assert_eq!(map(libc::ENOSPC), Errno::NoSpc);
        assert_eq!(map(libc::EDQUOT), Errno::NoSpc);
        assert_eq!(map(libc::EROFS), Errno::Perm);
        assert_eq!(map(libc::EINVAL), Errno::Inval);
        assert_eq!(map(libc::EBADF), Errno::Io);
        let kind = |k: io::ErrorKind| Errno::from_io_error(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::PermissionDenied), Errno::Perm);
        assert_eq!(kind(io::ErrorKind::UnexpectedEof), Errno::Io);
        assert_eq!(Errno::Shutdown.wire(), 108);
        assert_eq!(Errno::NotSup.wire(), 95);
    }
}
