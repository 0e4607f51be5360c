//! `cairn`: the command line. Every subcommand is a thin shell over a plain function; errors become
//! one readable line on stderr and a non-zero exit.

mod config;
mod datadir;
mod logcmd;
mod serve;
mod telemetry;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "cairn", version, about = "Cairn: an event-sourced, audit-first FHIR R4 platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole platform in one process (embedded log and store by default).
    Serve(ServeArgs),
    /// Inspect and verify the event log.
    #[command(subcommand)]
    Log(LogCommand),
}

/// Settings every command shares. Precedence: flag, then `CAIRN_*` environment variable, then the
/// TOML file given with `--config`, then the built-in default.
#[derive(Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Data directory holding the event log and everything derived from it [default: ./cairn-data]
    #[arg(long, env = "CAIRN_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Optional TOML settings file (keys: data_dir, listen, public_url, partitions, readiness_max_lag_ms, segment_bytes)
    #[arg(long, env = "CAIRN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "CAIRN_LISTEN")]
    pub listen: Option<String>,
    /// Public base URL clients use to reach this server [default: http://<listen address>]
    #[arg(long, env = "CAIRN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Partitions per topic when a topic is first created [default: 8]
    #[arg(long, env = "CAIRN_PARTITIONS")]
    pub partitions: Option<u32>,
}

#[derive(Subcommand, Debug)]
enum LogCommand {
    /// Print events as JSON lines (one object per record, with its chain position).
    Tail(TailArgs),
    /// Walk every partition's hash chain; exit 0 if intact, non-zero at the first broken link.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Only this topic (default: every topic)
    #[arg(long)]
    pub topic: Option<String>,
    /// Only this partition (default: every partition)
    #[arg(long)]
    pub partition: Option<u32>,
    /// First offset to print in each partition
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Print at most this many records per partition
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print the report as one JSON object instead of text
    #[arg(long)]
    pub json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Log(LogCommand::Tail(args)) => logcmd::tail(args),
        Command::Log(LogCommand::Verify(args)) => logcmd::verify(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes joined, no backtrace.
            let mut line = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line.push_str(": ");
                    line.push_str(&cause);
                }
            }
            eprintln!("cairn: error: {line}");
            ExitCode::from(1)
        }
    }
}
