//! Ways out of `ringfence exec` that are not packets: descriptors opened outside the job,
//! the death of ringfence, processes of the same user outside the job, and programs
//! detached under a running job. Each job runs as `nobody` in a testbed namespace; what
//! must not arrive is checked on the receiving side (the testbed's UDP counter).
//! Needs root; never skipped.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use testbed::link_v4;

/// Runs the rest of a command line as `nobody`: the job is unprivileged, as on CI.
const NOBODY: [&str; 5] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--",
];

/// The interpreter by absolute path: a PATH lookup may find a shim `nobody` cannot run.
const PYTHON: &str = "/usr/bin/python3";

fn as_nobody<'a>(cmd: &[&'a str]) -> Vec<&'a str> {
    let mut v = NOBODY.to_vec();
    v.extend_from_slice(cmd);
    v
}

/// A directory in the testbed that `nobody` can write to, with `files` in it.
fn shared_dir(tb: &Testbed, files: &[(&str, &str)]) -> PathBuf {
    let d = tb.workdir().join(format!("shared-{}", std::process::id()));
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(tb.workdir(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    for (name, text) in files {
        let p = d.join(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    }
    d
}

fn read_events(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        // The last line may be half-written while ringfence runs.
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn findings<'a>(events: &'a [Value], signal: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == "finding" && e["signal"] == signal)
        .collect()
}

/// `ringfence exec` started in the client namespace and left running.
struct Running {
    child: Child,
    events: PathBuf,
    stderr: PathBuf,
}

impl Running {
    fn start(tb: &Testbed, opts: &[&str], cmd: &[&str]) -> Running {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let events = tb.workdir().join(format!("bg-events-{n}.jsonl"));
        let stderr = tb.workdir().join(format!("bg-stderr-{n}.txt"));
        let mut args: Vec<String> = vec!["exec".into(), "--events".into()];
        args.push(events.display().to_string());
        args.extend(opts.iter().map(|s| s.to_string()));
        args.push("--".into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        // `ip netns exec` execs the command: the child's pid is ringfence's.
        let child = tb
            .client_cmd(RINGFENCE, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting ringfence");
        Running {
            child,
            events,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ringfence did not finish\n{}", self.stderr());
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

/// TCX programs attached to the client's interface, with their link ids: bpftool 7.1's
/// `net show` does not list TCX, so this asks the kernel directly.
fn tcx_links(tb: &Testbed) -> Vec<(u32, u32)> {
    use ringfence::kernel::dataplane::tcx_links_of;
    let ifname = tb.client_if().to_string();
    testbed::in_netns(tb.client_ns(), move || {
        let idx = nix::net::if_::if_nametoindex(ifname.as_str()).expect("client interface");
        let mut all = tcx_links_of(idx as i32, true);
        all.extend(tcx_links_of(idx as i32, false));
        all
    })
    .expect("entering the client namespace")
}

/// Does `--attach MODE` take the TCX path on this kernel?
fn uses_tcx(mode: &str) -> bool {
    mode == "tcx" || (mode == "auto" && ringfence::kernel::dataplane::KernelInfo::probe().tcx)
}

fn nothing_attached(tb: &Testbed) -> bool {
    attached_programs(tb).is_empty() && tcx_links(tb).is_empty()
}

/// The guard process `ringfence exec` (pid `rf`) started.
fn guard_of(rf: u32) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(e.path().join("stat")).ok()?;
        let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (comm == "ringfence-guard" && ppid == rf).then_some(pid)
    })
}

fn is_dead(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie has finished; only its parent's wait is missing.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

const UDP_ECHO_PORT: u16 = 9999;

/// (a) A socket the parent opened (bash's /dev/udp, connected to the server) is not the
/// job's: without --keep-fd the job cannot even write to it; with it, it can.
#[test]
fn inherited_socket_is_not_passed_unless_kept() {
    let dst = link_v4(20);
    let tb = testbed(&[], &[]);
    tb.start_udp_echo(&[sa(dst, UDP_ECHO_PORT)]).unwrap();
    let run = |keep: bool| -> (std::process::ExitStatus, String, String) {
        let events = tb.workdir().join(format!("fd-{keep}.jsonl"));
        let script = format!("exec 7<>/dev/udp/{dst}/{UDP_ECHO_PORT} && exec \"$@\"",);
        let mut args: Vec<String> = vec!["-c".into(), script, "bash".into(), RINGFENCE.into()];
        args.extend(
            ["exec", "--mode", "block", "--events"]
                .iter()
                .map(|s| s.to_string()),
        );
        args.push(events.display().to_string());
        if keep {
            args.extend(["--keep-fd".to_string(), "7".to_string()]);
        }
        args.push("--".into());
        args.extend(
            as_nobody(&["sh", "-c", "echo leak >&7 && echo written"])
                .iter()
                .map(|s| s.to_string()),
        );
        run_timeout(tb.client_cmd("bash", &args), JOB_TIMEOUT)
    };

    let (st, out, err) = run(false);
    assert_ne!(st.code(), Some(0), "the job wrote to fd 7\n{out}\n{err}");
    assert!(
        err.contains("Bad file descriptor"),
        "the job's write did not fail with EBADF\n{err}"
    );
    assert_eq!(out, "", "{err}");
    sleep(Duration::from_millis(300));
    assert_eq!(
        tb.udp_hits(sa(dst, UDP_ECHO_PORT)),
        0,
        "a datagram arrived through a descriptor the job should not have had"
    );

    // Passed deliberately, it works — and the datagram is not the job's (block mode, the
    // destination unlisted): that is what --help and the README warn about.
    let (st, out, err) = run(true);
    assert_eq!(st.code(), Some(0), "{out}\n{err}");
    assert_eq!(out, "written\n", "{err}");
    assert!(
        err.contains("inherits an internet socket"),
        "no warning that a socket from outside is passed\n{err}"
    );
    wait_for("the kept socket's datagram", Duration::from_secs(3), || {
        tb.udp_hits(sa(dst, UDP_ECHO_PORT)) == 1
    });

    // A descriptor ringfence does not have is an input error (exit 2), not a silent no-op.
    let (st, _, err) = run_timeout(
        tb.client_cmd(RINGFENCE, ["exec", "--keep-fd", "57", "--", "true"]),
        JOB_TIMEOUT,
    );
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("--keep-fd 57"), "{err}");
}

/// Sends a datagram to `dst:port` every 50 ms from a fresh socket, from itself and from a
/// daemonized orphan (double fork + setsid), and writes both pids to a file.
const SENDER: &str = r#"
import os, socket, sys, time
dst, port, pidfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def loop():
    with open(pidfile, "a") as f:
        f.write("%d\n" % os.getpid())
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"leak", (dst, port))
        except OSError:
            pass
        s.close()
        time.sleep(0.05)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        loop()
    os._exit(0)
loop()
"#;

/// (b) kill -9 of ringfence in block mode: the job (nobody: setpriv cleared its
/// parent-death signal; plus an orphan that never had one) keeps sending to an unlisted
/// address; nothing arrives, the guard kills it all within ~2 s, removes the cgroup, and
/// nothing stays attached.
fn killed_ringfence_leaves_nothing_running(attach: &str) {
    let dst = link_v4(21);
    let tb = testbed(&[], &[]);
    tb.start_udp_echo(&[sa(dst, UDP_ECHO_PORT)]).unwrap();
    let dir = shared_dir(&tb, &[("sender.py", SENDER)]);
    let pidfile = dir.join("pids");

    // Control: from the client namespace, without ringfence, the datagrams arrive.
    let (st, _, err) = run_timeout(
        tb.client_cmd(
            PYTHON,
            [
                "-c",
                &format!(
                    "import socket; socket.socket(2, 2).sendto(b'x', ('{dst}', {UDP_ECHO_PORT}))"
                ),
            ],
        ),
        JOB_TIMEOUT,
    );
    assert!(st.success(), "{err}");
    wait_for("the control datagram", Duration::from_secs(3), || {
        tb.udp_hits(sa(dst, UDP_ECHO_PORT)) == 1
    });
    let before = tb.udp_hits(sa(dst, UDP_ECHO_PORT));

    let dst_s = dst.to_string();
    let port_s = UDP_ECHO_PORT.to_string();
    let pidfile_s = pidfile.display().to_string();
    let script = dir.join("sender.py").display().to_string();
    let mut rf = Running::start(
        &tb,
        &[
            "--mode",
            "block",
            "--allow",
            "198.51.100.30:443",
            "--attach",
            attach,
        ],
        &as_nobody(&[PYTHON, &script, &dst_s, &port_s, &pidfile_s]),
    );
    let pids = || -> Vec<u32> {
        fs::read_to_string(&pidfile)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    wait_for("both senders", Duration::from_secs(90), || {
        pids().len() == 2
    });
    let pids = pids();
    let rel = fs::read_to_string(format!("/proc/{}/cgroup", pids[0])).unwrap();
    let rel = rel
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .trim()
        .to_string();
    assert!(
        rel.contains("/ringfence/"),
        "the job is not in its cgroup: {rel}"
    );
    let cgroup = ringfence::job::cgroup::find_cgroup2()
        .unwrap()
        .join(rel.trim_start_matches('/'));
    assert!(cgroup.is_dir(), "{}", cgroup.display());
    // The senders really send: their blocked flows are in the events.
    wait_for(
        "blocked flows to the unlisted address",
        Duration::from_secs(5),
        || {
            read_events(&rf.events)
                .iter()
                .any(|e| e["dst"] == dst.to_string() && e["verdict"] == "blocked")
        },
    );
    if uses_tcx(attach) {
        assert!(!tcx_links(&tb).is_empty(), "no TCX program attached");
    } else {
        assert!(
            !attached_programs(&tb).is_empty(),
            "no clsact filter attached"
        );
    }

    // Hold the guard still for a second after ringfence dies: the job keeps sending all
    // that time, and enforcement must stay (the guard holds the links; clsact filters stay
    // on their own). Without that, the kill's few milliseconds would hide a gap.
    let guard = guard_of(rf.child.id()).expect("no guard process");
    let signal = |pid: u32, sig| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap()
    };
    signal(guard, nix::sys::signal::Signal::SIGSTOP);
    signal(rf.child.id(), nix::sys::signal::Signal::SIGKILL);
    rf.wait(Duration::from_secs(5));
    sleep(Duration::from_secs(1));
    assert!(
        pids.iter().all(|&p| !is_dead(p)),
        "the job died with ringfence: this test needs it alive until the guard acts"
    );
    let killed = Instant::now();
    signal(guard, nix::sys::signal::Signal::SIGCONT);
    while !pids.iter().all(|&p| is_dead(p)) {
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "job processes {pids:?} still alive 2 s after the guard went on\n{}",
            rf.stderr()
        );
        sleep(Duration::from_millis(10));
    }
    wait_for("the job's cgroup to go", Duration::from_secs(3), || {
        !cgroup.exists()
    });
    wait_for(
        "every program to be detached",
        Duration::from_secs(3),
        || nothing_attached(&tb),
    );
    // Long enough for any datagram sent in the window to have arrived.
    sleep(Duration::from_millis(500));
    assert_eq!(
        tb.udp_hits(sa(dst, UDP_ECHO_PORT)),
        before,
        "a datagram reached the unlisted address after ringfence was killed\n{}",
        rf.stderr()
    );
    assert!(
        rf.stderr().contains("ringfence guard:"),
        "the guard did not say what it did\n{}",
        rf.stderr()
    );
}

/// TCX where the kernel has it (6.6+), else clsact.
#[test]
fn killed_ringfence_leaves_nothing_running_auto() {
    killed_ringfence_leaves_nothing_running("auto");
}

#[test]
fn killed_ringfence_leaves_nothing_running_clsact() {
    killed_ringfence_leaves_nothing_running("clsact");
}

/// Does this process have CAP_SYS_RESOURCE (needed to lower an OOM score)?
fn can_lower_oom_score() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    // CAP_SYS_RESOURCE is capability 24 (linux/capability.h).
    eff & (1 << 24) != 0
}

/// (c) ringfence lowers its OOM score (the guard's is -1000) and the job starts at 0, not
/// at ringfence's. ringfence is started at 500 so that a job inheriting it would show.
#[test]
fn oom_scores() {
    let tb = testbed(&[], &[]);
    let job = r#"cat /proc/self/oom_score_adj /proc/$PPID/oom_score_adj
for d in /proc/[0-9]*; do
  if [ "$(cat $d/comm 2>/dev/null)" = ringfence-guard ] && [ "$(cut -d' ' -f4 $d/stat)" = "$PPID" ]; then
    cat $d/oom_score_adj
  fi
done"#;
    let (st, out, err) = run_timeout(
        tb.client_cmd(
            "sh",
            [
                "-c",
                "echo 500 > /proc/self/oom_score_adj && exec \"$@\"",
                "sh",
                RINGFENCE,
                "exec",
                "--mode",
                "block",
                "--",
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "sh",
                "-c",
                job,
            ],
        ),
        JOB_TIMEOUT,
    );
    assert!(st.success(), "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "job, ringfence, guard: {out}\n{err}");
    assert_eq!(lines[0], "0", "the job did not start at 0\n{err}");
    if can_lower_oom_score() {
        assert_eq!(lines[1], "-900", "ringfence's\n{err}");
        assert_eq!(lines[2], "-1000", "the guard's\n{err}");
    } else {
        // Without CAP_SYS_RESOURCE (some sandboxes drop it even for root) the score cannot
        // be lowered: ringfence must say so rather than pretend.
        assert_eq!(lines[1], "500", "{err}");
        assert!(
            err.contains("lowering ringfence's OOM score"),
            "no warning about the OOM score\n{err}"
        );
    }
}

const SEIZE: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_SEIZE = 0x4206
if sys.argv[1] == "child":
    pid = os.fork()
    if pid == 0:
        time.sleep(3)
        os._exit(0)
else:
    pid = int(sys.argv[1])
r = libc.ptrace(PTRACE_SEIZE, pid, None, None)
print("seize", pid, r, ctypes.get_errno())
"#;

/// (d) A job (nobody) that seizes a process of the same user outside its cgroup gets a
/// ptrace-outside-job finding, in the events and the report; one that traces its own child
/// does not, and neither does an ordinary job.
#[test]
fn ptrace_outside_the_job_is_a_finding() {
    let dst = link_v4(22);
    let tb = testbed(&[], &[]);
    tb.start_udp_echo(&[sa(dst, UDP_ECHO_PORT)]).unwrap();
    let dir = shared_dir(&tb, &[("seize.py", SEIZE)]);
    let script = dir.join("seize.py").display().to_string();
    // The "runner": a process of the job's user, outside the job.
    let mut outside = tb
        .client_cmd("setpriv", as_nobody(&["sleep", "60"])[1..].to_vec())
        .spawn()
        .unwrap();
    let target = outside.id().to_string();
    wait_for(
        "the outside process to be nobody's sleep",
        Duration::from_secs(5),
        || fs::read_to_string(format!("/proc/{target}/comm")).is_ok_and(|c| c.trim() == "sleep"),
    );

    let job = exec(
        &tb,
        &["--mode", "block"],
        &as_nobody(&[PYTHON, &script, &target]),
    );
    let _ = outside.kill();
    let _ = outside.wait();
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    // On this kernel the seize works (no Yama): the threat is real, not hypothetical.
    assert!(
        job.stdout.starts_with(&format!("seize {target} 0 ")),
        "{}",
        job.dump()
    );
    let f = findings(&job.events, "ptrace-outside-job");
    assert_eq!(f.len(), 1, "{}", job.dump());
    assert_eq!(
        f[0]["target_pid"].as_u64(),
        target.parse::<u64>().ok(),
        "{}",
        job.dump()
    );
    assert_eq!(f[0]["target_comm"], "sleep", "{}", job.dump());
    assert_eq!(f[0]["comm"], "python3", "{}", job.dump());
    assert!(
        job.stderr.contains("ptrace-outside-job: python3["),
        "the report does not show the finding\n{}",
        job.stderr
    );

    // Tracing its own child is the job's business.
    let job = exec(
        &tb,
        &["--mode", "block"],
        &as_nobody(&[PYTHON, &script, "child"]),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    assert!(
        job.stdout.contains(" 0 0"),
        "the seize failed\n{}",
        job.dump()
    );
    assert!(
        findings(&job.events, "ptrace-outside-job").is_empty(),
        "{}",
        job.dump()
    );
    assert!(
        !job.stderr.contains("ptrace-outside-job: "),
        "{}",
        job.stderr
    );

    // And an ordinary job has no finding at all.
    let send =
        // The send is blocked (direct IP): the cgroup hook refuses it with EPERM, which is
        // not what this part is about.
        format!("import socket\ntry: socket.socket(2, 2).sendto(b'x', ('{dst}', {UDP_ECHO_PORT}))\nexcept OSError: pass");
    let job = exec(
        &tb,
        &["--mode", "audit"],
        &as_nobody(&[PYTHON, "-c", &send]),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    assert!(
        !job.events.iter().any(|e| e["type"] == "finding"),
        "{}",
        job.dump()
    );
}

/// (e) Detaching ringfence's egress program as root while the job runs is reported.
fn detached_program_is_a_finding(attach: &str) {
    let tb = testbed(&[], &[]);
    // The job runs until the test says so (at most a minute), however slow the machine.
    let dir = shared_dir(&tb, &[]);
    let flag = dir.join("done");
    let wait = format!(
        "for i in $(seq 600); do [ -e {} ] && exit 0; sleep 0.1; done; exit 1",
        flag.display()
    );
    let mut rf = Running::start(
        &tb,
        &["--mode", "block", "--attach", attach],
        &as_nobody(&["sh", "-c", &wait]),
    );
    let ifname = tb.client_if().to_string();
    // An upper bound, not a pause: under emulation on a busy host the first `ringfence exec`
    // of a guest (its binary read over 9p, every program verified) took more than 20 s.
    let attached = Duration::from_secs(90);
    if uses_tcx(attach) {
        wait_for("the TCX links", attached, || tcx_links(&tb).len() >= 2);
        // The egress link is listed first (see tcx_links_of).
        let (_, link) = tcx_links(&tb)[0];
        let (st, _, err) = run_timeout(
            tb.client_cmd("bpftool", ["link", "detach", "id", &link.to_string()]),
            JOB_TIMEOUT,
        );
        assert!(st.success(), "bpftool link detach: {err}");
    } else {
        // Not just any sign of ringfence (the clsact qdisc comes before its filters): the
        // job has started, so every filter is in place, and the egress one is listed.
        wait_for("the clsact filters", attached, || {
            let started = read_events(&rf.events).iter().any(|e| e["type"] == "job");
            let out = tb
                .client_cmd("tc", ["filter", "show", "dev", &ifname, "egress"])
                .output()
                .expect("running tc");
            started && String::from_utf8_lossy(&out.stdout).contains("rf_egress")
        });
        let (st, _, err) = run_timeout(
            tb.client_cmd("tc", ["filter", "del", "dev", &ifname, "egress"]),
            JOB_TIMEOUT,
        );
        assert!(st.success(), "tc filter del: {err}");
    }
    // The check runs every second; the job's end runs it once more anyway.
    sleep(Duration::from_millis(1500));
    fs::write(&flag, "").unwrap();
    let st = rf.wait(JOB_TIMEOUT);
    assert_eq!(st.code(), Some(0), "{}", rf.stderr());
    let events = read_events(&rf.events);
    let f = findings(&events, "dataplane-detached");
    assert_eq!(f.len(), 1, "{events:?}\n{}", rf.stderr());
    assert_eq!(f[0]["interface"], ifname.as_str());
    assert!(
        f[0]["example"].as_str().unwrap().contains("egress"),
        "{}",
        f[0]
    );
    assert!(
        rf.stderr().contains("dataplane-detached"),
        "the report does not show it\n{}",
        rf.stderr()
    );
    wait_for(
        "every program to be detached",
        Duration::from_secs(3),
        || nothing_attached(&tb),
    );
}

#[test]
fn detached_program_is_a_finding_auto() {
    detached_program_is_a_finding("auto");
}

#[test]
fn detached_program_is_a_finding_clsact() {
    detached_program_is_a_finding("clsact");
}
