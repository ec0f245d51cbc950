//! What the daemon must remember to take its jobs over after a restart (kill -9, an
//! upgrade, systemd's Restart=): written to `<state-dir>/state.json` after every change,
//! atomically (a temporary file renamed over the last). The kernel side of each job (its
//! policy, learned addresses, flows, links) is in the pinned maps; this is the rest.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::daemon::protocol::Target;
use crate::job::spec::PolicySpec;

/// Bumped when the file's meaning changes; a daemon refuses a file of another version.
pub const STATE_VERSION: u32 = 1;

/// The slot the host default policy is installed under (job slots count up from 1).
pub const HOST_SLOT: u32 = u32::MAX - 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The next job slot: never reused while the maps live, so a late event of an ended
    /// job can never be taken for another's.
    pub next_slot: u32,
    pub jobs: Vec<JobRecord>,
    /// clsact filters attached (IFINDEX:egress|ingress:HANDLE:PRIORITY:PROG_ID), replaced
    /// in place by the next daemon.
    #[serde(default)]
    pub filters: Vec<String>,
    /// The ring buffer's drop counter when the daemon last looked: what it grew by while no
    /// daemon ran is reported as lost.
    #[serde(default)]
    pub ringbuf_drops_seen: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub slot: u32,
    pub target: Target,
    /// The job's cgroup directory (absolute), for cgroup and pid jobs.
    pub cgroup: Option<PathBuf>,
    /// The daemon made the cgroup (a pid job): it removes it at the end.
    #[serde(default)]
    pub created_cgroup: bool,
    /// A pid job's process and the cgroup it came from (absolute), where it goes back.
    #[serde(default)]
    pub origin: Option<(u32, PathBuf)>,
    pub ifindex: Option<u32>,
    /// Host-side interfaces added with `job link` (ifindex, name at the time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<(u32, String)>,
    pub policy: PolicySpec,
    pub step: Option<String>,
    pub events: PathBuf,
    /// RFC 3339.
    pub started: String,
    /// `job start --fail-on-block`: `job end` fails when anything was blocked.
    #[serde(default)]
    pub fail_on_block: bool,
    /// `job start --webhook`.
    #[serde(default)]
    pub webhook: Option<crate::notify::Webhook>,
}

impl Default for State {
    fn default() -> State {
        State {
            version: STATE_VERSION,
            next_slot: 1,
            jobs: Vec::new(),
            filters: Vec::new(),
            ringbuf_drops_seen: 0,
        }
    }
}

impl State {
    /// The state at `path`; a missing file is a fresh start.
    pub fn load(path: &Path) -> anyhow::Result<State> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => anyhow::bail!("reading the daemon state {}: {e}", path.display()),
        };
        let s: State = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("the daemon state {} does not parse: {e}", path.display())
        })?;
        if s.version != STATE_VERSION {
            anyhow::bail!(
                "the daemon state {} is version {}, this build reads {STATE_VERSION}: unload with the build that wrote it",
                path.display(),
                s.version
            );
        }
        Ok(s)
    }

    /// Writes the state atomically (mode 0600).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// A slot for a new job.
    pub fn take_slot(&mut self) -> u32 {
        let mut s = self.next_slot.max(1);
        while s == HOST_SLOT || s == 0 || self.jobs.iter().any(|j| j.slot == s) {
            s = s.wrapping_add(1);
        }
        self.next_slot = s.wrapping_add(1);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let mut s = State::default();
        assert_eq!(s.take_slot(), 1);
        assert_eq!(s.take_slot(), 2);
        s.save(&p).unwrap();
        let back = State::load(&p).unwrap();
        assert_eq!(back.next_slot, 3);
        assert!(State::load(&dir.path().join("none"))
            .unwrap()
            .jobs
            .is_empty());
        std::fs::write(&p, r#"{"version":99,"next_slot":1,"jobs":[]}"#).unwrap();
        assert!(State::load(&p)
            .unwrap_err()
            .to_string()
            .contains("version 99"));
    }
}
