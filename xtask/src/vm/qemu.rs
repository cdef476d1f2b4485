//! QEMU: the accelerator (KVM when a probe boot works, TCG otherwise), the
//! command line with its 9p exports (the host's root, the modules, the job
//! folder), the guest's script, and the booted [`Guest`], driven through
//! command files in the job folder and powered off (or killed) on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::kernel::Kernel;
use super::net::Topology;
use super::{
    say, stop_child, tail, wait_for, Stop, BOOT_LIMIT, COMMAND_LIMIT, GUEST_MAC, GUEST_V4, GUEST_V6,
};

/// The tunnel modules (and the bridge) the guest loads at start: the
/// kernel's own request_module cannot find them (the guest has no
/// /lib/modules; they live under /tmp/km).
const GUEST_MODULES: &[&str] = &[
    "virtio_net",
    "ip_gre",
    "ipip",
    "sit",
    "ip6_gre",
    "ip6_tunnel",
    "bridge",
];

// The probe boot's and the power-off's deadlines (generous too).
const KVM_PROBE_LIMIT: Duration = Duration::from_secs(20);
const POWEROFF_LIMIT: Duration = Duration::from_secs(60);

/// QEMU's accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG (emulation: function only, timings mean nothing)",
        }
    }
}

/// The guest's machine: vCPUs and the NIC's queue pairs (1: a plain tap
/// and virtio-net; more: a `multi_queue` tap with `queues=N`, virtio-net
/// with `mq=on` and `2N + 2` vectors, and `ethtool -L eth0 combined N` in
/// the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    pub cpus: u32,
    pub queues: u32,
}

impl Default for Machine {
    fn default() -> Self {
        Machine { cpus: 1, queues: 1 }
    }
}

/// How the guest is driven.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// The serial console to a file; the host drives the guest through
    /// command files.
    Log,
    /// The serial console on this terminal with a shell on it (and the
    /// command files served in the background).
    Interactive,
}

/// The guest's script: NIC up with the lab's addresses, the tunnel modules
/// loaded, then the command loop.
fn guest_script(console: Console, machine: Machine) -> String {
    let modules = GUEST_MODULES.join(" ");
    let channels = if machine.queues > 1 {
        format!(
            "ethtool -L eth0 combined {} || echo \"[guest] ethtool -L eth0 combined {} failed\"",
            machine.queues, machine.queues
        )
    } else {
        String::new()
    };
    let serve = r#"
serve() {
  n=0
  while [ ! -e /mnt/cmd/stop ]; do
    if [ -e "/mnt/cmd/$n.sh" ]; then
      sh "/mnt/cmd/$n.sh" > "/mnt/out/$n.log" 2>&1 < /dev/null
      echo $? > "/mnt/out/$n.tmp" && mv "/mnt/out/$n.tmp" "/mnt/out/$n.rc"
      n=$((n + 1))
    else
      sleep 0.05
    fi
  done
}
"#;
    let tail = match console {
        Console::Log => "serve\n".to_string(),
        Console::Interactive => r#"serve &
while [ ! -e /mnt/banner ]; do sleep 0.2; done
cat /mnt/banner
export PS1='kernel-peer# ' HOME=/tmp TERM=vt100
setsid -c bash --norc -i < /dev/ttyS0 > /dev/ttyS0 2>&1
touch /mnt/cmd/stop
"#
        .to_string(),
    };
    format!(
        r#"#!/bin/sh
# Written by xtask/src/vm/qemu.rs: runs in the guest, on the host's root.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
echo "[guest] kernel $(uname -r)"
for m in {modules}; do
  modprobe -d /tmp/km "$m" || echo "[guest] modprobe $m failed"
done
ip link set lo up
# A physical NIC puts the checksums it was asked for on the wire; the
# virtio NIC would leave GRE checksums to the host (0 on the veth).
ethtool -K eth0 tx off > /dev/null
{channels}
ip addr add {GUEST_V4}/24 dev eth0
ip -6 addr add {GUEST_V6}/64 dev eth0 nodad
ip link set eth0 up
mkdir -p /mnt/out
uname -r > /mnt/ready.tmp && mv /mnt/ready.tmp /mnt/ready
echo "[guest] ready"
{serve}
{tail}
sync
echo "[guest] powering off"
/bin/busybox poweroff -f
"#
    )
}

/// A booted guest: QEMU, run in the wire namespace, and the job folder
/// shared with it. Killed by its pid on drop if it did not power off.
pub struct Guest {
    child: Child,
    pub job: PathBuf,
    pub console_log: PathBuf,
    pub accel: Accel,
    pub release: String,
    next: u32,
    stop: Stop,
}

fn qemu_command(
    k: &Kernel,
    accel: Accel,
    machine: Machine,
    job: &Path,
    netns: Option<(&str, &str)>,
) -> Command {
    let mut c = match netns {
        Some((ns, _)) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    c.args(accel.args())
        .args([
            "-m",
            "1024",
            "-smp",
            &machine.cpus.to_string(),
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&k.initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=mods,security_model=none,readonly=on",
            k.modules.display()
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=job,security_model=none",
            job.display()
        ));
    match netns {
        Some((_, tap)) if machine.queues > 1 => {
            let q = machine.queues;
            c.arg("-netdev")
                .arg(format!(
                    "tap,id=n0,ifname={tap},script=no,downscript=no,queues={q}"
                ))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=n0,mac={GUEST_MAC},mq=on,vectors={}",
                    2 * q + 2
                ));
        }
        Some((_, tap)) => {
            c.arg("-netdev")
                .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}"));
        }
        None => {
            c.args(["-nic", "none"]);
        }
    }
    c
}

/// Boots the kernel under KVM with a job that only says it came up: true
/// when it did within [`KVM_PROBE_LIMIT`].
fn kvm_works(k: &Kernel, scratch: &Path, stop: &Stop) -> Result<bool> {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        say("no usable /dev/kvm");
        return Ok(false);
    }
    let job = scratch.join("kvm-probe");
    let _ = fs::remove_dir_all(&job);
    fs::create_dir_all(&job)?;
    fs::write(
        job.join("guest.sh"),
        "uname -r > /mnt/up.tmp && mv /mnt/up.tmp /mnt/up\n/bin/busybox poweroff -f\n",
    )?;
    let log = job.join("console.log");
    let mut child = qemu_command(k, Accel::Kvm, Machine::default(), &job, None)
        .args(["-display", "none", "-monitor", "none", "-serial"])
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let start = Instant::now();
    let up = loop {
        if job.join("up").exists() {
            break true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) || start.elapsed() > KVM_PROBE_LIMIT {
            break false;
        }
        if stop.check().is_err() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop_child(&mut child, "-KILL", Duration::from_secs(1));
    if !up {
        say(&format!(
            "the KVM probe boot did not reach userspace in {KVM_PROBE_LIMIT:?}; last console lines:\n{}",
            tail(&log, 3)
        ));
    }
    let _ = fs::remove_dir_all(&job);
    stop.check()?;
    Ok(up)
}

/// KVM when a probe boot works, TCG otherwise (`GATEWAY_VM_ACCEL=kvm|tcg`
/// skips the probe); says which.
pub fn choose_accel(k: &Kernel, scratch: &Path, stop: &Stop) -> Result<Accel> {
    let accel = match std::env::var("GATEWAY_VM_ACCEL").as_deref() {
        Ok("kvm") => {
            say("GATEWAY_VM_ACCEL=kvm: no probe");
            Accel::Kvm
        }
        Ok("tcg") => {
            say("GATEWAY_VM_ACCEL=tcg: no probe");
            Accel::Tcg
        }
        _ => {
            say("probing KVM with a boot that only comes up and powers off");
            if kvm_works(k, scratch, stop)? {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    };
    say(&format!("accelerator: {}", accel.name()));
    Ok(accel)
}

impl Guest {
    /// Boots the guest with its NIC on `topo`'s tap and waits until its
    /// script says it is ready. `job` is a fresh folder (removed on drop).
    pub fn boot(
        k: &Kernel,
        accel: Accel,
        topo: &Topology,
        job: PathBuf,
        console: Console,
        stop: &Stop,
    ) -> Result<Guest> {
        Guest::boot_machine(k, accel, Machine::default(), topo, job, console, stop)
    }

    /// [`Guest::boot`] on `machine` (its queue pairs are `topo`'s).
    pub fn boot_machine(
        k: &Kernel,
        accel: Accel,
        machine: Machine,
        topo: &Topology,
        job: PathBuf,
        console: Console,
        stop: &Stop,
    ) -> Result<Guest> {
        if machine.queues != topo.queues {
            bail!(
                "the guest's NIC has {} queue pairs but the tap {}",
                machine.queues,
                topo.queues
            );
        }
        let _ = fs::remove_dir_all(&job);
        fs::create_dir_all(job.join("cmd"))?;
        fs::create_dir_all(job.join("out"))?;
        fs::write(job.join("guest.sh"), guest_script(console, machine))?;
        let console_log = job.join("console.log");
        let mut cmd = qemu_command(k, accel, machine, &job, Some((&topo.wire, &topo.tap)));
        match console {
            Console::Log => {
                cmd.args(["-display", "none", "-monitor", "none", "-serial"])
                    .arg(format!("file:{}", console_log.display()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(fs::File::create(job.join("qemu.log"))?);
            }
            Console::Interactive => {
                cmd.arg("-nographic");
            }
        }
        say(&format!(
            "booting {} under {} ({} vCPU, {} NIC queue pair(s))",
            k.release,
            match accel {
                Accel::Kvm => "KVM",
                Accel::Tcg => "TCG",
            },
            machine.cpus,
            machine.queues
        ));
        let child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let mut guest = Guest {
            child,
            job,
            console_log,
            accel,
            release: k.release.clone(),
            next: 0,
            stop: stop.clone(),
        };
        let ready = guest.job.join("ready");
        let start = Instant::now();
        wait_for("the guest to come up", BOOT_LIMIT, stop, || {
            guest.alive()?;
            Ok(ready.exists().then_some(()))
        })?;
        if console == Console::Log {
            say(&format!(
                "guest up in {:.1} s (kernel {})",
                start.elapsed().as_secs_f64(),
                fs::read_to_string(&ready).unwrap_or_default().trim()
            ));
        }
        Ok(guest)
    }

    /// Fails, with the console's last lines, when QEMU has exited.
    pub fn alive(&mut self) -> Result<()> {
        // Ctrl-C reaches QEMU too: say why it is gone.
        self.stop.check()?;
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "QEMU exited ({status}); the guest console's last lines:\n{}\nQEMU said: {}",
                tail(&self.console_log, 15),
                tail(&self.job.join("qemu.log"), 5)
            );
        }
        Ok(())
    }

    /// Runs `script` with `sh` in the guest; its exit status and output.
    pub fn exec_status(&mut self, script: &str, limit: Duration) -> Result<(i32, String)> {
        let n = self.next;
        self.next += 1;
        let tmp = self.job.join(format!("cmd/{n}.tmp"));
        fs::write(&tmp, script)?;
        fs::rename(&tmp, self.job.join(format!("cmd/{n}.sh")))?;
        let rc = self.job.join(format!("out/{n}.rc"));
        let stop = self.stop.clone();
        let first = script.lines().next().unwrap_or("");
        let code = wait_for(&format!("the guest to run `{first}`"), limit, &stop, || {
            self.alive()?;
            Ok(fs::read_to_string(&rc)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok()))
        })?;
        let out = fs::read_to_string(self.job.join(format!("out/{n}.log"))).unwrap_or_default();
        Ok((code, out))
    }

    /// Runs `script` in the guest; fails with its output when it fails.
    pub fn exec(&mut self, script: &str) -> Result<String> {
        let (code, out) = self.exec_status(script, COMMAND_LIMIT)?;
        if code != 0 {
            bail!(
                "in the guest, `{}` failed ({code}):\n{}",
                script.trim(),
                out.trim()
            );
        }
        Ok(out)
    }

    /// Asks the guest to power off and waits for QEMU to exit (killed by
    /// its pid after [`POWEROFF_LIMIT`]).
    pub fn poweroff(&mut self) {
        let _ = fs::write(self.job.join("cmd/stop"), "");
        let start = Instant::now();
        while start.elapsed() < POWEROFF_LIMIT {
            if let Ok(Some(_)) = self.child.try_wait() {
                say(&format!(
                    "the guest powered off ({:.1} s after it was asked)",
                    start.elapsed().as_secs_f64()
                ));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        say("the guest did not power off: killing QEMU");
        stop_child(&mut self.child, "-TERM", Duration::from_secs(5));
    }

    /// Waits for QEMU to exit by itself (the interactive console closed).
    pub fn wait(&mut self) -> Result<()> {
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.poweroff();
        }
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.job);
    }
}
