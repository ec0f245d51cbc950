//! `allowed-inbound`: which peers may connect to sockets the job listens on.
//!
//! ```toml
//! allowed-inbound = """
//! 198.51.100.7            # this peer, to any port the job listens on
//! 203.0.113.0/24:8080     # these peers, to the job's port 8080 only
//! [2001:db8::1]:22
//! *:9000                  # every peer, to port 9000
//! """
//! ```
//!
//! A peer is an address or a network (IPv6 with a port in brackets or after the prefix
//! length, as in `allowed-endpoints`), or `*` for every peer; the port is the job's local,
//! listening port, and without one every port is meant (a listed peer's TCP connections to
//! that port, and the job's UDP datagrams from that port to the peer). Names are refused: a connecting peer
//! comes with an address, not with a DNS answer the dataplane could tie it to. Without the
//! key, no inbound connection is allowed (in block mode they are refused; in audit mode
//! reported). Loopback peers are always allowed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};

use super::{addr, endpoint, Endpoint, HostPattern, PolicyError, PortSet, PortSpec};

/// `*`: every peer, IPv4 (stored IPv4-mapped by the dataplane) and IPv6 alike.
pub fn every_peer() -> IpNet {
    IpNet::V6(Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 0).expect("/0 is a valid prefix"))
}

/// Parses one whitespace-free `allowed-inbound` token.
pub(super) fn parse_token(tok: &str) -> Result<(HostPattern, PortSpec), String> {
    if let Some(rest) = tok.strip_prefix('*') {
        return match rest.strip_prefix(':') {
            None if rest.is_empty() => Ok((HostPattern::Net(every_peer()), PortSpec::Any)),
            Some(port) => Ok((
                HostPattern::Net(every_peer()),
                endpoint::parse_port(port, tok)?,
            )),
            None => Err(format!(
                "bad peer {tok:?} in allowed-inbound: expected *, *:PORT, an address or a network"
            )),
        };
    }
    // Whether a port was written: the endpoint grammar fills in 443 when none is, which for
    // a listening port would be wrong.
    let has_port = if tok.starts_with('[') {
        tok.contains("]:")
    } else if let Some((_, rest)) = tok.split_once('/') {
        rest.contains(':')
    } else {
        tok.parse::<IpAddr>().is_err() && tok.matches(':').count() == 1
    };
    let (host, port) = endpoint::parse_token(tok)?;
    if !matches!(host, HostPattern::Net(_)) {
        return Err(format!(
            "{tok:?} in allowed-inbound is a name: inbound peers are addresses or networks \
             (a connecting peer brings no DNS answer to judge it by), or * for every peer"
        ));
    }
    Ok((host, if has_port { port } else { PortSpec::Any }))
}

/// One entry per distinct peer network, ports merged; each entry also carries the ports of
/// every network that covers it, so that the dataplane's longest-prefix match finds the
/// union (`198.51.100.7:22` with `*:8080` lets 198.51.100.7 reach 8080 too).
///
/// Linear in the number of rules: the covering networks of each entry are found by
/// truncating it to every shorter prefix (at most 128) and looking each up, not by testing
/// every pair of entries.
pub(super) fn compile(rules: &[Endpoint]) -> Result<Vec<(IpNet, PortSet)>, PolicyError> {
    let mut out: Vec<(IpNet, PortSet, &Endpoint)> = Vec::new();
    // Keyed in the IPv4-mapped space the dataplane uses, where 198.51.100.0/24 is
    // ::ffff:198.51.100.0/120 and `*` (::/0) covers IPv4 too.
    let mut by_net: HashMap<Ipv6Net, usize> = HashMap::new();
    for r in rules {
        let HostPattern::Net(net) = r.host else {
            return Err(r.error(format!("{:?} is not an address or network", r.text)));
        };
        let at = *by_net.entry(mapped(net)).or_insert_with(|| {
            out.push((net, PortSet::None, r));
            out.len() - 1
        });
        out[at].1.add(r.port).map_err(|()| too_many(r))?;
    }
    let own: Vec<PortSet> = out.iter().map(|(_, p, _)| p.clone()).collect();
    for (net, ports, r) in &mut out {
        let m = mapped(*net);
        for len in 0..m.prefix_len() {
            let cover = Ipv6Net::new(m.network(), len)
                .expect("shorter than a valid prefix")
                .trunc();
            if let Some(&at) = by_net.get(&cover) {
                ports.union(&own[at]).map_err(|()| too_many(r))?;
            }
        }
    }
    Ok(out.into_iter().map(|(n, p, _)| (n, p)).collect())
}

/// `net` in the IPv4-mapped IPv6 space, host bits cleared.
fn mapped(net: IpNet) -> Ipv6Net {
    match net {
        IpNet::V4(n) => Ipv6Net::new(n.network().to_ipv6_mapped(), n.prefix_len() + 96)
            .expect("an IPv4 prefix plus 96 is a valid IPv6 prefix"),
        IpNet::V6(n) => n,
    }
    .trunc()
}

fn too_many(r: &Endpoint) -> PolicyError {
    r.error(format!(
        "allowed-inbound {:?} adds a port beyond the {} the dataplane holds per peer network \
         (ports of covering networks count too): allow fewer ports or any port",
        r.text,
        super::MAX_PORTS
    ))
}

/// Whether `rules` let `peer` connect to the job's local `port`; loopback always may.
pub(super) fn allows(rules: &[Endpoint], peer: IpAddr, port: u16) -> bool {
    if addr::is_loopback(peer) {
        return true;
    }
    let peer = addr::to_mapped(peer);
    rules.iter().any(|r| match r.host {
        HostPattern::Net(net) => r.port.matches(port) && addr::mapped_contains(net, peer),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn parse(s: &str) -> Result<Vec<Endpoint>, PolicyError> {
        Policy::parse_inbound(s, "--allow-inbound")
    }

    #[test]
    fn tokens() {
        let cases: &[(&str, &str, PortSpec)] = &[
            ("*", "::/0", PortSpec::Any),
            ("*:8080", "::/0", PortSpec::Port(8080)),
            ("198.51.100.7", "198.51.100.7/32", PortSpec::Any),
            ("198.51.100.7:22", "198.51.100.7/32", PortSpec::Port(22)),
            (
                "203.0.113.0/24:8080",
                "203.0.113.0/24",
                PortSpec::Port(8080),
            ),
            ("203.0.113.0/24", "203.0.113.0/24", PortSpec::Any),
            ("2001:db8::1", "2001:db8::1/128", PortSpec::Any),
            ("[2001:db8::1]:22", "2001:db8::1/128", PortSpec::Port(22)),
            ("[2001:db8::1]", "2001:db8::1/128", PortSpec::Any),
            ("2001:db8::/32:443", "2001:db8::/32", PortSpec::Port(443)),
        ];
        for (tok, net, port) in cases {
            let (host, p) = parse_token(tok).unwrap_or_else(|e| panic!("{tok}: {e}"));
            assert_eq!(host, HostPattern::Net(net.parse().unwrap()), "{tok}");
            assert_eq!(p, *port, "{tok}");
        }
    }

    #[test]
    fn errors_name_line_column_and_cause() {
        let e = parse("198.51.100.7\n  github.com:22").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3));
        assert!(e.message.contains("is a name"), "{e}");
        let e = parse("*x").unwrap_err();
        assert!(e.message.contains("expected *, *:PORT"), "{e}");
        let e = parse("198.51.100.7:0").unwrap_err();
        assert!(e.message.contains("bad port"), "{e}");
        let e = Policy::from_toml_str(
            "mode = \"block\"\nallowed-inbound = \"\"\"\n198.51.100.7\n*.test\n\"\"\"\n",
            "p.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.to_string().starts_with("p.toml:4:1: "), "{e}");
    }

    #[test]
    fn covering_by_truncation_matches_every_pair() {
        // Nested networks of both families and `*`, ports drawn from few values so unions
        // stay within MAX_PORTS; the reference tests every pair, as the compiler once did.
        let mut toks = vec!["*:9".to_string()];
        for i in 0..300u32 {
            let p = 1 + i % 3;
            toks.push(match i % 6 {
                0 => format!("198.51.100.{}:{p}", i % 256),
                1 => format!("198.51.{}.0/24:{p}", 100 + i % 2),
                2 => format!("198.51.100.{}/30:{p}", (i % 64) * 4),
                3 => format!("2001:db8:{:x}::/48:{p}", i % 4),
                4 => format!("[2001:db8:{:x}::{:x}]:{p}", i % 4, i),
                _ => format!("203.0.113.0/24:{p}"),
            });
        }
        let rules = parse(&toks.join(" ")).unwrap();
        let got = compile(&rules).unwrap();
        for (net, ports) in &got {
            let mut want = PortSet::None;
            for r in &rules {
                let HostPattern::Net(n) = r.host else {
                    unreachable!()
                };
                let (a, b) = (mapped(n), mapped(*net));
                if a.prefix_len() <= b.prefix_len() && a.contains(&b.network()) {
                    want.add(r.port).unwrap();
                }
            }
            assert_eq!(*ports, want, "{net}");
        }
    }

    #[test]
    fn covering_networks_lend_their_ports() {
        let rules = parse("198.51.100.7:22 *:8080 198.51.100.0/24:9000").unwrap();
        let c = compile(&rules).unwrap();
        let get = |n: &str| {
            c.iter()
                .find(|(net, _)| *net == n.parse::<IpNet>().unwrap())
                .map(|(_, p)| p.clone())
                .unwrap()
        };
        assert_eq!(
            get("198.51.100.7/32"),
            PortSet::Ports([22, 8080, 9000].into())
        );
        assert_eq!(get("198.51.100.0/24"), PortSet::Ports([8080, 9000].into()));
        assert_eq!(get("::/0"), PortSet::Ports([8080].into()));
        assert!(allows(&rules, "198.51.100.7".parse().unwrap(), 8080));
        assert!(allows(&rules, "2001:db8::9".parse().unwrap(), 8080));
        assert!(!allows(&rules, "2001:db8::9".parse().unwrap(), 22));
        assert!(allows(&rules, "127.0.0.1".parse().unwrap(), 1));
    }
}
