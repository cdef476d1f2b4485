//! The tunnels' slots: each tunnel's device (opened, or created with one
//! queue per worker), its MTU, and the receive and transmit halves the
//! workers get; which queues and cores the workers take.

use super::*;
use std::collections::HashSet;

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

/// Files a gateway holds besides its device queues: sockets, rings,
/// netlink, the XDP program's maps, the control socket and its clients.
const SPARE_FILES: u64 = 256;

/// Makes sure the process may open a queue of every device for every
/// worker: raises the soft limit on open files as far as needed, up to
/// the hard one, and says in one line what to do when even that is too low.
pub(super) fn ensure_open_files(tunnels: usize, workers: usize) -> anyhow::Result<()> {
    let needed = (tunnels * workers) as u64 + SPARE_FILES;
    let have = crate::io::raise_open_files(needed).context("reading RLIMIT_NOFILE")?;
    if have < needed {
        bail!(
            "{tunnels} tunnels with {workers} worker(s) need about {needed} open files (a queue of every device for every worker) and this process may open {have} (RLIMIT_NOFILE, hard limit); raise it (LimitNOFILE= in the service, `ulimit -n` as root), serve fewer queues (gateway.queues) or configure fewer tunnels"
        );
    }
    Ok(())
}

/// How many device files each worker's io_uring registers: room for every
/// tunnel a reload may bring (`MAX_TUNNELS`), but no more than the process
/// may open, for io_uring refuses a table larger than RLIMIT_NOFILE (a
/// Linux 6.1 guest starts with 1024). Raises the soft limit toward that
/// room, up to the hard limit.
pub(super) fn registered_file_slots() -> anyhow::Result<u32> {
    let want = MAX_TUNNELS as u64 + SPARE_FILES;
    let have = crate::io::raise_open_files(want).context("reading RLIMIT_NOFILE")?;
    Ok(have.min(MAX_TUNNELS as u64) as u32)
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
pub(super) fn peer_mac(i: usize) -> [u8; 6] {
    [0x02, 0x47, 0x57, 0x00, (i >> 8) as u8, i as u8]
}

/// A tunnel device opened for `queues` workers.
pub(super) struct Device {
    pub(super) queues: Vec<OwnedFd>,
    pub(super) link: LinkInfo,
    pub(super) created: bool,
}

pub(super) fn open_device(
    nl: &Netlink,
    t: &TunnelConfig,
    mtu: u16,
    workers: usize,
) -> anyhow::Result<Device> {
    let existed = nl.link(&t.device)?.is_some();
    let mut queues = Vec::with_capacity(workers);
    for _ in 0..workers {
        queues.push(tap::open_queue(&t.device, t.device_kind)?);
    }
    let setup = || -> anyhow::Result<LinkInfo> {
        // Large packets and partial checksums in what is read: the
        // worker segments and completes them.
        tap::set_offload(&queues[0], &t.device, crate::io::tap::DEVICE_OFFLOADS)?;
        if t.persistent {
            tap::set_persistent(&queues[0], &t.device, true)?;
        }
        let link = nl
            .link(&t.device)?
            .ok_or_else(|| anyhow!("device {} vanished right after it was opened", t.device))?;
        if !existed && !link.up {
            // No default qdisc over the device's 256 TX queues (see
            // `set_noqueue`); a device the host made keeps its own.
            nl.set_noqueue(&link)?;
        }
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

/// At start, a device that exists with queues attached that no living
/// process holds is a leftover: most often of a gateway killed with
/// SIGKILL (or crashed), whose io_uring the kernel did not release, so its
/// queues stay attached and its device stays. The kernel would send part
/// of the device's flows to those queues, and nobody reads them. Such a
/// device, not persistent, is deleted, to be created afresh; a persistent
/// one (its bridge ports and addresses are someone's configuration) is
/// kept, and said to lose packets until it is deleted. A device a living
/// process holds (another program, another gateway) is left alone, as
/// before: the gateway attaches beside it, and a warning says so.
/// `held` is filled once, on the first device that needs it.
pub(super) fn clear_leftover(
    nl: &Netlink,
    t: &TunnelConfig,
    held: &mut Option<HashSet<String>>,
) -> anyhow::Result<()> {
    let Some(state) = nl.tun_state(&t.device)? else {
        return Ok(());
    };
    if state.queues == 0 {
        return Ok(());
    }
    if held.get_or_insert_with(held_by_living).contains(&t.device) {
        tracing::warn!(
            device = %t.device,
            "device {} has {} queue(s) held by a running process; the gateway attaches beside it, and the kernel may send part of the device's flows there",
            t.device,
            state.queues
        );
        return Ok(());
    }
    if state.persistent {
        tracing::error!(
            device = %t.device,
            held = state.queues,
            "device {} has {} queue(s) attached that no running process holds (a gateway that was killed?); the kernel sends part of its packets there and they are lost: delete the device (ip link del {}) and restart",
            t.device,
            state.queues,
            t.device
        );
        return Ok(());
    }
    if let Some(link) = nl.link(&t.device)? {
        nl.delete(&link)?;
        tracing::warn!(
            device = %t.device,
            "device {} was left with {} queue(s) attached that no running process holds (a gateway that was killed?); deleted, to be created afresh",
            t.device,
            state.queues
        );
    }
    Ok(())
}

/// The tun and tap devices some living process (in this PID namespace, and
/// in this network namespace, where device names are ours) holds a queue
/// of: its open `/dev/net/tun` files, whose fdinfo names the device
/// (`iff:`).
fn held_by_living() -> HashSet<String> {
    let mut names = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return names;
    };
    let netns = |p: &Path| std::fs::read_link(p.join("ns/net")).ok();
    let ours = netns(Path::new("/proc/self"));
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if ours.is_some() && netns(&p.path()) != ours {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if !std::fs::read_link(fd.path()).is_ok_and(|l| l == Path::new("/dev/net/tun")) {
                continue;
            }
            let Ok(info) = std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
            else {
                continue;
            };
            for line in info.lines() {
                if let Some(name) = line.strip_prefix("iff:") {
                    names.insert(name.trim().to_string());
                }
            }
        }
    }
    names
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
pub(super) struct Slot {
    pub(super) cfg: TunnelConfig,
    pub(super) mtu: u16,
    pub(super) link: LinkInfo,
    /// The gateway created the device (and deletes it when done).
    pub(super) created: bool,
    pub(super) device_mac: [u8; 6],
    pub(super) peer_mac: [u8; 6],
    /// The last GRE sequence number sent (`oseq`).
    pub(super) oseq: Option<Arc<AtomicU32>>,
    /// The path MTU learned from the underlay.
    pub(super) path_mtu: Arc<crate::datapath::encap::PathMtu>,
    /// Outer IPv4 IDs of packets sent without DF (see `TunnelTx::ident`).
    pub(super) ident: Arc<std::sync::atomic::AtomicU16>,
}

impl Slot {
    pub(super) fn rx(&self) -> TunnelRx {
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

    pub(super) fn tx(&self) -> TunnelTx {
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
            keepalive: t.keepalive.map(|k| crate::datapath::encap::KeepaliveProbe {
                interval: k.interval,
                reply_key: t.ikey,
                reply_csum: t.icsum,
            }),
        }
    }

    /// Deletes the device if the gateway made it and is not to keep it.
    pub(super) fn release(&self, nl: &Netlink) {
        if self.created && !self.cfg.persistent {
            if let Err(e) = nl.delete(&self.link) {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Opens (creating if needed) the device of `t` with one queue per worker.
pub(super) fn open_slot(
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
pub(super) fn path_ident(local: IpAddr, remote: IpAddr) -> Arc<std::sync::atomic::AtomicU16> {
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

pub(super) fn tunnels_of(slots: &[Slot], next_hops: Arc<NextHops>) -> Tunnels {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Tunnels {
        generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        rx: Arc::new(TunnelTable::new(slots.iter().map(Slot::rx).collect())),
        tx: Arc::new(slots.iter().map(Slot::tx).collect()),
        next_hops,
        names: Arc::new(
            slots
                .iter()
                .map(|s| Arc::from(s.cfg.name.as_str()))
                .collect(),
        ),
    }
}

/// Sets a device's persistence through a queue opened for the purpose
/// (TUNSETPERSIST needs one; the workers' stay untouched).
pub(super) fn set_persistent(t: &TunnelConfig, on: bool) -> anyhow::Result<()> {
    let q = tap::open_queue(&t.device, t.device_kind)?;
    tap::set_persistent(&q, &t.device, on)?;
    Ok(())
}
