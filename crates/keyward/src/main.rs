//! The `keyward` binary: `serve` the API, and manage keys straight on the database like an ops script
//! (`migrate`, `seed`, `orgs`, `keys`, `import`, `audit`, `usage`, `config`).

/// A faster allocator than glibc's under many small, cross-thread allocations (the request path's
/// pattern), where glibc's arenas contend on their locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod commands;
mod config;
mod log_fields;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, LogFormat, Overrides};

#[derive(Debug, Parser)]
#[command(name = "keyward", version, about = "Self-hosted API keys: issue, verify, limit, audit.")]
struct Cli {
    /// Config file (default: ./keyward.toml when present).
    #[arg(long, global = true, env = "KEYWARD_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL: sqlite://keyward.db or postgres://user@host/db (env KEYWARD_DATABASE_URL).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Redis for limits and cache invalidations shared by every node: redis://host:6379 (env
    /// KEYWARD_REDIS_URL; default: none, limits in memory).
    #[arg(long, global = true)]
    redis_url: Option<String>,
    /// Log lines as `pretty` text or `json` (env KEYWARD_LOG_FORMAT; default pretty); filter with RUST_LOG.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (migrates the database and seeds an empty one first).
    Serve {
        /// Address to listen on (env KEYWARD_LISTEN; default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Gateway mode: verify every request and proxy it to this http:// URL.
        #[arg(long)]
        upstream: Option<String>,
        /// The gateway's listener (default 127.0.0.1:8000).
        #[arg(long)]
        gateway_listen: Option<std::net::SocketAddr>,
        /// Serve Envoy's ext_authz over gRPC (and grpc.health.v1) on this address (env
        /// KEYWARD_AUTHZ__GRPC_LISTEN; default: not served).
        #[arg(long)]
        ext_authz_grpc_listen: Option<std::net::SocketAddr>,
    },
    /// Apply, revert or list database migrations.
    Migrate {
        #[command(subcommand)]
        action: commands::migrate::MigrateAction,
    },
    /// Create organization `default` and an admin key on an empty database.
    Seed(JsonFlag),
    /// Manage organizations.
    Orgs {
        #[command(subcommand)]
        action: commands::orgs::OrgsAction,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: commands::keys::KeysAction,
    },
    /// Import keys another system issued (JSON Lines or CSV), so they keep working.
    Import(commands::import::ImportArgs),
    /// A key's usage: daily table, a small chart, totals and top endpoints (from daily rollups).
    Usage {
        /// The key's id.
        key_id: String,
        /// Days ending today (UTC), 1 to 366.
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[arg(long)]
        json: bool,
    },
    /// Read the audit log.
    Audit {
        #[command(subcommand)]
        action: commands::audit::AuditAction,
    },
    /// Show the effective configuration (secrets redacted).
    Config {
        #[command(subcommand)]
        action: commands::config::ConfigAction,
    },
}

#[derive(Debug, Args)]
struct JsonFlag {
    /// One JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut overrides = Overrides::default()
        .set("database_url", cli.database_url.as_ref())
        .set("redis_url", cli.redis_url.as_ref())
        .set("log_format", cli.log_format);
    if let Command::Serve { listen, upstream, gateway_listen, ext_authz_grpc_listen } = &cli.command {
        overrides = overrides
            .set("listen", *listen)
            .set("gateway.upstream", upstream.as_ref())
            .set("gateway.listen", *gateway_listen)
            .set("authz.grpc_listen", *ext_authz_grpc_listen);
    }
    let config = match Config::load(cli.config.as_deref(), overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format, matches!(cli.command, Command::Serve { .. }));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Silent>() {
            Some(Silent(code)) => ExitCode::from(*code),
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// A failure already reported on stdout (`keyward audit verify` finding a broken chain): exit with this
/// code and print nothing more.
#[derive(Debug)]
pub(crate) struct Silent(pub u8);

impl std::fmt::Display for Silent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Silent {}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve { .. } => commands::serve::run(config).await,
        Command::Migrate { action } => commands::migrate::run(config, action).await,
        Command::Seed(flag) => commands::seed::run(config, flag.json).await,
        Command::Orgs { action } => commands::orgs::run(config, action).await,
        Command::Keys { action } => commands::keys::run(config, action).await,
        Command::Import(args) => commands::import::run(config, args).await,
        Command::Audit { action } => commands::audit::run(config, action).await,
        Command::Usage { key_id, days, json } => commands::usage::run(config, &key_id, days, json).await,
        Command::Config { action } => {
            commands::config::run(&config, action);
            Ok(())
        }
    }
}

/// Logs go to stderr (stdout is for command output); `RUST_LOG` filters, `KEYWARD_LOG_FORMAT` picks
/// json or pretty. CLI commands log warnings only unless `RUST_LOG` says otherwise.
fn init_tracing(format: LogFormat, serving: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if serving { "info,sqlx=warn" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only for a terminal: a log file or collector gets no escape codes (and each request's
    // span is formatted without them).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.fmt_fields(log_fields::PlainFields::default()).init(),
    }
}
