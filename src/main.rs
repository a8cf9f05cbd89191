//! The `ivschat-rooms` binary: parse configuration, start logging, run.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use ivschat_rooms::config::{Cli, Command, LogFormat};
use ivschat_rooms::server;
use tracing_subscriber::fmt::format::FmtSpan;

#[tokio::main]
async fn main() -> ExitCode {
    let command = Cli::parse().into_command();
    let format = match &command {
        Command::Serve(config) => config.log_format,
        Command::Emulator(_) | Command::Watch(_) => LogFormat::Text,
    };
    init_logging(format);
    let result = match command {
        Command::Serve(config) => server::serve(config).await,
        Command::Emulator(args) => server::run_emulator(args).await,
        Command::Watch(args) => ivschat_rooms::grpc::watch(args, std::io::stdout().lock()).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Spans are logged
/// when they close: that is the access log (`grpc::AccessLogLayer`).
fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_span_events(FmtSpan::CLOSE);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}
