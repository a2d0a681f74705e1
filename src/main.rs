//! The `rollout-proxy` command: parses the command line, sets up logging, calls the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rollout_proxy::config::Config;
use rollout_proxy::demo::{self, DemoOptions};
use rollout_proxy::server;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "rollout-proxy",
    version,
    about = "Reverse proxy for version-incompatible rolling deployments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a config file (SIGTERM/SIGINT: graceful stop).
    Run {
        #[arg(long, short, default_value = "config/rollout.yaml")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective configuration.
    Check {
        #[arg(long, short, default_value = "config/rollout.yaml")]
        config: PathBuf,
    },
    /// A self-contained tour: stub v1 and v2 upstreams, the proxy and its admin listener.
    Demo {
        /// Use this config instead of the embedded demo config.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override the proxy's listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override the admin listen address.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { config } => {
            let loaded = Config::load(&config)?;
            println!("# {}: ok; effective configuration:", config.display());
            print!("{}", loaded.effective_yaml());
            Ok(())
        }
        Command::Run { config } => {
            let config = Config::load(&config)?;
            runtime(config.workers)?.block_on(server::run(config))?;
            Ok(())
        }
        Command::Demo { config, listen, admin_listen } => {
            runtime(2)?.block_on(demo::run(DemoOptions { config, listen, admin_listen }))?;
            Ok(())
        }
    }
}

/// A multi-threaded runtime with `workers` threads (0: one per core).
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        builder.worker_threads(workers);
    }
    builder.enable_all().build().context("cannot start the async runtime")
}
