//! Bringing the gateway up, running it, and taking it down cleanly.
//!
//! Order matters: devices first (so steered packets have somewhere to go),
//! then the XDP program is loaded and its endpoint table filled, then one
//! AF_XDP socket per queue is bound and put into the XSKMAP, and only then
//! is the program attached. On the way down the workers stop and drain
//! first, then the program detaches (dropping the bpf_link), then the
//! device queues close (devices the gateway created disappear with them).

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use gateway_common::XdpCounter;
use serde_json::{json, Map, Value};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};

use crate::config::{Config, Cores, Queues, TunnelConfig};
use crate::drop_reason::DropReason;
use crate::encap::TunnelTx;
use crate::neighbour::{run_resolver, NextHops};
use crate::netlink::{LinkInfo, Netlink};
use crate::stats::WorkerStats;
use crate::sys::{tap, xsk::Xsk};
use crate::tunnel::{DeviceKind, TunnelRx, TunnelTable};
use crate::worker::{Shared, Worker};
use crate::xdp::Steering;

/// Number of RX queues of `iface`, from sysfs.
pub fn rx_queue_count(iface: &str) -> anyhow::Result<u32> {
    let dir = format!("/sys/class/net/{iface}/queues");
    let n = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(n.max(1) as u32)
}

/// The queues to serve.
pub fn plan_queues(cfg: &Config, iface: &str) -> anyhow::Result<Vec<u32>> {
    let available = rx_queue_count(iface)?;
    match &cfg.queues {
        Queues::All => Ok((0..available).collect()),
        Queues::List(list) => {
            if let Some(q) = list.iter().find(|&&q| q >= available) {
                bail!("gateway.queues: {iface} has {available} RX queue(s), so queue {q} does not exist; use queues below {available} or \"all\"");
            }
            Ok(list.clone())
        }
    }
}

/// The core for each worker.
pub fn plan_cores(cfg: &Config, workers: usize) -> anyhow::Result<Vec<Option<usize>>> {
    let ncores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match &cfg.cores {
        // Highest cores first: core 0 usually takes the host's interrupts
        // and housekeeping.
        Cores::Auto => Ok((0..workers)
            .map(|i| Some((ncores - 1 - (i % ncores)) % ncores))
            .collect()),
        Cores::List(list) => {
            if let Some(c) = list.iter().find(|&&c| c >= ncores) {
                bail!("gateway.cores: core {c} does not exist on this host ({ncores} cores); use cores below {ncores}");
            }
            Ok((0..workers).map(|i| Some(list[i % list.len()])).collect())
        }
    }
}

/// A locally administered MAC that stands for the far side of tunnel `i`
/// in the Ethernet headers written into its tap.
fn peer_mac(i: usize) -> [u8; 6] {
    [0x02, 0x47, 0x57, 0x00, (i >> 8) as u8, i as u8]
}

/// A tunnel device opened for `queues` workers.
struct Device {
    queues: Vec<OwnedFd>,
    link: LinkInfo,
    created: bool,
}

fn open_device(nl: &Netlink, t: &TunnelConfig, mtu: u16, workers: usize) -> anyhow::Result<Device> {
    let existed = nl.link(&t.device)?.is_some();
    let mut queues = Vec::with_capacity(workers);
    for _ in 0..workers {
        queues.push(tap::open_queue(&t.device, t.device_kind)?);
    }
    if t.persistent {
        tap::set_persistent(&queues[0], &t.device, true)?;
    }
    let link = nl
        .link(&t.device)?
        .ok_or_else(|| anyhow!("device {} vanished right after it was opened", t.device))?;
    nl.set_up(&link, Some(u32::from(mtu)))?;
    if let (Some(a), Some(p)) = (t.address, t.peer) {
        nl.add_peer_address(&link, a, p)?;
    }
    Ok(Device {
        queues,
        link,
        created: !existed,
    })
}

/// The tunnel MTU: configured, or the underlay's less the overhead.
pub fn tunnel_mtu(t: &TunnelConfig, underlay_mtu: u32) -> anyhow::Result<u16> {
    match t.mtu {
        Some(m) => Ok(m),
        None => {
            let m = underlay_mtu.saturating_sub(u32::from(t.overhead()));
            if m < 68 {
                bail!("tunnel \"{}\".mtu: the underlay MTU {underlay_mtu} leaves no room; set mtu explicitly", t.name);
            }
            Ok(m.min(65535) as u16)
        }
    }
}

/// Runs the gateway on `iface` until SIGINT or SIGTERM; with `metrics`,
/// serves Prometheus text on that address.
pub fn run(cfg: Config, iface: &str, metrics: Option<&str>) -> anyhow::Result<()> {
    let nl = Netlink::new()?;
    let underlay = nl.link(iface)?.ok_or_else(|| {
        anyhow!("interface {iface} does not exist in this network namespace; give an existing one with --iface (see `ip link`)")
    })?;
    if !underlay.up {
        tracing::warn!("{iface} is down; the gateway will receive nothing until it is up");
    }
    let queues = plan_queues(&cfg, iface)?;
    let cores = plan_cores(&cfg, queues.len())?;
    let workers = queues.len();

    // Devices.
    let mut devices = Vec::new();
    let mut rx_tunnels = Vec::new();
    let mut tx_tunnels = Vec::new();
    for (i, t) in cfg.tunnels.iter().enumerate() {
        let mtu = tunnel_mtu(t, underlay.mtu)?;
        let dev = open_device(&nl, t, mtu, workers)?;
        let device_mac = match t.device_kind {
            DeviceKind::Tap => dev
                .link
                .mac
                .ok_or_else(|| anyhow!("tap {} has no MAC address", t.device))?,
            DeviceKind::Tun => [0; 6],
        };
        tracing::info!(
            tunnel = %t.name,
            device = %t.device,
            kind = %t.device_kind,
            mtu,
            created = dev.created,
            "device ready"
        );
        rx_tunnels.push(TunnelRx {
            name: t.name.clone(),
            mode: t.mode,
            local: t.local,
            remote: t.remote,
            ikey: t.ikey,
            icsum: t.icsum,
            device_kind: t.device_kind,
            device_mac,
            peer_mac: peer_mac(i),
            mtu,
            allowed_sources: t
                .peer
                .map(|p| {
                    let mut v = vec![crate::tunnel::Prefix::host(p)];
                    v.extend(t.accept_from.iter().copied());
                    v
                })
                .unwrap_or_default(),
        });
        let (IpAddr::V4(local), IpAddr::V4(remote)) = (t.local, t.remote) else {
            bail!(
                "tunnel \"{}\": an IPv6 underlay is not supported yet",
                t.name
            );
        };
        tx_tunnels.push(TunnelTx {
            mode: t.mode,
            local,
            remote,
            okey: t.okey,
            ocsum: t.ocsum,
            ttl: t.ttl,
            mtu,
            device_kind: t.device_kind,
            device_mac,
            peer_mac: peer_mac(i),
            address: t.address,
            peer: t.peer,
        });
        devices.push(dev);
    }
    let table = Arc::new(TunnelTable::new(rx_tunnels));
    let tx_table = Arc::new(tx_tunnels);
    let src_mac = underlay.mac.ok_or_else(|| {
        anyhow!("{iface} has no MAC address; the gateway needs an Ethernet underlay")
    })?;

    // XDP program and sockets.
    let mut steering = Steering::load()?;
    steering.set_mac(src_mac)?;
    for key in table.endpoint_keys() {
        steering.add_endpoint(key)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let next_hops = Arc::new(NextHops::new(table.len()));
    next_hops.set_local(src_mac);
    let resolver = {
        let remotes: Vec<(String, IpAddr)> = cfg
            .tunnels
            .iter()
            .map(|t| (t.name.clone(), t.remote))
            .collect();
        let (hops, stop, index, name) = (
            next_hops.clone(),
            stop.clone(),
            underlay.index,
            iface.to_string(),
        );
        std::thread::Builder::new()
            .name("gw-neigh".into())
            .spawn(move || {
                run_resolver(remotes, index, name, hops, stop, Duration::from_millis(500))
            })
            .context("spawning the neighbour resolver")?
    };
    let mut stats = Vec::new();
    let mut pending = Vec::new();
    for (&queue, &core) in queues.iter().zip(&cores) {
        let (xsk, frames) = Xsk::new(
            iface,
            queue,
            cfg.frames_per_queue,
            cfg.ring_size,
            cfg.xsk_bind,
        )?;
        steering.set_socket(queue, xsk.fd())?;
        let st = Arc::new(WorkerStats::new(queue, core, table.len()));
        let fds: Vec<OwnedFd> = devices
            .iter_mut()
            .map(|d| d.queues.pop().expect("one queue per worker"))
            .collect();
        pending.push(Worker::new(
            queue,
            core,
            cfg.batch_size,
            cfg.poll,
            xsk,
            frames,
            fds,
            Shared {
                rx: table.clone(),
                tx: tx_table.clone(),
                next_hops: next_hops.clone(),
                stop: stop.clone(),
            },
            st.clone(),
        ));
        stats.push(st);
    }
    let mode = steering.attach(iface, cfg.xdp_attach)?;
    tracing::info!(
        iface,
        xdp = mode,
        queues = ?queues,
        cores = ?cores.iter().flatten().collect::<Vec<_>>(),
        poll = %cfg.poll,
        batch = cfg.batch_size,
        tunnels = table.len(),
        "gateway running"
    );

    let mut handles = Vec::new();
    for w in pending {
        let name = format!("gw-q{}", w.queue);
        handles.push(
            std::thread::Builder::new()
                .name(name)
                .spawn(move || w.run())
                .context("spawning a worker thread")?,
        );
    }

    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])
        .context("installing signal handlers")?;
    let (req_tx, req_rx) = std::sync::mpsc::channel::<crate::metrics::Request>();
    crate::metrics::serve_control(iface, req_tx.clone())?;
    if let Some(addr) = metrics {
        crate::metrics::serve_http(addr, req_tx)?;
        tracing::info!("metrics on http://{addr}/metrics");
    } else {
        drop(req_tx);
    }
    let mut failure: Option<anyhow::Error> = None;
    let mut local_mac = src_mac;
    let mut last_link_check = std::time::Instant::now();
    'outer: loop {
        // Follow the underlay's own MAC: the outer source, and what the XDP
        // program takes as ours.
        if last_link_check.elapsed() >= Duration::from_millis(500) {
            last_link_check = std::time::Instant::now();
            if let Ok(Some(LinkInfo { mac: Some(m), .. })) = nl.link(iface) {
                if m != local_mac {
                    tracing::info!(
                        "{iface} changed its MAC to {}",
                        crate::neighbour::format_mac(&m)
                    );
                    local_mac = m;
                    next_hops.set_local(m);
                    if let Err(e) = steering.set_mac(m) {
                        tracing::warn!("{e}");
                    }
                }
            }
        }
        while let Ok(r) = req_rx.try_recv() {
            let snap = snapshot(&table, &steering, &stats, &next_hops);
            let body = match r.format {
                crate::metrics::Format::Prometheus => crate::metrics::prometheus(&snap),
                crate::metrics::Format::Human => crate::human::render(&snap),
                crate::metrics::Format::Json => format!("{snap}\n"),
            };
            let _ = r.reply.send(body);
        }
        for sig in signals.pending() {
            match sig {
                SIGUSR1 => print_stats(&table, &steering, &stats, &next_hops, "stats"),
                _ => {
                    tracing::info!("signal {sig}: stopping");
                    break 'outer;
                }
            }
        }
        if handles.iter().any(|h| h.is_finished()) {
            failure = Some(anyhow!("a worker stopped unexpectedly"));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    stop.store(true, Ordering::Relaxed);
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert_with(|| anyhow!(e));
            }
            Err(_) => {
                failure.get_or_insert_with(|| anyhow!("a worker panicked"));
            }
        }
    }
    let _ = resolver.join();
    print_stats(&table, &steering, &stats, &next_hops, "final");
    drop(steering);
    // Closing the queues would remove a non-persistent device, but the
    // kernel releases fds registered with io_uring asynchronously; delete
    // the devices we created explicitly so they are gone when we exit.
    for (d, t) in devices.iter().zip(&cfg.tunnels) {
        if d.created && !t.persistent {
            if let Err(e) = nl.delete(&d.link) {
                tracing::warn!("{e}");
            }
        }
    }
    drop(devices);
    tracing::info!("XDP program detached; devices released");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Everything counted, as one JSON object.
pub fn snapshot(
    table: &TunnelTable,
    steering: &Steering,
    workers: &[Arc<WorkerStats>],
    next_hops: &NextHops,
) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tunnels = Vec::new();
    for (i, t) in table.iter().enumerate() {
        let packets: u64 = workers
            .iter()
            .map(|w| w.tunnel_rx_packets[i].load(Relaxed))
            .sum();
        let bytes: u64 = workers
            .iter()
            .map(|w| w.tunnel_rx_bytes[i].load(Relaxed))
            .sum();
        let tx_packets: u64 = workers
            .iter()
            .map(|w| w.tunnel_tx_packets[i].load(Relaxed))
            .sum();
        let tx_bytes: u64 = workers
            .iter()
            .map(|w| w.tunnel_tx_bytes[i].load(Relaxed))
            .sum();
        tunnels.push(json!({
            "name": t.name,
            "mode": t.mode,
            "local": t.local.to_string(),
            "remote": t.remote.to_string(),
            "device_kind": t.device_kind,
            "rx_packets": packets,
            "rx_bytes": bytes,
            "tx_packets": tx_packets,
            "tx_bytes": tx_bytes,
            "next_hop": next_hops.get(i).map(|m| crate::neighbour::format_mac(&m)),
        }));
    }
    let mut drops = Map::new();
    for r in DropReason::ALL {
        let n: u64 = workers
            .iter()
            .map(|w| w.drops[r as usize].load(Relaxed))
            .sum();
        drops.insert(r.name().into(), json!(n));
    }
    let xdp_values = steering.counters();
    let mut xdp = Map::new();
    for c in XdpCounter::ALL {
        xdp.insert(c.name().into(), json!(xdp_values[c as usize]));
    }
    json!({
        "tunnels": tunnels,
        "drops": drops,
        "xdp": xdp,
        "workers": workers.iter().map(|w| w.to_json()).collect::<Vec<_>>(),
    })
}

fn print_stats(
    table: &TunnelTable,
    steering: &Steering,
    workers: &[Arc<WorkerStats>],
    next_hops: &NextHops,
    event: &str,
) {
    let mut snap = snapshot(table, steering, workers, next_hops);
    snap["event"] = json!(event);
    // One JSON line on stdout for programs; a readable summary on stderr.
    println!("{snap}");
    eprintln!("{}", crate::human::render(&snap));
}
