//! Shared helpers for the integration tests: run `ringfence exec` inside a testbed's client
//! namespace and read back its events. Everything network-shaped comes from
//! `ringfence::testkit::testbed`, the same code the demo uses.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub mod daemon;
pub mod vethjob;

#[allow(unused_imports)] // not every test binary names the module itself
pub use ringfence::testkit::testbed;
pub use ringfence::testkit::testbed::{DnsOptions, DnsRecord, Testbed};
use serde_json::Value;

/// The binary under test.
pub const RINGFENCE: &str = env!("CARGO_BIN_EXE_ringfence");

/// No single job in these tests should come near this; it only turns a hang into a failure.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// These tests need root and a real kernel; CI runs as root, so not being root is a failure
/// with a clear message, never a silent skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "integration tests create network namespaces and load BPF: run them as root"
    );
}

/// A testbed with DNS serving `records` (TTL 60 s) and HTTP on every `http` address.
pub fn testbed(records: &[DnsRecord], http: &[SocketAddr]) -> Testbed {
    require_root();
    let tb = Testbed::new().expect("creating testbed");
    tb.start_dns(records, &DnsOptions::default())
        .expect("starting dnsmasq");
    if !http.is_empty() {
        tb.start_http(http).expect("starting HTTP responders");
    }
    tb
}

pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// What one `ringfence exec` run produced.
#[derive(Debug)]
pub struct Job {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Every line of the --events file, parsed.
    pub events: Vec<Value>,
}

impl Job {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Flow events (those without a `type`, or `type == "flow"`).
    pub fn flows(&self) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| matches!(e.get("type").and_then(Value::as_str), None | Some("flow")))
            .collect()
    }

    /// Flow events to `dst:port`.
    pub fn flows_to(&self, dst: IpAddr, port: u16) -> Vec<&Value> {
        self.flows()
            .into_iter()
            .filter(|e| {
                e["dst"]
                    .as_str()
                    .and_then(|d| d.parse::<IpAddr>().ok())
                    .is_some_and(|d| d == dst)
                    && e["port"].as_u64() == Some(port.into())
            })
            .collect()
    }

    /// DNS answer events for `name`.
    pub fn dns_events(&self, name: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| {
                e["type"] == "dns"
                    && e["name"].as_str().map(|n| n.trim_end_matches('.')) == Some(name)
            })
            .collect()
    }

    /// Asserts exactly-one-kind-of-outcome for `dst:port` and returns that event: at least one
    /// flow event exists and every one of them carries `verdict` and `reason`.
    pub fn expect_flow(&self, dst: IpAddr, port: u16, verdict: &str, reason: &str) -> &Value {
        let flows = self.flows_to(dst, port);
        assert!(
            !flows.is_empty(),
            "no flow event for {dst}:{port}\n{}",
            self.dump()
        );
        for f in &flows {
            assert_eq!(
                (f["verdict"].as_str(), f["reason"].as_str()),
                (Some(verdict), Some(reason)),
                "flow to {dst}:{port}: {f}\n{}",
                self.dump()
            );
        }
        flows[0]
    }

    /// Everything a failing assertion should show.
    pub fn dump(&self) -> String {
        let events: Vec<String> = self.events.iter().map(Value::to_string).collect();
        format!(
            "--- status: {:?}\n--- stdout:\n{}\n--- stderr:\n{}\n--- events:\n{}",
            self.status,
            self.stdout,
            self.stderr,
            events.join("\n")
        )
    }
}

/// Runs `ringfence exec --events FILE <opts…> -- <cmd…>` inside the client namespace.
pub fn exec(tb: &Testbed, opts: &[&str], cmd: &[&str]) -> Job {
    let events = tb.workdir().join(format!("events-{}.jsonl", next_seq()));
    let mut args: Vec<String> = vec![
        "exec".into(),
        "--events".into(),
        events.display().to_string(),
    ];
    args.extend(opts.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.extend(cmd.iter().map(|s| s.to_string()));
    let (status, stdout, stderr) = run_timeout(tb.client_cmd(RINGFENCE, &args), JOB_TIMEOUT);
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    let events = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("events line is not JSON ({e}): {l}\nstderr:\n{stderr}"))
        })
        .collect();
    Job {
        status,
        stdout,
        stderr,
        events,
    }
}

fn next_seq() -> usize {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Runs `cmd` with captured output; after `timeout` kills its whole process group and panics.
pub fn run_timeout(mut cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout can kill ringfence and the job it started.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for child") {
            break st;
        }
        if Instant::now() > deadline {
            let pgid = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "{shown} did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        out_t.join().unwrap_or_default(),
        err_t.join().unwrap_or_default(),
    )
}

/// `curl` fetching `url` with bounded waits; prints the body on success.
pub fn curl(extra: &[&str], url: &str) -> Vec<String> {
    let mut v: Vec<String> = ["curl", "-sS", "--connect-timeout", "3", "--max-time", "5"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push(url.into());
    v
}

/// `argv` (program first) as a command in the client namespace, without ringfence.
pub fn client(tb: &Testbed, argv: &[String]) -> Command {
    tb.client_cmd(&argv[0], &argv[1..])
}

pub fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A file in the testbed's scratch directory.
pub fn scratch(tb: &Testbed, name: &str, contents: &str) -> PathBuf {
    let p = tb.workdir().join(name);
    std::fs::write(&p, contents).expect("writing scratch file");
    p
}

/// `bpftool -j net show` inside the client namespace: every BPF program attached to any of
/// its interfaces (tc, tcx, xdp, flow dissector, netfilter). Empty means nothing is attached.
pub fn attached_programs(tb: &Testbed) -> Vec<Value> {
    let out = tb
        .client_cmd("bpftool", ["-j", "net", "show"])
        .output()
        .expect("running bpftool (Debian package bpftool)");
    assert!(
        out.status.success(),
        "bpftool net show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    let mut progs = Vec::new();
    for section in v.as_array().into_iter().flatten() {
        for (_, list) in section.as_object().into_iter().flatten() {
            progs.extend(list.as_array().into_iter().flatten().cloned());
        }
    }
    // Classic tc filters attached through netlink show up here too, but check them directly
    // as well: a clsact qdisc left behind is a leak even without a filter.
    for dev in ["lo", tb.client_if()] {
        let q = tb
            .client_cmd("tc", ["qdisc", "show", "dev", dev])
            .output()
            .expect("running tc");
        let text = String::from_utf8_lossy(&q.stdout);
        if text.contains("clsact") {
            progs.push(Value::String(format!("clsact qdisc on {dev}: {text}")));
        }
    }
    progs
}

/// A capture on the server's end of the testbed's link (AF_PACKET, python3): counts the frames
/// that contain `marker`. What reaches the link is what any host on it can read: the receiving
/// side's own view of what arrived, not ringfence's. Killed on drop.
pub struct Capture {
    child: std::process::Child,
    out: PathBuf,
}

const CAPTURE_PY: &str = r#"
import socket, sys
ifname, marker, out = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
hits = 0
open(out, 'w').write('ready 0\n')
while True:
    f = s.recv(65536)
    if marker in f:
        hits += 1
        open(out, 'w').write('ready %d\n' % hits)
"#;

impl Capture {
    /// Starts counting frames that contain the bytes `marker`; returns once it listens.
    pub fn start(tb: &Testbed, marker: impl AsRef<[u8]>) -> Capture {
        let code = scratch(tb, "capture.py", CAPTURE_PY);
        let hex: String = marker.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let out = tb.workdir().join(format!("capture-{hex}.txt"));
        let _ = std::fs::remove_file(&out);
        let child = tb
            .server_cmd(
                "/usr/bin/python3",
                [
                    code.display().to_string(),
                    tb.server_if().to_string(),
                    hex,
                    out.display().to_string(),
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the capture (python3)");
        let c = Capture { child, out };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&c.out).is_ok_and(|s| s.starts_with("ready")) {
            assert!(Instant::now() < deadline, "the capture did not start");
            thread::sleep(Duration::from_millis(20));
        }
        c
    }

    /// Frames seen so far that carried the marker (after a moment for late ones, such as
    /// retransmits, to cross).
    pub fn hits(&self) -> usize {
        thread::sleep(Duration::from_millis(500));
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `argv` run as `nobody`, as a CI job's untrusted step would be: the attacker has no
/// privileges (no capabilities, no root).
pub fn as_nobody(argv: &[&str]) -> Vec<String> {
    [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ]
    .iter()
    .chain(argv)
    .map(|s| s.to_string())
    .collect()
}

/// `ringfence exec --job JOB --events EVENTS OPTS… -- sh SCRIPT`, as arguments.
pub fn exec_sh_args(
    job: &str,
    events: &std::path::Path,
    opts: &[&str],
    script: &std::path::Path,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "exec".into(),
        "--job".into(),
        job.into(),
        "--events".into(),
        events.display().to_string(),
    ];
    args.extend(opts.iter().map(|s| s.to_string()));
    args.extend(["--".into(), "sh".into(), script.display().to_string()]);
    args
}

/// The JSON Lines of an events file (none if it is missing).
pub fn read_events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an events line is JSON"))
        .collect()
}

/// This thread inside network namespace `ns` (by its name under /run/netns) until dropped:
/// the dataplane attaches to interfaces (and detaches from them) in the namespace of the
/// thread that asks.
pub struct InNetns(std::fs::File);

impl InNetns {
    pub fn enter(ns: &str) -> InNetns {
        let back = std::fs::File::open("/proc/thread-self/ns/net").expect("this thread's netns");
        let there = std::fs::File::open(std::path::Path::new("/run/netns").join(ns))
            .expect("the namespace");
        nix::sched::setns(&there, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        InNetns(back)
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        nix::sched::setns(&self.0, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("back to the test's own netns");
    }
}
