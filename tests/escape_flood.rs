//! Floods (issue 8, item 8): an unprivileged job sends one UDP datagram to each of more than
//! 100,000 distinct destinations. ringfence must stay bounded — the events file under its
//! limit, the agent's memory under a stated bound — while every flow is still counted: the
//! report's totals match the kernel's own counters and what the job sent, and the report and
//! the trail say in plain words what was not written. Needs root; never skipped.
//!
//! Destinations: ports 20000.. on the 21 on-link endpoints 198.51.100.10-30 (answered by ARP)
//! and on all of 203.0.113.0/24 (routed through the server). Nothing else.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use testbed::{link_v4, routed_v4};

/// Ports per address: 400 × (21 + 256) addresses = 110,800 destinations.
const PORTS: u32 = 400;
const FIRST_PORT: u16 = 20_000;
const DESTINATIONS: u64 = PORTS as u64 * (21 + 256);

/// The agent's peak resident memory (VmHWM) must stay under this, flood or not. Measured on
/// this flood: ~27 MiB with `--max-destinations 10` (the libbpf objects, the 8 MiB ring
/// buffer's pages as it reads them), ~28-30 MiB with 1,000 or 10,000 rows, and ~79 MiB with
/// every limit lifted (a row per destination, and growing with them).
const PEAK_RSS_KIB: u64 = 48 << 10;

/// The job: first one datagram to each on-link host, so that ARP has resolved them before the
/// flood (a datagram waiting for ARP could be dropped before any program sees it); then one
/// datagram per destination from a non-blocking socket, each exactly once. Prints what it
/// sent as JSON.
const FLOOD_PY: &str = r#"
import errno, json, socket, sys, time
first_port, ports = int(sys.argv[1]), int(sys.argv[2])
hosts = ["198.51.100.%d" % n for n in range(10, 31)] + ["203.0.113.%d" % n for n in range(256)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent, refused, errors = 0, 0, {}
def send(dst):
    global sent, refused
    while True:
        try:
            s.sendto(b"flood", dst)
            sent += 1
            return
        except BlockingIOError:
            time.sleep(0.0005)
        except PermissionError:
            # Refused at the job's cgroup egress (block mode): an attempt all the same.
            refused += 1
            return
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno))
            errors[name] = errors.get(name, 0) + 1
            return
# Port first_port - 1: the warm-up, distinct from every flood destination.
for h in hosts[:21]:
    send((h, first_port - 1))
time.sleep(0.5)
t0 = time.monotonic()
for p in range(first_port, first_port + ports):
    for h in hosts:
        send((h, p))
print(json.dumps({"sent": sent, "refused": refused, "errors": errors, "seconds": time.monotonic() - t0}))
"#;

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// Highest VmHWM seen while ringfence ran, KiB.
    peak_rss_kib: u64,
    elapsed: Duration,
    events_path: PathBuf,
    report: Value,
}

impl Run {
    fn shown(&self) -> String {
        format!(
            "status {:?}, peak {} KiB, {:?}\n--- stdout:\n{}\n--- stderr (last 3000 bytes):\n{}",
            self.status,
            self.peak_rss_kib,
            self.elapsed,
            self.stdout,
            tail(&self.stderr, 3000)
        )
    }

    /// What the job printed.
    fn sent(&self) -> Value {
        let line = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).unwrap_or_else(|e| panic!("job output ({e}):\n{}", self.shown()))
    }

    fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
            .collect()
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// VmHWM of `pid` in KiB, if it is ringfence (before `ip netns exec` has exec'd it, the pid
/// is still `ip`).
fn ringfence_hwm(pid: u32) -> Option<u64> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() != "ringfence" {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `ringfence exec` with the flood as an unprivileged job, sampling its peak RSS.
fn flood(tb: &Testbed, name: &str, opts: &[&str]) -> Run {
    let script = scratch(tb, &format!("{name}.py"), FLOOD_PY);
    std::fs::set_permissions(
        tb.workdir(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let events_path = tb.workdir().join(format!("{name}.jsonl"));
    let report_path = tb.workdir().join(format!("{name}-report.json"));
    let mut args: Vec<String> = [
        "exec",
        "--job",
        name,
        "--events",
        events_path.to_str().unwrap(),
        "--format",
        "json",
        "--report",
        report_path.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(opts.iter().map(|s| s.to_string()));
    args.extend(
        [
            "--",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            script.to_str().unwrap(),
            &FIRST_PORT.to_string(),
            &PORTS.to_string(),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut cmd: Command = tb.client_cmd(RINGFENCE, &args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawning ringfence");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut peak = 0;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if let Some(kib) = ringfence_hwm(child.id()) {
            peak = peak.max(kib);
        }
        if start.elapsed() > JOB_TIMEOUT {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-(child.id() as i32)),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            panic!("the flood job did not finish within {JOB_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    let report = std::fs::read_to_string(&report_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let run = Run {
        status,
        stdout,
        stderr,
        peak_rss_kib: peak,
        elapsed,
        events_path,
        report,
    };
    assert!(run.status.success(), "{}", run.shown());
    assert!(peak > 0, "VmHWM was never sampled\n{}", run.shown());
    run
}

/// Datagrams received by the server's end of the link (ARP and neighbour discovery count too).
fn server_rx_packets(tb: &Testbed) -> u64 {
    let path = format!("/sys/class/net/{}/statistics/rx_packets", tb.server_if());
    let out = tb.server_cmd("cat", [path]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// UDP responders on a few of the flood's destinations, one per address kind.
fn listeners() -> Vec<std::net::SocketAddr> {
    vec![
        sa(link_v4(10), FIRST_PORT),
        sa(link_v4(30), FIRST_PORT + PORTS as u16 - 1),
        sa(routed_v4(10), FIRST_PORT),
        sa(routed_v4(20), FIRST_PORT + 17),
    ]
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Checks what every flood run must show, whatever the verdict: returns (flow lines,
/// suppressed flows in lines, flows in the truncated line).
fn check_trail(run: &Run, max_bytes: u64, verdict: &str) -> (u64, u64, u64) {
    let shown = run.shown();
    let size = std::fs::metadata(&run.events_path).unwrap().len();
    assert!(
        size <= max_bytes,
        "events file {size} bytes > {max_bytes}\n{shown}"
    );
    // Far below the old pace of ~28 MB/s, whatever the limit.
    let pace = size as f64 / run.elapsed.as_secs_f64();
    assert!(pace < 2e6, "events file grew {pace:.0} bytes/s\n{shown}");
    let events = run.events();
    assert_eq!(events[0]["type"], "job", "{}", events[0]);
    let command = events[0]["command"].to_string();
    assert!(command.contains("python3"), "{command}");
    assert_eq!(events[1]["type"], "step", "{}", events[1]);
    let (mut flows, mut suppressed, mut truncated) = (0, 0, 0);
    let mut lines_with_suppressed = 0;
    for e in &events {
        match e["type"].as_str() {
            None => {
                flows += 1;
                assert_eq!(e["verdict"], verdict, "{e}");
                // Compact: the step is a short label; the command line is named only once.
                // (The process's executable and parent chain are per flow by design.)
                assert_eq!(e["step"], "setpriv", "{e}");
                let mut rest = e.clone();
                if let Some(o) = rest.as_object_mut() {
                    o.remove("exe");
                    o.remove("parents");
                }
                assert!(rest.to_string().len() < 300, "{e}");
            }
            Some("suppressed") => {
                suppressed += u(&e["flows"]);
                lines_with_suppressed += 1;
            }
            Some("truncated") => truncated += u(&e["flows"]),
            _ => {}
        }
    }
    assert!(flows > 0 && lines_with_suppressed > 0, "{shown}");
    (flows, suppressed, truncated)
}

#[test]
fn flood_in_block_mode_is_bounded_and_counted() {
    require_root();
    let tb = testbed(&[], &[]);
    tb.start_udp_echo(&listeners()).unwrap();
    let rx_before = server_rx_packets(&tb);
    let max_bytes: u64 = 1 << 20;
    let run = flood(
        &tb,
        "flood-block",
        &[
            "--mode",
            "block",
            "--allow",
            "github.test",
            "--events-max-bytes",
            "1M",
            "--max-destinations",
            "1000",
        ],
    );
    let shown = run.shown();
    let sent = run.sent();
    assert_eq!(sent["errors"], serde_json::json!({}), "{shown}");
    // Every datagram is an attempt; blocked at the job's cgroup egress, before the kernel
    // even resolves the neighbour, each send fails with EPERM.
    let refused = u(&sent["refused"]);
    let sent = u(&sent["sent"]) + refused;
    assert_eq!(sent, DESTINATIONS + 21, "{shown}");
    assert_eq!(refused, sent, "{shown}");

    // Nothing arrived: not one datagram on the listeners, and the server's link saw no more
    // than ARP/ND chatter.
    for a in listeners() {
        assert_eq!(tb.udp_hits(a), 0, "{a} received a datagram\n{shown}");
    }
    let rx = server_rx_packets(&tb) - rx_before;
    assert!(rx < 200, "the server received {rx} packets\n{shown}");

    // The trail: bounded, compact, and it ends by saying what it lost.
    let (flows, suppressed, truncated) = check_trail(&run, max_bytes, "blocked");
    let events = run.events();
    let last = events.last().unwrap();
    assert_eq!(last["type"], "truncated", "{last}");
    assert_eq!(last["max_bytes"], max_bytes);
    // Every flow is in the file as a line, in a suppressed line or in the truncated line.
    assert_eq!(flows + suppressed + truncated, sent, "{shown}");

    // The report: every blocked flow counted, as the kernel counted them and the job sent them.
    let r = &run.report;
    assert_eq!(u(&r["totals"]["blocked"]), sent, "{r:#}");
    assert_eq!(u(&r["kernel"]["blocked"]), sent, "{r:#}");
    assert_eq!(u(&r["kernel"]["ringbuf_dropped"]), 0, "{r:#}");
    let cuts = &r["cuts"];
    assert_eq!(u(&cuts["suppressed"]["flows"]), suppressed, "{r:#}");
    assert_eq!(u(&cuts["dropped"]["flows"]), truncated, "{r:#}");
    assert!(u(&cuts["suppressed"]["blocked"]) > 0, "{r:#}");
    assert!(u(&cuts["dropped"]["blocked"]) > 0, "{r:#}");
    // Memory: 1,000 rows, the rest folded into one counted row.
    assert_eq!(r["rows"].as_array().unwrap().len(), 1000, "{cuts:#}");
    assert_eq!(u(&cuts["folded_flows"]), sent - 1000, "{cuts:#}");
    assert_eq!(u(&r["folded"][0]["count"]), sent - 1000);
    let notes = cuts["notes"].to_string();
    for words in [
        "not written to the events file: over the rate limit of 500 events/s",
        "dropped: the events file reached its limit of 1 MiB",
        "flows to destinations beyond the first 1000 are folded",
    ] {
        assert!(notes.contains(words), "{words:?} not in {notes}");
    }
    assert!(
        run.peak_rss_kib < PEAK_RSS_KIB,
        "peak RSS {} KiB\n{shown}",
        run.peak_rss_kib
    );
    eprintln!(
        "block flood: {sent} datagrams in {:?}; events file {} bytes; {flows} flow lines, \
         {suppressed} suppressed, {truncated} dropped; ringfence peak RSS {} KiB",
        run.elapsed,
        std::fs::metadata(&run.events_path).unwrap().len(),
        run.peak_rss_kib
    );
}

/// Audit mode with `--direct-ip audit`: the datagrams pass (the listeners see them), every
/// one is reported as audited, and the default limits bound the trail and the memory.
#[test]
fn flood_in_audit_mode_is_bounded_and_counted() {
    require_root();
    let tb = testbed(&[], &[]);
    tb.start_udp_echo(&listeners()).unwrap();
    let run = flood(
        &tb,
        "flood-audit",
        &["--mode", "audit", "--direct-ip", "audit"],
    );
    let shown = run.shown();
    assert_eq!(u(&run.sent()["refused"]), 0, "{shown}");
    let sent = u(&run.sent()["sent"]);
    assert_eq!(sent, DESTINATIONS + 21, "{shown}");
    // Audit mode let them through: the proof that the flood really happened on the wire.
    for a in listeners() {
        assert_eq!(tb.udp_hits(a), 1, "{a}\n{shown}");
    }
    let (flows, suppressed, truncated) = check_trail(&run, 256 << 20, "audited");
    assert_eq!(truncated, 0);
    assert_eq!(flows + suppressed, sent, "{shown}");
    // The default rate limit (burst 5,000 + 500/s) kept the file small: that many flow
    // lines at most, each under 800 bytes (most of it the process's parent chain: four
    // ancestors with this test's long paths).
    let lines = 5_000 + 500 * (run.elapsed.as_secs() + 1);
    assert!(flows <= lines, "{flows} flow lines > {lines}\n{shown}");
    let size = std::fs::metadata(&run.events_path).unwrap().len();
    let bound = lines * 800;
    assert!(size < bound, "{size} bytes > {bound}\n{shown}");

    let r = &run.report;
    assert_eq!(u(&r["totals"]["audited"]), sent, "{r:#}");
    assert_eq!(u(&r["kernel"]["audited"]), sent, "{r:#}");
    assert_eq!(u(&r["totals"]["blocked"]), 0, "{r:#}");
    let cuts = &r["cuts"];
    assert_eq!(u(&cuts["suppressed"]["audited"]), suppressed, "{r:#}");
    // Default --max-destinations: 10,000 rows.
    assert_eq!(r["rows"].as_array().unwrap().len(), 10_000);
    assert_eq!(u(&cuts["folded_flows"]), sent - 10_000);
    assert!(
        cuts["notes"].to_string().contains("(burst 5000"),
        "{cuts:#}"
    );
    assert!(run.peak_rss_kib < PEAK_RSS_KIB, "{shown}");
    eprintln!(
        "audit flood: {sent} datagrams in {:?}; events file {size} bytes; {flows} flow lines, \
         {suppressed} suppressed; ringfence peak RSS {} KiB",
        run.elapsed, run.peak_rss_kib
    );
}
