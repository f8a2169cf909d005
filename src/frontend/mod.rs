//! Client-facing servers: [`stdio`] (one session on the relay's stdin/stdout) and [`http`]
//! (Streamable HTTP, many sessions; [`gate`] authenticates and rate-limits it, [`tls`] serves
//! it over HTTPS). Frontends frame and check messages and turn errors into JSON-RPC
//! responses; routing is the router's job.

pub mod gate;
pub mod http;
pub mod stdio;
pub mod tls;
