//! `ringfence policy check`: would the policy allow this endpoint, and which entry says so.
//! The question every user asks when a call is blocked, answered from the policy file alone
//! (nothing is loaded), with the same matching rules as the dataplane's reference
//! ([`Policy::allows`], [`Policy::allows_addr`]).

use std::net::IpAddr;

use crate::policy::{addr, is_loopback, is_metadata, Endpoint, HostPattern, Mode, Policy};

/// What is asked about: a DNS name or an address, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Name(String),
    Addr(IpAddr),
}

/// The policy's answer for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<'a> {
    /// Allowed by the policy (or always allowed: loopback).
    pub allowed: bool,
    /// What the dataplane would do: "allowed", "blocked" or "audited" (reported, passed).
    pub verdict: &'static str,
    /// The entry that matched, if one did.
    pub entry: Option<&'a Endpoint>,
    /// Why, in words.
    pub why: String,
}

/// Whether endpoint `e` allows a connection to `port` at an address learned for `name`.
pub(crate) fn entry_allows_name(e: &Endpoint, name: &str, port: u16) -> bool {
    e.port.matches(port) && e.host.matches_name(name)
}

/// Whether endpoint `e` (an address or network) covers `addr:port`.
pub(crate) fn entry_allows_addr(e: &Endpoint, a: IpAddr, port: u16) -> bool {
    match e.host {
        HostPattern::Net(net) => {
            e.port.matches(port) && addr::mapped_contains(net, addr::to_mapped(a))
        }
        _ => false,
    }
}

/// Parses `NAME[:PORT]`, `ADDRESS[:PORT]`, `[IPV6]:PORT` (port 443 when none is given, as in
/// policies). Names are lowercased, one trailing dot dropped.
pub fn parse_target(s: &str) -> Result<(Target, u16), String> {
    let bad_port = |p: &str| format!("{s:?}: bad port {p:?} (1-65535)");
    let port_of = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(bad_port(p)),
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?}: expected [IPV6]:PORT"))?;
        let a: std::net::Ipv6Addr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IPv6 address"))?;
        return Ok((Target::Addr(IpAddr::V6(a)), port_of(p)?));
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok((Target::Addr(a), crate::policy::DEFAULT_PORT));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, port_of(p)?),
        None => (s, crate::policy::DEFAULT_PORT),
    };
    if let Ok(a) = host.parse::<std::net::Ipv4Addr>() {
        return Ok((Target::Addr(IpAddr::V4(a)), port));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return Err(format!(
            "{s:?}: not a DNS name or an address (letters, digits, '-', '_' in labels of 1-63, \
             an optional :PORT)"
        ));
    }
    Ok((Target::Name(name), port))
}

/// What `policy` does with a connection to `target:port`.
pub fn check<'a>(policy: &'a Policy, target: &Target, port: u16) -> Answer<'a> {
    let not_allowed = |why: String, mode: Mode| Answer {
        allowed: false,
        verdict: match mode {
            Mode::Block => "blocked",
            Mode::Audit => "audited",
        },
        entry: None,
        why,
    };
    match target {
        Target::Name(n) => {
            if let Some(e) = policy
                .endpoints
                .iter()
                .find(|e| entry_allows_name(e, n, port))
            {
                return Answer {
                    allowed: true,
                    verdict: "allowed",
                    entry: Some(e),
                    why: format!("by {}", where_written(e)),
                };
            }
            let mode = policy.mode;
            let tail = match mode {
                Mode::Block => "",
                Mode::Audit => " (audit mode: reported and let through; blocked in block mode)",
            };
            not_allowed(format!("no entry matches {n}:{port}{tail}"), mode)
        }
        Target::Addr(a) => {
            if is_loopback(*a) {
                return Answer {
                    allowed: true,
                    verdict: "allowed",
                    entry: None,
                    why: "loopback is always allowed".into(),
                };
            }
            if let Some(e) = policy
                .endpoints
                .iter()
                .find(|e| entry_allows_addr(e, *a, port))
            {
                return Answer {
                    allowed: true,
                    verdict: "allowed",
                    entry: Some(e),
                    why: format!("by {}", where_written(e)),
                };
            }
            if is_metadata(*a) {
                // Blocked in every mode unless listed (as in the dataplane).
                return not_allowed(
                    "a metadata or link-local address, blocked unless an entry lists it".into(),
                    Mode::Block,
                );
            }
            let mode = policy.direct_ip;
            not_allowed(
                format!(
                    "no address entry covers it: a direct IP (direct-ip = \"{mode}\"); it passes \
                     only if a DNS answer for an allowed name produced it"
                ),
                mode,
            )
        }
    }
}

fn where_written(e: &Endpoint) -> String {
    format!(
        "entry {:?} at {}:{}:{}",
        e.text, e.location.source_name, e.location.line, e.location.column
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: &str) -> Policy {
        crate::policy::PolicyBuilder::from_toml_str(
            &format!(
                "mode = \"{mode}\"\nallowed-endpoints = \"\"\"\ngithub.com\n*.npmjs.org:*\n\
                 productionresultssa*.blob.core.windows.net:443\n198.51.100.0/24:22\n[2001:db8::1]:443\n\"\"\"\n"
            ),
            "p.toml",
        )
        .unwrap()
        .build_with_resolv_conf(std::path::Path::new("/dev/null"))
        .unwrap()
    }

    fn ask(p: &Policy, s: &str) -> (bool, &'static str, Option<String>) {
        let (t, port) = parse_target(s).unwrap();
        let a = check(p, &t, port);
        (a.allowed, a.verdict, a.entry.map(|e| e.text.clone()))
    }

    #[test]
    fn answers_name_the_entry() {
        let p = policy("block");
        assert_eq!(
            ask(&p, "GitHub.com."),
            (true, "allowed", Some("github.com".into()))
        );
        assert_eq!(ask(&p, "github.com:22"), (false, "blocked", None));
        assert_eq!(
            ask(&p, "registry.npmjs.org:80"),
            (true, "allowed", Some("*.npmjs.org:*".into()))
        );
        assert_eq!(ask(&p, "npmjs.org"), (false, "blocked", None));
        assert_eq!(
            ask(&p, "productionresultssa7.blob.core.windows.net"),
            (
                true,
                "allowed",
                Some("productionresultssa*.blob.core.windows.net:443".into())
            )
        );
        assert_eq!(
            ask(&p, "198.51.100.9:22"),
            (true, "allowed", Some("198.51.100.0/24:22".into()))
        );
        assert_eq!(ask(&p, "198.51.100.9"), (false, "blocked", None));
        assert_eq!(
            ask(&p, "[2001:db8::1]:443"),
            (true, "allowed", Some("[2001:db8::1]:443".into()))
        );
        assert_eq!(
            ask(&p, "2001:db8::1"),
            (true, "allowed", Some("[2001:db8::1]:443".into()))
        );
        assert_eq!(ask(&p, "127.0.0.1:9"), (true, "allowed", None));
        assert_eq!(ask(&p, "169.254.169.254:80"), (false, "blocked", None));
        let a = policy("audit");
        assert_eq!(ask(&a, "evil.test"), (false, "audited", None));
        // Direct IPs follow direct-ip (block by default), whatever the mode.
        assert_eq!(ask(&a, "203.0.113.9"), (false, "blocked", None));
    }

    #[test]
    fn bad_input_is_named() {
        for bad in [
            "",
            "a..b",
            "x:0",
            "x:99999",
            "x:",
            "[::1]",
            "[zz]:1",
            "*.npmjs.org",
            "a b",
            "<b>",
        ] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.starts_with(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
