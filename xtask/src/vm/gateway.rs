//! The gateway under test: the real binary started in the gateway's
//! namespace, its counters read with SIGUSR1, stopped with SIGTERM.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{kill, stop_child, tail, wait_for, Stop};

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
                // A whole line: the JSON ends with its newline.
                Ok(new
                    .split_inclusive('\n')
                    .find(|l| l.starts_with('{') && l.ends_with('\n'))
                    .map(|l| l.trim_end().to_string()))
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
