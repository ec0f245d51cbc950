//! Tampering the dataplane cannot judge but ringfence can see: a job process taking hold
//! of a process outside the job (which then sends for it, from a cgroup no policy covers),
//! and ringfence's own programs going missing while the job runs. Both become findings.
use std::path::Path;
use std::time::SystemTime;

use crate::kernel::abi;
use crate::kernel::dataplane::AttachmentProblem;
use crate::trail::events::{FindingDetail, FindingEvent};
use crate::trail::exfil::Signal;

/// What `kind` did, in the words of its syscall.
fn action(ev: &abi::rf_guard_event) -> String {
    match abi::rf_guard_kind(ev.kind) {
        abi::rf_guard_kind::RF_GUARD_PTRACE => {
            let req = match ev.request {
                16 => "PTRACE_ATTACH".to_string(),
                0x4206 => "PTRACE_SEIZE".to_string(),
                r => format!("request {r}"),
            };
            format!("ptrace({req})")
        }
        abi::rf_guard_kind::RF_GUARD_VM_WRITEV => "process_vm_writev".to_string(),
        abi::rf_guard_kind::RF_GUARD_PIDFD_GETFD => format!("pidfd_getfd(fd {})", ev.arg),
        _ => format!("syscall kind {}", ev.kind),
    }
}

/// The pid a guard event is aimed at: its pid argument, or for pidfd_getfd the process the
/// caller's pidfd refers to (read from the caller's fdinfo while the call is in flight).
fn target_pid(ev: &abi::rf_guard_event) -> Option<u32> {
    if abi::rf_guard_kind(ev.kind) == abi::rf_guard_kind::RF_GUARD_PIDFD_GETFD {
        let info =
            std::fs::read_to_string(format!("/proc/{}/fdinfo/{}", ev.pid, ev.target)).ok()?;
        return info
            .lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|p| p.trim().parse::<i64>().ok())
            .and_then(|p| u32::try_from(p).ok());
    }
    // ptrace and process_vm_writev take a pid_t; 0 and negatives name no other process.
    (ev.target as i32 > 0).then_some(ev.target)
}

fn comm_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// A finding for a guard event when its target is outside the job whose cgroup is
/// `job_cgroup` (absolute directory); None when the target is the job's own (a debugger or
/// strace run inside the job). A target that cannot be resolved (it exited, or the pidfd was
/// closed already) is reported: the attempt was made on something ringfence cannot place.
pub fn guard_finding(
    ev: &abi::rf_guard_event,
    ts: SystemTime,
    job: &str,
    step: Option<&str>,
    job_cgroup: &Path,
) -> Option<FindingEvent> {
    let target = target_pid(ev);
    let job_rel = crate::job::cgroup::relative(job_cgroup);
    let where_ = target.and_then(crate::job::cgroup::cgroup_of);
    if let (Some(t), Some(j)) = (&where_, &job_rel) {
        if t.starts_with(j) {
            return None;
        }
    }
    let comm = abi::comm_to_string(&ev.comm);
    let target_comm = target.and_then(comm_of);
    let what = match (target, &where_) {
        (Some(t), Some(cg)) => format!(
            "{comm}[{}] called {} on pid {t} ({}), in cgroup {} outside the job",
            ev.pid,
            action(ev),
            target_comm.as_deref().unwrap_or("?"),
            cg.display()
        ),
        (Some(t), None) => format!(
            "{comm}[{}] called {} on pid {t}, which is gone: it could not be placed",
            ev.pid,
            action(ev)
        ),
        (None, _) => format!(
            "{comm}[{}] called {} on a process that could not be resolved",
            ev.pid,
            action(ev)
        ),
    };
    Some(FindingEvent {
        ts,
        job: job.to_string(),
        step: step.map(str::to_string),
        signal: Signal::PtraceOutsideJob,
        domain: String::new(),
        value: 0.0,
        threshold: 0.0,
        example: what,
        detail: FindingDetail {
            pid: Some(ev.pid),
            comm: Some(comm),
            target_pid: target,
            target_comm,
            interface: None,
        },
    })
}

/// The finding for a program that went missing (or that something now runs ahead of).
pub fn detached_finding(
    p: &AttachmentProblem,
    ts: SystemTime,
    job: &str,
    step: Option<&str>,
) -> FindingEvent {
    FindingEvent {
        ts,
        job: job.to_string(),
        step: step.map(str::to_string),
        signal: Signal::DataplaneDetached,
        domain: String::new(),
        value: 0.0,
        threshold: 0.0,
        example: format!("{} {}: {}", p.ifname, p.dir, p.what),
        detail: FindingDetail {
            interface: Some(p.ifname.clone()),
            ..Default::default()
        },
    }
}

/// Yama's ptrace_scope: None when Yama is absent. With it absent or 0, any process may
/// ptrace any other of the same user, so a job running as the runner's user can take hold
/// of the runner.
pub fn yama_ptrace_scope() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The warning to give when same-user ptrace is unrestricted, or None.
pub fn ptrace_warning() -> Option<String> {
    ptrace_warning_for(yama_ptrace_scope())
}

fn ptrace_warning_for(scope: Option<u32>) -> Option<String> {
    let why = match scope {
        None => "Yama is not enabled in this kernel",
        Some(0) => "Yama ptrace_scope is 0",
        Some(_) => return None,
    };
    Some(format!(
        "{why}: a job can ptrace any process of its own user, and one outside the job sends \
         unjudged; run jobs as a user other than the runner's, or set \
         kernel.yama.ptrace_scope to 1 or more (attempts are reported as ptrace-outside-job)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::events::Event;

    #[test]
    fn detached_finding_is_a_compact_line_that_reads_back() {
        let p = AttachmentProblem {
            ifname: "eth0".into(),
            dir: "egress",
            what: "ringfence's program (12) is no longer attached (tcx)".into(),
        };
        let ts = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let f = detached_finding(&p, ts, "build-42", None);
        let line = serde_json::to_string(&Event::Finding(f.clone())).unwrap();
        assert_eq!(
            line,
            r#"{"type":"finding","ts":"2027-01-15T08:00:00.000000Z","job":"build-42","step":null,"signal":"dataplane-detached","example":"eth0 egress: ringfence's program (12) is no longer attached (tcx)","interface":"eth0"}"#
        );
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back, Event::Finding(f));
    }

    #[test]
    fn a_report_lists_process_findings_apart_from_dns_ones() {
        let p = AttachmentProblem {
            ifname: "eth0".into(),
            dir: "ingress",
            what: "gone".into(),
        };
        let f = detached_finding(&p, SystemTime::UNIX_EPOCH, "j", None);
        let mut r = crate::trail::report::Report::new("j", "block");
        r.add(&Event::Finding(f.clone()));
        r.add(&Event::Finding(f));
        assert_eq!(r.findings().count(), 0);
        let text = r.render(crate::trail::report::Format::Text);
        assert!(
            text.contains("dataplane-detached: eth0 ingress: gone (2 times)"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&r.render(crate::trail::report::Format::Json)).unwrap();
        assert_eq!(json["alerts"][0]["signal"], "dataplane-detached");
        assert_eq!(json["alerts"][0]["count"], 2);
        assert!(r
            .render(crate::trail::report::Format::Markdown)
            .contains("- dataplane-detached: eth0 ingress: gone (2 times)"));
    }

    #[test]
    fn warnings_keep_a_json_report_json() {
        let mut r = crate::trail::report::Report::new("j", "block");
        r.warn(ptrace_warning_for(None).unwrap());
        let json: serde_json::Value =
            serde_json::from_str(&r.render(crate::trail::report::Format::Json)).unwrap();
        assert!(json["warnings"][0]
            .as_str()
            .unwrap()
            .starts_with("Yama is not enabled"));
        assert!(r
            .render(crate::trail::report::Format::Text)
            .contains("\nwarning: Yama is not enabled"));
        assert_eq!(ptrace_warning_for(Some(1)), None);
        assert!(ptrace_warning_for(Some(0)).is_some());
    }
}
