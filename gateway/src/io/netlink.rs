//! Link and address configuration through rtnetlink (never by running `ip`).
//! rtnetlink is asynchronous; this module gives the control thread a small
//! blocking interface over a current-thread tokio runtime.
#![deny(unsafe_code)]

use std::net::IpAddr;

use futures_util::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, LinkXdp};
use rtnetlink::{Handle, LinkUnspec};

/// What the gateway needs to know of an interface.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    /// The XDP program attached to the link (0: none).
    pub xdp_prog: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket ({0})")]
    Connect(std::io::Error),
    #[error("{what}: {reason}")]
    Request { what: String, reason: String },
}

pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn describe(e: &rtnetlink::Error) -> String {
    match errno(e) {
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => e.to_string(),
    }
}

impl Netlink {
    pub fn new() -> Result<Netlink, NetlinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Connect)?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, std::io::Error>(handle)
        });
        Ok(Netlink {
            handle: handle.map_err(NetlinkError::Connect)?,
            rt,
        })
    }

    /// The interface called `name`, or `None` when there is none.
    pub fn link(&self, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
        let handle = self.handle.clone();
        let res = self.rt.block_on(async move {
            handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next()
                .await
        });
        match res {
            Ok(Some(msg)) => Ok(Some(link_info(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(NetlinkError::Request {
                what: format!("looking up interface {name}"),
                reason: describe(&e),
            }),
        }
    }

    /// Every interface, by name, in one dump without statistics (10,000
    /// tunnel devices are one request, not 10,000).
    pub fn links(&self) -> Result<std::collections::HashMap<String, LinkInfo>, NetlinkError> {
        use netlink_packet_route::link::LinkExtentMask;
        let handle = self.handle.clone();
        let res: Result<Vec<LinkMessage>, _> = self.rt.block_on(async move {
            handle
                .link()
                .get()
                .set_filter_mask(
                    netlink_packet_route::AddressFamily::Unspec,
                    vec![LinkExtentMask::SkipStats],
                )
                .execute()
                .try_collect()
                .await
        });
        let list = res.map_err(|e| NetlinkError::Request {
            what: "listing the interfaces".into(),
            reason: describe(&e),
        })?;
        Ok(list
            .iter()
            .map(link_info)
            .map(|l| (l.name.clone(), l))
            .collect())
    }

    /// Gives a device that is down the `noqueue` root qdisc, so that
    /// bringing it up attaches no default one: a multi-queue tun or tap has
    /// 256 TX queues, and the default (`mq` over a `pfifo_fast` per queue)
    /// costs about 5 MiB of kernel memory and 15 ms per device, which
    /// 10,000 devices cannot afford. The gateway reads the device's packets
    /// as they come; a qdisc in front of its queues would only hold them.
    pub fn set_noqueue(&self, link: &LinkInfo) -> Result<(), NetlinkError> {
        use futures_util::StreamExt;
        use rtnetlink::packet_core::{
            NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
        };
        use rtnetlink::packet_route::tc::{TcAttribute, TcHandle, TcMessage};
        use rtnetlink::packet_route::RouteNetlinkMessage;
        let mut msg = TcMessage::with_index(link.index as i32);
        msg.header.parent = TcHandle::ROOT;
        msg.attributes.push(TcAttribute::Kind("noqueue".into()));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewQueueDiscipline(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        let mut handle = self.handle.clone();
        self.rt
            .block_on(async move {
                let mut resp = handle.request(req)?;
                while let Some(m) = resp.next().await {
                    if let NetlinkPayload::Error(e) = m.payload {
                        if e.code.is_some() {
                            return Err(rtnetlink::Error::NetlinkError(e));
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| NetlinkError::Request {
                what: format!("setting {}'s qdisc to noqueue", link.name),
                reason: describe(&e),
            })
    }

    /// Sets the MTU (when given) and brings the link up.
    pub fn set_up(&self, link: &LinkInfo, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut b = LinkUnspec::new_with_index(link.index).up();
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        let msg = b.build();
        let handle = self.handle.clone();
        self.rt
            .block_on(async move { handle.link().set(msg).execute().await })
            .map_err(|e| NetlinkError::Request {
                what: format!("setting {} up (mtu {:?})", link.name, mtu),
                reason: describe(&e),
            })
    }

    /// Sets the link's carrier (`ip link set DEV carrier on|off`): a tun or
    /// tap without carrier is down to the kernel's routing (its routes go
    /// `linkdown`), as a cable pulled out.
    pub fn set_carrier(&self, link: &LinkInfo, on: bool) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(link.index).carrier(on).build();
        let handle = self.handle.clone();
        self.rt
            .block_on(async move { handle.link().set(msg).execute().await })
            .map_err(|e| NetlinkError::Request {
                what: format!(
                    "setting {}'s carrier {}",
                    link.name,
                    if on { "on" } else { "off" }
                ),
                reason: describe(&e),
            })
    }

    /// Deletes the link (as `ip link del` does). A link already gone is fine.
    pub fn delete(&self, link: &LinkInfo) -> Result<(), NetlinkError> {
        let handle = self.handle.clone();
        let index = link.index;
        match self
            .rt
            .block_on(async move { handle.link().del(index).execute().await })
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(NetlinkError::Request {
                what: format!("deleting {}", link.name),
                reason: describe(&e),
            }),
        }
    }

    /// Adds `local peer PEER` to the link, as `ip addr add LOCAL peer PEER
    /// dev LINK` does: the kernel then routes PEER into the link. An address
    /// already present is fine.
    pub fn add_peer_address(
        &self,
        link: &LinkInfo,
        local: IpAddr,
        peer: IpAddr,
    ) -> Result<(), NetlinkError> {
        let prefix = if peer.is_ipv4() { 32 } else { 128 };
        let handle = self.handle.clone();
        let res = self.rt.block_on(async move {
            let mut req = handle.address().add(link.index, local, prefix);
            let msg = req.message_mut();
            msg.attributes
                .retain(|a| !matches!(a, AddressAttribute::Address(_)));
            msg.attributes.push(AddressAttribute::Address(peer));
            if local.is_ipv4()
                && !msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Local(_)))
            {
                msg.attributes.push(AddressAttribute::Local(local));
            }
            req.execute().await
        });
        match res {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(NetlinkError::Request {
                what: format!("adding {local} peer {peer} to {}", link.name),
                reason: describe(&e),
            }),
        }
    }
}

impl Netlink {
    /// Removes what [`Netlink::add_peer_address`] added. An address already
    /// gone is fine.
    pub fn del_peer_address(&self, link: &LinkInfo, local: IpAddr) -> Result<(), NetlinkError> {
        let handle = self.handle.clone();
        let index = link.index;
        let res = self.rt.block_on(async move {
            let mut found = Vec::new();
            let mut s = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute();
            while let Some(m) = s.try_next().await? {
                let ours = m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Local(l) | AddressAttribute::Address(l) if *l == local)
                });
                if ours {
                    found.push(m);
                }
            }
            for m in found {
                match handle.address().del(m).execute().await {
                    Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
                    other => other?,
                }
            }
            Ok::<(), rtnetlink::Error>(())
        });
        res.map_err(|e| NetlinkError::Request {
            what: format!("removing {local} from {}", link.name),
            reason: describe(&e),
        })
    }
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        xdp_prog: 0,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => info.name = n.clone(),
            LinkAttribute::Mtu(m) => info.mtu = *m,
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(a);
                info.mac = Some(m);
            }
            LinkAttribute::Xdp(x) => {
                for a in x {
                    if let LinkXdp::ProgId(id) | LinkXdp::DrvProgId(id) | LinkXdp::SkbProgId(id) = a
                    {
                        info.xdp_prog = *id;
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// The neighbour table by (interface index, address): state and MAC.
pub type Neighbours = std::collections::HashMap<(u32, IpAddr), (NeighState, Option<[u8; 6]>)>;

/// Neighbour-table state of a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeighState {
    /// A usable MAC (reachable, permanent, noarp, or being re-checked).
    Valid,
    /// A MAC the kernel no longer vouches for: usable, but refresh it.
    Stale,
    /// Being resolved, failed, or not there.
    Missing,
}

impl Netlink {
    /// The kernel's route to `dst`: the gateway (if any) and the output
    /// interface index.
    pub fn route_to(&self, dst: IpAddr) -> Result<Option<(Option<IpAddr>, u32)>, NetlinkError> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute};
        let msg = match dst {
            IpAddr::V4(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let handle = self.handle.clone();
        let res = self
            .rt
            .block_on(async move { handle.route().get(msg).execute().try_next().await });
        let route = match res {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(None),
            Err(e)
                if matches!(
                    errno(&e),
                    Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH)
                ) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(NetlinkError::Request {
                    what: format!("looking up the route to {dst}"),
                    reason: describe(&e),
                })
            }
        };
        let mut gateway = None;
        let mut oif = None;
        for a in &route.attributes {
            match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        Ok(oif.map(|o| (gateway, o)))
    }

    /// The neighbour entry of `ip` on interface `index`.
    pub fn neighbour(
        &self,
        index: u32,
        ip: IpAddr,
    ) -> Result<(NeighState, Option<[u8; 6]>), NetlinkError> {
        Ok(self
            .neighbours()?
            .get(&(index, ip))
            .copied()
            .unwrap_or((NeighState::Missing, None)))
    }

    /// The whole neighbour table in one dump: each entry's state and MAC
    /// by interface index and address (an entry without a MAC is
    /// `Missing`).
    pub fn neighbours(&self) -> Result<Neighbours, NetlinkError> {
        use netlink_packet_route::neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourState,
        };
        let handle = self.handle.clone();
        let res: Result<Vec<_>, _> = self
            .rt
            .block_on(async move { handle.neighbours().get().execute().try_collect().await });
        let list = res.map_err(|e| NetlinkError::Request {
            what: "reading the neighbour table".into(),
            reason: describe(&e),
        })?;
        let mut table = Neighbours::with_capacity(list.len());
        for n in list {
            let mut dst = None;
            let mut mac = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                        dst = Some(IpAddr::V4(*v))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                        dst = Some(IpAddr::V6(*v))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(l);
                        mac = Some(m);
                    }
                    _ => {}
                }
            }
            let Some(dst) = dst else { continue };
            let state = match n.header.state {
                NeighbourState::Reachable
                | NeighbourState::Permanent
                | NeighbourState::Noarp
                | NeighbourState::Delay
                | NeighbourState::Probe => NeighState::Valid,
                NeighbourState::Stale => NeighState::Stale,
                _ => NeighState::Missing,
            };
            let entry = match mac {
                Some(m) => (state, Some(m)),
                None => (NeighState::Missing, None),
            };
            // The first entry wins, as the lookup of one did.
            table.entry((n.header.ifindex, dst)).or_insert(entry);
        }
        Ok(table)
    }

    /// Asks the kernel to resolve (or re-confirm) `ip` on interface `index`,
    /// as `ip neigh replace IP dev DEV use` does (NTF_USE): the kernel sends
    /// its ARP/ND probe; no packet of ours goes out.
    pub fn resolve(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        use netlink_packet_route::neighbour::{NeighbourFlags, NeighbourState};
        let handle = self.handle.clone();
        self.rt
            .block_on(async move {
                handle
                    .neighbours()
                    .add(index, ip)
                    .flags(NeighbourFlags::Use)
                    .state(NeighbourState::None)
                    .replace()
                    .execute()
                    .await
            })
            .map_err(|e| NetlinkError::Request {
                what: format!("asking the kernel to resolve {ip}"),
                reason: describe(&e),
            })
    }
}

/// What the kernel says of a tun or tap device (`IFLA_INFO_DATA` of kind
/// "tun").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunState {
    /// Outlives its queues (`IFF_PERSIST`).
    pub persistent: bool,
    /// Queues attached now, by whoever holds them.
    pub queues: u32,
}

impl Netlink {
    /// The tun state of the device `name`; `None` when there is no such
    /// device or it is not a tun or tap.
    pub fn tun_state(&self, name: &str) -> Result<Option<TunState>, NetlinkError> {
        use netlink_packet_core::Nla;
        use netlink_packet_route::link::{InfoData, LinkInfo as Info};
        // From linux/if_link.h.
        const IFLA_TUN_PERSIST: u16 = 6;
        const IFLA_TUN_NUM_QUEUES: u16 = 8;
        let handle = self.handle.clone();
        let res = self.rt.block_on(async move {
            handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next()
                .await
        });
        let msg = match res {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => return Ok(None),
            Err(e) => {
                return Err(NetlinkError::Request {
                    what: format!("looking up interface {name}"),
                    reason: describe(&e),
                })
            }
        };
        for a in &msg.attributes {
            let LinkAttribute::LinkInfo(infos) = a else {
                continue;
            };
            for i in infos {
                let Info::Data(InfoData::Tun(nlas)) = i else {
                    continue;
                };
                let mut st = TunState {
                    persistent: false,
                    queues: 0,
                };
                for n in nlas {
                    let mut v = vec![0u8; n.value_len()];
                    n.emit_value(&mut v);
                    match n.kind() {
                        IFLA_TUN_PERSIST => st.persistent = v.first().is_some_and(|&b| b != 0),
                        IFLA_TUN_NUM_QUEUES if v.len() >= 4 => {
                            st.queues = u32::from_ne_bytes([v[0], v[1], v[2], v[3]])
                        }
                        _ => {}
                    }
                }
                return Ok(Some(st));
            }
        }
        Ok(None)
    }
}

impl Netlink {
    /// Whether every one of `addresses` is on the link.
    pub fn has_addresses(
        &self,
        link: &LinkInfo,
        addresses: &[IpAddr],
    ) -> Result<bool, NetlinkError> {
        let handle = self.handle.clone();
        let index = link.index;
        let res = self.rt.block_on(async move {
            let mut found = Vec::new();
            let mut s = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute();
            while let Some(m) = s.try_next().await? {
                for a in &m.attributes {
                    if let AddressAttribute::Local(l) | AddressAttribute::Address(l) = a {
                        found.push(*l);
                    }
                }
            }
            Ok::<_, rtnetlink::Error>(found)
        });
        match res {
            Ok(found) => Ok(addresses.iter().all(|a| found.contains(a))),
            Err(e) => Err(NetlinkError::Request {
                what: format!("listing the addresses of {}", link.name),
                reason: describe(&e),
            }),
        }
    }
}
