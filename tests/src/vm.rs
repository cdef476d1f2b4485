//! The VM suites' shared part: whether they run (`GATEWAY_VM=1`, which
//! `cargo xtask test` sets unless told `GATEWAY_VM=0`), and running a
//! `cargo xtask vm ...` command with its output relayed into the test's.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

/// Whether the VM suites run; says why not when they do not. `what` says
/// what the test would boot.
pub fn enabled(test: &str, what: &str) -> bool {
    if std::env::var("GATEWAY_VM").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED {test}: {what} (minutes under TCG); set GATEWAY_VM=1 to run it \
             (`cargo xtask test` does unless GATEWAY_VM=0)"
        );
        return false;
    }
    crate::require_root(test)
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Passes each line `from` gives to `out` (`println!` or `eprintln!`, so
/// that the test harness captures it), from a thread of its own.
fn relay(from: impl Read + Send + 'static, out: fn(&str)) -> std::thread::JoinHandle<()> {
    // Spawned threads inherit the test's output capture.
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            out(&line);
        }
    })
}

/// `cargo xtask vm ARGS...`, run from the workspace root with its output
/// relayed; its exit status.
pub fn xtask_vm(args: &[&str]) -> ExitStatus {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root())
        .args(["run", "--quiet", "--package", "xtask", "--", "vm"])
        .args(args);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let out = relay(stdout.expect("piped stdout"), |l| println!("{l}"));
    let err = relay(stderr.expect("piped stderr"), |l| eprintln!("{l}"));
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}"));
    let _ = out.join();
    let _ = err.join();
    status
}

/// Runs `cargo xtask vm ARGS... --json FILE` (FILE under `target/vm`,
/// removed first) and reads the JSON it wrote.
pub fn xtask_vm_json(args: &[&str], file: &str) -> (ExitStatus, serde_json::Value) {
    let json = root().join("target/vm").join(file);
    let _ = std::fs::remove_file(&json);
    let mut all: Vec<&str> = args.to_vec();
    let path = json.to_str().expect("a UTF-8 path").to_string();
    all.extend(["--json", &path]);
    let status = xtask_vm(&all);
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "cargo xtask vm {args:?} failed ({status}) and wrote no {}: {e}",
            json.display()
        )
    });
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", json.display()));
    (status, v)
}
