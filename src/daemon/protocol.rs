//! The control socket's protocol: one JSON request per connection, one line, answered by
//! one JSON line. Small on purpose: `socat` or `nc -U` can drive it by hand.
use serde::{Deserialize, Serialize};

use crate::job::spec::PolicySpec;

/// The longest request line the daemon reads (a policy's text travels inline).
pub const MAX_REQUEST: usize = 4 << 20;

/// What a job is bound to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// An existing cgroup (absolute, or relative to the cgroup2 mount): it and its
    /// descendants are the job.
    Cgroup(String),
    /// A process: the daemon makes a cgroup for the job and moves the process in; its
    /// children from then on are the job (the runner's hook hands in its worker this way).
    /// At the job's end the process goes back where it came from and the rest is killed.
    Pid(u32),
    /// The host side of a veth or tap: everything the job sends through it.
    Interface(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    JobStart {
        id: String,
        target: Target,
        policy: PolicySpec,
        /// `job end` fails (exit 3) when anything was blocked.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fail_on_block: bool,
        /// The job's own webhook (besides the host's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        webhook: Option<crate::notify::Webhook>,
        /// Containers already running are the job's too, when it is the only job (its
        /// service containers, started by the runner before its first step).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        claim_running_containers: bool,
    },
    JobStep {
        id: String,
        name: String,
    },
    /// Adds `interface`, the host side of a veth or tap (a pod's), to running job `id`:
    /// what comes in there is judged as the job's. Ends with the job.
    JobLink {
        id: String,
        interface: String,
    },
    JobEnd {
        id: String,
        #[serde(default)]
        format: Option<String>,
        /// A `--cgroup` job: leave what is still in the cgroup running (from then on it
        /// belongs to no job). By default it is killed with the job.
        #[serde(default)]
        keep_processes: bool,
    },
    Report {
        id: String,
        #[serde(default)]
        format: Option<String>,
        /// Earlier runs' destinations, read by the client (the daemon never opens a path a
        /// client names): the report marks what is new.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        baseline: Option<crate::trail::baseline::Baseline>,
    },
    Status,
    /// `ringfence watch`: the status, and the flow events numbered after `after` (all jobs',
    /// or `job`'s).
    Watch {
        #[serde(default)]
        job: Option<String>,
        #[serde(default)]
        after: u64,
    },
    /// Detach every program and remove every pin; refused while jobs run unless `force`.
    Unload {
        #[serde(default)]
        force: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    JobStarted {
        id: String,
        slot: u32,
        cgroup: Option<String>,
        interface: Option<String>,
        events: String,
    },
    Report {
        text: String,
        /// `job end` of a `--fail-on-block` job: what was blocked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blocked: Option<crate::trail::blocked::Blocked>,
    },
    Status(serde_json::Value),
    Watch {
        status: serde_json::Value,
        /// The number of the last flow event the daemon has (pass it back as `after`).
        cursor: u64,
        events: Vec<serde_json::Value>,
        /// Events between `after` and the first one sent that the daemon no longer holds.
        missed: u64,
    },
    Error {
        error: String,
    },
}

impl Response {
    pub fn error(e: impl std::fmt::Display) -> Response {
        Response::Error {
            error: e.to_string(),
        }
    }
}

/// Job ids name directories and appear in reports: letters, digits, `.`, `_`, `-`.
pub fn check_job_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("job id {id:?}: 1 to 128 characters"));
    }
    if id.starts_with('.')
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "job id {id:?}: only letters, digits, '.', '_' and '-' (not starting with '.')"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = Request::JobStart {
            id: "build-1".into(),
            target: Target::Pid(42),
            policy: PolicySpec {
                allow: vec!["github.com:443".into()],
                ..Default::default()
            },
            fail_on_block: false,
            webhook: None,
            claim_running_containers: false,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""op":"job_start""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"job_end"}"#).is_err());
        let l: Request =
            serde_json::from_str(r#"{"op":"job_link","id":"j","interface":"veth1"}"#).unwrap();
        assert_eq!(
            l,
            Request::JobLink {
                id: "j".into(),
                interface: "veth1".into()
            }
        );
    }

    #[test]
    fn job_ids_are_checked() {
        assert!(check_job_id("run-12.3_a").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(129)] {
            assert!(check_job_id(bad).is_err(), "{bad}");
        }
    }
}
