//! The `ezgate` command: CLI, logging, config, bind, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ezgate::config::{LogFormat, Overrides, Settings};
use ezgate::server::Listeners;

/// `ezgate --version`: the version, the git commit and the cargo profile it was built from
/// (build.rs), as `ezgate_build_info` labels them.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EZGATE_BUILD_COMMIT"),
    ", ",
    env!("EZGATE_BUILD_PROFILE"),
    " build)"
);

/// A reverse-proxy sidecar for the EZLINK AI API: rate limits, one error schema, metrics.
#[derive(Parser)]
#[command(name = "ezgate", version = VERSION, about)]
struct Cli {
    /// Config file (TOML). Without one, ezgate runs on built-in defaults.
    #[arg(long, env = "EZGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Proxy listen address, an IP and a port [default: 127.0.0.1:8080]
    #[arg(long, env = "EZGATE_LISTEN", value_parser = listen_addr)]
    listen: Option<SocketAddr>,
    /// Admin listen address for /metrics, /healthz, /readyz [default: 127.0.0.1:9090]
    #[arg(long, env = "EZGATE_ADMIN_LISTEN", value_parser = listen_addr)]
    admin_listen: Option<SocketAddr>,
    /// Upstream base URL [default: https://api.ezlinkai.com]
    #[arg(long, env = "EZGATE_UPSTREAM")]
    upstream: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print the effective config, secrets redacted.
    CheckConfig,
}

fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    ezgate::config::units::listen_addr(s)
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        upstream: cli.upstream.clone(),
    };
    // RUST_LOG overrides log.level, so it is checked like it.
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| ezgate::config::units::log_filter(&f).err())
        .map(|e| format!("RUST_LOG: {e}"));
    let settings = match (
        Settings::load(cli.config.as_deref(), &overrides, &env_lookup),
        rust_log,
    ) {
        (Ok(s), None) => s,
        (Ok(_), Some(e)) => {
            eprintln!("ezgate: invalid configuration\n{e}");
            return ExitCode::from(2);
        }
        (Err(e), rust_log) => {
            eprintln!("ezgate: invalid configuration\n{e}");
            if let Some(r) = rust_log {
                eprintln!("{r}");
            }
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        print!("{settings}");
        println!("# configuration is valid");
        return ExitCode::SUCCESS;
    }
    let _log_writer = init_logging(&settings);
    let format = settings.config.log.format;
    let threads = settings.config.server.worker_threads;
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    // One core: a single-threaded runtime skips work stealing and cross-thread wakeups.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            fatal(format, &format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(start(settings, cli.config, overrides)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            fatal(format, &e);
            ExitCode::FAILURE
        }
    }
}

async fn start(
    settings: Settings,
    path: Option<PathBuf>,
    overrides: Overrides,
) -> Result<(), String> {
    // The budgets' state is read before anything listens: a file that cannot be read or a
    // directory that cannot be written stops startup.
    if let Some(dir) = &settings.config.server.state_dir {
        if !settings.config.budgets.is_empty() {
            ezgate::budget::state::check(dir)?;
        }
    }
    let listeners = Listeners::bind(&settings).await?;
    let proxy_addr = listeners.proxy.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = listeners.admin.local_addr().map_err(|e| e.to_string())?;
    let scheme = if listeners.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, %scheme, upstream = %settings.config.upstream.base_url, "ezgate started");
    // Deliberate, stable lines for scripts and tests that start ezgate on port 0.
    let format = settings.config.log.format;
    println!("{}", listening_line(format, "proxy", proxy_addr));
    println!("{}", listening_line(format, "admin", admin_addr));
    if let Some((host, port)) = upstream_host(&settings.upstream_uri) {
        tokio::spawn(resolve_upstream(host, port));
    }

    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let shutdown = signals(reload_tx)?;
    let reload: ezgate::Reload = Box::new(move || {
        Settings::load(path.as_deref(), &overrides, &env_lookup).map_err(|e| e.to_string())
    });
    ezgate::run(settings, listeners, shutdown, Some((reload, reload_rx))).await
}

/// The stdout line that announces a bound listener: `listening on ADDR` (`admin listening on
/// ADDR`), or with `log.format = "json"` the same message as a JSON log line that also names
/// the listener and its address, so that every line ezgate prints is JSON.
fn listening_line(format: LogFormat, listener: &str, addr: SocketAddr) -> String {
    let message = match listener {
        "proxy" => format!("listening on {addr}"),
        _ => format!("{listener} listening on {addr}"),
    };
    match format {
        LogFormat::Text => message,
        LogFormat::Json => serde_json::json!({
            "timestamp": ezgate::access_log::rfc3339(std::time::SystemTime::now()),
            "level": "INFO",
            "message": message,
            "target": "ezgate",
            "listener": listener,
            "addr": addr.to_string(),
        })
        .to_string(),
    }
}

/// A failure that ends the process once logging is set up: a JSON log line with
/// `log.format = "json"`, else `ezgate: …` as before.
fn fatal(format: LogFormat, message: &str) {
    match format {
        LogFormat::Json => tracing::error!("{message}"),
        LogFormat::Text => eprintln!("ezgate: {message}"),
    }
}

/// The upstream's host name and port, unless the host is an IP address.
fn upstream_host(uri: &http::Uri) -> Option<(String, u16)> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    Some((host.to_owned(), port))
}

/// Resolves the upstream's host once, in the background, after the listeners are bound:
/// a name that does not resolve gets one warning now, rather than a first sign in the
/// first request's 502. Readiness never waits for it; requests resolve the name afresh.
async fn resolve_upstream(host: String, port: u16) {
    const WITHIN: std::time::Duration = std::time::Duration::from_secs(5);
    let lookup = tokio::time::timeout(WITHIN, tokio::net::lookup_host((host.as_str(), port)));
    let problem = match lookup.await {
        Ok(Ok(addrs)) => match addrs.count() {
            0 => "it resolves to no address".to_owned(),
            n => {
                tracing::info!(%host, addresses = n, "upstream host resolves");
                return;
            }
        },
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {WITHIN:?}"),
    };
    tracing::warn!(
        %host,
        error = %problem,
        "upstream host does not resolve: requests will fail with 502 upstream_unreachable until it does (check upstream.base_url / --upstream, and DNS)"
    );
}

/// SIGTERM/SIGINT end the returned future; SIGHUP sends a reload request.
fn signals(
    reload: tokio::sync::mpsc::Sender<()>,
) -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP handler: {e}"))?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            let _ = reload.try_send(());
        }
    });
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// Logs go to stderr through a writer thread, so a request never waits on a `write(2)`:
/// every line, the access log's and the others, is appended to one buffer that the thread
/// writes in batches, in order, never dropping one (it holds callers back when stderr cannot
/// keep up: src/access_log/sink.rs). The guard writes what is left.
fn init_logging(settings: &Settings) -> Option<ezgate::access_log::SinkGuard> {
    let (writer, guard) =
        match ezgate::access_log::LineSink::start(Box::new(std::io::stderr()), "ezgate-log") {
            Ok((w, g)) => (w, Some(g)),
            Err(e) => {
                eprintln!("ezgate: cannot start the log writer thread ({e})");
                return None;
            }
        };
    let log = &settings.config.log;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .unwrap_or_else(|| log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_target(true);
    match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
    if log.format == LogFormat::Json {
        // The default hook writes a plain-text line to stderr; a panic (one a request handler
        // catches included) is an error log line like any other.
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let payload = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned());
            let thread = std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_owned();
            tracing::error!(%location, %thread, "panicked: {payload}");
        }));
    }
    // Access lines are formatted by ezgate itself but obey the same filter, decided once here.
    if tracing::enabled!(target: ezgate::access_log::TARGET, tracing::Level::INFO) {
        ezgate::access_log::install(writer, log.format);
    }
    guard
}

/// mimalloc: small, frequent allocations (headers, request ids, frames) are ezgate's pattern,
/// and glibc's malloc spends measurably more CPU on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
