//! The Rust side of bpf/abi.h: the skeleton's generated types, checked against the sizes
//! the C side has, and conversions between them and std types.
use std::net::{IpAddr, Ipv6Addr};

pub use crate::kernel::skel::types::{
    rf_addr_val, rf_counter, rf_dns_event, rf_event_hdr, rf_event_type, rf_flow_event, rf_flow_key,
    rf_flow_val, rf_glob, rf_guard_event, rf_guard_kind, rf_job, rf_limits, rf_link, rf_lpm_key,
    rf_name_key, rf_name_val, rf_ports, rf_query_key, rf_query_val, rf_reason, rf_resolver_key,
    rf_stream_key, rf_verdict,
};

// `ABI_VERSION`: computed by build.rs from the bytes of bpf/abi.h and bpf/maps.h.
include!(concat!(env!("OUT_DIR"), "/abi_version.rs"));

/// Bytes of a host entry's prefix in the trie: 32 bits of job id + 128 bits of address.
pub const LPM_FULL: u32 = rf_limits::RF_LPM_FULL.0;
pub const MAX_PORTS: usize = rf_limits::RF_MAX_PORTS.0 as usize;
pub const NAME_MAX: usize = rf_limits::RF_NAME_MAX.0 as usize;
pub const GLOBS_MAX: usize = rf_limits::RF_GLOBS_MAX.0 as usize;
pub const GLOB_PART_MAX: usize = rf_limits::RF_GLOB_PART_MAX.0 as usize;
pub const COUNTERS: usize = rf_counter::RF_CNT_MAX.0 as usize;

pub const ADDR_STATIC: u32 = 1;
pub const ADDR_LEARNED: u32 = 2;
pub const ADDR_SEEN: u32 = 4;

pub const DNS_ALLOWED: u32 = 1;
pub const DNS_MALFORMED: u32 = 2;
pub const DNS_TRUNCATED: u32 = 4;
pub const DNS_TRIE_FULL: u32 = 8;
pub const DNS_QUERY: u32 = 16;
pub const DNS_REFUSED: u32 = 32;
pub const DNS_TCP: u32 = 64;
pub const DNS_TCP_SPLIT: u32 = 128;
pub const DNS_TCP_SEGMENT: u32 = 256;
pub const DNS_TCP_FIRST: u32 = 512;
pub const DNS_OVERFLOW: u32 = 1024;
pub const DNS_UNJUDGED: u32 = 2048;
pub const DNS_SPECIAL: u32 = 4096;
/// Addresses the kernel binds from one answer; the agent binds the rest.
pub const DNS_ADDRS_MAX: usize = rf_limits::RF_DNS_ADDRS_MAX.0 as usize;

// The C compiler and the skeleton generator must agree on every layout we exchange.
const _: () = {
    assert!(std::mem::size_of::<rf_ports>() == 24);
    assert!(std::mem::size_of::<rf_job>() == 8);
    assert!(std::mem::size_of::<rf_lpm_key>() == 24);
    assert!(std::mem::size_of::<rf_addr_val>() == 56);
    assert!(std::mem::size_of::<rf_name_key>() == 16);
    assert!(std::mem::size_of::<rf_glob>() == 160);
    assert!(std::mem::size_of::<rf_name_val>() == 48 + 4 * 160 + 8 + 256);
    assert!(std::mem::size_of::<rf_resolver_key>() == 20);
    assert!(std::mem::size_of::<rf_query_key>() == 20);
    assert!(std::mem::size_of::<rf_flow_key>() == 28);
    assert!(std::mem::size_of::<rf_event_hdr>() == 16);
    assert!(std::mem::size_of::<rf_flow_event>() == 88);
    assert!(std::mem::size_of::<rf_dns_event>() == 80);
    assert!(std::mem::size_of::<rf_guard_event>() == 64);
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
