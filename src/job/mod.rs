//! What a job is on the host, shared by `exec` and the daemon: its cgroup (`cgroup`), the
//! guard process that keeps enforcement up if `exec` dies (`guard`), and the findings for
//! what the dataplane cannot judge itself (`tamper`).
pub mod cgroup;
pub mod containers;
pub mod guard;
pub mod spec;
pub mod tamper;
