//! The established fast path (`sk_flows` in bpf/maps.h): a flow's verdict kept with the
//! socket that sent it must never carry anything else. Real sockets in a job, every result
//! counted at the receiving side (a capture on the server's interface), never from
//! ringfence's own report:
//! - one socket that sent to an allowed destination, then to one that is not (another
//!   address, another port, IPv6): the second never arrives;
//! - the daemon: a socket whose flow was kept under one job, or under the host default,
//!   is judged again when that changes (the agent's generation bump).
//!
//! Needs root; never skipped.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use testbed::{routed_v4, routed_v6};

const PY: &str = "/usr/bin/python3";

/// How long each change is given before the next phase's datagrams are sent.
const SETTLE: Duration = Duration::from_millis(500);

/// Sends from ONE socket per family: `n` datagrams to the allowed (address, port), then
/// alternately one marked datagram to each blocked destination and one more to the allowed
/// one, so every blocked datagram follows a kept flow of the same socket. Then the same with
/// a connected socket (sendto with another address on it). Failed sends (EPERM from the
/// backstop) are expected and ignored.
const SENDER: &str = r#"
import socket, sys, time
allowed_host, allowed_port, marker, ok = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4].encode()
blocked = [(h, int(p)) for h, p in (x.rsplit(":", 1) for x in sys.argv[5:])]
fam = socket.AF_INET6 if ":" in allowed_host else socket.AF_INET
def send(s, data, to):
    try:
        s.sendto(data, to)
    except OSError:
        pass
for connected in (False, True):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if connected:
        s.connect((allowed_host, allowed_port))
    for _ in range(50):
        send(s, ok, (allowed_host, allowed_port))
    for _ in range(20):
        for to in blocked:
            send(s, marker, to)
            send(s, ok, (allowed_host, allowed_port))
    s.close()
"#;

fn script(tb: &Testbed, name: &str, text: &str) -> String {
    std::fs::set_permissions(tb.workdir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = scratch(tb, name, text);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p.display().to_string()
}

/// exec, block mode: a socket's kept flow to an allowed address does not let the same
/// socket reach another address or another port of the same one, over IPv4 and IPv6.
#[test]
fn a_kept_flow_carries_nothing_else_of_its_socket() {
    let tb = testbed(&[], &[]);
    let code = script(&tb, "sender.py", SENDER);
    for (allowed, blocked_addr) in [
        (routed_v4(10).to_string(), routed_v4(11).to_string()),
        (routed_v6(10).to_string(), routed_v6(11).to_string()),
    ] {
        let bracket = |a: &str| {
            if a.contains(':') {
                format!("[{a}]")
            } else {
                a.to_string()
            }
        };
        let marker = format!("RF11-BLOCKED-{}", allowed.len());
        let ok = format!("RF11-ALLOWED-{}", allowed.len());
        let cap_blocked = Capture::start(&tb, &marker);
        let cap_ok = Capture::start(&tb, &ok);
        let allow = format!("{}:4000", bracket(&allowed));
        let to_other_addr = format!("{blocked_addr}:4000");
        let to_other_port = format!("{allowed}:4001");
        let argv = as_nobody(&[
            PY,
            &code,
            &allowed,
            "4000",
            &marker,
            &ok,
            &to_other_addr,
            &to_other_port,
        ]);
        let opts = ["--mode", "block", "--allow", allow.as_str()];
        let job = exec(&tb, &opts, &as_strs(&argv));
        assert_eq!(job.code(), Some(0), "{}", job.dump());
        assert!(
            cap_ok.hits() >= 100,
            "the allowed flow did not get through: {} frames\n{}",
            cap_ok.hits(),
            job.dump()
        );
        assert_eq!(
            cap_blocked.hits(),
            0,
            "a socket's kept flow carried a blocked destination\n{}",
            job.dump()
        );
        // Reported as blocked, too (the report is not the proof; the capture above is).
        assert!(
            !job.flows_to(blocked_addr.parse().unwrap(), 4000).is_empty(),
            "{}",
            job.dump()
        );
    }
}

/// A sender in cgroup `cg` of the daemon's namespace: one connected UDP socket, a datagram
/// to `to`:4000 every 20 ms whose payload is the content of `phase_file` (read before
/// every send), so each phase of the test has a marker of its own.
fn start_phased_sender(
    tb: &Testbed,
    cg: &Path,
    to: &str,
    phase_file: &Path,
) -> std::process::Child {
    let code = script(
        tb,
        "phased.py",
        r#"
import socket, sys, time
to, phase = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((to, 4000))
while True:
    try:
        s.send(open(phase, "rb").read())
    except OSError:
        pass
    time.sleep(0.02)
"#,
    );
    let argv = vec![
        PY.to_string(),
        code,
        to.to_string(),
        phase_file.display().to_string(),
    ];
    daemon::in_job(tb, cg, &argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the sender")
}

/// The daemon: the generation the agent bumps makes kept flows be judged again. A socket
/// the host default lets through is held to the job that then starts on its cgroup (which
/// does not allow it), and let through again once that job ends; a socket its job let
/// through is held to the host default (block everything) once the job ends. (`job end
/// --keep-processes`: the sender outlives its job.)
#[test]
fn the_daemon_judges_kept_flows_again_when_jobs_change() {
    let tb = testbed(&[], &[]);
    let dst = routed_v4(12).to_string();
    let phase = tb.workdir().join("phase");
    for host_allows in [true, false] {
        let host_policy = scratch(
            &tb,
            "host-policy.toml",
            &format!(
                "mode = \"block\"\nallowed-endpoints = \"{}\"\ndirect-ip = \"block\"\n",
                if host_allows {
                    format!("{dst}:4000")
                } else {
                    String::new()
                }
            ),
        );
        let mut d = daemon::Daemon::start(&tb, &["--host-policy", host_policy.to_str().unwrap()]);
        let cg = d.cgroup("rf11");
        std::thread::sleep(SETTLE);
        let marks =
            ["RF11-BEFORE", "RF11-DURING", "RF11-AFTER"].map(|m| format!("{m}-{host_allows}"));
        let settling = format!("RF11-SETTLING-{host_allows}");
        let caps: Vec<Capture> = marks.iter().map(|m| Capture::start(&tb, m)).collect();
        std::fs::write(&phase, &marks[0]).unwrap();
        let mut sender = start_phased_sender(&tb, &cg, &dst, &phase);
        std::thread::sleep(Duration::from_millis(800));
        // The job allows the destination exactly when the host default does not.
        let allow = format!("{dst}:4000");
        let policy: Vec<&str> = if host_allows {
            vec!["--mode", "block", "--allow", "198.51.100.99:1"]
        } else {
            vec!["--mode", "block", "--allow", allow.as_str()]
        };
        // Each change is settled first: what this test is about is kept flows being judged
        // again, not the first moments of a job (see the daemon suite for those). While it
        // settles the sender sends a marker no capture counts: a phase's marker still sent
        // after the change that ends its phase would be judged by the next phase's policy
        // and counted against the wrong one (which once read as a leak: the host default's
        // datagrams in the 500 ms after `job end` counted as passed "during the job").
        std::fs::write(&phase, &settling).unwrap();
        d.start_job("j", &cg, &policy);
        std::thread::sleep(SETTLE);
        std::fs::write(&phase, &marks[1]).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        std::fs::write(&phase, &settling).unwrap();
        d.ok(&["job", "end", "--id", "j", "--keep-processes"]);
        std::thread::sleep(SETTLE);
        std::fs::write(&phase, &marks[2]).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let _ = sender.kill();
        let _ = sender.wait();
        let hits: Vec<usize> = caps.iter().map(|c| c.hits()).collect();
        let log = format!("{}\n{:#?}", d.log(), d.events("j"));
        d.stop();
        if host_allows {
            assert!(
                hits[0] > 0,
                "host default: nothing passed before the job {hits:?}\n{log}"
            );
            assert_eq!(
                hits[1], 0,
                "a flow kept under the host default passed during the job {hits:?}\n{log}"
            );
            assert!(
                hits[2] > 0,
                "nothing passed after the job ended {hits:?}\n{log}"
            );
        } else {
            assert_eq!(
                hits[0], 0,
                "the host default let a datagram through {hits:?}\n{log}"
            );
            assert!(
                hits[1] > 0,
                "the job's allowed flow did not pass {hits:?}\n{log}"
            );
            assert_eq!(
                hits[2], 0,
                "a flow kept under the ended job still passed {hits:?}\n{log}"
            );
        }
    }
}
