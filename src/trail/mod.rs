//! The audit trail: events as written to JSON Lines (`events`), DNS messages (`dns`),
//! exfiltration findings (`exfil`), the calls a job had blocked (`blocked`), the per-job report (`report`, its HTML page in
//! `report_html.rs`), earlier runs' destinations (`baseline`) and what a job's trail may
//! cost (`limits`).
pub mod baseline;
pub mod blocked;
pub mod dns;
pub mod events;
pub mod exfil;
pub mod limits;
pub mod report;
