//! The XDP steering program.
//!
//! It runs on every packet the underlay NIC receives and redirects to the
//! AF_XDP socket of the packet's RX queue only GRE (47) and IPIP (4) packets
//! whose outer destination is a configured local endpoint and whose outer
//! source is that endpoint's configured remote. Everything else is
//! `XDP_PASS`, untouched. Every packet is counted as seen and once more under
//! the reason for its verdict.
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
        EndpointKey, Settings, XdpCounter, IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6, MAX_ENDPOINTS,
        MAX_QUEUES, XDP_COUNTER_COUNT,
    };

    const ETH_HLEN: usize = 14;
    const VLAN_HLEN: usize = 4;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const ETH_P_8021Q: u16 = 0x8100;
    const IPV6_NEXTHDR_FRAGMENT: u8 = 44;
    const IPV6_NEXTHDR_DSTOPTS: u8 = 60;
    const IPPROTO_ICMP: u8 = 1;
    const ICMP_DEST_UNREACH: u8 = 3;
    const ICMP_FRAG_NEEDED: u8 = 4;
    const IPPROTO_ICMPV6: u8 = 58;
    const ICMPV6_PACKET_TOO_BIG: u8 = 2;

    #[map(name = "ENDPOINTS")]
    static ENDPOINTS: HashMap<EndpointKey, u32> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

    #[map(name = "XSKS")]
    static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

    #[map(name = "COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(XDP_COUNTER_COUNT, 0);

    #[map(name = "SETTINGS")]
    static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

    #[inline(always)]
    fn count(counter: XdpCounter) {
        if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
            // SAFETY: the pointer is this CPU's slot of a per-CPU array; XDP
            // programs do not preempt each other on one CPU.
            unsafe { *slot += 1 };
        }
    }

    /// The `N` bytes at `offset` from the start of the packet, or `None` when
    /// the packet is shorter. The check against `data_end` comes right before
    /// the read, as the verifier wants.
    #[inline(always)]
    fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
        let start = ctx.data();
        let end = ctx.data_end();
        if start + offset + N > end {
            return None;
        }
        // SAFETY: `start + offset .. start + offset + N` lies inside the
        // packet, checked just above; `[u8; N]` has alignment 1.
        Some(unsafe { &*((start + offset) as *const [u8; N]) })
    }

    #[xdp]
    pub fn gateway_steer(ctx: XdpContext) -> u32 {
        count(XdpCounter::Seen);
        match classify(&ctx) {
            Ok(()) => to_socket(&ctx),
            Err(reason) => {
                count(reason);
                xdp_action::XDP_PASS
            }
        }
    }

    /// Redirects to the AF_XDP socket of the packet's RX queue; a queue
    /// without one passes the packet to the kernel.
    #[inline(always)]
    fn to_socket(ctx: &XdpContext) -> u32 {
        match XSKS.redirect(ctx.rx_queue_index(), xdp_action::XDP_PASS as u64) {
            Ok(action) => {
                count(XdpCounter::Redirected);
                action
            }
            Err(_) => {
                count(XdpCounter::PassNoSocket);
                xdp_action::XDP_PASS
            }
        }
    }

    /// For the bench's wire ceiling: counts and drops everything.
    #[xdp]
    pub fn bench_drop(_ctx: XdpContext) -> u32 {
        count(XdpCounter::Seen);
        xdp_action::XDP_DROP
    }

    /// For the bench's generator: every packet to its AF_XDP socket.
    #[xdp]
    pub fn bench_redirect_all(ctx: XdpContext) -> u32 {
        count(XdpCounter::Seen);
        to_socket(&ctx)
    }

    /// `Ok` when the packet belongs to a configured tunnel endpoint, else the
    /// reason it is passed to the kernel.
    #[inline(always)]
    fn classify(ctx: &XdpContext) -> Result<(), XdpCounter> {
        let eth = bytes::<ETH_HLEN>(ctx, 0).ok_or(XdpCounter::PassTruncated)?;
        // Unicast to another host: not ours, whatever it carries.
        if eth[0] & 1 == 0 {
            if let Some(s) = SETTINGS.get(0) {
                if s.mac_set != 0 && eth[0..6] != s.mac {
                    return Err(XdpCounter::PassOtherHost);
                }
            }
        }
        let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
        let mut l3 = ETH_HLEN;
        if ethertype == ETH_P_8021Q {
            let tag = bytes::<VLAN_HLEN>(ctx, ETH_HLEN).ok_or(XdpCounter::PassTruncated)?;
            ethertype = u16::from_be_bytes([tag[2], tag[3]]);
            l3 = ETH_HLEN + VLAN_HLEN;
        }
        let key = match ethertype {
            ETH_P_IP => {
                let ip = bytes::<20>(ctx, l3).ok_or(XdpCounter::PassTruncated)?;
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
                    return icmp_about_a_tunnel(ctx, l3, ip[0] & 0x0f, to);
                }
                // GRE, IPIP, and IPv6 in IPv4 (sit).
                if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                    return Err(XdpCounter::PassOtherProto);
                }
                // Fragments go to the gateway too (every fragment's header
                // has the addresses and protocol); it reassembles them.
                EndpointKey::v4(
                    [ip[16], ip[17], ip[18], ip[19]],
                    [ip[12], ip[13], ip[14], ip[15]],
                    proto,
                )
            }
            ETH_P_IPV6 => {
                let ip = bytes::<40>(ctx, l3).ok_or(XdpCounter::PassTruncated)?;
                if ip[0] >> 4 != 6 {
                    return Err(XdpCounter::PassNotIp);
                }
                let mut next = ip[6];
                if next == IPPROTO_ICMPV6 {
                    let mut to = [0u8; 16];
                    to.copy_from_slice(&ip[24..40]);
                    return icmpv6_about_a_tunnel(ctx, l3, &to);
                }
                // One destination-options header (RFC 2473's encapsulation
                // limit, which ip6tnl and ip6gre send by default) is looked
                // through; its first byte is the next header.
                if next == IPV6_NEXTHDR_DSTOPTS {
                    next = bytes::<1>(ctx, l3 + 40).ok_or(XdpCounter::PassTruncated)?[0];
                }
                let mut local = [0u8; 16];
                let mut remote = [0u8; 16];
                local.copy_from_slice(&ip[24..40]);
                remote.copy_from_slice(&ip[8..24]);
                if next == IPV6_NEXTHDR_FRAGMENT {
                    // A fragment: only the first says which tunnel protocol
                    // follows (the others may say "destination options"),
                    // so any tunnel between these endpoints takes it.
                    for proto in [IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6] {
                        // SAFETY: as below: a plain value, not kept.
                        if unsafe { ENDPOINTS.get(EndpointKey::v6(local, remote, proto)) }.is_some()
                        {
                            return Ok(());
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
                EndpointKey::v6(local, remote, next)
            }
            _ => return Err(XdpCounter::PassNotIp),
        };
        // SAFETY: the value is a plain `u32` that userspace only replaces
        // whole; the reference does not outlive this lookup.
        match unsafe { ENDPOINTS.get(key) } {
            Some(_) => Ok(()),
            None => Err(XdpCounter::PassNoEndpoint),
        }
    }

    /// An ICMP "fragmentation needed" whose quoted packet is one the gateway
    /// sent on a configured tunnel (source = a tunnel's local address,
    /// destination = its remote, a tunnel protocol), and that is addressed
    /// (`to`) to that local address, goes to the gateway, which lowers that
    /// path's MTU; every other ICMP message, to the kernel. Only outer
    /// headers without options are looked into.
    #[inline(always)]
    fn icmp_about_a_tunnel(
        ctx: &XdpContext,
        l3: usize,
        ihl: u8,
        to: [u8; 4],
    ) -> Result<(), XdpCounter> {
        if ihl != 5 {
            return Err(XdpCounter::PassOtherProto);
        }
        let icmp = bytes::<8>(ctx, l3 + 20).ok_or(XdpCounter::PassOtherProto)?;
        if icmp[0] != ICMP_DEST_UNREACH || icmp[1] != ICMP_FRAG_NEEDED {
            return Err(XdpCounter::PassOtherProto);
        }
        let quoted = bytes::<20>(ctx, l3 + 28).ok_or(XdpCounter::PassOtherProto)?;
        let proto = quoted[9];
        if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
            return Err(XdpCounter::PassOtherProto);
        }
        // For another host: not ours to act on, whatever it quotes.
        if to != [quoted[12], quoted[13], quoted[14], quoted[15]] {
            return Err(XdpCounter::PassOtherHost);
        }
        let key = EndpointKey::v4(
            [quoted[12], quoted[13], quoted[14], quoted[15]],
            [quoted[16], quoted[17], quoted[18], quoted[19]],
            proto,
        );
        // SAFETY: as in `classify`: a plain value, not kept.
        match unsafe { ENDPOINTS.get(key) } {
            Some(_) => Ok(()),
            None => Err(XdpCounter::PassOtherProto),
        }
    }

    /// The IPv6 counterpart: an ICMPv6 "packet too big" quoting a packet
    /// the gateway sent on a configured tunnel (looking through the
    /// encapsulation-limit header it sends) goes to the gateway.
    #[inline(always)]
    fn icmpv6_about_a_tunnel(ctx: &XdpContext, l3: usize, to: &[u8; 16]) -> Result<(), XdpCounter> {
        let icmp = bytes::<8>(ctx, l3 + 40).ok_or(XdpCounter::PassOtherProto)?;
        if icmp[0] != ICMPV6_PACKET_TOO_BIG {
            return Err(XdpCounter::PassOtherProto);
        }
        let quoted = bytes::<40>(ctx, l3 + 48).ok_or(XdpCounter::PassOtherProto)?;
        let mut proto = quoted[6];
        if proto == IPV6_NEXTHDR_DSTOPTS {
            proto = bytes::<1>(ctx, l3 + 88).ok_or(XdpCounter::PassOtherProto)?[0];
        }
        if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
            return Err(XdpCounter::PassOtherProto);
        }
        let mut local = [0u8; 16];
        let mut remote = [0u8; 16];
        local.copy_from_slice(&quoted[8..24]);
        remote.copy_from_slice(&quoted[24..40]);
        if *to != local {
            return Err(XdpCounter::PassOtherHost);
        }
        // SAFETY: as in `classify`: a plain value, not kept.
        match unsafe { ENDPOINTS.get(EndpointKey::v6(local, remote, proto)) } {
            Some(_) => Ok(()),
            None => Err(XdpCounter::PassOtherProto),
        }
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
