//! The Tideline wire protocol: generated protobuf types, and their conversion to and from the
//! validated core types of `tideline-core`.
//!
//! Generated structs never travel past this crate's callers' edges: a message received from the
//! network is converted here with `TryFrom`, once, and every field is checked (names, block
//! alignment, hash lengths, counts). A failed conversion is a [`WireError`], which servers map
//! to `tonic::Status::invalid_argument`.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
    tonic::include_proto!("tideline.v1");
}

/// Encoded descriptor set of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tideline_fds.bin"));

mod convert;
pub use convert::*;

/// HTTP/2 settings of Tideline's connections, on both ends.
///
/// A stream's data goes out only as far as the receiver's flow-control window, in DATA frames
/// no larger than the receiver allows: so the receiving end sets these, the collector for
/// ingest and replication, a client for restores. With the h2 defaults a client takes 16 KiB
/// frames and 2 MiB in flight per stream; a restore's frames then came in slower than a reader
/// of them could decompress, and in four alternating pairs of cold restores of a 4 GiB image
/// these settings on the client made the restore 0.93× the time and the collector's CPU 0.82×.
pub mod http2 {
    use std::time::Duration;

    /// Bytes a sender may have in flight on one stream.
    pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
    /// Bytes a sender may have in flight on a connection, all streams together.
    pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
    /// Largest DATA frame taken: an 8 MiB batch went out in 512 frames of the default 16 KiB,
    /// each its own `writev` by the sender and `recvfrom` by the receiver.
    pub const MAX_FRAME_BYTES: u32 = 1 << 20;
    /// How long a client waits for a connection.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A client endpoint for `url` with these settings and `TCP_NODELAY` (a small request must
    /// not wait for the ACK of the one before).
    pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES))
    }
}
