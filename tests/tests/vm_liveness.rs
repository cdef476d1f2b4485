//! Tunnel liveness with the kernel's GRE as the peer (Debian's Linux 6.1
//! under QEMU, the seed's `ip tunnel add tun100 mode gre ...`, IPv4
//! forwarding and `accept_local` on the tunnel): the gateway's keepalives
//! are reflected and its tun100 is up; the kernel's tunnel deleted, tun100
//! goes down and the tap's carrier with it; the kernel's tunnel made
//! again, both come back. Runs `cargo xtask vm liveness`, which waits for
//! each state with a generous deadline (TCG is slow; the times it took are
//! in its JSON, not asserted), and checks its JSON here.

use gateway_tests::vm;

#[test]
fn keepalives_against_the_kernels_gre_follow_its_tunnel() {
    const NAME: &str = "keepalives_against_the_kernels_gre_follow_its_tunnel";
    if !vm::enabled(NAME, "boots Debian's kernel under QEMU") {
        return;
    }
    let (status, r) = vm::xtask_vm_json(&["liveness"], "liveness-test.json");
    assert!(
        status.success(),
        "cargo xtask vm liveness failed ({status}): {r}"
    );
    let up = &r["up_with_replies"];
    assert_eq!(up["state"], "up", "{r}");
    assert!(up["keepalive_replies"].as_u64().unwrap_or(0) >= 3, "{r}");
    assert_eq!(r["ping_through"], true, "{r}");
    assert_eq!(r["down"]["state"], "down", "{r}");
    assert_eq!(r["up_again"]["state"], "up", "{r}");
    // tap1's carrier (/sys/class/net/tap1/carrier) up, down, up.
    assert_eq!(r["carrier"], serde_json::json!(["1", "0", "1"]), "{r}");
    assert!(r["events"]["tunnel_down"].as_u64() >= Some(1), "{r}");
    assert!(r["events"]["tunnel_up"].as_u64() >= Some(1), "{r}");
    assert_eq!(
        (&r["logged_down"], &r["logged_up"]),
        (&true.into(), &true.into()),
        "{r}"
    );
}
