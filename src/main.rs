//! The `mcp-relay` binary: parse the command line and run it (logging is set up from the config).

fn main() -> std::process::ExitCode {
    mcp_relay::cli::main()
}
