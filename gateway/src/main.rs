//! `gateway`: GRE/IPIP tunnels with an XDP + AF_XDP + io_uring fast path.
//!
//! ```text
//! gateway --iface ens0 [--config FILE]     run in the foreground
//! gateway check [--config FILE]            validate and print the plan
//! gateway stats | reload | drain           ask the running gateway
//! gateway capture -w FILE [FILTER]         copy its packets (pcapng)
//! gateway trace -c N [FILTER]              follow packets stage by stage
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::control::config::{Config, DEFAULT_PATH};
use gateway::telemetry::capture;
use gateway::telemetry::metrics::DrainEnd;

#[derive(Parser, Debug)]
#[command(
    name = "gateway",
    version,
    about = "GRE and IPIP tunnels on an XDP + AF_XDP + io_uring fast path",
    after_help = "Runs in the foreground and logs to stderr. Signals: SIGUSR1 prints the counters \
(one JSON line on stdout, a summary on stderr); SIGHUP reads the configuration again and \
applies it (as `gateway reload` does); SIGUSR2 drains it (as `gateway drain` does); SIGINT or SIGTERM stop cleanly (XDP detached, \
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
    /// Copy the packets the running gateway handles into a pcapng file:
    /// at the points asked for (default all), matching a tcpdump filter
    /// expression. Runs until -c packets, Ctrl-C, or the gateway's end; the
    /// data path never waits for it (copies a slow reader cannot take are
    /// lost, and counted).
    #[command(
        after_help = "Points: wire-in (frames the XDP program steered to the gateway), device-out (decapsulated packets written into the devices), device-in (packets read from the devices), wire-out (encapsulated frames sent), drop (dropped packets, with the reason). Each point is an interface of its own in the file; each packet's comment names its point, tunnel, drop reason and queue (tshark -r FILE -T fields -e frame.interface_name -e frame.comment). Examples:
  gateway capture --iface ens0 -w all.pcapng
  gateway capture --iface ens0 --point drop --reason key_mismatch -w - | tshark -r -
  gateway capture --iface ens0 --point device-out --tunnel tun100 -c 100 -w x.pcapng icmp"
    )]
    Capture {
        /// The running gateway's interface (default: gateway.iface of the config).
        #[arg(long)]
        iface: Option<String>,
        /// Only at these points (repeat, or separate with commas).
        #[arg(long = "point", value_delimiter = ',', value_parser = ["wire-in", "device-out", "device-in", "wire-out", "drop"])]
        points: Vec<String>,
        /// Only this tunnel's packets.
        #[arg(long)]
        tunnel: Option<String>,
        /// Only drops for this reason (a name from `gateway stats`, e.g. key_mismatch).
        #[arg(long)]
        reason: Option<String>,
        /// Stop after this many copies (at any point: a ping through a tunnel gives up to four).
        #[arg(short = 'c', value_name = "N")]
        count: Option<u64>,
        /// Bytes kept of each packet (default, or 0: all).
        #[arg(short = 's', long = "snaplen", value_name = "BYTES")]
        snaplen: Option<usize>,
        /// Write pcapng to FILE, or to standard output with `-`.
        #[arg(short = 'w', value_name = "FILE")]
        write: PathBuf,
        /// A tcpdump filter expression (pcap-filter(7)), e.g. `icmp and host 10.1.1.2`.
        #[arg(value_name = "FILTER")]
        filter: Vec<String>,
    },
    /// Follow the next N packets through the running gateway, stage by
    /// stage, with the decision at each (the tunnel the lookup chose, the
    /// key, checksum and sequence verdicts, coalescing, the device write,
    /// or the drop reason).
    Trace {
        /// The running gateway's interface (default: gateway.iface of the config).
        #[arg(long)]
        iface: Option<String>,
        /// How many packets.
        #[arg(short = 'c', value_name = "N", default_value_t = 10)]
        count: u64,
        /// Only this tunnel's packets.
        #[arg(long)]
        tunnel: Option<String>,
        /// One JSON object per packet, one per line.
        #[arg(long)]
        json: bool,
        /// A tcpdump filter expression, over the frame as received (or the
        /// packet as read from a device).
        #[arg(value_name = "FILTER")]
        filter: Vec<String>,
    },
    /// Make the gateway running on IFACE in this network namespace read its
    /// configuration file again and apply it (as SIGHUP does). Prints what
    /// changed, or why nothing did (then exits 1).
    Reload {
        /// The running gateway's interface (default: gateway.iface of the config).
        #[arg(long)]
        iface: Option<String>,
    },
    /// Take the gateway running on IFACE out of service with no loss: it
    /// withdraws its [anycast] addresses (the routing daemon stops
    /// announcing them), fails /readyz, carries what still arrives, and
    /// stops once no tunnel packet has arrived for anycast.drain_quiet
    /// seconds (at most anycast.drain_timeout). Waits until it has stopped.
    /// SIGUSR2 starts the same drain.
    Drain {
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
    if let Some(a) = &cfg.anycast {
        let list: Vec<String> = a.addresses.iter().map(|x| x.to_string()).collect();
        let shared = cfg
            .tunnels
            .iter()
            .filter(|t| a.addresses.contains(&t.local))
            .count();
        println!(
            "anycast: {} on device {} while ready ({shared} tunnel{} on them); drain_quiet {} s drain_timeout {} s",
            list.join(", "),
            a.device,
            if shared == 1 { "" } else { "s" },
            a.drain_quiet.as_secs(),
            a.drain_timeout.as_secs()
        );
        if shared == 0 {
            println!("warning: no tunnel has an [anycast] address as its local; announcing them brings this gateway nothing");
        }
    }
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
        Some(Command::Drain { iface }) => Some((iface, "drain")),
        Some(Command::Capture { iface, .. }) => Some((iface, "capture")),
        Some(Command::Trace { iface, .. }) => Some((iface, "trace")),
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
        let joined = |f: &Vec<String>| (!f.is_empty()).then(|| f.join(" "));
        let watched = match &cli.command {
            Some(Command::Capture {
                points,
                tunnel,
                reason,
                count,
                snaplen,
                write,
                filter,
                ..
            }) => Some(capture::capture(&capture::CaptureArgs {
                iface: iface.clone(),
                filter: joined(filter),
                points: points.clone(),
                tunnel: tunnel.clone(),
                reason: reason.clone(),
                count: *count,
                snaplen: *snaplen,
                write: write.clone(),
            })),
            Some(Command::Trace {
                count,
                tunnel,
                json,
                filter,
                ..
            }) => Some(capture::trace(&capture::TraceArgs {
                iface: iface.clone(),
                filter: joined(filter),
                tunnel: tunnel.clone(),
                count: *count,
                json: *json,
            })),
            _ => None,
        };
        if format == "drain" {
            return match gateway::telemetry::metrics::drain(&iface, &mut std::io::stdout()) {
                Ok(DrainEnd::Drained) => ExitCode::SUCCESS,
                Ok(DrainEnd::TimedOut) => {
                    eprintln!("error: the drain timed out with packets still arriving; the gateway stopped anyway");
                    ExitCode::from(3)
                }
                Ok(DrainEnd::Unfinished) => {
                    eprintln!(
                        "error: the gateway closed the connection before saying it had stopped"
                    );
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        if let Some(r) = watched {
            return match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
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
        Some(
            Command::Stats { .. }
            | Command::Reload { .. }
            | Command::Drain { .. }
            | Command::Capture { .. }
            | Command::Trace { .. },
        ) => unreachable!("handled above"),
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
