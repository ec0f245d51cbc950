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
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
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

/// This thread inside network namespace `ns` until dropped (the dataplane attaches in the
/// namespace of the thread that asks).
struct InNetns(File);

impl InNetns {
    fn enter(ns: &str) -> InNetns {
        let back = File::open("/proc/thread-self/ns/net").expect("this thread's netns");
        let there = File::open(Path::new("/run/netns").join(ns)).expect("the host netns");
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

/// The flow events since the last call, as (dst, dport, proto, verdict, reason, ifindex).
type Flow = (IpAddr, u16, u8, abi::rf_verdict, abi::rf_reason, u32);

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
            r.ifindex
        )],
        "one event for the blocked flow: {evs:?}"
    );
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
