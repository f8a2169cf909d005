//! Logging setup: `tracing` to stderr (stdout belongs to the stdio protocol) — human format
//! on a terminal, JSON lines otherwise, or as `relay.log.format` says — and, with
//! `relay.log.file`, to daily-rotated JSON files (7 kept). The level comes from `RUST_LOG`,
//! else `relay.log.level`, else `info`. `MCP_RELAY_LOG_DIR` adds a log directory without a
//! config change (the test suite uses it to check that no secret is ever logged).

use crate::config::{LogFormat, LogSettings};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Log files kept in the log directory.
const FILES_KEPT: usize = 7;

/// Installs the global subscriber; later calls do nothing.
pub fn init(settings: &LogSettings) {
    let filter = || {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            EnvFilter::try_new(settings.level.as_deref().unwrap_or("info"))
                .unwrap_or_else(|_| EnvFilter::new("info"))
        })
    };
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr = if json {
        stderr.json().with_current_span(true).boxed()
    } else {
        stderr.boxed()
    };
    let dir = std::env::var_os("MCP_RELAY_LOG_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| settings.dir.clone());
    let mut problem = None;
    let file = dir.and_then(|dir| {
        match tracing_appender::rolling::Builder::new()
            .rotation(tracing_appender::rolling::Rotation::DAILY)
            .filename_prefix("mcp-relay")
            .filename_suffix("log")
            .max_log_files(FILES_KEPT)
            .build(&dir)
        {
            Ok(appender) => Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(appender)
                    .with_filter(filter()),
            ),
            Err(e) => {
                problem = Some(format!("cannot log to {}: {e}", dir.display()));
                None
            }
        }
    });
    let result = tracing_subscriber::registry()
        .with(stderr.with_filter(filter()))
        .with(file)
        .try_init();
    if result.is_err() {
        return;
    }
    if let Some(p) = problem {
        tracing::warn!("{p}; logging to stderr only.");
    }
}
