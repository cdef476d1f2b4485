//! The cases: each tunnel mode and GRE's options, the kernel's side as
//! iproute2 commands a user types and the gateway's as its `[[tunnel]]`.

use crate::vm;

/// The inner addresses: the gateway's side and the kernel's side.
#[derive(Clone, Copy)]
enum Inner {
    V4,
    V6,
}

impl Inner {
    fn gw(self) -> &'static str {
        match self {
            Inner::V4 => "10.1.1.1",
            Inner::V6 => "fd00:1::1",
        }
    }
    fn kernel(self) -> &'static str {
        match self {
            Inner::V4 => "10.1.1.2",
            Inner::V6 => "fd00:1::2",
        }
    }
}

/// One mode or option, both sides.
#[derive(Clone)]
pub struct Case {
    pub name: String,
    /// The kernel side, in the guest, as a user types it.
    pub kernel: Vec<String>,
    pub(super) kernel_dev: String,
    /// The gateway's `[[tunnel]]` table.
    pub tunnel: String,
    /// Commands in the gateway's namespace once it runs (a bridge for the
    /// gretap tap), and their undoing.
    pub(super) host_setup: Vec<String>,
    pub(super) host_teardown: Vec<String>,
    pub(super) gw_inner: &'static str,
    pub(super) kernel_inner: &'static str,
    /// Bridged (gretap): the bridges whose neighbour tables must show the
    /// other side's MAC (ARP crossed).
    pub(super) bridged: bool,
    pub(super) v6_underlay: bool,
    /// Outer fields that differ by construction (the two sides are given
    /// mirrored options: ikey/okey, icsum/ocsum, iseq/oseq).
    pub by_construction: &'static [&'static str],
}

impl Case {
    fn differs_in(mut self, fields: &'static [&'static str]) -> Case {
        self.by_construction = fields;
        self
    }
}

pub(super) fn endpoints(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        (vm::GUEST_V6, vm::GW_V6)
    } else {
        (vm::GUEST_V4, vm::GW_V4)
    }
}

/// A routed tunnel: `add` is the kernel's `ip tunnel add` line (with
/// REMOTE and LOCAL to fill in), `options` the gateway's extra lines.
fn routed(name: &str, dev: &str, add: &str, mode: &str, options: &str, inner: Inner) -> Case {
    let v6 = add.contains("ip -6") || mode.starts_with("ip6") || mode == "ipip6";
    let (guest, gw) = endpoints(v6);
    let add = add.replace("REMOTE", gw).replace("LOCAL", guest);
    let addr = match inner {
        Inner::V4 => format!(
            "ip addr add {} peer {} dev {dev}",
            inner.kernel(),
            inner.gw()
        ),
        Inner::V6 => format!(
            "ip -6 addr add {} peer {} dev {dev} nodad",
            inner.kernel(),
            inner.gw()
        ),
    };
    let kind = match inner {
        Inner::V4 => "tap",
        Inner::V6 => "tun",
    };
    Case {
        name: name.into(),
        kernel: vec![add, format!("ip link set {dev} up mtu 1400"), addr],
        kernel_dev: dev.into(),
        tunnel: format!(
            "name = \"{}\"\nmode = \"{mode}\"\nlocal = \"{gw}\"\nremote = \"{guest}\"\n{options}mtu = 1400\ndevice = \"gwt0\"\ndevice_kind = \"{kind}\"\naddress = \"{}\"\npeer = \"{}\"\n",
            dev,
            inner.gw(),
            inner.kernel()
        ),
        host_setup: vec![],
        host_teardown: vec![],
        gw_inner: inner.gw(),
        kernel_inner: inner.kernel(),
        bridged: false,
        v6_underlay: v6,
        by_construction: &[],
    }
}

/// gretap/ip6gretap: both sides bridge their tunnel device, with an address
/// on the bridge; ARP crosses the tunnel.
fn bridged(name: &str, dev: &str, kind: &str, mode: &str) -> Case {
    let v6 = mode.starts_with("ip6");
    let (guest, gw) = endpoints(v6);
    Case {
        name: name.into(),
        kernel: vec![
            format!("ip link add {dev} type {kind} remote {gw} local {guest}"),
            format!("ip link set {dev} up mtu 1400"),
            "ip link add br9 type bridge".into(),
            format!("ip link set {dev} master br9"),
            "ip link set br9 up".into(),
            "ip addr add 10.9.9.2/24 dev br9".into(),
        ],
        kernel_dev: dev.into(),
        tunnel: format!(
            "name = \"{dev}\"\nmode = \"{mode}\"\nlocal = \"{gw}\"\nremote = \"{guest}\"\nmtu = 1400\ndevice = \"gwt0\"\n"
        ),
        host_setup: vec![
            "ip link add br9 type bridge".into(),
            "ip link set gwt0 master br9".into(),
            "ip link set br9 up".into(),
            "ip addr add 10.9.9.1/24 dev br9".into(),
        ],
        host_teardown: vec!["ip link del br9".into()],
        gw_inner: "10.9.9.1",
        kernel_inner: "10.9.9.2",
        bridged: true,
        v6_underlay: v6,
        by_construction: &[],
    }
}

/// Every case, in order: the seed lab's two first, then the other modes,
/// then GRE's options and the outer header's.
pub fn cases() -> Vec<Case> {
    use Inner::*;
    let gre = "ip tunnel add tun100 mode gre remote REMOTE local LOCAL";
    vec![
        routed(
            "gre",
            "tun100",
            &format!("{gre} ttl 64"),
            "gre",
            "ttl = 64\n",
            V4,
        ),
        routed(
            "ipip",
            "tun200",
            "ip tunnel add tun200 mode ipip remote REMOTE local LOCAL",
            "ipip",
            "",
            V4,
        ),
        bridged("gretap", "gtap0", "gretap", "gretap"),
        routed(
            "sit",
            "sit1",
            "ip tunnel add sit1 mode sit remote REMOTE local LOCAL",
            "sit",
            "",
            V6,
        ),
        routed(
            "ip6gre",
            "g6",
            "ip -6 tunnel add g6 mode ip6gre remote REMOTE local LOCAL",
            "ip6gre",
            "",
            V4,
        ),
        bridged("ip6gretap", "g6tap", "ip6gretap", "ip6gretap"),
        routed(
            "ip6ip6",
            "t66",
            "ip -6 tunnel add t66 mode ip6ip6 remote REMOTE local LOCAL",
            "ip6ip6",
            "",
            V6,
        ),
        routed(
            "ipip6",
            "t46",
            "ip -6 tunnel add t46 mode ipip6 remote REMOTE local LOCAL",
            "ipip6",
            "",
            V4,
        ),
        routed(
            "gre key",
            "tun100",
            &format!("{gre} key 42"),
            "gre",
            "key = 42\n",
            V4,
        ),
        routed(
            "gre csum",
            "tun100",
            &format!("{gre} csum"),
            "gre",
            "csum = true\n",
            V4,
        ),
        routed(
            "gre seq",
            "tun100",
            &format!("{gre} seq"),
            "gre",
            "seq = true\n",
            V4,
        ),
        routed(
            "gre key csum seq",
            "tun100",
            &format!("{gre} key 7 csum seq"),
            "gre",
            "key = 7\ncsum = true\nseq = true\n",
            V4,
        ),
        routed(
            "gre ikey/okey",
            "tun100",
            &format!("{gre} ikey 1001 okey 1002"),
            "gre",
            "ikey = 1002\nokey = 1001\n",
            V4,
        )
        .differs_in(&["gre.key"]),
        routed(
            "gre icsum (kernel)",
            "tun100",
            &format!("{gre} icsum"),
            "gre",
            "ocsum = true\n",
            V4,
        )
        .differs_in(&["gre.flags_and_version", "gre.checksum.status"]),
        routed(
            "gre ocsum (kernel)",
            "tun100",
            &format!("{gre} ocsum"),
            "gre",
            "icsum = true\n",
            V4,
        )
        .differs_in(&["gre.flags_and_version", "gre.checksum.status"]),
        routed(
            "gre iseq (kernel)",
            "tun100",
            &format!("{gre} iseq"),
            "gre",
            "oseq = true\n",
            V4,
        )
        .differs_in(&["gre.flags_and_version", "gre.sequence_number"]),
        routed(
            "gre oseq (kernel)",
            "tun100",
            &format!("{gre} oseq"),
            "gre",
            "iseq = true\n",
            V4,
        )
        .differs_in(&["gre.flags_and_version", "gre.sequence_number"]),
        routed(
            "gre ttl inherit",
            "tun100",
            &format!("{gre} ttl inherit"),
            "gre",
            "ttl = \"inherit\"\n",
            V4,
        ),
        routed(
            "gre tos inherit",
            "tun100",
            &format!("{gre} tos inherit"),
            "gre",
            "tos = \"inherit\"\n",
            V4,
        ),
        routed(
            "ipip nopmtudisc",
            "tun200",
            "ip tunnel add tun200 mode ipip remote REMOTE local LOCAL nopmtudisc",
            "ipip",
            "pmtudisc = false\n",
            V4,
        ),
        routed(
            "ip6ip6 encaplimit none",
            "t66",
            "ip -6 tunnel add t66 mode ip6ip6 remote REMOTE local LOCAL encaplimit none",
            "ip6ip6",
            "encaplimit = \"none\"\n",
            V6,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_lab_comes_first_in_the_kernels_words() {
        let c = cases();
        assert_eq!(c[0].name, "gre");
        assert_eq!(
            c[0].kernel[0],
            "ip tunnel add tun100 mode gre remote 192.168.0.8 local 192.168.0.58 ttl 64"
        );
        assert_eq!(c[1].name, "ipip");
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        for m in ["gretap", "sit", "ip6gre", "ip6gretap", "ip6ip6", "ipip6"] {
            assert!(names.contains(&m), "{m} missing");
        }
    }
}
