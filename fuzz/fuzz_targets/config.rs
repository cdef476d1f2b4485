//! Any text as a configuration file: a config or a one-line error, never a
//! panic.
#![no_main]

use gateway::control::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match Config::parse(text) {
            Ok(c) => assert!(!c.tunnels.is_empty()),
            Err(e) => assert!(!e.to_string().contains('\n'), "one line: {e}"),
        }
    }
});
