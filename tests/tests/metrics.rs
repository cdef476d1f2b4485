//! The gateway shows what it is doing: `gateway stats` reads the running
//! gateway's counters, and a real Prometheus server (Debian's package,
//! started here) scrapes `--metrics` and gives a gateway metric back
//! through its query API.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::{
    gateway_bin, http_status, pkt, require_root, wait_until, Gateway, NetNs, RawSocket, Wire,
};

const CONFIG: &str = gateway_tests::ONE_GRE_TUNNEL;

/// Sends `n` GRE packets for tun100 from the peer side.
fn send_gre(wire: &Wire, n: u16) {
    let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    let mac = wire.gw.mac("ens0");
    for i in 0..n {
        let inner = pkt::udp([10, 1, 1, 2], [10, 1, 1, 1], 4000 + i, 9, b"metrics");
        tx.send(&pkt::outer(
            mac,
            [192, 168, 0, 58],
            [192, 168, 0, 8],
            47,
            &pkt::gre(0, 0x0800, 0, 0, &inner),
        ));
    }
}

/// Waits until the gateway has counted `n` packets through tun100.
fn wait_for_rx(gw: &Gateway, n: u64) {
    wait_until(
        &format!("tun100 to count {n} packets"),
        Duration::from_secs(20),
        || {
            let s = gw.stats();
            if s["tunnels"][0]["rx_packets"].as_u64() == Some(n) {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );
}

/// A plain HTTP GET from inside `ns`; returns the body.
fn http_get(ns: &NetNs, addr: &'static str, path: String) -> Option<String> {
    ns.run(move || {
        let mut s =
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    })
}

#[test]
fn gateway_stats_reads_the_running_gateway() {
    if !require_root("gateway_stats_reads_the_running_gateway") {
        return;
    }
    let wire = Wire::new("mt1", &[]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    send_gre(&wire, 3);
    wait_for_rx(&gw, 3);
    let _ = gw.settled_stats();
    let bin = gateway_bin();
    let bin = bin.to_str().unwrap();
    let (ok, human) = wire.gw.exec(&[bin, "stats", "--iface", "ens0"]);
    assert!(ok, "{human}");
    let line = human
        .lines()
        .find(|l| l.starts_with("tun100"))
        .expect("a tun100 row");
    assert_eq!(line.split_whitespace().nth(1), Some("3"), "{human}");
    let (ok, json) = wire
        .gw
        .exec(&[bin, "stats", "--iface", "ens0", "--format", "json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
    assert_eq!(v["tunnels"][0]["rx_packets"], 3);
    // No gateway on that interface name: one clear line.
    let (ok, err) = wire.gw.exec(&[bin, "stats", "--iface", "nosuch0"]);
    assert!(
        !ok && err.contains("no gateway answers for nosuch0"),
        "{err}"
    );
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn prometheus_scrapes_the_metrics_endpoint() {
    if !require_root("prometheus_scrapes_the_metrics_endpoint") {
        return;
    }
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("prometheus is not installed: cargo xtask setup installs Debian's package");
    }
    let wire = Wire::new("mt2", &[]);
    let gw = Gateway::start_with(&wire.gw, CONFIG, &["--metrics", "127.0.0.1:9464"]);
    send_gre(&wire, 5);
    wait_for_rx(&gw, 5);
    let _ = gw.settled_stats();

    // The endpoint itself.
    let text = http_get(&wire.gw, "127.0.0.1:9464", "/metrics".into()).expect("GET /metrics");
    assert!(
        text.contains("gateway_tunnel_packets_total{tunnel=\"tun100\",direction=\"rx\"} 5"),
        "{text}"
    );

    // A real Prometheus in the same namespace, scraping every second.
    let dir = std::env::temp_dir().join(format!("gwt-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: ['127.0.0.1:9464']\n",
    )
    .unwrap();
    let _prom = Prometheus(
        Command::new("ip")
            .args(["netns", "exec", &wire.gw.name, "prometheus"])
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let query = "/api/v1/query?query=gateway_tunnel_packets_total%7Btunnel%3D%22tun100%22%2Cdirection%3D%22rx%22%7D";
    let start = Instant::now();
    let value = loop {
        if let Some(body) = http_get(&wire.gw, "127.0.0.1:9090", query.into()) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                if let Some(val) = v["data"]["result"][0]["value"][1].as_str() {
                    break val.to_string();
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Prometheus never had the metric"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(value, "5", "Prometheus read the gateway's rx count back");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until `path` answers `status` with a body containing `line`.
fn wait_health(wire: &Wire, path: &'static str, status: u16, line: &str) -> String {
    let mut body = String::new();
    wait_until(
        &format!("{path} to answer {status} with {line:?}"),
        Duration::from_secs(20),
        || match http_status(&wire.gw, "127.0.0.1:9465", path) {
            Some((s, b)) if s == status && b.contains(line) => {
                body = b;
                Ok(())
            }
            other => Err(format!("{other:?}")),
        },
    );
    body
}

#[test]
fn healthz_and_readyz_follow_the_host() {
    if !require_root("healthz_and_readyz_follow_the_host") {
        return;
    }
    let wire = Wire::new("mt3", &[]);
    let gw = Gateway::start_with(&wire.gw, CONFIG, &["--metrics", "127.0.0.1:9465"]);

    // Ready once the next hop towards the peer is resolved (the gateway
    // asks the kernel at start), and every check is listed.
    let ready = wait_health(&wire, "/readyz", 200, "readyz ok");
    for line in [
        "[+] workers: 1 of 1 running",
        "[+] xdp: program ",
        "[+] underlay: ens0 is up",
        "[+] tunnel tun100: device tap1 up",
        "[+] tunnel tun100: next hop ",
    ] {
        assert!(ready.contains(line), "no {line:?} in:\n{ready}");
    }
    let alive = wait_health(&wire, "/healthz", 200, "healthz ok");
    assert!(!alive.contains("underlay"), "{alive}");

    // The tunnel's device set down by hand: not ready, still alive.
    wire.gw.ip(&["link", "set", "tap1", "down"]);
    wait_health(
        &wire,
        "/readyz",
        503,
        "[-] tunnel tun100: device tap1 is down",
    );
    wait_health(&wire, "/healthz", 200, "healthz ok");
    wire.gw.ip(&["link", "set", "tap1", "up"]);
    wait_health(&wire, "/readyz", 200, "readyz ok");

    // The underlay down: not ready.
    wire.gw.ip(&["link", "set", "ens0", "down"]);
    wait_health(&wire, "/readyz", 503, "[-] underlay: ens0 is down");
    wire.gw.ip(&["link", "set", "ens0", "up"]);
    wait_health(&wire, "/readyz", 200, "readyz ok");

    // The XDP program taken off by someone else (its bpf link detached,
    // as an operator's tool would): no longer alive.
    let ours = gw.stats()["gateway"]["xdp_program_id"].as_u64().unwrap();
    let links: serde_json::Value =
        serde_json::from_str(&gateway_tests::sh(&["bpftool", "-j", "link", "show"])).unwrap();
    let link = links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["prog_id"].as_u64() == Some(ours))
        .unwrap_or_else(|| panic!("no bpf link for program {ours}: {links}"));
    gateway_tests::sh(&["bpftool", "link", "detach", "id", &link["id"].to_string()]);
    let dead = wait_health(&wire, "/healthz", 503, "healthz failed");
    assert!(dead.contains("[-] xdp: no program on ens0"), "{dead}");
    wait_health(&wire, "/readyz", 503, "readyz failed");
}

#[test]
fn systemd_hears_ready_the_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    if !require_root("systemd_hears_ready_the_watchdog_and_stopping") {
        return;
    }
    // systemd's side of Type=notify: a datagram socket named by
    // NOTIFY_SOCKET, and WATCHDOG_USEC (short here, so that the test
    // hears several).
    let path = std::env::temp_dir().join(format!("gwt-notify-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let wire = Wire::new("mt4", &[]);
    let notify = format!("NOTIFY_SOCKET={}", path.display());
    let gw = Gateway::start_wrapped(
        &wire.gw,
        CONFIG,
        &["env", &notify, "WATCHDOG_USEC=400000"],
        &[],
    );
    let mut heard: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut listen = |heard: &mut Vec<String>, until: &dyn Fn(&[String]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !until(heard) {
            assert!(Instant::now() < deadline, "heard only {heard:?}");
            if let Ok(n) = sock.recv(&mut buf) {
                heard.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_string),
                );
            }
        }
    };
    listen(&mut heard, &|h| {
        h.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3
    });
    let ready = heard.iter().position(|l| l == "READY=1");
    let first_pet = heard.iter().position(|l| l == "WATCHDOG=1");
    assert!(
        matches!((ready, first_pet), (Some(r), Some(w)) if r < w),
        "READY=1 first, then the watchdog: {heard:?}"
    );
    assert!(
        heard
            .iter()
            .any(|l| l == "STATUS=running on ens0: 1 tunnel"),
        "{heard:?}"
    );
    let (status, _) = gw.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    listen(&mut heard, &|h| h.iter().any(|l| l == "STOPPING=1"));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_shipped_alert_rules_pass_promtool_and_name_metrics_the_gateway_serves() {
    if !require_root("the_shipped_alert_rules_pass_promtool_and_name_metrics_the_gateway_serves") {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/dist/prometheus");
    for args in [
        &["check", "rules", "gateway-alerts.yml"][..],
        &["test", "rules", "gateway-alerts.test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian's prometheus package; cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Every metric a rule names is one a running gateway serves (a rule on
    // a misspelt or renamed metric would never fire).
    let rules = std::fs::read_to_string(dir.join("gateway-alerts.yml")).unwrap();
    let mut named: Vec<&str> = rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
        .flat_map(|l| {
            l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("gateway_"))
        })
        .collect();
    named.sort_unstable();
    named.dedup();
    assert!(named.len() >= 6, "{named:?}");
    let wire = Wire::new("mt5", &[]);
    let _gw = Gateway::start_with(&wire.gw, CONFIG, &["--metrics", "127.0.0.1:9466"]);
    let text = http_get(&wire.gw, "127.0.0.1:9466", "/metrics".into()).expect("GET /metrics");
    let served = |name: &str| {
        text.lines()
            .any(|l| l.starts_with(&format!("# TYPE {name} ")))
    };
    let missing: Vec<&&str> = named.iter().filter(|n| !served(n)).collect();
    assert!(
        missing.is_empty(),
        "rules name metrics not served: {missing:?}\n{text}"
    );
}
