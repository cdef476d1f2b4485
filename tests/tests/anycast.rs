//! Two gateways share one tunnel endpoint address behind an ECMP router,
//! with BIRD 2 on every host (the configurations shipped in
//! `gateway/dist/bird/`), and four peers, each a gateway of its own with a
//! GRE tunnel to the shared address, pinging through it.
//!
//! ```text
//!   peer1 10.1.1.2 ─┐                     ┌─ ga 10.0.1.2 (gateway A, BIRD)
//!   peer2 10.1.2.2 ─┤  router (BIRD, ECMP) │    192.0.2.1 on gw-anycast
//!   peer3 10.1.3.2 ─┤  192.0.2.1 via both ─┤
//!   peer4 10.1.4.2 ─┘                     └─ gb 10.0.2.2 (gateway B, BIRD)
//! ```
//!
//! The router's kernel pins each peer to one gateway by its hash; killing
//! gateway A (SIGKILL) withdraws its route within seconds and its peers
//! carry on through B, with the loss counted; A restarted rejoins and gets
//! its peers back; `gateway drain` on B moves B's peers to A with no ping
//! lost.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::stats::tunnel_rx;
use gateway_tests::{
    gateway_bin, http_status, pkt, require_root, sh, wait_until, Gateway, NetNs, RawSocket, Wire,
};

const ANYCAST: &str = "192.0.2.1";
const PEERS: usize = 4;

/// BIRD in the foreground in a namespace; stopped on drop.
struct Bird {
    child: Child,
    log: std::path::PathBuf,
    _conf: std::path::PathBuf,
}

impl Bird {
    fn start(ns: &NetNs, conf: &str) -> Bird {
        let base = std::env::temp_dir().join(format!("gwt-bird-{}", ns.name));
        let conf_path = base.with_extension("conf");
        let log = base.with_extension("log");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
            .arg(&conf_path)
            .arg("-s")
            .arg(base.with_extension("ctl"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("bird (apt install bird2; cargo xtask setup installs it)");
        Bird {
            child,
            log,
            _conf: conf_path,
        }
    }
}

impl Bird {
    /// `birdc show ARGS...` on this BIRD's control socket.
    fn show(&self, ns: &NetNs, args: &[&str]) -> String {
        let ctl = self.log.with_extension("ctl");
        let mut v = vec!["birdc", "-s", ctl.to_str().unwrap(), "show"];
        v.extend_from_slice(args);
        ns.exec(&v).1
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A veth between two namespaces.
fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) {
    sh(&[
        "ip", "link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name,
        "netns", &b.name,
    ]);
}

/// Replaces the whole line that starts with `start` (a `define`).
fn set_line(text: &str, start: &str, line: &str) -> String {
    assert!(
        text.contains(start),
        "no line {start:?} in the shipped config"
    );
    text.lines()
        .map(|l| if l.starts_with(start) { line } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

fn shipped(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gateway/dist/bird")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The gateway hosts' configuration: one tunnel per peer, on the shared
/// address, each into a tun device whose address the host answers pings on.
fn anycast_gateway_config() -> String {
    let mut c = format!(
        "[gateway]\npoll = \"adaptive\"\nxdp_mode = \"native\"\n\n[anycast]\naddresses = [\"{ANYCAST}\"]\ndrain_quiet = 1\ndrain_timeout = 30\n"
    );
    for i in 1..=PEERS {
        c.push_str(&format!(
            "\n[[tunnel]]\nname = \"t{i}\"\nmode = \"gre\"\nlocal = \"{ANYCAST}\"\nremote = \"10.1.{i}.2\"\nmtu = 1400\ndevice = \"t{i}\"\ndevice_kind = \"tun\"\naddress = \"172.16.{i}.1\"\npeer = \"172.16.{i}.2\"\n"
        ));
    }
    c
}

fn peer_config(i: usize) -> String {
    format!(
        "[gateway]\npoll = \"adaptive\"\nxdp_mode = \"native\"\n\n[[tunnel]]\nname = \"t0\"\nmode = \"gre\"\nlocal = \"10.1.{i}.2\"\nremote = \"{ANYCAST}\"\nmtu = 1400\ndevice = \"t0\"\ndevice_kind = \"tun\"\naddress = \"172.16.{i}.2\"\npeer = \"172.16.{i}.1\"\n"
    )
}

/// The router's next hops for the shared address.
fn next_hops(router: &NetNs) -> Vec<String> {
    let out = router.ip(&["route", "show", ANYCAST]);
    let mut hops: Vec<String> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    hops.sort();
    hops
}

/// Pings from every peer through its tunnel: `count` at 100 a second.
struct Pings(Vec<Child>);

impl Pings {
    fn start(peers: &[NetNs], count: usize) -> Pings {
        Pings(
            peers
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    Command::new("ip")
                        .args(["netns", "exec", &p.name, "ping", "-q", "-n", "-i", "0.01"])
                        .args(["-W", "2", "-c", &count.to_string()])
                        .arg(format!("172.16.{}.1", i + 1))
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("ping")
                })
                .collect(),
        )
    }

    /// Waits for every ping to finish: (sent, received) per peer.
    fn finish(mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().expect("ping");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                // "N packets transmitted, M received, ..."
                let words: Vec<&str> = text.split_whitespace().collect();
                let n = |what: &str, back: usize| -> u64 {
                    let at = words
                        .iter()
                        .position(|w| w.trim_end_matches(',') == what)
                        .unwrap_or_else(|| panic!("no {what:?} in ping's summary: {text}"));
                    words[at - back].parse().unwrap()
                };
                (n("transmitted", 2), n("received", 1))
            })
            .collect()
    }
}

impl Drop for Pings {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rx(gw: &Gateway, i: usize) -> u64 {
    tunnel_rx(&gw.stats(), &format!("t{}", i + 1))
}

/// Which peers each gateway served while `during` ran: per peer, the
/// growth of its tunnel's counter on A and on B.
fn served(a: Option<&Gateway>, b: Option<&Gateway>, during: impl FnOnce()) -> Vec<(u64, u64)> {
    let count = |g: Option<&Gateway>| -> Vec<u64> {
        (0..PEERS).map(|i| g.map_or(0, |g| rx(g, i))).collect()
    };
    let (a0, b0) = (count(a), count(b));
    during();
    let (a1, b1) = (count(a), count(b));
    (0..PEERS).map(|i| (a1[i] - a0[i], b1[i] - b0[i])).collect()
}

/// A short ping from each peer, every one answered.
fn all_answer(peers: &[NetNs]) {
    for (i, p) in peers.iter().enumerate() {
        let dst = format!("172.16.{}.1", i + 1);
        wait_until(
            &format!("peer {} to be answered through the tunnel", i + 1),
            Duration::from_secs(30),
            || p.exec(&["ping", "-c", "1", "-W", "1", &dst]).0,
        );
    }
}

#[test]
fn peers_move_between_anycast_gateways_on_kill_restart_and_drain() {
    if !require_root("peers_move_between_anycast_gateways_on_kill_restart_and_drain") {
        return;
    }
    let router = NetNs::new("ecr");
    let ga = NetNs::new("eca");
    let gb = NetNs::new("ecb");
    let peers: Vec<NetNs> = (1..=PEERS)
        .map(|i| NetNs::new(&format!("ecp{i}")))
        .collect();

    router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    // The split of peers over the gateways is the kernel's hash; a fixed
    // seed keeps it the same from run to run (the test asks the router
    // which gateway each peer goes to rather than assuming it).
    router.exec(&["sysctl", "-qw", "net.ipv4.fib_multipath_hash_seed=1"]);
    for (g, n, port) in [(&ga, 1, "ga"), (&gb, 2, "gb")] {
        veth(&router, port, g, "ens0");
        router.ip(&["addr", "add", &format!("10.0.{n}.1/24"), "dev", port]);
        router.ip(&["link", "set", port, "up"]);
        g.ip(&["addr", "add", &format!("10.0.{n}.2/24"), "dev", "ens0"]);
        g.ip(&["link", "set", "ens0", "up"]);
        g.ip(&["route", "add", "default", "via", &format!("10.0.{n}.1")]);
    }
    for (i, p) in peers.iter().enumerate() {
        let n = i + 1;
        let port = format!("p{n}");
        veth(&router, &port, p, "ens0");
        router.ip(&["addr", "add", &format!("10.1.{n}.1/24"), "dev", &port]);
        router.ip(&["link", "set", &port, "up"]);
        p.ip(&["addr", "add", &format!("10.1.{n}.2/24"), "dev", "ens0"]);
        p.ip(&["link", "set", "ens0", "up"]);
        p.ip(&["route", "add", "default", "via", &format!("10.1.{n}.1")]);
    }

    // BIRD everywhere, from the shipped files.
    let host_conf = shipped("gateway-host.conf");
    let bird_r = Bird::start(&router, &shipped("router.conf"));
    let _bird_a = Bird::start(&ga, &host_conf);
    let host_b = set_line(&host_conf, "define HOST_ID", "define HOST_ID = 10.0.2.2;");
    let host_b = set_line(&host_b, "define HOST_AS", "define HOST_AS = 65002;");
    let host_b = set_line(&host_b, "define ROUTER =", "define ROUTER = 10.0.2.1;");
    let _bird_b = Bird::start(&gb, &host_b);

    let config = anycast_gateway_config();
    let mut gw_a = Some(Gateway::start(&ga, &config));
    let gw_b = Gateway::start(&gb, &config);
    let _peer_gws: Vec<Gateway> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| Gateway::start(p, &peer_config(i + 1)))
        .collect();

    let both = vec!["10.0.1.2".to_string(), "10.0.2.2".to_string()];
    wait_until(
        "the router to learn the shared address from both gateways (ECMP)",
        Duration::from_secs(60),
        || {
            let h = next_hops(&router);
            if h == both {
                Ok(())
            } else {
                Err(format!("next hops {h:?}"))
            }
        },
    );
    // BFD runs on both sessions (the shipped files enable it: a dead host's
    // routes go within a second).
    wait_until(
        "BFD up with both gateway hosts",
        Duration::from_secs(30),
        || {
            let s = bird_r.show(&router, &["bfd", "sessions"]);
            if s.matches(" Up ").count() == 2 {
                Ok(())
            } else {
                Err(s)
            }
        },
    );
    // Where the router's hash sends each peer.
    let pinned: Vec<bool> = (0..PEERS)
        .map(|i| {
            let r = router.ip(&[
                "route",
                "get",
                ANYCAST,
                "from",
                &format!("10.1.{}.2", i + 1),
                "iif",
                &format!("p{}", i + 1),
            ]);
            r.contains("via 10.0.1.2")
        })
        .collect();
    let on_a: Vec<usize> = (0..PEERS).filter(|&i| pinned[i]).collect();
    let on_b: Vec<usize> = (0..PEERS).filter(|&i| !pinned[i]).collect();
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "the hash put every peer on one gateway (A: {on_a:?}, B: {on_b:?}); pick other peer addresses"
    );
    eprintln!("the router pins peers {on_a:?} to A, {on_b:?} to B (0-based)");

    // Each peer is carried by the gateway the hash picked, and only by it.
    all_answer(&peers);
    let per_peer = served(gw_a.as_ref(), Some(&gw_b), || {
        Pings::start(&peers, 100).finish();
    });
    for i in 0..PEERS {
        let (a, b) = per_peer[i];
        if pinned[i] {
            assert!(
                a >= 100 && b == 0,
                "peer {} pinned to A: A {a}, B {b}",
                i + 1
            );
        } else {
            assert!(
                b >= 100 && a == 0,
                "peer {} pinned to B: A {a}, B {b}",
                i + 1
            );
        }
    }

    // --- SIGKILL on A: its route goes within seconds, its peers carry on
    // through B; what was lost meanwhile is counted.
    let pings = Pings::start(&peers, 600);
    std::thread::sleep(Duration::from_millis(1000)); // traffic before the kill, not a wait for a condition
    let killed = Instant::now();
    gw_a.as_ref().unwrap().signal(libc::SIGKILL);
    let mut withdrawn = None;
    wait_until(
        "the router to withdraw A's route after A was killed",
        Duration::from_secs(10),
        || {
            let h = next_hops(&router);
            if h == ["10.0.2.2"] {
                withdrawn.get_or_insert(killed.elapsed());
                Ok(())
            } else {
                Err(format!("next hops {h:?}"))
            }
        },
    );
    let withdrawn = withdrawn.unwrap();
    assert!(
        withdrawn < Duration::from_secs(5),
        "the route went {withdrawn:?} after the kill"
    );
    let b_before: Vec<u64> = (0..PEERS).map(|i| rx(&gw_b, i)).collect();
    let results = pings.finish();
    let b_after: Vec<u64> = (0..PEERS).map(|i| rx(&gw_b, i)).collect();
    let mut lost_on_kill = Vec::new();
    for i in 0..PEERS {
        let (sent, got) = results[i];
        assert!(
            b_after[i] > b_before[i],
            "peer {}'s traffic does not flow through B after A's death",
            i + 1
        );
        if pinned[i] {
            lost_on_kill.push((i + 1, sent - got));
        } else {
            assert_eq!(sent, got, "peer {} (on B) lost pings when A died", i + 1);
        }
    }
    eprintln!(
        "A killed: route withdrawn after {:.0} ms; pings lost by A's peers (100 a second): {lost_on_kill:?}",
        withdrawn.as_secs_f64() * 1000.0
    );
    drop(gw_a.take());
    all_answer(&peers);

    // --- A restarted: it rejoins, and the hash gives it its peers back,
    // with no ping lost (it announces once it can answer).
    let pings = Pings::start(&peers, 600);
    let restarted = Instant::now();
    let gw_a = Gateway::start(&ga, &config);
    wait_until(
        "the router to learn the shared address from A again",
        Duration::from_secs(60),
        || {
            let h = next_hops(&router);
            if h == both {
                Ok(())
            } else {
                Err(format!("next hops {h:?}"))
            }
        },
    );
    let rejoined = restarted.elapsed();
    for (i, (sent, got)) in pings.finish().into_iter().enumerate() {
        assert_eq!(
            sent,
            got,
            "peer {} lost pings when A rejoined; A's stats: {}\nB's: {}\nA's links: {}\nA's ICMP: {}",
            i + 1,
            gw_a.stats(),
            gw_b.stats(),
            ga.exec(&["ip", "-s", "-s", "link"]).1,
            ga.exec(&["nstat", "-az", "Icmp*", "Ip*"]).1,
        );
    }
    eprintln!(
        "A restarted: announced again {:.1} s after its start, no ping lost",
        rejoined.as_secs_f64()
    );
    let per_peer = served(Some(&gw_a), Some(&gw_b), || {
        Pings::start(&peers, 100).finish();
    });
    for i in 0..PEERS {
        let (a, b) = per_peer[i];
        if pinned[i] {
            assert!(a >= 100 && b == 0, "peer {} back on A: A {a}, B {b}", i + 1);
        } else {
            assert!(
                b >= 100 && a == 0,
                "peer {} still on B: A {a}, B {b}",
                i + 1
            );
        }
    }

    // --- `gateway drain` on B: B's peers move to A and not one ping is
    // lost; B stops once the traffic has moved.
    let mut gw_b = gw_b;
    let a_before: Vec<u64> = (0..PEERS).map(|i| rx(&gw_a, i)).collect();
    let pings = Pings::start(&peers, 500);
    std::thread::sleep(Duration::from_millis(1000)); // traffic before the drain, not a wait for a condition
    let drain_started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &gb.name])
        .arg(gateway_bin())
        .args(["drain", "--iface", "ens0"])
        .output()
        .expect("gateway drain");
    let drain_took = drain_started.elapsed();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "gateway drain failed: {said}");
    assert!(said.contains("withdrew 192.0.2.1"), "{said}");
    assert!(said.contains("drained after"), "{said}");
    assert!(said.contains("stopped"), "{said}");
    let status = gw_b.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "B did not exit cleanly after the drain: {status:?}\n{}",
        gw_b.log()
    );
    assert_eq!(next_hops(&router), ["10.0.1.2"], "B's route is still there");
    let results = pings.finish();
    for (i, (sent, got)) in results.iter().enumerate() {
        assert_eq!(
            sent,
            got,
            "peer {} lost pings while B drained:\n{said}",
            i + 1
        );
    }
    let a_after: Vec<u64> = (0..PEERS).map(|i| rx(&gw_a, i)).collect();
    for &i in &on_b {
        assert!(
            a_after[i] > a_before[i],
            "peer {}'s traffic did not move to A",
            i + 1
        );
    }
    eprintln!(
        "B drained in {:.1} s with no ping lost ({} sent by each peer): {}",
        drain_took.as_secs_f64(),
        results[0].0,
        said.lines().collect::<Vec<_>>().join(" / ")
    );
}

/// One gateway with a shared address, no router: the address is on its
/// device while it runs; SIGUSR2 drains it: the address goes, `/readyz`
/// fails and says why, and the gateway keeps carrying packets for as long
/// as they come, then stops by itself, its device gone.
#[test]
fn a_drain_withdraws_fails_readyz_and_waits_until_packets_stop() {
    if !require_root("a_drain_withdraws_fails_readyz_and_waits_until_packets_stop") {
        return;
    }
    let wire = Wire::new("acd", &[]);
    let config = r#"
[gateway]
poll = "adaptive"
xdp_mode = "native"

[anycast]
addresses = ["192.0.2.1"]
drain_quiet = 2

[[tunnel]]
name = "t1"
mode = "gre"
local = "192.0.2.1"
remote = "192.168.0.58"
mtu = 1400
device = "t1"
device_kind = "tun"
address = "10.1.1.1"
peer = "10.1.1.2"
"#;
    let mut gw = Gateway::start_with(&wire.gw, config, &["--metrics", "127.0.0.1:9466"]);
    let on_device = |ns: &NetNs| {
        ns.exec(&["ip", "-o", "addr", "show", "dev", "gw-anycast"])
            .1
            .contains("inet 192.0.2.1/32")
    };
    wait_until(
        "the shared address on gw-anycast",
        Duration::from_secs(20),
        || on_device(&wire.gw),
    );
    wait_until(
        "/readyz to say the address is announced",
        Duration::from_secs(20),
        || match http_status(&wire.gw, "127.0.0.1:9466", "/readyz") {
            Some((200, b)) if b.contains("[+] anycast: 192.0.2.1 announced") => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );

    // Taken away by someone else (an address flush, the device deleted):
    // put back, and counted.
    wire.gw.ip(&["addr", "flush", "dev", "gw-anycast"]);
    wait_until("the flushed address back", Duration::from_secs(20), || {
        on_device(&wire.gw)
    });
    wire.gw.ip(&["link", "del", "gw-anycast"]);
    wait_until(
        "the deleted device back, with the address",
        Duration::from_secs(20),
        || on_device(&wire.gw),
    );
    let s = gw.stats();
    assert_eq!(s["gateway"]["anycast"]["restored"], 2, "{s}");

    // The underlay down: withdrawn; up again: announced again.
    wire.gw.ip(&["link", "set", "ens0", "down"]);
    wait_until(
        "the address to go with the underlay",
        Duration::from_secs(20),
        || !on_device(&wire.gw),
    );
    wire.gw.ip(&["link", "set", "ens0", "up"]);
    wait_until(
        "the address to come back with the underlay",
        Duration::from_secs(20),
        || on_device(&wire.gw),
    );
    let s = gw.stats();
    assert_eq!(s["gateway"]["anycast"]["withdrawals"], 2, "{s}");
    assert_eq!(s["gateway"]["anycast"]["announcements"], 3, "{s}");

    // A GRE packet to the shared address every 50 ms from the peer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (stop, mac) = (stop.clone(), wire.gw.mac("ens0"));
        let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let inner = pkt::udp([10, 1, 1, 2], [10, 1, 1, 1], 4000, 9, b"drain");
                tx.send(&pkt::outer(
                    mac,
                    [192, 168, 0, 58],
                    [192, 0, 2, 1],
                    47,
                    &pkt::gre(0, 0x0800, 0, 0, &inner),
                ));
                sent += 1;
                std::thread::sleep(Duration::from_millis(50)); // the sending rate, not a wait
            }
            sent
        })
    };
    wait_until("the packets to reach t1", Duration::from_secs(20), || {
        tunnel_rx(&gw.stats(), "t1") > 0
    });

    gw.signal(libc::SIGUSR2);
    wait_until("the shared address to go", Duration::from_secs(20), || {
        !on_device(&wire.gw)
    });
    wait_until(
        "/readyz to fail with the drain",
        Duration::from_secs(20),
        || match http_status(&wire.gw, "127.0.0.1:9466", "/readyz") {
            Some((503, b))
                if b.contains("[-] drain: draining")
                    && b.contains("[-] anycast: 192.0.2.1 withdrawn") =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        },
    );
    let s = gw.stats();
    assert!(s["gateway"]["draining"].is_object(), "{s}");
    assert_eq!(s["gateway"]["anycast"]["announced"], false, "{s}");
    // Packets keep coming (every 50 ms, well inside drain_quiet): the
    // gateway keeps carrying them, and does not stop, for three times
    // drain_quiet.
    let before = tunnel_rx(&gw.stats(), "t1");
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(6) {
        assert!(
            gw.wait_exit(Duration::from_millis(200)).is_none(),
            "the gateway stopped while packets still came:\n{}",
            gw.log()
        );
    }
    assert!(
        tunnel_rx(&gw.stats(), "t1") >= before + 60,
        "{}",
        gw.stats()
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let status = gw.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "the drained gateway did not exit 0: {status:?}\n{}",
        gw.log()
    );
    let log = gw.log();
    assert!(log.contains("drained after"), "{log}");
    assert!(
        !wire.gw.exec(&["ip", "link", "show", "gw-anycast"]).0,
        "gw-anycast is still there after the gateway stopped"
    );
    eprintln!(
        "{sent} packets sent; {}",
        log.lines()
            .filter(|l| l.contains("drain"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
}
