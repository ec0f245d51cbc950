//! The dataplane, packet by packet, through BPF_PROG_TEST_RUN on the real kernel: frames
//! in, verdicts, trie contents and ring-buffer events out. Needs root (CI is root).
//!
//! Packets in BPF_PROG_TEST_RUN have no socket and so no cgroup: the job is keyed by the
//! interface the run pretends the packet came from (loopback, ifindex 1).
use std::cell::RefCell;
use std::net::IpAddr;

use ringfence::kernel::abi;
use ringfence::kernel::dataplane::{Dataplane, Options};
use ringfence::policy::{Mode, Policy, PortSet};
use ringfence::testkit::testrun::{
    self, dns_answer, dns_query, frame, run_tc, run_tc_meta, Rr, SkbMeta, DROP, PASS, TCP_ACK,
    TCP_SYN,
};

const LO: u32 = 1;
const JOB: u32 = 1;
const CLIENT: &str = "198.51.100.1";
const RESOLVER: &str = "198.51.100.53";
const CLIENT6: &str = "2001:db8:1::1";
const RESOLVER6: &str = "2001:db8:1::53";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Rig {
    dp: Option<Dataplane>,
    next_port: std::cell::Cell<u16>,
}

#[derive(Debug, Clone)]
enum Ev {
    Flow(abi::rf_flow_event),
    Dns(abi::rf_dns_event),
}

/// A job whose queries for unlisted names go through to the resolver (`dns-policy = "any"`),
/// so that answers to them can be tested.
fn rig(mode: Mode, direct_ip: Mode, allow: &str) -> Rig {
    rig_with(mode, direct_ip, allow, false)
}

/// Loaded dataplanes not in use. Loading verifies the programs, which takes seconds under
/// qemu's emulation (vm-tests): each test thread loads at most one and resets it per case.
static POOL: std::sync::Mutex<Vec<Dataplane>> = std::sync::Mutex::new(Vec::new());

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            POOL.lock().unwrap().push(dp);
        }
    }
}

fn rig_with(mode: Mode, direct_ip: Mode, allow: &str, dns_filter: bool) -> Rig {
    rig_job(mode, direct_ip, allow, dns_filter, false)
}

/// `host_side`: LO is the host side of the job's link (`RF_JOB_HOST_SIDE`): the ingress
/// program judges the job's packets and the egress program reads the answers to them.
fn rig_job(mode: Mode, direct_ip: Mode, allow: &str, dns_filter: bool, host_side: bool) -> Rig {
    let pooled = POOL.lock().unwrap().pop();
    let mut dp = match pooled {
        Some(mut dp) => {
            dp.reset().expect("reset the dataplane");
            dp
        }
        None => Dataplane::load(&Options::default()).expect("load the dataplane (root?)"),
    };
    let policy = Policy {
        mode,
        direct_ip,
        dns_resolvers: vec![ip(RESOLVER), ip(RESOLVER6)],
        endpoints: Policy::parse_endpoints(allow, "test").expect("test policy"),
        dns_filter,
        ..Policy::default()
    };
    let compiled = policy.compile().expect("compile");
    dp.install_policy(JOB, &compiled, &policy.dns_resolvers)
        .unwrap();
    let job = abi::rf_job::for_policy(JOB, &policy);
    dp.add_interface_job(LO, if host_side { job.host_side() } else { job })
        .unwrap();
    Rig {
        dp: Some(dp),
        next_port: std::cell::Cell::new(40000),
    }
}

impl Rig {
    fn dp(&self) -> &Dataplane {
        self.dp
            .as_ref()
            .expect("a rig always holds a dataplane until dropped")
    }

    fn port(&self) -> u16 {
        let p = self.next_port.get();
        self.next_port.set(p + 1);
        p
    }

    fn egress(&self, f: &[u8]) -> i32 {
        run_tc(self.dp().egress_prog(), f, LO, 1).unwrap().0
    }

    fn ingress(&self, f: &[u8]) -> i32 {
        run_tc(self.dp().ingress_prog(), f, LO, 1).unwrap().0
    }

    fn syn(&self, dst: &str, dport: u16) -> i32 {
        let src = if dst.contains(':') { CLIENT6 } else { CLIENT };
        self.egress(&frame(
            ip(src),
            ip(dst),
            6,
            self.port(),
            dport,
            TCP_SYN,
            &[],
        ))
    }

    /// Sends a query for `name` from a fresh port and returns that port.
    fn query(&self, id: u16, name: &str, qtype: u16) -> u16 {
        let (src, dst) = if qtype == 28 {
            (CLIENT6, RESOLVER6)
        } else {
            (CLIENT, RESOLVER)
        };
        let sport = self.port();
        let rc = self.egress(&frame(
            ip(src),
            ip(dst),
            17,
            sport,
            53,
            0,
            &dns_query(id, name, qtype),
        ));
        assert_eq!(rc, PASS, "a query to the resolver passes");
        sport
    }

    fn answer_to(&self, dport: u16, msg: &[u8], v6: bool) -> i32 {
        let (src, dst) = if v6 {
            (RESOLVER6, CLIENT6)
        } else {
            (RESOLVER, CLIENT)
        };
        self.ingress(&frame(ip(src), ip(dst), 17, 53, dport, 0, msg))
    }

    /// Query then answer, the way a resolver conversation goes.
    fn resolve(&self, id: u16, name: &str, qtype: u16, rrs: &[Rr<'_>]) -> i32 {
        let port = self.query(id, name, qtype);
        self.answer_to(port, &dns_answer(id, name, qtype, rrs), qtype == 28)
    }

    fn host(&self, a: &str) -> Option<abi::rf_addr_val> {
        self.dp().host_entry(JOB, ip(a)).unwrap()
    }

    fn learned(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .dp()
            .allow_entries()
            .into_iter()
            .filter(|e| e.prefix_bits == abi::LPM_FULL && e.val.flags & abi::ADDR_LEARNED != 0)
            .map(|e| e.addr)
            .collect();
        v.sort();
        v
    }

    fn events(&self) -> Vec<Ev> {
        let out = RefCell::new(Vec::new());
        let map = self.dp().events_map().unwrap();
        let mut b = libbpf_rs::RingBufferBuilder::new();
        b.add(&map, |d: &[u8]| {
            let hdr: abi::rf_event_hdr = abi::from_bytes(d).unwrap();
            out.borrow_mut().push(
                if abi::rf_event_type(hdr.r#type) == abi::rf_event_type::RF_EVENT_FLOW {
                    Ev::Flow(abi::from_bytes(d).unwrap())
                } else {
                    Ev::Dns(abi::from_bytes(d).unwrap())
                },
            );
            0
        })
        .unwrap();
        let rb = b.build().unwrap();
        rb.consume().unwrap();
        drop(rb);
        out.into_inner()
    }

    fn flows(&self) -> Vec<abi::rf_flow_event> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Flow(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    fn counter(&self, c: abi::rf_counter) -> u64 {
        self.dp().counters().unwrap()[c.0 as usize]
    }
}

fn a4(s: &str) -> [u8; 4] {
    match ip(s) {
        IpAddr::V4(v) => v.octets(),
        _ => panic!(),
    }
}

fn a6(s: &str) -> [u8; 16] {
    match ip(s) {
        IpAddr::V6(v) => v.octets(),
        _ => panic!(),
    }
}

// ---- verdicts on the first packet of a flow ------------------------------------------

#[test]
fn verdict_table() {
    struct Case {
        what: &'static str,
        mode: Mode,
        direct_ip: Mode,
        allow: &'static str,
        dst: &'static str,
        port: u16,
        rc: i32,
        verdict: abi::rf_verdict,
        reason: abi::rf_reason,
    }
    use abi::rf_reason as R;
    use abi::rf_verdict as V;
    let cases = [
        Case {
            what: "listed CIDR, default port 443",
            mode: Mode::Block,
            direct_ip: Mode::Block,
            allow: "203.0.113.0/24",
            dst: "203.0.113.9",
            port: 443,
            rc: PASS,
            verdict: V::RF_VERDICT_ALLOWED,
            reason: R::RF_REASON_ALLOWED,
        },
        Case {
            what: "listed CIDR, other port",
            mode: Mode::Block,
            direct_ip: Mode::Block,
            allow: "203.0.113.0/24",
            dst: "203.0.113.9",
            port: 80,
            rc: DROP,
            verdict: V::RF_VERDICT_BLOCKED,
            reason: R::RF_REASON_NOT_ALLOWED,
        },
        Case {
            what: "CIDR any port",
            mode: Mode::Block,
            direct_ip: Mode::Block,
            allow: "203.0.113.0/24:*",
            dst: "203.0.113.200",
            port: 8080,
            rc: PASS,
            verdict: V::RF_VERDICT_ALLOWED,
            reason: R::RF_REASON_ALLOWED,
        },
        Case {
            what: "unlisted address, block mode",
            mode: Mode::Block,
            direct_ip: Mode::Block,
            allow: "203.0.113.0/24",
            dst: "198.51.100.66",
            port: 443,
            rc: DROP,
            verdict: V::RF_VERDICT_BLOCKED,
            reason: R::RF_REASON_DIRECT_IP,
        },
        Case {
            what: "direct IP blocked even in audit mode",
            mode: Mode::Audit,
            direct_ip: Mode::Block,
            allow: "",
            dst: "198.51.100.66",
            port: 443,
            rc: DROP,
            verdict: V::RF_VERDICT_BLOCKED,
            reason: R::RF_REASON_DIRECT_IP,
        },
        Case {
            what: "direct IP audited with direct-ip=audit",
            mode: Mode::Audit,
            direct_ip: Mode::Audit,
            allow: "",
            dst: "198.51.100.66",
            port: 443,
            rc: PASS,
            verdict: V::RF_VERDICT_AUDITED,
            reason: R::RF_REASON_DIRECT_IP,
        },
        Case {
            what: "metadata blocked in audit mode",
            mode: Mode::Audit,
            direct_ip: Mode::Audit,
            allow: "",
            dst: "169.254.169.254",
            port: 80,
            rc: DROP,
            verdict: V::RF_VERDICT_BLOCKED,
            reason: R::RF_REASON_METADATA,
        },
        Case {
            what: "metadata allowed when listed",
            mode: Mode::Block,
            direct_ip: Mode::Block,
            allow: "169.254.169.254:80",
            dst: "169.254.169.254",
            port: 80,
            rc: PASS,
            verdict: V::RF_VERDICT_ALLOWED,
            reason: R::RF_REASON_ALLOWED,
        },
        Case {
            what: "v6 metadata",
            mode: Mode::Audit,
            direct_ip: Mode::Audit,
            allow: "",
            dst: "fd00:ec2::254",
            port: 80,
            rc: DROP,
            verdict: V::RF_VERDICT_BLOCKED,
            reason: R::RF_REASON_METADATA,
        },
        Case {
            what: "v6 CIDR with port",
            mode: Mode::Block,
            direct_ip: Mode::Block,
            allow: "2001:db8:2::/64:443",
            dst: "2001:db8:2::7",
            port: 443,
            rc: PASS,
            verdict: V::RF_VERDICT_ALLOWED,
            reason: R::RF_REASON_ALLOWED,
        },
        Case {
            what: "v6 unlisted",
            mode: Mode::Block,
            direct_ip: Mode::Block,
            allow: "2001:db8:2::/64:443",
            dst: "2001:db8:3::7",
            port: 443,
            rc: DROP,
            verdict: V::RF_VERDICT_BLOCKED,
            reason: R::RF_REASON_DIRECT_IP,
        },
    ];
    for c in &cases {
        let r = rig(c.mode, c.direct_ip, c.allow);
        let rc = r.syn(c.dst, c.port);
        assert_eq!(rc, c.rc, "{}: return code", c.what);
        let flows = r.flows();
        assert_eq!(flows.len(), 1, "{}: one flow event", c.what);
        let f = &flows[0];
        assert_eq!(f.verdict(), c.verdict, "{}: verdict", c.what);
        assert_eq!(f.reason(), c.reason, "{}: reason", c.what);
        assert_eq!(abi::addr_from_bytes(f.daddr), ip(c.dst), "{}: dst", c.what);
        assert_eq!(f.dport, c.port, "{}: port", c.what);
        assert_eq!(f.proto, 6);
    }
}

#[test]
fn one_event_per_flow_not_per_packet() {
    let r = rig(Mode::Block, Mode::Block, "203.0.113.0/24");
    let sport = 41000;
    let syn = frame(ip(CLIENT), ip("203.0.113.5"), 6, sport, 443, TCP_SYN, &[]);
    let ack = frame(
        ip(CLIENT),
        ip("203.0.113.5"),
        6,
        sport,
        443,
        TCP_ACK,
        b"data",
    );
    assert_eq!(r.egress(&syn), PASS);
    for _ in 0..10 {
        assert_eq!(r.egress(&ack), PASS);
    }
    let blocked = frame(
        ip(CLIENT),
        ip("198.51.100.99"),
        6,
        sport + 1,
        443,
        TCP_SYN,
        &[],
    );
    for _ in 0..3 {
        // SYN retransmits of a blocked flow stay blocked, with no new event.
        assert_eq!(r.egress(&blocked), DROP);
    }
    assert_eq!(r.flows().len(), 2);
    assert_eq!(r.counter(abi::rf_counter::RF_CNT_NEW_FLOWS), 2);
}

#[test]
fn packets_that_are_not_ours_pass() {
    let r = rig(Mode::Block, Mode::Block, "");
    // ARP of a job keyed by interface (no socket, so no job data: neighbour resolution)
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    assert_eq!(r.egress(&arp), PASS);
    // Loopback
    assert_eq!(r.syn("127.0.0.1", 8080), PASS);
    assert_eq!(
        r.egress(&frame(
            ip(CLIENT),
            ip("127.0.0.1"),
            6,
            8080,
            40000,
            TCP_SYN | TCP_ACK,
            &[]
        )),
        PASS,
        "loopback peers may always connect"
    );
    assert!(r.flows().is_empty());
}

/// An interface job's frames that carry no IP and are not ARP: a second VLAN tag (the kernel
/// takes the outer one off before TC, the inner stays in the frame: 802.1ad in 802.1Q), MPLS,
/// PPPoE, an 802.3 length frame. A container with CAP_NET_RAW (Docker's default) can send any
/// of them on its veth, and a bridge forwards them on unread: in block mode they are dropped
/// and reported (once per kind), in audit mode reported and passed. ARP still passes.
#[test]
fn non_ip_frames_of_an_interface_job_fail_closed() {
    let frame_of = |ethertype: [u8; 2]| {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ethertype);
        // A VLAN tag, then an IPv4 header to 203.0.113.9 behind it (what a tag would carry).
        f.extend_from_slice(&[0x00, 0x05, 0x08, 0x00]);
        f.extend_from_slice(&[
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 198, 51, 100, 2, 203, 0, 113, 9,
        ]);
        f.extend_from_slice(&[0; 8]);
        f
    };
    let kinds: [(&str, [u8; 2]); 6] = [
        ("802.1Q", [0x81, 0x00]),
        ("802.1ad", [0x88, 0xa8]),
        ("MPLS", [0x88, 0x47]),
        ("PPPoE session", [0x88, 0x64]),
        ("802.3 length", [0x00, 0x26]),
        ("LLDP", [0x88, 0xcc]),
    ];
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    for host_side in [false, true] {
        let r = rig_job(Mode::Block, Mode::Block, "", false, host_side);
        let run = |f: &[u8]| if host_side { r.ingress(f) } else { r.egress(f) };
        assert_eq!(run(&arp), PASS, "ARP (host side: {host_side})");
        for (what, et) in kinds {
            assert_eq!(run(&frame_of(et)), DROP, "{what} (host side: {host_side})");
            assert_eq!(
                run(&frame_of(et)),
                DROP,
                "{what} again (host side: {host_side})"
            );
        }
        let unparsed = r
            .flows()
            .iter()
            .filter(|f| f.reason() == abi::rf_reason::RF_REASON_UNPARSED)
            .count();
        assert!(unparsed >= 1, "reported (host side: {host_side})");
        drop(r);
        let r = rig_job(Mode::Audit, Mode::Audit, "", false, host_side);
        let run = |f: &[u8]| if host_side { r.ingress(f) } else { r.egress(f) };
        for (what, et) in kinds {
            assert_eq!(
                run(&frame_of(et)),
                PASS,
                "{what} in audit mode (host side: {host_side})"
            );
        }
        assert!(
            !r.flows().is_empty(),
            "reported in audit mode (host side: {host_side})"
        );
    }
}

/// A job whose policy also has `allowed-inbound`.
fn rig_inbound(mode: Mode, allow: &str, inbound: &str) -> Rig {
    let mut r = rig(mode, Mode::Block, allow);
    let policy = Policy {
        inbound: Policy::parse_inbound(inbound, "test").expect("test inbound"),
        ..Policy::default()
    };
    let compiled = policy.compile().unwrap();
    // install_policy needs `&mut`: take the dataplane out of the rig and put it back.
    let mut d = r.dp.take().unwrap();
    d.install_policy(JOB, &compiled, &[]).unwrap();
    r.dp = Some(d);
    r
}

const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
const PEER: &str = "198.51.100.66";

/// Every case where the dataplane cannot judge a packet the usual way, and what it does:
/// in block mode nothing passes unjudged; audit mode reports and passes.
#[test]
fn fail_closed_table() {
    use abi::rf_direction as D;
    use abi::rf_reason as R;
    use abi::rf_verdict as V;
    struct Case {
        what: &'static str,
        mode: Mode,
        allow: &'static str,
        inbound: &'static str,
        frame: Vec<u8>,
        rc: i32,
        /// (verdict, reason, direction) of the one flow event.
        event: (abi::rf_verdict, abi::rf_reason, abi::rf_direction),
    }
    let (allowed, blocked, audited) = (
        V::RF_VERDICT_ALLOWED,
        V::RF_VERDICT_BLOCKED,
        V::RF_VERDICT_AUDITED,
    );
    let (out, inb) = (D::RF_DIR_OUTBOUND, D::RF_DIR_INBOUND);
    let cut_tcp = frame(ip(CLIENT), ip(PEER), 6, 1, 443, TCP_SYN, &[])[..40].to_vec();
    let ack = |dst: &str, sport: u16, dport: u16| {
        frame(ip(CLIENT), ip(dst), 6, sport, dport, TCP_ACK, b"data")
    };
    let syn_ack = |dst: &str, local: u16| frame(ip(CLIENT), ip(dst), 6, local, 40000, SYN_ACK, &[]);
    let cases = vec![
        Case {
            what: "TCP header cut short: no ports to judge by",
            mode: Mode::Block,
            allow: "",
            inbound: "",
            frame: cut_tcp.clone(),
            rc: DROP,
            event: (blocked, R::RF_REASON_UNPARSED, out),
        },
        Case {
            what: "TCP header cut short, audit mode",
            mode: Mode::Audit,
            allow: "",
            inbound: "",
            frame: cut_tcp,
            rc: PASS,
            event: (audited, R::RF_REASON_UNPARSED, out),
        },
        Case {
            what: "non-SYN segment without a cached flow, unlisted peer (eviction, or a \
                   connection nobody judged)",
            mode: Mode::Block,
            allow: "",
            inbound: "",
            frame: ack(PEER, 41000, 443),
            rc: DROP,
            event: (blocked, R::RF_REASON_DIRECT_IP, out),
        },
        Case {
            what: "non-SYN segment without a cached flow, listed destination",
            mode: Mode::Block,
            allow: "198.51.100.0/24",
            inbound: "",
            frame: ack(PEER, 41000, 443),
            rc: PASS,
            event: (allowed, R::RF_REASON_ALLOWED, out),
        },
        Case {
            what: "non-SYN segment without a cached flow, peer allowed inbound",
            mode: Mode::Block,
            allow: "",
            inbound: "198.51.100.66:8080",
            frame: ack(PEER, 8080, 40000),
            rc: PASS,
            event: (allowed, R::RF_REASON_ALLOWED, inb),
        },
        Case {
            what: "UDP from the job's port to a peer allowed inbound on it: the answer",
            mode: Mode::Block,
            allow: "",
            inbound: "198.51.100.66:5000",
            frame: frame(ip(CLIENT), ip(PEER), 17, 5000, 40000, 0, b"answer"),
            rc: PASS,
            event: (allowed, R::RF_REASON_ALLOWED, inb),
        },
        Case {
            what: "UDP from another port to that peer: an outbound flow like any",
            mode: Mode::Block,
            allow: "",
            inbound: "198.51.100.66:5000",
            frame: frame(ip(CLIENT), ip(PEER), 17, 5001, 40000, 0, b"leak"),
            rc: DROP,
            event: (blocked, R::RF_REASON_DIRECT_IP, out),
        },
        Case {
            what: "SYN-ACK to a peer the policy does not list: inbound refused",
            mode: Mode::Block,
            allow: "198.51.100.0/24:*",
            inbound: "",
            frame: syn_ack(PEER, 8080),
            rc: PASS, // turned into a RST: see refused_syn_ack_goes_out_as_a_reset
            event: (blocked, R::RF_REASON_INBOUND, inb),
        },
        Case {
            what: "SYN-ACK, audit mode",
            mode: Mode::Audit,
            allow: "",
            inbound: "",
            frame: syn_ack(PEER, 8080),
            rc: PASS,
            event: (audited, R::RF_REASON_INBOUND, inb),
        },
        Case {
            what: "SYN-ACK to a listed peer on its port",
            mode: Mode::Block,
            allow: "",
            inbound: "198.51.100.0/24:8080",
            frame: syn_ack(PEER, 8080),
            rc: PASS,
            event: (allowed, R::RF_REASON_ALLOWED, inb),
        },
        Case {
            what: "SYN-ACK to a listed peer on another local port",
            mode: Mode::Block,
            allow: "",
            inbound: "198.51.100.0/24:8080",
            frame: syn_ack(PEER, 22),
            rc: PASS, // turned into a RST: see refused_syn_ack_goes_out_as_a_reset
            event: (blocked, R::RF_REASON_INBOUND, inb),
        },
        Case {
            what: "SYN-ACK with allowed-inbound = \"*\" (IPv6 peer)",
            mode: Mode::Block,
            allow: "",
            inbound: "*",
            frame: frame(ip(CLIENT6), ip("2001:db8:3::9"), 6, 22, 40000, SYN_ACK, &[]),
            rc: PASS,
            event: (allowed, R::RF_REASON_ALLOWED, inb),
        },
        Case {
            what: "SYN-ACK: a peer's port covered by * and a more specific entry",
            mode: Mode::Block,
            allow: "",
            inbound: "198.51.100.66:22 *:9000",
            frame: syn_ack(PEER, 9000),
            rc: PASS,
            event: (allowed, R::RF_REASON_ALLOWED, inb),
        },
    ];
    for c in &cases {
        let r = rig_inbound(c.mode, c.allow, c.inbound);
        assert_eq!(r.egress(&c.frame), c.rc, "{}: return code", c.what);
        // The verdict is cached: the flow's next packet gets it without a new event.
        assert_eq!(r.egress(&c.frame), c.rc, "{}: second packet", c.what);
        let flows = r.flows();
        assert_eq!(flows.len(), 1, "{}: one event", c.what);
        let f = &flows[0];
        assert_eq!(
            (f.verdict(), f.reason(), f.direction()),
            c.event,
            "{}: (verdict, reason, direction)",
            c.what
        );
        let inbound_seen = r.counter(abi::rf_counter::RF_CNT_INBOUND);
        let want =
            u64::from(c.frame.get(14 + 20 + 13) == Some(&SYN_ACK) || c.what.contains("IPv6 peer"));
        assert_eq!(inbound_seen, want, "{}: inbound counter", c.what);
    }
}

/// An IP packet as an L3 device (tun, WireGuard) carries it: no link header.
fn l3(f: Vec<u8>) -> Vec<u8> {
    f[14..].to_vec()
}

#[test]
fn l3_devices_parse_from_the_ip_header() {
    for mode in [Mode::Block, Mode::Audit] {
        let mut r = rig(mode, Mode::Block, "203.0.113.0/24 2001:db8:2::/64");
        let mut d = r.dp.take().unwrap();
        d.set_device(LO, abi::rf_link::RF_L2_NONE.0).unwrap();
        r.dp = Some(d);
        let syn = |dst: &str, port| {
            let src = if dst.contains(':') { CLIENT6 } else { CLIENT };
            l3(frame(ip(src), ip(dst), 6, r.port(), port, TCP_SYN, &[]))
        };
        assert_eq!(
            r.egress(&syn("203.0.113.9", 443)),
            PASS,
            "{mode}: listed v4"
        );
        assert_eq!(
            r.egress(&syn("2001:db8:2::9", 443)),
            PASS,
            "{mode}: listed v6"
        );
        assert_eq!(
            r.egress(&syn("198.51.100.66", 443)),
            DROP,
            "{mode}: unlisted"
        );
        let udp = l3(frame(
            ip(CLIENT),
            ip("198.51.100.66"),
            17,
            5000,
            9999,
            0,
            b"x",
        ));
        assert_eq!(
            r.egress(&udp),
            DROP,
            "{mode}: unlisted UDP (direct-ip blocks in audit too)"
        );
        let reasons: Vec<(IpAddr, abi::rf_reason)> = r
            .flows()
            .iter()
            .map(|f| (abi::addr_from_bytes(f.daddr), f.reason()))
            .collect();
        let (allowed, direct) = (
            abi::rf_reason::RF_REASON_ALLOWED,
            abi::rf_reason::RF_REASON_DIRECT_IP,
        );
        assert_eq!(
            reasons,
            vec![
                (ip("203.0.113.9"), allowed),
                (ip("2001:db8:2::9"), allowed),
                (ip("198.51.100.66"), direct),
                (ip("198.51.100.66"), direct),
            ],
            "{mode}: addresses read from the IP header"
        );
        // An Ethernet frame on an L3 device is not IP: unparsed, dropped in block mode.
        let eth = frame(ip(CLIENT), ip("203.0.113.9"), 6, 1234, 443, TCP_SYN, &[]);
        let want = if mode == Mode::Block { DROP } else { PASS };
        assert_eq!(
            r.egress(&eth),
            want,
            "{mode}: Ethernet frame on an L3 device"
        );
        let f = r.flows().pop().expect("an unparsed event");
        assert_eq!(f.reason(), abi::rf_reason::RF_REASON_UNPARSED);
        assert_eq!(r.counter(abi::rf_counter::RF_CNT_UNPARSED), 1);
    }
}

#[test]
fn unknown_link_types_fail_closed() {
    let mut r = rig(Mode::Block, Mode::Block, "203.0.113.0/24");
    let mut d = r.dp.take().unwrap();
    d.set_device(LO, abi::rf_link::RF_L2_UNKNOWN.0).unwrap();
    r.dp = Some(d);
    // Even a packet the policy would allow: what is in front of its IP header is unknown.
    assert_eq!(r.syn("203.0.113.9", 443), DROP);
    assert_eq!(r.syn("203.0.113.10", 443), DROP);
    let flows = r.flows();
    assert_eq!(
        flows.len(),
        1,
        "one event for the stream of unparsed packets"
    );
    assert_eq!(flows[0].reason(), abi::rf_reason::RF_REASON_UNPARSED);
    assert_eq!(flows[0].verdict(), abi::rf_verdict::RF_VERDICT_BLOCKED);
    // Ingress never drops, whatever it cannot parse.
    assert_eq!(
        r.answer_to(5353, &dns_answer(1, "x.test", 1, &[]), false),
        PASS
    );
}

#[test]
fn dns_to_other_servers_is_blocked() {
    let r = rig(Mode::Block, Mode::Block, "github.test");
    let q = dns_query(7, "github.test", 1);
    assert_eq!(
        r.egress(&frame(ip(CLIENT), ip("203.0.113.53"), 17, 5353, 53, 0, &q)),
        DROP
    );
    let f = &r.flows()[0];
    assert_eq!(f.reason(), abi::rf_reason::RF_REASON_DNS_RESOLVER);
    // ...also in audit mode (it is a direct IP), unless direct-ip = audit
    let r = rig(Mode::Audit, Mode::Block, "github.test");
    assert_eq!(
        r.egress(&frame(ip(CLIENT), ip("203.0.113.53"), 17, 5353, 53, 0, &q)),
        DROP
    );
    let r = rig(Mode::Audit, Mode::Audit, "github.test");
    assert_eq!(
        r.egress(&frame(ip(CLIENT), ip("203.0.113.53"), 17, 5353, 53, 0, &q)),
        PASS
    );
    // TCP to a non-resolver on 53 as well
    let r = rig(Mode::Block, Mode::Block, "github.test");
    assert_eq!(r.syn("203.0.113.53", 53), DROP);
    assert_eq!(r.syn(RESOLVER, 53), PASS);
}

// ---- DNS answers bind addresses --------------------------------------------------------

#[test]
fn allowed_answer_binds_before_the_first_syn() {
    let r = rig(Mode::Block, Mode::Block, "github.test:443");
    assert_eq!(r.syn("198.51.100.10", 443), DROP, "not bound yet");
    let rc = r.resolve(
        0x1111,
        "github.test",
        1,
        &[Rr::A("github.test", 60, a4("198.51.100.10"))],
    );
    assert_eq!(rc, PASS, "answers are never dropped");
    assert_eq!(r.learned(), vec![ip("198.51.100.10")]);
    let v = r.host("198.51.100.10").unwrap();
    assert_eq!((v.ports.n, v.ports.port[0], v.ports.any), (1, 443, 0));
    assert!(v.expires_ns > 0);
    // A new flow (new source port) to the learned address on 443 passes; on 80 it does not.
    assert_eq!(r.syn("198.51.100.10", 443), PASS);
    assert_eq!(r.syn("198.51.100.10", 80), DROP);
    // The copy of the answer reached the ring buffer, flagged as allowed.
    let dns: Vec<_> = r
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Dns(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(dns.len(), 1);
    assert_eq!(dns[0].flags & abi::DNS_ALLOWED, abi::DNS_ALLOWED);
    assert_eq!(dns[0].bound, 1);
}

/// DNS rebinding: an allowed name whose answer is a special address (this host, the link,
/// metadata, multicast…) binds nothing; only a static entry opens such an address.
#[test]
fn special_answers_never_bind() {
    struct Case {
        what: &'static str,
        qtype: u16,
        rr: Rr<'static>,
        dst: &'static str,
        port: u16,
    }
    let cases = [
        Case {
            what: "metadata",
            qtype: 1,
            rr: Rr::A("x.evil.test", 30, a4("169.254.169.254")),
            dst: "169.254.169.254",
            port: 80,
        },
        Case {
            what: "loopback",
            qtype: 1,
            rr: Rr::A("x.evil.test", 30, a4("127.0.0.1")),
            dst: "",
            port: 80,
        },
        Case {
            what: "this network",
            qtype: 1,
            rr: Rr::A("x.evil.test", 30, a4("0.0.0.0")),
            dst: "",
            port: 80,
        },
        Case {
            what: "multicast",
            qtype: 1,
            rr: Rr::A("x.evil.test", 30, a4("224.0.0.251")),
            dst: "224.0.0.251",
            port: 80,
        },
        Case {
            what: "broadcast",
            qtype: 1,
            rr: Rr::A("x.evil.test", 30, a4("255.255.255.255")),
            dst: "255.255.255.255",
            port: 80,
        },
        Case {
            what: "metadata, IPv4-mapped in an AAAA",
            qtype: 28,
            rr: Rr::Aaaa("x.evil.test", 30, a6("::ffff:169.254.169.254")),
            dst: "169.254.169.254",
            port: 80,
        },
        Case {
            what: "metadata through NAT64",
            qtype: 28,
            rr: Rr::Aaaa("x.evil.test", 30, a6("64:ff9b::a9fe:a9fe")),
            dst: "64:ff9b::a9fe:a9fe",
            port: 80,
        },
        Case {
            what: "v6 loopback",
            qtype: 28,
            rr: Rr::Aaaa("x.evil.test", 30, a6("::1")),
            dst: "",
            port: 80,
        },
        Case {
            what: "v6 link-local",
            qtype: 28,
            rr: Rr::Aaaa("x.evil.test", 30, a6("fe80::1")),
            dst: "fe80::1",
            port: 80,
        },
        Case {
            what: "v6 multicast",
            qtype: 28,
            rr: Rr::Aaaa("x.evil.test", 30, a6("ff02::1")),
            dst: "ff02::1",
            port: 80,
        },
        Case {
            what: "EC2 v6 metadata",
            qtype: 28,
            rr: Rr::Aaaa("x.evil.test", 30, a6("fd00:ec2::254")),
            dst: "fd00:ec2::254",
            port: 80,
        },
    ];
    for mode in [Mode::Block, Mode::Audit] {
        for c in &cases {
            let r = rig(mode, Mode::Audit, "*.evil.test:80");
            let normal = if c.qtype == 1 {
                Rr::A("x.evil.test", 30, a4("198.51.100.10"))
            } else {
                Rr::Aaaa("x.evil.test", 30, a6("2001:db8:2::10"))
            };
            let rrs = [normal, c.rr];
            assert_eq!(r.resolve(0x9191, "x.evil.test", c.qtype, &rrs), PASS);
            let want = if c.qtype == 1 {
                "198.51.100.10"
            } else {
                "2001:db8:2::10"
            };
            assert_eq!(
                r.learned(),
                vec![ip(want)],
                "{mode} {}: only the ordinary address",
                c.what
            );
            let all: Vec<IpAddr> = r.dp().allow_entries().iter().map(|e| e.addr).collect();
            assert_eq!(all, vec![ip(want)], "{mode} {}: not even seen", c.what);
            let copy = r
                .events()
                .into_iter()
                .find_map(|e| match e {
                    Ev::Dns(d) => Some(d),
                    _ => None,
                })
                .unwrap();
            assert_eq!(
                copy.flags & abi::DNS_SPECIAL,
                abi::DNS_SPECIAL,
                "{}",
                c.what
            );
            assert_eq!(copy.bound, 1, "{}", c.what);
            assert_eq!(
                r.counter(abi::rf_counter::RF_CNT_DNS_SPECIAL),
                1,
                "{}",
                c.what
            );
            if c.what.contains("metadata") && !c.what.contains("NAT64") {
                // Blocked as metadata, in audit mode too: no answer opens it.
                assert_eq!(r.syn(c.dst, c.port), DROP, "{mode} {}", c.what);
                let f = r.flows().pop().unwrap();
                assert_eq!(f.reason(), abi::rf_reason::RF_REASON_METADATA);
            } else if !c.dst.is_empty() && mode == Mode::Block {
                assert_eq!(r.syn(c.dst, c.port), DROP, "{mode} {}", c.what);
            }
        }
    }
    // A static entry still opens the address, and only on its own ports.
    let r = rig(Mode::Block, Mode::Block, "169.254.169.254:80 *.evil.test:*");
    r.resolve(
        0x9292,
        "x.evil.test",
        1,
        &[Rr::A("x.evil.test", 30, a4("169.254.169.254"))],
    );
    assert_eq!(r.syn("169.254.169.254", 80), PASS);
    assert_eq!(
        r.syn("169.254.169.254", 8080),
        DROP,
        "the name's ports were not merged in"
    );
}

#[test]
fn dns_answer_table() {
    struct Case {
        what: &'static str,
        allow: &'static str,
        name: &'static str,
        qtype: u16,
        rrs: Vec<Rr<'static>>,
        learned: Vec<&'static str>,
    }
    let cases = vec![
        Case {
            what: "AAAA",
            allow: "v6.test",
            name: "v6.test",
            qtype: 28,
            rrs: vec![Rr::Aaaa("v6.test", 30, a6("2001:db8:2::10"))],
            learned: vec!["2001:db8:2::10"],
        },
        Case {
            what: "several A records",
            allow: "multi.test",
            name: "multi.test",
            qtype: 1,
            rrs: vec![
                Rr::A("multi.test", 30, a4("198.51.100.11")),
                Rr::A("multi.test", 30, a4("198.51.100.12")),
                Rr::A("multi.test", 30, a4("198.51.100.13")),
            ],
            learned: vec!["198.51.100.11", "198.51.100.12", "198.51.100.13"],
        },
        Case {
            what: "CNAME chain",
            allow: "www.cdn-user.test",
            name: "www.cdn-user.test",
            qtype: 1,
            rrs: vec![
                Rr::Cname("www.cdn-user.test", 30, "edge.cdn.test"),
                Rr::Cname("edge.cdn.test", 30, "e1.cdn.test"),
                Rr::A("e1.cdn.test", 30, a4("203.0.113.77")),
            ],
            learned: vec!["203.0.113.77"],
        },
        Case {
            what: "other record types between A records",
            allow: "mixed.test",
            name: "mixed.test",
            qtype: 1,
            rrs: vec![
                Rr::A("mixed.test", 30, a4("198.51.100.21")),
                Rr::Txt("mixed.test", 30, b"\x05hello"),
                Rr::A("mixed.test", 30, a4("198.51.100.22")),
            ],
            learned: vec!["198.51.100.21", "198.51.100.22"],
        },
        Case {
            what: "wildcard at any depth",
            allow: "*.npm.test",
            name: "a.b.registry.npm.test",
            qtype: 1,
            rrs: vec![Rr::A("a.b.registry.npm.test", 30, a4("198.51.100.31"))],
            learned: vec!["198.51.100.31"],
        },
        Case {
            what: "wildcard excludes the bare domain",
            allow: "*.npm.test",
            name: "npm.test",
            qtype: 1,
            rrs: vec![Rr::A("npm.test", 30, a4("198.51.100.32"))],
            learned: vec![],
        },
        Case {
            what: "glob inside a label",
            allow: "results*.blob.test",
            name: "resultsabc123.blob.test",
            qtype: 1,
            rrs: vec![Rr::A("resultsabc123.blob.test", 30, a4("198.51.100.41"))],
            learned: vec!["198.51.100.41"],
        },
        Case {
            what: "glob prefix mismatch",
            allow: "results*.blob.test",
            name: "other.blob.test",
            qtype: 1,
            rrs: vec![Rr::A("other.blob.test", 30, a4("198.51.100.42"))],
            learned: vec![],
        },
        Case {
            what: "glob is one label only",
            allow: "results*.blob.test",
            name: "x.results1.blob.test",
            qtype: 1,
            rrs: vec![Rr::A("x.results1.blob.test", 30, a4("198.51.100.43"))],
            learned: vec![],
        },
        Case {
            what: "glob with a suffix",
            allow: "ab*yz.glob.test",
            name: "abMIDDLEyz.glob.test",
            qtype: 1,
            rrs: vec![Rr::A("abMIDDLEyz.glob.test", 30, a4("198.51.100.44"))],
            learned: vec!["198.51.100.44"],
        },
        Case {
            what: "mixed-case question (0x20)",
            allow: "github.test",
            name: "GiThUb.TeSt",
            qtype: 1,
            rrs: vec![Rr::A("GiThUb.TeSt", 30, a4("198.51.100.51"))],
            learned: vec!["198.51.100.51"],
        },
        Case {
            what: "name not allowed",
            allow: "github.test",
            name: "attacker.test",
            qtype: 1,
            rrs: vec![Rr::A("attacker.test", 30, a4("198.51.100.66"))],
            learned: vec![],
        },
        Case {
            what: "suffix of an allowed name is not allowed",
            allow: "api.github.test",
            name: "github.test",
            qtype: 1,
            rrs: vec![Rr::A("github.test", 30, a4("198.51.100.52"))],
            learned: vec![],
        },
        Case {
            what: "allowed name as a label inside another",
            allow: "github.test",
            name: "github.test.attacker.test",
            qtype: 1,
            rrs: vec![Rr::A("github.test.attacker.test", 30, a4("198.51.100.67"))],
            learned: vec![],
        },
        Case {
            what: "zero answers",
            allow: "empty.test",
            name: "empty.test",
            qtype: 1,
            rrs: vec![],
            learned: vec![],
        },
        Case {
            what: "64 records",
            allow: "many.test",
            name: "many.test",
            qtype: 1,
            rrs: (0..64u8)
                .map(|i| Rr::A("many.test", 30, [198, 51, 100, 100 + i]))
                .collect(),
            learned: (0..64u8)
                .map(|i| Box::leak(format!("198.51.100.{}", 100 + i).into_boxed_str()) as &str)
                .collect(),
        },
    ];
    for c in &cases {
        let r = rig(Mode::Block, Mode::Block, c.allow);
        assert_eq!(
            r.resolve(0x2222, c.name, c.qtype, &c.rrs),
            PASS,
            "{}",
            c.what
        );
        let mut want: Vec<IpAddr> = c.learned.iter().map(|s| ip(s)).collect();
        want.sort();
        assert_eq!(r.learned(), want, "{}", c.what);
    }
}

#[test]
fn audit_mode_keeps_unlisted_answers_as_seen_not_allowed() {
    let r = rig(Mode::Audit, Mode::Block, "github.test");
    r.resolve(
        3,
        "attacker.test",
        1,
        &[Rr::A("attacker.test", 30, a4("198.51.100.66"))],
    );
    let v = r.host("198.51.100.66").expect("seen entry");
    assert_eq!(v.flags & abi::ADDR_SEEN, abi::ADDR_SEEN);
    assert_eq!(v.flags & abi::ADDR_LEARNED, 0);
    assert!(r.learned().is_empty());
    // A connection to it is audited as not-allowed (not blocked as a direct IP).
    assert_eq!(r.syn("198.51.100.66", 443), PASS);
    let f = r.flows().pop().unwrap();
    assert_eq!(f.verdict(), abi::rf_verdict::RF_VERDICT_AUDITED);
    assert_eq!(f.reason(), abi::rf_reason::RF_REASON_NOT_ALLOWED);
}

#[test]
fn refresh_keeps_one_entry_and_merges_ports() {
    let r = rig(Mode::Block, Mode::Block, "github.test:443 github.test:22");
    for id in 0..5 {
        r.resolve(
            100 + id,
            "github.test",
            1,
            &[Rr::A("github.test", 30, a4("198.51.100.10"))],
        );
    }
    assert_eq!(r.learned(), vec![ip("198.51.100.10")]);
    let v = r.host("198.51.100.10").unwrap();
    let mut ports: Vec<u16> = v.ports.port[..v.ports.n as usize].to_vec();
    ports.sort();
    assert_eq!(ports, vec![22, 443]);
    assert_eq!(r.syn("198.51.100.10", 22), PASS);
}

#[test]
fn learned_host_inside_listed_cidr_keeps_the_cidr_ports() {
    let r = rig(Mode::Block, Mode::Block, "203.0.113.0/24:8443 cdn.test:443");
    r.resolve(
        5,
        "cdn.test",
        1,
        &[Rr::A("cdn.test", 30, a4("203.0.113.40"))],
    );
    assert_eq!(r.syn("203.0.113.40", 443), PASS);
    assert_eq!(r.syn("203.0.113.40", 8443), PASS);
}

// ---- host entries (the `allow` hash) before CIDRs (the `allow_cidrs` trie) ----------------

/// An exact address with a port list of its own inside a covering CIDR with other ports: the
/// host entry is the longest match, so it decides alone (its ports, not the union), as the
/// one trie that held both used to answer. Without it the CIDR decides again.
#[test]
fn exact_address_inside_a_cidr_longest_match_decides() {
    use abi::rf_reason as R;
    use abi::rf_verdict as V;
    for (allow, host, sibling, outside) in [
        (
            "203.0.113.7:22 203.0.113.0/24:443",
            "203.0.113.7",
            "203.0.113.8",
            "203.0.114.7",
        ),
        (
            "2001:db8:5::7/128:22 2001:db8:5::/48:443",
            "2001:db8:5::7",
            "2001:db8:5::8",
            "2001:db8:6::7",
        ),
    ] {
        let r = rig(Mode::Block, Mode::Block, allow);
        let entries = r.dp().allow_entries();
        assert!(
            entries
                .iter()
                .any(|e| e.addr == ip(host) && e.prefix_bits == abi::LPM_FULL),
            "{allow}: the host entry is listed: {entries:?}"
        );
        assert!(
            entries.iter().any(|e| e.prefix_bits < abi::LPM_FULL),
            "{allow}: the CIDR is listed: {entries:?}"
        );
        let cases = [
            (host, 22, PASS, V::RF_VERDICT_ALLOWED, R::RF_REASON_ALLOWED),
            (
                host,
                443,
                DROP,
                V::RF_VERDICT_BLOCKED,
                R::RF_REASON_NOT_ALLOWED,
            ),
            (
                sibling,
                443,
                PASS,
                V::RF_VERDICT_ALLOWED,
                R::RF_REASON_ALLOWED,
            ),
            (
                sibling,
                22,
                DROP,
                V::RF_VERDICT_BLOCKED,
                R::RF_REASON_NOT_ALLOWED,
            ),
            (
                outside,
                443,
                DROP,
                V::RF_VERDICT_BLOCKED,
                R::RF_REASON_DIRECT_IP,
            ),
        ];
        for (dst, port, rc, verdict, reason) in cases {
            assert_eq!(r.syn(dst, port), rc, "{allow}: {dst} port {port}");
            let f = r.flows();
            assert_eq!(f.len(), 1, "{allow}: {dst} port {port}: one event");
            assert_eq!(
                (f[0].verdict, f[0].reason),
                (verdict.0 as u8, reason.0 as u8),
                "{allow}: {dst} port {port}"
            );
        }
        // The host entry gone (as the agent expires a learned one): the CIDR decides for it.
        r.dp().delete_host_entry(JOB, ip(host)).unwrap();
        assert!(r.host(host).is_none());
        assert_eq!(r.syn(host, 443), PASS, "{allow}: {host} 443 by the CIDR");
        assert_eq!(r.syn(host, 22), DROP, "{allow}: {host} 22 no longer");
    }
}

/// A learned address inside a CIDR inherits the CIDR's ports in the host entry, bound by the
/// kernel (an answer) or by userspace (a TCP answer the agent reassembled), and keeps them
/// when the answer is refreshed; a learned address outside has only the name's ports.
#[test]
fn learned_host_entries_inherit_from_the_cidr_in_both_binders() {
    let r = rig(Mode::Block, Mode::Block, "203.0.113.0/24:8443 cdn.test:443");
    let ports = |a: &str| {
        let v = r.host(a).expect("a host entry");
        let mut p: Vec<u16> = v.ports.port[..v.ports.n as usize].to_vec();
        p.sort();
        (v.ports.any, p)
    };
    for id in 0..2 {
        r.resolve(
            20 + id,
            "cdn.test",
            1,
            &[
                Rr::A("cdn.test", 30, a4("203.0.113.40")),
                Rr::A("cdn.test", 30, a4("198.51.100.40")),
            ],
        );
        assert_eq!(ports("203.0.113.40"), (0, vec![443, 8443]));
        assert_eq!(ports("198.51.100.40"), (0, vec![443]));
    }
    let expires = r.host("203.0.113.40").unwrap().expires_ns;
    assert!(r
        .dp()
        .bind_learned(
            JOB,
            ip("203.0.113.41"),
            &PortSet::Ports([443].into()),
            expires
        )
        .unwrap());
    assert_eq!(ports("203.0.113.41"), (0, vec![443, 8443]));
    assert_eq!(r.syn("203.0.113.41", 443), PASS);
    assert_eq!(r.syn("203.0.113.41", 8443), PASS);
    assert_eq!(r.syn("203.0.113.41", 22), DROP);
    assert_eq!(r.syn("198.51.100.40", 8443), DROP);
}

// ---- answers that must bind nothing ------------------------------------------------------

fn allowed_answer() -> Vec<u8> {
    dns_answer(
        0x4242,
        "github.test",
        1,
        &[Rr::A("github.test", 30, a4("198.51.100.10"))],
    )
}

#[test]
fn unmatched_answers_bind_nothing() {
    let r = rig(Mode::Block, Mode::Block, "github.test");
    // No query at all
    assert_eq!(r.answer_to(33333, &allowed_answer(), false), PASS);
    // A query with another transaction id
    let port = r.query(0x9999, "github.test", 1);
    assert_eq!(r.answer_to(port, &allowed_answer(), false), PASS);
    // The right id but another question name than was asked
    let port = r.query(0x4242, "other.test", 1);
    assert_eq!(r.answer_to(port, &allowed_answer(), false), PASS);
    // From a server that was not asked
    let port = r.query(0x4242, "github.test", 1);
    let f = frame(
        ip("203.0.113.53"),
        ip(CLIENT),
        17,
        53,
        port,
        0,
        &allowed_answer(),
    );
    assert_eq!(r.ingress(&f), PASS);
    assert!(r.learned().is_empty());
    assert!(r.counter(abi::rf_counter::RF_CNT_DNS_UNMATCHED) >= 2);
    // ...and the same answer to the right query does bind: the cases above were real.
    assert_eq!(r.answer_to(port, &allowed_answer(), false), PASS);
    assert_eq!(r.learned(), vec![ip("198.51.100.10")]);
}

#[test]
fn malformed_answers_bind_nothing_and_pass() {
    let good = allowed_answer();
    let qend = 12 + testrun::wire("github.test").len() + 1 + 4;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push((
        "truncated inside the record",
        good[..good.len() - 2].to_vec(),
    ));
    cases.push(("truncated inside the question", good[..16].to_vec()));
    let mut m = good.clone();
    m[qend] = 0xc0;
    m[qend + 1] = 0xff; // pointer past the end (and forward)
    cases.push(("pointer forward", m));
    let mut m = good.clone();
    m[qend] = 0xc0;
    m[qend + 1] = qend as u8; // pointer to itself: a loop if followed
    cases.push(("pointer loop", m));
    let mut m = good.clone();
    m[qend] = 0xc0;
    m[qend + 1] = 3; // into the header
    cases.push(("pointer into the header", m));
    let mut m = good.clone();
    m[qend] = 0x3f; // a label running past the packet
    m[qend + 1] = b'a';
    cases.push(("label past the end", m));
    let mut m = good.clone();
    let rdlen = qend + 2 + 2 + 2 + 4;
    m[rdlen + 1] = 5; // A record with rdlength 5
    cases.push(("A with bad rdlength", m));
    let mut m = good.clone();
    m[7] = 3; // ancount 3, only 1 present
    cases.push(("answer count beyond the data", m));
    let mut m = good.clone();
    m[2] &= 0x7f; // QR=0: a query, not an answer
    cases.push(("not a response", m));
    let mut m = good.clone();
    m[5] = 2; // qdcount 2
    cases.push(("two questions", m));
    let mut m = good.clone();
    m[12] = 0xc0; // compression in the question
    cases.push(("compressed question", m));

    for (what, msg) in &cases {
        let r = rig(Mode::Block, Mode::Block, "github.test");
        let port = r.query(0x4242, "github.test", 1);
        assert_eq!(r.answer_to(port, msg, false), PASS, "{what}: never dropped");
        assert!(r.learned().is_empty(), "{what}: nothing bound");
    }
}

#[test]
fn hash_collision_binds_nothing() {
    // Plant an entry whose hash is that of attacker.test but whose stored name is
    // github.test, as a crafted 64-bit collision would look. The byte-by-byte check
    // must refuse it.
    let r = rig(Mode::Block, Mode::Block, "github.test");
    let mut compiled = Policy {
        mode: Mode::Block,
        direct_ip: Mode::Block,
        dns_resolvers: vec![],
        endpoints: Policy::parse_endpoints("github.test", "test").unwrap(),
        dns_filter: true,
        ..Policy::default()
    }
    .compile()
    .unwrap();
    let evil = ringfence::policy::name_hash(&ringfence::policy::wire_name("attacker.test"));
    compiled.names[0].hash = evil;
    compiled.prefixes.clear();
    let mut r = r;
    r.dp.as_mut()
        .unwrap()
        .install_policy(JOB, &compiled, &[])
        .unwrap();
    r.resolve(
        9,
        "attacker.test",
        1,
        &[Rr::A("attacker.test", 30, a4("198.51.100.66"))],
    );
    assert!(r.learned().is_empty());
}

#[test]
fn fragmented_answers_are_counted_not_parsed() {
    let r = rig(Mode::Block, Mode::Block, "github.test");
    let port = r.query(0x4242, "github.test", 1);
    let mut udp = Vec::new();
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&((8 + allowed_answer().len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&allowed_answer());
    // More-fragments set: the first fragment of a datagram.
    let f = testrun::ip_frame(ip(RESOLVER), ip(CLIENT), 17, &udp, 0x2000);
    assert_eq!(r.ingress(&f), PASS);
    assert!(r.learned().is_empty());
    assert_eq!(r.counter(abi::rf_counter::RF_CNT_DNS_FRAGMENT), 1);
}

#[test]
fn random_mutations_never_bind_a_name_that_is_not_allowed() {
    // A small deterministic fuzz: mutate answers for a name that is NOT allowed. Whatever
    // the bytes, the program must pass the packet and bind nothing.
    let r = rig(Mode::Block, Mode::Block, "github.test");
    let base = dns_answer(
        0x5151,
        "attacker.test",
        1,
        &[
            Rr::Cname("attacker.test", 5, "github.test"),
            Rr::A("github.test", 30, a4("198.51.100.10")),
            Rr::Aaaa("github.test", 30, a6("2001:db8:2::10")),
        ],
    );
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..1500 {
        let port = r.query(0x5151, "attacker.test", 1);
        let mut m = base.clone();
        for _ in 0..(1 + rnd() % 6) {
            let at = (rnd() as usize) % m.len();
            // Keep the id and the question intact half of the time so parsing goes deep.
            if i % 2 == 0 && at < 12 + 15 {
                continue;
            }
            m[at] = rnd() as u8;
        }
        if rnd() % 4 == 0 {
            let cut = (rnd() as usize) % m.len();
            m.truncate(cut.max(12));
        }
        assert_eq!(r.answer_to(port, &m, false), PASS);
    }
    assert!(r.learned().is_empty(), "learned {:?}", r.learned());
}

// ---- query filtering ---------------------------------------------------------------------

/// Runs the egress program and returns its return code and the packet as it left.
fn egress_out(r: &Rig, f: &[u8]) -> (i32, Vec<u8>) {
    testrun::run_tc_output(r.dp().egress_prog(), f, LO).unwrap()
}

const TC_ACT_REDIRECT: i32 = 7;

/// The ones' complement sum of the L4 pseudo-header and segment of `f` (Ethernet frame).
fn l4_sum(f: &[u8], v6: bool, proto: u8) -> u16 {
    let l4 = if v6 { 14 + 40 } else { 14 + 20 };
    let mut data = Vec::new();
    if v6 {
        data.extend_from_slice(&f[14 + 8..14 + 40]);
        data.extend_from_slice(&((f.len() - l4) as u32).to_be_bytes());
        data.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        data.extend_from_slice(&f[14 + 12..14 + 20]);
        data.extend_from_slice(&[0, proto]);
        data.extend_from_slice(&((f.len() - l4) as u16).to_be_bytes());
    }
    data.extend_from_slice(&f[l4..]);
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Fills in a correct UDP/TCP checksum, as the stack does without offload.
fn set_l4_checksum(f: &mut [u8], v6: bool, proto: u8) {
    let l4 = if v6 { 14 + 40 } else { 14 + 20 };
    let at = l4 + if proto == 6 { 16 } else { 6 };
    f[at..at + 2].copy_from_slice(&[0, 0]);
    let c = !l4_sum(f, v6, proto);
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn l4_checksum_ok(f: &[u8], v6: bool, proto: u8) -> bool {
    l4_sum(f, v6, proto) == 0xffff
}

/// A refused SYN-ACK leaves as the RST|ACK a closed port answers with (flags and window
/// rewritten, checksum kept right, sequence and acknowledgement kept), the first one and a
/// retransmitted one alike: which ports the job listens on cannot be read by an unlisted peer.
#[test]
fn refused_syn_ack_goes_out_as_a_reset() {
    for v6 in [false, true] {
        let r = rig_inbound(Mode::Block, "", "");
        let (src, dst) = if v6 {
            (CLIENT6, "2001:db8:3::9")
        } else {
            (CLIENT, PEER)
        };
        let mut f = frame(ip(src), ip(dst), 6, 8080, 40000, SYN_ACK, &[]);
        set_l4_checksum(&mut f, v6, 6);
        let l4 = if v6 { 14 + 40 } else { 14 + 20 };
        for round in 0..2 {
            let (rc, out) = egress_out(&r, &f);
            assert_eq!(rc, PASS, "v6={v6} round {round}: the RST goes out");
            assert_eq!(out.len(), f.len());
            assert_eq!(out[l4 + 13], 0x14, "v6={v6} round {round}: RST|ACK");
            assert_eq!(out[l4 + 12] & 0xf0, f[l4 + 12] & 0xf0, "data offset kept");
            assert_eq!(&out[l4 + 14..l4 + 16], &[0, 0], "zero window");
            assert_eq!(
                &out[..l4 + 12],
                &f[..l4 + 12],
                "addresses, ports, seq, ack kept"
            );
            assert!(
                l4_checksum_ok(&out, v6, 6),
                "v6={v6} round {round}: checksum"
            );
        }
        let flows = r.flows();
        assert_eq!(flows.len(), 1, "v6={v6}: one event");
        assert_eq!(
            (flows[0].verdict(), flows[0].reason(), flows[0].direction()),
            (
                abi::rf_verdict::RF_VERDICT_BLOCKED,
                abi::rf_reason::RF_REASON_INBOUND,
                abi::rf_direction::RF_DIR_INBOUND
            )
        );
        // Audit mode leaves the SYN-ACK as it is.
        let r = rig_inbound(Mode::Audit, "", "");
        let (rc, out) = egress_out(&r, &f);
        assert_eq!(
            (rc, out),
            (PASS, f.clone()),
            "v6={v6}: audit passes it unchanged"
        );
    }
}

#[test]
fn unlisted_query_is_answered_refused_in_block_mode() {
    for v6 in [false, true] {
        let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
        let (src, dst) = if v6 {
            (CLIENT6, RESOLVER6)
        } else {
            (CLIENT, RESOLVER)
        };
        let q = dns_query(0x7777, "s3cr3t.attacker.test", 1);
        let mut f = frame(ip(src), ip(dst), 17, 40123, 53, 0, &q);
        // Give the UDP header a real checksum, as the stack would without offload.
        let l4 = if v6 { 14 + 40 } else { 14 + 20 };
        set_l4_checksum(&mut f, v6, 17);

        let (rc, out) = egress_out(&r, &f);
        assert_eq!(rc, TC_ACT_REDIRECT, "v6={v6}: turned around, not sent");
        // MACs, addresses and ports swapped
        assert_eq!(&out[0..6], &f[6..12]);
        assert_eq!(&out[6..12], &f[0..6]);
        let (sa, da) = if v6 {
            (14 + 8, 14 + 24)
        } else {
            (14 + 12, 14 + 16)
        };
        let alen = if v6 { 16 } else { 4 };
        assert_eq!(&out[sa..sa + alen], &f[da..da + alen]);
        assert_eq!(&out[da..da + alen], &f[sa..sa + alen]);
        assert_eq!(&out[l4..l4 + 2], &53u16.to_be_bytes());
        assert_eq!(&out[l4 + 2..l4 + 4], &40123u16.to_be_bytes());
        // QR set, RCODE REFUSED, same id and question
        let dns = &out[l4 + 8..];
        assert_eq!(&dns[0..2], &0x7777u16.to_be_bytes());
        assert_eq!(dns[2] & 0x80, 0x80);
        assert_eq!(dns[3] & 0x0f, 5);
        assert_eq!(&dns[12..], &q[12..]);
        // The UDP checksum still holds over the rewritten datagram.
        assert!(l4_checksum_ok(&out, v6, 17), "v6={v6}: checksum");
        // Reported with the name, counted
        let copies: Vec<_> = r
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Dns(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(copies.len(), 1);
        assert_eq!(
            copies[0].flags & (abi::DNS_QUERY | abi::DNS_REFUSED),
            abi::DNS_QUERY | abi::DNS_REFUSED
        );
        assert_eq!(r.counter(abi::rf_counter::RF_CNT_DNS_REFUSED), 1);
    }
}

#[test]
fn allowed_queries_and_audit_mode_go_through() {
    let r = rig_with(Mode::Block, Mode::Block, "github.test *.npm.test", true);
    for name in ["github.test", "GITHUB.test", "a.b.npm.test"] {
        let q = dns_query(1, name, 1);
        let (rc, _) = egress_out(
            &r,
            &frame(ip(CLIENT), ip(RESOLVER), 17, r.port(), 53, 0, &q),
        );
        assert_eq!(rc, PASS, "{name}");
    }
    // Audit mode reports the unlisted query but sends it.
    let r = rig_with(Mode::Audit, Mode::Block, "github.test", true);
    let q = dns_query(2, "attacker.test", 1);
    let (rc, _) = egress_out(&r, &frame(ip(CLIENT), ip(RESOLVER), 17, 40200, 53, 0, &q));
    assert_eq!(rc, PASS);
    let flags: Vec<u32> = r
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Dns(d) => Some(d.flags),
            _ => None,
        })
        .collect();
    assert_eq!(flags, vec![abi::DNS_QUERY]);
    // dns-policy = "any" in block mode: sent too.
    let r = rig_with(Mode::Block, Mode::Block, "github.test", false);
    let (rc, _) = egress_out(&r, &frame(ip(CLIENT), ip(RESOLVER), 17, 40201, 53, 0, &q));
    assert_eq!(rc, PASS);
}

// ---- DNS over TCP -------------------------------------------------------------------------

const PSH_ACK: u8 = 0x18;

#[test]
fn tcp_answer_in_one_segment_binds() {
    let r = rig_with(Mode::Block, Mode::Block, "github.test:443", true);
    let sport = r.port();
    // The connection to the resolver, then the query in one segment.
    assert_eq!(r.egress(&syn_to_resolver(sport, 99)), PASS);
    let q = testrun::tcp_dns(&dns_query(0x3131, "github.test", 1));
    let seg = testrun::tcp_frame(
        ip(CLIENT),
        ip(RESOLVER),
        sport,
        53,
        100,
        500,
        PSH_ACK,
        &[],
        &q,
    );
    assert_eq!(r.egress(&seg), PASS);
    let a = testrun::tcp_dns(&dns_answer(
        0x3131,
        "github.test",
        1,
        &[Rr::A("github.test", 30, a4("198.51.100.10"))],
    ));
    let seg = testrun::tcp_frame(
        ip(RESOLVER),
        ip(CLIENT),
        53,
        sport,
        500,
        100 + q.len() as u32,
        PSH_ACK,
        &[],
        &a,
    );
    assert_eq!(r.ingress(&seg), PASS);
    assert_eq!(r.learned(), vec![ip("198.51.100.10")]);
    assert_eq!(r.syn("198.51.100.10", 443), PASS);
}

#[test]
fn tcp_answer_split_across_segments_is_counted_not_parsed() {
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let sport = r.port();
    let q = testrun::tcp_dns(&dns_query(0x3232, "github.test", 1));
    assert_eq!(r.egress(&syn_to_resolver(sport, 99)), PASS);
    assert_eq!(
        r.egress(&testrun::tcp_frame(
            ip(CLIENT),
            ip(RESOLVER),
            sport,
            53,
            100,
            500,
            PSH_ACK,
            &[],
            &q
        )),
        PASS
    );
    let a = testrun::tcp_dns(&dns_answer(
        0x3232,
        "github.test",
        1,
        &[Rr::A("github.test", 30, a4("198.51.100.10"))],
    ));
    let first = &a[..a.len() - 6];
    let seg = testrun::tcp_frame(
        ip(RESOLVER),
        ip(CLIENT),
        53,
        sport,
        500,
        100,
        PSH_ACK,
        &[],
        first,
    );
    assert_eq!(r.ingress(&seg), PASS);
    assert!(r.learned().is_empty());
    assert_eq!(r.counter(abi::rf_counter::RF_CNT_DNS_TCP_SPLIT), 1);
}

#[test]
fn unlisted_tcp_query_is_answered_refused() {
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let q = testrun::tcp_dns(&dns_query(0x3333, "leak.attacker.test", 1));
    // NOP NOP TS(TSval=0x11111111, TSecr=0x22222222)
    let opts = [1, 1, 8, 10, 0x11, 0x11, 0x11, 0x11, 0x22, 0x22, 0x22, 0x22];
    assert_eq!(r.egress(&syn_to_resolver(40999, 999)), PASS);
    let mut seg = testrun::tcp_frame(
        ip(CLIENT),
        ip(RESOLVER),
        40999,
        53,
        1000,
        7000,
        PSH_ACK,
        &opts,
        &q,
    );
    set_l4_checksum(&mut seg, false, 6);
    let (rc, out) = egress_out(&r, &seg);
    assert_eq!(rc, TC_ACT_REDIRECT);
    let l4 = 14 + 20;
    assert_eq!(&out[14 + 12..14 + 16], &a4(RESOLVER));
    assert_eq!(&out[14 + 16..14 + 20], &a4(CLIENT));
    assert_eq!(&out[l4..l4 + 2], &53u16.to_be_bytes());
    assert_eq!(&out[l4 + 2..l4 + 4], &40999u16.to_be_bytes());
    assert_eq!(
        &out[l4 + 4..l4 + 8],
        &7000u32.to_be_bytes(),
        "seq = what the client acked"
    );
    assert_eq!(
        &out[l4 + 8..l4 + 12],
        &(1000 + q.len() as u32).to_be_bytes(),
        "ack covers the query"
    );
    assert_eq!(out[l4 + 13], PSH_ACK);
    assert_eq!(
        &out[l4 + 24..l4 + 32],
        &[0x22, 0x22, 0x22, 0x22, 0x11, 0x11, 0x11, 0x11],
        "timestamps swapped"
    );
    let dns = &out[l4 + 32 + 2..];
    assert_eq!(dns[2] & 0x80, 0x80);
    assert_eq!(dns[3] & 0x0f, 5);
    assert_eq!(&dns[12..], &q[2 + 12..]);
    assert!(
        l4_checksum_ok(&out, false, 6),
        "TCP checksum after the rewrite"
    );
    assert_eq!(r.counter(abi::rf_counter::RF_CNT_DNS_REFUSED), 1);
}

// ---- learned-state lifetime --------------------------------------------------------------

#[test]
fn a_live_flow_outlives_its_expired_address() {
    let r = rig(Mode::Block, Mode::Block, "github.test:443");
    r.resolve(
        0x6161,
        "github.test",
        1,
        &[Rr::A("github.test", 1, a4("198.51.100.10"))],
    );
    let syn = frame(ip(CLIENT), ip("198.51.100.10"), 6, 42424, 443, TCP_SYN, &[]);
    let data = frame(
        ip(CLIENT),
        ip("198.51.100.10"),
        6,
        42424,
        443,
        TCP_ACK,
        b"GET /",
    );
    assert_eq!(r.egress(&syn), PASS);
    // What the agent does when TTL and grace have run out.
    r.dp().delete_host_entry(JOB, ip("198.51.100.10")).unwrap();
    // The established flow goes on: its verdict lives in the flow table.
    for _ in 0..5 {
        assert_eq!(r.egress(&data), PASS);
    }
    // A new connection needs a fresh answer.
    assert_eq!(r.syn("198.51.100.10", 443), DROP);
}

#[test]
fn a_full_trie_fails_closed_and_counts() {
    // A dataplane of its own: a trie of 4 entries (the pool's are full size).
    let mut dp = Dataplane::load(&Options {
        capacity: ringfence::kernel::capacity::Capacity {
            static_addresses: 2,
            learned_addresses: 2,
            ..Default::default()
        },
        ..Options::default()
    })
    .unwrap();
    dp.reset().unwrap();
    let policy = Policy {
        mode: Mode::Block,
        direct_ip: Mode::Block,
        dns_resolvers: vec![ip(RESOLVER)],
        endpoints: Policy::parse_endpoints("many.test:443", "test").unwrap(),
        ..Policy::default()
    };
    dp.install_policy(JOB, &policy.compile().unwrap(), &policy.dns_resolvers)
        .unwrap();
    dp.add_interface_job(LO, abi::rf_job::for_policy(JOB, &policy))
        .unwrap();
    let mut r = Rig {
        dp: Some(dp),
        next_port: std::cell::Cell::new(45000),
    };
    let rrs: Vec<Rr<'_>> = (0..8u8)
        .map(|i| Rr::A("many.test", 30, [198, 51, 100, 100 + i]))
        .collect();
    assert_eq!(r.resolve(0x7171, "many.test", 1, &rrs), PASS);
    let bound = r.learned().len();
    assert_eq!(bound, 4, "the trie holds what fits");
    assert!(r.counter(abi::rf_counter::RF_CNT_TRIE_FULL) >= 4);
    // What did not fit stays blocked; nothing in use was evicted to make room.
    assert_eq!(r.syn("198.51.100.107", 443), DROP);
    assert_eq!(r.syn("198.51.100.100", 443), PASS);
    // The answer's copy says so, and the agent puts it in that job's report.
    let raw = RefCell::new(Vec::new());
    let map = r.dp().events_map().unwrap();
    let mut b = libbpf_rs::RingBufferBuilder::new();
    b.add(&map, |d: &[u8]| {
        raw.borrow_mut().push(d.to_vec());
        0
    })
    .unwrap();
    b.build().unwrap().consume().unwrap();
    let raw = raw.into_inner();
    let copies: Vec<abi::rf_dns_event> = raw
        .iter()
        .filter_map(|d| abi::from_bytes::<abi::rf_event_hdr>(d).map(|h| (h, d)))
        .filter(|(h, _)| abi::rf_event_type(h.r#type) != abi::rf_event_type::RF_EVENT_FLOW)
        .filter_map(|(_, d)| abi::from_bytes(d))
        .collect();
    assert_eq!(copies[0].flags & abi::DNS_TRIE_FULL, abi::DNS_TRIE_FULL);
    let mut agent =
        ringfence::agent::Agent::new(None, std::time::Duration::ZERO, std::time::Duration::ZERO)
            .unwrap();
    agent.start_job(
        JOB,
        ringfence::agent::JobState::new("full", "block", None),
        vec![],
        &policy,
    );
    raw.iter().for_each(|d| agent.handle(d));
    let report = agent.jobs[&JOB]
        .report
        .render(ringfence::trail::report::Format::Text);
    assert!(
        report.contains("the learned-address map (allow) was full"),
        "{report}"
    );
    // A policy loaded into a trie the learned addresses filled names the setting to raise.
    let more = Policy {
        endpoints: Policy::parse_endpoints("203.0.113.0/24", "--allow").unwrap(),
        ..Policy::default()
    };
    let err =
        r.dp.as_mut()
            .unwrap()
            .install_policy(JOB + 1, &more.compile().unwrap(), &[])
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("map allow is full (4 entries") && err.contains("max-learned-addresses"),
        "{err}"
    );
    // Not back to the pool: its trie is too small for the other tests.
    drop(r.dp.take());
}

/// Every field of struct rf_config that Dataplane::load sets reaches the programs: a learned
/// address lives max(TTL, dns-min-ttl) + dns-grace, no record is written with events off,
/// and with always_judge the flow cache is skipped.
#[test]
fn settings_reach_the_programs() {
    let mut dp = Dataplane::load(&Options {
        dns_min_ttl: std::time::Duration::from_secs(600),
        dns_grace: std::time::Duration::from_secs(7),
        emit_events: false,
        always_judge: true,
        ..Options::default()
    })
    .unwrap();
    dp.reset().unwrap();
    let policy = Policy {
        mode: Mode::Block,
        direct_ip: Mode::Block,
        dns_resolvers: vec![ip(RESOLVER)],
        endpoints: Policy::parse_endpoints("github.test:443", "test").unwrap(),
        ..Policy::default()
    };
    dp.install_policy(JOB, &policy.compile().unwrap(), &policy.dns_resolvers)
        .unwrap();
    dp.add_interface_job(LO, abi::rf_job::for_policy(JOB, &policy))
        .unwrap();
    let mut r = Rig {
        dp: Some(dp),
        next_port: std::cell::Cell::new(46000),
    };
    let before = ringfence::agent::boottime_ns();
    let rrs = [Rr::A("github.test", 30, a4("198.51.100.10"))];
    assert_eq!(r.resolve(0x2323, "github.test", 1, &rrs), PASS);
    let after = ringfence::agent::boottime_ns();
    // 600 s (the minimum, over the answer's 30) + 7 s of grace; swapped fields give 630.
    let life = 607_000_000_000;
    let exp = r.host("198.51.100.10").expect("bound").expires_ns;
    assert!(
        (before + life..=after + life).contains(&exp),
        "expires {exp}, want {before}+{life}..{after}+{life}"
    );
    // One flow, two packets: both judged as new (the cache is skipped), both allowed.
    let new_flows = r.counter(abi::rf_counter::RF_CNT_NEW_FLOWS);
    let syn = frame(ip(CLIENT), ip("198.51.100.10"), 6, 41000, 443, TCP_SYN, &[]);
    assert_eq!((r.egress(&syn), r.egress(&syn)), (PASS, PASS));
    assert_eq!(r.counter(abi::rf_counter::RF_CNT_NEW_FLOWS), new_flows + 2);
    assert!(r.events().is_empty(), "events off: no record");
    // Not back to the pool: its settings are not the other tests'.
    drop(r.dp.take());
}

#[test]
fn encrypted_dns_to_unlisted_resolvers_is_a_direct_ip() {
    // DoT (853) and DoH (443) bypass the resolver pinning of port 53: they are blocked like
    // any address no answer produced, in audit mode too, unless the resolver is listed.
    let cases = [
        (Mode::Audit, "github.test", "203.0.113.53", 853, DROP),
        (Mode::Block, "github.test", "2001:db8:53::1", 443, DROP),
        (Mode::Block, "203.0.113.53:443", "203.0.113.53", 443, PASS),
    ];
    for (mode, allow, dst, port, rc) in cases {
        let r = rig(mode, Mode::Block, allow);
        assert_eq!(r.syn(dst, port), rc, "{allow} -> {dst}:{port}");
        let f = r.flows().pop().unwrap();
        let want = if rc == PASS {
            abi::rf_reason::RF_REASON_ALLOWED
        } else {
            abi::rf_reason::RF_REASON_DIRECT_IP
        };
        assert_eq!(f.reason(), want, "{allow} -> {dst}:{port}");
    }
}

#[test]
fn answers_with_more_addresses_than_the_kernel_binds_are_flagged() {
    let r = rig(Mode::Block, Mode::Block, "wide.test");
    let rrs: Vec<Rr<'_>> = (0..100u8)
        .map(|i| Rr::A("wide.test", 30, [198, 51, 100, i]))
        .collect();
    assert_eq!(r.resolve(0x8181, "wide.test", 1, &rrs), PASS);
    assert_eq!(r.learned().len(), abi::DNS_ADDRS_MAX);
    assert_eq!(r.counter(abi::rf_counter::RF_CNT_DNS_OVERFLOW), 1);
    let copy = r
        .events()
        .into_iter()
        .find_map(|e| match e {
            Ev::Dns(d) => Some(d),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        copy.flags & abi::DNS_OVERFLOW,
        abi::DNS_OVERFLOW,
        "the agent is told to bind the rest"
    );
}

/// The SYN of a TCP connection to the resolver with initial sequence number `isn`: the
/// egress program follows the stream's bytes from `isn + 1`.
fn syn_to_resolver(sport: u16, isn: u32) -> Vec<u8> {
    testrun::tcp_frame(
        ip(CLIENT),
        ip(RESOLVER),
        sport,
        53,
        isn,
        0,
        TCP_SYN,
        &[],
        &[],
    )
}

// ---- DNS queries fail closed: what cannot be judged is refused or dropped, and reported ----

/// A query built by hand: `flags` is the header's second and third byte (QR, opcode, RD…),
/// `counts` QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT, `body` what follows the header.
fn raw_query(id: u16, flags: u16, counts: [u16; 4], body: &[u8]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        m.extend_from_slice(&c.to_be_bytes());
    }
    m.extend_from_slice(body);
    m
}

/// One question: `name` in wire form, type A, class IN.
fn question(name: &str) -> Vec<u8> {
    let mut q = testrun::wire(name);
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The DNS copies the kernel reported since the last call, as their flags.
fn dns_copy_flags(r: &Rig) -> Vec<u32> {
    r.events()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Dns(d) => Some(d.flags),
            _ => None,
        })
        .collect()
}

#[test]
fn udp_queries_that_cannot_be_judged_are_refused_or_dropped() {
    let allowed = question("github.test");
    // A name that ends in a compression pointer (to offset 12: the name itself).
    let mut pointer = testrun::wire("x");
    pointer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let mut long_label = vec![64u8];
    long_label.extend_from_slice(&[b'a'; 64]);
    long_label.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut two = question("github.test");
    two.extend_from_slice(&question("leak.attacker.test"));
    // (A datagram larger than the parser's limit does not fit BPF_PROG_TEST_RUN's page:
    // tests/escape_dns.rs sends one.)
    let refused = TC_ACT_REDIRECT;
    struct Row {
        what: &'static str,
        msg: Vec<u8>,
        block: i32,
    }
    let rows = [
        Row {
            what: "QR=1 (an answer sent to a resolver)",
            msg: raw_query(1, 0x8100, [1, 0, 0, 0], &allowed),
            block: refused,
        },
        Row {
            what: "opcode 5 (UPDATE)",
            msg: raw_query(2, 0x2800, [1, 0, 0, 0], &allowed),
            block: refused,
        },
        Row {
            what: "opcode 2 (STATUS)",
            msg: raw_query(3, 0x1000, [1, 0, 0, 0], &allowed),
            block: refused,
        },
        Row {
            what: "two questions, the second not allowed",
            msg: raw_query(4, 0x0100, [2, 0, 0, 0], &two),
            block: refused,
        },
        Row {
            what: "no question",
            msg: raw_query(5, 0x0100, [0, 0, 0, 0], &[]),
            block: refused,
        },
        Row {
            what: "an answer record in a query",
            msg: raw_query(6, 0x0100, [1, 1, 0, 0], &allowed),
            block: refused,
        },
        Row {
            what: "an authority record in a query",
            msg: raw_query(7, 0x0100, [1, 0, 1, 0], &allowed),
            block: refused,
        },
        Row {
            what: "a question name ending in a compression pointer",
            msg: raw_query(8, 0x0100, [1, 0, 0, 0], &pointer),
            block: refused,
        },
        Row {
            what: "a label longer than 63 bytes",
            msg: raw_query(9, 0x0100, [1, 0, 0, 0], &long_label),
            block: refused,
        },
        Row {
            what: "a question cut short (no type and class)",
            msg: raw_query(10, 0x0100, [1, 0, 0, 0], &testrun::wire("github.test")),
            block: refused,
        },
        Row {
            what: "shorter than a header",
            msg: vec![0x12, 0x34, 0x01, 0x00, 0, 1],
            block: DROP,
        },
    ];
    for mode in [Mode::Block, Mode::Audit] {
        for row in &rows {
            let r = rig_with(mode, Mode::Block, "github.test", true);
            let f = frame(ip(CLIENT), ip(RESOLVER), 17, r.port(), 53, 0, &row.msg);
            let (rc, _) = egress_out(&r, &f);
            let (want, flags) = if mode == Mode::Block {
                let refused = if row.block == refused {
                    abi::DNS_REFUSED
                } else {
                    0
                };
                (row.block, abi::DNS_QUERY | abi::DNS_UNJUDGED | refused)
            } else {
                (PASS, abi::DNS_QUERY | abi::DNS_UNJUDGED)
            };
            assert_eq!(rc, want, "{mode:?}: {}", row.what);
            assert_eq!(dns_copy_flags(&r), vec![flags], "{mode:?}: {}", row.what);
            assert_eq!(
                r.counter(abi::rf_counter::RF_CNT_DNS_UNJUDGED),
                1,
                "{mode:?}: {}",
                row.what
            );
        }
    }
}

#[test]
fn udp_query_fragments_and_short_datagrams_are_dropped() {
    let q = dns_query(0x5151, "leak.attacker.test", 1);
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&((8 + q.len() + 1000) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&q);
    // The first fragment (more-fragments set) carries the name; the rest would follow.
    let first = testrun::ip_frame(ip(CLIENT), ip(RESOLVER), 17, &udp, 0x2000);
    // A datagram whose UDP length claims more than it holds.
    let short = testrun::ip_frame(ip(CLIENT), ip(RESOLVER), 17, &udp, 0);
    for (what, f) in [("first fragment", &first), ("short datagram", &short)] {
        let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
        assert_eq!(r.egress(f), DROP, "{what}");
        assert_eq!(
            dns_copy_flags(&r),
            vec![abi::DNS_QUERY | abi::DNS_UNJUDGED],
            "{what}"
        );
        let r = rig_with(Mode::Audit, Mode::Block, "github.test", true);
        assert_eq!(r.egress(f), PASS, "audit: {what}");
        assert_eq!(
            dns_copy_flags(&r),
            vec![abi::DNS_QUERY | abi::DNS_UNJUDGED],
            "audit: {what}"
        );
    }
}

/// A TCP connection from the client to the resolver, segment by segment.
struct TcpConn<'a> {
    r: &'a Rig,
    sport: u16,
    seq: u32,
}

impl<'a> TcpConn<'a> {
    /// Opens the stream with a SYN (ISN 1000).
    fn open(r: &'a Rig) -> Self {
        let sport = r.port();
        assert_eq!(r.egress(&syn_to_resolver(sport, 1000)), PASS, "the SYN");
        TcpConn {
            r,
            sport,
            seq: 1001,
        }
    }

    /// A segment carrying `bytes` at sequence number `seq` (the stream does not move).
    fn at(&self, seq: u32, bytes: &[u8]) -> i32 {
        self.r.egress(&testrun::tcp_frame(
            ip(CLIENT),
            ip(RESOLVER),
            self.sport,
            53,
            seq,
            1,
            PSH_ACK,
            &[],
            bytes,
        ))
    }

    /// The next segment of the stream.
    fn send(&mut self, bytes: &[u8]) -> i32 {
        let rc = self.at(self.seq, bytes);
        self.seq = self.seq.wrapping_add(bytes.len() as u32);
        rc
    }
}

fn tcp_q(id: u16, name: &str) -> Vec<u8> {
    testrun::tcp_dns(&dns_query(id, name, 1))
}

#[test]
fn tcp_query_table() {
    // Dropped, and the client's socket reset (the segment turned around as a RST).
    const RESET: i32 = TC_ACT_REDIRECT;
    const Q: u32 = abi::DNS_QUERY | abi::DNS_TCP;
    const UNJ: u32 = abi::DNS_QUERY | abi::DNS_TCP | abi::DNS_UNJUDGED;
    let ok = tcp_q(1, "github.test");
    let bad = tcp_q(2, "leak.attacker.test");
    let cat = |a: &[u8], b: &[u8]| [a, b].concat();
    let many: Vec<u8> = (0..40)
        .flat_map(|i| tcp_q(100 + i, "github.test"))
        .collect();
    // A message claiming 5,000 bytes: its allowed question is whole in the first segment.
    let mut huge = 5000u16.to_be_bytes().to_vec();
    huge.extend_from_slice(&dns_query(3, "github.test", 1));
    huge.resize(1000, 0);
    let runt = [0u8, 4, 1, 2, 3, 4];
    struct Row {
        what: &'static str,
        /// Segments sent in order on one stream, and what each should get in block mode.
        segs: Vec<(Vec<u8>, i32)>,
        /// The DNS copies reported in block mode.
        copies: Vec<u32>,
    }
    let rows = vec![
        Row {
            what: "an allowed query in one segment",
            segs: vec![(ok.clone(), PASS)],
            copies: vec![],
        },
        Row {
            what: "an unlisted query in one segment: refused at once",
            segs: vec![(bad.clone(), TC_ACT_REDIRECT)],
            copies: vec![Q | abi::DNS_REFUSED],
        },
        Row {
            what: "length prefix and body in separate segments (unlisted)",
            segs: vec![(bad[..2].to_vec(), PASS), (bad[2..].to_vec(), RESET)],
            copies: vec![Q],
        },
        Row {
            what: "length prefix and body in separate segments (allowed)",
            segs: vec![(ok[..2].to_vec(), PASS), (ok[2..].to_vec(), PASS)],
            copies: vec![],
        },
        Row {
            what: "the prefix split byte by byte",
            segs: vec![
                (ok[..1].to_vec(), PASS),
                (ok[1..2].to_vec(), PASS),
                (ok[2..].to_vec(), PASS),
            ],
            copies: vec![],
        },
        Row {
            what: "an unlisted query pipelined behind an allowed one",
            segs: vec![(cat(&ok, &bad), RESET)],
            copies: vec![Q],
        },
        Row {
            what: "two allowed queries in one segment",
            segs: vec![(cat(&ok, &ok), PASS)],
            copies: vec![],
        },
        Row {
            what: "a message across two segments, split inside the name",
            segs: vec![(bad[..20].to_vec(), PASS), (bad[20..].to_vec(), RESET)],
            copies: vec![Q],
        },
        Row {
            what: "a segment that does not start on a boundary",
            segs: vec![(cat(&ok, &bad[..9]), PASS), (cat(&bad[9..], &ok), RESET)],
            copies: vec![Q],
        },
        Row {
            what: "a stream with a dropped segment is dead",
            segs: vec![(cat(&ok, &bad), RESET), (ok.clone(), RESET)],
            copies: vec![Q],
        },
        Row {
            what: "larger than the parser's limit",
            segs: vec![(huge, RESET)],
            copies: vec![UNJ],
        },
        Row {
            what: "a message shorter than a header",
            segs: vec![(runt.to_vec(), RESET)],
            copies: vec![UNJ],
        },
        Row {
            what: "more messages in one segment than the walk takes",
            segs: vec![(many, RESET)],
            copies: vec![UNJ],
        },
    ];
    for row in &rows {
        let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
        let mut c = TcpConn::open(&r);
        for (i, (seg, want)) in row.segs.iter().enumerate() {
            assert_eq!(c.send(seg), *want, "{}: segment {i}", row.what);
        }
        assert_eq!(dns_copy_flags(&r), row.copies, "{}", row.what);
        // Audit mode: every segment passes, and the same is reported.
        let r = rig_with(Mode::Audit, Mode::Block, "github.test", true);
        let mut c = TcpConn::open(&r);
        for (i, (seg, _)) in row.segs.iter().enumerate() {
            assert_eq!(c.send(seg), PASS, "audit: {}: segment {i}", row.what);
        }
        let want: Vec<u32> = row.copies.iter().map(|f| f & !abi::DNS_REFUSED).collect();
        let got = dns_copy_flags(&r);
        assert_eq!(
            &got[..want.len().min(got.len())],
            &want[..],
            "audit: {}",
            row.what
        );
    }
}

#[test]
fn tcp_streams_that_cannot_be_followed_are_dropped() {
    const UNJ: u32 = abi::DNS_QUERY | abi::DNS_TCP | abi::DNS_UNJUDGED;
    const RESET: i32 = TC_ACT_REDIRECT;
    let ok = tcp_q(1, "github.test");
    // A stream whose SYN was never seen: where its messages begin is unknown.
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let seg = testrun::tcp_frame(
        ip(CLIENT),
        ip(RESOLVER),
        41000,
        53,
        5000,
        1,
        PSH_ACK,
        &[],
        &ok,
    );
    assert_eq!(r.egress(&seg), RESET, "unknown stream");
    assert_eq!(dns_copy_flags(&r), vec![UNJ]);
    assert_eq!(r.egress(&seg), RESET, "unknown stream, again");
    assert_eq!(dns_copy_flags(&r), Vec::<u32>::new(), "reported once");
    let r = rig_with(Mode::Audit, Mode::Block, "github.test", true);
    assert_eq!(r.egress(&seg), PASS, "audit: unknown stream");
    assert_eq!(dns_copy_flags(&r), vec![UNJ]);

    // A gap: bytes after some the program never saw.
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let c = TcpConn::open(&r);
    let gap = testrun::tcp_frame(
        ip(CLIENT),
        ip(RESOLVER),
        c.sport,
        53,
        c.seq + 10,
        7777,
        PSH_ACK,
        &[],
        &ok,
    );
    let mut gap = gap;
    set_l4_checksum(&mut gap, false, 6);
    let (rc, out) = egress_out(&r, &gap);
    assert_eq!(rc, RESET, "gap");
    // The client gets a RST from the resolver that its socket believes: seq = what it acked.
    let l4 = 14 + 20;
    assert_eq!(&out[14 + 12..14 + 16], &a4(RESOLVER));
    assert_eq!(&out[l4..l4 + 2], &53u16.to_be_bytes());
    assert_eq!(&out[l4 + 2..l4 + 4], &c.sport.to_be_bytes());
    assert_eq!(&out[l4 + 4..l4 + 8], &7777u32.to_be_bytes());
    assert_eq!(out[l4 + 13], 0x14, "RST|ACK");
    assert!(
        l4_checksum_ok(&out, false, 6),
        "TCP checksum after the rewrite"
    );
    assert_eq!(c.at(c.seq, &ok), RESET, "the stream is dead");
    assert_eq!(dns_copy_flags(&r), vec![UNJ]);

    // A retransmit of judged bytes passes; one that carries new bytes too is judged on them.
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let mut c = TcpConn::open(&r);
    let start = c.seq;
    assert_eq!(c.send(&ok), PASS);
    assert_eq!(c.at(start, &ok), PASS, "pure retransmit");
    let bad = tcp_q(2, "leak.attacker.test");
    assert_eq!(
        c.at(start, &[ok.clone(), bad].concat()),
        RESET,
        "old bytes + a new unlisted query"
    );
    // ACKs and FINs carry nothing and pass even on a dead stream's connection.
    assert_eq!(
        r.egress(&testrun::tcp_frame(
            ip(CLIENT),
            ip(RESOLVER),
            c.sport,
            53,
            c.seq,
            1,
            TCP_ACK,
            &[],
            &[]
        )),
        PASS
    );
}

#[test]
fn dns_to_any_loopback_address_is_pinned_and_filtered() {
    // Resolver 127.0.0.53 (a local stub); 127.0.0.54 answers too, but is not configured.
    let pooled = POOL.lock().unwrap().pop();
    let mut dp = match pooled {
        Some(mut dp) => {
            dp.reset().unwrap();
            dp
        }
        None => Dataplane::load(&Options::default()).unwrap(),
    };
    let policy = Policy {
        mode: Mode::Block,
        direct_ip: Mode::Block,
        dns_resolvers: vec![ip("127.0.0.53")],
        endpoints: Policy::parse_endpoints("github.test", "test").unwrap(),
        dns_filter: true,
        ..Policy::default()
    };
    dp.install_policy(JOB, &policy.compile().unwrap(), &policy.dns_resolvers)
        .unwrap();
    dp.add_interface_job(LO, abi::rf_job::for_policy(JOB, &policy))
        .unwrap();
    let r = Rig {
        dp: Some(dp),
        next_port: std::cell::Cell::new(42000),
    };
    let lo = |dst: &str, proto: u8, dport: u16, payload: &[u8]| {
        r.egress(&frame(
            ip("127.0.0.1"),
            ip(dst),
            proto,
            r.port(),
            dport,
            0,
            payload,
        ))
    };
    let ok = dns_query(1, "github.test", 1);
    let bad = dns_query(2, "leak.attacker.test", 1);
    // Another loopback address on port 53: not a resolver of the job.
    assert_eq!(lo("127.0.0.54", 17, 53, &ok), DROP, "udp to 127.0.0.54");
    assert_eq!(
        r.flows()[0].reason(),
        abi::rf_reason::RF_REASON_DNS_RESOLVER
    );
    assert_eq!(lo("127.0.0.54", 6, 53, &[]), DROP, "tcp SYN to 127.0.0.54");
    // The configured stub: filtered like any resolver.
    assert_eq!(lo("127.0.0.53", 17, 53, &ok), PASS);
    let (rc, _) = egress_out(
        &r,
        &frame(ip("127.0.0.1"), ip("127.0.0.53"), 17, r.port(), 53, 0, &bad),
    );
    assert_eq!(
        rc, PASS,
        "refused in place on loopback: the rewritten packet goes on"
    );
    // Other loopback traffic is not looked at: no flow, no event.
    r.events();
    assert_eq!(lo("127.0.0.1", 6, 8080, &[]), PASS);
    assert_eq!(lo("127.0.0.54", 17, 5353, &ok), PASS);
    assert!(r.events().is_empty());
}

// ---- what ringfence turns around, GSO, urgent data -----------------------------------------

/// bpf/lib/dns_refuse.h's RF_TURNED_MARK: every packet ringfence turns around carries it.
const TURNED_MARK: u32 = 0x5246_0a7b;
const URG: u8 = 0x20;
const RST_ACK: u8 = 0x14;

#[test]
fn turned_around_packets_are_never_read_as_answers() {
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let ingress = |r: &Rig, f: &[u8], mark: u32| {
        let meta = SkbMeta {
            mark,
            ..Default::default()
        };
        run_tc_meta(r.dp().ingress_prog(), f, LO, meta).unwrap().0
    };
    // A query answered REFUSED leaves tagged.
    let q = frame(
        ip(CLIENT),
        ip(RESOLVER),
        17,
        r.port(),
        53,
        0,
        &dns_query(7, "leak.attacker.test", 1),
    );
    let (rc, mark) = run_tc_meta(r.dp().egress_prog(), &q, LO, SkbMeta::default()).unwrap();
    assert_eq!(
        (rc, mark),
        (TC_ACT_REDIRECT, TURNED_MARK),
        "REFUSED is tagged"
    );

    // UDP: the job's own answer to its allowed query, tagged as turned around: not read.
    let forged = dns_answer(
        0x3131,
        "github.test",
        1,
        &[Rr::A("github.test", 30, a4("203.0.113.21"))],
    );
    let port = r.query(0x3131, "github.test", 1);
    let f = frame(ip(RESOLVER), ip(CLIENT), 17, 53, port, 0, &forged);
    assert_eq!(ingress(&r, &f, TURNED_MARK), PASS);
    assert!(r.learned().is_empty(), "a tagged packet bound an address");
    // The same untagged binds: the row above can fail.
    assert_eq!(ingress(&r, &f, 0), PASS);
    assert_eq!(r.learned(), vec![ip("203.0.113.21")]);

    // TCP: a RST from the resolver whose payload is a whole answer (what reset_tcp_stream
    // turns around keeps the job's segment), untagged: a RST's payload is never an answer.
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let sport = r.port();
    assert_eq!(r.egress(&syn_to_resolver(sport, 99)), PASS);
    let q = tcp_q(0x3131, "github.test");
    let seg = testrun::tcp_frame(
        ip(CLIENT),
        ip(RESOLVER),
        sport,
        53,
        100,
        500,
        PSH_ACK,
        &[],
        &q,
    );
    assert_eq!(r.egress(&seg), PASS);
    let a = testrun::tcp_dns(&forged);
    let ack = 100 + q.len() as u32;
    for (flags, mark, bound) in [
        (RST_ACK, 0, false),
        (PSH_ACK, TURNED_MARK, false),
        (PSH_ACK, 0, true),
    ] {
        let seg = testrun::tcp_frame(
            ip(RESOLVER),
            ip(CLIENT),
            53,
            sport,
            500,
            ack,
            flags,
            &[],
            &a,
        );
        assert_eq!(ingress(&r, &seg, mark), PASS);
        assert_eq!(
            !r.learned().is_empty(),
            bound,
            "flags {flags:#x} mark {mark:#x}"
        );
    }
    // The first segment of a split answer, tagged: no copy of it goes to the agent (the
    // REFUSED turnaround could otherwise put the job's bytes into an answer being rebuilt).
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let sport = r.port();
    assert_eq!(r.egress(&syn_to_resolver(sport, 99)), PASS);
    let seg = testrun::tcp_frame(
        ip(CLIENT),
        ip(RESOLVER),
        sport,
        53,
        100,
        500,
        PSH_ACK,
        &[],
        &q,
    );
    assert_eq!(r.egress(&seg), PASS);
    let _ = r.events();
    let seg = testrun::tcp_frame(
        ip(RESOLVER),
        ip(CLIENT),
        53,
        sport,
        500,
        ack,
        PSH_ACK,
        &[],
        &a[..20],
    );
    for flags_mark in [TURNED_MARK, 0] {
        assert_eq!(ingress(&r, &seg, flags_mark), PASS);
        let copies = dns_copy_flags(&r)
            .into_iter()
            .filter(|f| f & abi::DNS_TCP_SEGMENT != 0)
            .count();
        assert_eq!(copies, (flags_mark == 0) as usize, "mark {flags_mark:#x}");
    }
}

#[test]
fn udp_gso_queries_are_unjudged() {
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let q = dns_query(9, "github.test", 1);
    let f = frame(ip(CLIENT), ip(RESOLVER), 17, r.port(), 53, 0, &q);
    let gso = SkbMeta {
        gso_size: q.len() as u32 / 2,
        gso_segs: 2,
        ..Default::default()
    };
    let (rc, _) = run_tc_meta(r.dp().egress_prog(), &f, LO, gso).unwrap();
    assert_eq!(
        rc, DROP,
        "a GSO datagram is cut after the verdict: unjudged"
    );
    assert_eq!(dns_copy_flags(&r), vec![abi::DNS_QUERY | abi::DNS_UNJUDGED]);
    // Without GSO the same datagram passes.
    let f = frame(ip(CLIENT), ip(RESOLVER), 17, r.port(), 53, 0, &q);
    assert_eq!(r.egress(&f), PASS);
}

#[test]
fn tcp_urgent_data_kills_the_dns_stream() {
    const RESET: i32 = TC_ACT_REDIRECT;
    let r = rig_with(Mode::Block, Mode::Block, "github.test", true);
    let sport = r.port();
    assert_eq!(r.egress(&syn_to_resolver(sport, 99)), PASS);
    let q = tcp_q(1, "github.test");
    let mut seq = 100;
    for (flags, want) in [(PSH_ACK | URG, RESET), (PSH_ACK, RESET)] {
        let seg = testrun::tcp_frame(
            ip(CLIENT),
            ip(RESOLVER),
            sport,
            53,
            seq,
            500,
            flags,
            &[],
            &q,
        );
        assert_eq!(r.egress(&seg), want, "flags {flags:#x}");
        seq += q.len() as u32;
    }
    assert_eq!(
        dns_copy_flags(&r),
        vec![abi::DNS_QUERY | abi::DNS_TCP | abi::DNS_UNJUDGED]
    );
}

// ---- interface jobs on the host side of their link ---------------------------------------

/// What a host-side interface job's device sees: the job's packets as ingress, judged like a
/// cgroup job's egress; packets to the job as egress, where its answers bind and nothing is
/// judged as the job's.
#[test]
fn host_side_interface_job_is_judged_at_ingress_and_bound_at_egress() {
    let r = rig_job(Mode::Block, Mode::Block, "ok.test:443", true, true);
    let ingress_out = |f: &[u8]| testrun::run_tc_output(r.dp().ingress_prog(), f, LO).unwrap();
    let syn = |dst: &str| frame(ip(CLIENT), ip(dst), 6, r.port(), 443, TCP_SYN, &[]);

    // The job's SYN to an address no answer produced: dropped as it comes in.
    assert_eq!(r.ingress(&syn("198.51.100.10")), DROP);
    // Toward the job, nothing is the job's outbound: a peer's SYN to it passes.
    assert_eq!(r.egress(&syn("198.51.100.10")), PASS);
    assert!(
        r.flows()
            .iter()
            .all(|f| f.verdict() == abi::rf_verdict::RF_VERDICT_BLOCKED),
        "only the ingress SYN was judged"
    );

    // The job's query comes in; its answer binds on the way out to the job.
    let sport = r.port();
    let q = frame(
        ip(CLIENT),
        ip(RESOLVER),
        17,
        sport,
        53,
        0,
        &dns_query(0x4242, "ok.test", 1),
    );
    assert_eq!(r.ingress(&q), PASS, "an allowed query passes");
    let answer = frame(
        ip(RESOLVER),
        ip(CLIENT),
        17,
        53,
        sport,
        0,
        &dns_answer(
            0x4242,
            "ok.test",
            1,
            &[Rr::A("ok.test", 60, [198, 51, 100, 11])],
        ),
    );
    // A packet that came in through the job's own device (a reply ringfence turned around,
    // a hairpin) is not read as an answer on its way back out.
    let hairpin = SkbMeta {
        ingress_ifindex: LO,
        ..Default::default()
    };
    assert_eq!(
        run_tc_meta(r.dp().egress_prog(), &answer, LO, hairpin)
            .unwrap()
            .0,
        PASS
    );
    assert!(r.host("198.51.100.11").is_none(), "bound from a hairpin");
    assert_eq!(r.egress(&answer), PASS);
    assert!(
        r.host("198.51.100.11").is_some(),
        "the answer bound at egress"
    );
    assert_eq!(r.ingress(&syn("198.51.100.11")), PASS);

    // A query for a name not allowed: answered REFUSED, sent back out toward the job (the
    // redirect's direction is proven in tests/ifjob_netns.rs; here, that it is one).
    let f = frame(
        ip(CLIENT),
        ip(RESOLVER),
        17,
        r.port(),
        53,
        0,
        &dns_query(0x4343, "leak.test", 1),
    );
    let (rc, out) = ingress_out(&f);
    assert_eq!(rc, TC_ACT_REDIRECT, "turned around, not sent");
    assert_eq!(
        &out[14 + 12..14 + 16],
        &f[14 + 16..14 + 20],
        "from the resolver"
    );
    assert_eq!(out[14 + 20 + 8 + 3] & 0x0f, 5, "REFUSED");

    // ARP carries no job data.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 198, 51, 100, 1]);
    arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 198, 51, 100, 2]);
    assert_eq!(r.ingress(&arp), PASS, "ARP");
}

/// IPv6 neighbour discovery of a host-side interface job passes only where it cannot leave
/// the link: RS/RA/NS/NA with hop limit 255, to link-local or link-scope multicast addresses
/// (or to this host's own, which the netns test covers).
#[test]
fn host_side_neighbour_discovery_stays_on_the_link() {
    let r = rig_job(Mode::Block, Mode::Block, "ok.test:443", true, true);
    let nd = |dst: &str, icmp_type: u8, hop: u8| {
        let mut l4 = vec![icmp_type, 0, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&a6("2001:db8:1::53"));
        let mut f = testrun::ip_frame(ip(CLIENT6), ip(dst), 58, &l4, 0);
        f[14 + 7] = hop;
        f
    };
    let cases = [
        (
            "NS to the solicited-node group",
            "ff02::1:ff00:53",
            135,
            255,
            PASS,
        ),
        ("NA to a link-local address", "fe80::1", 136, 255, PASS),
        ("RS to all routers", "ff02::2", 133, 255, PASS),
        (
            "NS that was routed (hop limit 64)",
            "ff02::1:ff00:53",
            135,
            64,
            DROP,
        ),
        ("a redirect", "fe80::1", 137, 255, DROP),
        ("an echo request to all nodes", "ff02::1", 128, 255, DROP),
        (
            "NA to an address routed elsewhere",
            "2001:db8:ffff::1",
            136,
            255,
            DROP,
        ),
        (
            "NS to a multicast group beyond the link",
            "ff05::1:3",
            135,
            255,
            DROP,
        ),
    ];
    for (what, dst, t, hop, want) in cases {
        assert_eq!(r.ingress(&nd(dst, t, hop)), want, "{what}");
    }
}

/// An interface job's answers bind once, where the job reads them: not at the ingress of
/// the uplink they cross first.
#[test]
fn host_side_answers_do_not_bind_at_ingress() {
    let mut r = rig_job(Mode::Block, Mode::Block, "ok.test:443", true, true);
    let sport = r.port();
    let q = frame(
        ip(CLIENT),
        ip(RESOLVER),
        17,
        sport,
        53,
        0,
        &dns_query(0x5151, "ok.test", 1),
    );
    assert_eq!(r.ingress(&q), PASS);
    // LO's entry loses its flag: its ingress is now where cgroup jobs' answers bind (an
    // uplink's), and the same answer arriving there binds nothing.
    let policy = Policy {
        mode: Mode::Block,
        ..Policy::default()
    };
    r.dp.as_mut()
        .unwrap()
        .add_interface_job(LO, abi::rf_job::for_policy(JOB, &policy))
        .unwrap();
    let answer = frame(
        ip(RESOLVER),
        ip(CLIENT),
        17,
        53,
        sport,
        0,
        &dns_answer(
            0x5151,
            "ok.test",
            1,
            &[Rr::A("ok.test", 60, [198, 51, 100, 12])],
        ),
    );
    assert_eq!(r.ingress(&answer), PASS);
    assert!(r.host("198.51.100.12").is_none(), "bound at the uplink");
    assert_eq!(r.counter(abi::rf_counter::RF_CNT_DNS_UNMATCHED), 0);
}

/// Forwarded traffic (a container's, a namespace's behind NAT): a packet with no socket that
/// came in on some device is judged as it leaves through an uplink, under the
/// forwarded-traffic job; one a job's link already judged (RF_JUDGED_MARK), one leaving
/// toward containers (inside_devs), and one the host sent itself are not.
#[test]
fn forwarded_traffic_is_judged_at_the_uplink() {
    const JUDGED: u32 = 0x0010_0000;
    let mut r = rig(Mode::Block, Mode::Block, "198.51.100.11:80");
    let policy = Policy {
        mode: Mode::Block,
        direct_ip: Mode::Block,
        dns_resolvers: vec![ip(RESOLVER)],
        endpoints: Policy::parse_endpoints("198.51.100.11:80", "test").unwrap(),
        ..Policy::default()
    };
    {
        let dp = r.dp.as_mut().unwrap();
        // LO is an uplink here, no job's link.
        dp.remove_interface_job(LO).unwrap();
        dp.set_forward_job(Some(abi::rf_job::for_policy(JOB, &policy)))
            .unwrap();
    }
    let fwd = |r: &Rig, dst: &str, meta: SkbMeta| {
        let f = frame(ip("172.17.0.2"), ip(dst), 6, r.port(), 80, TCP_SYN, &[]);
        run_tc_meta(r.dp().egress_prog(), &f, LO, meta).unwrap().0
    };
    let came_in = SkbMeta {
        ingress_ifindex: LO,
        ..Default::default()
    };
    assert_eq!(
        fwd(&r, "198.51.100.12", came_in),
        DROP,
        "not allowed: dropped"
    );
    assert_eq!(fwd(&r, "198.51.100.11", came_in), PASS, "allowed: passes");
    let blocked = r
        .flows()
        .into_iter()
        .filter(|f| f.verdict() == abi::rf_verdict::RF_VERDICT_BLOCKED)
        .collect::<Vec<_>>();
    assert_eq!(blocked.len(), 1);
    assert_eq!(
        blocked[0].ifindex, LO,
        "the flow names the device it came in on"
    );
    // Judged on its way in by the job's link: not again.
    let judged = SkbMeta {
        mark: JUDGED,
        ..came_in
    };
    assert_eq!(fwd(&r, "198.51.100.13", judged), PASS);
    // Sent by the host itself (no device it came in on, no socket): not forwarded traffic.
    assert_eq!(fwd(&r, "198.51.100.14", SkbMeta::default()), PASS);
    // Leaving toward containers: an answer or a peer's packet going to one.
    r.dp.as_mut().unwrap().set_inside(LO, true).unwrap();
    assert_eq!(fwd(&r, "198.51.100.15", came_in), PASS);
    r.dp.as_mut().unwrap().set_inside(LO, false).unwrap();
    assert_eq!(fwd(&r, "198.51.100.16", came_in), DROP);
    // Without a forwarded-traffic job (the daemon's `forwarded = "pass"`), it passes.
    r.dp.as_mut().unwrap().set_forward_job(None).unwrap();
    assert_eq!(fwd(&r, "198.51.100.17", came_in), PASS);
}

/// The host side of a job's link marks what it let through, so that the uplink does not
/// judge it again under the forwarded-traffic job; what it drops carries no mark.
#[test]
fn a_job_link_marks_what_it_judged() {
    const JUDGED: u32 = 0x0010_0000;
    let r = rig_job(Mode::Block, Mode::Block, "198.51.100.11:80", false, true);
    let syn = |dst: &str| frame(ip(CLIENT), ip(dst), 6, r.port(), 80, TCP_SYN, &[]);
    let (rc, mark) = run_tc_meta(
        r.dp().ingress_prog(),
        &syn("198.51.100.11"),
        LO,
        SkbMeta::default(),
    )
    .unwrap();
    assert_eq!((rc, mark & JUDGED), (PASS, JUDGED));
    let (rc, mark) = run_tc_meta(
        r.dp().ingress_prog(),
        &syn("198.51.100.12"),
        LO,
        SkbMeta::default(),
    )
    .unwrap();
    assert_eq!((rc, mark & JUDGED), (DROP, 0));
}
