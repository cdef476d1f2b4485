//! Any bytes as a received frame: decap must return a delivery inside the
//! frame or a drop reason, never panic or read out of bounds.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use gateway::datapath::decap::{decap, RxState};
use gateway::datapath::tunnel::{DeviceKind, Mode, Prefix, TunnelRx, TunnelTable};
use libfuzzer_sys::fuzz_target;

fn table() -> &'static TunnelTable {
    static T: OnceLock<TunnelTable> = OnceLock::new();
    T.get_or_init(|| {
        let t = |name: &str, mode, ikey, icsum, kind, peer: Option<&str>| TunnelRx {
            name: name.into(),
            mode,
            local: Ipv4Addr::new(192, 168, 0, 8).into(),
            remote: Ipv4Addr::new(192, 168, 0, 58).into(),
            ikey,
            icsum,
            // The keyed tunnel also wants sequence numbers.
            iseq: ikey.is_some(),
            device_kind: kind,
            device_mac: [2, 0, 0, 0, 0, 1],
            peer_mac: [2, 0, 0, 0, 0, 2],
            mtu: 1400,
            allowed_sources: peer.map(|p| vec![Prefix::parse(p).unwrap()]).unwrap_or_default(),
        };
        let mut v6 = t("v6", Mode::Gre, None, false, DeviceKind::Tap, None);
        v6.local = "2001:db8::8".parse().unwrap();
        v6.remote = "2001:db8::58".parse().unwrap();
        TunnelTable::new(vec![
            t("gre", Mode::Gre, None, false, DeviceKind::Tap, Some("10.1.1.2")),
            t("grekey", Mode::Gre, Some(300), true, DeviceKind::Tun, None),
            t("ipip", Mode::Ipip, None, false, DeviceKind::Tun, Some("20.1.1.0/24")),
            v6,
        ])
    })
}

fuzz_target!(|data: &[u8]| {
    let mut frame = data.to_vec();
    // A sequence number already seen on the keyed tunnel, so both the
    // first-packet and the older-than-expected paths are reachable.
    let mut state = RxState::new(table().len());
    state.next_seq[1] = 0x8000_0000;
    if let Ok(d) = decap(&mut frame, table(), &mut state) {
        assert!(d.offset + d.len <= frame.len());
        assert!(usize::from(d.tunnel) < table().len());
    }
});
