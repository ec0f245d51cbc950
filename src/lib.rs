//! ringfence: an eBPF egress firewall and audit trail for CI runners.
//!
//! Map of the crate:
//! - `bpf/` holds the kernel programs (C) and `abi.h`, the one ABI they share with Rust.
//! - `kernel`: the only code that touches libbpf: load, attach, pin, the maps, the ABI.
//! - `policy`: parses and compiles policies.
//! - `job`: a job on the host (its cgroup, the guard that outlives `exec`, tamper findings).
//! - `agent`: the one event loop that turns kernel events into each job's audit trail.
//! - `trail`: events, DNS, exfiltration findings, reports.
//! - `exec`: one command as one job, start to finish; `daemon`: `ringfence run`, the
//!   control socket and its clients, many jobs on one pinned dataplane.
//! - `insights`: `policy suggest|check`, from audit runs to a block-mode policy, offline.
//! - `testkit` (feature): network namespaces with real DNS servers, for tests and the demo.
pub mod agent;
pub mod cli;
pub mod daemon;
pub mod exec;
pub mod insights;
pub mod job;
pub mod kernel;
pub mod kubernetes;
pub mod logging;
pub mod notify;
pub mod policy;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod trail;

/// The exit status for an error: 2 for bad usage or policy (the input is wrong), 1 for
/// everything that went wrong at run time.
pub fn exit_status(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<exec::UsageError>().is_some()
        || e.downcast_ref::<policy::PolicyError>().is_some()
        || e.downcast_ref::<kernel::capacity::CapacityError>()
            .is_some()
    {
        2
    } else {
        1
    }
}
