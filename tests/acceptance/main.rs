//! Acceptance tests: the real `tideline-agent`, `tideline-collector` and `tideline`
//! binaries driven by real NBD clients (qemu-io, qemu-img, nbdcopy, nbdinfo) and real gRPC
//! clients. One test binary; one module per topic; shared machinery in [`harness`].
//!
//! Tests that need a tool which is not installed skip loudly, and fail under `CI=true`.

#![allow(clippy::unwrap_used)]

mod harness;
mod kernel;

mod bad_input;
mod cli;
mod crash;
mod moments;
mod multi_conn;
mod postgres;
mod replication;
mod space;
mod window;
