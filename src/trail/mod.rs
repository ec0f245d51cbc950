//! The audit trail: events as written to JSON Lines (`events`), DNS messages (`dns`),
//! exfiltration findings (`exfil`), the per-job report (`report`) and what a job's trail
//! may cost (`limits`).
pub mod dns;
pub mod events;
pub mod exfil;
pub mod limits;
pub mod report;
