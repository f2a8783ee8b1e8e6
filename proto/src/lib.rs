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
