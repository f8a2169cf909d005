//! mcp-relay: many MCP servers behind one lossless MCP endpoint (stdio and Streamable HTTP).
//!
//! Module map (see ARCHITECTURE.md):
//! - [`admin`]: management tools, config reload and file watch, the control socket.
//! - [`cli`]: command-line interface; `serve`, `stdio`, `config check`.
//! - [`config`]: `relay.json` loading, `${VAR}` expansion, validation with JSON paths.
//! - [`protocol`]: the JSON-RPC envelope with raw payloads, MCP method names, stdio framing.
//! - [`backend`]: one MCP server per backend, one file per transport, restart with backoff.
//! - [`catalog`]: merged tools/prompts/resources, `server__name` namespacing, pagination.
//! - [`session`]: per-client state (serializable) and the channels back to the client.
//! - [`sync`]: lock helpers shared by every module.
//! - [`tasks`]: task ids namespaced per backend (`server+taskId`).
//! - [`router`]: the hot path; the running [`router::Relay`].
//! - [`selection`]: which tools a session sees; `relay__analyze_prompt` and its ranker.
//! - [`frontend`]: stdio and Streamable HTTP servers facing clients.
//! - [`error`]: request errors and their single mapping to JSON-RPC.
//! - [`metrics`]: Prometheus metrics (`/metrics`).
//! - [`telemetry`]: tracing setup (stderr and an optional rotating file).
//! - [`upgrade`]: replacing the running binary in place without a client noticing.

pub mod admin;
pub mod backend;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod error;
pub mod frontend;
pub mod metrics;
pub mod protocol;
pub mod router;
pub mod selection;
pub mod session;
pub mod sync;
pub mod tasks;
pub mod telemetry;
pub mod upgrade;

/// A build tag the binary carries in a fixed-size, NUL-padded slot after this marker, empty
/// in every build. Deploy tooling (and the upgrade tests, which need a second build of the
/// same code that reports another version) may patch the slot in a copy of the executable.
#[used]
static BUILD_TAG: [u8; 48] =
    *b"MCP-RELAY-BUILD-TAG:\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// The marker before the tag slot in [`BUILD_TAG`].
pub const BUILD_TAG_MARKER: &[u8] = b"MCP-RELAY-BUILD-TAG:";

/// The build tag ("" unless patched; see [`BUILD_TAG`]).
pub fn build_tag() -> String {
    // Read through a volatile load: the compiler must not fold the (patchable) bytes.
    // SAFETY: `BUILD_TAG` is a valid, aligned static that nothing writes at run time.
    let bytes: [u8; 48] = unsafe { std::ptr::read_volatile(&raw const BUILD_TAG) };
    let slot = &bytes[BUILD_TAG_MARKER.len()..];
    let end = slot.iter().position(|b| *b == 0).unwrap_or(slot.len());
    String::from_utf8_lossy(&slot[..end]).into_owned()
}

/// The version this binary reports: the package version, `+tag` when it carries a build tag.
pub fn version() -> String {
    let tag = build_tag();
    if tag.is_empty() {
        env!("CARGO_PKG_VERSION").to_owned()
    } else {
        format!("{}+{tag}", env!("CARGO_PKG_VERSION"))
    }
}
