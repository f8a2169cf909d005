//! Logging setup: `tracing` to stderr (stdout belongs to the stdio protocol), human format on a
//! terminal and JSON lines otherwise; level from `RUST_LOG` (default `info`).

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; safe to call once per process.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder.json().try_init()
    };
    if result.is_err() {
        eprintln!("mcp-relay: logging was already initialized");
    }
}
