//! Logging: `tracing` to stderr (RUST_LOG filters), with libbpf's own lines routed in.
use std::sync::Once;

use libbpf_rs::PrintLevel;

/// Installs the stderr subscriber once. `RUST_LOG` overrides the default level (warn).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
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
