//! `rfbench xdp [--quick] [--secs S] [--rounds N] [--json FILE]`: an interface job's
//! 64-byte UDP packets/s at the host side of its veth, with ringfence's XDP pre-judge
//! (bpf/xdp.h) against TC alone, on the same device in the same run:
//!
//!   none       no program on the device (the baseline every other line is a ratio to)
//!   tc-drop    rf_ingress (TC) drops a blocked flow
//!   xdp-drop   rf_xdp drops it before TC (TC still attached)
//!   tc-pass    rf_ingress passes an allowed flow
//!   xdp-pass   rf_xdp passes it on, then rf_ingress judges it as before
//!   bare-drop  a two-instruction XDP program that drops everything: the floor of a drop
//!   bare-pass  one that passes everything, then rf_ingress (tc-pass plus the XDP hook's
//!              own cost, what any pre-judge pays before doing anything)
//!
//! ```text
//!  i11x-bj-PID (job)                       i11x-bh-PID (host, forwarding on)
//!  AF_PACKET sender ==veth==> i11xhPID   198.51.100.0/24: a blackhole route
//!  203.0.113.2/30             203.0.113.1/30 (ringfence's programs here)
//! ```
//!
//! The sender is one thread pinned to one CPU, writing whole 60-byte frames (64 with the
//! FCS) straight to the job's veth (PACKET_QDISC_BYPASS, sendmmsg in batches). A veth
//! delivers on the sender's CPU (the backlog, or with XDP the veth's NAPI, both run when
//! the send re-enables softirqs), so the rate it reaches is the whole path's: send, XDP
//! and TC, and for passed packets the host's IP input up to its route lookup (a blackhole: the
//! same small cost in every configuration). What is counted is the kernel's, not
//! ringfence's: the job's veth tx_packets (offered), the host namespace's IP InReceives
//! (passed XDP and TC into the host's stack), the difference dropped. Configurations are interleaved round by round
//! so a noisy neighbour hits them alike; the median of the rounds is reported.
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ringfence::kernel::abi;
use ringfence::kernel::dataplane::{Dataplane, Options, XdpAttach};
use ringfence::policy::{Mode, Policy};
use serde_json::{json, Value};

use super::{loadavg, machine, write_json, Args};

const JOB: u32 = 11;
const JOB_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const HOST_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Allowed by the job's policy (a static address, port 9).
const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// Not listed: a direct-ip block.
const BLOCKED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 66);
const PORT: u16 = 9;
const BATCH: usize = 256;

/// A microVM's address and MAC on the tap (the host side is the tap device itself).
const VM_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 6);
const TAP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
const VM_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x11, 0x06];

/// The device under test: a veth (a container's link) or a tap (a microVM's).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Dev {
    Veth,
    Tap,
}

impl Dev {
    fn name(self) -> &'static str {
        match self {
            Dev::Veth => "veth",
            Dev::Tap => "tap",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    None,
    TcDrop,
    XdpDrop,
    TcPass,
    XdpPass,
    BareDrop,
    BarePass,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::TcDrop => "tc-drop",
            Config::XdpDrop => "xdp-drop",
            Config::TcPass => "tc-pass",
            Config::XdpPass => "xdp-pass",
            Config::BareDrop => "bare-drop",
            Config::BarePass => "bare-pass",
        }
    }
    fn dst(self) -> Ipv4Addr {
        match self {
            Config::TcDrop | Config::XdpDrop | Config::BareDrop => BLOCKED,
            _ => ALLOWED,
        }
    }
    fn drops(self) -> bool {
        matches!(self, Config::TcDrop | Config::XdpDrop | Config::BareDrop)
    }
}

const CONFIGS: [Config; 7] = [
    Config::None,
    Config::TcDrop,
    Config::XdpDrop,
    Config::TcPass,
    Config::XdpPass,
    Config::BareDrop,
    Config::BarePass,
];

/// A program that returns `action` and nothing else, attached in driver mode to `ifindex`
/// in this thread's namespace: (program, link), detached when both are dropped.
fn bare_xdp(ifindex: u32, action: i32) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::FromRawFd;
    // r0 = action; exit
    let insns = [
        sys::bpf_insn {
            code: (sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K) as u8,
            _bitfield_align_1: [],
            _bitfield_1: sys::bpf_insn::new_bitfield_1(0, 0),
            off: 0,
            imm: action,
        },
        sys::bpf_insn {
            code: (sys::BPF_JMP | sys::BPF_EXIT) as u8,
            _bitfield_align_1: [],
            _bitfield_1: sys::bpf_insn::new_bitfield_1(0, 0),
            off: 0,
            imm: 0,
        },
    ];
    // SAFETY: insns and the strings outlive the call; no options.
    let prog = unsafe {
        sys::bpf_prog_load(
            sys::BPF_PROG_TYPE_XDP,
            c"rf_bare_xdp".as_ptr(),
            c"GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as _,
            std::ptr::null_mut(),
        )
    };
    if prog < 0 {
        bail!(
            "loading a bare XDP program: {}",
            std::io::Error::from_raw_os_error(-prog)
        );
    }
    // SAFETY: a new fd nothing else owns.
    let prog = unsafe { std::os::fd::OwnedFd::from_raw_fd(prog) };
    // SAFETY: zeroed opts with their size set are libbpf's defaults.
    let mut opts: sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<sys::bpf_link_create_opts>() as _;
    opts.flags = sys::XDP_FLAGS_DRV_MODE;
    // SAFETY: prog is a loaded program; opts outlives the call.
    let link =
        unsafe { sys::bpf_link_create(prog.as_raw_fd(), ifindex as i32, sys::BPF_XDP, &opts) };
    if link < 0 {
        bail!(
            "attaching a bare XDP program: {}",
            std::io::Error::from_raw_os_error(-link)
        );
    }
    // SAFETY: as above.
    Ok((prog, unsafe { std::os::fd::OwnedFd::from_raw_fd(link) }))
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The two namespaces and their devices; removed on drop.
struct Net {
    job_ns: String,
    host_ns: String,
    job_if: String,
    host_if: String,
    /// A persistent tap in the host namespace: the sender writes the microVM's frames.
    tap: String,
}

impl Net {
    fn new() -> Result<Net> {
        let pid = std::process::id();
        let n = Net {
            job_ns: format!("i11x-bj-{pid}"),
            host_ns: format!("i11x-bh-{pid}"),
            job_if: format!("i11xj{pid:x}"),
            host_if: format!("i11xh{pid:x}"),
            tap: format!("i11xt{pid:x}"),
        };
        for ns in [&n.job_ns, &n.host_ns] {
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
        }
        ip(&[
            "link", "add", "name", &n.host_if, "netns", &n.host_ns, "type", "veth", "peer", "name",
            &n.job_if, "netns", &n.job_ns,
        ])?;
        let (j, h, t) = (&n.job_if, &n.host_if, &n.tap);
        let steps: Vec<(&str, String)> = vec![
            (&n.job_ns, "link set lo up".into()),
            (&n.job_ns, format!("link set {j} up")),
            (&n.job_ns, format!("addr add {JOB_V4}/30 dev {j}")),
            (&n.host_ns, "link set lo up".into()),
            (&n.host_ns, format!("link set {h} up")),
            (&n.host_ns, format!("addr add {HOST_V4}/30 dev {h}")),
            (&n.host_ns, format!("tuntap add dev {t} mode tap")),
            (&n.host_ns, format!("link set {t} up")),
            (&n.host_ns, format!("addr add {TAP_V4}/30 dev {t}")),
            (&n.host_ns, "route add blackhole 198.51.100.0/24".into()),
        ];
        for (ns, step) in &steps {
            let mut a = vec!["-n", ns];
            a.extend(step.split_whitespace());
            ip(&a)?;
        }
        ip(&[
            "netns",
            "exec",
            &n.host_ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        Ok(n)
    }

    /// tx_packets of `dev` in `ns`, from the kernel's counters.
    fn tx_packets(ns: &str, dev: &str) -> Result<u64> {
        let out = ip(&["-n", ns, "-j", "-s", "link", "show", "dev", dev])?;
        let v: Value = serde_json::from_str(&out).context("ip -j -s link")?;
        let s = &v[0]["stats64"];
        s["tx"]["packets"].as_u64().context("no tx packets")
    }

    /// The host namespace's IP InReceives (/proc/net/snmp of this thread's namespace: the
    /// caller is in it): every IPv4 packet that got past XDP and TC into IP input.
    fn ip_in_receives() -> Result<u64> {
        let t = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
        let mut lines = t.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (lines.next(), lines.next());
        let (Some(names), Some(values)) = (names, values) else {
            bail!("no Ip: lines in /proc/net/snmp");
        };
        let i = names
            .split_whitespace()
            .position(|n| n == "InReceives")
            .context("no InReceives")?;
        Ok(values
            .split_whitespace()
            .nth(i)
            .context("short Ip: line")?
            .parse()?)
    }

    fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
        let out = ip(&["-n", ns, "-j", "link", "show", "dev", dev])?;
        let v: Value = serde_json::from_str(&out).context("ip -j link")?;
        let s = v[0]["address"].as_str().context("no address")?;
        let mut m = [0u8; 6];
        for (i, p) in s.split(':').enumerate().take(6) {
            m[i] = u8::from_str_radix(p, 16)?;
        }
        Ok(m)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.job_ns, &self.host_ns] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// This thread in network namespace `ns` (setns is per thread).
fn enter(ns: &str) -> Result<std::fs::File> {
    let back = std::fs::File::open("/proc/thread-self/ns/net")?;
    let there =
        std::fs::File::open(format!("/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    nix::sched::setns(&there, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(back)
}

/// A 60-byte Ethernet frame (64 on the wire with the FCS): IPv4, UDP, 18 bytes of payload.
fn frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_at = f.len();
    f.extend_from_slice(&[0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let mut sum: u32 = f[ip_at..ip_at + 20]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    f[ip_at + 10..ip_at + 12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&26u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it)
    f.resize(60, 0xab);
    f
}

/// Sends `frame` out of `ifname` in network namespace `ns` as fast as one thread pinned to
/// `cpu` can, for `secs`. Returns the packets the kernel took.
fn blast(ns: &str, ifname: &str, frame: &[u8], cpu: usize, secs: f64) -> Result<(u64, u64)> {
    let ns = ns.to_string();
    let ifname = ifname.to_string();
    let frame = frame.to_vec();
    std::thread::spawn(move || -> Result<(u64, u64)> {
        let _back = enter(&ns)?;
        pin(cpu);
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str())
            .with_context(|| format!("{ifname} in {ns}"))?;
        // Protocol 0: a sender only, nothing is queued to it on receive.
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: fd was just returned by socket(2) and is owned here.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_ll with family and index set is a valid bind address.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        let one: libc::c_int = 1;
        // SAFETY: pointers to live locals with their sizes.
        unsafe {
            if libc::bind(
                sock.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return Err(std::io::Error::last_os_error()).context("bind AF_PACKET");
            }
            // Straight to the driver: the qdisc is not what is measured.
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        let mut iov: Vec<libc::iovec> = (0..BATCH)
            .map(|_| libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: a zeroed msghdr is valid; the iovec outlives every send below.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = v as *mut libc::iovec;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let cpu0 = thread_cpu_ns();
        let mut sent = 0u64;
        let until = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < until {
            // SAFETY: msgs and what they point to are live for the call.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
        Ok((sent, thread_cpu_ns() - cpu0))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sender thread panicked"))?
}

/// Writes `frame` into tap `tap` (in namespace `ns`) as a microVM's virtio backend would,
/// one frame per write(2), from one thread pinned to `cpu`, for `secs`. Returns the frames
/// the kernel took. (No vnet header: tun builds the skb around the frame, and runs XDP on it
/// before, in tun_build_skb.)
fn blast_tap(ns: &str, tap: &str, frame: &[u8], cpu: usize, secs: f64) -> Result<(u64, u64)> {
    let ns = ns.to_string();
    let tap = tap.to_string();
    let frame = frame.to_vec();
    std::thread::spawn(move || -> Result<(u64, u64)> {
        let _back = enter(&ns)?;
        pin(cpu);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("/dev/net/tun")?;
        // struct ifreq: the name, then ifr_flags.
        let mut ifr = [0u8; 40];
        ifr[..tap.len()].copy_from_slice(tap.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which ifr is the size of.
        if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
        }
        let cpu0 = thread_cpu_ns();
        let mut sent = 0u64;
        let until = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < until {
            for _ in 0..BATCH {
                // SAFETY: frame is live for the call.
                let n = unsafe {
                    libc::write(
                        f.as_raw_fd(),
                        frame.as_ptr() as *const libc::c_void,
                        frame.len(),
                    )
                };
                if n > 0 {
                    sent += 1;
                }
            }
        }
        Ok((sent, thread_cpu_ns() - cpu0))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the tap writer thread panicked"))?
}

/// CPU time this thread has used (ns). Without CONFIG_IRQ_TIME_ACCOUNTING the softirqs it
/// runs as it re-enables them (the veth's backlog or NAPI, TC, XDP, IP input) count as its
/// own; what ksoftirqd takes over is counted by [`ksoftirqd_ns`].
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The run time (ns, /proc/PID/schedstat) of ksoftirqd/`cpu`: softirq work deferred there
/// is the packets' cost too.
fn ksoftirqd_ns(cpu: usize) -> u64 {
    let want = format!("ksoftirqd/{cpu}");
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        if std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == want) {
            return std::fs::read_to_string(p.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

struct Sample {
    offered_pps: f64,
    passed_pps: f64,
    /// CPU per packet on the sending CPU: the sender thread's own time (the send and the
    /// softirqs it runs) plus ksoftirqd's there, divided by the packets sent. Unlike the
    /// rate, a neighbour that takes the CPU away does not move it.
    ns_per_packet: f64,
}

pub fn xdp(args: &Args) -> Result<()> {
    let mut secs = if args.quick { 0.5 } else { 3.0 };
    let mut rounds = if args.quick { 1 } else { 5 };
    let mut it = args.rest.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => secs = it.next().context("--secs needs S")?.parse()?,
            "--rounds" => rounds = it.next().context("--rounds needs N")?.parse()?,
            other => bail!("rfbench xdp: unknown argument {other:?}"),
        }
    }
    let net = Net::new()?;
    let cpu = 1 % std::thread::available_parallelism().map_or(1, |n| n.get());
    // The dataplane lives in the host namespace: it attaches there, by index.
    let back = enter(&net.host_ns)?;
    let mut dp = Dataplane::load(&Options {
        emit_events: false,
        ..Default::default()
    })?;
    let policy = Policy {
        mode: Mode::Block,
        direct_ip: Mode::Block,
        endpoints: Policy::parse_endpoints(&format!("{ALLOWED}:{PORT}"), "bench")?,
        dns_filter: true,
        ..Default::default()
    };
    dp.install_policy(JOB, &policy.compile()?, &[])?;
    let ifindex = nix::net::if_::if_nametoindex(net.host_if.as_str())?;
    let job_mac = Net::mac(&net.job_ns, &net.job_if)?;
    let host_mac = Net::mac(&net.host_ns, &net.host_if)?;

    let tap_index = nix::net::if_::if_nametoindex(net.tap.as_str())?;
    let tap_mac = Net::mac(&net.host_ns, &net.tap)?;

    let mut samples: std::collections::BTreeMap<(Dev, &str), Vec<Sample>> = Default::default();
    for round in 0..rounds {
        for dev in [Dev::Veth, Dev::Tap] {
            let (name, index) = match dev {
                Dev::Veth => (&net.host_if, ifindex),
                Dev::Tap => (&net.tap, tap_index),
            };
            for (i, &c) in CONFIGS.iter().enumerate() {
                // Attach what this configuration has, and only that.
                dp.detach_all();
                if c != Config::None {
                    dp.attach(name)?;
                    dp.add_interface_job(index, abi::rf_job::for_policy(JOB, &policy).host_side())?;
                    if matches!(c, Config::XdpDrop | Config::XdpPass) {
                        if let XdpAttach::Skipped(why) = dp.attach_xdp(index)? {
                            bail!("no XDP on {name}: {why}");
                        }
                    } else {
                        dp.detach_xdp(index);
                    }
                }
                let _bare = match c {
                    Config::BareDrop => Some(bare_xdp(index, 1)?), // XDP_DROP
                    Config::BarePass => Some(bare_xdp(index, 2)?), // XDP_PASS
                    _ => None,
                };
                // A new source port per sample: the first packet is a new flow (judged,
                // cached), the rest are that flow's established packets, as a stream's are.
                let sport = 40000 + (round * CONFIGS.len() + i) as u16;
                let rx0 = Net::ip_in_receives()?;
                let t = Instant::now();
                let soft0 = ksoftirqd_ns(cpu);
                let (offered, cpu_ns) = match dev {
                    Dev::Veth => {
                        let f = frame(job_mac, host_mac, JOB_V4, c.dst(), sport);
                        let tx0 = Net::tx_packets(&net.job_ns, &net.job_if)?;
                        let (_, cpu_ns) = blast(&net.job_ns, &net.job_if, &f, cpu, secs)?;
                        (Net::tx_packets(&net.job_ns, &net.job_if)? - tx0, cpu_ns)
                    }
                    Dev::Tap => {
                        let f = frame(VM_MAC, tap_mac, VM_V4, c.dst(), sport);
                        blast_tap(&net.host_ns, &net.tap, &f, cpu, secs)?
                    }
                };
                let el = t.elapsed().as_secs_f64();
                // Let the last NAPI batches land before the receiver is counted.
                std::thread::sleep(Duration::from_millis(50));
                let rx1 = Net::ip_in_receives()?;
                drop(_bare);
                let soft = ksoftirqd_ns(cpu).saturating_sub(soft0);
                let s = Sample {
                    ns_per_packet: (cpu_ns + soft) as f64 / offered.max(1) as f64,
                    offered_pps: offered as f64 / el,
                    passed_pps: (rx1 - rx0) as f64 / el,
                };
                eprintln!(
                    "round {round} {:<4} {:<9} offered {:>10.0} pps  passed {:>10.0} pps  {:>6.0} ns/packet (ksoftirqd {:.0}%)",
                    dev.name(),
                    c.name(),
                    s.offered_pps,
                    s.passed_pps,
                    s.ns_per_packet,
                    soft as f64 / (cpu_ns + soft).max(1) as f64 * 100.0
                );
                samples.entry((dev, c.name())).or_default().push(s);
            }
        }
    }
    dp.detach_all();
    drop(dp);
    drop(back);

    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut out = serde_json::Map::new();
    let mut bad = Vec::new();
    for dev in [Dev::Veth, Dev::Tap] {
        let ns_of = |c: Config| -> Vec<f64> {
            samples[&(dev, c.name())]
                .iter()
                .map(|s| s.ns_per_packet)
                .collect()
        };
        let none_ns = median(&mut ns_of(Config::None));
        println!(
            "\n## 64-byte UDP from an interface job into the host side of its {} (XDP in the driver), median of {rounds} x {secs} s",
            dev.name()
        );
        println!(
            "{:<10}{:>12}{:>12}{:>12}{:>12}{:>14}{:>10}",
            "config", "ns/packet", "over none", "pps/core", "vs none", "offered pps", "passed"
        );
        let mut d = serde_json::Map::new();
        for c in CONFIGS {
            let v = &samples[&(dev, c.name())];
            let offered = median(&mut v.iter().map(|s| s.offered_pps).collect());
            let passed = median(&mut v.iter().map(|s| s.passed_pps).collect());
            let ns = median(&mut ns_of(c));
            println!(
                "{:<10}{:>12.0}{:>12.0}{:>12.0}{:>12.3}{:>14.0}{:>10.0}",
                c.name(),
                ns,
                ns - none_ns,
                1e9 / ns,
                none_ns / ns,
                offered,
                passed
            );
            // A config that should drop must have dropped (nearly) all, one that passes
            // must have passed (nearly) all: otherwise the figures measure something else.
            let ok = if c.drops() {
                passed < offered * 0.001 + 10.0
            } else {
                passed > offered * 0.99
            };
            if !ok {
                bad.push(format!(
                    "{} {}: offered {offered:.0} pps but passed {passed:.0}: not the path it claims to measure",
                    dev.name(),
                    c.name()
                ));
            }
            d.insert(
                c.name().into(),
                json!({"ns_per_packet": ns, "over_none_ns": ns - none_ns,
                       "pps_per_core": 1e9 / ns, "ratio_to_none": none_ns / ns,
                       "offered_pps": offered, "passed_pps": passed,
                       "samples": v.iter().map(|s| json!({"ns_per_packet": s.ns_per_packet,
                           "offered_pps": s.offered_pps, "passed_pps": s.passed_pps})).collect::<Vec<_>>()}),
            );
        }
        // XDP against TC, round by round (each pair measured a few seconds apart).
        for (x, t) in [
            (Config::XdpDrop, Config::TcDrop),
            (Config::XdpPass, Config::TcPass),
            (Config::BareDrop, Config::TcDrop),
            (Config::BarePass, Config::TcPass),
        ] {
            let mut r: Vec<f64> = ns_of(x).iter().zip(ns_of(t)).map(|(a, b)| a / b).collect();
            let m = median(&mut r);
            println!(
                "{} / {}: CPU per packet x{m:.3} (rounds: {})",
                x.name(),
                t.name(),
                r.iter()
                    .map(|v| format!("{v:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            d.insert(format!("{}_over_{}", x.name(), t.name()), json!(m));
        }
        out.insert(dev.name().into(), Value::Object(d));
    }
    write_json(
        &args.json,
        &json!({"xdp": out, "secs": secs, "rounds": rounds,
                "loadavg": loadavg(), "machine": machine()}),
    )?;
    if !bad.is_empty() {
        bail!("{}", bad.join("\n"));
    }
    Ok(())
}
