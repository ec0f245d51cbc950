//! The command line (clap derive; doc comments are the help text).
use clap::{Parser, Subcommand};

use crate::exec::ExecArgs;

/// ringfence: an eBPF egress firewall and audit trail for CI jobs.
///
/// Every outbound connection a job makes is seen in the kernel, named by the DNS answer
/// behind it, attributed to the job and process, and — in block mode — allowed only if
/// the job's policy lists it.
#[derive(Debug, Parser)]
#[command(name = "ringfence", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run one command as a job under a policy, then print its report.
    // Boxed: the other commands are small, and clap fills it once.
    Exec(Box<ExecArgs>),
    /// The seed tutorial: a job with a poisoned install script, in audit then block mode,
    /// inside network namespaces it creates and removes.
    #[cfg(feature = "testkit")]
    Demo(crate::testkit::demo::DemoOptions),
    /// Run the host daemon: load, attach and pin the dataplane, serve the control socket.
    Run(crate::daemon::server::RunArgs),
    /// Start, mark steps of, and end jobs of the daemon.
    #[command(subcommand)]
    Job(crate::daemon::client::JobCmd),
    /// Print a running job's report so far.
    Report {
        /// The job's id.
        id: String,
        #[arg(long, value_enum, default_value = "text")]
        format: crate::trail::report::Format,
        /// Earlier runs' events files, or directories of them: destinations none of them
        /// used are marked new.
        #[arg(long, value_name = "EVENTS|DIR", num_args = 1..)]
        baseline: Vec<std::path::PathBuf>,
        #[command(flatten)]
        socket: crate::daemon::client::SocketArg,
    },
    /// The daemon's jobs, counters, map fill, attach path and kernel.
    Status {
        /// The whole status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: crate::daemon::client::SocketArg,
    },
    /// The node agent for Actions Runner Controller: a job per runner pod on this node.
    Kubernetes(crate::kubernetes::KubeArgs),
    /// A live view of the daemon's jobs and their flows (plain lines when not a terminal).
    Watch(crate::daemon::watch::WatchArgs),
    /// Detach every program and remove every pin (through the daemon, or without one).
    Unload {
        /// Even while jobs run (they are no longer enforced).
        #[arg(long)]
        force: bool,
        /// Where the dataplane is pinned (when no daemon runs).
        #[arg(long, value_name = "DIR", default_value = crate::kernel::pins::DEFAULT_BASE)]
        bpffs: std::path::PathBuf,
        /// The daemon's state directory (when no daemon runs).
        #[arg(
            long = "state-dir",
            value_name = "DIR",
            default_value = "/run/ringfence"
        )]
        state_dir: std::path::PathBuf,
        #[command(flatten)]
        socket: crate::daemon::client::SocketArg,
    },
    /// Print what this kernel supports (version, BTF, attach path) as JSON.
    Probe,
    /// Policies from audit runs, offline: suggest one, compare one, check endpoints.
    #[command(subcommand)]
    Policy(crate::insights::PolicyCmd),
    /// Internal: the process `exec` starts to kill the job if ringfence dies.
    #[command(hide = true)]
    Guard(crate::job::guard::GuardArgs),
}
