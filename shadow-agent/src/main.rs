//! The `shadow-agent` command.
use clap::{Parser, Subcommand};

mod cmd;

/// shadow mirrors live HTTP traffic to shadow deployments from the Linux kernel.
#[derive(Parser)]
#[command(name = "shadow-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture the packets of a port with the kernel program and write them to a pcap file.
    Capture(cmd::capture::Args),
    /// Check a configuration file without touching the kernel; every error names its line.
    CheckConfig(cmd::check_config::Args),
    /// Rebuild the HTTP exchanges in a pcap or pcapng file and print them as JSON lines.
    Inspect(cmd::inspect::Args),
    /// Mirror live traffic to shadow targets, as the configuration file says.
    Run(cmd::run::Args),
    /// Send the exchanges of a pcap file to shadow targets again, paced by their recorded times.
    Replay(cmd::replay::Args),
    /// Show a running agent's routes, targets and capture, from its admin endpoint.
    Status(cmd::status::Args),
    /// Write a running agent's comparison of live and shadow responses as an HTML page or JSON,
    /// or its flagged endpoints' sample requests as `.http` files (`--export`).
    Report(cmd::report::Args),
}

fn main() -> std::process::ExitCode {
    cmd::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Capture(args) => cmd::capture::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::CheckConfig(args) => cmd::check_config::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Replay(args) => cmd::replay::run(args),
        Command::Status(args) => cmd::status::run(args),
        Command::Report(args) => cmd::report::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shadow-agent: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
