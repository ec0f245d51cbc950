//! The baseline: the destinations a job's earlier runs used, read from their events files,
//! so a report can mark what a run calls for the first time (harden-runner's "new endpoint"
//! alerts, offline and from files the user owns).
//!
//! A destination is the DNS name behind a flow (lowercase, no trailing dot) or, for a flow
//! no answer named, its address; with its port. DNS query findings are not destinations
//! (their address is the resolver): the name counts when the job connects to it. Every outbound flow of an earlier run
//! counts, whatever its verdict, its job id or its step: a step's label changes between
//! runs (exec labels it by its program), a destination does not. Protocol is not part of
//! it, as in policies.
//!
//! Reading streams the files line by line (a run's file may be large); a line that does
//! not parse is an error naming its file and line. The set is bounded by
//! [`MAX_DESTINATIONS`]: past it, later destinations are not remembered and the report says
//! so (they would then show as new: the error is on the side of showing too much).

use std::collections::BTreeSet;
use std::io::BufRead;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::trail::events::Event;

/// Destinations remembered from earlier runs.
pub const MAX_DESTINATIONS: usize = 1_000_000;

/// Why a baseline could not be read. Bad input: callers exit with status 2.
#[derive(Debug, Error)]
pub enum BaselineError {
    #[error("baseline {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("baseline {path}:{line}: not an event: {source}")]
    Parse {
        path: String,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("baseline {0}: no events files in this directory (*.jsonl, or */events.jsonl as the daemon writes them)")]
    EmptyDir(String),
}

/// What earlier runs used. Travels to the daemon as it is (the client reads the files: the
/// daemon, root, never opens a path a client names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// Events files read.
    pub runs: usize,
    /// `name:port`, or `address:port` (IPv6 in brackets).
    pub destinations: BTreeSet<String>,
    /// Destinations not remembered: past [`MAX_DESTINATIONS`].
    #[serde(default)]
    pub not_kept: usize,
}

/// Flows that are no call to a destination: a DNS query finding (its address is the
/// resolver, its name is judged when connected to) and DNS that could not be judged.
pub fn not_a_destination(r: crate::trail::events::Reason) -> bool {
    use crate::trail::events::Reason;
    matches!(r, Reason::DnsQuery | Reason::DnsUnjudged)
}

/// The key of a destination: its name if a DNS answer named it, else its address.
pub fn destination(domain: Option<&str>, dst: IpAddr, port: u16) -> String {
    match (domain, dst) {
        (Some(d), _) => {
            let d = d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase();
            format!("{d}:{port}")
        }
        (None, IpAddr::V6(a)) => format!("[{a}]:{port}"),
        (None, IpAddr::V4(a)) => format!("{a}:{port}"),
    }
}

impl Baseline {
    /// Reads every events file named, or found in a named directory (its `*.jsonl`, and
    /// each subdirectory's `events.jsonl`: `<data-dir>/jobs/` of the daemon is one).
    pub fn load(paths: &[PathBuf]) -> Result<Baseline, BaselineError> {
        let mut b = Baseline::default();
        for p in paths {
            for f in files_of(p)? {
                b.add_file(&f)?;
            }
        }
        Ok(b)
    }

    /// Adds one events file.
    pub fn add_file(&mut self, path: &Path) -> Result<(), BaselineError> {
        let shown = path.display().to_string();
        let io = |source| BaselineError::Io {
            path: shown.clone(),
            source,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(io)?;
            if line.trim().is_empty() {
                continue;
            }
            let ev: Event = serde_json::from_str(&line).map_err(|source| BaselineError::Parse {
                path: shown.clone(),
                line: i + 1,
                source,
            })?;
            self.add(&ev);
        }
        self.runs += 1;
        Ok(())
    }

    /// Adds one event (only outbound flows count).
    pub fn add(&mut self, ev: &Event) {
        let Event::Flow(f) = ev else {
            return;
        };
        if !f.direction.is_outbound() || not_a_destination(f.reason) {
            return;
        }
        let d = destination(f.domain.as_deref(), f.dst, f.port);
        if self.destinations.len() >= MAX_DESTINATIONS && !self.destinations.contains(&d) {
            self.not_kept += 1;
            return;
        }
        self.destinations.insert(d);
    }

    /// Whether an earlier run used this destination.
    pub fn knows(&self, domain: Option<&str>, dst: IpAddr, port: u16) -> bool {
        self.destinations.contains(&destination(domain, dst, port))
    }
}

/// The events files `p` names: itself, or a directory's `*.jsonl` and `*/events.jsonl`,
/// sorted (so the order, and any error, is the same every time).
fn files_of(p: &Path) -> Result<Vec<PathBuf>, BaselineError> {
    let shown = p.display().to_string();
    let meta = std::fs::metadata(p).map_err(|source| BaselineError::Io {
        path: shown.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![p.to_path_buf()]);
    }
    let entries = std::fs::read_dir(p).map_err(|source| BaselineError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut files = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            let ev = path.join("events.jsonl");
            if ev.is_file() {
                files.push(ev);
            }
        } else if path.extension().is_some_and(|x| x == "jsonl") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(BaselineError::EmptyDir(shown));
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOW: &str = r#"{"ts":"2026-11-25T21:04:05.123456Z","job":"a","step":"npm","pid":1,"comm":"node","cgroup":1,"proto":"tcp","dst":"198.51.100.66","port":443,"domain":"Registry.Test.","verdict":"allowed","reason":"allowed"}"#;

    #[test]
    fn names_and_addresses_with_ports() {
        let dir = tempfile::tempdir().unwrap();
        let direct = FLOW
            .replace(r#""domain":"Registry.Test.""#, r#""domain":null"#)
            .replace("198.51.100.66", "2001:db8::1");
        let inbound = FLOW.replace("Registry.Test.", "peer.test").replace(
            r#""reason":"allowed""#,
            r#""reason":"allowed","direction":"inbound""#,
        );
        std::fs::write(
            dir.path().join("run1.jsonl"),
            format!("{FLOW}\n\n{direct}\n{inbound}\n"),
        )
        .unwrap();
        let sub = dir.path().join("job-7");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("events.jsonl"), FLOW.replace("443", "8443")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not events").unwrap();
        let b = Baseline::load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(b.runs, 2);
        let ip = "198.51.100.66".parse().unwrap();
        assert!(b.knows(Some("registry.test"), ip, 443));
        assert!(b.knows(Some("registry.test"), ip, 8443));
        assert!(!b.knows(Some("registry.test"), ip, 80));
        assert!(b.knows(None, "2001:db8::1".parse().unwrap(), 443));
        // Inbound connections are not destinations the job called.
        assert!(!b.knows(Some("peer.test"), ip, 443));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.jsonl");
        std::fs::write(&f, format!("{FLOW}\n{{\"type\":\"flow\"}}\n")).unwrap();
        let e = Baseline::load(std::slice::from_ref(&f))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("baseline {}:2: not an event", f.display())),
            "{e}"
        );
        let empty = tempfile::tempdir().unwrap();
        let e = Baseline::load(&[empty.path().to_path_buf()]).unwrap_err();
        assert!(matches!(e, BaselineError::EmptyDir(_)), "{e}");
        let e = Baseline::load(&[dir.path().join("missing.jsonl")]).unwrap_err();
        assert!(e.to_string().contains("missing.jsonl"), "{e}");
    }
}
