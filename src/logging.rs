//! Logging: `tracing` to stderr (RUST_LOG filters), with libbpf's own lines routed in.
use std::sync::Once;

use libbpf_rs::PrintLevel;

/// Installs the stderr subscriber once. `RUST_LOG` overrides the default level: `warn` for
/// commands a person runs (their output is the report, not a log), `info` for the daemons
/// (`ringfence run`, `ringfence kubernetes`), whose log is the record of what they did: jobs
/// started and ended, policies installed, a pinned dataplane taken over.
///
/// Colour only on a terminal, never with `NO_COLOR` set; under systemd (`JOURNAL_STREAM`
/// names the journal) no timestamp either, since the journal stamps every line itself.
pub fn init(default_level: &str) {
    use std::io::IsTerminal;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// libbpf prints the verifier log and attach failures through its print callback; send
/// them to `tracing` so they obey RUST_LOG like everything else.
pub fn route_libbpf_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        libbpf_rs::set_print(Some((PrintLevel::Debug, |level, msg| {
            let msg = msg.trim_end();
            match level {
                PrintLevel::Warn => tracing::warn!(target: "libbpf", "{msg}"),
                PrintLevel::Info => tracing::info!(target: "libbpf", "{msg}"),
                PrintLevel::Debug => tracing::debug!(target: "libbpf", "{msg}"),
            }
        })));
    });
}
