//! ringfence: an eBPF egress firewall and audit trail for CI runners.
pub mod bpf_skel;
pub mod dns;
pub mod events;
pub mod report;
