//! The Rust side of bpf/abi.h: the skeleton's generated types, checked against the sizes
//! the C side has, and conversions between them and std types.
use std::net::{IpAddr, Ipv6Addr};

pub use crate::kernel::skel::types::{
    rf_addr_flags, rf_addr_val, rf_config, rf_counter, rf_direction, rf_dns_event, rf_dns_flags,
    rf_dns_stream, rf_dns_stream_key, rf_event_hdr, rf_event_type, rf_flow_event, rf_flow_key,
    rf_flow_val, rf_glob, rf_guard_event, rf_guard_kind, rf_job, rf_job_flags, rf_limits, rf_link,
    rf_lpm_key, rf_mode, rf_name_key, rf_name_val, rf_ports, rf_query_key, rf_query_val, rf_reason,
    rf_resolver_key, rf_sock_owner, rf_stream_key, rf_stream_val, rf_verdict,
};

use crate::policy::{Mode, Policy};

// `ABI_VERSION`: computed by build.rs from the bytes of bpf/abi.h and bpf/maps.h.
include!(concat!(env!("OUT_DIR"), "/abi_version.rs"));

// Every number below comes from the generated enums: bpf/abi.h is the only place one is
// written down. The names are shorthands for code that tests bits or sizes arrays.

/// Bits of a host entry's prefix in the trie: 32 bits of job id + 128 bits of address.
pub const LPM_FULL: u32 = rf_limits::RF_LPM_FULL.0;
pub const MAX_PORTS: usize = rf_limits::RF_MAX_PORTS.0 as usize;
pub const NAME_MAX: usize = rf_limits::RF_NAME_MAX.0 as usize;
pub const GLOBS_MAX: usize = rf_limits::RF_GLOBS_MAX.0 as usize;
pub const GLOB_PART_MAX: usize = rf_limits::RF_GLOB_PART_MAX.0 as usize;
pub const COUNTERS: usize = rf_counter::RF_CNT_MAX.0 as usize;
/// Addresses the kernel binds from one answer; the agent binds the rest.
pub const DNS_ADDRS_MAX: usize = rf_limits::RF_DNS_ADDRS_MAX.0 as usize;

pub const ADDR_STATIC: u32 = rf_addr_flags::RF_ADDR_STATIC.0;
pub const ADDR_LEARNED: u32 = rf_addr_flags::RF_ADDR_LEARNED.0;
pub const ADDR_SEEN: u32 = rf_addr_flags::RF_ADDR_SEEN.0;

pub const DNS_ALLOWED: u32 = rf_dns_flags::RF_DNS_ALLOWED.0;
pub const DNS_MALFORMED: u32 = rf_dns_flags::RF_DNS_MALFORMED.0;
pub const DNS_TRUNCATED: u32 = rf_dns_flags::RF_DNS_TRUNCATED.0;
pub const DNS_TRIE_FULL: u32 = rf_dns_flags::RF_DNS_TRIE_FULL.0;
pub const DNS_QUERY: u32 = rf_dns_flags::RF_DNS_QUERY.0;
pub const DNS_REFUSED: u32 = rf_dns_flags::RF_DNS_REFUSED.0;
pub const DNS_TCP: u32 = rf_dns_flags::RF_DNS_TCP.0;
pub const DNS_TCP_SPLIT: u32 = rf_dns_flags::RF_DNS_TCP_SPLIT.0;
pub const DNS_TCP_SEGMENT: u32 = rf_dns_flags::RF_DNS_TCP_SEGMENT.0;
pub const DNS_TCP_FIRST: u32 = rf_dns_flags::RF_DNS_TCP_FIRST.0;
pub const DNS_OVERFLOW: u32 = rf_dns_flags::RF_DNS_OVERFLOW.0;
pub const DNS_UNJUDGED: u32 = rf_dns_flags::RF_DNS_UNJUDGED.0;
pub const DNS_SPECIAL: u32 = rf_dns_flags::RF_DNS_SPECIAL.0;

/// An enum value stored in a `__u8` field; refuses (at compile time, in a const) one
/// that does not fit.
const fn byte(v: u32) -> u8 {
    assert!(
        v <= u8::MAX as u32,
        "an ABI enum value stored in a __u8 field exceeds 255"
    );
    v as u8
}

const JOB_HOST_SIDE: u8 = byte(rf_job_flags::RF_JOB_HOST_SIDE.0);

const MODE_AUDIT: u8 = byte(rf_mode::RF_MODE_AUDIT.0);
const MODE_BLOCK: u8 = byte(rf_mode::RF_MODE_BLOCK.0);

fn mode_byte(m: Mode) -> u8 {
    match m {
        Mode::Audit => MODE_AUDIT,
        Mode::Block => MODE_BLOCK,
    }
}

impl rf_job {
    /// The `jobs`/`ifjobs` entry of a job in policy slot `job_id` under `policy`: the one
    /// place a policy's modes become the kernel's. Queries are filtered only in block mode
    /// (audit mode reports them and lets them through).
    pub fn for_policy(job_id: u32, policy: &Policy) -> rf_job {
        rf_job {
            job_id,
            mode: mode_byte(policy.mode),
            direct_ip: mode_byte(policy.direct_ip),
            dns_filter: u8::from(policy.mode == Mode::Block && policy.dns_filter),
            flags: 0,
        }
    }

    /// The same entry for an interface job whose interface is the host side of its link
    /// (the host end of a veth, a tap): the job's packets are judged as they come in there,
    /// and DNS answers to it bind as they leave there (`RF_JOB_HOST_SIDE`).
    /// The flag [`host_side`](Self::host_side) sets.
    pub fn host_side_flag() -> u8 {
        JOB_HOST_SIDE
    }

    pub fn host_side(mut self) -> rf_job {
        self.flags |= JOB_HOST_SIDE;
        self
    }
}

impl rf_flow_event {
    /// The `verdict` byte as its enum (which may hold a value the enum does not name).
    pub fn verdict(&self) -> rf_verdict {
        rf_verdict(self.verdict.into())
    }

    pub fn reason(&self) -> rf_reason {
        rf_reason(self.reason.into())
    }

    pub fn direction(&self) -> rf_direction {
        rf_direction(self.direction.into())
    }
}

// The C compiler and the skeleton generator must agree on every layout we exchange, and
// these are the sizes bpf/abi.h's comments promise (naturally aligned, padded explicitly).
const _: () = {
    use std::mem::size_of;
    assert!(size_of::<rf_config>() == 24);
    assert!(size_of::<rf_ports>() == 24);
    assert!(size_of::<rf_job>() == 8);
    assert!(size_of::<rf_lpm_key>() == 24);
    assert!(size_of::<rf_addr_val>() == 56);
    assert!(size_of::<rf_name_key>() == 16);
    assert!(size_of::<rf_glob>() == 160);
    assert!(size_of::<rf_name_val>() == 48 + 4 * 160 + 8 + 256);
    assert!(size_of::<rf_resolver_key>() == 20);
    assert!(size_of::<rf_query_key>() == 20);
    assert!(size_of::<rf_query_val>() == 24);
    assert!(size_of::<rf_flow_key>() == 28);
    assert!(size_of::<rf_flow_val>() == 24);
    assert!(size_of::<rf_stream_key>() == 20);
    assert!(size_of::<rf_stream_val>() == 8);
    assert!(size_of::<rf_dns_stream_key>() == 40);
    assert!(size_of::<rf_dns_stream>() == 12 + 288); // RF_DNS_HOLD bytes held
    assert!(size_of::<rf_event_hdr>() == 16);
    assert!(size_of::<rf_flow_event>() == 88);
    assert!(size_of::<rf_dns_event>() == 80);
    assert!(size_of::<rf_guard_event>() == 64);
    assert!(size_of::<rf_sock_owner>() == 32);
};

// SAFETY: plain-old-data C structs, every bit pattern valid.
unsafe impl plain::Plain for rf_flow_event {}
unsafe impl plain::Plain for rf_dns_event {}
unsafe impl plain::Plain for rf_guard_event {}
unsafe impl plain::Plain for rf_event_hdr {}
unsafe impl plain::Plain for rf_addr_val {}
unsafe impl plain::Plain for rf_flow_key {}
unsafe impl plain::Plain for rf_flow_val {}
unsafe impl plain::Plain for rf_lpm_key {}

/// Views a POD value as its bytes (for map keys and values).
pub fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is one of the repr(C) ABI structs; reading its bytes is always valid.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Reads a POD value from map bytes.
pub fn from_bytes<T: plain::Plain + Default + Copy>(b: &[u8]) -> Option<T> {
    let mut v = T::default();
    plain::copy_from_bytes(&mut v, b).ok()?;
    Some(v)
}

/// IPv4 is stored IPv4-mapped so one trie and one flow table hold both families.
pub fn addr_to_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn addr_from_bytes(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Prefix length of `net` in the trie's key space (job id bits + IPv4-mapped address bits).
pub fn lpm_prefixlen(a: IpAddr, prefix: u8) -> u32 {
    32 + match a {
        IpAddr::V4(_) => 96 + u32::from(prefix),
        IpAddr::V6(_) => u32::from(prefix),
    }
}

pub fn comm_to_string(c: &[i8; 16]) -> String {
    let bytes: Vec<u8> = c
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trips_mapped() {
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b = addr_to_bytes(a);
        assert_eq!(&b[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(addr_from_bytes(b), a);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(addr_from_bytes(addr_to_bytes(v6)), v6);
        assert_eq!(lpm_prefixlen(a, 24), 32 + 96 + 24);
        assert_eq!(lpm_prefixlen(v6, 32), 64);
    }

    #[test]
    fn job_entry_follows_the_policy() {
        let (audit, block) = (
            rf_mode::RF_MODE_AUDIT.0 as u8,
            rf_mode::RF_MODE_BLOCK.0 as u8,
        );
        let job = |mode, direct_ip, dns_filter| {
            let j = rf_job::for_policy(
                7,
                &Policy {
                    mode,
                    direct_ip,
                    dns_filter,
                    ..Policy::default()
                },
            );
            (j.job_id, j.mode, j.direct_ip, j.dns_filter)
        };
        assert_eq!(job(Mode::Block, Mode::Block, true), (7, block, block, 1));
        assert_eq!(job(Mode::Block, Mode::Audit, false), (7, block, audit, 0));
        // Audit mode never refuses queries, whatever dns-policy says.
        assert_eq!(job(Mode::Audit, Mode::Block, true), (7, audit, block, 0));
    }

    /// The version is the hash build.rs documents, of the headers as they are now: recomputed
    /// here independently, so a build.rs that hashed the wrong bytes (or stale ones) fails.
    #[test]
    fn abi_version_hashes_the_headers() {
        fn fnv1a(h: &mut u64, bytes: &[u8]) {
            for &b in bytes {
                *h ^= u64::from(b);
                *h = h.wrapping_mul(0x100_0000_01b3);
            }
        }
        let mut h = 0xcbf2_9ce4_8422_2325;
        fnv1a(&mut h, b"a");
        assert_eq!(h, 0xaf63_dc4c_8601_ec8c, "FNV-1a test vector");
        let mut h = 0xcbf2_9ce4_8422_2325;
        for (path, bytes) in [
            ("bpf/abi.h", &include_bytes!("../../bpf/abi.h")[..]),
            ("bpf/maps.h", &include_bytes!("../../bpf/maps.h")[..]),
        ] {
            fnv1a(&mut h, path.as_bytes());
            fnv1a(&mut h, &(bytes.len() as u64).to_le_bytes());
            fnv1a(&mut h, bytes);
        }
        assert_eq!(ABI_VERSION, h);
    }
}
