//! The `sluice` command line: `sluice serve [--config FILE]`, `sluice migrate [--config FILE]`,
//! `sluice config [--config FILE]`, `sluice wal check|repair`, `sluice healthcheck [--url URL]`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sluice::config::Config;

/// jemalloc: batch-sized buffers are reused instead of mapped, page-faulted in and
/// unmapped per batch, as glibc's malloc did once its mmap threshold was kept low to bound
/// resident memory (that cost a third of the CPU of Flight ingest into ClickHouse).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A C string pointer jemalloc reads at start.
#[repr(transparent)]
pub struct MallocConf(*const std::ffi::c_char);
// SAFETY: points at a static, immutable string.
unsafe impl Sync for MallocConf {}

/// jemalloc's options (the environment's `_RJEM_MALLOC_CONF` still overrides them). One
/// arena and a small thread cache keep resident memory close to `memory.budget`
/// (tests/e2e/memory.rs); freed pages are not purged as they are freed
/// (`dirty_decay_ms:-1`, no separate arena for large buffers) but when ingest pauses or too
/// many are held, by
/// `sluice::allocator::bound_freed_memory` (past an eighth of `memory.budget`): purging on free made every batch buffer page-fault
/// in again, half of sluice's CPU in `bench/run.sh ch`.
#[cfg(not(target_env = "msvc"))]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: MallocConf = MallocConf(
    c"narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:0,oversize_threshold:0,tcache_max:4096".as_ptr(),
);

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Lands Arrow observability data in PostgreSQL, ClickHouse and Parquet"
)]
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
    /// Apply the migrations to the configured stores (PostgreSQL: migrations/postgres, with
    /// TimescaleDB where the extension exists; ClickHouse: migrations/clickhouse, with the
    /// hot_warm_cold storage policy where the server has it) and exit.
    Migrate {
        /// TOML config file; every key can also be set by env SLUICE__SECTION__KEY.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (defaults, file, environment) as TOML.
    Config {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Ask a running server whether it is alive (for container health checks): exit 0
    /// when GET `url` answers 200, 1 otherwise, with the reason on stderr.
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
        /// Give up after this long, e.g. "3s".
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Check or repair the write-ahead log in `server.data_dir` (the server must be stopped).
    Wal {
        #[command(subcommand)]
        action: WalCommand,
    },
}

#[derive(Subcommand)]
enum WalCommand {
    /// Read every segment back and report damage, missing segments and a missing ID, with
    /// the records each costs. Exit status 1 when there is something to repair.
    Check {
        /// TOML config file; every key can also be set by env SLUICE__SECTION__KEY.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Keep every intact record once, move damaged bytes to wal/damaged/, record the
    /// sequence numbers that are gone in wal/LOST, so that the server starts again.
    Repair {
        /// TOML config file; every key can also be set by env SLUICE__SECTION__KEY.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Give the WAL a new id where the old one cannot be recovered (no ID file, no
        /// segment header with it). Records still in the WAL may then be written to
        /// PostgreSQL/ClickHouse a second time.
        #[arg(long)]
        new_id: bool,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Command::Healthcheck { url, timeout } = &cli.command {
        return healthcheck(url, *timeout);
    }
    let config = match &cli.command {
        Command::Serve { config }
        | Command::Migrate { config }
        | Command::Config { config }
        | Command::Wal {
            action: WalCommand::Check { config } | WalCommand::Repair { config, .. },
        } => config,
        Command::Healthcheck { .. } => unreachable!("answered above"),
    };
    let cfg = match Config::load(config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Command::Config { .. } = cli.command {
        print!(
            "{}",
            toml::to_string_pretty(&cfg).expect("config serializes")
        );
        return std::process::ExitCode::SUCCESS;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sluice")
        .build()
        .expect("tokio runtime");
    if let Command::Wal { action } = &cli.command {
        return match rt.block_on(wal_command(&cfg, action)) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("sluice: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Command::Migrate { .. } = cli.command {
        return match rt.block_on(migrate(&cfg)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
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

/// `sluice healthcheck`: GET `url` once; exit 0 on 200.
fn healthcheck(url: &str, timeout: std::time::Duration) -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let answer = rt.block_on(async {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        client.get(url).send().await
    });
    match answer {
        Ok(r) if r.status() == reqwest::StatusCode::OK => std::process::ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("sluice healthcheck: {url} answered {}", r.status());
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sluice healthcheck: {url}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Why a command other than `serve` failed (printed as `sluice: <message>`).
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Server(#[from] sluice::error::Error),
    #[error(transparent)]
    Wal(#[from] sluice_wal::WalError),
    #[error(transparent)]
    Archive(#[from] sluice_sinks::SinkError),
    #[error("{} does not exist: there is no WAL to look at", .0.display())]
    NoWal(std::path::PathBuf),
    #[error(
        "nothing to migrate: set postgres.url / SLUICE__POSTGRES__URL or clickhouse.url / \
         SLUICE__CLICKHOUSE__URL"
    )]
    NothingToMigrate,
    /// A store's migration failed.
    #[error("{store}: {source}")]
    Store {
        store: &'static str,
        #[source]
        source: sluice_sinks::SinkError,
    },
    #[error("clickhouse: {0}")]
    ClickHouseClient(#[source] sluice_sinks::clickhouse::client::ChError),
    #[error("cannot connect to PostgreSQL at postgres.url: {0}")]
    PgConnect(#[source] sluice_sinks::postgres::ConnectError),
}

/// `sluice wal check|repair`.
async fn wal_command(
    cfg: &Config,
    action: &WalCommand,
) -> Result<std::process::ExitCode, CliError> {
    use sluice_wal::scan;
    let data_dir = &cfg.server.data_dir;
    let _lock = sluice::server::DataDirLock::acquire(data_dir, "wal")?;
    let dir = data_dir.join("wal");
    if !dir.is_dir() {
        return Err(CliError::NoWal(dir));
    }
    match action {
        WalCommand::Check { .. } => {
            let scan = scan::scan_dir(&dir)?;
            let records: usize = scan.segments.iter().map(|s| s.records.len()).sum();
            let first = scan.segments.iter().find_map(|s| s.first_seq());
            println!(
                "{}: {} segments, {records} intact records{}{}",
                dir.display(),
                scan.segments.len(),
                match (first, scan.last_record_seq()) {
                    (Some(a), Some(b)) => format!(" ({a}..={b})"),
                    _ => String::new(),
                },
                scan.released
                    .map(|r| format!("; records up to {r} were released"))
                    .unwrap_or_default(),
            );
            for l in &scan.lost {
                println!(
                    "accepted by an earlier repair: records {}..={} ({})",
                    l.from, l.to, l.reason
                );
            }
            let problems = scan.problems();
            if problems.is_empty() {
                println!("no damage");
                return Ok(std::process::ExitCode::SUCCESS);
            }
            for p in &problems {
                println!("damage: {p}");
            }
            println!("run `sluice wal repair` to keep every intact record and start again");
            Ok(std::process::ExitCode::from(1))
        }
        WalCommand::Repair { new_id, .. } => {
            let (store, _) = sluice_sinks::archive::open_store(&cfg.archive, data_dir)?;
            let floor = sluice::server::wal_floor(cfg, store.as_ref(), &dir).await?;
            let report = scan::repair(&dir, *new_id, floor)?;
            print!("{report}");
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

/// `sluice migrate`: applies the migrations of every configured store and prints, per
/// store, what was applied and which path the database is on.
async fn migrate(cfg: &Config) -> Result<(), CliError> {
    if cfg.postgres.url.is_none() && cfg.clickhouse.url.is_none() {
        return Err(CliError::NothingToMigrate);
    }
    if let Some(url) = &cfg.postgres.url {
        migrate_postgres(cfg, url).await?;
    }
    if cfg.clickhouse.url.is_some() {
        let store = |source| CliError::Store {
            store: "clickhouse",
            source,
        };
        let client = sluice_sinks::clickhouse::client::ChClient::new(&cfg.clickhouse)
            .map_err(CliError::ClickHouseClient)?;
        let report = sluice_sinks::clickhouse::migrate::migrate(&client)
            .await
            .map_err(store)?;
        println!("clickhouse: {report}");
        let window = cfg.clickhouse.dedup_window;
        for table in sluice_sinks::clickhouse::migrate::set_dedup_window(&client, window)
            .await
            .map_err(store)?
        {
            println!("clickhouse: {table}: non_replicated_deduplication_window set to {window} (clickhouse.dedup_window)");
        }
    }
    Ok(())
}

async fn migrate_postgres(cfg: &Config, url: &str) -> Result<(), CliError> {
    use sluice_sinks::postgres::{maintenance, migrate};
    let store = |source| CliError::Store {
        store: "postgres",
        source,
    };
    let mut client = sluice_sinks::postgres::connect(url)
        .await
        .map_err(CliError::PgConnect)?;
    let report = migrate::migrate_with(&mut client, cfg.postgres.timescaledb)
        .await
        .map_err(store)?;
    if !report.timescaledb {
        // Partitions from today on, so rows can land right away.
        maintenance::run_once(&client, &cfg.postgres, chrono::Utc::now())
            .await
            .map_err(store)?;
    }
    println!("postgres: {report}");
    Ok(())
}
