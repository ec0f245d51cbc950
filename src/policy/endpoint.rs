//! The endpoint grammar shared by the policy file and `--allow`.
//!
//! Parsing functions here return a bare message; the caller knows where the token sits in
//! its source and turns the message into a [`PolicyError`](super::PolicyError).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};

use super::{HostPattern, PortSpec};

/// The port of an endpoint written without one (harden-runner's convention).
pub const DEFAULT_PORT: u16 = 443;

/// Longest DNS name in text form, without the trailing dot (255 wire bytes).
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// Parses one whitespace-free endpoint token.
pub(super) fn parse_token(tok: &str) -> Result<(HostPattern, PortSpec), String> {
    if let Some(rest) = tok.strip_prefix('[') {
        return parse_bracketed(rest, tok);
    }
    if let Some((addr, rest)) = tok.split_once('/') {
        // After "/len" a ':' can only introduce the port: the address part ended at '/'.
        let (len, port) = match rest.split_once(':') {
            Some((len, port)) => (len, parse_port(port, tok)?),
            None => (rest, PortSpec::Port(DEFAULT_PORT)),
        };
        return Ok((HostPattern::Net(parse_cidr(addr, len, tok)?), port));
    }
    // An unbracketed IPv6 address cannot carry a port: "2001:db8::1:443" is an address.
    if let Ok(ip) = tok.parse::<IpAddr>() {
        return Ok((
            HostPattern::Net(normalize_net(IpNet::from(ip))),
            PortSpec::Port(DEFAULT_PORT),
        ));
    }
    if tok.matches(':').count() > 1 {
        return Err(if looks_like_ipv6(tok) {
            format!("bad IPv6 address {tok:?}: write an IPv6 address with a port as [ADDR]:PORT")
        } else {
            format!("too many \":\" in endpoint {tok:?}: expected HOST, HOST:PORT or HOST:*")
        });
    }
    let (host, port) = match tok.rsplit_once(':') {
        Some((host, port)) => (host, parse_port(port, tok)?),
        None => (tok, PortSpec::Port(DEFAULT_PORT)),
    };
    if host.is_empty() {
        return Err(format!("missing host in endpoint {tok:?}"));
    }
    // No DNS name is all digits and dots (top-level domains are not numeric), so such a
    // host is an IPv4 address; reporting it as one gives the more useful message.
    if host.bytes().any(|b| b.is_ascii_digit())
        && host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        let addr: Ipv4Addr = host
            .parse()
            .map_err(|_| format!("bad IPv4 address {host:?} in endpoint {tok:?}"))?;
        return Ok((HostPattern::Net(IpNet::from(IpAddr::V4(addr))), port));
    }
    Ok((parse_name(host, tok)?, port))
}

/// `[2001:db8::1]`, `[2001:db8::1]:443`, `[2001:db8::/32]:*` (after the `[`).
fn parse_bracketed(rest: &str, tok: &str) -> Result<(HostPattern, PortSpec), String> {
    let Some((inner, after)) = rest.split_once(']') else {
        return Err(format!("missing \"]\" in endpoint {tok:?}"));
    };
    let port = if after.is_empty() {
        PortSpec::Port(DEFAULT_PORT)
    } else if let Some(port) = after.strip_prefix(':') {
        parse_port(port, tok)?
    } else {
        return Err(format!(
            "unexpected {after:?} after \"]\" in endpoint {tok:?}: expected :PORT or :*"
        ));
    };
    let not_v6 = || {
        format!("bad IPv6 address {inner:?} in endpoint {tok:?}: brackets enclose IPv6 addresses")
    };
    let net = match inner.split_once('/') {
        Some((addr, len)) if addr.parse::<Ipv6Addr>().is_ok() => parse_cidr(addr, len, tok)?,
        Some(_) => return Err(not_v6()),
        None => {
            let addr: Ipv6Addr = inner.parse().map_err(|_| not_v6())?;
            normalize_net(IpNet::from(IpAddr::V6(addr)))
        }
    };
    Ok((HostPattern::Net(net), port))
}

/// `*` or a decimal port 1..=65535.
pub(super) fn parse_port(port: &str, tok: &str) -> Result<PortSpec, String> {
    if port == "*" {
        return Ok(PortSpec::Any);
    }
    // u16::from_str accepts a leading '+'; a port is digits only.
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n @ 1..) = port.parse::<u16>() {
            return Ok(PortSpec::Port(n));
        }
    }
    Err(format!(
        "bad port {port:?} in endpoint {tok:?}: ports are 1-65535 or *"
    ))
}

fn parse_cidr(addr: &str, len: &str, tok: &str) -> Result<IpNet, String> {
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("bad address {addr:?} in endpoint {tok:?}"))?;
    let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = Some(len)
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|l| l.parse::<u8>().ok())
        .filter(|&p| p <= max)
        .ok_or_else(|| {
            format!("bad prefix length {len:?} in endpoint {tok:?}: expected 0-{max}")
        })?;
    let net = IpNet::new(ip, prefix).expect("prefix length checked against the family");
    if net.trunc().addr() != ip {
        // Say which bits are set: a user who wrote .7/24 may have meant the host /32.
        let stray = match (ip, net.hostmask()) {
            (IpAddr::V4(a), IpAddr::V4(m)) => IpAddr::V4(Ipv4Addr::from(a.to_bits() & m.to_bits())),
            (IpAddr::V6(a), IpAddr::V6(m)) => IpAddr::V6(Ipv6Addr::from(a.to_bits() & m.to_bits())),
            _ => unreachable!("an IpNet's mask has its address family"),
        };
        return Err(format!(
            "host bits set in endpoint {tok:?}: {addr} has {stray} set outside the /{prefix} prefix; \
             the network is {}",
            net.trunc()
        ));
    }
    Ok(normalize_net(net))
}

/// The dataplane stores IPv4 as IPv4-mapped IPv6, so `::ffff:198.51.100.0/120` and
/// `198.51.100.0/24` are the same trie key; folding the former into the latter lets the
/// compiler merge them instead of emitting two keys whose port sets overwrite each other.
fn normalize_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let Some(v4) = v6.addr().to_ipv4_mapped() {
                let v4 = Ipv4Net::new(v4, v6.prefix_len() - 96).expect("96..=128 minus 96");
                return IpNet::V4(v4);
            }
        }
    }
    net
}

fn looks_like_ipv6(tok: &str) -> bool {
    tok.bytes()
        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
}

/// A DNS name, `*.parent`, or `ab*cd.parent`.
fn parse_name(host: &str, tok: &str) -> Result<HostPattern, String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err(format!("empty name in endpoint {tok:?}"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name in endpoint {tok:?} is {} characters long; DNS names are at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let lower = name.to_ascii_lowercase();
    let labels: Vec<&str> = lower.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if label.is_empty() {
            return Err(format!("empty label in name {host:?} in endpoint {tok:?}"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "label {label:?} in endpoint {tok:?} is {} bytes long; labels are at most {MAX_LABEL_LEN}",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '*'))
        {
            let hint = if c.is_ascii() {
                ""
            } else {
                " (write internationalised names in their xn-- form)"
            };
            return Err(format!(
                "bad character {c:?} in name {host:?} in endpoint {tok:?}: names use letters, digits, '-' and '_'{hint}"
            ));
        }
        let stars = label.matches('*').count();
        if stars > 0 && i > 0 {
            return Err(format!(
                "\"*\" in endpoint {tok:?} is only allowed in the leftmost label"
            ));
        }
        if stars > 1 {
            return Err(format!(
                "more than one \"*\" in label {label:?} in endpoint {tok:?}"
            ));
        }
    }
    let parent = || labels[1..].join(".");
    if labels[0] == "*" {
        if labels.len() == 1 {
            return Err(format!(
                "endpoint {tok:?} would allow every name: \"*\" needs a parent domain, as in \"*.example.com\""
            ));
        }
        return Ok(HostPattern::Subdomains(parent()));
    }
    if let Some((prefix, suffix)) = labels[0].split_once('*') {
        if labels.len() == 1 {
            return Err(format!(
                "label glob in endpoint {tok:?} needs a parent domain, as in \"ab*.example.com\""
            ));
        }
        return Ok(HostPattern::LabelGlob {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
            parent: parent(),
        });
    }
    Ok(HostPattern::Exact(lower))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> HostPattern {
        HostPattern::Net(s.parse().unwrap())
    }
    fn exact(s: &str) -> HostPattern {
        HostPattern::Exact(s.into())
    }
    fn glob(prefix: &str, suffix: &str, parent: &str) -> HostPattern {
        HostPattern::LabelGlob {
            prefix: prefix.into(),
            suffix: suffix.into(),
            parent: parent.into(),
        }
    }
    const P443: PortSpec = PortSpec::Port(443);

    #[test]
    fn every_endpoint_form() {
        let cases: &[(&str, HostPattern, PortSpec)] = &[
            ("github.com", exact("github.com"), P443),
            ("github.com:443", exact("github.com"), P443),
            ("github.com:22", exact("github.com"), PortSpec::Port(22)),
            ("github.com:*", exact("github.com"), PortSpec::Any),
            ("GitHub.COM.", exact("github.com"), P443),
            ("github.com.:80", exact("github.com"), PortSpec::Port(80)),
            ("my_host-1.internal", exact("my_host-1.internal"), P443),
            ("localhost", exact("localhost"), P443),
            ("1e100.net:65535", exact("1e100.net"), PortSpec::Port(65535)),
            (
                "*.npmjs.org",
                HostPattern::Subdomains("npmjs.org".into()),
                P443,
            ),
            (
                "*.NPMJS.org:*",
                HostPattern::Subdomains("npmjs.org".into()),
                PortSpec::Any,
            ),
            ("*.com", HostPattern::Subdomains("com".into()), P443),
            (
                "productionresultssa*.blob.core.windows.net:443",
                glob("productionresultssa", "", "blob.core.windows.net"),
                P443,
            ),
            (
                "*-cache.example.com",
                glob("", "-cache", "example.com"),
                P443,
            ),
            (
                "Ab*Cd.example.com:8443",
                glob("ab", "cd", "example.com"),
                PortSpec::Port(8443),
            ),
            ("198.51.100.7", net("198.51.100.7/32"), P443),
            (
                "198.51.100.7:80",
                net("198.51.100.7/32"),
                PortSpec::Port(80),
            ),
            ("198.51.100.7:*", net("198.51.100.7/32"), PortSpec::Any),
            ("198.51.100.0/24", net("198.51.100.0/24"), P443),
            (
                "198.51.100.0/24:53",
                net("198.51.100.0/24"),
                PortSpec::Port(53),
            ),
            ("0.0.0.0/0:*", net("0.0.0.0/0"), PortSpec::Any),
            ("2001:db8::1", net("2001:db8::1/128"), P443),
            // Unbracketed: the last group is part of the address, not a port.
            ("2001:db8::1:443", net("2001:db8::1:443/128"), P443),
            ("[2001:db8::1]:443", net("2001:db8::1/128"), P443),
            (
                "[2001:db8::1]:22",
                net("2001:db8::1/128"),
                PortSpec::Port(22),
            ),
            ("[2001:db8::1]", net("2001:db8::1/128"), P443),
            ("[2001:db8::1]:*", net("2001:db8::1/128"), PortSpec::Any),
            ("2001:db8::/32", net("2001:db8::/32"), P443),
            ("2001:db8::/32:443", net("2001:db8::/32"), P443),
            ("2001:db8::/32:*", net("2001:db8::/32"), PortSpec::Any),
            (
                "[2001:db8::/48]:8080",
                net("2001:db8::/48"),
                PortSpec::Port(8080),
            ),
            ("::/0", net("::/0"), P443),
            // IPv4-mapped forms fold into IPv4, as the dataplane stores them.
            ("::ffff:198.51.100.7", net("198.51.100.7/32"), P443),
            (
                "::ffff:198.51.100.0/120:80",
                net("198.51.100.0/24"),
                PortSpec::Port(80),
            ),
        ];
        for (tok, host, port) in cases {
            assert_eq!(parse_token(tok), Ok((host.clone(), *port)), "token {tok:?}");
        }
    }

    #[test]
    fn rejected_endpoints_name_the_cause() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        let max_label = format!("{}.com", "a".repeat(63));
        assert!(parse_token(&max_label).is_ok(), "63-byte label is legal");
        let l63 = "a".repeat(63);
        let max_name = format!("{l63}.{l63}.{l63}.{}", "a".repeat(61));
        assert_eq!(max_name.len(), 253);
        assert!(
            parse_token(&max_name).is_ok(),
            "253-character name is legal"
        );
        assert!(
            parse_token(&format!("{max_name}.")).is_ok(),
            "and its trailing dot"
        );
        let over = format!("{max_name}a");
        assert!(parse_token(&over)
            .unwrap_err()
            .contains("is 254 characters long"));
        let cases: &[(&str, &str)] = &[
            (
                "github.com:44x",
                r#"bad port "44x" in endpoint "github.com:44x": ports are 1-65535 or *"#,
            ),
            ("github.com:0", r#"bad port "0""#),
            ("github.com:65536", r#"bad port "65536""#),
            ("github.com:", r#"bad port """#),
            ("github.com:+443", r#"bad port "+443""#),
            ("github.com:443:80", "too many \":\""),
            (":443", "missing host"),
            ("github..com", "empty label"),
            ("github.com..", "empty label"),
            (".", "empty name"),
            (&long_label, "is 64 bytes long; labels are at most 63"),
            (
                &long_name,
                "is 308 characters long; DNS names are at most 253",
            ),
            ("git hub.com", "bad character ' '"),
            ("gith\u{fc}b.com", "xn--"),
            ("git!hub.com", "bad character '!'"),
            ("*", "would allow every name"),
            ("*:443", "would allow every name"),
            ("ab*", "needs a parent domain"),
            ("a.*.example.com", "only allowed in the leftmost label"),
            ("example.*", "only allowed in the leftmost label"),
            ("*.*.example.com", "only allowed in the leftmost label"),
            ("a*b*.example.com", "more than one \"*\""),
            ("**.example.com", "more than one \"*\""),
            ("198.51.100", r#"bad IPv4 address "198.51.100""#),
            ("198.51.100.256:443", "bad IPv4 address"),
            (
                "198.51.100.0/33",
                r#"bad prefix length "33" in endpoint "198.51.100.0/33": expected 0-32"#,
            ),
            ("2001:db8::/129", "expected 0-128"),
            ("198.51.100.0/", "bad prefix length \"\""),
            ("198.51.100.0/2x", "bad prefix length \"2x\""),
            ("198.51.100.0/24:0", "bad port \"0\""),
            ("example.com/24", "bad address \"example.com\""),
            (
                "198.51.100.7/24",
                r#"host bits set in endpoint "198.51.100.7/24": 198.51.100.7 has 0.0.0.7 set outside the /24 prefix; the network is 198.51.100.0/24"#,
            ),
            (
                "2001:db8::1/32",
                "2001:db8::1 has ::1 set outside the /32 prefix; the network is 2001:db8::/32",
            ),
            (
                "2001:db8:::1",
                "write an IPv6 address with a port as [ADDR]:PORT",
            ),
            ("[2001:db8::1", "missing \"]\""),
            ("[2001:db8::1]443", "unexpected \"443\" after \"]\""),
            ("[2001:db8::1]:99999", "bad port \"99999\""),
            ("[198.51.100.7]:443", "brackets enclose IPv6 addresses"),
            ("[github.com]:443", "brackets enclose IPv6 addresses"),
        ];
        for (tok, want) in cases {
            match parse_token(tok) {
                Ok(v) => panic!("{tok:?} parsed as {v:?}, wanted an error containing {want:?}"),
                Err(msg) => assert!(msg.contains(want), "{tok:?}: {msg:?} lacks {want:?}"),
            }
        }
    }
}
