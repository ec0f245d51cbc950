//! ringfence: an eBPF egress firewall and audit trail for CI runners.
//!
//! Map of the crate: `bpf/` holds the kernel programs (C) and `abi.h`, the one ABI they
//! share with Rust (`abi`). `dataplane` loads and attaches them and owns their maps;
//! `policy` parses and compiles policies; `agent` is the event loop that turns kernel
//! events into the audit trail (`events`, `dns`, `report`); `exec` runs one command as a
//! job in a `cgroup`, with a `guard` process that kills the job if ringfence dies; `tamper`
//! turns what the dataplane cannot judge (ptrace of outside processes, programs detached)
//! into findings. `demo` and `testbed` build network namespaces with real DNS servers.
pub mod abi;
pub mod agent;
pub mod bpf_skel;
pub mod cgroup;
pub mod cli;
pub mod dataplane;
pub mod demo;
pub mod dns;
pub mod events;
pub mod exec;
pub mod exfil;
pub mod guard;
pub mod limits;
pub mod logging;
pub mod netif;
pub mod policy;
pub mod probe;
pub mod report;
pub mod tamper;
pub mod testbed;
pub mod testrun;

/// The exit status for an error: 2 for bad usage or policy (the input is wrong), 1 for
/// everything that went wrong at run time.
pub fn exit_status(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<exec::UsageError>().is_some()
        || e.downcast_ref::<policy::PolicyError>().is_some()
    {
        2
    } else {
        1
    }
}
