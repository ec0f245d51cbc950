//! An interface job trying to leave at layer 2: frames that are not IP, sent with a raw
//! socket (CAP_NET_RAW, which Docker gives every container) on the job's end of its link,
//! whose host end is a port of a bridge, as a container's or a microVM's often is. A bridge
//! forwards by MAC address, whatever the frame carries: what TC on the host end passes goes
//! on to every other port, here a receiver's namespace.
//!
//! ```text
//!  job ns            host ns                           receiver ns
//!  j0 ==veth== hj ─┐
//!                  br0 (no VLAN filtering)
//!  (ringfence on hj)└─ hr ==veth== r0   (a packet socket counts what arrives)
//! ```
//!
//! Each kind of frame carries a marker; the receiver's own capture counts them. A frame
//! with a second VLAN tag is the case that got through before: the kernel takes the outer
//! tag off before TC, the inner one is still in the frame, so it was "not IP" and passed
//! like ARP, then the bridge sent it on, tag and all.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::vethjob::ip_cmd;
use common::{run_timeout, InNetns};
use ringfence::kernel::abi;
use ringfence::kernel::dataplane::{Dataplane, Options};
use ringfence::policy::{Mode, Policy};

const CMD_TIMEOUT: Duration = Duration::from_secs(60);
const JOB: u32 = 11;

/// The receiver: counts, for 6 s, the frames arriving on r0 that carry each marker (not
/// what it sends itself, such as an ICMP error quoting one).
const SNIFF: &str = r#"
import json, socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("r0", 0))
s.settimeout(0.2)
kinds = sys.argv[1].split(",")
seen = {k: 0 for k in kinds}
open(sys.argv[2], "w").write("ready")
end = time.time() + 6
while time.time() < end:
    try:
        f, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    for k in kinds:
        if ("RFL2-" + k + "-").encode() in f:
            seen[k] += 1
print(json.dumps(seen))
"#;

/// The job: 20 frames of each kind to the receiver's MAC, from j0.
const SEND: &str = r#"
import socket, struct, sys
dst = bytes.fromhex(sys.argv[1].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("j0", 0))
src = s.getsockname()[4]
def ipv4_udp(marker):
    payload = marker.encode() + b"x" * 16
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes([203, 0, 113, 2]), bytes([198, 51, 100, 9]))
    # A valid header checksum: a bridge with br_netfilter loaded drops a bad one.
    c = sum(struct.unpack("!10H", ip))
    c = (c & 0xffff) + (c >> 16)
    c = (c & 0xffff) + (c >> 16)
    return ip[:10] + struct.pack("!H", ~c & 0xffff) + ip[12:] + udp
frames = {
    # 802.1ad outer tag (the kernel takes it off before TC), 802.1Q inner tag, IPv4.
    "qinq": b"\x88\xa8" + struct.pack("!H", 5) + b"\x81\x00" + struct.pack("!H", 6) + b"\x08\x00" + ipv4_udp("RFL2-qinq-"),
    # One 802.1Q tag: taken off before TC, judged as the IPv4 packet it carries (blocked).
    "vlan": b"\x81\x00" + struct.pack("!H", 5) + b"\x08\x00" + ipv4_udp("RFL2-vlan-"),
    # MPLS, one label (bottom of stack), IPv4 under it.
    "mpls": b"\x88\x47" + struct.pack("!I", (100 << 12) | (1 << 8) | 64) + ipv4_udp("RFL2-mpls-"),
    # PPPoE session, PPP IPv4.
    "pppoe": b"\x88\x64" + struct.pack("!BBHH", 0x11, 0, 1, 2 + len(ipv4_udp("RFL2-pppoe-"))) + b"\x00\x21" + ipv4_udp("RFL2-pppoe-"),
    # 802.3 with a length, LLC/SNAP.
    "llc": struct.pack("!H", 8 + len(ipv4_udp("RFL2-llc-"))) + b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + ipv4_udp("RFL2-llc-"),
    # Plain IPv4 to an address the policy does not allow.
    "ipv4": b"\x08\x00" + ipv4_udp("RFL2-ipv4-"),
    # ARP (a request whose padding holds the marker): neighbour resolution, which passes.
    "arp": b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src + bytes([203, 0, 113, 2]) + b"\x00" * 6 + bytes([203, 0, 113, 3]) + b"RFL2-arp-",
}
for _ in range(20):
    for f in frames.values():
        s.send(dst + src + f)
"#;

/// The three namespaces; removed when dropped.
struct Bridged {
    job: String,
    host: String,
    recv: String,
}

impl Bridged {
    fn new() -> Bridged {
        let pid = std::process::id();
        let b = Bridged {
            job: format!("rfl2j-{pid}"),
            host: format!("rfl2h-{pid}"),
            recv: format!("rfl2r-{pid}"),
        };
        for ns in [&b.job, &b.host, &b.recv] {
            if Path::new("/run/netns").join(ns).exists() {
                ip_cmd(&["netns", "del", ns]);
            }
            ip_cmd(&["netns", "add", ns]);
        }
        ip_cmd(&[
            "-n", &b.host, "link", "add", "hj", "type", "veth", "peer", "j0", "netns", &b.job,
        ]);
        ip_cmd(&[
            "-n", &b.host, "link", "add", "hr", "type", "veth", "peer", "r0", "netns", &b.recv,
        ]);
        ip_cmd(&["-n", &b.host, "link", "add", "br0", "type", "bridge"]);
        for (ns, dev) in [
            (&b.host, "hj"),
            (&b.host, "hr"),
            (&b.host, "br0"),
            (&b.job, "j0"),
            (&b.recv, "r0"),
        ] {
            ip_cmd(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip_cmd(&["-n", &b.host, "link", "set", "hj", "master", "br0"]);
        ip_cmd(&["-n", &b.host, "link", "set", "hr", "master", "br0"]);
        ip_cmd(&["-n", &b.job, "addr", "add", "203.0.113.2/24", "dev", "j0"]);
        ip_cmd(&["-n", &b.recv, "addr", "add", "203.0.113.3/24", "dev", "r0"]);
        b
    }

    fn cmd(&self, ns: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(argv);
        c
    }

    fn mac(&self, ns: &str, dev: &str) -> String {
        let out = self
            .cmd(ns, &["cat", &format!("/sys/class/net/{dev}/address")])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Sends every kind of frame from the job and returns what the receiver counted.
    fn send_and_count(&self, kinds: &[&str]) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let sniffer = self
            .cmd(
                &self.recv,
                &[
                    "python3",
                    "-c",
                    SNIFF,
                    &kinds.join(","),
                    ready.to_str().unwrap(),
                ],
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the receiver");
        for _ in 0..100 {
            if ready.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(ready.exists(), "the receiver did not start");
        let mac = self.mac(&self.recv, "r0");
        let (st, _, err) = run_timeout(
            self.cmd(&self.job, &["python3", "-c", SEND, &mac]),
            CMD_TIMEOUT,
        );
        assert!(st.success(), "the job's sender: {err}");
        let out = sniffer.wait_with_output().expect("the receiver");
        assert!(
            out.status.success(),
            "the receiver: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("the receiver's counts")
    }
}

impl Drop for Bridged {
    fn drop(&mut self) {
        for ns in [&self.job, &self.host, &self.recv] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

const KINDS: [&str; 7] = ["qinq", "vlan", "mpls", "pppoe", "llc", "ipv4", "arp"];

#[test]
fn non_ip_frames_of_an_interface_job_do_not_cross_a_bridge_in_block_mode() {
    let b = Bridged::new();
    // Without ringfence every kind crosses the bridge: the receiver's count is real.
    let open = b.send_and_count(&KINDS);
    for k in KINDS {
        assert_eq!(
            open[k], 20,
            "{k} crosses the bridge with no program attached: {open}"
        );
    }

    let in_host = InNetns::enter(&b.host);
    let mut dp = Dataplane::load(&Options::default()).expect("load the dataplane (root?)");
    dp.attach("hj").expect("attach to the job's link");
    let policy = Policy {
        mode: Mode::Block,
        direct_ip: Mode::Block,
        dns_filter: true,
        ..Policy::default()
    };
    dp.install_policy(JOB, &policy.compile().expect("compile"), &[])
        .expect("install the policy");
    let ifindex = nix::net::if_::if_nametoindex("hj").expect("hj's index");
    dp.add_interface_job(ifindex, abi::rf_job::for_policy(JOB, &policy).host_side())
        .expect("register the interface job");

    let held = b.send_and_count(&KINDS);
    for k in ["qinq", "vlan", "mpls", "pppoe", "llc", "ipv4"] {
        assert_eq!(held[k], 0, "{k} got across in block mode: {held}");
    }
    assert_eq!(held["arp"], 20, "ARP still passes: {held}");
    drop(dp);
    drop(in_host);
}
