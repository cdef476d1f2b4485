//! The real kernel as a peer: Debian's distribution kernel (which has every
//! tunnel module this machine's kernel lacks) booted under QEMU, its root
//! file system the host's own, read-only over 9p.
//!
//! What this module does, in order:
//! - installs the Debian packages it needs when they are missing
//!   ([`ensure_packages`]);
//! - downloads the newest `linux-image-6.1.*-amd64-unsigned` that
//!   `apt-cache search` lists into `target/vm/`, unpacks it with `dpkg -x`
//!   and runs `depmod` ([`prepare`]);
//! - builds a tiny initramfs: busybox and the modules that mount 9p, in the
//!   order `modules.dep` gives;
//! - boots the guest (KVM when a probe boot shows it works, TCG otherwise,
//!   and says which), whose `/init` mounts the host's root, the unpacked
//!   modules and the job folder and runs `/mnt/guest.sh` from the job
//!   folder: it brings up the NIC and then serves commands the host writes
//!   into that folder (`cmd/N.sh`, answered in `out/N.log` and `out/N.rc`);
//! - joins the guest's NIC (a tap in a namespace, bridged) to a veth whose
//!   other end, `ens0` in a second namespace, is where the gateway runs.
//!
//! Everything it creates is removed in `Drop`, on success, failure or
//! Ctrl-C: QEMU and the gateway are killed by their pid when they do not
//! stop on their own, then the namespaces (with the tap, bridge and veth in
//! them) are deleted and the job folder removed. No wait here is a fixed
//! sleep for correctness: each waits for a condition with a generous
//! deadline, since TCG is slow and its speed must not decide a result.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Debian packages the lab needs on the host (and, through the shared root
/// file system, in the guest).
pub const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "tshark",
    "python3",
];

/// The modules the initramfs inserts before it can mount the host's root:
/// these and what `modules.dep` says they need.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

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

/// Generous deadlines: TCG is slow, and no result may depend on its speed.
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);
pub const COMMAND_LIMIT: Duration = Duration::from_secs(180);
const KVM_PROBE_LIMIT: Duration = Duration::from_secs(20);
const POWEROFF_LIMIT: Duration = Duration::from_secs(60);

/// The guest's and the gateway's underlay addresses (the seed lab's: the
/// guest is host2, the kernel peer; the gateway is host1).
pub const GUEST_V4: &str = "192.168.0.58";
pub const GW_V4: &str = "192.168.0.8";
pub const GUEST_V6: &str = "2001:db8::58";
pub const GW_V6: &str = "2001:db8::8";
/// The guest NIC's MAC (QEMU's default range).
pub const GUEST_MAC: &str = "52:54:00:00:00:58";

pub fn say(msg: &str) {
    eprintln!("[vm] {msg}");
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs [`VM_PACKAGES`] that are missing (says which).
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        say("Debian packages for the VM lab: all present");
        return Ok(());
    }
    say(&format!("installing Debian packages {missing:?}"));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

/// The kernel release (e.g. `6.1.0-57-amd64`) of the newest generic
/// `linux-image-6.1.*-amd64-unsigned` that the Debian registry serves.
/// (The `cloud` flavour has no 9p, the `rt` one is another kernel.)
pub fn newest_kernel() -> Result<String> {
    let search = || -> Result<Vec<(u32, String)>> {
        let out = run(Command::new("apt-cache").args([
            "search",
            "--names-only",
            r"^linux-image-6\.1\.[0-9.-]*-amd64-unsigned$",
        ]))?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let pkg = l.split_whitespace().next()?;
                let release = pkg
                    .strip_prefix("linux-image-")?
                    .strip_suffix("-unsigned")?;
                // 6.1.0-57-amd64: the ABI number orders them.
                let abi = release
                    .strip_suffix("-amd64")?
                    .rsplit('-')
                    .next()?
                    .parse()
                    .ok()?;
                Some((abi, release.to_string()))
            })
            .collect())
    };
    let mut found = search()?;
    if found.is_empty() {
        say("apt-cache lists no linux-image-6.1 package: running apt-get update");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        found = search()?;
    }
    found.sort();
    found.pop().map(|(_, r)| r).ok_or_else(|| {
        anyhow!("the Debian registry lists no linux-image-6.1.*-amd64-unsigned package (apt-cache search linux-image-6.1)")
    })
}

/// An unpacked kernel with its initramfs, ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The unpacked `lib/modules` (exported to the guest as `mods`).
    pub modules: PathBuf,
    pub initrd: PathBuf,
}

/// Downloads, unpacks and prepares the newest kernel into `cache` (reused
/// when already there), and builds its initramfs.
pub fn prepare(cache: &Path) -> Result<Kernel> {
    fs::create_dir_all(cache)?;
    let release = match std::env::var("GATEWAY_VM_KERNEL") {
        Ok(r) if !r.is_empty() => r,
        _ => newest_kernel()?,
    };
    let dir = cache.join(format!("linux-{release}"));
    let done = dir.join(".prepared");
    if !done.exists() {
        let _ = fs::remove_dir_all(&dir);
        let pkg = format!("linux-image-{release}-unsigned");
        say(&format!(
            "downloading {pkg} into {} (once)",
            cache.display()
        ));
        run(Command::new("apt-get")
            .current_dir(cache)
            .args(["download", "-qq", &pkg]))?;
        let deb = fs::read_dir(cache)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
            .with_context(|| {
                format!(
                    "apt-get download left no {pkg}_*.deb in {}",
                    cache.display()
                )
            })?;
        say(&format!("unpacking {} with dpkg -x", deb.display()));
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
        run(Command::new("depmod").arg("-b").arg(&dir).arg(&release))?;
        fs::remove_file(&deb)?;
        fs::write(&done, "")?;
    }
    let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} is missing from the unpacked package", vmlinuz.display());
    }
    let kernel = Kernel {
        vmlinuz,
        modules: dir.join("lib/modules"),
        initrd: cache.join(format!("initrd-{release}.cpio")),
        release,
    };
    build_initramfs(&kernel)?;
    Ok(kernel)
}

/// Module name as modprobe sees it (`9pnet_virtio`) from a path in
/// `modules.dep` (`kernel/net/9p/9pnet_virtio.ko.xz`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The modules to insert, dependencies first, for `wanted`: read from the
/// text of `modules.dep`. Names that are built in (absent from the file
/// but listed in `builtin`) are left out.
pub fn module_order(modules_dep: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let d = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(path), (path.to_string(), d));
    }
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        if let Some((path, d)) = deps.get(name) {
            for dep in d {
                visit(&module_name(dep), deps, seen, out);
            }
            out.push(path.clone());
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for w in wanted {
        if !deps.contains_key(*w) {
            if builtin.contains(*w) {
                continue;
            }
            bail!("module {w} is neither in modules.dep nor built in");
        }
        visit(w, &deps, &mut seen, &mut out);
    }
    Ok(out)
}

/// The guest's `/init`: mounts the host's root read-only, the modules and
/// the job folder, and runs the job's `guest.sh` in it.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  insmod "/lib/$m" || echo "[init] insmod $m failed"
done
nine() { mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144"$3" "$1" "$2"; }
if ! nine hostroot /newroot ,ro; then
  echo "[init] cannot mount the host's root over 9p"; poweroff -f
fi
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mkdir -p /newroot/tmp/km/lib/modules
nine mods /newroot/tmp/km/lib/modules ,ro
nine job /newroot/mnt ""
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
echo "[init] host root mounted, running /mnt/guest.sh"
exec chroot /newroot /bin/sh /mnt/guest.sh
"#;

fn build_initramfs(k: &Kernel) -> Result<()> {
    if k.initrd.exists() {
        return Ok(());
    }
    let kdir = k.modules.join(&k.release);
    let dep = fs::read_to_string(kdir.join("modules.dep")).context("reading modules.dep")?;
    let builtin = fs::read_to_string(kdir.join("modules.builtin")).unwrap_or_default();
    let order = module_order(&dep, &builtin, INITRAMFS_MODULES)?;
    let stage = k.initrd.with_extension("d");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("bin"))?;
    fs::create_dir_all(stage.join("lib"))?;
    fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .context("copying /bin/busybox (apt-get install busybox-static)")?;
    let mut names = Vec::new();
    for path in &order {
        let src = kdir.join(path);
        let name = format!("{}.ko", module_name(path));
        let dst = stage.join("lib").join(&name);
        if path.ends_with(".ko") {
            fs::copy(&src, &dst)?;
        } else {
            // Compressed: busybox insmod takes plain modules.
            let tool = if path.ends_with(".xz") {
                "xz"
            } else if path.ends_with(".zst") {
                "zstd"
            } else {
                bail!("module {path}: unknown compression")
            };
            let out = Command::new(tool)
                .arg("-dc")
                .arg(&src)
                .output()
                .with_context(|| format!("running {tool}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {}: failed", src.display());
            }
            fs::write(&dst, out.stdout)?;
        }
        names.push(name);
    }
    say(&format!(
        "initramfs for {}: busybox and modules {} (order from modules.dep)",
        k.release,
        names.join(" ")
    ));
    fs::write(stage.join("modules.order"), names.join("\n") + "\n")?;
    fs::write(stage.join("init"), INIT)?;
    run(Command::new("chmod").arg("755").arg(stage.join("init")))?;
    let tmp = k.initrd.with_extension("tmp");
    let out = fs::File::create(&tmp)?;
    let status = Command::new("sh")
        .current_dir(&stage)
        .args([
            "-c",
            "find . -print0 | cpio --null -o -H newc -R 0:0 --quiet",
        ])
        .stdout(out)
        .status()
        .context("running cpio")?;
    if !status.success() {
        bail!("building the initramfs with cpio failed");
    }
    fs::rename(&tmp, &k.initrd)?;
    fs::remove_dir_all(&stage)?;
    Ok(())
}

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

/// Whether the process was asked to stop (Ctrl-C); waits give up when set.
#[derive(Clone, Default)]
pub struct Stop(pub Arc<AtomicBool>);

impl Stop {
    pub fn check(&self) -> Result<()> {
        if self.0.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    }
}

/// Polls `f` every 50 ms until it gives `Some`; fails naming `what` (and
/// what `f` last saw, from `seen`) after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    stop: &Stop,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        stop.check()?;
        if start.elapsed() >= limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Stops a child: `sig` first, SIGKILL by its pid after `grace`.
fn stop_child(child: &mut Child, sig: &str, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        kill(child.id(), sig);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The host side of the wire: namespace `<prefix>-wire` with a bridge,
/// QEMU's tap and one end of a veth; namespace `<prefix>-gw` with the
/// other end, `ens0`, at [`GW_V4`] and [`GW_V6`] (where the gateway runs).
/// Deleted on drop, with everything in them.
pub struct Topology {
    pub wire: String,
    pub gw: String,
    pub tap: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Result<Topology> {
        let t = Topology {
            wire: format!("{prefix}-wire"),
            gw: format!("{prefix}-gw"),
            tap: "vmtap0".into(),
        };
        for ns in [&t.wire, &t.gw] {
            if Path::new("/var/run/netns").join(ns).exists() {
                bail!("network namespace {ns} already exists (a lab still running, or left over?); remove it with `ip netns del {ns}`");
            }
        }
        // From here on, Drop removes what exists.
        for ns in [&t.wire, &t.gw] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (w, g) = (t.wire.as_str(), t.gw.as_str());
        ip(&["-n", w, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", w, "tuntap", "add", "dev", &t.tap, "mode", "tap"])?;
        ip(&[
            "link", "add", "ens0", "netns", g, "type", "veth", "peer", "name", "port1", "netns", w,
        ])?;
        for dev in [t.tap.as_str(), "port1"] {
            ip(&["-n", w, "link", "set", dev, "master", "br0"])?;
            ip(&["-n", w, "link", "set", dev, "up"])?;
        }
        ip(&["-n", w, "link", "set", "br0", "up"])?;
        ip(&[
            "-n",
            g,
            "addr",
            "add",
            &format!("{GW_V4}/24"),
            "dev",
            "ens0",
        ])?;
        ip(&[
            "-n",
            g,
            "-6",
            "addr",
            "add",
            &format!("{GW_V6}/64"),
            "dev",
            "ens0",
            "nodad",
        ])?;
        ip(&["-n", g, "link", "set", "ens0", "up"])?;
        Ok(t)
    }

    /// `ip netns exec NS ARGS...`: success and output (stdout and stderr).
    pub fn exec(ns: &str, args: &[&str]) -> (bool, String) {
        match Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
        {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.gw, &self.wire] {
            if !Path::new("/var/run/netns").join(ns).exists() {
                continue;
            }
            // Anything still running in it (a capture, a shell's child).
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        say(&format!(
            "removed namespaces {} and {} (bridge, tap and veth with them)",
            self.wire, self.gw
        ));
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
fn guest_script(console: Console) -> String {
    let modules = GUEST_MODULES.join(" ");
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
# Written by xtask/src/vm.rs: runs in the guest, on the host's root.
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

fn qemu_command(k: &Kernel, accel: Accel, job: &Path, netns: Option<(&str, &str)>) -> Command {
    let mut c = match netns {
        Some((ns, _)) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    c.args(accel.args())
        .args(["-m", "1024", "-smp", "1", "-no-reboot"])
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

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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
    let mut child = qemu_command(k, Accel::Kvm, &job, None)
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
        let _ = fs::remove_dir_all(&job);
        fs::create_dir_all(job.join("cmd"))?;
        fs::create_dir_all(job.join("out"))?;
        fs::write(job.join("guest.sh"), guest_script(console))?;
        let console_log = job.join("console.log");
        let mut cmd = qemu_command(k, accel, &job, Some((&topo.wire, &topo.tap)));
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
            "booting {} under {}",
            k.release,
            match accel {
                Accel::Kvm => "KVM",
                Accel::Tcg => "TCG",
            }
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

/// The real gateway binary, run in a namespace from a configuration
/// written to a file; SIGTERM (then SIGKILL by its pid) on drop.
pub struct GatewayProc {
    child: Child,
    pub log: PathBuf,
    pub stdout: PathBuf,
    config: PathBuf,
}

impl GatewayProc {
    pub fn start(bin: &Path, ns: &str, config: &str, dir: &Path, stop: &Stop) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let cfg = dir.join("gateway.toml");
        fs::write(&cfg, config)?;
        let log = dir.join("gateway.log");
        let stdout = dir.join("gateway.json");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(["--iface", "ens0", "--config"])
            .arg(&cfg)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout)?)
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut gw = GatewayProc {
            child,
            log,
            stdout,
            config: cfg,
        };
        wait_for(
            "the gateway to start",
            Duration::from_secs(60),
            stop,
            || {
                let text = fs::read_to_string(&gw.log).unwrap_or_default();
                if text.contains("gateway running") {
                    return Ok(Some(()));
                }
                if text.contains("error:") {
                    bail!("the gateway did not start:\n{text}");
                }
                if let Ok(Some(s)) = gw.child.try_wait() {
                    bail!("the gateway exited ({s}):\n{text}");
                }
                Ok(None)
            },
        )?;
        Ok(gw)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The counters, as the JSON line SIGUSR1 makes it print.
    pub fn stats(&mut self, stop: &Stop) -> Result<String> {
        let before = fs::read_to_string(&self.stdout).unwrap_or_default().len();
        kill(self.child.id(), "-USR1");
        let path = self.stdout.clone();
        wait_for(
            "the gateway's counters",
            Duration::from_secs(30),
            stop,
            || {
                let text = fs::read_to_string(&path).unwrap_or_default();
                let new = text.get(before..).unwrap_or("");
                Ok(new
                    .lines()
                    .find(|l| l.starts_with('{') && new.contains('\n'))
                    .map(str::to_string))
            },
        )
    }

    /// SIGTERM, and the wait for a clean exit.
    pub fn stop(mut self) -> Result<()> {
        kill(self.child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                if !s.success() {
                    bail!(
                        "the gateway exited with {s} on SIGTERM:\n{}",
                        tail(&self.log, 10)
                    );
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the gateway did not stop within 30 s of SIGTERM")
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        stop_child(&mut self.child, "-TERM", Duration::from_secs(10));
        let _ = fs::remove_file(&self.config);
    }
}

/// A folder removed on drop.
pub struct RemoveDir(pub PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_what_they_need() {
        // 6.1.0-57's lines, shortened.
        let dep = "\
kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
";
        let order = module_order(dep, "kernel/fs/ext4/ext4.ko\n", INITRAMFS_MODULES).unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        let at = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert_eq!(names.len(), 10, "{names:?}");
        assert!(at("virtio_ring") < at("virtio"));
        assert!(at("virtio") < at("virtio_pci"));
        assert!(at("netfs") < at("fscache"));
        assert!(at("fscache") < at("9p"));
        assert!(at("9pnet") < at("9pnet_virtio"));
        // Built in: skipped; unknown: refused.
        assert!(module_order(dep, "kernel/fs/ext4/ext4.ko\n", &["ext4"])
            .unwrap()
            .is_empty());
        assert!(module_order(dep, "", &["nope"]).is_err());
    }
}
