//! Address classes the dataplane treats specially, and the host's resolvers.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;

use super::PolicyError;

/// Where the default DNS resolvers come from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// EC2's IPv6 instance metadata service.
const EC2_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Loopback, which ringfence always allows: 127.0.0.0/8 and ::1 (also IPv4-mapped).
pub fn is_loopback(addr: IpAddr) -> bool {
    addr.to_canonical().is_loopback()
}

/// Link-local and cloud metadata addresses, blocked unless a policy lists them:
/// 169.254.0.0/16 (169.254.169.254 on every major cloud), fe80::/10, fd00:ec2::254.
pub fn is_metadata(addr: IpAddr) -> bool {
    match addr.to_canonical() {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80 || a == EC2_METADATA_V6,
    }
}

/// Addresses a DNS answer never opens, only a static policy entry does (the kernel's
/// `is_special_answer` in bpf/lib/parse.h): 0.0.0.0/8, 127/8, 169.254/16, 224/4 and 240/4
/// (broadcast included); ::, ::1, fe80::/10, ff00::/8, fd00:ec2::254; the IPv4-mapped and
/// NAT64 (64:ff9b::/96) forms of the IPv4 ones. Private ranges are not special: internal
/// mirrors and cloud endpoints legitimately resolve to them.
pub fn is_special(addr: IpAddr) -> bool {
    let v4 = |a: Ipv4Addr| {
        let o = a.octets();
        o[0] == 0 || o[0] == 127 || (o[0] == 169 && o[1] == 254) || o[0] >= 224
    };
    match addr.to_canonical() {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => {
            let s = a.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return v4(Ipv4Addr::from(a.to_bits() as u32));
            }
            a.is_unspecified() || a.is_loopback() || s[0] >> 8 == 0xff || is_metadata(addr)
        }
    }
}

/// The 16-byte form the dataplane keys its trie with: IPv4 as ::ffff:a.b.c.d.
pub(super) fn to_mapped(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Whether `net`, placed in the mapped space as the dataplane places it, contains `addr`.
pub(super) fn mapped_contains(net: IpNet, addr: Ipv6Addr) -> bool {
    let (base, len) = match net {
        IpNet::V4(n) => (n.network().to_ipv6_mapped(), n.prefix_len() + 96),
        IpNet::V6(n) => (n.network(), n.prefix_len()),
    };
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    addr.to_bits() & mask == base.to_bits() & mask
}

/// The nameservers of a resolv.conf text, as the C library would use them: `nameserver`
/// lines in order, an IPv6 zone (`%eth0`) dropped, malformed addresses skipped (the
/// library skips them too). With no usable line the library falls back to the local host,
/// so the result is then `[127.0.0.1]`.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    let servers: Vec<IpAddr> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                return None; // also comments: they start with '#' or ';'
            }
            let addr = words.next()?;
            let addr = addr.split_once('%').map_or(addr, |(a, _zone)| a);
            addr.parse().ok()
        })
        .collect();
    if servers.is_empty() {
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
    } else {
        servers
    }
}

/// Reads the nameservers from a resolv.conf file. A missing file means the C library's
/// default, `[127.0.0.1]`; any other read error is a [`PolicyError`] naming the file.
pub fn read_resolv_conf(path: &Path) -> Result<Vec<IpAddr>, PolicyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse_resolv_conf(&text)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(parse_resolv_conf("")),
        Err(e) => Err(PolicyError::whole(
            &path.display().to_string(),
            format!(
                "cannot read the default DNS resolvers ({e}); give dns-resolvers in the policy"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn address_classes() {
        let cases = [
            // (addr, loopback, metadata)
            ("127.0.0.1", true, false),
            ("127.255.0.9", true, false),
            ("::1", true, false),
            ("::ffff:127.0.0.1", true, false),
            ("169.254.169.254", false, true),
            ("169.254.0.1", false, true),
            ("::ffff:169.254.169.254", false, true),
            ("fe80::1", false, true),
            ("febf::1", false, true),
            ("fec0::1", false, false),
            ("fd00:ec2::254", false, true),
            ("fd00:ec2::253", false, false),
            ("169.253.169.254", false, false),
            ("198.51.100.7", false, false),
            ("2001:db8::1", false, false),
            ("::", false, false),
        ];
        for (a, lo, md) in cases {
            assert_eq!((is_loopback(ip(a)), is_metadata(ip(a))), (lo, md), "{a}");
        }
    }

    #[test]
    fn special_answers() {
        for a in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "224.0.0.1",
            "239.1.1.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "ff02::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_special(ip(a)), "{a}");
        }
        for a in [
            "10.0.0.1",
            "192.168.1.1",
            "172.16.0.1",
            "198.51.100.7",
            "223.255.255.255",
            "2001:db8::1",
            "fd00::1",
            "::ffff:198.51.100.7",
            "64:ff9b::c633:6407",
        ] {
            assert!(!is_special(ip(a)), "{a}");
        }
    }

    #[test]
    fn mapped_containment() {
        let cases = [
            ("198.51.100.0/24", "198.51.100.7", true),
            ("198.51.100.0/24", "198.51.101.7", false),
            ("198.51.100.7/32", "::ffff:198.51.100.7", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("::/0", "198.51.100.7", true),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("2001:db8::1/128", "2001:db8::1", true),
        ];
        for (net, a, want) in cases {
            assert_eq!(
                mapped_contains(net.parse().unwrap(), to_mapped(ip(a))),
                want,
                "{net} {a}"
            );
        }
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\n\
                    ; also a comment\n\
                    search example.com\n\
                    nameserver 198.51.100.53\n\
                    nameserver\t2001:db8::53  # trailing words ignored\n\
                    nameserver fe80::1%eth0\n\
                    nameserver not-an-address\n\
                    #nameserver 203.0.113.1\n\
                    options edns0\n\
                    nameserver 127.0.0.53\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                ip("198.51.100.53"),
                ip("2001:db8::53"),
                ip("fe80::1"),
                ip("127.0.0.53")
            ]
        );
        assert_eq!(parse_resolv_conf("search x\n"), vec![ip("127.0.0.1")]);
    }

    #[test]
    fn resolv_conf_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "nameserver 203.0.113.53\n").unwrap();
        assert_eq!(read_resolv_conf(&path).unwrap(), vec![ip("203.0.113.53")]);
        assert_eq!(
            read_resolv_conf(&dir.path().join("missing")).unwrap(),
            vec![ip("127.0.0.1")]
        );
        // A directory cannot be read as text: that is an error naming the path.
        let err = read_resolv_conf(dir.path()).unwrap_err();
        assert_eq!(err.source_name, dir.path().display().to_string());
        assert!(err.message.contains("give dns-resolvers"), "{err}");
    }
}
