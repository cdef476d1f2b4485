//! `gateway`: GRE/IPIP tunnels with an XDP + AF_XDP + io_uring fast path.
//!
//! ```text
//! gateway --iface ens0 [--config FILE]     run in the foreground
//! gateway check [--config FILE]            validate and print the plan
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::control::config::{Config, DEFAULT_PATH};

#[derive(Parser, Debug)]
#[command(
    name = "gateway",
    version,
    about = "GRE and IPIP tunnels on an XDP + AF_XDP + io_uring fast path",
    after_help = "Runs in the foreground and logs to stderr. Signals: SIGUSR1 prints the counters \
(one JSON line on stdout, a summary on stderr); SIGHUP reads the configuration again and \
applies it (as `gateway reload` does); SIGINT or SIGTERM stop cleanly (XDP detached, \
created devices removed). The configuration is /etc/gateway/gateway.toml unless --config names \
another; `gateway check` validates one.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Underlay interface to attach to (overrides gateway.iface in the config).
    #[arg(long, value_name = "IFACE")]
    iface: Option<String>,
    /// Configuration file [default: /etc/gateway/gateway.toml].
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Log level filter (error, warn, info, debug, trace), or RUST_LOG.
    #[arg(long, default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration and print what the gateway would set up.
    Check,
    /// Print the counters of the gateway running on IFACE in this network
    /// namespace.
    Stats {
        /// The running gateway's interface (default: gateway.iface of the config).
        #[arg(long)]
        iface: Option<String>,
        /// human, json or prometheus.
        #[arg(long, default_value = "human", value_parser = ["human", "json", "prometheus"])]
        format: String,
    },
    /// Make the gateway running on IFACE in this network namespace read its
    /// configuration file again and apply it (as SIGHUP does). Prints what
    /// changed, or why nothing did (then exits 1).
    Reload {
        /// The running gateway's interface (default: gateway.iface of the config).
        #[arg(long)]
        iface: Option<String>,
    },
}

fn load(path: Option<&Path>) -> Result<(Config, PathBuf), String> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let p = PathBuf::from(DEFAULT_PATH);
            if !p.exists() {
                return Err(format!(
                    "no configuration: {DEFAULT_PATH} does not exist; write one (configs/lab-host1.toml in the repository is an example) or pass --config FILE"
                ));
            }
            p
        }
    };
    Config::load(&path)
        .map(|c| (c, path))
        .map_err(|e| e.to_string())
}

fn print_plan(cfg: &Config, path: &Path) {
    println!("config: {}", path.display());
    println!(
        "gateway: iface {} queues {} cores {} batch_size {} poll {} xdp_mode {} xsk_bind {} frames_per_queue {} ring_size {} busy_poll_budget {} spread_writes {}",
        cfg.iface.as_deref().unwrap_or("(from --iface)"),
        cfg.queues,
        cfg.cores,
        cfg.batch_size,
        cfg.poll,
        cfg.xdp_attach,
        cfg.xsk_bind,
        cfg.frames_per_queue,
        cfg.ring_size,
        cfg.busy_poll_budget,
        cfg.spread_writes
    );
    for t in &cfg.tunnels {
        let mut line = format!(
            "tunnel {}: mode {} local {} remote {}",
            t.name,
            t.mode.kernel_name(t.local.is_ipv6()),
            t.local,
            t.remote
        );
        if let Some(k) = t.ikey {
            line.push_str(&format!(" ikey {k}"));
        }
        if let Some(k) = t.okey {
            line.push_str(&format!(" okey {k}"));
        }
        if t.icsum {
            line.push_str(" icsum");
        }
        if t.ocsum {
            line.push_str(" ocsum");
        }
        if t.iseq {
            line.push_str(" iseq");
        }
        if t.oseq {
            line.push_str(" oseq");
        }
        line.push_str(&format!(" ttl {} tos {}", t.ttl, t.tos));
        if t.local.is_ipv6() {
            match t.encap_limit {
                Some(n) => line.push_str(&format!(" encaplimit {n}")),
                None => line.push_str(" encaplimit none"),
            }
        } else {
            line.push_str(if t.pmtudisc {
                " pmtudisc"
            } else {
                " nopmtudisc"
            });
            if t.ignore_df {
                line.push_str(" ignore-df");
            }
        }
        match t.mtu {
            Some(m) => line.push_str(&format!(" mtu {m}")),
            None => line.push_str(&format!(" mtu auto (underlay - {})", t.overhead())),
        }
        line.push_str(&format!(" device {} ({})", t.device, t.device_kind));
        if let (Some(a), Some(p)) = (t.address, t.peer) {
            line.push_str(&format!(" address {a} peer {p}"));
        }
        for p in &t.accept_from {
            line.push_str(&format!(" accept_from {p}"));
        }
        if t.persistent {
            line.push_str(" persistent");
        }
        println!("{line}");
    }
    // Host-dependent settings are checked here only against this host.
    let ncores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let gateway::control::config::Cores::List(l) = &cfg.cores {
        if let Some(c) = l.iter().find(|&&c| c >= ncores) {
            println!("warning: core {c} does not exist on this host ({ncores} cores); the gateway will refuse to start here");
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let control = match &cli.command {
        Some(Command::Stats { iface, format }) => Some((iface, format.as_str())),
        Some(Command::Reload { iface }) => Some((iface, "reload")),
        _ => None,
    };
    if let Some((iface, format)) = control {
        let iface = match iface {
            Some(i) => i.clone(),
            None => match load(cli.config.as_deref()) {
                Ok((c, p)) => match c.iface {
                    Some(i) => i,
                    None => {
                        eprintln!(
                            "error: which gateway? pass --iface IFACE (no gateway.iface in {})",
                            p.display()
                        );
                        return ExitCode::from(2);
                    }
                },
                Err(_) => {
                    eprintln!("error: which gateway? pass --iface IFACE");
                    return ExitCode::from(2);
                }
            },
        };
        return match gateway::telemetry::metrics::query(&iface, format) {
            Ok(text) if format == "reload" && !text.starts_with("reloaded") => {
                eprintln!("{}", text.trim_end());
                ExitCode::FAILURE
            }
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (cfg, path) = match load(cli.config.as_deref()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Check) => {
            print_plan(&cfg, &path);
            ExitCode::SUCCESS
        }
        Some(Command::Stats { .. } | Command::Reload { .. }) => unreachable!("handled above"),
        None => {
            tracing::info!("read configuration from {}", path.display());
            let Some(iface) = cli.iface.clone().or_else(|| cfg.iface.clone()) else {
                eprintln!(
                    "error: no interface: pass --iface IFACE or set gateway.iface in {}",
                    path.display()
                );
                return ExitCode::from(2);
            };
            match gateway::control::run::run(cfg, &path, &iface, cli.metrics.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
