//! The `ivschat-rooms` binary: parse configuration, start logging, run.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use ivschat_rooms::config::{Cli, Command};
use ivschat_rooms::server;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match cli.into_command() {
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
