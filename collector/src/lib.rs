//! Tideline collector: receives journals from agents, stores them durably, serves restores, and
//! replicates to (or receives replication from) the collector of a second site.
//!
//! The storage engine is the synchronous [`tideline_core::store::Store`]; this crate is its
//! network face. Store calls that read or write files, or replay a journal, run on tokio's
//! blocking pool. In-memory lookups (a group's durable seq, its points, the stats) run inline:
//! they take the store's state lock for reading, which a commit takes for writing only to apply
//! an entry that is already on disk, never across I/O. Wire messages are converted
//! into core types by `tideline-proto` as they arrive; anything that does not convert is
//! refused with `INVALID_ARGUMENT` and nothing from it is stored.

pub mod catalog;
pub mod config;
pub mod ingest;
pub mod live;
pub mod replication;
pub mod replicator;
mod stream;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;

use config::CollectorConfig;
use live::Live;
use tideline_core::store::{Store, StoreConfig};
use tideline_proto::{http2, v1};

/// Largest gRPC message accepted or sent (a 32 MiB client write plus framing fits).
pub const MAX_MESSAGE_BYTES: usize = 96 << 20;

/// How long a shutdown waits for open streams to end. Agents stream for as long as they run,
/// so without a bound a collector with a connected agent would never stop.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Completes `SHUTDOWN_GRACE` after `stopping` turns true.
async fn grace_expired(mut stopping: tokio::sync::watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        return std::future::pending().await;
    }
    tokio::time::sleep(SHUTDOWN_GRACE).await;
}

/// Opens the store and serves the Ingest, Catalog and Replication services on `listener` until
/// `shutdown`; with `replicate_to`, also replicates every group this site is primary for.
pub async fn run(
    config: CollectorConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let store_config = StoreConfig::new(&config.data_dir);
    let store = tokio::task::spawn_blocking(move || Store::open(store_config))
        .await?
        .with_context(|| format!("open store in {}", config.data_dir.display()))?;
    let store = Arc::new(store);
    let live = Arc::new(Live::from_store(&store));
    let ingest = ingest::IngestService::new(store.clone(), live.clone());
    let catalog = catalog::CatalogService::new(
        store.clone(),
        live.clone(),
        config.site.clone(),
        config.replicate_to.clone(),
    );
    let replication =
        replication::ReplicationService::new(store.clone(), live.clone(), config.site.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping = stop_rx.clone();
    let replicator = config.replicate_to.clone().map(|peer_url| {
        tokio::spawn(replicator::run(
            store.clone(),
            live.clone(),
            replicator::ReplicatorConfig {
                site: config.site.clone(),
                peer_url,
            },
            stop_rx,
        ))
    });
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<v1::ingest_server::IngestServer<ingest::IngestService>>()
        .await;
    health_reporter
        .set_serving::<v1::catalog_server::CatalogServer<catalog::CatalogService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tideline_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("build reflection service")?;
    let addr = listener.local_addr()?;
    // Accepted sockets need TCP_NODELAY themselves (the builder's setting covers only sockets
    // tonic accepts on its own): without it a small reply (a have-query answer) waits for the
    // ACK of the previous one, which the peer delays by up to 40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(%addr, site = %config.site, data_dir = %config.data_dir.display(), "collector serving");
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(http2::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(http2::CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(http2::MAX_FRAME_BYTES))
        .add_service(health)
        .add_service(reflection)
        .add_service(
            v1::ingest_server::IngestServer::new(ingest)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            v1::replication_server::ReplicationServer::new(replication)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            v1::catalog_server::CatalogServer::new(catalog)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::select! {
        served = serve => served.context("serve gRPC")?,
        () = grace_expired(stopping) => tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "streams still open at shutdown (agents, restores); closing them: everything acknowledged is durable"
        ),
    }
    if let Some(replicator) = replicator {
        let _ = replicator.await;
    }
    tracing::info!("collector stopped");
    Ok(())
}
