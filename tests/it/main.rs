//! Integration tests: the real `mcp-relay` binary in front of real MCP servers.

mod admin;
mod faults;
mod http;
mod isolation;
mod lifecycle;
mod modern;
mod rmcp_client;
mod security;
mod selection;
mod stdio;
mod support;
mod upgrade;
mod ws;
