//! The `mailroom` command: runs the broker (`mailroom server`), talks to its HTTP API (`mailroom admin`),
//! drives the load generator (`mailroom bench`), operates sagas in their store (`mailroom saga`) and prints
//! shell completions (`mailroom completions`).

mod access_args;
mod admin;
mod bench;
mod config;
mod logging;
mod memory_trim;
mod saga;
mod table;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use mailroom_amqp::{AmqpServer, ServerConfig};
use mailroom_broker::{AlarmConfig, Broker, BrokerConfig, PagingConfig};
use mailroom_http::HttpServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Longest a clean stop waits for the stores' last fsyncs: a disk that stopped answering must not hang the exit.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Mailroom: a message broker that speaks AMQP 0-9-1.
#[derive(Parser)]
#[command(name = "mailroom", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Server(Box<ServerArgs>),
    /// Operate a running broker through its HTTP API: list, declare, delete, publish, get, peek, purge,
    /// redrive, definitions, policies, close connections; users, permissions, vhosts and limits.
    Admin(admin::AdminArgs),
    /// Drive an AMQP 0-9-1 broker (or the built-in sink/source) and report rates and latency.
    Bench(bench::BenchArgs),
    /// Operate sagas in their store: list, show, history, retry or abandon a stuck one.
    Saga(saga::SagaArgs),
    /// Print a shell completion script: `mailroom completions bash > /etc/bash_completion.d/mailroom`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Flags of `mailroom server`; each also reads a `MAILROOM_*` environment variable and is a key of the
/// `--config` file (see [`config`]).
#[derive(Args)]
struct ServerArgs {
    /// A TOML file of settings, keyed by these flags' names (`data-dir = "/var/lib/mailroom"`); flags and
    /// environment variables override it.
    #[arg(long, env = "MAILROOM_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration (as a config file, each value's source in a comment) and exit.
    #[arg(long)]
    print_config: bool,
    /// AMQP listen addresses (repeat or comma-separate); port 0 picks a free port.
    #[arg(long, env = "MAILROOM_AMQP_LISTEN", value_delimiter = ',', default_values_t = [
        "0.0.0.0:5672".parse::<SocketAddr>().expect("valid literal"),
        "[::]:5672".parse::<SocketAddr>().expect("valid literal"),
    ])]
    amqp_listen: Vec<SocketAddr>,
    /// HTTP API listen address (admin API; port 0 picks a free port).
    #[arg(long, env = "MAILROOM_HTTP_LISTEN", default_value = "127.0.0.1:15672")]
    http_listen: SocketAddr,
    /// HTTPS listen address for the same API and UI (e.g. 0.0.0.0:15671; needs --tls-cert and --tls-key,
    /// shared with AMQPS and reloaded on SIGHUP).
    #[arg(long, env = "MAILROOM_HTTPS_LISTEN")]
    https_listen: Option<SocketAddr>,
    /// Host names (comma-separated, `name` or `name:port`) a loopback-only HTTP listener answers besides
    /// localhost, 127.0.0.1 and [::1]: the names a local proxy forwards under (no DNS rebinding).
    #[arg(long, env = "MAILROOM_HTTP_ALLOWED_HOSTS", value_delimiter = ',')]
    http_allowed_hosts: Vec<String>,
    /// Prometheus listen address (`/metrics`, `/metrics/per-object`, as RabbitMQ's rabbitmq_prometheus;
    /// port 0 picks a free port; `off` disables it).
    #[arg(long, env = "MAILROOM_PROMETHEUS_LISTEN", default_value = "0.0.0.0:15692")]
    prometheus_listen: String,
    /// Where durable data lives.
    #[arg(long, env = "MAILROOM_DATA_DIR", default_value = "./mailroom-data")]
    data_dir: PathBuf,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, env = "MAILROOM_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log line format: `text` (coloured only on a terminal) or `json` (one object per line).
    #[arg(long, env = "MAILROOM_LOG_FORMAT", value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    /// `product` reported to clients; "RabbitMQ" makes kombu/celery use RabbitMQ's basic.qos semantics,
    /// which Mailroom implements.
    #[arg(long, env = "MAILROOM_PRODUCT_NAME", default_value = "RabbitMQ")]
    product_name: String,
    /// Heartbeat interval offered to clients, in seconds (0 disables).
    #[arg(long, env = "MAILROOM_HEARTBEAT", default_value_t = mailroom_amqp::server::DEFAULT_HEARTBEAT_SECS)]
    heartbeat: u16,
    /// Largest frame offered to clients.
    #[arg(long, env = "MAILROOM_FRAME_MAX", default_value_t = mailroom_amqp::server::DEFAULT_FRAME_MAX)]
    frame_max: u32,
    /// Largest message body accepted, in bytes.
    #[arg(long, env = "MAILROOM_MAX_MESSAGE_SIZE", default_value_t = mailroom_amqp::server::DEFAULT_MAX_MESSAGE_SIZE)]
    max_message_size: u32,
    /// Unacked deliveries older than this close their channel (ms; 0 = never). RabbitMQ's consumer_timeout.
    #[arg(long, env = "MAILROOM_CONSUMER_TIMEOUT_MS", default_value_t = 30 * 60 * 1000)]
    consumer_timeout_ms: u64,
    /// Body bytes of deliveries a connection may hold before its socket takes them (0 = unbounded): a
    /// consumer without a prefetch limit gets no more than this ahead of its socket.
    #[arg(long, env = "MAILROOM_MAX_OUTBOUND_BYTES", default_value_t = mailroom_amqp::DEFAULT_OUTBOUND_BOUND)]
    max_outbound_bytes: u64,
    /// A socket write making no progress for this long closes the connection (ms; 0 = never). NATS's
    /// write_deadline.
    #[arg(long, env = "MAILROOM_WRITE_DEADLINE_MS",
          default_value_t = mailroom_amqp::DEFAULT_WRITE_DEADLINE.as_millis() as u64)]
    write_deadline_ms: u64,
    /// Threads that run connections and queues (default: one per CPU core). Where clients share the
    /// broker's cores, fewer threads spend less CPU per message: fewer cross-thread wake-ups (BENCHMARKS.md).
    #[arg(long, env = "MAILROOM_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    /// Block publishers while queues hold more message bytes than this (ready and unacked; 0 = never).
    /// Default: 40% of physical memory, RabbitMQ's vm_memory_high_watermark.
    #[arg(long, env = "MAILROOM_MEMORY_HIGH_WATERMARK")]
    memory_high_watermark: Option<u64>,
    /// Block publishers while free disk space under the data dir is below this many bytes (0 = never).
    /// RabbitMQ's disk_free_limit default, 50 MB.
    #[arg(long, env = "MAILROOM_DISK_FREE_LIMIT", default_value_t = 50_000_000)]
    disk_free_limit: u64,
    /// Group commit: longest a store fsync round waits for more publishers to join it, in microseconds
    /// (0 = fsync as soon as anything is written). Confirms of persistent messages wait for their round.
    #[arg(long, env = "MAILROOM_GROUP_COMMIT_MAX_WAIT_US",
          default_value_t = mailroom_broker::store::syncer::DEFAULT_MAX_WAIT.as_micros() as u64)]
    group_commit_max_wait_us: u64,
    /// RAM each queue may spend on ready messages' bodies (bytes, plus 256 per message); past it bodies
    /// are paged to disk (persistent ones stay in the queue's store, the rest go to `<data dir>/paging`).
    #[arg(long, env = "MAILROOM_QUEUE_MEMORY_BYTES", default_value_t = mailroom_broker::paging::DEFAULT_QUEUE_MEMORY_BYTES)]
    queue_memory_bytes: u64,
    /// File descriptors kept back for queue stores: connections that would leave fewer are refused at
    /// once. Default: an eighth of the limit, between 32 and 1024.
    #[arg(long, env = "MAILROOM_FD_RESERVE")]
    fd_reserve: Option<u64>,
    /// A definitions file in RabbitMQ's JSON format (`rabbitmqctl export_definitions`) imported at start,
    /// before clients connect (RabbitMQ's `load_definitions`): existing queues, exchanges and bindings are
    /// kept, policies overwritten. A file that cannot be imported stops the start.
    #[arg(long, env = "MAILROOM_LOAD_DEFINITIONS")]
    load_definitions: Option<PathBuf>,
    /// Users, loopback rule, AMQPS and TLS.
    #[command(flatten)]
    access: access_args::AccessArgs,
}

/// 40% of physical memory (RabbitMQ's default watermark), or None if it cannot be read.
fn default_memory_watermark() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024 * 4 / 10)
}

/// Parses the command line, with the `--config` file's settings under the flags and environment
/// variables; `--print-config` prints the result and exits.
fn parse_cli() -> Result<Cli, clap::Error> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = Cli::command();
    let before = command.clone().try_get_matches_from(&args)?;
    let args = config::apply_config_file(&command, &before, args)
        .map_err(|e| Cli::command().error(clap::error::ErrorKind::InvalidValue, e))?;
    let after = command.clone().try_get_matches_from(&args)?;
    if let Some(("server", server)) = after.subcommand() {
        if server.get_flag("print_config") {
            print!("{}", config::print_config(&command, &before, &after));
            std::process::exit(0);
        }
    }
    Cli::from_arg_matches(&after)
}

fn main() -> ExitCode {
    let cli = parse_cli().unwrap_or_else(|e| e.exit());
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Server(args) = &cli.command {
        if let Some(threads) = args.worker_threads {
            runtime.worker_threads(threads.into());
        }
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailroom: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Server(args) => run_server(*args).await,
            Command::Bench(args) => bench::run(args).await.map_err(Into::into),
            Command::Admin(args) => admin::run(args).await,
            Command::Saga(args) => saga::run(args).await,
            Command::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "mailroom", &mut std::io::stdout());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailroom: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_server(args: ServerArgs) -> Result<(), Box<dyn std::error::Error>> {
    logging::init(&args.log_level, args.log_format)?;
    match mailroom_amqp::fds::raise_nofile_limit() {
        Ok(limit) => tracing::info!(limit, "file descriptor limit (RLIMIT_NOFILE raised to its hard limit)"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(worker_threads, "runtime started");
    memory_trim::spawn();
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", args.data_dir.display()))?;
    let memory_high_watermark = match args.memory_high_watermark {
        Some(0) => None,
        Some(limit) => Some(limit),
        None => default_memory_watermark(),
    };
    let disk_free_limit = (args.disk_free_limit > 0).then(|| (args.data_dir.clone(), args.disk_free_limit));
    mailroom_http::metrics::set_node_limits(mailroom_http::metrics::NodeLimits {
        memory_high_watermark,
        data_dir: Some(args.data_dir.clone()),
        disk_free_limit: disk_free_limit.as_ref().map(|(_, limit)| *limit),
    });
    let broker = Broker::open(BrokerConfig {
        alarms: AlarmConfig { memory_high_watermark, disk_free_limit },
        data_dir: Some(args.data_dir.clone()),
        syncer: mailroom_broker::store::SyncerConfig {
            max_wait: Duration::from_micros(args.group_commit_max_wait_us),
            ..Default::default()
        },
        paging: PagingConfig { queue_memory_bytes: args.queue_memory_bytes, ..PagingConfig::default() },
        default_user: args.access.default_user()?,
        loopback_users: args.access.loopback_users(),
        ..BrokerConfig::default()
    })?;
    let tls = args.access.tls_acceptor(args.https_listen.is_some())?;
    if let Some(path) = &args.load_definitions {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        let report = mailroom_http::definitions::import(&broker, &doc, None)
            .map_err(|e| format!("cannot import definitions from {}: {e}", path.display()))?;
        tracing::info!(file = %path.display(), ?report, "definitions loaded");
    }
    let config = ServerConfig {
        listen: args.amqp_listen,
        product: args.product_name,
        heartbeat: args.heartbeat,
        frame_max: args.frame_max,
        max_message_size: args.max_message_size,
        consumer_timeout: Duration::from_millis(args.consumer_timeout_ms),
        outbound_bound: args.max_outbound_bytes,
        write_deadline: Duration::from_millis(args.write_deadline_ms),
        fd_reserve: args.fd_reserve,
        ..ServerConfig::default()
    };
    let mut server = AmqpServer::bind(broker.clone(), config).await?;
    server.set_proxy_protocol(args.access.proxy_protocol);
    if let Some(acceptor) = &tls {
        if !args.access.amqps_listen.is_empty() {
            server.bind_tls(&args.access.amqps_listen, acceptor.clone()).await?;
            for addr in server.tls_local_addrs() {
                println!("mailroom: AMQPS listening on {addr}");
            }
        }
        access_args::reload_on_sighup(acceptor.clone());
    }
    let stopping = broker.clone();
    for addr in server.local_addrs() {
        // Scripts and tests read this line to find the port when they asked for port 0.
        println!("mailroom: AMQP listening on {addr}");
    }
    // The HTTP API is an operator convenience: a busy port (another broker's management listener, or a
    // second Mailroom on this machine) disables it with a warning instead of refusing to start.
    let amqp_listeners: Vec<mailroom_http::Listener> =
        server.local_addrs().into_iter().map(|addr| mailroom_http::Listener { protocol: "amqp", addr }).collect();
    tokio::spawn(logging::log_alarms(broker.clone(), mailroom_http::metrics::node_name()));
    start_prometheus(&broker, &args.prometheus_listen).await?;
    match HttpServer::bind(broker, args.http_listen).await {
        Ok(http) => {
            let settings = mailroom_http::HttpSettings { allowed_hosts: args.http_allowed_hosts, ..Default::default() };
            let mut http = http.with_listeners(amqp_listeners).with_settings(settings);
            if let (Some(addr), Some(acceptor)) = (args.https_listen, &tls) {
                let acceptor = acceptor.clone();
                // The AMQPS acceptor's configuration: one loader, one SIGHUP reload for both listeners.
                http = http.bind_https(addr, std::sync::Arc::new(move || acceptor.config())).await?;
            }
            if let Ok(addr) = http.local_addr() {
                println!("mailroom: HTTP listening on {addr}");
            }
            if let Some(addr) = http.https_local_addr() {
                println!("mailroom: HTTPS listening on {addr}");
            }
            tokio::spawn(http.run(std::future::pending()));
        }
        Err(e) => {
            tracing::warn!(listen = %args.http_listen, error = %e, "cannot bind the HTTP API; running without it")
        }
    }
    tracing::info!(http = %args.http_listen, data_dir = %args.data_dir.display(), "mailroom started");
    server.run(shutdown_signal()).await;
    // Released delayed messages' settles are buffered (write them, or the restart releases them again), and
    // ack logs are fsynced lazily: flush both, bounded so a failing disk cannot hang the exit.
    if tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, stopping.flush_stores()).await.is_err() {
        tracing::warn!("the stores were not all synced within {SHUTDOWN_FLUSH_TIMEOUT:?}; exiting anyway");
    }
    tracing::info!("mailroom stopped");
    Ok(())
}

/// Starts the Prometheus listener unless `listen` is `off`. Like the HTTP API, a busy port disables it with
/// a warning (a RabbitMQ with its prometheus plugin on this machine holds 15692).
async fn start_prometheus(broker: &Broker, listen: &str) -> Result<(), Box<dyn std::error::Error>> {
    if listen.eq_ignore_ascii_case("off") {
        return Ok(());
    }
    let addr: SocketAddr =
        listen.parse().map_err(|e| format!("invalid --prometheus-listen {listen:?} (want ADDR:PORT or off): {e}"))?;
    match mailroom_http::prometheus::PrometheusServer::bind(broker.clone(), addr).await {
        Ok(server) => {
            if let Ok(addr) = server.local_addr() {
                println!("mailroom: Prometheus listening on {addr}");
            }
            tokio::spawn(server.run(std::future::pending()));
        }
        Err(e) => tracing::warn!(listen = %addr, error = %e, "cannot bind the Prometheus listener; running without it"),
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
