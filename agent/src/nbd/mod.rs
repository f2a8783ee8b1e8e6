//! NBD server: the agent's block-device front end.
//!
//! Speaks the fixed-newstyle protocol (doc/proto.md of the NBD project) over Unix and TCP
//! sockets. Each export is a [`BlockExport`]; the server never touches files itself, so the same
//! code serves a journalled volume in the agent and a plain file in tests.
//!
//! Code map:
//! - [`proto`]: wire constants and header encoding, shared by server and client;
//! - [`server`]: [`NbdServer`], listeners, connection limits and shutdown;
//! - `handshake`: option haggling up to the transmission phase;
//! - `transmission`: the pipelined request loop (reader, blocking-pool workers, one writer);
//! - [`client`]: [`NbdClient`], a small synchronous client for the CLI demo and for tests.

use std::io;

use bytes::Bytes;

pub mod client;
mod handshake;
pub mod proto;
pub mod server;
mod transmission;

pub use client::NbdClient;
pub use server::{NbdLimits, NbdServer};

/// What an NBD export needs from the volume behind it. Calls are synchronous and may block on
/// disk I/O: the server runs them on tokio's blocking pool, several at a time per export.
pub trait BlockExport: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;
    fn read(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()>;
    /// `fua`: the data is durable before this returns. The buffer is handed over, so an export
    /// that keeps the bytes (a journal) needs no copy; a large one arrives aligned for direct
    /// I/O ([`tideline_core::direct::direct_buffer`]).
    fn write(&self, offset_bytes: u64, data: Bytes, fua: bool) -> io::Result<()>;
    fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> io::Result<()>;
    /// `may_punch`: false when the client sent NO_HOLE.
    fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        fua: bool,
        may_punch: bool,
    ) -> io::Result<()>;
    /// Every write already acknowledged on any connection is durable before this returns.
    fn flush(&self) -> io::Result<()>;
    /// Whether a change to `[offset, offset+len)` is likely to wait for the disk before it
    /// can be made (the agent's: it overwrites the only copy of an unshipped large write,
    /// which is saved first). The server then runs it off the connection's thread, so the
    /// requests behind it do not queue behind that wait. A hint only; the default is no.
    fn change_waits_on_disk(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        let _ = (offset_bytes, len_bytes);
        false
    }
    /// Allocation status of `[offset, offset+len)`: runs of (length, is_hole). The default says
    /// "all data", which is always correct.
    fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<Vec<(u64, bool)>> {
        let _ = offset_bytes;
        Ok(vec![(len_bytes, false)])
    }
    /// A read-only export is advertised with `NBD_FLAG_READ_ONLY`; the server then answers
    /// WRITE, TRIM and WRITE_ZEROES with EPERM without calling the export.
    fn read_only(&self) -> bool {
        false
    }
    /// Human-readable text for `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
    fn description(&self) -> Option<String> {
        None
    }
}
