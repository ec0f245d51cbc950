//! Failing a job on a block: the calls that were blocked, the exit status that says so, and
//! the GitHub Actions annotation lines that name them.
//!
//! harden-runner users are surprised that a block does not fail the job: the build may go
//! on (a retry, a fallback mirror) and pass green with an exfiltration attempt in its log.
//! `--fail-on-block` turns "something was blocked" into a failed job.
use serde::{Deserialize, Serialize};

/// The exit status of `exec --fail-on-block` (and of `job end` for a job started with
/// `--fail-on-block`) when the job succeeded but something was blocked. ringfence's own
/// errors are 1 (runtime) and 2 (usage, policy); a command that failed keeps its own status.
pub const BLOCKED_EXIT: i32 = 3;

/// Annotation lines written at most (GitHub shows only the first few of a step anyway);
/// the rest are counted in one more line.
pub const MAX_ANNOTATIONS: usize = 20;

/// One blocked destination of a job, as its report's row has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedCall {
    /// The DNS name whose answer produced the address, when one did.
    pub domain: Option<String>,
    pub dst: String,
    pub port: u16,
    pub proto: String,
    pub reason: String,
    /// The earliest blocked flow's process.
    pub comm: String,
    pub pid: u32,
    /// Flows blocked to it.
    pub count: usize,
}

/// What a job's end says about its blocks: every blocked flow is in `flows`; `calls` lists
/// the destinations (flows folded past the report's row limit are counted, not listed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    pub flows: usize,
    pub calls: Vec<BlockedCall>,
}

impl Blocked {
    /// The status a job ends with under `--fail-on-block`: its own if it failed, else
    /// [`BLOCKED_EXIT`] if anything was blocked.
    pub fn exit_status(&self, job_status: i32) -> i32 {
        if job_status != 0 || self.flows == 0 {
            job_status
        } else {
            BLOCKED_EXIT
        }
    }
}

/// Whether this process runs as a GitHub Actions step (the runner sets it for every step).
pub fn under_github_actions() -> bool {
    std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true")
}

/// A workflow command's message, escaped as the runner unescapes it (actions/toolkit
/// `escapeData`): a name from a DNS answer cannot end the line or forge a second command.
pub fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// A workflow command's property value (`escapeProperty`): also `:` and `,`, which end a
/// property.
pub fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// `::error title=…::…` lines naming each blocked call of `job`.
pub fn annotations(job: &str, b: &Blocked) -> Vec<String> {
    let mut out = Vec::new();
    for c in b.calls.iter().take(MAX_ANNOTATIONS) {
        // A query the policy refused names the name asked for; its address is the resolver's.
        let (title, to) = match (&c.domain, c.reason == "dns-query") {
            (Some(d), true) => (
                format!("ringfence blocked a DNS query for {d}"),
                format!("resolver {} port {} asking for {d}", c.dst, c.port),
            ),
            (Some(d), false) => (
                format!("ringfence blocked {d}:{}", c.port),
                format!("{d} ({}) port {}", c.dst, c.port),
            ),
            (None, _) => (
                format!("ringfence blocked {}:{}", c.dst, c.port),
                format!("{} port {}", c.dst, c.port),
            ),
        };
        let times = if c.count > 1 {
            format!(", {} times", c.count)
        } else {
            String::new()
        };
        let msg = format!(
            "job {job}: {} to {to} from process {} (pid {}) was blocked ({}{times})",
            c.proto, c.comm, c.pid, c.reason
        );
        out.push(format!(
            "::error title={}::{}",
            escape_property(&title),
            escape_data(&msg)
        ));
    }
    let listed: usize = b.calls.iter().take(MAX_ANNOTATIONS).map(|c| c.count).sum();
    if b.flows > listed {
        let more = b.flows - listed;
        out.push(format!(
            "::error title={}::{}",
            escape_property("ringfence blocked more calls"),
            escape_data(&format!(
                "job {job}: {more} more blocked flows (see the job's report)"
            ))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(domain: Option<&str>, count: usize) -> BlockedCall {
        BlockedCall {
            domain: domain.map(str::to_owned),
            dst: "198.51.100.66".into(),
            port: 443,
            proto: "tcp".into(),
            reason: "not-allowed".into(),
            comm: "curl".into(),
            pid: 42,
            count,
        }
    }

    #[test]
    fn exit_status_lets_a_failed_job_keep_its_own() {
        let none = Blocked::default();
        let some = Blocked {
            flows: 1,
            calls: vec![call(None, 1)],
        };
        assert_eq!(none.exit_status(0), 0);
        assert_eq!(some.exit_status(0), BLOCKED_EXIT);
        assert_eq!(some.exit_status(7), 7);
        assert_eq!(none.exit_status(7), 7);
    }

    #[test]
    fn escaping_follows_the_runner() {
        assert_eq!(escape_data("a%b\r\nc:d,e"), "a%25b%0D%0Ac:d,e");
        assert_eq!(escape_property("a%b\r\nc:d,e"), "a%25b%0D%0Ac%3Ad%2Ce");
    }

    #[test]
    fn annotations_name_each_call_and_cannot_be_forged() {
        let b = Blocked {
            flows: 3,
            calls: vec![
                call(Some("attacker.test"), 2),
                call(Some("x\n::warning::forged,t:1%"), 1),
            ],
        };
        let lines = annotations("build-1", &b);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            "::error title=ringfence blocked attacker.test%3A443::job build-1: tcp to \
             attacker.test (198.51.100.66) port 443 from process curl (pid 42) was blocked \
             (not-allowed, 2 times)"
        );
        for l in &lines {
            assert!(!l.contains('\n') && !l.contains('\r'), "{l}");
        }
        assert!(
            lines[1].starts_with(
                "::error title=ringfence blocked x%0A%3A%3Awarning%3A%3Aforged%2Ct%3A1%25%3A443::"
            ),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn calls_past_the_limit_are_counted() {
        let b = Blocked {
            flows: MAX_ANNOTATIONS + 5,
            calls: (0..MAX_ANNOTATIONS + 5).map(|_| call(None, 1)).collect(),
        };
        let lines = annotations("j", &b);
        assert_eq!(lines.len(), MAX_ANNOTATIONS + 1);
        assert!(lines.last().unwrap().contains("5 more blocked flows"));
    }
}
