//! The `rollout-proxy` command: parses the command line, sets up logging, calls the library.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use rollout_proxy::config::Config;
use rollout_proxy::ctl::{self, CtlCommand, CtlOptions, RampCommand};
use rollout_proxy::demo::{self, DemoOptions};
use rollout_proxy::server;

#[derive(Parser)]
#[command(
    name = "rollout-proxy",
    version,
    about = "Reverse proxy for version-incompatible rolling deployments"
)]
struct Cli {
    /// How log lines on stderr are written.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: rollout_proxy::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a config file (SIGTERM/SIGINT: graceful stop).
    Run {
        #[arg(long, short, default_value = "config/rollout.yaml")]
        config: PathBuf,
        /// Hitless restart: take the listening sockets and the state over from the process
        /// running on the same state_dir, which then drains and exits.
        #[arg(long)]
        takeover: bool,
        /// How long requests wait for the old process to hand over the state; make it longer
        /// than shutdown.grace_period, which bounds the old process's drain.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        takeover_timeout: Duration,
    },
    /// Validate a config file as `run` would, short of binding, and print the effective
    /// configuration.
    Check {
        #[arg(long, short, default_value = "config/rollout.yaml")]
        config: PathBuf,
        /// Check the file alone, not the token, certificate and CA files it names (for a config
        /// checked away from the machine that runs it).
        #[arg(long)]
        file_only: bool,
    },
    /// The operator's client for the admin API.
    Ctl {
        /// Admin API base URL, http:// or https:// [default: from --config, else
        /// http://127.0.0.1:9901]
        #[arg(long, global = true, env = "ROLLOUT_ADMIN_URL")]
        admin: Option<String>,
        /// File holding the admin token (default: from --config, else the ROLLOUT_ADMIN_TOKEN
        /// environment variable).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        /// The proxy's config file: its admin.listen and admin.token_file, unless given.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// Also trust this CA (PEM) for an https:// admin URL.
        #[arg(long, global = true)]
        ca_file: Option<PathBuf>,
        /// Print the server's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        /// Only change if the current revision is this one (see `status`).
        #[arg(long, global = true)]
        if_match: Option<u64>,
        #[command(subcommand)]
        command: CtlCmd,
    },
    /// Print a shell completion script: `rollout-proxy completions bash > /etc/bash_completion.d/rollout-proxy`.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff): `rollout-proxy man | man -l -`.
    Man,
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

#[derive(Subcommand)]
enum CtlCmd {
    /// Pools, upstreams, weights and where each value comes from, pins, drain.
    Status {
        /// Show it again every `--interval`, redrawn in place on a terminal.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value = "2s", value_parser = positive_duration)]
        interval: Duration,
    },
    /// The drain signal; exit 0 when drained, 3 when not.
    Drain {
        /// Wait until drained (or the timeout passes), showing progress.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(long, default_value = "5s", value_parser = positive_duration)]
        interval: Duration,
    },
    /// Set the share of new legacy sessions sent to v1 (0-100).
    LegacyPercent {
        percent: f64,
        /// Set it even while a ramp runs (the ramp pauses).
        #[arg(long)]
        force: bool,
    },
    /// Set an upstream's weight: `weight v1/was-1 0`.
    Weight { target: String, weight: u32 },
    /// List live session pins, in key order, a page at a time.
    Sessions {
        #[arg(long)]
        pool: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this key (the `next` a page printed).
        #[arg(long)]
        after: Option<String>,
    },
    /// One session's pin: pool, first and last request, when and why it ends.
    Session { key: String },
    /// End one session pin; its next request makes a new one.
    EndSession { key: String },
    /// Re-read the config file on the server.
    Reload,
    /// Drop every admin override: the config file's values apply again.
    ResetOverrides,
    /// The automated ramp: start one from a plan file, see it, steer it.
    Ramp {
        #[command(subcommand)]
        command: RampCmd,
    },
}

#[derive(Subcommand)]
enum RampCmd {
    /// Start a ramp from a plan file (YAML or JSON: the plan, or a config file with `ramp:`).
    Start { file: PathBuf },
    /// The ramp's state, step, hold left and last analysis; `--watch` follows it until it
    /// completes (exit 0) or aborts (exit 4).
    Status {
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value = "10s", value_parser = positive_duration)]
        interval: Duration,
    },
    /// Hold the current step until resumed.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Send every new session to v1 again; every pin stays where it is.
    Abort,
    /// Go to the next step now.
    Promote,
    /// After an abort: the aborted step again, from the start of its hold.
    Retry,
}

/// Per-connection buffers and futures are kilobytes each: glibc's allocator serves those from its
/// shared bins (consolidating them as it goes), mimalloc from a per-thread free list.
#[cfg(target_os = "linux")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    rollout_proxy::logging::install(cli.log_format, std::io::stderr().is_terminal());
    match execute(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(0),
    }
}

/// A duration longer than zero (a zero polling interval would spin).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be longer than 0s".to_owned()),
        Ok(duration) => Ok(duration),
        Err(err) => Err(err.to_string()),
    }
}

fn execute(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Check { config, file_only } => {
            let loaded = Config::load(&config)?;
            if !file_only {
                server::preflight(&loaded)?;
            }
            let mut out = std::io::stdout().lock();
            let printed = writeln!(out, "# {}: ok; effective configuration:", config.display())
                .and_then(|()| write!(out, "{}", loaded.effective_yaml()))
                .and_then(|()| out.flush());
            match printed {
                // `check ... | head` is a normal way to read it; the verdict is the exit code.
                Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
                _ => Ok(0),
            }
        }
        Command::Run { config, takeover, takeover_timeout } => {
            let config = Config::load(&config)?;
            runtime(config.workers)?.block_on(server::run(config, takeover.then_some(takeover_timeout)))?;
            Ok(0)
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "rollout-proxy", &mut script);
            print_all(&script)
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            print_all(&page)
        }
        Command::Demo { config, listen, admin_listen } => {
            runtime(2)?.block_on(demo::run(DemoOptions { config, listen, admin_listen }))?;
            Ok(0)
        }
        Command::Ctl { admin, token_file, config, ca_file, json, if_match, command } => {
            let options = CtlOptions { admin, token_file, config, ca_file, json, if_match };
            let command = match command {
                CtlCmd::Status { watch, interval } => CtlCommand::Status { watch: watch.then_some(interval) },
                CtlCmd::Drain { wait, timeout, interval } => CtlCommand::Drain { wait, timeout, interval },
                CtlCmd::LegacyPercent { percent, force } => CtlCommand::LegacyPercent { percent, force },
                CtlCmd::Weight { target, weight } => CtlCommand::Weight { target, weight },
                CtlCmd::Sessions { pool, limit, after } => CtlCommand::Sessions { pool, limit, after },
                CtlCmd::Session { key } => CtlCommand::Session(key),
                CtlCmd::EndSession { key } => CtlCommand::EndSession(key),
                CtlCmd::Reload => CtlCommand::Reload,
                CtlCmd::ResetOverrides => CtlCommand::ResetOverrides,
                CtlCmd::Ramp { command } => match command {
                    RampCmd::Start { file } => CtlCommand::RampStart(file),
                    RampCmd::Status { watch, interval } => CtlCommand::RampStatus { watch, interval },
                    RampCmd::Pause => CtlCommand::Ramp(RampCommand::Pause),
                    RampCmd::Resume => CtlCommand::Ramp(RampCommand::Resume),
                    RampCmd::Abort => CtlCommand::Ramp(RampCommand::Abort),
                    RampCmd::Promote => CtlCommand::Ramp(RampCommand::Promote),
                    RampCmd::Retry => CtlCommand::Ramp(RampCommand::Retry),
                },
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Ok(runtime.block_on(ctl::run(&options, command))?)
        }
    }
}

/// A runtime with `workers` threads (0: one per core). One worker runs everything on the main
/// thread (tokio's current-thread scheduler): no work-stealing queues to synchronise and no
/// cross-thread wake-ups, which is the cheapest way to serve from a single core.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            builder.worker_threads(workers);
        }
        builder
    };
    builder.enable_all().build().context("cannot start the async runtime")
}
