//! A minimal synchronous NBD client.
//!
//! Exists so that `tideline demo` can drive an export without external tools, and so that tests
//! can send exactly the bytes they want (malformed or pipelined requests) through
//! [`NbdClient::stream_mut`], [`NbdClient::send_request`] and [`NbdClient::recv_reply`]. It
//! negotiates with `OPT_GO` only (fixed newstyle, no structured replies, so every reply is a
//! simple reply) and keeps one request in flight in its convenience methods. Errors the server
//! returns come back as `io::Error::from_raw_os_error(nbd_errno)`; NBD error values equal the
//! Linux errno values, so `raw_os_error()` yields e.g. `libc::EINVAL`.

use super::proto::*;
use bytes::{BufMut, BytesMut};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Option replies longer than this are treated as a protocol error.
const MAX_OPTION_REPLY_BYTES: u32 = 64 * 1024;
/// Payload limit when the server advertises none (the spec's guaranteed minimum maximum).
const DEFAULT_MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;

/// A connected NBD client in the transmission phase.
pub struct NbdClient<S> {
    stream: S,
    size_bytes: u64,
    transmission_flags: u16,
    max_payload_bytes: u32,
    next_cookie: u64,
}

impl NbdClient<UnixStream> {
    pub fn connect_unix(path: &Path, export: &str) -> io::Result<Self> {
        NbdClient::handshake(UnixStream::connect(path)?, export)
    }
}

impl NbdClient<TcpStream> {
    pub fn connect_tcp(addr: impl ToSocketAddrs, export: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        NbdClient::handshake(stream, export)
    }
}

impl<S: Read + Write> NbdClient<S> {
    /// Negotiates `export` over an already connected stream.
    pub fn handshake(mut stream: S, export: &str) -> io::Result<Self> {
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        let mut cur = Cursor::new(&greeting);
        let (magic, opt_magic, flags) = (cur.u64()?, cur.u64()?, cur.u16()?);
        if magic != NBD_MAGIC || opt_magic != IHAVEOPT {
            return Err(protocol_error("server is not a newstyle NBD server"));
        }
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol_error("server does not support fixed newstyle"));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        stream.write_all(&client_flags.to_be_bytes())?;
        send_go(&mut stream, export)?;
        let (size_bytes, transmission_flags, max_payload_bytes) = read_go_replies(&mut stream)?;
        Ok(NbdClient {
            stream,
            size_bytes,
            transmission_flags,
            max_payload_bytes,
            next_cookie: 1,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// Reads `buf.len()` bytes at `offset`, split into requests of at most the server's maximum
    /// payload.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let step = self.max_payload_bytes as usize;
        for (i, chunk) in buf.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            self.request(CMD_READ, 0, at, len_u32(chunk.len())?, &[])?;
            self.stream.read_exact(chunk)?;
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let step = self.max_payload_bytes as usize;
        for (i, chunk) in data.chunks(step).enumerate() {
            let at = offset + (i * step) as u64;
            self.request(CMD_WRITE, flags, at, len_u32(chunk.len())?, chunk)?;
        }
        Ok(())
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_TRIM, 0, offset, len, &[])
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[])
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Soft disconnect: sends `NBD_CMD_DISC` and closes the stream.
    pub fn disconnect(mut self) -> io::Result<()> {
        let header = RequestHeader {
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        self.stream.write_all(&header.encode())?;
        self.stream.flush()
    }

    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Sends one raw request (and `payload`, which should be `len` bytes for a WRITE) without
    /// waiting for its reply; returns the cookie used.
    pub fn send_request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let header = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.send_raw(&header, payload)?;
        Ok(cookie)
    }

    /// Sends `header` and `payload` exactly as given (the caller picks the cookie).
    pub fn send_raw(&mut self, header: &RequestHeader, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(&header.encode())?;
        self.stream.write_all(payload)?;
        self.stream.flush()
    }

    /// Reads one simple reply header. A successful READ's data follows it on the stream.
    pub fn recv_reply(&mut self) -> io::Result<SimpleReply> {
        let mut buf = [0u8; SimpleReply::LEN];
        self.stream.read_exact(&mut buf)?;
        Ok(SimpleReply::parse(&buf)?)
    }

    /// One request, one reply; a non-zero error becomes an `io::Error` carrying the errno.
    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let cookie = self.send_request(kind, flags, offset, len, payload)?;
        let reply = self.recv_reply()?;
        if reply.cookie != cookie {
            return Err(protocol_error("reply for an unexpected cookie"));
        }
        match reply.error {
            0 => Ok(()),
            errno => Err(errno_error(errno)),
        }
    }
}

/// Turns an NBD error value into an `io::Error` whose `raw_os_error()` is that value.
pub fn errno_error(errno: u32) -> io::Error {
    match i32::try_from(errno) {
        Ok(code) => io::Error::from_raw_os_error(code),
        Err(_) => protocol_error("server sent an out-of-range error value"),
    }
}

fn send_go<S: Write>(stream: &mut S, export: &str) -> io::Result<()> {
    let mut data = BytesMut::new();
    data.put_u32(len_u32(export.len())?);
    data.put_slice(export.as_bytes());
    data.put_u16(1);
    data.put_u16(INFO_BLOCK_SIZE);
    let header = OptionHeader {
        option: OPT_GO,
        len: len_u32(data.len())?,
    };
    stream.write_all(&header.encode())?;
    stream.write_all(&data)?;
    stream.flush()
}

/// Reads `NBD_REP_INFO`s up to the final ACK: (size, transmission flags, max payload).
fn read_go_replies<S: Read>(stream: &mut S) -> io::Result<(u64, u16, u32)> {
    let mut export = None;
    let mut max_payload = DEFAULT_MAX_PAYLOAD_BYTES;
    loop {
        let mut buf = [0u8; OptionReplyHeader::LEN];
        stream.read_exact(&mut buf)?;
        let header = OptionReplyHeader::parse(&buf)?;
        if header.option != OPT_GO || header.len > MAX_OPTION_REPLY_BYTES {
            return Err(protocol_error("unexpected option reply"));
        }
        let mut data = vec![0u8; header.len as usize];
        stream.read_exact(&mut data)?;
        match header.reply_type {
            REP_ACK => break,
            REP_INFO => parse_info(&data, &mut export, &mut max_payload)?,
            t if is_option_error(t) => return Err(refused(t, &data)),
            _ => return Err(protocol_error("unexpected option reply type")),
        }
    }
    let (size, flags) = export.ok_or_else(|| protocol_error("server sent no NBD_INFO_EXPORT"))?;
    Ok((size, flags, max_payload))
}

fn parse_info(
    data: &[u8],
    export: &mut Option<(u64, u16)>,
    max_payload: &mut u32,
) -> io::Result<()> {
    let mut cur = Cursor::new(data);
    match cur.u16()? {
        INFO_EXPORT => *export = Some((cur.u64()?, cur.u16()?)),
        INFO_BLOCK_SIZE => {
            let (_min, _preferred, max) = (cur.u32()?, cur.u32()?, cur.u32()?);
            *max_payload = max.clamp(4096, DEFAULT_MAX_PAYLOAD_BYTES);
        }
        _ => {}
    }
    Ok(())
}

fn refused(reply_type: u32, message: &[u8]) -> io::Error {
    let kind = match reply_type {
        REP_ERR_UNKNOWN => io::ErrorKind::NotFound,
        REP_ERR_POLICY | REP_ERR_TLS_REQD => io::ErrorKind::PermissionDenied,
        REP_ERR_UNSUP => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    };
    let message = String::from_utf8_lossy(message);
    io::Error::new(
        kind,
        format!("NBD server refused OPT_GO ({reply_type:#x}): {message}"),
    )
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("NBD protocol error: {what}"),
    )
}

fn len_u32(len: usize) -> io::Result<u32> {
    u32::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NBD request over 4 GiB"))
}
