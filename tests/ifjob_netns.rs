//! Interface jobs, end to end: a job that is a network namespace behind a veth pair (as a
//! container or a microVM's tap would be), routed through a host to a server namespace with
//! dnsmasq and HTTP. ringfence's dataplane is loaded in the host namespace, attached to the
//! host side of the job's veth and to the uplink, and the host side is registered as the
//! job's interface (`RF_JOB_HOST_SIDE`): the job's packets are judged as they come in there,
//! and the answers to its queries bind as they go out there.
//!
//! ```text
//!  job ns                     host ns (the testbed's client)            server ns
//!  203.0.113.130/30  ==veth==  203.0.113.129/30 | 198.51.100.1  ==veth==  dnsmasq 198.51.100.53
//!  2001:db8:3::2/64            2001:db8:3::1/64 | 2001:db8:1::1            HTTP 198.51.100.10..
//!                             (forwarding on)                              2001:db8:2::10
//! ```
//!
//! Every outcome is checked on the receiving side: the HTTP server's accept count, dnsmasq's
//! query log, a listener's own output; ringfence's events only say what it reported.

mod common;

use std::cell::RefCell;
use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

/// Every command in these tests is bounded; this only turns a hang into a failure.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

use common::vethjob::{ip_cmd, VethJob};
use common::*;
use ringfence::kernel::abi;
use ringfence::kernel::dataplane::{Dataplane, Options};
use ringfence::policy::{Mode, Policy};
use ringfence::testkit::testbed::{link_v4, routed_v6, DNS_V4, DNS_V6};
use ringfence::testkit::testrun::wire;

/// The job's policy slot.
const JOB: u32 = 9;

enum Ev {
    Flow(abi::rf_flow_event),
    /// The event and the DNS message copied after it.
    Dns(abi::rf_dns_event, Vec<u8>),
}

/// Fields drop in order: the dataplane detaches inside the host namespace, then the thread
/// leaves it, then the namespaces go.
struct Rig {
    dp: Dataplane,
    _in_host: InNetns,
    link: VethJob,
    tb: Testbed,
}

const OK_V4: u8 = 10; // ok.test
const PORT_V4: u8 = 11; // port.test: allowed on 443 only
const DIRECT_V4: u8 = 12; // no name
const BAD_V4: u8 = 13; // bad.test, bad-tcp.test: names not allowed
const V6_HOST: u8 = 10; // v6.test: 2001:db8:2::10

fn rig(mode: Mode) -> Rig {
    let http = [
        sa(link_v4(OK_V4), 80),
        sa(link_v4(PORT_V4), 80),
        sa(link_v4(DIRECT_V4), 80),
        sa(link_v4(BAD_V4), 80),
        sa(routed_v6(V6_HOST), 80),
    ];
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", link_v4(OK_V4)),
            DnsRecord::a("port.test", link_v4(PORT_V4)),
            DnsRecord::a("bad.test", link_v4(BAD_V4)),
            DnsRecord::a("bad-tcp.test", link_v4(BAD_V4)),
            DnsRecord::aaaa("v6.test", routed_v6(V6_HOST)),
        ],
        &http,
    );
    let link = VethJob::new(&tb, 0);
    let in_host = InNetns::enter(tb.client_ns());
    let mut dp = Dataplane::load(&Options::default()).expect("load the dataplane (root?)");
    dp.attach(&link.host_if).expect("attach to the job's link");
    dp.attach(tb.client_if()).expect("attach to the uplink");
    let policy = Policy {
        mode,
        direct_ip: mode,
        dns_resolvers: vec![DNS_V4.into(), DNS_V6.into()],
        endpoints: Policy::parse_endpoints("ok.test:80 port.test:443 v6.test:80", "test")
            .expect("test policy"),
        dns_filter: true,
        ..Policy::default()
    };
    dp.install_policy(
        JOB,
        &policy.compile().expect("compile"),
        &policy.dns_resolvers,
    )
    .expect("install the policy");
    let ifindex = nix::net::if_::if_nametoindex(link.host_if.as_str()).expect("host_if index");
    dp.add_interface_job(ifindex, abi::rf_job::for_policy(JOB, &policy).host_side())
        .expect("register the interface job");
    Rig {
        dp,
        _in_host: in_host,
        link,
        tb,
    }
}

impl Rig {
    fn curl(&self, extra: &[&str], url: &str) -> (bool, String, String) {
        let argv = curl(extra, url);
        self.link.run(&as_strs(&argv))
    }

    fn dig(&self, extra: &[&str], name: &str) -> String {
        let mut argv = vec!["dig", "+tries=1", "+time=3"];
        argv.extend(extra);
        argv.push(name);
        let (_, out, err) = self.link.run(&argv);
        format!("{out}{err}")
    }

    /// Everything the dataplane reported since the last call.
    fn events(&self) -> Vec<Ev> {
        let out = RefCell::new(Vec::new());
        let map = self.dp.events_map().expect("events map");
        let mut b = libbpf_rs::RingBufferBuilder::new();
        b.add(&map, |d: &[u8]| {
            let hdr: abi::rf_event_hdr = abi::from_bytes(d).expect("event header");
            if hdr.r#type == abi::rf_event_type::RF_EVENT_FLOW.0 {
                out.borrow_mut()
                    .push(Ev::Flow(abi::from_bytes(d).expect("flow event")));
            } else if hdr.r#type == abi::rf_event_type::RF_EVENT_DNS.0 {
                let e: abi::rf_dns_event = abi::from_bytes(d).expect("dns event");
                let at = std::mem::size_of::<abi::rf_dns_event>();
                let msg = d[at..(at + usize::from(e.len)).min(d.len())].to_vec();
                out.borrow_mut().push(Ev::Dns(e, msg));
            }
            0
        })
        .expect("ring buffer");
        b.build().expect("ring buffer").consume().expect("consume");
        out.into_inner()
    }

    fn neighbour(&self, ns: &str, addr: IpAddr) -> String {
        let out = Command::new("ip")
            .args(["-n", ns, "neigh", "show", &addr.to_string()])
            .output()
            .expect("ip neigh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn flows_to(evs: &[Ev], dst: IpAddr, port: u16) -> Vec<(abi::rf_verdict, abi::rf_reason)> {
    evs.iter()
        .filter_map(|e| match e {
            Ev::Flow(f)
                if abi::addr_from_bytes(f.daddr) == dst && f.dport == port && f.proto == 6 =>
            {
                Some((f.verdict(), f.reason()))
            }
            _ => None,
        })
        .collect()
}

/// DNS events whose message carries `name`, with their flags.
fn dns_flags(evs: &[Ev], name: &str) -> Vec<u32> {
    let w = wire(name);
    evs.iter()
        .filter_map(|e| match e {
            Ev::Dns(d, msg) if msg.windows(w.len()).any(|x| x == w.as_slice()) => Some(d.flags),
            _ => None,
        })
        .collect()
}

/// A listener in the job namespace on TCP and UDP `port`, IPv4 and IPv6: accepts connections
/// and reads datagrams until the datagram `stop` (then half a second more for stragglers) or
/// 30 s, and prints what it got. The listening socket stays open until the peer is done, so a
/// refused connection is ringfence's doing, not a closed port's.
const LISTEN_PY: &str = r#"
import socket, select, sys, time
port = int(sys.argv[1])
t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
t.bind(('::', port)); t.listen(8)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
u.bind(('::', port))
open(sys.argv[2], 'w').write('ready\n')
got = []
end = time.time() + 30
while time.time() < end:
    r, _, _ = select.select([t, u], [], [], max(0, end - time.time()))
    for s in r:
        if s is u:
            text = u.recv(100).decode()
            if text == 'stop':
                end = min(end, time.time() + 0.5)
            else:
                got.append('udp:' + text)
        else:
            t.accept()
            got.append('tcp')
print(' '.join(sorted(got)) or 'nothing')
"#;

/// A peer in the server namespace: sends one UDP datagram to the job, connects to it over
/// TCP and prints how that ended, then tells the listener to stop.
const PEER_PY: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b'hello-job', (host, port))
c = socket.socket(); c.settimeout(5)
try:
    c.connect((host, port)); print('connected')
except ConnectionRefusedError:
    print('refused')
except OSError as e:
    print('error', e)
u.sendto(b'stop', (host, port))
"#;

/// One UDP datagram `text` to `host` `port`.
const SEND_PY: &str = r#"
import socket, sys
host, port, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
socket.socket(fam, socket.SOCK_DGRAM).sendto(text.encode(), (host, port))
"#;

#[test]
fn block_mode_interface_job() {
    let r = rig(Mode::Block);
    let host = r.tb.client_ns().to_string();
    // Neighbours start unknown on both ends of the job's link: the first packets need ARP.
    ip_cmd(&["-n", &r.link.ns, "neigh", "flush", "all"]);
    ip_cmd(&["-n", &host, "neigh", "flush", "dev", &r.link.host_if]);
    r.events();

    // An allowed name: resolved through the host, bound as the answer left toward the job,
    // connected to.
    let (ok, out, err) = r.curl(&[], "http://ok.test/");
    assert!(ok, "curl ok.test failed: {err}");
    assert_eq!(out, format!("hello from {}:80\n", link_v4(OK_V4)));
    assert_eq!(r.tb.http_hits(sa(link_v4(OK_V4), 80)), 1);
    let queries = r.tb.dns_queries_for("ok.test");
    assert!(queries >= 1, "the allowed query never reached dnsmasq");
    let evs = r.events();
    assert_eq!(
        flows_to(&evs, link_v4(OK_V4).into(), 80),
        [(
            abi::rf_verdict::RF_VERDICT_ALLOWED,
            abi::rf_reason::RF_REASON_ALLOWED
        )]
    );
    // One copy per answer: it binds where the job reads it, not also at the uplink.
    let answers: Vec<u32> = dns_flags(&evs, "ok.test")
        .into_iter()
        .filter(|f| f & abi::DNS_QUERY == 0)
        .collect();
    assert_eq!(
        answers.len(),
        queries,
        "one answer event per query: {answers:?}"
    );
    assert!(answers.iter().any(|f| f & abi::DNS_ALLOWED != 0));
    let entry =
        r.dp.host_entry(JOB, link_v4(OK_V4).into())
            .unwrap()
            .expect("ok.test's address bound for the job");
    assert_ne!(entry.flags & abi::ADDR_LEARNED, 0);

    // ARP on the job's link worked both ways.
    for (ns, addr) in [
        (&r.link.ns, IpAddr::from(r.link.host_v4)),
        (&host, r.link.job_v4.into()),
    ] {
        let n = r.neighbour(ns, addr);
        assert!(
            n.contains("lladdr"),
            "{ns}: no neighbour entry for {addr}: {n:?}"
        );
    }

    // An allowed name on a port the policy does not list: the query passes, the
    // connection does not.
    let (ok, _, _) = r.curl(&[], "http://port.test/");
    assert!(!ok, "curl port.test:80 succeeded");
    assert_eq!(r.tb.http_hits(sa(link_v4(PORT_V4), 80)), 0);
    assert!(r.tb.dns_queries_for("port.test") >= 1);
    assert_eq!(
        flows_to(&r.events(), link_v4(PORT_V4).into(), 80)[0],
        (
            abi::rf_verdict::RF_VERDICT_BLOCKED,
            abi::rf_reason::RF_REASON_NOT_ALLOWED
        )
    );

    // An address no answer produced.
    let direct = format!("http://{}/", link_v4(DIRECT_V4));
    let (ok, _, _) = r.curl(&[], &direct);
    assert!(!ok, "curl to a direct IP succeeded");
    assert_eq!(r.tb.http_hits(sa(link_v4(DIRECT_V4), 80)), 0);
    assert_eq!(
        flows_to(&r.events(), link_v4(DIRECT_V4).into(), 80)[0],
        (
            abi::rf_verdict::RF_VERDICT_BLOCKED,
            abi::rf_reason::RF_REASON_DIRECT_IP
        )
    );

    // A name the policy does not allow: answered REFUSED on the host, never sent on, over
    // UDP and over TCP.
    for (name, extra) in [("bad.test", None), ("bad-tcp.test", Some("+tcp"))] {
        let out = r.dig(extra.as_slice(), name);
        assert!(out.contains("status: REFUSED"), "dig {name}: {out}");
        assert_eq!(r.tb.dns_queries_for(name), 0, "{name} reached dnsmasq");
        let flags = dns_flags(&r.events(), name);
        assert!(
            flags
                .iter()
                .any(|f| f & (abi::DNS_QUERY | abi::DNS_REFUSED)
                    == abi::DNS_QUERY | abi::DNS_REFUSED),
            "{name}: no refused-query report: {flags:?}"
        );
    }
    let (ok, _, _) = r.curl(&[], "http://bad.test/");
    assert!(!ok);
    assert_eq!(r.tb.http_hits(sa(link_v4(BAD_V4), 80)), 0);

    // IPv6: neighbour discovery on the link passes, an allowed AAAA name connects.
    let (ok, out, err) = r.curl(&["-6"], "http://v6.test/");
    assert!(ok, "curl -6 v6.test failed: {err}");
    assert_eq!(out, format!("hello from [{}]:80\n", routed_v6(V6_HOST)));
    for (ns, addr) in [
        (&r.link.ns, IpAddr::from(r.link.host_v6)),
        (&host, r.link.job_v6.into()),
    ] {
        let n = r.neighbour(ns, addr);
        assert!(
            n.contains("lladdr"),
            "{ns}: no neighbour entry for {addr}: {n:?}"
        );
    }

    // Packets toward the job are not the job's: a peer's datagram arrives. A peer's
    // connection is judged at the job's SYN-ACK, which no allowed-inbound lists: refused
    // (a RST, as from a closed port), and the job's listener never accepts.
    let ready = r.tb.workdir().join("listen-ready");
    let listen = scratch(&r.tb, "listen.py", LISTEN_PY);
    let peer = scratch(&r.tb, "peer.py", PEER_PY);
    let mut job = Command::new("ip");
    job.args(["netns", "exec", &r.link.ns, "python3"])
        .arg(&listen)
        .args(["8080", &ready.display().to_string()]);
    let listener = std::thread::spawn(move || run_timeout(job, CMD_TIMEOUT));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The host itself, from its global address on the link, to the job's: the host asks
    // for the job's address from that address, and the job's advertisement comes back to it
    // (neighbour discovery to a unicast address of the host, not only to link-local ones).
    ip_cmd(&["-n", &host, "-6", "neigh", "flush", "dev", &r.link.host_if]);
    let send = scratch(&r.tb, "send.py", SEND_PY);
    let (sent, _, send_err) = run_timeout(
        r.tb.client_cmd(
            "python3",
            [
                send.display().to_string(),
                r.link.job_v6.to_string(),
                "8080".into(),
                "hello-host6".into(),
            ],
        ),
        CMD_TIMEOUT,
    );
    assert!(sent.success(), "sending from the host: {send_err}");
    let (_, peer_out, peer_err) = run_timeout(
        r.tb.server_cmd(
            "python3",
            [
                peer.display().to_string(),
                r.link.job_v4.to_string(),
                "8080".into(),
            ],
        ),
        CMD_TIMEOUT,
    );
    let (_, got, _) = listener.join().expect("listener thread");
    assert_eq!(
        got.trim(),
        "udp:hello-host6 udp:hello-job",
        "the job's listener got: {got}"
    );
    assert_eq!(peer_out.trim(), "refused", "the peer: {peer_out}{peer_err}");
    let inbound: Vec<_> = r
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Flow(f) if f.direction().0 == abi::rf_direction::RF_DIR_INBOUND.0 => {
                Some((f.sport, f.verdict(), f.reason()))
            }
            _ => None,
        })
        .collect();
    assert!(
        inbound.contains(&(
            8080,
            abi::rf_verdict::RF_VERDICT_BLOCKED,
            abi::rf_reason::RF_REASON_INBOUND
        )),
        "no blocked inbound report: {inbound:?}"
    );
}

#[test]
fn audit_mode_interface_job_reports_and_passes() {
    let r = rig(Mode::Audit);
    r.events();

    let (ok, _, err) = r.curl(&[], "http://port.test/");
    assert!(ok, "audit mode blocked port.test:80: {err}");
    assert_eq!(r.tb.http_hits(sa(link_v4(PORT_V4), 80)), 1);
    assert_eq!(
        flows_to(&r.events(), link_v4(PORT_V4).into(), 80)[0],
        (
            abi::rf_verdict::RF_VERDICT_AUDITED,
            abi::rf_reason::RF_REASON_NOT_ALLOWED
        )
    );

    let direct = format!("http://{}/", link_v4(DIRECT_V4));
    let (ok, _, err) = r.curl(&[], &direct);
    assert!(ok, "audit mode blocked a direct IP: {err}");
    assert_eq!(r.tb.http_hits(sa(link_v4(DIRECT_V4), 80)), 1);
    assert_eq!(
        flows_to(&r.events(), link_v4(DIRECT_V4).into(), 80)[0],
        (
            abi::rf_verdict::RF_VERDICT_AUDITED,
            abi::rf_reason::RF_REASON_DIRECT_IP
        )
    );

    // A name the policy does not allow: asked, answered, reported.
    let out = r.dig(&[], "bad.test");
    assert!(out.contains("status: NOERROR"), "dig bad.test: {out}");
    assert_eq!(r.tb.dns_queries_for("bad.test"), 1);
    let flags = dns_flags(&r.events(), "bad.test");
    assert!(
        flags
            .iter()
            .any(|f| f & abi::DNS_QUERY != 0 && f & abi::DNS_REFUSED == 0),
        "no query report for bad.test: {flags:?}"
    );
}
