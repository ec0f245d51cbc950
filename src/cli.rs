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
    /// Print what this kernel supports (version, BTF, attach path) as JSON.
    Probe,
    /// Internal: the process `exec` starts to kill the job if ringfence dies.
    #[command(hide = true)]
    Guard(crate::job::guard::GuardArgs),
}
