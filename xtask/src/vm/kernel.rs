//! The kernel: the newest Debian 6.1 package found with `apt-cache`,
//! downloaded and unpacked into `target/vm/` (`dpkg -x`, `depmod`), and the
//! tiny initramfs (busybox and the modules that mount 9p) that boots it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use super::{run, say};

/// The modules the initramfs inserts before it can mount the host's root:
/// these and what `modules.dep` says they need.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

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
        // Named after what goes into it too, so that a change to /init or
        // the module list builds a new one rather than reusing the old.
        initrd: cache.join(format!("initrd-{release}-{:016x}.cpio", initramfs_recipe())),
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

/// A hash of what the initramfs is made of: its /init and its modules.
fn initramfs_recipe() -> u64 {
    use std::hash::{Hash, Hasher};
    // (DefaultHasher::new() has fixed keys: the same input, the same name
    // from run to run.)
    let mut h = std::collections::hash_map::DefaultHasher::new();
    INIT.hash(&mut h);
    INITRAMFS_MODULES.hash(&mut h);
    h.finish()
}

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
