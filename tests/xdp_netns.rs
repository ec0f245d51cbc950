//! The XDP pre-judge of interface jobs (bpf/xdp.h), end to end on a real veth: a job that is
//! a network namespace behind it, routed through a host namespace (ringfence's dataplane,
//! TC and XDP on the job's link) to a server namespace with dnsmasq, HTTP and a UDP echo.
//! Same layout as tests/ifjob_netns.rs; the job's namespace and link are named "i11x…".
//!
//! What is checked on the receiving side, not from ringfence's numbers: the server's UDP
//! and HTTP counts, dnsmasq's answers, and the veth driver's own XDP drop counter (ethtool
//! statistics), which only grows for what XDP dropped — TC's drops never reach it. The
//! same counter staying flat once XDP is detached, while TC still blocks, is the control
//! that shows it tells the two apart.

mod common;

use std::cell::RefCell;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::Command;

use common::vethjob::VethJob;
use common::*;
use ringfence::kernel::abi;
use ringfence::kernel::dataplane::{Dataplane, Options, XdpAttach};
use ringfence::policy::{Mode, Policy};
use ringfence::testkit::testbed::{in_netns, link_v4, DNS_V4, DNS_V6};
use serde_json::Value;

const JOB: u32 = 11;
const OK_V4: u8 = 10; // ok.test: allowed on 80 and UDP 7777
const BAD_V4: u8 = 13; // bad.test: not allowed; also the direct address below
const UDP_PORT: u16 = 7777;

/// Fields drop in order: the dataplane detaches inside the host namespace, then the thread
/// leaves it, then the namespaces go.
struct Rig {
    dp: Dataplane,
    _in_host: InNetns,
    link: VethJob,
    tb: Testbed,
    ifindex: u32,
}

fn rig() -> Rig {
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", link_v4(OK_V4)),
            DnsRecord::a("bad.test", link_v4(BAD_V4)),
        ],
        &[sa(link_v4(OK_V4), 80), sa(link_v4(BAD_V4), 80)],
    );
    tb.start_udp_echo(&[sa(link_v4(OK_V4), UDP_PORT), sa(link_v4(BAD_V4), UDP_PORT)])
        .expect("UDP echo in the server namespace");
    let link = VethJob::named(&tb, 0, "i11x");
    let in_host = InNetns::enter(tb.client_ns());
    let mut dp = Dataplane::load(&Options::default()).expect("load the dataplane (root?)");
    dp.attach(&link.host_if).expect("attach to the job's link");
    dp.attach(tb.client_if()).expect("attach to the uplink");
    let policy = Policy {
        mode: Mode::Block,
        direct_ip: Mode::Block,
        dns_resolvers: vec![DNS_V4.into(), DNS_V6.into()],
        endpoints: Policy::parse_endpoints("ok.test:80 ok.test:7777", "test").expect("test policy"),
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
    dp.set_xdp_prejudge(true);
    dp.add_interface_job(ifindex, abi::rf_job::for_policy(JOB, &policy).host_side())
        .expect("register the interface job");
    Rig {
        dp,
        _in_host: in_host,
        link,
        tb,
        ifindex,
    }
}

/// The flow events since the last call, as (dst, dport, proto, verdict, reason, ifindex,
/// cgroup, pid): every field but the source port and the time.
type Flow = (
    IpAddr,
    u16,
    u8,
    abi::rf_verdict,
    abi::rf_reason,
    u32,
    u64,
    u32,
);

impl Rig {
    fn flows(&self) -> Vec<Flow> {
        let out = RefCell::new(Vec::new());
        let map = self.dp.events_map().expect("events map");
        let mut b = libbpf_rs::RingBufferBuilder::new();
        b.add(&map, |d: &[u8]| {
            let hdr: abi::rf_event_hdr = abi::from_bytes(d).expect("event header");
            if hdr.r#type == abi::rf_event_type::RF_EVENT_FLOW.0 {
                let f: abi::rf_flow_event = abi::from_bytes(d).expect("flow event");
                out.borrow_mut().push((
                    abi::addr_from_bytes(f.daddr),
                    f.dport,
                    f.proto,
                    f.verdict(),
                    f.reason(),
                    f.ifindex,
                    f.cgroup_id,
                    f.pid,
                ));
            }
            0
        })
        .expect("ring buffer");
        b.build().expect("ring buffer").consume().expect("consume");
        out.into_inner()
    }

    /// `n` UDP datagrams from one socket of the job (one flow: source port `sport`) to
    /// `dst`:`UDP_PORT`.
    fn send_udp(&self, dst: IpAddr, sport: u16, n: u32) {
        let (ok, _, err) = self.link.run(&[
            "python3",
            "-c",
            "import socket, sys, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0', int(sys.argv[2])))\n\
             for i in range(int(sys.argv[3])):\n    s.sendto(b'x' * 18, (sys.argv[1], 7777))\n",
            &dst.to_string(),
            &sport.to_string(),
            &n.to_string(),
        ]);
        assert!(ok, "sending UDP from the job: {err}");
        // What the echo gets, it gets within a moment.
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    /// The veth driver's own count of frames XDP dropped on the host side of the job's link.
    fn xdp_drops(&self) -> u64 {
        let dev = self.link.host_if.clone();
        in_netns(self.tb.client_ns(), move || {
            ethtool_stats(&dev)
                .into_iter()
                .filter(|(name, _)| name.ends_with("xdp_drops"))
                .map(|(_, v)| v)
                .sum()
        })
        .expect("reading ethtool statistics in the host namespace")
    }

    /// The XDP program attached to the job's link and its mode (1: driver), from rtnetlink
    /// (`ip -d link`), and that program's name (bpftool).
    fn attached_xdp(&self) -> Option<(String, u64)> {
        let out = Command::new("ip")
            .args(["-n", self.tb.client_ns(), "-j", "-d", "link", "show", "dev"])
            .arg(&self.link.host_if)
            .output()
            .expect("ip -d link");
        let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        let xdp = &v[0]["xdp"];
        let id = xdp["prog"]["id"].as_u64()?;
        let mode = xdp["mode"].as_u64().unwrap_or(0);
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &id.to_string()])
            .output()
            .expect("bpftool prog show");
        let p: Value = serde_json::from_slice(&out.stdout).expect("bpftool -j output");
        Some((p["name"].as_str().unwrap_or("?").to_string(), mode))
    }
}

/// Every (name, value) of `dev`'s driver statistics (what `ethtool -S` prints), through the
/// SIOCETHTOOL ioctl in this thread's network namespace.
fn ethtool_stats(dev: &str) -> Vec<(String, u64)> {
    const ETHTOOL_GSSET_INFO: u32 = 0x37;
    const ETHTOOL_GSTRINGS: u32 = 0x1b;
    const ETHTOOL_GSTATS: u32 = 0x1d;
    const ETH_SS_STATS: u32 = 1;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0, "socket for SIOCETHTOOL");
    // SAFETY: fd was just returned by socket(2).
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let ioctl = |data: &mut [u32]| {
        // struct ifreq: the name, then ifr_data (a pointer) at offset 16.
        let mut ifr = [0u8; 40];
        ifr[..dev.len()].copy_from_slice(dev.as_bytes());
        ifr[16..24].copy_from_slice(&(data.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: ifr is a struct ifreq whose ifr_data points at `data`, sized by the caller
        // for what the command writes.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, ifr.as_mut_ptr()) };
        assert_eq!(
            r,
            0,
            "SIOCETHTOOL on {dev}: {}",
            std::io::Error::last_os_error()
        );
    };
    // struct ethtool_sset_info: cmd, reserved, u64 sset_mask, then one u32 per set.
    let mut info = [ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_STATS, 0, 0];
    ioctl(&mut info);
    let n = info[4] as usize;
    // struct ethtool_gstrings: cmd, string_set, len, then len * 32 bytes.
    let mut strings = vec![0u32; 3 + n * 8];
    strings[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_STATS, n as u32]);
    ioctl(&mut strings);
    // struct ethtool_stats: cmd, n_stats, then n u64 (8-byte aligned after the 8-byte head).
    let mut stats = vec![0u32; 2 + n * 2];
    stats[..2].copy_from_slice(&[ETHTOOL_GSTATS, n as u32]);
    ioctl(&mut stats);
    let bytes: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    (0..n)
        .map(|i| {
            let name = &bytes[i * 32..(i + 1) * 32];
            let name =
                String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(32)])
                    .into_owned();
            let v = u64::from(stats[2 + 2 * i]) | (u64::from(stats[3 + 2 * i]) << 32);
            (name, v)
        })
        .collect()
}

#[test]
fn xdp_prejudge_of_an_interface_job_on_a_veth() {
    require_root();
    let r = rig();
    let ok: IpAddr = link_v4(OK_V4).into();
    let bad: IpAddr = link_v4(BAD_V4).into();

    // Really attached, in the driver, and it is ringfence's.
    assert_eq!(
        r.attached_xdp(),
        Some(("rf_xdp".to_string(), 1)),
        "rf_xdp in driver mode on {}",
        r.link.host_if
    );
    assert_eq!(r.dp.xdp_interfaces(), [r.ifindex]);
    r.flows();

    // An allowed name: the query and the answer pass XDP (TC filters the one and binds the
    // other), the connection too.
    let (ok_curl, out, err) = r.link.run(&as_strs(&curl(&[], "http://ok.test/")));
    assert!(ok_curl, "curl ok.test failed: {err}");
    assert_eq!(out, format!("hello from {}:80\n", link_v4(OK_V4)));
    assert_eq!(r.tb.http_hits(sa(link_v4(OK_V4), 80)), 1);
    assert!(r.tb.dns_queries_for("ok.test") >= 1);

    // A name not allowed: XDP passes DNS on, TC answers REFUSED in the job's place.
    let (_, out, _) = r.link.run(&["dig", "+tries=1", "+time=3", "bad.test"]);
    assert!(out.contains("status: REFUSED"), "dig bad.test: {out}");
    assert_eq!(
        r.tb.dns_queries_for("bad.test"),
        0,
        "the refused query went out"
    );

    let drops0 = r.xdp_drops();
    // An allowed UDP flow: every datagram arrives, none dropped by XDP.
    r.send_udp(ok, 40001, 50);
    assert_eq!(r.tb.udp_hits(sa(link_v4(OK_V4), UDP_PORT)), 50);
    assert_eq!(r.xdp_drops(), drops0, "XDP dropped allowed datagrams");

    // A blocked UDP flow (an address no answer gave this job): none arrives, every one
    // was dropped by XDP, and it is reported once, as TC would report it.
    r.send_udp(bad, 40002, 200);
    assert_eq!(
        r.tb.udp_hits(sa(link_v4(BAD_V4), UDP_PORT)),
        0,
        "blocked datagrams arrived"
    );
    assert_eq!(
        r.xdp_drops() - drops0,
        200,
        "XDP did not drop the blocked flow's datagrams itself"
    );
    let evs = r.flows();
    let blocked: Vec<&Flow> = evs
        .iter()
        .filter(|f| f.0 == bad && f.1 == UDP_PORT)
        .collect();
    assert_eq!(
        blocked,
        [&(
            bad,
            UDP_PORT,
            17,
            abi::rf_verdict::RF_VERDICT_BLOCKED,
            abi::rf_reason::RF_REASON_DIRECT_IP,
            r.ifindex,
            0,
            0
        )],
        "one event for the blocked flow: {evs:?}"
    );
    let xdp_event = *blocked[0];
    // And one for the allowed flow, from TC (XDP never reports what it passes).
    assert_eq!(
        evs.iter().filter(|f| f.0 == ok && f.1 == UDP_PORT).count(),
        1,
        "{evs:?}"
    );

    // A blocked TCP connection: no accept.
    let (ok_curl, _, _) = r.link.run(&as_strs(&curl(
        &["--max-time", "3"],
        &format!("http://{bad}/"),
    )));
    assert!(!ok_curl, "curl to a blocked address succeeded");
    assert_eq!(r.tb.http_hits(sa(link_v4(BAD_V4), 80)), 0);

    // The control: with XDP detached, TC alone still blocks a new flow, and the driver's
    // counter, which only XDP moves, stays where it was.
    let mut r = r;
    r.dp.detach_xdp(r.ifindex);
    assert_eq!(r.attached_xdp(), None, "rf_xdp still attached after detach");
    let drops1 = r.xdp_drops();
    r.send_udp(bad, 40003, 100);
    assert_eq!(r.tb.udp_hits(sa(link_v4(BAD_V4), UDP_PORT)), 0);
    assert_eq!(r.xdp_drops(), drops1);
    // TC's event for that flow is the one XDP sent for the other, field for field but one:
    // a veth hands the sender's socket on with the skb, and TC reports its cgroup (here the
    // test's own); XDP sees no socket and says 0, as TC does on a tap.
    let mut tc: Vec<Flow> = r
        .flows()
        .into_iter()
        .filter(|f| f.0 == bad && f.1 == UDP_PORT)
        .collect();
    assert_eq!(tc.len(), 1, "TC's event for a blocked flow: {tc:?}");
    let own_cgroup = std::fs::metadata(format!(
        "/sys/fs/cgroup{}",
        std::fs::read_to_string("/proc/self/cgroup")
            .expect("/proc/self/cgroup")
            .trim()
            .trim_start_matches("0::")
    ))
    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    .unwrap_or(1);
    assert_eq!(tc[0].6, own_cgroup, "TC names the sending socket's cgroup");
    tc[0].6 = 0;
    assert_eq!(
        tc,
        [xdp_event],
        "TC's event for a blocked flow, but the cgroup"
    );
}

#[test]
fn no_xdp_unless_asked() {
    require_root();
    let tb = testbed(&[], &[]);
    let link = VethJob::named(&tb, 1, "i11x");
    let _in_host = InNetns::enter(tb.client_ns());
    let mut dp = Dataplane::load(&Options::default()).expect("load the dataplane");
    dp.attach(&link.host_if).expect("attach");
    let ifindex = nix::net::if_::if_nametoindex(link.host_if.as_str()).expect("index");
    let policy = Policy {
        mode: Mode::Block,
        ..Policy::default()
    };
    dp.add_interface_job(ifindex, abi::rf_job::for_policy(JOB, &policy).host_side())
        .expect("register");
    // Off by default: measured slower than TC alone (bench/README.md).
    assert!(dp.xdp_interfaces().is_empty());
    // Asked for: in the driver (veth has native XDP).
    assert_eq!(
        dp.attach_xdp(ifindex).expect("attach_xdp"),
        XdpAttach::Native
    );
    assert_eq!(dp.xdp_interfaces(), [ifindex]);
    dp.remove_interface_job(ifindex).expect("remove");
    assert!(
        dp.xdp_interfaces().is_empty(),
        "removing the job detaches XDP"
    );
}

// ---------------------------------------------------------------------------------------
// rf_xdp against rf_ingress, frame by frame (BPF_PROG_TEST_RUN, no namespaces)
// ---------------------------------------------------------------------------------------

const LO: u32 = 1;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const TC_ACT_SHOT: i32 = 2;

/// Runs rf_xdp once on `frame` as if it came in on `ifindex` (a `struct xdp_md` whose
/// data_end is the frame's length, as the kernel asks).
fn run_xdp(dp: &Dataplane, frame: &[u8], ifindex: u32) -> i32 {
    let mut ctx = [0u32; 6]; // data, data_end, data_meta, ingress_ifindex, rx_queue, egress
    ctx[1] = frame.len() as u32;
    ctx[3] = ifindex;
    let mut bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let input = libbpf_rs::ProgramInput {
        data_in: Some(frame),
        context_in: Some(&mut bytes[..]),
        repeat: 1,
        ..Default::default()
    };
    dp.xdp_prog()
        .test_run(input)
        .expect("BPF_PROG_TEST_RUN of rf_xdp")
        .return_value as i32
}

/// A dataplane whose job (block mode unless `audit`) is the host side of LO's link.
fn table_rig(audit: bool) -> Dataplane {
    let mut dp = Dataplane::load(&Options::default()).expect("load the dataplane (root?)");
    let mode = if audit { Mode::Audit } else { Mode::Block };
    let policy = Policy {
        mode,
        direct_ip: mode,
        dns_resolvers: vec!["198.51.100.53".parse().unwrap()],
        endpoints: Policy::parse_endpoints("198.51.100.10:443 [2001:db8:2::10]:443", "test")
            .expect("test policy"),
        dns_filter: true,
        ..Policy::default()
    };
    dp.install_policy(
        JOB,
        &policy.compile().expect("compile"),
        &policy.dns_resolvers,
    )
    .expect("install");
    dp.add_interface_job(LO, abi::rf_job::for_policy(JOB, &policy).host_side())
        .expect("register");
    dp
}

/// Every frame through rf_xdp on one dataplane and through rf_ingress on another (same
/// policy, its own flow cache): XDP's verdict is the one expected, and whatever XDP drops
/// TC drops too. What XDP passes, TC judges (its verdict is TC's business, checked by
/// tests/bpf_prog.rs).
#[test]
fn rf_xdp_drops_only_what_tc_drops() {
    use ringfence::testkit::testrun::{frame, ip_frame, run_tc_meta, SkbMeta, TCP_ACK, TCP_SYN};
    require_root();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let (job, job6) = (ip("203.0.113.2"), ip("2001:db8:3::2"));
    let udp = |dst: &str, sport: u16, dport: u16| {
        let src = if dst.contains(':') { job6 } else { job };
        frame(src, ip(dst), 17, sport, dport, 0, b"payload")
    };
    let tcp = |dst: &str, sport: u16, dport: u16, flags: u8| {
        let src = if dst.contains(':') { job6 } else { job };
        frame(src, ip(dst), 6, sport, dport, flags, &[])
    };
    // IPv4 with 4 bytes of options (a no-op and an end of list): header length 6 words.
    let with_options = {
        let mut f = udp("198.51.100.66", 40100, 9);
        f[14] = 0x46;
        let total = u16::from_be_bytes([f[16], f[17]]) + 4;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.splice(34..34, [1, 1, 1, 0]);
        f
    };
    // IPv6 with a hop-by-hop header (8 bytes, padding) before UDP.
    let with_hbh = {
        let mut l4 = vec![17, 0, 1, 4, 0, 0, 0, 0];
        l4.extend_from_slice(&40101u16.to_be_bytes());
        l4.extend_from_slice(&9u16.to_be_bytes());
        l4.extend_from_slice(&15u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(b"payload");
        ip_frame(job6, ip("2001:db8:2::66"), 0, &l4, 0)
    };
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend_from_slice(&[0u8; 28]);
        f
    };
    let cases: Vec<(&str, Vec<u8>, i32)> = vec![
        (
            "udp to a direct address",
            udp("198.51.100.66", 40001, 9),
            XDP_DROP,
        ),
        (
            "...its next datagram (cached blocked)",
            udp("198.51.100.66", 40001, 9),
            XDP_DROP,
        ),
        (
            "udp6 to a direct address",
            udp("2001:db8:2::66", 40002, 9),
            XDP_DROP,
        ),
        (
            "syn to an allowed endpoint",
            tcp("198.51.100.10", 40003, 443, TCP_SYN),
            XDP_PASS,
        ),
        (
            "...its ack (cached allowed)",
            tcp("198.51.100.10", 40003, 443, TCP_ACK),
            XDP_PASS,
        ),
        (
            "syn6 to an allowed endpoint",
            tcp("2001:db8:2::10", 40004, 443, TCP_SYN),
            XDP_PASS,
        ),
        (
            "syn to an allowed address, port not listed",
            tcp("198.51.100.10", 40005, 80, TCP_SYN),
            XDP_DROP,
        ),
        (
            "ack without a flow, to a direct address",
            tcp("198.51.100.66", 40006, 80, TCP_ACK),
            XDP_DROP,
        ),
        (
            "metadata address",
            tcp("169.254.169.254", 40007, 80, TCP_SYN),
            XDP_DROP,
        ),
        (
            "dns to the resolver",
            udp("198.51.100.53", 40008, 53),
            XDP_PASS,
        ),
        (
            "dns to another server (tc blocks it)",
            udp("198.51.100.66", 40009, 53),
            XDP_PASS,
        ),
        (
            "tcp dns to another server",
            tcp("198.51.100.66", 40010, 53, TCP_SYN),
            XDP_PASS,
        ),
        ("loopback", udp("127.0.0.1", 40011, 9), XDP_PASS),
        (
            "the job's syn-ack (tc answers it with a rst)",
            tcp("198.51.100.66", 40012, 80, TCP_SYN | TCP_ACK),
            XDP_PASS,
        ),
        (
            "ipv4 fragment",
            ip_frame(job, ip("198.51.100.66"), 17, &[0u8; 16], 0x2000),
            XDP_PASS,
        ),
        (
            "ipv4 later fragment",
            ip_frame(job, ip("198.51.100.66"), 17, &[0u8; 16], 0x0010),
            XDP_PASS,
        ),
        ("ipv4 options", with_options, XDP_PASS),
        ("ipv6 hop-by-hop header", with_hbh, XDP_PASS),
        (
            "icmp",
            ip_frame(job, ip("198.51.100.66"), 1, &[8, 0, 0, 0, 0, 0, 0, 0], 0),
            XDP_PASS,
        ),
        ("arp", arp, XDP_PASS),
        (
            "cut udp header",
            udp("198.51.100.66", 40013, 9)[..38].to_vec(),
            XDP_PASS,
        ),
    ];
    let (dpx, dpt) = (table_rig(false), table_rig(false));
    let mut dropped = 0;
    for (what, f, want) in &cases {
        let x = run_xdp(&dpx, f, LO);
        assert_eq!(x, *want, "rf_xdp on: {what}");
        // Came in on LO, as on the real link (skb->ingress_ifindex is the event's ifindex).
        let meta = SkbMeta {
            ingress_ifindex: LO,
            ..Default::default()
        };
        let (t, _) = run_tc_meta(dpt.ingress_prog(), f, LO, meta).expect("rf_ingress");
        if x == XDP_DROP {
            dropped += 1;
            assert_eq!(
                t, TC_ACT_SHOT,
                "rf_xdp dropped what rf_ingress passes: {what}"
            );
        }
    }
    // One event per blocked flow, as TC's: the cached datagram sent none.
    let blocked_flows = cases.iter().filter(|c| c.2 == XDP_DROP).count() - 1;
    assert_eq!(dropped, blocked_flows + 1);
    let evs = events_of(&dpx);
    assert_eq!(evs.len(), blocked_flows, "{evs:?}");
    let tc_evs = events_of(&dpt);
    for e in &evs {
        assert!(
            tc_evs.contains(e),
            "rf_xdp's event {e:?} is not the one rf_ingress sent for that flow: {tc_evs:?}"
        );
    }

    // Audit mode: only what is blocked whatever the mode (metadata) is dropped.
    let audit = table_rig(true);
    assert_eq!(
        run_xdp(&audit, &udp("198.51.100.66", 40020, 9), LO),
        XDP_PASS
    );
    assert_eq!(
        run_xdp(&audit, &tcp("169.254.169.254", 40021, 80, TCP_SYN), LO),
        XDP_DROP
    );
    // A device that is not the host side of a job's link: nothing is XDP's.
    assert_eq!(run_xdp(&dpx, &udp("198.51.100.66", 40022, 9), 2), XDP_PASS);
}

/// Flow events as (job, dst, sport, dport, proto, verdict, reason, direction, pid, ifindex).
/// Not the cgroup: a test run gives TC's packet a socket of the test's own cgroup, where on
/// a job's link it has none (0, as rf_xdp says; tests above check it on a real veth).
#[allow(clippy::type_complexity)]
fn events_of(dp: &Dataplane) -> Vec<(u32, IpAddr, u16, u16, u8, u8, u8, u8, u32, u32)> {
    let out = RefCell::new(Vec::new());
    let map = dp.events_map().expect("events map");
    let mut b = libbpf_rs::RingBufferBuilder::new();
    b.add(&map, |d: &[u8]| {
        let hdr: abi::rf_event_hdr = abi::from_bytes(d).expect("event header");
        if hdr.r#type == abi::rf_event_type::RF_EVENT_FLOW.0 {
            let f: abi::rf_flow_event = abi::from_bytes(d).expect("flow event");
            out.borrow_mut().push((
                f.hdr.job_id,
                abi::addr_from_bytes(f.daddr),
                f.sport,
                f.dport,
                f.proto,
                f.verdict,
                f.reason,
                f.direction,
                f.pid,
                f.ifindex,
            ));
        }
        0
    })
    .expect("ring buffer");
    b.build().expect("ring buffer").consume().expect("consume");
    out.into_inner()
}
