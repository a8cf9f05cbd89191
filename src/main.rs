//! The `ivschat-rooms` binary: parse configuration, start telemetry, run.

use std::process::ExitCode;

use clap::Parser as _;
use ivschat_rooms::config::{Cli, Command, LogFormat};
use ivschat_rooms::{server, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let command = Cli::parse().into_command();
    let format = match &command {
        Command::Serve(config) => config.log_format,
        Command::Emulator(_) | Command::Watch(_) => LogFormat::Text,
    };
    // The log, and traces when OTEL_EXPORTER_OTLP_* ask for them.
    let telemetry = match telemetry::init(format) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        Command::Serve(config) => server::serve(config).await,
        Command::Emulator(args) => server::run_emulator(args).await,
        Command::Watch(args) => ivschat_rooms::grpc::watch(args, std::io::stdout().lock()).await,
    };
    // The last spans, exported before the process ends.
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
