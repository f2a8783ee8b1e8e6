//! Tideline core: the parts of continuous data protection that do not care how bytes travel.
//!
//! Everything here is synchronous and does its own file I/O with plain `std::fs`; there is no
//! async runtime, no gRPC and no protobuf. The agent and the collector binaries own the tokio
//! runtime and call in through `spawn_blocking` or dedicated threads. Wire messages are turned
//! into the validated types of [`types`] and [`record`] by the `tideline-proto` crate, once, at
//! the edge.

pub mod aio;
pub mod block;
pub mod direct;
pub mod dirty;
pub mod frame;
pub mod framed;
pub mod memory;
pub mod record;
pub mod spool;
pub mod store;
pub mod types;

pub use types::*;
