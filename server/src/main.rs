//! The `sluice` command line: `sluice serve [--config FILE]`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sluice::config::Config;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Lands Arrow observability data in PostgreSQL, ClickHouse and Parquet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (Flight on 127.0.0.1:50051, HTTP on 127.0.0.1:8080 by default).
    Serve {
        /// TOML config file; every key can also be set by env SLUICE__SECTION__KEY.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (defaults, file, environment) as TOML.
    Config {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (Command::Serve { config } | Command::Config { config }) = &cli.command;
    let cfg = match Config::load(config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Command::Config { .. } = cli.command {
        print!("{}", toml::to_string_pretty(&cfg).expect("config serializes"));
        return std::process::ExitCode::SUCCESS;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice")
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(sluice::server::run(cfg, |addrs| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "SLUICE_READY grpc={} http={}", addrs.grpc, addrs.http);
        let _ = out.flush();
    }));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
