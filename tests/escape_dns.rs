//! Issue 8, ways out 1 and 2: a job (an unprivileged user, block mode) tries to get a query
//! for an unlisted name to a resolver past the in-kernel DNS filter — TCP messages cut and
//! glued every way, messages the parser cannot read, IP fragments, loopback stubs. Each test
//! proves on the receiving side that the name never arrived (a packet capture on the
//! server's interface and dnsmasq's query log) and that the attempt is in the events; the
//! audit-mode twin proves the same attempt does arrive there, and is reported.
//!
//! The red team's DNS escapes (issue 8 follow-up) are at the end: an answer forged through
//! the stream reset ringfence turns around, UDP_SEGMENT, urgent data, and a payload rewritten
//! in the job's own pages (vmsplice) after the verdict.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ringfence::testkit::testbed::link_v4;

/// The system's python3 (Debian package python3-minimal), not whatever a user's PATH finds
/// first: the job runs as nobody.
const PYTHON: &str = "/usr/bin/python3";

/// The job's side: python3 sockets doing what dig never would. Run as `nobody`.
const CLIENT_PY: &str = r#"
import ctypes, mmap, os, socket, struct, sys, time
case, server, bad, good = sys.argv[1:5]

def qname(n):
    return b''.join(bytes([len(l)]) + l.encode() for l in n.split('.')) + b'\0'

def q(name, qid=0x1234, qd=1, body=None, extra=b''):
    h = struct.pack('>HHHHHH', qid, 0x0100, qd, 0, 0, 0)
    if body is None:
        body = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\0'
        body += struct.pack('>HH', 1, 1)
    return h + body + extra

def framed(m):
    return struct.pack('>H', len(m)) + m

def tcp():
    s = socket.create_connection((server, 53), timeout=3)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def pause():
    time.sleep(0.3)

def finish(s):
    try:
        data = s.recv(65536)
        print('reply', len(data))
    except Exception as e:
        print('no reply', type(e).__name__)
    # Close with a RST: an orphaned socket would retransmit the dropped segment after the
    # job (and ringfence's programs) are gone, which this test does not measure.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    s.close()

def udp(m, frag=False):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if frag:
        # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: the kernel fragments instead of refusing.
        s.setsockopt(socket.IPPROTO_IP, 10, 0)
    s.settimeout(2)
    s.sendto(m, (server, 53))
    try:
        data, _ = s.recvfrom(65536)
        print('reply', len(data), 'rcode', data[3] & 15)
    except Exception as e:
        print('no reply', type(e).__name__)

if case == 'tcp-prefix-apart':
    s = tcp(); m = q(bad); s.send(struct.pack('>H', len(m))); pause(); s.send(m); finish(s)
elif case == 'tcp-pipelined':
    s = tcp(); s.send(framed(q(good, 1)) + framed(q(bad, 2))); finish(s)
elif case == 'tcp-across':
    s = tcp(); f = framed(q(bad)); s.send(f[:20]); pause(); s.send(f[20:]); finish(s)
elif case == 'tcp-off-boundary':
    s = tcp(); a = framed(q(good, 1)); b = framed(q(bad, 2))
    s.send(a + b[:9]); pause(); s.send(b[9:] + a); finish(s)
elif case == 'tcp-orphan':
    # Write and leave: the socket lives on as an orphan after the job, retransmitting.
    s = tcp(); s.send(framed(q(good, 1)) + framed(q(bad, 2))); s.close(); print('closed')
elif case == 'tcp-big':
    # 5,000 bytes of padding after the question: larger than the kernel parser's 4 KiB.
    s = tcp(); s.send(framed(q(bad, extra=b'\0' * 5000))); finish(s)
elif case == 'udp-big':
    udp(q(bad, extra=b'\0' * 4200))
elif case == 'udp-fragmented':
    # Larger than the link MTU (1500): IP fragments, the name in the first one.
    udp(q(bad, extra=b'\0' * 2000), frag=True)
elif case == 'udp-pointer':
    # The question name is one label and then a compression pointer to the rest of the
    # name, stored after the question (resolvers follow it: dnsmasq does).
    first, rest = bad.split('.', 1)
    tail = b''.join(bytes([len(l)]) + l.encode() for l in rest.split('.')) + b'\0'
    qname = bytes([len(first)]) + first.encode() + struct.pack('>H', 0xc000 | (12 + len(first) + 1 + 2 + 4))
    udp(q(None, body=qname + struct.pack('>HH', 1, 1) + tail))
elif case == 'udp-two-questions':
    body = b''
    for n in (bad, good):
        body += b''.join(bytes([len(l)]) + l.encode() for l in n.split('.')) + b'\0' + struct.pack('>HH', 1, 1)
    udp(q(None, qd=2, body=body))
elif case == 'tcp-keepopen':
    # Several allowed queries on one connection, one at a time, each answered.
    s = tcp()
    for i, n in enumerate(good.split(',')):
        s.send(framed(q(n, 100 + i)))
        hdr = s.recv(2)
        ln = struct.unpack('>H', hdr)[0]
        data = b''
        while len(data) < ln:
            data += s.recv(ln - len(data))
        print('answer', n, 'rcode', data[3] & 15, 'an', struct.unpack('>H', data[6:8])[0])
elif case == 'forge':
    # The job writes its own answer (txid T, the allowed name, A = `bad`) and sends it on its
    # stream to the resolver with one byte more: not exactly one message, so the stream is
    # reset by turning the segment around — which must never be read as an answer. Then it
    # connects to the address it wrote.
    T = 0x3131
    s = tcp()
    a = q(good, T)
    s.send(framed(a))
    ln = struct.unpack('>H', s.recv(2))[0]; d = b''
    while len(d) < ln: d += s.recv(ln - len(d))
    print('real answer rcode', d[3] & 15)
    ans = struct.pack('>HHHHHH', T, 0x8180, 1, 1, 0, 0) + qname(good) + struct.pack('>HH', 1, 1)
    ans += b'\xc0\x0c' + struct.pack('>HHIH', 1, 1, 300, 4) + socket.inet_aton(bad)
    try:
        s.send(framed(ans) + b'\x00'); time.sleep(0.5); s.recv(10)
    except Exception as ex:
        print('stream', type(ex).__name__)
    time.sleep(0.5)
    try:
        c = socket.create_connection((bad, 80), timeout=3)
        c.send(b'GET /forged HTTP/1.0\r\nHost: forged\r\n\r\n'); print('HTTP', c.recv(200))
    except Exception as ex:
        print('connect', ex)
elif case == 'udp-gso':
    # One UDP_SEGMENT send of two queries, the allowed one first: the device cuts it into
    # two datagrams after the verdict, the second a query of its own.
    a = q(good, 1); b = q(bad, 2)
    assert len(b) <= len(a), (len(a), len(b))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(17, 103, len(a))  # SOL_UDP, UDP_SEGMENT
    s.connect((server, 53)); s.settimeout(1)
    print('sent', s.send(a + b))
    for _ in range(2):
        try: print('reply', len(s.recv(65536)))
        except Exception as e: print('no reply', type(e).__name__)
elif case == 'tcp-urg':
    # An urgent byte is in the stream the kernel walks, but the resolver's read() skips it:
    # the kernel sees a length prefix 0x0100, the resolver the message behind it.
    e = q(bad, 0x7777)
    s = tcp()
    try:
        s.send(b'\x01', socket.MSG_OOB)
        time.sleep(0.2)
        s.send(b'\x00' + bytes([len(e)]) + e)
    except Exception as ex:
        print('stream', type(ex).__name__)
    finish(s)
elif case in ('vmsplice', 'vmsplice-tcp'):
    # The payload is the job's own page (vmsplice + splice), rewritten to `bad` right after
    # the send: what the resolver reads must be what the kernel judged.
    assert len(bad) == len(good)
    libc = ctypes.CDLL(None, use_errno=True)
    class iovec(ctypes.Structure):
        _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
    if case == 'vmsplice':
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((server, 53)); at = 13
    else:
        s = tcp(); at = 15
    label = bad.split('.')[0].encode()
    for i in range(10):
        m = mmap.mmap(-1, 4096)
        msg = q(good, 0x4000 + i)
        if case != 'vmsplice':
            msg = framed(msg)
        m[:len(msg)] = msg
        buf = ctypes.c_char.from_buffer(m)
        iov = iovec(ctypes.addressof(buf), len(msg))
        r, w = os.pipe()
        assert libc.vmsplice(w, ctypes.byref(iov), 1, 0) == len(msg), ctypes.get_errno()
        os.splice(r, s.fileno(), len(msg))
        m[at:at + len(label)] = label
        os.close(r); os.close(w)
        time.sleep(0.05)
        del buf
    print('sent', i + 1)
    if case != 'vmsplice':
        time.sleep(0.5); finish(s)
else:
    sys.exit('unknown case ' + case)
"#;

/// The client script, readable by nobody.
fn client_script(tb: &Testbed) -> String {
    let p = tb.workdir().join("client.py");
    std::fs::write(&p, CLIENT_PY).unwrap();
    std::fs::set_permissions(tb.workdir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p.display().to_string()
}

/// Runs one client-script case as nobody under ringfence in `mode`.
fn attempt(tb: &Testbed, mode: &str, extra: &[&str], case: &str, server: &str, bad: &str) -> Job {
    let script = client_script(tb);
    let mut opts = vec!["--mode", mode, "--allow", "ok.test:80"];
    opts.extend_from_slice(extra);
    let cmd = as_nobody(&[PYTHON, &script, case, server, bad, "ok.test"]);
    exec(tb, &opts, &as_strs(&cmd))
}

/// DNS flow events of the job with `reason`.
fn dns_findings<'a>(job: &'a Job, reason: &str) -> Vec<&'a serde_json::Value> {
    job.events
        .iter()
        .filter(|e| e["reason"] == reason && e["port"] == 53)
        .collect()
}

/// The escape in block mode: nothing arrives, the attempt is reported (blocked, `reason`,
/// naming `bad` when `named`). Then in audit mode: it arrives, and is reported (audited).
fn blocked_then_audited(case: &str, bad: &str, reason: &str, named: bool, dnsmasq_logs: bool) {
    let tb = testbed(&[DnsRecord::a("ok.test", link_v4(20))], &[]);
    let dns = tb.dns_addr_v4().to_string();
    let marker = bad.split('.').next().unwrap();

    if case == "udp-big" {
        for (ns_cmd, dev) in [(true, tb.server_if()), (false, tb.client_if())] {
            let args = ["link", "set", "dev", dev, "mtu", "9000"];
            let mut c = if ns_cmd {
                tb.server_cmd("ip", args)
            } else {
                tb.client_cmd("ip", args)
            };
            assert!(c.status().expect("ip link set mtu").success());
        }
    }
    let cap = Capture::start(&tb, marker);
    let job = attempt(&tb, "block", &[], case, &dns, bad);
    assert_eq!(
        job.code(),
        Some(0),
        "{case}: the script failed\n{}",
        job.dump()
    );
    assert_eq!(
        cap.hits(),
        0,
        "{case}: the name crossed the wire\n{}",
        job.dump()
    );
    assert_eq!(
        tb.dns_queries_for(bad),
        0,
        "{case}: the resolver saw the name"
    );
    let found = dns_findings(&job, reason);
    assert!(
        !found.is_empty() && found.iter().all(|e| e["verdict"] == "blocked"),
        "{case}: no blocked {reason} event\n{}",
        job.dump()
    );
    assert!(
        job.stderr.contains(reason),
        "{case}: the report does not list {reason}\n{}",
        job.dump()
    );
    if named {
        assert!(
            found.iter().any(|e| e["domain"] == bad),
            "{case}: the event does not name {bad}\n{}",
            job.dump()
        );
    }
    drop(cap);

    // Audit mode lets it through (which also proves the capture and the log see it) and
    // reports it.
    let cap = Capture::start(&tb, marker);
    let job = attempt(&tb, "audit", &[], case, &dns, bad);
    assert_eq!(job.code(), Some(0), "{case}: audit\n{}", job.dump());
    assert!(
        cap.hits() > 0,
        "{case}: audit: the capture saw nothing\n{}",
        job.dump()
    );
    if dnsmasq_logs {
        assert!(
            tb.dns_queries_for(bad) > 0,
            "{case}: audit: the resolver never logged {bad}:\n{}",
            tb.dns_log()
        );
    }
    let found = dns_findings(&job, reason);
    assert!(
        !found.is_empty() && found.iter().all(|e| e["verdict"] == "audited"),
        "{case}: audit: no audited {reason} event\n{}",
        job.dump()
    );
}

#[test]
fn tcp_length_prefix_and_body_in_separate_segments() {
    blocked_then_audited(
        "tcp-prefix-apart",
        "prefixapart.leak.test",
        "dns-query",
        true,
        true,
    );
}

#[test]
fn tcp_query_pipelined_behind_an_allowed_one() {
    blocked_then_audited(
        "tcp-pipelined",
        "pipelined.leak.test",
        "dns-query",
        true,
        true,
    );
}

#[test]
fn a_dropped_tcp_query_is_not_retransmitted_after_the_job() {
    // The kernel keeps retransmitting an orphaned socket's unacknowledged segment for minutes,
    // long after the job ended and ringfence's programs were detached. The dropped segment
    // is turned into a RST for the client, so the socket is gone at once.
    let tb = testbed(&[DnsRecord::a("ok.test", link_v4(19))], &[]);
    let bad = "orphaned.leak.test";
    let cap = Capture::start(&tb, "orphaned");
    let job = attempt(&tb, "block", &[], "tcp-orphan", "198.51.100.53", bad);
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    // Retransmits come after 200 ms, 400 ms, 800 ms...
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cap.hits(),
        0,
        "the name crossed the wire after the job
{}",
        job.dump()
    );
    assert_eq!(tb.dns_queries_for(bad), 0, "the resolver saw the name");
    let ss = tb
        .client_cmd("ss", ["-tn", "dst", "198.51.100.53"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ss.stdout).contains(":53"),
        "a socket to the resolver is still alive:\n{}",
        String::from_utf8_lossy(&ss.stdout)
    );
}

#[test]
fn tcp_message_across_two_segments() {
    blocked_then_audited(
        "tcp-across",
        "acrosssegments.leak.test",
        "dns-query",
        true,
        true,
    );
}

#[test]
fn tcp_segment_not_starting_on_a_boundary() {
    blocked_then_audited(
        "tcp-off-boundary",
        "offboundary.leak.test",
        "dns-query",
        true,
        true,
    );
}

#[test]
fn tcp_query_larger_than_the_parser() {
    blocked_then_audited("tcp-big", "bigtcp.leak.test", "dns-unjudged", true, true);
}

#[test]
fn udp_query_larger_than_the_parser() {
    // A 4,250-byte datagram, unfragmented: jumbo frames on the link. dnsmasq drops a query
    // that large unlogged; the capture is the proof.
    blocked_then_audited("udp-big", "bigudp.leak.test", "dns-unjudged", true, false);
}

#[test]
fn udp_question_name_ending_in_a_compression_pointer() {
    blocked_then_audited(
        "udp-pointer",
        "pointer.leak.test",
        "dns-unjudged",
        false,
        true,
    );
}

#[test]
fn udp_query_with_two_questions() {
    // dnsmasq answers a two-question query without logging it: the capture is the proof.
    blocked_then_audited(
        "udp-two-questions",
        "twoquestions.leak.test",
        "dns-unjudged",
        true,
        false,
    );
}

#[test]
fn udp_query_in_ip_fragments() {
    // The later fragments have no ports: they are judged by address (the resolver is not an
    // allowed endpoint), so even in audit mode the datagram is never whole at the server —
    // its first fragment, with the name, is what the capture sees.
    blocked_then_audited(
        "udp-fragmented",
        "fragmented.leak.test",
        "dns-unjudged",
        true,
        false,
    );
}

/// A stub resolver in the job's namespace, as systemd-resolved is on a runner: dnsmasq
/// listening on 127.0.0.53 and 127.0.0.54, forwarding to the testbed's resolver. Killed on
/// drop.
struct Stub(Child);

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_stub(tb: &Testbed) -> Stub {
    let mut child = tb
        .client_cmd(
            "dnsmasq",
            [
                "--conf-file=/dev/null",
                "--keep-in-foreground",
                "--pid-file",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                "--listen-address=127.0.0.53",
                "--listen-address=127.0.0.54",
                "--port=53",
                "--cache-size=100",
                "--server=198.51.100.53",
                "--user=root",
                "--group=root",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the stub");
    for addr in ["127.0.0.53", "127.0.0.54"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = tb
                .client_cmd(
                    "dig",
                    [&format!("@{addr}"), "+tries=1", "+time=1", "ok.test"],
                )
                .output()
                .map(|o| {
                    o.status.success() && String::from_utf8_lossy(&o.stdout).contains("NOERROR")
                })
                .unwrap_or(false);
            if ok {
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                let mut e = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut e);
                panic!("the stub exited: {e}");
            }
            assert!(
                Instant::now() < deadline,
                "the stub on {addr} did not answer"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Stub(child)
}

#[test]
fn query_to_another_loopback_stub_address_is_a_dns_resolver_block() {
    let tb = testbed(&[DnsRecord::a("ok.test", link_v4(21))], &[]);
    let _stub = start_stub(&tb);
    let bad = "otherstub.leak.test";
    // The job's resolver is the testbed's; the stub also answers on 127.0.0.53/54.
    for (addr, proto) in [("127.0.0.54", "+notcp"), ("127.0.0.53", "+tcp")] {
        let cap = Capture::start(&tb, "otherstub");
        let cmd = as_nobody(&[
            "dig",
            &format!("@{addr}"),
            proto,
            "+tries=1",
            "+time=2",
            bad,
        ]);
        let job = exec(
            &tb,
            &[
                "--mode",
                "block",
                "--allow",
                "ok.test:80",
                "--dns-resolver",
                "198.51.100.53",
            ],
            &as_strs(&cmd),
        );
        assert_eq!(
            cap.hits(),
            0,
            "{addr}: the name crossed the wire\n{}",
            job.dump()
        );
        assert_eq!(
            tb.dns_queries_for(bad),
            0,
            "{addr}: the stub sent it upstream"
        );
        let found = dns_findings(&job, "dns-resolver");
        assert!(
            found
                .iter()
                .any(|e| e["verdict"] == "blocked" && e["dst"] == addr),
            "{addr}: no blocked dns-resolver event\n{}",
            job.dump()
        );
    }
    // Audit mode (and direct-ip audit, which DNS to other servers falls under): it goes
    // through the stub upstream, and is reported.
    let cmd = as_nobody(&["dig", "@127.0.0.54", "+tries=1", "+time=2", bad]);
    let job = exec(
        &tb,
        &[
            "--mode",
            "audit",
            "--direct-ip",
            "audit",
            "--allow",
            "ok.test:80",
            "--dns-resolver",
            "198.51.100.53",
        ],
        &as_strs(&cmd),
    );
    assert!(
        tb.dns_queries_for(bad) > 0,
        "audit: the stub never forwarded it"
    );
    assert!(
        dns_findings(&job, "dns-resolver")
            .iter()
            .any(|e| e["verdict"] == "audited" && e["dst"] == "127.0.0.54"),
        "audit: no audited dns-resolver event\n{}",
        job.dump()
    );
}

#[test]
fn tcp_tricks_through_a_configured_loopback_stub() {
    let tb = testbed(&[DnsRecord::a("ok.test", link_v4(22))], &[]);
    let _stub = start_stub(&tb);
    for (case, bad) in [
        ("tcp-prefix-apart", "stubprefix.leak.test"),
        ("tcp-pipelined", "stubpipelined.leak.test"),
        ("tcp-big", "stubbigtcp.leak.test"),
    ] {
        let marker = bad.split('.').next().unwrap();
        let cap = Capture::start(&tb, marker);
        let job = attempt(
            &tb,
            "block",
            &["--dns-resolver", "127.0.0.53"],
            case,
            "127.0.0.53",
            bad,
        );
        assert_eq!(job.code(), Some(0), "{case}\n{}", job.dump());
        assert_eq!(
            cap.hits(),
            0,
            "{case}: the stub sent it upstream\n{}",
            job.dump()
        );
        assert_eq!(
            tb.dns_queries_for(bad),
            0,
            "{case}: the resolver saw the name"
        );
        let reason = if case == "tcp-big" {
            "dns-unjudged"
        } else {
            "dns-query"
        };
        assert!(
            dns_findings(&job, reason)
                .iter()
                .any(|e| e["verdict"] == "blocked" && e["dst"] == "127.0.0.53"),
            "{case}: no blocked {reason} event\n{}",
            job.dump()
        );
    }
    // The same through the stub in audit mode reaches the upstream resolver.
    let bad = "stubaudit.leak.test";
    let job = attempt(
        &tb,
        "audit",
        &["--dns-resolver", "127.0.0.53"],
        "tcp-pipelined",
        "127.0.0.53",
        bad,
    );
    assert!(
        tb.dns_queries_for(bad) > 0,
        "audit: never forwarded\n{}",
        job.dump()
    );
    assert!(
        dns_findings(&job, "dns-query")
            .iter()
            .any(|e| e["verdict"] == "audited" && e["domain"] == bad),
        "audit: not reported\n{}",
        job.dump()
    );
}

#[test]
fn a_caching_stub_on_loopback_keeps_working() {
    let ip = link_v4(23);
    let tb = testbed(&[DnsRecord::a("ok.test", ip)], &[sa(ip, 80)]);
    let _stub = start_stub(&tb);
    let script = "set -e; a=$(dig +short +tries=1 +time=3 @127.0.0.53 ok.test | tail -n 1); \
                  curl -sS --connect-timeout 3 --max-time 5 http://$a/; \
                  dig +tcp +short +tries=1 +time=3 @127.0.0.53 ok.test";
    let cmd = as_nobody(&["sh", "-c", script]);
    let job = exec(
        &tb,
        &[
            "--mode",
            "block",
            "--allow",
            "ok.test:80",
            "--dns-resolver",
            "127.0.0.53",
        ],
        &as_strs(&cmd),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    assert_eq!(
        job.stdout,
        format!("hello from {ip}:80\n{ip}\n"),
        "{}",
        job.dump()
    );
    job.expect_flow(ip.into(), 80, "allowed", "allowed");
    assert_eq!(tb.http_hits(sa(ip, 80)), 1);
    assert!(
        !job.events.iter().any(|e| e["reason"] == "dns-unjudged"),
        "{}",
        job.dump()
    );
}

#[test]
fn several_tcp_queries_on_one_connection_are_answered_and_bound() {
    let (a, b, c) = (link_v4(24), link_v4(25), link_v4(26));
    let tb = testbed(
        &[
            DnsRecord::a("a.ok.test", a),
            DnsRecord::a("b.ok.test", b),
            DnsRecord::a("c.ok.test", c),
        ],
        &[sa(a, 80), sa(b, 80), sa(c, 80)],
    );
    // dig with one connection for three names, then python with three queries one after the
    // other on one connection; every answered address is then reachable (it was bound).
    let script = client_script(&tb);
    let sh = format!(
        "set -e; dig +tcp +keepopen +tries=1 +time=3 +short a.ok.test b.ok.test c.ok.test; \
         {PYTHON} {script} tcp-keepopen 198.51.100.53 x a.ok.test,b.ok.test,c.ok.test; \
         for h in {a} {b} {c}; do curl -sS --connect-timeout 3 --max-time 5 http://$h/; done"
    );
    let cmd = as_nobody(&["sh", "-c", &sh]);
    let job = exec(
        &tb,
        &["--mode", "block", "--allow", "*.ok.test:80"],
        &as_strs(&cmd),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    for ip in [a, b, c] {
        assert!(job.stdout.contains(&format!("{ip}\n")), "{}", job.dump());
        assert!(
            job.stdout.contains(&format!("hello from {ip}:80")),
            "{}",
            job.dump()
        );
        job.expect_flow(ip.into(), 80, "allowed", "allowed");
    }
    for n in ["a.ok.test", "b.ok.test", "c.ok.test"] {
        assert!(
            job.stdout.contains(&format!("answer {n} rcode 0 an 1")),
            "{n}\n{}",
            job.dump()
        );
    }
    assert!(
        !job.events.iter().any(|e| e["reason"] == "dns-unjudged"),
        "{}",
        job.dump()
    );
}

/// The red team's setup (issue 8 follow-up): `allowed.test:80` allowed, the job as nobody in
/// block mode runs `case` against `server`; `bad` must neither reach the resolver's log nor
/// cross the wire (the capture counts frames holding its first label).
fn redteam_case(case: &str, server: &str, bad: &str, extra: &[&str]) -> (Testbed, Job) {
    let tb = testbed(&[DnsRecord::a("allowed.test", link_v4(20))], &[]);
    let marker = bad.split('.').next().unwrap();
    let cap = Capture::start(&tb, marker);
    let script = client_script(&tb);
    let cmd = as_nobody(&[PYTHON, &script, case, server, bad, "allowed.test"]);
    let mut opts = vec!["--mode", "block", "--allow", "allowed.test:80"];
    opts.extend_from_slice(extra);
    let job = exec(&tb, &opts, &as_strs(&cmd));
    assert_eq!(
        cap.hits(),
        0,
        "{case}: {bad} crossed the wire\n{}",
        job.dump()
    );
    assert_eq!(
        tb.dns_queries_for(bad),
        0,
        "{case}: the resolver logged {bad}\n{}\n{}",
        tb.dns_log(),
        job.dump()
    );
    drop(cap);
    (tb, job)
}

/// The job forges an answer for its own outstanding query and has the kernel reset the
/// stream: the reset turned around to the client must never be read as an answer. Proof on
/// the far side: the HTTP server on the address the job wrote counts no request.
fn forged_answer(server: &str, extra: &[&str], stub: bool) {
    let evil = ringfence::testkit::testbed::routed_v4(21);
    // ok.test: what start_stub asks to know the stub is up.
    let tb = testbed(
        &[
            DnsRecord::a("allowed.test", link_v4(20)),
            DnsRecord::a("ok.test", link_v4(21)),
        ],
        &[sa(evil, 80)],
    );
    let _stub = stub.then(|| start_stub(&tb));
    let script = client_script(&tb);
    let ev = evil.to_string();
    let cmd = as_nobody(&[PYTHON, &script, "forge", server, &ev, "allowed.test"]);
    let mut opts = vec!["--mode", "block", "--allow", "allowed.test:80"];
    opts.extend_from_slice(extra);
    let job = exec(&tb, &opts, &as_strs(&cmd));
    assert!(
        job.stdout.contains("real answer rcode 0"),
        "the allowed query was not answered\n{}",
        job.dump()
    );
    assert_eq!(
        tb.http_hits(sa(evil, 80)),
        0,
        "the job reached {evil}:80 through an answer it forged\n{}",
        job.dump()
    );
    job.expect_flow(evil.into(), 80, "blocked", "direct-ip");
    assert!(
        dns_findings(&job, "dns-unjudged")
            .iter()
            .any(|e| e["verdict"] == "blocked"),
        "the forged message is not reported\n{}",
        job.dump()
    );
}

#[test]
fn forged_answer_via_tcp_reset_turnaround() {
    forged_answer("198.51.100.53", &[], false);
}

#[test]
fn forged_answer_via_loopback_stub() {
    forged_answer("127.0.0.54", &["--dns-resolver", "127.0.0.54"], true);
}

/// UDP_SEGMENT: one send, cut into datagrams by the device after the verdict. It cannot be
/// judged as one message: dropped and reported.
#[test]
fn udp_gso_query_is_unjudged() {
    let (_tb, job) = redteam_case("udp-gso", "198.51.100.53", "gsoleak.test", &[]);
    assert!(
        dns_findings(&job, "dns-unjudged")
            .iter()
            .any(|e| e["verdict"] == "blocked"),
        "no blocked dns-unjudged event\n{}",
        job.dump()
    );
}

/// MSG_OOB: the kernel's walk and the resolver's read() frame the stream differently.
#[test]
fn tcp_urgent_byte_kills_the_stream() {
    let (_tb, job) = redteam_case("tcp-urg", "198.51.100.53", "urgleak.test", &[]);
    assert!(
        dns_findings(&job, "dns-unjudged")
            .iter()
            .any(|e| e["verdict"] == "blocked"),
        "no blocked dns-unjudged event\n{}",
        job.dump()
    );
}

/// vmsplice + splice: the packet's pages are the job's, rewritten after the verdict. The
/// resolver must read what was judged: the allowed name, never the rewritten one.
fn vmsplice_rewrite(case: &str) {
    let (tb, job) = redteam_case(case, "198.51.100.53", "vmsplce.test", &[]);
    assert!(job.stdout.contains("sent 10"), "{case}\n{}", job.dump());
    assert!(
        tb.dns_queries_for("allowed.test") > 0,
        "{case}: the resolver saw no query at all\n{}",
        job.dump()
    );
    assert!(
        !job.events.iter().any(|e| e["reason"] == "dns-unjudged"),
        "{case}: a legitimate query was not judged\n{}",
        job.dump()
    );
}

#[test]
fn vmsplice_udp_rewrite_after_the_verdict() {
    vmsplice_rewrite("vmsplice");
}

#[test]
fn vmsplice_tcp_rewrite_after_the_verdict() {
    vmsplice_rewrite("vmsplice-tcp");
}
