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
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use gateway_common::EndpointKey;
use serde_json::{json, Value};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

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
use crate::telemetry::metrics::{Format, Request};
use crate::telemetry::snapshot::{print_stats, snapshot};
use crate::telemetry::stats::WorkerStats;
use xsk_rs::Umem;

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

/// A locally administered MAC that stands for the far side of a tunnel in
/// the Ethernet headers written into its tap. Numbered per device for the
/// life of the process, so a reload never changes a running tunnel's.
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
    let setup = || -> anyhow::Result<LinkInfo> {
        // Large packets and partial checksums in what is read: the
        // worker segments and completes them.
        tap::set_offload(
            &queues[0],
            &t.device,
            crate::engine::worker::DEVICE_OFFLOADS,
        )?;
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
        Ok(link)
    };
    match setup() {
        Ok(link) => Ok(Device {
            queues,
            link,
            created: !existed,
        }),
        Err(e) => {
            if !existed {
                if let Ok(Some(l)) = nl.link(&t.device) {
                    let _ = nl.delete(&l);
                }
            }
            Err(e)
        }
    }
}

/// The tunnel MTU: configured, or the underlay's less the overhead.
pub fn tunnel_mtu(t: &TunnelConfig, underlay_mtu: u32) -> anyhow::Result<u16> {
    match t.mtu {
        Some(m) => Ok(m),
        // The underlay's MTU less the tunnel's headers, no more than a UMEM
        // frame carries (a jumbo underlay is clamped, with a warning).
        None => Ok(t.auto_mtu(underlay_mtu)?),
    }
}

/// A running tunnel and its device.
struct Slot {
    cfg: TunnelConfig,
    mtu: u16,
    link: LinkInfo,
    /// The gateway created the device (and deletes it when done).
    created: bool,
    device_mac: [u8; 6],
    peer_mac: [u8; 6],
    /// The last GRE sequence number sent (`oseq`).
    oseq: Option<Arc<AtomicU32>>,
    /// The path MTU learned from the underlay.
    path_mtu: Arc<crate::datapath::encap::PathMtu>,
    /// Outer IPv4 IDs of packets sent without DF (see `TunnelTx::ident`).
    ident: Arc<std::sync::atomic::AtomicU16>,
}

impl Slot {
    fn rx(&self) -> TunnelRx {
        let t = &self.cfg;
        TunnelRx {
            name: t.name.clone(),
            mode: t.mode,
            local: t.local,
            remote: t.remote,
            ikey: t.ikey,
            icsum: t.icsum,
            iseq: t.iseq,
            device_kind: t.device_kind,
            device_mac: self.device_mac,
            peer_mac: self.peer_mac,
            mtu: self.mtu,
            allowed_sources: t
                .peer
                .map(|p| {
                    let mut v = vec![crate::datapath::tunnel::Prefix::host(p)];
                    v.extend(t.accept_from.iter().copied());
                    v
                })
                .unwrap_or_default(),
        }
    }

    fn tx(&self) -> TunnelTx {
        let t = &self.cfg;
        TunnelTx {
            mode: t.mode,
            local: t.local,
            remote: t.remote,
            encap_limit: t.encap_limit,
            path_mtu: self.path_mtu.clone(),
            ident: self.ident.clone(),
            okey: t.okey,
            ocsum: t.ocsum,
            oseq: self.oseq.clone(),
            ttl: t.ttl,
            tos: t.tos,
            pmtudisc: t.pmtudisc,
            ignore_df: t.ignore_df,
            mtu: self.mtu,
            device_kind: t.device_kind,
            device_mac: self.device_mac,
            peer_mac: self.peer_mac,
            address: t.address,
            peer: t.peer,
        }
    }

    /// Deletes the device if the gateway made it and is not to keep it.
    fn release(&self, nl: &Netlink) {
        if self.created && !self.cfg.persistent {
            if let Err(e) = nl.delete(&self.link) {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Opens (creating if needed) the device of `t` with one queue per worker.
fn open_slot(
    nl: &Netlink,
    t: &TunnelConfig,
    underlay_mtu: u32,
    workers: usize,
    peer_id: usize,
) -> anyhow::Result<(Slot, Vec<OwnedFd>)> {
    let mtu = tunnel_mtu(t, underlay_mtu)?;
    let dev = open_device(nl, t, mtu, workers)?;
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
    Ok((
        Slot {
            cfg: t.clone(),
            mtu,
            link: dev.link,
            created: dev.created,
            device_mac,
            peer_mac: peer_mac(peer_id),
            oseq: t.oseq.then(|| Arc::new(AtomicU32::new(0))),
            path_mtu: Default::default(),
            ident: path_ident(t.local, t.remote),
        },
        dev.queues,
    ))
}

/// The outer IPv4 identification counter of packets sent without DF from
/// `local` to `remote`: one for every tunnel between the two (RFC 6864:
/// unique per source, destination and protocol; several tunnels, keyed or
/// gre beside gretap, share protocol 47), shared by all workers, kept while
/// a tunnel uses it, and started at a random value, as the kernel's
/// `__ip_select_ident` keeps its counters per destination, hashed with a
/// secret.
fn path_ident(local: IpAddr, remote: IpAddr) -> Arc<std::sync::atomic::AtomicU16> {
    use std::collections::HashMap;
    use std::hash::{BuildHasher, Hasher};
    type Counters = HashMap<(IpAddr, IpAddr), std::sync::Weak<std::sync::atomic::AtomicU16>>;
    static COUNTERS: std::sync::Mutex<Option<Counters>> = std::sync::Mutex::new(None);
    let mut guard = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    map.retain(|_, w| w.strong_count() > 0);
    if let Some(c) = map.get(&(local, remote)).and_then(std::sync::Weak::upgrade) {
        return c;
    }
    let start = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u16;
    let c = Arc::new(std::sync::atomic::AtomicU16::new(start));
    map.insert((local, remote), Arc::downgrade(&c));
    c
}

fn tunnels_of(slots: &[Slot], next_hops: Arc<NextHops>) -> Tunnels {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Tunnels {
        generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        rx: Arc::new(TunnelTable::new(slots.iter().map(Slot::rx).collect())),
        tx: Arc::new(slots.iter().map(Slot::tx).collect()),
        next_hops,
    }
}

/// A change a reload made to a device it carries over, and how to put it
/// back.
enum DeviceChange {
    /// The MTU it had.
    Mtu(LinkInfo, u16),
    /// An address added (to remove).
    AddressAdded(LinkInfo, IpAddr),
    /// An address and peer removed (to add back).
    AddressRemoved(LinkInfo, IpAddr, IpAddr),
    /// The persistence it had.
    Persistent(TunnelConfig, bool),
}

/// What a reload changed before it could fail.
#[derive(Default)]
struct Undo {
    endpoints_added: Vec<EndpointKey>,
    endpoints_removed: Vec<EndpointKey>,
    devices: Vec<DeviceChange>,
}

/// Sets a device's persistence through a queue opened for the purpose
/// (TUNSETPERSIST needs one; the workers' stay untouched).
fn set_persistent(t: &TunnelConfig, on: bool) -> anyhow::Result<()> {
    let q = tap::open_queue(&t.device, t.device_kind)?;
    tap::set_persistent(&q, &t.device, on)?;
    Ok(())
}

/// Why a reload did not happen.
enum ReloadError {
    /// Refused before anything changed: the running configuration stays.
    Refused(anyhow::Error),
    /// A worker did not take the new list; the gateway must stop.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for ReloadError {
    fn from(e: anyhow::Error) -> Self {
        ReloadError::Refused(e)
    }
}

/// Counts of what happened to the gateway while it ran.
#[derive(Debug, Default)]
struct Events {
    reloads: u64,
    reload_failures: u64,
    devices_recreated: u64,
    underlay_down: u64,
    xdp_lost: u64,
}

struct WorkerHandle {
    control: crossbeam::channel::Sender<Reconfig>,
    stats: Arc<WorkerStats>,
    thread: std::thread::JoinHandle<Result<(), WorkerError>>,
}

/// The running gateway, as the control thread holds it.
struct Gateway {
    iface: String,
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
    let nl = Netlink::new()?;
    let underlay = nl.link(iface)?.ok_or_else(|| {
        anyhow!("interface {iface} does not exist in this network namespace; give an existing one with --iface (see `ip link`)")
    })?;
    if !underlay.up {
        tracing::warn!("{iface} is down; the gateway will receive nothing until it is up");
    }
    let queues = plan_queues(&cfg, iface)?;
    let cores = plan_cores(&cfg, queues.len())?;
    let nworkers = queues.len();
    let src_mac = underlay.mac.ok_or_else(|| {
        anyhow!("{iface} has no MAC address; the gateway needs an Ethernet underlay")
    })?;

    // Devices.
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
    let mut stats = Vec::new();
    let mut controls = Vec::new();
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
                faults: Faults::from_env(),
            },
            xsk,
            frames,
            fds,
            Shared {
                tunnels: tunnels.clone(),
                stop: stop.clone(),
                control: ctl_rx,
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
    tracing::info!(
        iface,
        xdp = mode,
        queues = ?queues,
        cores = ?cores.iter().flatten().collect::<Vec<_>>(),
        poll = %cfg.poll,
        batch = cfg.batch_size,
        spread_writes = cfg.spread_writes,
        tunnels = slots.len(),
        "gateway running"
    );

    let mut workers = Vec::new();
    let umems = Arc::new(umems);
    for (me, ((w, st), control)) in pending.into_iter().zip(stats).zip(controls).enumerate() {
        let name = format!("gw-q{}", w.queue);
        let umems = umems.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                w.run(|xsk, setup| {
                    let mut io = DeviceIo::new(
                        setup.entries,
                        MAX_TUNNELS as u32,
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
                })
            })
            .context("spawning a worker thread")?;
        workers.push(WorkerHandle {
            control,
            stats: st,
            thread,
        });
    }

    let xdp_id = steering.program_id();
    let mut gw = Gateway {
        iface: iface.to_string(),
        nl,
        recreate_failed: slots.iter().map(|_| None).collect(),
        orphans: Vec::new(),
        next_peer: slots.len(),
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
    };
    let failure = gw.serve(config_path, metrics).err();

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
    for w in workers {
        if !w.thread.is_finished() {
            failure.get_or_insert_with(|| anyhow!("a worker did not stop within 5 s"));
            continue;
        }
        match w.thread.join() {
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
    print_stats(&gw.snapshot_of(&stats), "final");
    let Gateway {
        nl,
        slots,
        orphans,
        steering,
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
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Gateway {
    /// The control loop: signals, requests, and watching the host.
    fn serve(&mut self, config_path: &Path, metrics: Option<&str>) -> anyhow::Result<()> {
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGHUP])
            .context("installing signal handlers")?;
        let (req_tx, req_rx) = std::sync::mpsc::channel::<Request>();
        crate::telemetry::metrics::serve_control(&self.iface, req_tx.clone())?;
        if let Some(addr) = metrics {
            crate::telemetry::metrics::serve_http(addr, req_tx)?;
            tracing::info!("metrics on http://{addr}/metrics");
        } else {
            drop(req_tx);
        }
        let mut last_check = std::time::Instant::now();
        loop {
            crate::io::clock::tick();
            if last_check.elapsed() >= Duration::from_millis(500) {
                last_check = std::time::Instant::now();
                self.watch()?;
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
                }
            }
            for sig in signals.pending() {
                match sig {
                    SIGUSR1 => print_stats(&self.snapshot(), "stats"),
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

    /// Reads the configuration again and applies it. The answer is one
    /// line: what changed, or why nothing did. Errs only when the gateway
    /// cannot go on.
    fn reload_from(&mut self, path: &Path) -> anyhow::Result<String> {
        let new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                self.events.reload_failures += 1;
                let line = format!("error: reload refused, the running configuration stays: {e}");
                tracing::error!("{line}");
                return Ok(line);
            }
        };
        match self.apply(new, None) {
            Ok(summary) => {
                self.events.reloads += 1;
                let line = format!("reloaded {}: {summary}", path.display());
                tracing::info!("{line}");
                Ok(line)
            }
            Err(ReloadError::Refused(e)) => {
                self.events.reload_failures += 1;
                let line = format!("error: reload refused, the running configuration stays: {e:#}");
                tracing::error!("{line}");
                Ok(line)
            }
            Err(ReloadError::Fatal(e)) => Err(e),
        }
    }

    /// Switches to `new`. Devices of tunnels that keep their device stay
    /// open (their workers never stop reading them); `renew` names a
    /// tunnel whose device must be opened afresh (it was deleted).
    fn apply(&mut self, new: Config, renew: Option<usize>) -> Result<String, ReloadError> {
        if let Some(field) = restart_only_change(&self.cfg, &new) {
            return Err(anyhow!(
                "gateway.{field} changed, and [gateway] settings take effect only when the gateway restarts; restart it, or reload with the old value"
            )
            .into());
        }
        // Which running tunnel each new one continues, by device.
        let mut reuse: Vec<Option<usize>> = Vec::with_capacity(new.tunnels.len());
        for t in &new.tunnels {
            tunnel_mtu(t, self.underlay.mtu)?;
            let old = self
                .slots
                .iter()
                .position(|s| s.cfg.device == t.device)
                .filter(|&j| Some(j) != renew);
            if let Some(j) = old {
                if self.slots[j].cfg.device_kind != t.device_kind {
                    return Err(anyhow!(
                        "tunnel \"{}\": device {} would change from {} to {}; remove the tunnel in one reload and add it back in the next, or restart",
                        t.name, t.device, self.slots[j].cfg.device_kind, t.device_kind
                    )
                    .into());
                }
            }
            reuse.push(old);
        }

        // Open the new devices; on failure close what was opened.
        let workers = self.workers.len();
        let mut opened: Vec<Option<(Slot, Vec<OwnedFd>)>> = Vec::new();
        let mut next_peer = self.next_peer;
        for (t, r) in new.tunnels.iter().zip(&reuse) {
            if r.is_some() {
                opened.push(None);
                continue;
            }
            match open_slot(&self.nl, t, self.underlay.mtu, workers, next_peer) {
                Ok(o) => {
                    next_peer += 1;
                    opened.push(Some(o));
                }
                Err(e) => {
                    for (s, _) in opened.into_iter().flatten() {
                        s.release(&self.nl);
                    }
                    return Err(e.into());
                }
            }
        }

        // The new slots. A device opened again (`renew`) stays ours if it
        // was, but only once the reload has gone through: until then a
        // failure must not delete a device the workers still use.
        let mut slots = Vec::with_capacity(new.tunnels.len());
        let mut queues: Vec<Option<Vec<OwnedFd>>> = Vec::with_capacity(new.tunnels.len());
        let mut renewed_created = None;
        for (i, ((t, r), o)) in new.tunnels.iter().zip(&reuse).zip(opened).enumerate() {
            match (r, o) {
                (Some(j), _) => {
                    let old = &self.slots[*j];
                    slots.push(Slot {
                        cfg: t.clone(),
                        mtu: tunnel_mtu(t, self.underlay.mtu)?,
                        link: old.link.clone(),
                        created: old.created,
                        device_mac: old.device_mac,
                        peer_mac: old.peer_mac,
                        // The numbering goes on across a reload.
                        oseq: t.oseq.then(|| {
                            old.oseq
                                .clone()
                                .unwrap_or_else(|| Arc::new(AtomicU32::new(0)))
                        }),
                        // The path is the same as long as the endpoints are.
                        path_mtu: if (old.cfg.local, old.cfg.remote) == (t.local, t.remote) {
                            old.path_mtu.clone()
                        } else {
                            Default::default()
                        },
                        ident: path_ident(t.local, t.remote),
                    });
                    queues.push(None);
                }
                (None, Some((slot, q))) => {
                    if let Some(old) = renew.and_then(|j| self.slots.get(j)) {
                        if old.cfg.device == slot.cfg.device && old.created {
                            renewed_created = Some(i);
                        }
                    }
                    slots.push(slot);
                    queues.push(Some(q));
                }
                (None, None) => unreachable!("a tunnel not carried over was opened"),
            }
        }

        // Everything below that can fail is undone when it does, so a
        // refused reload leaves the host as it found it.
        let mut undo = Undo::default();
        let result = self.prepare(&slots, &reuse, &mut undo);
        let tunnels = match result {
            Ok(t) => t,
            Err(e) => {
                self.undo(undo);
                for (s, q) in slots.iter().zip(&queues) {
                    if q.is_some() {
                        s.release(&self.nl);
                    }
                }
                return Err(e.into());
            }
        };
        if let Some(i) = renewed_created {
            slots[i].created = true;
        }
        let next_hops = tunnels.next_hops.clone();

        // Switch the workers, all of them, then tidy up.
        let counters_from: Vec<Option<usize>> = slots
            .iter()
            .map(|s| self.slots.iter().position(|o| o.cfg.name == s.cfg.name))
            .collect();
        let (done_tx, done_rx) = crossbeam::channel::unbounded();
        let mut fatal = None;
        for w in &self.workers {
            let devices = reuse
                .iter()
                .zip(queues.iter_mut())
                .map(|(r, q)| match (r, q) {
                    (Some(j), _) => DeviceQueue::Keep(*j),
                    (None, Some(q)) => DeviceQueue::New(q.pop().expect("one queue per worker")),
                    (None, None) => unreachable!(),
                })
                .collect();
            let msg = Reconfig {
                tunnels: tunnels.clone(),
                devices,
                counters_from: counters_from.clone(),
                done: done_tx.clone(),
            };
            if w.control.send(msg).is_err() {
                fatal = Some(anyhow!("a worker stopped during a reload"));
                break;
            }
        }
        if fatal.is_none() {
            for _ in &self.workers {
                match done_rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        fatal = Some(anyhow!("reload: {e}"));
                        break;
                    }
                    Err(_) => {
                        fatal = Some(anyhow!(
                            "reload: a worker did not take the new tunnels within 5 s"
                        ));
                        break;
                    }
                }
            }
        }
        if let Some(e) = fatal {
            // The gateway stops; the devices this reload made go too.
            for (s, q) in slots.into_iter().zip(&queues) {
                if q.is_some() {
                    self.orphans.push(s);
                }
            }
            return Err(ReloadError::Fatal(e));
        }
        {
            let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            *t = Targets {
                remotes: slots
                    .iter()
                    .map(|s| (s.cfg.name.clone(), s.cfg.remote))
                    .collect(),
                hops: next_hops,
            };
        }
        let mut summary = Summary::default();
        for (j, old) in self.slots.iter().enumerate() {
            if !reuse.contains(&Some(j)) {
                if Some(j) != renew {
                    old.release(&self.nl);
                }
                if !new.tunnels.iter().any(|t| t.name == old.cfg.name) {
                    summary.removed.push(old.cfg.name.clone());
                }
            }
        }
        for s in &slots {
            match self.slots.iter().find(|o| o.cfg.name == s.cfg.name) {
                None => summary.added.push(s.cfg.name.clone()),
                Some(o) if o.cfg != s.cfg || o.link.index != s.link.index => {
                    summary.changed.push(s.cfg.name.clone())
                }
                Some(_) => summary.unchanged += 1,
            }
        }
        self.recreate_failed = slots.iter().map(|_| None).collect();
        self.slots = slots;
        self.tunnels = tunnels;
        self.cfg = new;
        self.next_peer = next_peer;
        Ok(summary.to_string())
    }

    /// The steps of a reload that can fail, each recorded in `undo`:
    /// endpoints in the XDP program (stale ones out first, so both lists
    /// need not fit in the table at once), then the settings of devices
    /// carried over. Returns the new tables.
    fn prepare(
        &mut self,
        slots: &[Slot],
        reuse: &[Option<usize>],
        undo: &mut Undo,
    ) -> anyhow::Result<Tunnels> {
        // New tables; next hops carried over by remote so no packet waits
        // for resolution.
        let next_hops = Arc::new(NextHops::new(slots.len()));
        if let Some(m) = self.tunnels.next_hops.local() {
            next_hops.set_local(m);
        }
        for (i, s) in slots.iter().enumerate() {
            if let Some(j) = self.slots.iter().position(|o| o.cfg.remote == s.cfg.remote) {
                next_hops.set(i, self.tunnels.next_hops.get(j));
            }
        }
        let tunnels = tunnels_of(slots, next_hops);
        let wanted: Vec<EndpointKey> = tunnels.rx.endpoint_keys().copied().collect();
        let running: Vec<EndpointKey> = self.tunnels.rx.endpoint_keys().copied().collect();
        for key in running.iter().filter(|k| !wanted.contains(k)) {
            self.steering.remove_endpoint(key)?;
            undo.endpoints_removed.push(*key);
        }
        for key in wanted.iter().filter(|k| !running.contains(k)) {
            self.steering.add_endpoint(key)?;
            undo.endpoints_added.push(*key);
        }
        for (s, r) in slots.iter().zip(reuse) {
            let Some(j) = r else { continue };
            self.adjust_device(j.to_owned(), &s.cfg, s.mtu, undo)?;
        }
        Ok(tunnels)
    }

    /// Puts back what a refused reload changed, newest first.
    fn undo(&mut self, undo: Undo) {
        for change in undo.devices.into_iter().rev() {
            let r = match change {
                DeviceChange::Mtu(link, mtu) => self
                    .nl
                    .set_up(&link, Some(u32::from(mtu)))
                    .map_err(anyhow::Error::from),
                DeviceChange::AddressAdded(link, a) => self
                    .nl
                    .del_peer_address(&link, a)
                    .map_err(anyhow::Error::from),
                DeviceChange::AddressRemoved(link, a, p) => self
                    .nl
                    .add_peer_address(&link, a, p)
                    .map_err(anyhow::Error::from),
                DeviceChange::Persistent(t, was) => set_persistent(&t, was),
            };
            if let Err(e) = r {
                tracing::warn!("putting a device back after a refused reload: {e:#}");
            }
        }
        for key in &undo.endpoints_added {
            if let Err(e) = self.steering.remove_endpoint(key) {
                tracing::warn!("{e}");
            }
        }
        for key in &undo.endpoints_removed {
            if let Err(e) = self.steering.add_endpoint(key) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Brings the device of running tunnel `j` in line with its new
    /// settings, recording each change in `undo`.
    fn adjust_device(
        &self,
        j: usize,
        t: &TunnelConfig,
        mtu: u16,
        undo: &mut Undo,
    ) -> anyhow::Result<()> {
        let old = &self.slots[j];
        if mtu != old.mtu {
            self.nl.set_up(&old.link, Some(u32::from(mtu)))?;
            undo.devices
                .push(DeviceChange::Mtu(old.link.clone(), old.mtu));
        }
        if (t.address, t.peer) != (old.cfg.address, old.cfg.peer) {
            if let (Some(a), Some(p)) = (old.cfg.address, old.cfg.peer) {
                self.nl.del_peer_address(&old.link, a)?;
                undo.devices
                    .push(DeviceChange::AddressRemoved(old.link.clone(), a, p));
            }
            if let (Some(a), Some(p)) = (t.address, t.peer) {
                self.nl.add_peer_address(&old.link, a, p)?;
                undo.devices
                    .push(DeviceChange::AddressAdded(old.link.clone(), a));
            }
        }
        if t.persistent != old.cfg.persistent {
            set_persistent(t, t.persistent)?;
            undo.devices
                .push(DeviceChange::Persistent(t.clone(), old.cfg.persistent));
        }
        Ok(())
    }

    /// Looks at the underlay, the XDP attachment and the devices.
    fn watch(&mut self) -> anyhow::Result<()> {
        let iface = self.iface.clone();
        let link = match self.nl.link(&iface) {
            Ok(Some(l)) => l,
            Ok(None) => bail!("{iface} disappeared; the gateway cannot go on without its underlay"),
            Err(e) => {
                tracing::warn!("{e}");
                return Ok(());
            }
        };
        // The underlay's MAC: the outer source, and what the XDP program
        // takes as ours.
        if let (Some(m), old) = (link.mac, self.underlay.mac) {
            if Some(m) != old {
                tracing::info!(
                    "{iface} changed its MAC to {}",
                    crate::control::neighbour::format_mac(&m)
                );
                self.tunnels.next_hops.set_local(m);
                if let Err(e) = self.steering.set_mac(m) {
                    tracing::warn!("{e}");
                }
            }
        }
        if link.up != self.underlay.up {
            if link.up {
                tracing::info!("{iface} is up again; tunnel traffic resumes");
            } else {
                self.events.underlay_down += 1;
                tracing::warn!("{iface} went down; no tunnel traffic until it is up");
            }
        }
        // Our XDP program, still attached? Reported at each change.
        if link.xdp_prog != self.xdp_seen {
            let ours = self.xdp_id == Some(link.xdp_prog);
            if ours {
                tracing::info!("the gateway's XDP program is attached to {iface} again");
            } else {
                if self.xdp_attached {
                    self.events.xdp_lost += 1;
                }
                if link.xdp_prog == 0 {
                    tracing::error!("the gateway's XDP program was detached from {iface} by something else; tunnel packets now go to the kernel; restart the gateway to attach it again");
                } else {
                    tracing::error!("another XDP program (id {}) is attached to {iface} in place of the gateway's; tunnel packets now go to it; detach it and restart the gateway", link.xdp_prog);
                }
            }
            self.xdp_attached = ours;
            self.xdp_seen = link.xdp_prog;
        }
        self.underlay = link;

        // Devices deleted from under us (or failing) come back.
        let failed: Vec<bool> = {
            let counters: Vec<_> = self.workers.iter().map(|w| w.stats.tunnels()).collect();
            (0..self.slots.len())
                .map(|i| {
                    counters.iter().any(|c| {
                        c.device_failed
                            .get(i)
                            .is_some_and(|f| f.load(Ordering::Relaxed))
                    })
                })
                .collect()
        };
        for (i, &failed) in failed.iter().enumerate() {
            let s = &self.slots[i];
            let present = match self.nl.link(&s.cfg.device) {
                Ok(l) => l.is_some_and(|l| l.index == s.link.index),
                Err(_) => true,
            };
            if present && !failed {
                continue;
            }
            if self.recreate_failed[i].is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            let name = s.cfg.name.clone();
            let device = s.cfg.device.clone();
            let what = if present { "failed" } else { "was deleted" };
            match self.apply(self.cfg.clone(), Some(i)) {
                Ok(_) => {
                    self.events.devices_recreated += 1;
                    tracing::warn!(tunnel = %name, "device {device} {what} under the gateway; opened it again");
                }
                Err(ReloadError::Refused(e)) => {
                    if self.recreate_failed[i].is_none() {
                        tracing::error!(tunnel = %name, "device {device} {what} and cannot be opened again yet: {e:#}");
                    }
                    self.recreate_failed[i] = Some(std::time::Instant::now());
                }
                Err(ReloadError::Fatal(e)) => return Err(e),
            }
            // The slots changed; look again next time.
            break;
        }
        Ok(())
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
            },
        });
        v
    }
}

/// The first `[gateway]` setting that differs (they need a restart).
fn restart_only_change(old: &Config, new: &Config) -> Option<&'static str> {
    [
        ("iface", old.iface != new.iface),
        ("queues", old.queues != new.queues),
        ("cores", old.cores != new.cores),
        ("batch_size", old.batch_size != new.batch_size),
        (
            "busy_poll_budget",
            old.busy_poll_budget != new.busy_poll_budget,
        ),
        ("spread_writes", old.spread_writes != new.spread_writes),
        ("poll", old.poll != new.poll),
        ("xdp_mode", old.xdp_attach != new.xdp_attach),
        ("xsk_bind", old.xsk_bind != new.xsk_bind),
        (
            "frames_per_queue",
            old.frames_per_queue != new.frames_per_queue,
        ),
        ("ring_size", old.ring_size != new.ring_size),
    ]
    .into_iter()
    .find(|(_, changed)| *changed)
    .map(|(f, _)| f)
}

#[derive(Default)]
struct Summary {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
    unchanged: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "added {}; removed {}; changed {}; {} unchanged",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            self.unchanged
        )
    }
}

#[cfg(test)]
mod tests {
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
