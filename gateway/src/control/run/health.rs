//! Health, as a load balancer, an orchestrator or systemd asks for it.
//!
//! - `/healthz` (alive): the control loop answers, every worker thread
//!   runs, and the gateway's XDP program is attached to the underlay. A
//!   gateway that is not alive should be restarted.
//! - `/readyz` (ready to carry traffic): alive, and the underlay is up,
//!   every tunnel's device exists and is up, and every tunnel's next hop
//!   is resolved. A gateway that is alive but not ready waits for the
//!   host (a cable, a neighbour); a routing daemon should not send it
//!   traffic meanwhile.
//!
//! Each answer lists every check, `[+]` or `[-]`, with what it saw, and
//! ends with the verdict. systemd's notify protocol (`Type=notify`): READY=1
//! once the control loop listens, WATCHDOG=1 at half the unit's
//! `WatchdogSec` while the gateway is alive, STOPPING=1 on the way down.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::Gateway;
use crate::control::neighbour::format_mac;

/// How long a `/readyz` answer is kept.
const READYZ_CACHE: Duration = Duration::from_secs(1);

/// One check and what it saw.
struct Check {
    ok: bool,
    what: String,
}

impl Gateway {
    fn alive_checks(&self) -> Vec<Check> {
        let running = self
            .workers
            .iter()
            .filter(|w| {
                !w.thread.is_finished()
                    && w.stats.started.load(std::sync::atomic::Ordering::Acquire)
            })
            .count();
        vec![
            Check {
                ok: running == self.workers.len(),
                what: format!("workers: {running} of {} running", self.workers.len()),
            },
            Check {
                ok: self.xdp_attached,
                what: if self.xdp_attached {
                    format!(
                        "xdp: program {} attached to {}",
                        self.xdp_id.unwrap_or(0),
                        self.iface
                    )
                } else if self.xdp_seen == 0 {
                    format!(
                        "xdp: no program on {} (detached by something else)",
                        self.iface
                    )
                } else {
                    format!(
                        "xdp: another program (id {}) on {} in place of the gateway's",
                        self.xdp_seen, self.iface
                    )
                },
            },
        ]
    }

    fn ready_checks(&self) -> Vec<Check> {
        let mut checks = self.alive_checks();
        if let Some(d) = &self.drain {
            checks.push(Check {
                ok: false,
                what: format!(
                    "drain: draining for {:.1} s; the gateway stops once traffic has moved",
                    d.started().elapsed().as_secs_f64()
                ),
            });
        }
        if let Some(a) = &self.anycast {
            let list: Vec<String> = a.addresses().iter().map(|x| x.to_string()).collect();
            checks.push(Check {
                ok: a.announced(),
                what: format!(
                    "anycast: {} {}",
                    list.join(", "),
                    if a.announced() {
                        "announced"
                    } else {
                        "withdrawn"
                    }
                ),
            });
        }
        checks.push(Check {
            ok: self.underlay.up,
            what: format!(
                "underlay: {} is {}",
                self.iface,
                if self.underlay.up { "up" } else { "down" }
            ),
        });
        // One dump for every device (10,000 requests would hold the
        // control thread for a second).
        let links = self.nl.links();
        for (i, slot) in self.slots.iter().enumerate() {
            let (name, dev) = (&slot.cfg.name, &slot.cfg.device);
            let found = match &links {
                Ok(map) => Ok(map.get(dev.as_str())),
                Err(e) => Err(e),
            };
            let device = match found {
                Ok(Some(l)) if l.up => Check {
                    ok: true,
                    what: format!("tunnel {name}: device {dev} up"),
                },
                Ok(Some(_)) => Check {
                    ok: false,
                    what: format!("tunnel {name}: device {dev} is down"),
                },
                Ok(None) => Check {
                    ok: false,
                    what: format!("tunnel {name}: device {dev} is missing"),
                },
                Err(e) => Check {
                    ok: false,
                    what: format!("tunnel {name}: device {dev}: {e}"),
                },
            };
            checks.push(device);
            checks.push(match self.tunnels.next_hops.get(i) {
                Some(mac) => Check {
                    ok: true,
                    what: format!("tunnel {name}: next hop {}", format_mac(&mac)),
                },
                None => Check {
                    ok: false,
                    what: format!(
                        "tunnel {name}: next hop towards {} not resolved",
                        slot.cfg.remote
                    ),
                },
            });
        }
        checks
    }

    /// The answer to `/healthz` (`ready` false) or `/readyz`: whether all
    /// is well, and the checks as text. `/readyz` asks the kernel about
    /// every tunnel's device, so its answer is kept for a second: clients
    /// polling it cannot keep the control thread (which also ticks the
    /// workers' clock) in netlink.
    pub(super) fn health(&mut self, ready: bool) -> (bool, String) {
        if !ready {
            return render("healthz", &self.alive_checks());
        }
        if let Some((at, answer)) = &self.readyz_cache {
            if at.elapsed() < READYZ_CACHE {
                return answer.clone();
            }
        }
        let answer = render("readyz", &self.ready_checks());
        self.readyz_cache = Some((Instant::now(), answer.clone()));
        answer
    }

    /// Whether systemd's watchdog may be told all is well.
    pub(super) fn alive(&self) -> bool {
        self.alive_checks().iter().all(|c| c.ok)
    }
}

fn render(name: &str, checks: &[Check]) -> (bool, String) {
    let ok = checks.iter().all(|c| c.ok);
    let mut out = String::new();
    for c in checks {
        let _ = writeln!(out, "[{}] {}", if c.ok { '+' } else { '-' }, c.what);
    }
    let _ = writeln!(out, "{name} {}", if ok { "ok" } else { "failed" });
    (ok, out)
}

/// systemd's notify protocol; does nothing when the gateway was not
/// started by systemd with `Type=notify` (no `NOTIFY_SOCKET`).
pub(super) struct Notifier {
    /// Half the unit's `WatchdogSec`, when it has one.
    every: Option<Duration>,
    last: Instant,
}

impl Notifier {
    pub(super) fn new() -> Notifier {
        Notifier {
            every: sd_notify::watchdog_enabled().map(|d| d / 2),
            last: Instant::now(),
        }
    }

    pub(super) fn ready(&self, status: &str) {
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
    }

    /// Called from the control loop: pets the watchdog when it is due and
    /// the gateway is alive. A gateway that is not (a worker gone, its XDP
    /// program lost) stops petting it, and systemd restarts it.
    pub(super) fn tick(&mut self, alive: impl FnOnce() -> bool) {
        let Some(every) = self.every else { return };
        if self.last.elapsed() >= every && alive() {
            self.last = Instant::now();
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    pub(super) fn stopping(&self) {
        notify(&[sd_notify::NotifyState::Stopping]);
    }
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_lists_every_check_and_fails_if_one_does() {
        let checks = [
            Check {
                ok: true,
                what: "xdp: program 7 attached to ens0".into(),
            },
            Check {
                ok: false,
                what: "underlay: ens0 is down".into(),
            },
        ];
        let (ok, text) = render("readyz", &checks);
        assert!(!ok);
        assert_eq!(
            text,
            "[+] xdp: program 7 attached to ens0\n[-] underlay: ens0 is down\nreadyz failed\n"
        );
        let (ok, text) = render("healthz", &checks[..1]);
        assert!(ok);
        assert!(text.ends_with("healthz ok\n"), "{text}");
    }
}
