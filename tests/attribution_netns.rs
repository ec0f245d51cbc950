//! Every flow names its process: pid, comm, executable and parent chain — on every kernel
//! ringfence loads on, including those whose TC programs cannot ask which task sent a
//! packet (6.1, 6.6: the cgroup socket hooks record each socket's owner instead).
//! A real job in a testbed: a shell runs curl and a python3 UDP sender, and prints their
//! pids itself; the events file must name the same pids, and the shell as their parent.
//! Needs root; never skipped.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::Value;
use testbed::{link_v4, routed_v6};

/// What the job printed about itself: `KEY value…` lines.
fn printed(out: &str) -> HashMap<String, Vec<String>> {
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?.to_string();
            Some((k, it.map(str::to_string).collect()))
        })
        .collect()
}

fn pid_of(p: &HashMap<String, Vec<String>>, key: &str, job: &Job) -> u64 {
    p.get(key)
        .and_then(|v| v.first())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("the job did not print {key}\n{}", job.dump()))
}

fn exe_of(p: &HashMap<String, Vec<String>>, key: &str, i: usize, job: &Job) -> String {
    p.get(key)
        .and_then(|v| v.get(i))
        .cloned()
        .unwrap_or_else(|| panic!("the job did not print {key}'s exe\n{}", job.dump()))
}

/// The flow names pid `pid` with comm `comm`, and (when its process was still there when the
/// agent read the event, which the job makes sure of) executable `exe` and the shell as its
/// parent, ringfence as its grandparent.
fn assert_named(f: &Value, pid: u64, comm: &str, exe: &str, shell: (u64, &str, u64), job: &Job) {
    let (sh, sh_exe, rf) = shell;
    assert_eq!(f["pid"].as_u64(), Some(pid), "pid of {f}\n{}", job.dump());
    assert_eq!(f["comm"], comm, "comm of {f}\n{}", job.dump());
    assert_eq!(f["exe"], exe, "exe of {f}\n{}", job.dump());
    let parents = f["parents"]
        .as_array()
        .unwrap_or_else(|| panic!("no parents in {f}\n{}", job.dump()));
    assert!(
        (2..=4).contains(&parents.len()),
        "parents of {f}\n{}",
        job.dump()
    );
    assert_eq!(parents[0]["pid"].as_u64(), Some(sh), "{f}\n{}", job.dump());
    assert_eq!(parents[0]["exe"], sh_exe, "{f}\n{}", job.dump());
    assert_eq!(parents[1]["pid"].as_u64(), Some(rf), "{f}\n{}", job.dump());
    let rf_exe = std::fs::canonicalize(RINGFENCE).unwrap();
    assert_eq!(
        parents[1]["exe"],
        rf_exe.to_str().unwrap(),
        "{f}\n{}",
        job.dump()
    );
}

/// A UDP sender: an unconnected datagram (sendmsg hook), a connected one (connect hook), an
/// IPv6 one, and one to a destination the policy does not list (refused with EPERM by the
/// backstop); then it stays alive a moment, so the agent finds it in /proc.
const SENDER: &str = r#"
import os, socket, sys, time
v4, v6, blocked = sys.argv[1], sys.argv[2], sys.argv[3]
print("PY", os.getpid(), os.path.realpath("/proc/self/exe"), flush=True)
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
a.sendto(b"rf-unconnected", (v4, 7))
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
b.connect((v4, 8))
b.send(b"rf-connected")
c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
c.sendto(b"rf-v6", (v6, 7))
try:
    a.sendto(b"rf-blocked", (blocked, 9))
    print("BLOCKED-SENT", flush=True)
except OSError as e:
    print("BLOCKED-REFUSED", e.errno, flush=True)
time.sleep(1)
"#;

#[test]
fn flows_name_process_and_parent_chain() {
    let web = link_v4(21);
    let echo = link_v4(22);
    let echo6 = routed_v6(22);
    let blocked = link_v4(23);
    let tb = testbed(&[DnsRecord::a("pkg.attrib.test", web)], &[sa(web, 80)]);
    tb.start_udp_echo(&[sa(echo, 7), sa(echo, 8), sa(echo6, 7)])
        .unwrap();
    let sender = scratch(&tb, "sender.py", SENDER);
    // curl first fetches an allowed name, then tries a destination the policy does not list
    // (the backstop drops its SYN): it stays alive for the connect timeout, so its process is
    // still there when the agent reads the first flow. `$!` is curl's own pid.
    let script = format!(
        r#"echo SHELL $$ "$(readlink /proc/$$/exe)"
echo RF $PPID
echo CURLEXE "$(readlink -f "$(command -v curl)")"
curl -sS --connect-timeout 2 --max-time 5 http://pkg.attrib.test/ http://{blocked}:81/ &
echo CURL $!
wait
/usr/bin/python3 {sender} {echo} {echo6} {blocked} &
wait
curl -sS --max-time 3 http://unlisted.attrib.test/ &
echo CURL2 $!
wait
exit 0
"#,
        sender = sender.display()
    );
    let allow = format!("pkg.attrib.test:80 {echo}:7 {echo}:8 [{echo6}]:7");
    let job = exec(
        &tb,
        &["--mode", "block", "--allow", &allow, "--job", "t-attrib"],
        &["bash", "-c", &script],
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    let p = printed(&job.stdout);
    let shell = pid_of(&p, "SHELL", &job);
    let shell_exe = exe_of(&p, "SHELL", 1, &job);
    let rf = pid_of(&p, "RF", &job);
    let curl = pid_of(&p, "CURL", &job);
    let curl_exe = exe_of(&p, "CURLEXE", 0, &job);
    let py = pid_of(&p, "PY", &job);
    let py_exe = exe_of(&p, "PY", 1, &job);
    let curl2 = pid_of(&p, "CURL2", &job);
    let sh = (shell, shell_exe.as_str(), rf);

    // The receiving side: what was allowed arrived, what was not did not.
    assert!(job.stdout.contains("hello from"), "{}", job.dump());
    assert_eq!(tb.http_hits(sa(web, 80)), 1);
    assert_eq!(tb.udp_hits(sa(echo, 7)), 1, "{}", job.dump());
    assert_eq!(tb.udp_hits(sa(echo, 8)), 1, "{}", job.dump());
    assert_eq!(tb.udp_hits(sa(echo6, 7)), 1, "{}", job.dump());
    assert!(p.contains_key("BLOCKED-REFUSED"), "{}", job.dump());
    assert_eq!(tb.dns_queries_for("unlisted.attrib.test"), 0);

    // TCP: the allowed flow (judged by TC) and the blocked one (judged by the backstop).
    let f = job.expect_flow(web.into(), 80, "allowed", "allowed");
    assert_named(f, curl, "curl", &curl_exe, sh, &job);
    let f = job.expect_flow(blocked.into(), 81, "blocked", "direct-ip");
    assert_named(f, curl, "curl", &curl_exe, sh, &job);

    // UDP: unconnected, connected, IPv6, blocked.
    for (dst, port, verdict, reason) in [
        (echo.into(), 7, "allowed", "allowed"),
        (echo.into(), 8, "allowed", "allowed"),
        (echo6.into(), 7, "allowed", "allowed"),
        (blocked.into(), 9, "blocked", "direct-ip"),
    ] {
        let f = job.expect_flow(dst, port, verdict, reason);
        assert_named(f, py, "python3", &py_exe, sh, &job);
    }

    // DNS: the query for a name the policy does not list (refused in the kernel) names the
    // curl that asked. This curl is gone at once, so only pid and comm are certain.
    let q = job
        .flows()
        .into_iter()
        .find(|e| e["reason"] == "dns-query" && e["domain"] == "unlisted.attrib.test")
        .unwrap_or_else(|| panic!("no dns-query flow\n{}", job.dump()));
    assert_eq!(q["pid"].as_u64(), Some(curl2), "{q}\n{}", job.dump());
    assert_eq!(q["comm"], "curl", "{q}\n{}", job.dump());

    // No flow of the job goes unnamed.
    for f in job.flows() {
        assert!(
            f["pid"].as_u64().unwrap_or(0) > 0,
            "a flow without its process: {f}\n{}",
            job.dump()
        );
    }

    // And `probe` says so on this kernel.
    let probe = std::process::Command::new(RINGFENCE)
        .arg("probe")
        .output()
        .unwrap();
    let probe: Value = serde_json::from_slice(&probe.stdout).unwrap();
    assert_eq!(probe["process_attribution"], true, "{probe}");
    assert_eq!(probe["sock_owner_hooks"], true, "{probe}");
}
