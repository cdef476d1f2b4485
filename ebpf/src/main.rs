//! The XDP steering program.
//!
//! It runs on every packet the underlay NIC receives and redirects to the
//! AF_XDP socket of the packet's RX queue only GRE (47) and IPIP (4) packets
//! whose outer destination is a configured local endpoint and whose outer
//! source is that endpoint's configured remote. Everything else is
//! `XDP_PASS`, untouched. Every packet is counted once, under the reason for
//! its verdict (userspace adds them up as `seen`).
//!
//! The common case, IPv4 GRE or IPIP from a configured remote to this
//! host's MAC, costs one inlined array lookup (the key's slot in the
//! direct-mapped endpoint table, which holds the MAC too), the redirect,
//! and one per-CPU counter lookup; the hash map is looked up only for keys
//! that share a slot (or when the slot changed while it was read), and the
//! `SETTINGS` map (the MAC) only when the slot did not vouch for the
//! destination.
//!
//! Built for `bpfel-unknown-none` by `gateway/build.rs`; on the host it
//! compiles to an empty binary so that workspace-wide lints work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![warn(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{map, xdp},
        maps::{Array, HashMap, PerCpuArray, XskMap},
        programs::XdpContext,
    };
    use gateway_common::{
        EndpointKeyV4, EndpointKeyV6, EndpointSlotV4, Settings, XdpCounter, XdpCounters,
        IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6, MAX_ENDPOINTS, MAX_QUEUES, SLOTS_V4,
        SLOT_KIND_MASK, SLOT_MANY, SLOT_ONE,
    };

    const ETH_HLEN: usize = 14;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const ETH_P_8021Q: u16 = 0x8100;
    const ETH_P_8021AD: u16 = 0x88a8;
    const IPV6_NEXTHDR_FRAGMENT: u8 = 44;
    const IPV6_NEXTHDR_DSTOPTS: u8 = 60;
    const IPPROTO_ICMP: u8 = 1;
    const ICMP_DEST_UNREACH: u8 = 3;
    const ICMP_FRAG_NEEDED: u8 = 4;
    const IPPROTO_ICMPV6: u8 = 58;
    const ICMPV6_PACKET_TOO_BIG: u8 = 2;

    // In front of ENDPOINTS_V4: a direct-mapped table of IPv4 endpoint
    // keys (the kernel inlines an array's lookup into the program, where a
    // hash map's costs a call, a hash and a few cache misses). A slot
    // holding one key answers alone; one that more keys hash to sends the
    // packet on to the hash map.
    #[map(name = "ENDPOINT_SLOTS_V4")]
    static ENDPOINT_SLOTS_V4: Array<EndpointSlotV4> = Array::with_max_entries(SLOTS_V4, 0);

    // The configured endpoints, one table per family: a key's presence is
    // the answer (for IPv4, asked only when the key's slot says so), its
    // value (1) is never read.
    #[map(name = "ENDPOINTS_V4")]
    static ENDPOINTS_V4: HashMap<EndpointKeyV4, u32> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

    #[map(name = "ENDPOINTS_V6")]
    static ENDPOINTS_V6: HashMap<EndpointKeyV6, u32> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

    #[map(name = "XSKS")]
    static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

    /// One entry: every counter of this CPU, so a packet costs one lookup.
    #[map(name = "COUNTERS")]
    static COUNTERS: PerCpuArray<XdpCounters> = PerCpuArray::with_max_entries(1, 0);

    #[map(name = "SETTINGS")]
    static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

    /// Adds one to `counter` of this CPU. Called once per packet, with
    /// its verdict's counter.
    #[inline(always)]
    fn count(counter: XdpCounter) {
        if let Some(slots) = COUNTERS.get_ptr_mut(0) {
            // SAFETY: the pointer is this CPU's entry of a per-CPU array,
            // valid while the program runs; XDP programs do not preempt
            // each other on one CPU, so nothing else writes it meanwhile.
            let slots = unsafe { &mut *slots };
            if let Some(n) = slots.get_mut(counter as usize) {
                *n += 1;
            }
        }
    }

    /// The packet's bounds, read from the context once.
    #[derive(Clone, Copy)]
    struct Packet {
        start: usize,
        end: usize,
    }

    impl Packet {
        #[inline(always)]
        fn of(ctx: &XdpContext) -> Packet {
            Packet {
                start: ctx.data(),
                end: ctx.data_end(),
            }
        }

        /// The `N` bytes at `offset` from the start of the packet, or `None`
        /// when the packet is shorter. The check against the end comes
        /// right before the read, as the verifier wants.
        #[inline(always)]
        fn bytes<const N: usize>(&self, offset: usize) -> Option<&[u8; N]> {
            if self.start + offset + N > self.end {
                return None;
            }
            // SAFETY: `start + offset .. start + offset + N` lies inside the
            // packet (the kernel's `data .. data_end`, valid while the
            // program runs), checked just above; `[u8; N]` has alignment 1.
            Some(unsafe { &*((self.start + offset) as *const [u8; N]) })
        }
    }

    #[xdp]
    pub fn gateway_steer(ctx: XdpContext) -> u32 {
        let pkt = Packet::of(&ctx);
        // A frame unicast to another host is not ours, whatever it
        // carries; that needs the interface's MAC from SETTINGS, unless
        // the endpoint's slot already vouched for the destination.
        let verdict = match classify(pkt) {
            Ok(Vouched::Yes) => Ok(()),
            r => for_this_host(pkt).and(r.map(|_| ())),
        };
        let (action, counter) = match verdict {
            Ok(()) => to_socket(&ctx),
            Err(reason) => (xdp_action::XDP_PASS, reason),
        };
        count(counter);
        action
    }

    /// Whether a packet `classify` took is known to be for this host.
    enum Vouched {
        /// Multicast, or unicast to the MAC its endpoint's slot holds.
        Yes,
        /// Not known: `SETTINGS` says.
        Ask,
    }

    /// `Err(PassOtherHost)` for a frame unicast to a MAC other than the
    /// interface's (once userspace has told the program its MAC).
    #[inline(always)]
    fn for_this_host(pkt: Packet) -> Result<(), XdpCounter> {
        // A runt (shorter than an Ethernet header) is `PassTruncated`.
        let Some(eth) = pkt.bytes::<ETH_HLEN>(0) else {
            return Ok(());
        };
        if eth[0] & 1 == 0 {
            if let Some(s) = SETTINGS.get(0) {
                if s.mac_set != 0 && eth[0..6] != s.mac {
                    return Err(XdpCounter::PassOtherHost);
                }
            }
        }
        Ok(())
    }

    /// Redirects to the AF_XDP socket of the packet's RX queue; a queue
    /// without one passes the packet to the kernel. The action, and the
    /// counter it goes under.
    #[inline(always)]
    fn to_socket(ctx: &XdpContext) -> (u32, XdpCounter) {
        match XSKS.redirect(ctx.rx_queue_index(), xdp_action::XDP_PASS as u64) {
            Ok(action) => (action, XdpCounter::Redirected),
            Err(_) => (xdp_action::XDP_PASS, XdpCounter::PassNoSocket),
        }
    }

    /// For the bench's wire ceiling: counts (as `Seen`, the one counter it
    /// touches) and drops everything.
    #[xdp]
    pub fn bench_drop(_ctx: XdpContext) -> u32 {
        count(XdpCounter::Seen);
        xdp_action::XDP_DROP
    }

    /// For the bench's generator, and the ceiling of the steering program's
    /// run time: what libxdp's default program does, every packet to the
    /// AF_XDP socket of its RX queue (or to the kernel when the queue has
    /// none), nothing counted.
    #[xdp]
    pub fn bench_redirect_all(ctx: XdpContext) -> u32 {
        match XSKS.redirect(ctx.rx_queue_index(), xdp_action::XDP_PASS as u64) {
            Ok(action) | Err(action) => action,
        }
    }

    /// `Ok` when the packet belongs to a configured tunnel endpoint (and
    /// whether its destination MAC is known to be ours), else the reason
    /// it is passed to the kernel, the destination MAC not yet looked at.
    #[inline(always)]
    fn classify(pkt: Packet) -> Result<Vouched, XdpCounter> {
        let eth = pkt.bytes::<ETH_HLEN>(0).ok_or(XdpCounter::PassTruncated)?;
        let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
        // The tunnels' endpoints are on the underlay itself, untagged: a
        // VLAN-tagged frame is its VLAN's (the kernel hands it to that
        // VLAN's device, or drops it), never a tunnel packet of this
        // underlay's. (A NIC that strips tags in hardware shows them
        // untagged: see the README's limitations.)
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            return Err(XdpCounter::PassVlan);
        }
        let l3 = ETH_HLEN;
        match ethertype {
            ETH_P_IP => {
                let ip = pkt.bytes::<20>(l3).ok_or(XdpCounter::PassTruncated)?;
                if ip[0] >> 4 != 4 || ip[0] & 0x0f < 5 {
                    return Err(XdpCounter::PassNotIp);
                }
                let proto = ip[9];
                if proto == IPPROTO_ICMP {
                    // A fragment of an ICMP message is the kernel's to
                    // reassemble: the gateway reassembles tunnel packets only.
                    if (ip[6] & 0x3f) | ip[7] != 0 {
                        return Err(XdpCounter::PassFragment);
                    }
                    let to = [ip[16], ip[17], ip[18], ip[19]];
                    return icmp_about_a_tunnel(pkt, l3, ip[0] & 0x0f, to).map(|()| Vouched::Ask);
                }
                // GRE, IPIP, and IPv6 in IPv4 (sit).
                if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                    return Err(XdpCounter::PassOtherProto);
                }
                // Fragments go to the gateway too (every fragment's header
                // has the addresses and protocol); it reassembles them.
                let key = v4_key(ip, 16, 12, proto);
                match find_v4(&key) {
                    Found::InSlot(lo, hi)
                        if eth[0] & 1 != 0
                            || (u16::from_ne_bytes([eth[0], eth[1]]) == lo
                                && u32::from_ne_bytes([eth[2], eth[3], eth[4], eth[5]]) == hi) =>
                    {
                        Ok(Vouched::Yes)
                    }
                    Found::InSlot(..) | Found::InMap => Ok(Vouched::Ask),
                    Found::No => Err(XdpCounter::PassNoEndpoint),
                }
            }
            ETH_P_IPV6 => {
                let ip = pkt.bytes::<40>(l3).ok_or(XdpCounter::PassTruncated)?;
                if ip[0] >> 4 != 6 {
                    return Err(XdpCounter::PassNotIp);
                }
                let mut next = ip[6];
                if next == IPPROTO_ICMPV6 {
                    let mut to = [0u8; 16];
                    to.copy_from_slice(&ip[24..40]);
                    return icmpv6_about_a_tunnel(pkt, l3, &to).map(|()| Vouched::Ask);
                }
                // One destination-options header (RFC 2473's encapsulation
                // limit, which ip6tnl and ip6gre send by default) is looked
                // through; its first byte is the next header.
                if next == IPV6_NEXTHDR_DSTOPTS {
                    next = pkt.bytes::<1>(l3 + 40).ok_or(XdpCounter::PassTruncated)?[0];
                }
                let mut key = v6_key(ip, 24, 8, next);
                if next == IPV6_NEXTHDR_FRAGMENT {
                    // A fragment: only the first says which tunnel protocol
                    // follows (the others may say "destination options"),
                    // so any tunnel between these endpoints takes it.
                    for proto in [IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6] {
                        key.0.proto = proto;
                        if has_v6(&key) {
                            return Ok(Vouched::Ask);
                        }
                    }
                    return Err(XdpCounter::PassFragment);
                }
                // GRE, IPv4 in IPv6 (ipip6), IPv6 in IPv6 (ip6ip6).
                if next != IPPROTO_GRE && next != IPPROTO_IPIP && next != IPPROTO_IPV6 {
                    return Err(if is_ipv6_ext_header(next) {
                        XdpCounter::PassIpv6ExtHeader
                    } else {
                        XdpCounter::PassOtherProto
                    });
                }
                if has_v6(&key) {
                    Ok(Vouched::Ask)
                } else {
                    Err(XdpCounter::PassNoEndpoint)
                }
            }
            _ => Err(XdpCounter::PassNotIp),
        }
    }

    /// An ICMP "fragmentation needed" whose quoted packet is one the gateway
    /// sent on a configured tunnel (source = a tunnel's local address,
    /// destination = its remote, a tunnel protocol), and that is addressed
    /// (`to`) to that local address, goes to the gateway, which lowers that
    /// path's MTU; every other ICMP message, to the kernel. Only outer
    /// headers without options are looked into.
    #[inline(always)]
    fn icmp_about_a_tunnel(pkt: Packet, l3: usize, ihl: u8, to: [u8; 4]) -> Result<(), XdpCounter> {
        if ihl != 5 {
            return Err(XdpCounter::PassOtherProto);
        }
        let icmp = pkt.bytes::<8>(l3 + 20).ok_or(XdpCounter::PassOtherProto)?;
        if icmp[0] != ICMP_DEST_UNREACH || icmp[1] != ICMP_FRAG_NEEDED {
            return Err(XdpCounter::PassOtherProto);
        }
        let quoted = pkt.bytes::<20>(l3 + 28).ok_or(XdpCounter::PassOtherProto)?;
        let proto = quoted[9];
        if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
            return Err(XdpCounter::PassOtherProto);
        }
        // For another host: not ours to act on, whatever it quotes.
        if to != [quoted[12], quoted[13], quoted[14], quoted[15]] {
            return Err(XdpCounter::PassOtherHost);
        }
        let key = v4_key(quoted, 12, 16, proto);
        if has_v4(&key) {
            Ok(())
        } else {
            Err(XdpCounter::PassOtherProto)
        }
    }

    /// The IPv6 counterpart: an ICMPv6 "packet too big" quoting a packet
    /// the gateway sent on a configured tunnel (looking through the
    /// encapsulation-limit header it sends) goes to the gateway.
    #[inline(always)]
    fn icmpv6_about_a_tunnel(pkt: Packet, l3: usize, to: &[u8; 16]) -> Result<(), XdpCounter> {
        let icmp = pkt.bytes::<8>(l3 + 40).ok_or(XdpCounter::PassOtherProto)?;
        if icmp[0] != ICMPV6_PACKET_TOO_BIG {
            return Err(XdpCounter::PassOtherProto);
        }
        let quoted = pkt.bytes::<40>(l3 + 48).ok_or(XdpCounter::PassOtherProto)?;
        let mut proto = quoted[6];
        if proto == IPV6_NEXTHDR_DSTOPTS {
            proto = pkt.bytes::<1>(l3 + 88).ok_or(XdpCounter::PassOtherProto)?[0];
        }
        if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
            return Err(XdpCounter::PassOtherProto);
        }
        let key = v6_key(quoted, 8, 24, proto);
        if *to != key.0.local {
            return Err(XdpCounter::PassOtherHost);
        }
        if has_v6(&key) {
            Ok(())
        } else {
            Err(XdpCounter::PassOtherProto)
        }
    }

    /// A lookup key on the stack, 8-aligned: with misaligned loads allowed
    /// (ebpf/build.rs) the compiler may store a key in 8-byte words, and
    /// the verifier takes only aligned stack accesses.
    #[repr(C, align(8))]
    struct Key<K>(K);

    /// Whether `key` is a configured IPv4 endpoint: its slot of the
    /// direct-mapped table answers, or, when more than one key hashes
    /// there, the hash map. By reference: passed by value, the key would
    /// be moved to a stack slot of the callee's choosing, aligned or not.
    #[inline(always)]
    fn has_v4(key: &Key<EndpointKeyV4>) -> bool {
        !matches!(find_v4(key), Found::No)
    }

    /// What the IPv4 tables say of a key.
    enum Found {
        No,
        /// In its own slot, which holds the interface's MAC: its first two
        /// bytes and its last four, each as one word in memory order.
        InSlot(u16, u32),
        /// In the hash map (its slot is shared).
        InMap,
    }

    /// Looks `key` up: its slot of the direct-mapped table, and the hash
    /// map only when more than one key hashes to that slot, or when the
    /// slot changed while it was read (the protocol of
    /// [`EndpointSlotV4`]: its state, then its key and MAC, then its state
    /// again; volatile, so the compiler keeps that order, and through a raw
    /// pointer, as userspace may be writing the slot meanwhile).
    #[inline(always)]
    fn find_v4(key: &Key<EndpointKeyV4>) -> Found {
        let k = &key.0;
        let Some(slot) = ENDPOINT_SLOTS_V4.get_ptr(k.slot()) else {
            return Found::No;
        };
        // The reads below are of `slot`, a pointer into the array map's
        // value (valid while the program runs, 8-aligned by the kernel),
        // each at a field offset aligned for its width: 4-byte words at 0,
        // 4 and 12, a 2-byte one at 10, bytes at 8 and 9. Userspace may be
        // writing the slot meanwhile (through the kernel's map update): in
        // Rust's memory model that is a race volatile does not make
        // defined; what this relies on is what the BPF target makes of
        // these reads, one plain load each, in this order, that may see
        // old or new bytes and nothing else, which the state read twice
        // then judges.
        // SAFETY: as just said.
        let state = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).state)) };
        let kind = state & SLOT_KIND_MASK;
        if kind == SLOT_ONE {
            let base = slot as *const u8;
            // SAFETY: as above; the MAC's bytes 10..16 read as a 2-byte
            // and a 4-byte word at their own alignment.
            let (local, remote, proto, mac_lo, mac_hi) = unsafe {
                (
                    core::ptr::read_volatile(base as *const u32),
                    core::ptr::read_volatile(base.add(4) as *const u32),
                    core::ptr::read_volatile(core::ptr::addr_of!((*slot).proto)),
                    core::ptr::read_volatile(base.add(10) as *const u16),
                    core::ptr::read_volatile(base.add(12) as *const u32),
                )
            };
            // SAFETY: as above.
            let again = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*slot).state)) };
            if again == state {
                let matches = local == u32::from_ne_bytes(k.local)
                    && remote == u32::from_ne_bytes(k.remote)
                    && proto == k.proto;
                return if matches {
                    Found::InSlot(mac_lo, mac_hi)
                } else {
                    Found::No
                };
            }
        } else if kind != SLOT_MANY {
            return Found::No;
        }
        if ENDPOINTS_V4.get_ptr(k).is_some() {
            Found::InMap
        } else {
            Found::No
        }
    }

    /// Whether the IPv6 endpoint table has `key`, as [`has_v4`].
    #[inline(always)]
    #[allow(clippy::needless_borrows_for_generic_args)]
    fn has_v6(key: &Key<EndpointKeyV6>) -> bool {
        ENDPOINTS_V6.get_ptr(&key.0).is_some()
    }

    /// The 4 bytes of `hdr` at `at`, as one word in memory order.
    #[inline(always)]
    fn word<const N: usize>(hdr: &[u8; N], at: usize) -> u32 {
        u32::from_ne_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]])
    }

    /// The IPv4 table's key of the addresses at `local` and `remote` in
    /// the IPv4 header `hdr` (constant offsets), and `proto`. Built of
    /// whole words: a key built field by field gets its 3 zero pad bytes
    /// from a call to memset (the BPF backend expands no memset inline).
    #[inline(always)]
    fn v4_key(hdr: &[u8; 20], local: usize, remote: usize, proto: u8) -> Key<EndpointKeyV4> {
        let words = [
            word(hdr, local),
            word(hdr, remote),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: `EndpointKeyV4` is `repr(C)`, 12 bytes of `u8` fields
        // (local, remote, proto, pad) with no padding, so any 12 bytes are
        // a valid value; each word keeps its bytes in memory order, so
        // these are local, remote, then proto and three zeros.
        Key(unsafe { core::mem::transmute::<[u32; 3], EndpointKeyV4>(words) })
    }

    /// The IPv6 table's key, as [`v4_key`], from an IPv6 header.
    #[inline(always)]
    fn v6_key(hdr: &[u8; 40], local: usize, remote: usize, proto: u8) -> Key<EndpointKeyV6> {
        let words = [
            word(hdr, local),
            word(hdr, local + 4),
            word(hdr, local + 8),
            word(hdr, local + 12),
            word(hdr, remote),
            word(hdr, remote + 4),
            word(hdr, remote + 8),
            word(hdr, remote + 12),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: as in `v4_key`: `EndpointKeyV6` is `repr(C)`, 36 bytes
        // of `u8` fields with no padding; the words hold local, remote,
        // then proto and three zeros.
        Key(unsafe { core::mem::transmute::<[u32; 9], EndpointKeyV6>(words) })
    }

    /// IPv6 extension headers that may stand between the fixed header and a
    /// tunnel header (hop-by-hop, routing, destination options, AH, mobility).
    #[inline(always)]
    fn is_ipv6_ext_header(next: u8) -> bool {
        matches!(next, 0 | 43 | 60 | 51 | 135)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[link_section = "license"]
    #[no_mangle]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
