//! A job that is a network namespace behind a veth pair, as a container's or a microVM's
//! would be: the host end sits in the testbed's client namespace (which plays the host), the
//! job reaches the server namespace through it, routed and forwarded.
//!
//! ```text
//!  job ns                          host ns (the testbed's client)     server ns
//!  203.0.113.(128+4s+2)/30 ==veth== 203.0.113.(128+4s+1)/30 | uplink ==veth== dnsmasq, HTTP
//!  2001:db8:3:s::2/64               2001:db8:3:s::1/64
//! ```
//!
//! `s` is the slot, so up to 32 jobs share one testbed without sharing addresses.
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{run_timeout, Testbed};
use ringfence::testkit::testbed::{CLIENT_V4, CLIENT_V6, DNS_V4};

/// Every command run here is bounded; this only turns a hang into a failure.
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct VethJob {
    pub ns: String,
    /// The host side: what `--interface` names.
    pub host_if: String,
    pub job_v4: Ipv4Addr,
    pub host_v4: Ipv4Addr,
    pub job_v6: Ipv6Addr,
    pub host_v6: Ipv6Addr,
    resolv_dir: PathBuf,
}

pub fn ip_cmd(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl VethJob {
    /// The job namespace for `slot` (0..32) of `tb`, up and routed both ways.
    pub fn new(tb: &Testbed, slot: u8) -> VethJob {
        VethJob::named(tb, slot, "rfj")
    }

    /// As [`new`](Self::new), its namespace and devices named after `prefix` (at most 4
    /// bytes: interface names hold 15), so that concurrent suites can tell theirs apart.
    pub fn named(tb: &Testbed, slot: u8, prefix: &str) -> VethJob {
        assert!(prefix.len() <= 4, "prefix {prefix:?}: at most 4 bytes");
        assert!(
            slot < 32,
            "slot {slot}: 32 /30 links fit in 203.0.113.128/25"
        );
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("{prefix}-{pid}-{n}");
        // A namespace of this name left by a killed run of the same pid goes first.
        if Path::new("/run/netns").join(&ns).exists() {
            ip_cmd(&["netns", "del", &ns]);
        }
        let base = 128 + 4 * slot;
        let s = u16::from(slot);
        let job = VethJob {
            resolv_dir: Path::new("/etc/netns").join(&ns),
            // Interface names hold 15 bytes: a prefix of at most 4, at most 6 hex digits of
            // pid (pid_max is 2^22 at most), "x", n, one more.
            host_if: format!("{prefix}{pid:x}x{n:x}h"),
            ns,
            job_v4: Ipv4Addr::new(203, 0, 113, base + 2),
            host_v4: Ipv4Addr::new(203, 0, 113, base + 1),
            job_v6: Ipv6Addr::new(0x2001, 0xdb8, 3, s, 0, 0, 0, 2),
            host_v6: Ipv6Addr::new(0x2001, 0xdb8, 3, s, 0, 0, 0, 1),
        };
        let job_if = format!("{prefix}{pid:x}x{n:x}j");
        let host = tb.client_ns();
        ip_cmd(&["netns", "add", &job.ns]);
        ip_cmd(&[
            "link",
            "add",
            "name",
            &job.host_if,
            "netns",
            host,
            "type",
            "veth",
            "peer",
            "name",
            &job_if,
            "netns",
            &job.ns,
        ]);
        let (h, j) = (&job.host_if, &job_if);
        let (jv4, hv4, jv6, hv6) = (job.job_v4, job.host_v4, job.job_v6, job.host_v6);
        let steps: Vec<(&str, String)> = vec![
            (&job.ns, "link set lo up".into()),
            (&job.ns, format!("link set {j} up")),
            (&job.ns, format!("addr add {jv4}/30 dev {j}")),
            (&job.ns, format!("addr add {jv6}/64 dev {j} nodad")),
            (&job.ns, format!("route add default via {hv4}")),
            (&job.ns, format!("-6 route add default via {hv6}")),
            (host, format!("link set {h} up")),
            (host, format!("addr add {hv4}/30 dev {h}")),
            (host, format!("addr add {hv6}/64 dev {h} nodad")),
            // The server answers the job through the host.
            (
                tb.server_ns(),
                format!("route add 203.0.113.{base}/30 via {CLIENT_V4}"),
            ),
            (
                tb.server_ns(),
                format!("-6 route add 2001:db8:3:{s:x}::/64 via {CLIENT_V6}"),
            ),
        ];
        for (ns, step) in &steps {
            let mut args = vec!["-n", ns];
            args.extend(step.split_whitespace());
            ip_cmd(&args);
        }
        let sysctl = tb
            .client_cmd(
                "sysctl",
                [
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )
            .status()
            .expect("running sysctl");
        assert!(
            sysctl.success(),
            "turning forwarding on in the host namespace"
        );
        std::fs::create_dir_all(&job.resolv_dir).expect("creating the job's /etc/netns dir");
        std::fs::write(
            job.resolv_dir.join("resolv.conf"),
            format!("nameserver {DNS_V4}\n"),
        )
        .expect("writing the job's resolv.conf");
        job
    }

    /// `argv` inside the job's namespace, with its resolv.conf.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).args(argv);
        cmd
    }

    /// Runs `argv` inside the job's namespace: (success, stdout, stderr).
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> (bool, String, String) {
        let (status, out, err) = run_timeout(self.command(argv), CMD_TIMEOUT);
        (status.success(), out, err)
    }
}

impl Drop for VethJob {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            });
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.resolv_dir);
    }
}
