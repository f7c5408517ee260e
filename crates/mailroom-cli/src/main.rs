//! The `mailroom` command.

mod bench;

use clap::{Parser, Subcommand};

/// Mailroom: an AMQP 0-9-1 broker.
#[derive(Parser)]
#[command(name = "mailroom", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive an AMQP 0-9-1 broker (or the built-in sink/source) and report rates and latency.
    Bench(bench::BenchArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Bench(args) => bench::run(args).await,
    };
    if let Err(e) = result {
        eprintln!("mailroom: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
