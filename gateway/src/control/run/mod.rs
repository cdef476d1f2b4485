//! Bringing the gateway up, running it, and taking it down cleanly.
//!
//! Order matters: devices first (so steered packets have somewhere to go),
//! then the XDP program is loaded and its endpoint table filled, then one
//! AF_XDP socket per queue is bound and put into the XSKMAP, and only then
//! is the program attached. On the way down the workers stop and drain
//! first, then the program detaches (dropping the bpf_link), then the
//! device queues close (devices the gateway created disappear with them).
//!
//! Here: start-up, the control loop (signals, the control socket, stats)
//! and the way down. Beside it: [`slots`] (each tunnel's device and halves),
//! [`reload`] (the reload transaction), [`underlay`] (watching the link,
//! the XDP attachment and the devices).

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use gateway_common::EndpointKey;
use serde_json::{json, Value};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};

use crate::control::config::{Config, Cores, Queues, TunnelConfig};
use crate::control::neighbour::{run_resolver, NextHops, Targets};
use crate::datapath::encap::TunnelTx;
use crate::datapath::tunnel::{DeviceKind, TunnelRx, TunnelTable, MAX_TUNNELS};
use crate::engine::worker::{
    DeviceQueue, Faults, Reconfig, Settings, Shared, Tunnels, Worker, WorkerError,
};
use crate::io::netlink::{LinkInfo, Netlink};
use crate::io::tap;
use crate::io::uring::DeviceIo;
use crate::io::xdp::Steering;
use crate::io::xsk::{Region, Xsk};
use crate::telemetry::capture::Taps;
use crate::telemetry::metrics::{Format, Request};
use crate::telemetry::snapshot::{print_stats, snapshot};
use crate::telemetry::stats::WorkerStats;

mod anycast;
mod health;
mod liveness;
mod reload;
mod slots;
mod underlay;

use liveness::{carry_over, Live};
use reload::*;
use slots::*;
pub use slots::{plan_cores, plan_queues, rx_queue_count, tunnel_mtu};
use xsk_rs::Umem;

/// Counts of what happened to the gateway while it ran.
#[derive(Debug, Default)]
struct Events {
    reloads: u64,
    reload_failures: u64,
    devices_recreated: u64,
    underlay_down: u64,
    xdp_lost: u64,
    /// Tunnels whose keepalives went unanswered, and came back.
    tunnel_down: u64,
    tunnel_up: u64,
}

struct WorkerHandle {
    control: crossbeam::channel::Sender<Reconfig>,
    stats: Arc<WorkerStats>,
    thread: std::thread::JoinHandle<Result<(), WorkerError>>,
}

/// The running gateway, as the control thread holds it.
struct Gateway {
    iface: String,
    /// The captures and traces running (`gateway capture`, `gateway trace`).
    taps: Arc<Taps>,
    nl: Netlink,
    cfg: Config,
    underlay: LinkInfo,
    slots: Vec<Slot>,
    tunnels: Tunnels,
    targets: Arc<Mutex<Targets>>,
    steering: Steering,
    workers: Vec<WorkerHandle>,
    /// Next number for [`peer_mac`].
    next_peer: usize,
    events: Events,
    xdp_id: Option<u32>,
    xdp_attached: bool,
    /// The program id last seen attached to the underlay.
    xdp_seen: u32,
    /// Devices opened by a reload that failed half-way (the gateway is
    /// stopping); deleted at exit with the others.
    orphans: Vec<Slot>,
    /// Devices found missing, and when the last attempt to re-create each
    /// failed (to keep the log quiet while it keeps failing).
    recreate_failed: Vec<Option<std::time::Instant>>,
    /// Each tunnel's liveness (keepalives, the last packet).
    liveness: Vec<Live>,
    /// The last `/readyz` answer and when it was made.
    readyz_cache: Option<(std::time::Instant, (bool, String))>,
    /// The shared endpoint addresses' device (`[anycast]`).
    anycast: Option<anycast::Announcer>,
    /// A drain under way (`gateway drain`, SIGUSR2).
    drain: Option<anycast::Drain>,
    /// Device files each worker's io_uring has room for: a reload may
    /// bring no more tunnels than this.
    file_slots: u32,
}

/// Runs the gateway on `iface` until SIGINT or SIGTERM; with `metrics`,
/// serves Prometheus text on that address. SIGHUP (or `gateway reload`)
/// reads `config_path` again and applies it.
pub fn run(
    cfg: Config,
    config_path: &Path,
    iface: &str,
    metrics: Option<&str>,
) -> anyhow::Result<()> {
    // Signals are taken from the start: one that arrives while the gateway
    // starts (SIGTERM, SIGUSR1) waits for the control loop rather than
    // killing the process half-way, its devices and XDP program left behind.
    let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGHUP])
        .context("installing signal handlers")?;
    let nl = Netlink::new()?;
    let underlay = nl.link(iface)?.ok_or_else(|| {
        anyhow!("interface {iface} does not exist in this network namespace; give an existing one with --iface (see `ip link`)")
    })?;
    if !underlay.up {
        tracing::warn!("{iface} is down; the gateway will receive nothing until it is up");
    }
    let vlans = vlans_on(
        iface,
        &std::fs::read_to_string(VLAN_CONFIG).unwrap_or_default(),
    );
    if !vlans.is_empty() {
        tracing::warn!(
            "{iface} carries VLANs ({}): the XDP program passes tagged frames to the kernel, but a tag the NIC strips in hardware is not seen, and a tunnel packet on such a VLAN is taken as {iface}'s; turn tag stripping off (ethtool -K {iface} rxvlan off)",
            vlans.join(", ")
        );
    }
    let queues = plan_queues(&cfg, iface)?;
    let cores = plan_cores(&cfg, queues.len())?;
    let nworkers = queues.len();
    ensure_open_files(cfg.tunnels.len(), nworkers)?;
    let file_slots = registered_file_slots()?;
    let src_mac = underlay.mac.ok_or_else(|| {
        anyhow!("{iface} has no MAC address; the gateway needs an Ethernet underlay")
    })?;

    // The shared addresses' device (nothing on it yet), before anything
    // that a failure here would leave behind.
    let anycast = match &cfg.anycast {
        Some(a) if a.device == iface => {
            bail!("anycast.device: {iface} is the underlay; give [anycast] a device of its own (the default is gw-anycast)")
        }
        Some(a) => Some(anycast::Announcer::open(a, &nl)?),
        None => None,
    };

    // Devices, after any left behind by a killed gateway.
    let mut held = None;
    for t in &cfg.tunnels {
        clear_leftover(&nl, t, &mut held)?;
    }
    let mut slots: Vec<Slot> = Vec::new();
    let mut device_queues = Vec::new();
    for (i, t) in cfg.tunnels.iter().enumerate() {
        match open_slot(&nl, t, underlay.mtu, nworkers, i) {
            Ok((slot, q)) => {
                slots.push(slot);
                device_queues.push(q);
            }
            Err(e) => {
                drop(device_queues);
                for s in &slots {
                    s.release(&nl);
                }
                return Err(e);
            }
        }
    }
    let next_hops = Arc::new(NextHops::new(slots.len()));
    next_hops.set_local(src_mac);
    let tunnels = tunnels_of(&slots, next_hops.clone());

    // XDP program and sockets.
    let mut steering = Steering::load()?;
    steering.set_mac(src_mac)?;
    for key in tunnels.rx.endpoint_keys() {
        steering.add_endpoint(key)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let targets = Arc::new(Mutex::new(Targets {
        remotes: slots
            .iter()
            .map(|s| (s.cfg.name.clone(), s.cfg.remote))
            .collect(),
        hops: next_hops.clone(),
    }));
    let resolver = {
        let (targets, stop, index, name) = (
            targets.clone(),
            stop.clone(),
            underlay.index,
            iface.to_string(),
        );
        std::thread::Builder::new()
            .name("gw-neigh".into())
            .spawn(move || run_resolver(targets, index, name, stop, Duration::from_millis(500)))
            .context("spawning the neighbour resolver")?
    };
    let mut pending: Vec<Worker> = Vec::new();
    let coalesce_udp = tap::uso_supported();
    // The IPv6 flow labels' secret: random per process (std's hasher keys
    // come from the OS's random source).
    let flow_seed = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u32
    };
    let mut stats = Vec::new();
    let mut controls = Vec::new();
    let taps = Arc::new(Taps::new(queues.len()));
    taps.set_tunnel_names(slots.iter().map(|s| s.cfg.name.clone()).collect());
    for (&queue, &core) in queues.iter().zip(&cores) {
        let (xsk, frames) = Xsk::new(
            iface,
            queue,
            cfg.frames_per_queue,
            cfg.ring_size,
            cfg.xsk_bind,
        )?;
        if cfg.busy_poll_budget > 0 {
            xsk.set_busy_poll(cfg.busy_poll_budget).with_context(|| {
                format!("{iface} queue {queue}: setting up busy polling (gateway.busy_poll_budget)")
            })?;
        }
        steering.set_socket(queue, xsk.fd())?;
        let st = Arc::new(WorkerStats::new(queue, core, slots.len()));
        let fds: Vec<OwnedFd> = device_queues
            .iter_mut()
            .map(|d: &mut Vec<OwnedFd>| d.pop().expect("one queue per worker"))
            .collect();
        let (ctl_tx, ctl_rx) = crossbeam::channel::bounded(1);
        pending.push(Worker::new(
            Settings {
                queue,
                core,
                batch: cfg.batch_size,
                poll: cfg.poll,
                busy_poll: cfg.busy_poll_budget > 0,
                coalesce_udp,
                keepalives: pending.is_empty(),
                flow_seed,
                faults: Faults::from_env(),
            },
            xsk,
            frames,
            fds,
            Shared {
                tunnels: tunnels.clone(),
                stop: stop.clone(),
                control: ctl_rx,
                taps: taps.clone(),
            },
            st.clone(),
        ));
        stats.push(st);
        controls.push(ctl_tx);
    }
    // Every worker's UMEM, when device writes are spread: each worker's
    // io_uring writes from the others' too.
    let mut umems: Vec<(Region, Umem)> = Vec::new();
    if cfg.spread_writes {
        if pending.len() < 2 {
            tracing::warn!(
                "gateway.spread_writes has no effect with one worker; serve more queues (gateway.queues)"
            );
        } else {
            umems = pending
                .iter()
                .map(|w| (w.socket().region(), w.socket().umem().clone()))
                .collect();
            let links = crate::engine::handover::mesh(pending.len())
                .context("setting up gateway.spread_writes")?;
            for (w, link) in pending.iter_mut().zip(links) {
                w.set_spread(link);
            }
        }
    }
    let mode = steering.attach(iface, cfg.xdp_attach)?;
    // Said once the control loop listens (signals, the control socket):
    // whoever waits for it may ask for stats at once.
    let announce = {
        let (iface, queues, cores) = (iface.to_string(), queues.clone(), cores.clone());
        let (poll, batch, spread, tunnels) =
            (cfg.poll, cfg.batch_size, cfg.spread_writes, slots.len());
        move || {
            tracing::info!(
                iface,
                xdp = mode,
                queues = ?queues,
                cores = ?cores.iter().flatten().collect::<Vec<_>>(),
                poll = %poll,
                batch,
                spread_writes = spread,
                tunnels,
                "gateway running"
            )
        }
    };

    let mut workers = Vec::new();
    let umems = Arc::new(umems);
    for (me, ((w, st), control)) in pending.into_iter().zip(stats).zip(controls).enumerate() {
        let name = format!("gw-q{}", w.queue);
        let umems = umems.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // (The closure, and with it this hold on the other UMEMs,
                // goes once the ring is set up: the ring holds its own.)
                let result = w.run(move |xsk, setup| {
                    let mut io = DeviceIo::new(
                        setup.entries,
                        file_slots,
                        setup.files,
                        xsk,
                        setup.read_bufs,
                    )?;
                    for (peer, (region, umem)) in umems.iter().enumerate() {
                        if peer != me {
                            io.add_peer(peer, *region, umem.clone());
                        }
                    }
                    Ok(io)
                });
                // Said as it happens (the control thread reports the
                // first failure only, and may be busy with another).
                if let Err(e) = &result {
                    tracing::error!("worker: {e}");
                }
                result
            })
            .context("spawning a worker thread")?;
        workers.push(WorkerHandle {
            control,
            stats: st,
            thread,
        });
    }
    drop(umems);
    // "Running" once every worker takes packets (its fill ring filled, its
    // device reads armed: with thousands of devices that takes a while),
    // or once one has stopped (the control loop reports why).
    let started = std::time::Instant::now();
    while !workers.iter().all(|w| {
        w.thread.is_finished() || w.stats.started.load(std::sync::atomic::Ordering::Acquire)
    }) {
        std::thread::sleep(Duration::from_millis(5));
    }
    if started.elapsed() > Duration::from_secs(1) {
        tracing::info!(
            "workers took {:.1} s to arm their device reads",
            started.elapsed().as_secs_f64()
        );
    }

    let xdp_id = steering.program_id();
    let mut gw = Gateway {
        iface: iface.to_string(),
        taps,
        nl,
        recreate_failed: slots.iter().map(|_| None).collect(),
        orphans: Vec::new(),
        next_peer: slots.len(),
        file_slots,
        cfg,
        underlay,
        slots,
        tunnels,
        targets,
        steering,
        workers,
        events: Events::default(),
        xdp_id,
        xdp_attached: true,
        xdp_seen: xdp_id.unwrap_or(0),
        liveness: Vec::new(),
        readyz_cache: None,
        anycast,
        drain: None,
    };
    gw.liveness = gw.new_liveness();
    let failure = gw.serve(config_path, metrics, signals, announce).err();

    // The routers are told first, so that what they still send in the
    // meantime finds the gateway running; the device goes with it (and
    // with it any address a failed withdrawal left).
    if let Some(mut a) = gw.anycast.take() {
        if let Err(e) = a.withdraw(&gw.nl) {
            tracing::warn!("anycast: withdrawing at stop: {e:#}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut failure = failure;
    let workers = std::mem::take(&mut gw.workers);
    let stats: Vec<_> = workers.iter().map(|w| w.stats.clone()).collect();
    // A worker gets 5 s to drain; one that does not is left behind (the
    // process exit ends it) so the XDP program and devices still go.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|w| !w.thread.is_finished()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // A worker's own error is the cause of what the control loop saw (a
    // worker gone, a reload it did not answer): it is the one reported.
    let mut worker_failed = false;
    for w in workers {
        if !w.thread.is_finished() {
            failure.get_or_insert_with(|| anyhow!("a worker did not stop within 5 s"));
            continue;
        }
        match w.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if !worker_failed {
                    // What the control loop saw is said, not lost.
                    if let Some(f) = failure.replace(anyhow!(e)) {
                        tracing::error!("{f:#}");
                    }
                    worker_failed = true;
                }
            }
            Err(_) => {
                failure.get_or_insert_with(|| anyhow!("a worker panicked"));
            }
        }
    }
    let _ = resolver.join();
    print_stats(&gw.snapshot_of(&stats), "final");
    let Gateway {
        nl,
        slots,
        orphans,
        steering,
        drain,
        ..
    } = gw;
    drop(steering);
    // Closing the queues would remove a non-persistent device, but the
    // kernel releases fds registered with io_uring asynchronously; delete
    // the devices we created explicitly so they are gone when we exit.
    for s in slots.iter().chain(&orphans) {
        s.release(&nl);
    }
    tracing::info!("XDP program detached; devices released");
    if let Some(mut a) = drain.and_then(|d| d.audience) {
        match &failure {
            None => a.say("stopped: XDP program detached, devices released\n"),
            Some(e) => a.say(&format!("error: the gateway stopped on a failure: {e:#}\n")),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Gateway {
    /// The control loop: signals, requests, and watching the host.
    fn serve(
        &mut self,
        config_path: &Path,
        metrics: Option<&str>,
        mut signals: signal_hook::iterator::Signals,
        announce: impl FnOnce(),
    ) -> anyhow::Result<()> {
        let (req_tx, req_rx) = std::sync::mpsc::channel::<Request>();
        crate::telemetry::metrics::serve_control(&self.iface, req_tx.clone(), self.taps.clone())?;
        if let Some(addr) = metrics {
            crate::telemetry::metrics::serve_http(addr, req_tx)?;
            tracing::info!("metrics on http://{addr}/metrics");
        } else {
            drop(req_tx);
        }
        announce();
        let mut systemd = health::Notifier::new();
        let n = self.slots.len();
        systemd.ready(&format!(
            "running on {}: {n} tunnel{}",
            self.iface,
            if n == 1 { "" } else { "s" }
        ));
        let result = self.control_loop(config_path, &req_rx, &mut signals, &mut systemd);
        systemd.stopping();
        result
    }

    fn control_loop(
        &mut self,
        config_path: &Path,
        req_rx: &std::sync::mpsc::Receiver<Request>,
        signals: &mut signal_hook::iterator::Signals,
        systemd: &mut health::Notifier,
    ) -> anyhow::Result<()> {
        let mut last_check = std::time::Instant::now();
        let mut first = true;
        loop {
            crate::io::clock::tick();
            systemd.tick(|| self.alive());
            if first || last_check.elapsed() >= Duration::from_millis(500) {
                first = false;
                last_check = std::time::Instant::now();
                self.watch()?;
                self.watch_liveness();
                if let Some(a) = self.anycast.as_mut() {
                    a.check(&self.nl);
                }
            }
            self.steer_announcement();
            if self.drain_over() {
                return Ok(());
            }
            while let Ok(r) = req_rx.try_recv() {
                match r {
                    Request::Stats { format, reply } => {
                        let snap = self.snapshot();
                        let body = match format {
                            Format::Prometheus => crate::telemetry::metrics::prometheus(&snap),
                            Format::Human => crate::telemetry::human::render(&snap),
                            Format::Json => format!("{snap}\n"),
                        };
                        let _ = reply.send(body);
                    }
                    Request::Reload { reply } => {
                        let answer = self.reload_from(config_path)?;
                        let _ = reply.send(answer);
                    }
                    Request::Health { ready, reply } => {
                        let _ = reply.send(self.health(ready));
                    }
                    Request::Drain { audience } => self.start_drain(Some(audience)),
                }
            }
            for sig in signals.pending() {
                match sig {
                    SIGUSR1 => print_stats(&self.snapshot(), "stats"),
                    SIGUSR2 => self.start_drain(None),
                    SIGHUP => {
                        self.reload_from(config_path)?;
                    }
                    _ => {
                        tracing::info!("signal {sig}: stopping");
                        return Ok(());
                    }
                }
            }
            if self.workers.iter().any(|w| w.thread.is_finished()) {
                bail!("a worker stopped unexpectedly");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn snapshot(&self) -> Value {
        let stats: Vec<_> = self.workers.iter().map(|w| w.stats.clone()).collect();
        self.snapshot_of(&stats)
    }

    fn snapshot_of(&self, stats: &[Arc<WorkerStats>]) -> Value {
        let mut v = snapshot(
            &self.tunnels.rx,
            &self.steering,
            stats,
            &self.tunnels.next_hops,
        );
        v["gateway"] = json!({
            "underlay": self.iface,
            "underlay_up": self.underlay.up,
            "xdp_attached": self.xdp_attached,
            "xdp_program_id": self.xdp_id,
            "events": {
                "reloads": self.events.reloads,
                "reload_failures": self.events.reload_failures,
                "devices_recreated": self.events.devices_recreated,
                "underlay_down": self.events.underlay_down,
                "xdp_lost": self.events.xdp_lost,
                "tunnel_down": self.events.tunnel_down,
                "tunnel_up": self.events.tunnel_up,
            },
        });
        if let Some(a) = &self.anycast {
            v["gateway"]["anycast"] = a.to_json();
        }
        v["gateway"]["draining"] = self.drain.as_ref().map_or(Value::Null, |d| d.to_json());
        v["captures"] = self.taps.figures();
        self.liveness_into(&mut v);
        v
    }
}

/// The kernel's list of VLAN devices of this network namespace (absent
/// until the 8021q module is loaded).
const VLAN_CONFIG: &str = "/proc/net/vlan/config";

/// The VLAN devices on `iface`, from the text of [`VLAN_CONFIG`]: after
/// two header lines, `name | VID | parent` per device.
fn vlans_on(iface: &str, config: &str) -> Vec<String> {
    config
        .lines()
        .skip(2)
        .filter_map(|l| {
            let mut f = l.split('|').map(str::trim);
            let (name, vid, parent) = (f.next()?, f.next()?, f.next()?);
            (parent == iface).then(|| format!("{name}, VLAN {vid}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// The kernel's format (net/8021q/vlanproc.c: two header lines, then
    /// `"%-15s| %d  | %s\n"` per device).
    #[test]
    fn vlans_on_reads_the_kernels_list() {
        let config = "VLAN Dev name\t | VLAN ID\nName-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD\nens0.100       | 100  | ens0\nbond0.7        | 7  | bond0\nens0.2000      | 2000  | ens0\n";
        assert_eq!(
            vlans_on("ens0", config),
            ["ens0.100, VLAN 100", "ens0.2000, VLAN 2000"]
        );
        assert!(vlans_on("ens1", config).is_empty());
        assert!(vlans_on("ens0", "").is_empty());
    }
    use super::*;

    #[test]
    fn tunnels_between_the_same_two_hosts_share_one_id_counter() {
        let a: IpAddr = "192.0.2.8".parse().unwrap();
        let b: IpAddr = "192.0.2.58".parse().unwrap();
        let c: IpAddr = "192.0.2.59".parse().unwrap();
        let (one, two) = (path_ident(a, b), path_ident(a, b));
        assert!(Arc::ptr_eq(&one, &two), "two tunnels a -> b, two counters");
        assert!(
            !Arc::ptr_eq(&one, &path_ident(a, c)),
            "a -> c shares a -> b's"
        );
    }
}
