use std::process::ExitCode;

use clap::Parser;
use tideline_agent::config::AgentArgs;

#[tokio::main]
async fn main() -> ExitCode {
    tideline_core::memory::bound_malloc_arenas();
    match agent().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            if e.downcast_ref::<tideline_agent::Fenced>().is_some() {
                ExitCode::from(tideline_agent::EXIT_FENCED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn agent() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let config = AgentArgs::parse().resolve()?;
    let listeners = tideline_agent::Listeners::bind(&config).await?;
    tideline_agent::run(config, listeners, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
