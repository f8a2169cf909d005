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
