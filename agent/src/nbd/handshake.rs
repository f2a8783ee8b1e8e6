//! Fixed-newstyle option haggling, from the server greeting to the transmission phase.
//!
//! Kept apart from the transmission loop because its rules differ: messages are strictly
//! request/response, every option must be answered (unknown ones with `ERR_UNSUP`) and the
//! connection may only be dropped for protocol violations or abuse. Abuse is bounded by
//! [`NbdLimits`]: option payloads over `max_option_bytes` or more than `max_options` options drop
//! the connection (the overall time is bounded by the caller).
//!
//! Decisions: fixed newstyle is honoured even if the client did not set `C_FIXED_NEWSTYLE`; the
//! empty export name selects the only export when there is exactly one; `STARTTLS` and
//! `EXTENDED_HEADERS` get `ERR_UNSUP`; `INFO_BLOCK_SIZE` is always sent (min 1, preferred 4096,
//! max = `max_payload_bytes`), since any client may honour it.

use super::proto::*;
use super::server::{Exports, NbdLimits};
use super::BlockExport;
use bytes::{BufMut, BytesMut};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The id this server gives `base:allocation` in `SET_META_CONTEXT`.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// What the transmission phase needs from the handshake.
pub(super) struct Session {
    pub name: String,
    pub export: Arc<dyn BlockExport>,
    pub structured: bool,
    /// `base:allocation` was selected for this export, so BLOCK_STATUS is allowed.
    pub base_allocation: bool,
}

impl Session {
    pub fn transmission_flags(&self) -> u16 {
        transmission_flags(self.export.as_ref(), self.structured)
    }
}

fn transmission_flags(export: &dyn BlockExport, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    if export.read_only() {
        flags |= TFLAG_READ_ONLY;
    }
    flags
}

/// Runs the handshake. `Ok(None)`: the client aborted or broke a rule and the connection should
/// be closed; `Ok(Some(_))`: transmission starts with the next byte.
pub(super) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &Exports,
    limits: &NbdLimits,
    conn: u64,
) -> io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBD_MAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    wr.write_all(&greeting).await?;
    wr.flush().await?;

    let client_flags = rd.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        tracing::warn!(
            conn,
            client_flags,
            "NBD client sent unknown handshake flags; dropping"
        );
        return Ok(None);
    }
    let mut haggle = Haggle {
        exports,
        limits,
        conn,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta_export: None,
        out: BytesMut::new(),
    };
    for _ in 0..limits.max_options {
        let mut header = [0u8; OptionHeader::LEN];
        rd.read_exact(&mut header).await?;
        let header = match OptionHeader::parse(&header) {
            Ok(header) => header,
            Err(err) => {
                tracing::warn!(conn, error = %err, "bad NBD option header; dropping");
                return Ok(None);
            }
        };
        if header.len > limits.max_option_bytes {
            tracing::warn!(
                conn,
                option = header.option,
                len = header.len,
                "NBD option too long"
            );
            return Ok(None);
        }
        let mut data = vec![0u8; header.len as usize];
        rd.read_exact(&mut data).await?;
        let step = haggle.option(header.option, &data);
        wr.write_all(&haggle.out).await?;
        wr.flush().await?;
        haggle.out.clear();
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(session) => return Ok(Some(session)),
        }
    }
    tracing::warn!(
        conn,
        max = limits.max_options,
        "too many NBD options; dropping"
    );
    Ok(None)
}

enum Step {
    Continue,
    Close,
    Transmit(Session),
}

/// Option-haggling state; replies accumulate in `out` and are written after each option.
struct Haggle<'a> {
    exports: &'a Exports,
    limits: &'a NbdLimits,
    conn: u64,
    no_zeroes: bool,
    structured: bool,
    /// Export for which `base:allocation` was selected by the last `SET_META_CONTEXT`.
    meta_export: Option<String>,
    out: BytesMut,
}

impl Haggle<'_> {
    fn option(&mut self, option: u32, data: &[u8]) -> Step {
        tracing::debug!(conn = self.conn, option, len = data.len(), "NBD option");
        match option {
            OPT_EXPORT_NAME => self.export_name(data),
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                Step::Close
            }
            OPT_LIST => self.list(data),
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_STRUCTURED_REPLY => self.structured_reply(data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            OPT_STARTTLS => self.error(option, REP_ERR_UNSUP, "TLS is not supported"),
            OPT_EXTENDED_HEADERS => {
                self.error(option, REP_ERR_UNSUP, "extended headers unsupported")
            }
            _ => self.error(option, REP_ERR_UNSUP, "unknown option"),
        }
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        put_option_reply(&mut self.out, option, reply_type, data);
    }

    fn error(&mut self, option: u32, reply_type: u32, message: &str) -> Step {
        self.reply(option, reply_type, message.as_bytes());
        Step::Continue
    }

    fn lookup(&self, name: &str) -> Option<(String, Arc<dyn BlockExport>)> {
        if let Some(export) = self.exports.get(name) {
            return Some((name.to_owned(), export.clone()));
        }
        match (name.is_empty(), self.exports.len()) {
            (true, 1) => self
                .exports
                .iter()
                .next()
                .map(|(n, e)| (n.clone(), e.clone())),
            _ => None,
        }
    }

    fn session(&self, name: String, export: Arc<dyn BlockExport>) -> Session {
        let base_allocation = self.structured && self.meta_export.as_deref() == Some(&name);
        Session {
            name,
            export,
            structured: self.structured,
            base_allocation,
        }
    }

    /// `EXPORT_NAME` has no error reply: an unknown export drops the connection.
    fn export_name(&mut self, data: &[u8]) -> Step {
        let Some((name, export)) = std::str::from_utf8(data).ok().and_then(|n| self.lookup(n))
        else {
            tracing::warn!(
                conn = self.conn,
                "NBD EXPORT_NAME for an unknown export; dropping"
            );
            return Step::Close;
        };
        let session = self.session(name, export);
        self.out.put_u64(session.export.size_bytes());
        self.out.put_u16(session.transmission_flags());
        if !self.no_zeroes {
            self.out.put_bytes(0, EXPORT_NAME_PADDING);
        }
        Step::Transmit(session)
    }

    fn list(&mut self, data: &[u8]) -> Step {
        if !data.is_empty() {
            return self.error(OPT_LIST, REP_ERR_INVALID, "OPT_LIST takes no data");
        }
        let exports = self.exports;
        for (name, export) in exports {
            let mut entry = BytesMut::new();
            entry.put_u32(len_u32(name.len()));
            entry.put_slice(name.as_bytes());
            if let Some(description) = export.description() {
                entry.put_slice(description.as_bytes());
            }
            self.reply(OPT_LIST, REP_SERVER, &entry);
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
        Step::Continue
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Step {
        let Ok((name, requests)) = parse_info_request(data) else {
            return self.error(option, REP_ERR_INVALID, "malformed INFO/GO request");
        };
        let Some((name, export)) = self.lookup(name) else {
            let message = format!("unknown export '{name}'");
            return self.error(option, REP_ERR_UNKNOWN, &message);
        };
        let session = self.session(name, export);
        self.info_export(option, &session);
        self.info_block_size(option);
        if requests.contains(&INFO_NAME) {
            self.info_string(option, INFO_NAME, &session.name);
        }
        if requests.contains(&INFO_DESCRIPTION) {
            if let Some(description) = session.export.description() {
                self.info_string(option, INFO_DESCRIPTION, &description);
            }
        }
        self.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            Step::Transmit(session)
        } else {
            Step::Continue
        }
    }

    fn info_export(&mut self, option: u32, session: &Session) {
        let mut info = BytesMut::with_capacity(12);
        info.put_u16(INFO_EXPORT);
        info.put_u64(session.export.size_bytes());
        info.put_u16(session.transmission_flags());
        self.reply(option, REP_INFO, &info);
    }

    fn info_block_size(&mut self, option: u32) {
        let mut info = BytesMut::with_capacity(14);
        info.put_u16(INFO_BLOCK_SIZE);
        info.put_u32(1);
        info.put_u32(NbdLimits::PREFERRED_BLOCK_BYTES);
        info.put_u32(self.limits.max_payload_bytes);
        self.reply(option, REP_INFO, &info);
    }

    fn info_string(&mut self, option: u32, kind: u16, text: &str) {
        let mut info = BytesMut::with_capacity(2 + text.len());
        info.put_u16(kind);
        info.put_slice(truncate_utf8(text, MAX_STRING_BYTES).as_bytes());
        self.reply(option, REP_INFO, &info);
    }

    fn structured_reply(&mut self, data: &[u8]) -> Step {
        if !data.is_empty() {
            return self.error(
                OPT_STRUCTURED_REPLY,
                REP_ERR_INVALID,
                "option takes no data",
            );
        }
        self.structured = true;
        self.reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        Step::Continue
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Step {
        if !self.structured {
            return self.error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
        }
        let Ok((name, queries)) = parse_meta_request(data) else {
            return self.error(option, REP_ERR_INVALID, "malformed meta context request");
        };
        let Some((name, _)) = self.lookup(name) else {
            let message = format!("unknown export '{name}'");
            return self.error(option, REP_ERR_UNKNOWN, &message);
        };
        let selected = if option == OPT_SET_META_CONTEXT {
            queries.contains(&META_BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| matches!(*q, META_BASE_ALLOCATION | "base:"))
        };
        if option == OPT_SET_META_CONTEXT {
            self.meta_export = selected.then(|| name.clone());
        }
        if selected {
            // LIST replies carry id 0 ("reserved"); SET replies carry the id BLOCK_STATUS uses.
            let id = if option == OPT_SET_META_CONTEXT {
                BASE_ALLOCATION_ID
            } else {
                0
            };
            let mut reply = BytesMut::new();
            reply.put_u32(id);
            reply.put_slice(META_BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &reply);
        }
        self.reply(option, REP_ACK, &[]);
        Step::Continue
    }
}

/// INFO/GO data: u32 name length, name, u16 count, count × u16 info requests.
fn parse_info_request(data: &[u8]) -> Result<(&str, Vec<u16>), ProtoError> {
    let mut cur = Cursor::new(data);
    let name = cur.string_u32()?;
    let count = usize::from(cur.u16()?);
    let requests = (0..count)
        .map(|_| cur.u16())
        .collect::<Result<Vec<_>, _>>()?;
    if cur.remaining() != 0 {
        return Err(ProtoError::Truncated { needed: 0 });
    }
    Ok((name, requests))
}

/// META_CONTEXT data: u32 name length, name, u32 count, count × (u32 length, query).
fn parse_meta_request(data: &[u8]) -> Result<(&str, Vec<&str>), ProtoError> {
    let mut cur = Cursor::new(data);
    let name = cur.string_u32()?;
    let count = cur.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        // Each query needs at least its 4-byte length, so `count` cannot exceed the data.
        queries.push(cur.string_u32()?);
    }
    if cur.remaining() != 0 {
        return Err(ProtoError::Truncated { needed: 0 });
    }
    Ok((name, queries))
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The longest prefix of `text` that fits in `max` bytes without splitting a character.
pub(super) fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut data = BytesMut::new();
        data.put_u32(len_u32(name.len()));
        data.put_slice(name.as_bytes());
        data.put_u16(requests.len() as u16);
        for r in requests {
            data.put_u16(*r);
        }
        data.to_vec()
    }

    #[test]
    fn parses_info_requests() {
        let data = info_request("vol", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let (name, requests) = parse_info_request(&data).expect("valid request");
        assert_eq!(name, "vol");
        assert_eq!(requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
    }

    #[test]
    fn rejects_inconsistent_info_requests() {
        let mut data = info_request("vol", &[INFO_BLOCK_SIZE]);
        data.push(0);
        assert!(parse_info_request(&data).is_err());
        let data = info_request("vol", &[INFO_BLOCK_SIZE]);
        assert!(parse_info_request(&data[..data.len() - 1]).is_err());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn parses_meta_context_requests() {
        let mut data = BytesMut::new();
        data.put_u32(3);
        data.put_slice(b"vol");
        data.put_u32(2);
        data.put_u32(15);
        data.put_slice(b"base:allocation");
        data.put_u32(5);
        data.put_slice(b"x-y:z");
        let (name, queries) = parse_meta_request(&data).expect("valid request");
        assert_eq!(name, "vol");
        assert_eq!(queries, vec!["base:allocation", "x-y:z"]);
        // A huge query count with no data behind it fails without allocating.
        let bogus = [0u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(parse_meta_request(&bogus).is_err());
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
