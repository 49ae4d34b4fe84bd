use std::{ffi::OsString, future::Future, net::SocketAddr, process::ExitCode};

use clap::Parser;
use tokio::net::TcpListener;

use crate::EXIT_BAD_CONFIG;

/// A service's parsed configuration.
pub trait ServiceConfig: Parser {
    /// Where the gRPC server listens.
    fn listen_addr(&self) -> SocketAddr;
    /// Checks that clap cannot express; every problem, not just the first.
    fn problems(&self) -> Vec<String>;
}

/// Runs a service process: parses `args` (exit 64 with every problem on bad
/// config), sets up logs, traces and metrics ([`mesh_client::telemetry::init`]),
/// binds the listener and runs `run` until SIGTERM
/// or SIGINT, which start a graceful drain.
pub fn service_main<C, F, Fut, E>(
    name: &'static str,
    args: impl IntoIterator<Item = OsString>,
    run: F,
) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let config = match C::try_parse_from(args) {
        Ok(config) => config,
        Err(err) => {
            let code = if err.use_stderr() { EXIT_BAD_CONFIG } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    let problems = config.problems();
    if !problems.is_empty() {
        eprintln!("{name}: invalid configuration:");
        for problem in &problems {
            eprintln!("  - {problem}");
        }
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{name}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = mesh_client::telemetry::init(name);
        let code = run_service(name, config, run).await;
        telemetry.shutdown().await;
        code
    })
}

async fn run_service<C, F, Fut, E>(name: &'static str, config: C, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    {
        let addr = config.listen_addr();
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!(%addr, "cannot listen: {err}");
                return ExitCode::FAILURE;
            }
        };
        match run(config, listener, Box::pin(shutdown_signal())).await {
            Ok(()) => {
                tracing::info!("{name} stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!("{name} failed: {err}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Completes on SIGTERM (what Kubernetes and process managers send) or
/// SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!("cannot watch SIGTERM ({err}); only Ctrl-C stops gracefully");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
