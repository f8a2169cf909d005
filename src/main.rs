//! The `mcp-relay` binary: parse the command line, set up logs, run.

fn main() -> std::process::ExitCode {
    mcp_relay::telemetry::init();
    mcp_relay::cli::main()
}
