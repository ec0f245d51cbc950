//! The compiled form of a policy: what the dataplane loads into its maps.
//!
//! Names become one entry per distinct suffix, keyed by [`name_hash`] of the lowercased
//! wire-format suffix (`rf_name_key`/`rf_name_val` in bpf/abi.h). The kernel hashes a DNS
//! question name from its last byte to its first, so at every label start it holds the hash
//! of that suffix and needs one map lookup per label to find exact names, `*.suffix`
//! wildcards and label globs alike.

use std::collections::{BTreeSet, HashMap};

use ipnet::IpNet;

use super::{Endpoint, HostPattern, PolicyError, PortSpec};

/// Distinct ports one set can carry (`RF_MAX_PORTS` in bpf/abi.h).
pub const MAX_PORTS: usize = crate::kernel::abi::MAX_PORTS;
/// Label globs sharing one parent suffix (`RF_GLOBS_MAX` in bpf/abi.h).
pub const MAX_GLOBS: usize = crate::kernel::abi::GLOBS_MAX;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The destination ports an entry allows. Union semantics: `Any` absorbs every port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PortSet {
    /// No port: the entry exists for another reason (e.g. only its wildcard is allowed).
    #[default]
    None,
    Any,
    /// Never empty, at most [`MAX_PORTS`] ports.
    Ports(BTreeSet<u16>),
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        match self {
            PortSet::None => false,
            PortSet::Any => true,
            PortSet::Ports(ports) => ports.contains(&port),
        }
    }

    /// Adds `spec`. Fails, leaving the set unchanged, when that would make more than
    /// [`MAX_PORTS`] distinct ports: the dataplane has no room for them, and silently
    /// widening to "any port" would allow more than the policy says.
    pub(super) fn add(&mut self, spec: PortSpec) -> Result<(), ()> {
        match (&mut *self, spec) {
            (PortSet::Any, _) => {}
            (_, PortSpec::Any) => *self = PortSet::Any,
            (PortSet::None, PortSpec::Port(p)) => *self = PortSet::Ports(BTreeSet::from([p])),
            (PortSet::Ports(ports), PortSpec::Port(p)) => {
                if !ports.contains(&p) && ports.len() >= MAX_PORTS {
                    return Err(());
                }
                ports.insert(p);
            }
        }
        Ok(())
    }
}

impl PortSet {
    /// `self |= other`, with [`add`](Self::add)'s limit; on failure `self` may hold part
    /// of `other`.
    pub(super) fn union(&mut self, other: &PortSet) -> Result<(), ()> {
        match other {
            PortSet::None => Ok(()),
            PortSet::Any => self.add(PortSpec::Any),
            PortSet::Ports(ps) => ps.iter().try_for_each(|p| self.add(PortSpec::Port(*p))),
        }
    }
}

/// What one wire-format suffix allows (`rf_name_val`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    /// Lowercased wire format without the terminating zero: `\x06github\x03com`.
    pub wire: Vec<u8>,
    /// `name_hash(&wire)`.
    pub hash: u64,
    /// Ports allowed for the name itself.
    pub exact: PortSet,
    /// Ports allowed for every name strictly below it (`*.suffix`).
    pub wildcard: PortSet,
    /// Label globs whose parent is this suffix; at most [`MAX_GLOBS`].
    pub globs: Vec<GlobEntry>,
}

/// One `prefix*suffix` label directly below a [`NameEntry`]'s suffix (`rf_glob`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobEntry {
    /// Lowercased label bytes before the `*` (at most 62: the label holds the `*` too).
    pub prefix: Vec<u8>,
    /// Lowercased label bytes after the `*`.
    pub suffix: Vec<u8>,
    pub ports: PortSet,
}

/// A policy compiled for the dataplane.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Compiled {
    /// One entry per distinct suffix, in order of first appearance in the policy.
    pub names: Vec<NameEntry>,
    /// One entry per distinct network, ports merged, in order of first appearance.
    /// IPv4-mapped IPv6 networks have already been folded into IPv4 by the parser.
    pub prefixes: Vec<(IpNet, PortSet)>,
    /// `allowed-inbound`: peer networks and the job's local ports they may connect to, each
    /// entry holding the ports of the networks that cover it too (`::/0` is every peer).
    pub inbound: Vec<(IpNet, PortSet)>,
}

/// The lowercased wire format of `name` without the terminating zero byte:
/// `github.com` (or `github.com.`) becomes `\x06github\x03com`; the root (`""` or `"."`)
/// becomes nothing.
///
/// # Panics
/// If a label is empty or longer than 63 bytes: such a name has no wire format. Names in a
/// parsed [`Policy`](super::Policy) never are.
pub fn wire_name(name: &str) -> Vec<u8> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut wire = Vec::with_capacity(name.len() + 1);
    if name.is_empty() {
        return wire;
    }
    for label in name.split('.') {
        assert!(
            (1..=63).contains(&label.len()),
            "label {label:?} of {name:?} is not 1-63 bytes long"
        );
        wire.push(label.len() as u8);
        wire.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    wire
}

/// FNV-1a 64 over the lowercased bytes of a wire-format suffix, from LAST to FIRST,
/// exactly as the kernel computes it while walking a question name right to left.
pub fn name_hash(wire_suffix: &[u8]) -> u64 {
    let mut h = FNV_OFFSET_BASIS;
    for b in wire_suffix.iter().rev() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

pub(super) fn compile(endpoints: &[Endpoint]) -> Result<Compiled, PolicyError> {
    let mut out = Compiled::default();
    let mut by_hash: HashMap<u64, usize> = HashMap::new();
    // Networks seen so far, by value: a linear search per entry made compiling quadratic.
    let mut by_net: HashMap<IpNet, usize> = HashMap::new();
    for ep in endpoints {
        let too_many_ports = |what: &str| {
            ep.error(format!(
                "endpoint {:?} adds a port beyond the {MAX_PORTS} the dataplane holds for {what}: \
                 allow fewer ports or any port (\":*\")",
                ep.text
            ))
        };
        match &ep.host {
            HostPattern::Net(net) => {
                let at = *by_net.entry(*net).or_insert_with(|| {
                    out.prefixes.push((*net, PortSet::None));
                    out.prefixes.len() - 1
                });
                out.prefixes[at]
                    .1
                    .add(ep.port)
                    .map_err(|()| too_many_ports(&net.to_string()))?;
            }
            HostPattern::Exact(name) => {
                entry(&mut out.names, &mut by_hash, name, ep)?
                    .exact
                    .add(ep.port)
                    .map_err(|()| too_many_ports(&format!("{name:?}")))?;
            }
            HostPattern::Subdomains(parent) => {
                entry(&mut out.names, &mut by_hash, parent, ep)?
                    .wildcard
                    .add(ep.port)
                    .map_err(|()| too_many_ports(&format!("\"*.{parent}\"")))?;
            }
            HostPattern::LabelGlob {
                prefix,
                suffix,
                parent,
            } => {
                let e = entry(&mut out.names, &mut by_hash, parent, ep)?;
                let (prefix, suffix) = (prefix.as_bytes(), suffix.as_bytes());
                let at = match e
                    .globs
                    .iter()
                    .position(|g| g.prefix == prefix && g.suffix == suffix)
                {
                    Some(at) => at,
                    None if e.globs.len() >= MAX_GLOBS => {
                        return Err(ep.error(format!(
                            "endpoint {:?} is a label glob beyond the {MAX_GLOBS} the dataplane \
                             holds under \"{parent}\": use fewer globs or \"*.{parent}\"",
                            ep.text
                        )))
                    }
                    None => {
                        e.globs.push(GlobEntry {
                            prefix: prefix.to_vec(),
                            suffix: suffix.to_vec(),
                            ports: PortSet::None,
                        });
                        e.globs.len() - 1
                    }
                };
                e.globs[at]
                    .ports
                    .add(ep.port)
                    .map_err(|()| too_many_ports(&format!("{:?}", ep.host.to_string())))?;
            }
        }
    }
    Ok(out)
}

/// The entry for suffix `name`, created on first use.
fn entry<'a>(
    names: &'a mut Vec<NameEntry>,
    by_hash: &mut HashMap<u64, usize>,
    name: &str,
    ep: &Endpoint,
) -> Result<&'a mut NameEntry, PolicyError> {
    let wire = wire_name(name);
    let hash = name_hash(&wire);
    let at = match by_hash.get(&hash) {
        // The kernel keys entries by hash alone; two suffixes sharing one would overwrite
        // each other, so refuse rather than load a policy that silently loses one.
        Some(&at) if names[at].wire != wire => {
            return Err(ep.error(format!(
                "endpoint {:?}: the name hash of \"{name}\" collides with that of another \
                 name in the policy; remove one of them",
                ep.text
            )))
        }
        Some(&at) => at,
        None => {
            names.push(NameEntry {
                wire,
                hash,
                exact: PortSet::None,
                wildcard: PortSet::None,
                globs: Vec::new(),
            });
            by_hash.insert(hash, names.len() - 1);
            names.len() - 1
        }
    };
    Ok(&mut names[at])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    #[test]
    fn hash_known_answers() {
        // Published FNV-1a 64 vectors: "" -> offset basis, "a", and "foobar" (fed here
        // reversed, because name_hash consumes bytes last to first).
        assert_eq!(name_hash(b""), 0xcbf29ce484222325);
        assert_eq!(name_hash(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(name_hash(b"raboof"), 0x85944171f73967e8);
        // Worked from the definition over \x06github\x03com, last byte first.
        assert_eq!(wire_name("github.com"), b"\x06github\x03com");
        assert_eq!(name_hash(&wire_name("github.com")), 0x061a89ee786005b0);
        assert_eq!(name_hash(b"\x03com"), 0x0d4f45a2c42cb9d3);
    }

    #[test]
    fn hash_and_wire_ignore_case_and_trailing_dot() {
        assert_eq!(wire_name("GitHub.COM."), b"\x06github\x03com");
        assert_eq!(name_hash(b"\x06GITHUB\x03cOm"), 0x061a89ee786005b0);
        assert_eq!(wire_name(""), b"");
        assert_eq!(wire_name("."), b"");
    }

    #[test]
    fn suffix_hash_is_the_running_hash_at_each_label_start() {
        // What the kernel relies on: walking right to left, the running hash at a label
        // start equals the hash of the wire name of that suffix.
        let wire = wire_name("a.b.npmjs.org");
        let mut h = FNV_OFFSET_BASIS;
        let mut seen = Vec::new();
        let starts = [0usize, 2, 4, 10];
        for i in (0..wire.len()).rev() {
            h = (h ^ u64::from(wire[i])).wrapping_mul(FNV_PRIME);
            if starts.contains(&i) {
                seen.push(h);
            }
        }
        let want: Vec<u64> = ["org", "npmjs.org", "b.npmjs.org", "a.b.npmjs.org"]
            .iter()
            .map(|s| name_hash(&wire_name(s)))
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    #[should_panic(expected = "is not 1-63 bytes long")]
    fn wire_name_refuses_empty_labels() {
        wire_name("a..b");
    }

    #[test]
    fn limits_match_the_abi() {
        use crate::kernel::skel::types::{rf_name_val, rf_ports};
        let val = rf_name_val::default();
        assert_eq!(rf_ports::default().port.len(), MAX_PORTS);
        assert_eq!(val.globs.len(), MAX_GLOBS);
        // A glob part is at most 62 bytes (a 63-byte label that holds the '*').
        assert!(val.globs[0].prefix.len() >= 62 && val.globs[0].suffix.len() >= 62);
        assert!(val.name.len() >= 255);
    }

    fn compile(eps: &str) -> Result<Compiled, PolicyError> {
        Policy {
            endpoints: Policy::parse_endpoints(eps, "--allow").unwrap(),
            ..Policy::default()
        }
        .compile()
    }

    fn ports(p: &[u16]) -> PortSet {
        PortSet::Ports(p.iter().copied().collect())
    }

    #[test]
    fn merges_per_suffix_and_network() {
        let c = compile(
            "github.com:443 GITHUB.com:22 github.com. *.github.com:* \
             ab*.github.com ab*.github.com:80 *z.github.com:* api.github.com \
             198.51.100.0/24 198.51.100.0/24:53 198.51.100.7 ::ffff:198.51.100.0/120:80 \
             [2001:db8::1]:* 2001:db8::1",
        )
        .unwrap();
        let gh = &c.names[0];
        assert_eq!(gh.wire, b"\x06github\x03com");
        assert_eq!(gh.hash, name_hash(&gh.wire));
        assert_eq!(gh.exact, ports(&[22, 443]));
        assert_eq!(gh.wildcard, PortSet::Any);
        assert_eq!(
            gh.globs,
            vec![
                GlobEntry {
                    prefix: b"ab".to_vec(),
                    suffix: vec![],
                    ports: ports(&[80, 443]),
                },
                GlobEntry {
                    prefix: vec![],
                    suffix: b"z".to_vec(),
                    ports: PortSet::Any,
                },
            ]
        );
        let api = &c.names[1];
        assert_eq!(api.wire, b"\x03api\x06github\x03com");
        assert_eq!(
            (&api.exact, &api.wildcard),
            (&ports(&[443]), &PortSet::None)
        );
        assert_eq!(c.names.len(), 2);
        assert_eq!(
            c.prefixes,
            vec![
                ("198.51.100.0/24".parse().unwrap(), ports(&[53, 80, 443])),
                ("198.51.100.7/32".parse().unwrap(), ports(&[443])),
                ("2001:db8::1/128".parse().unwrap(), PortSet::Any),
            ]
        );
    }

    #[test]
    fn any_absorbs_ports_in_either_order() {
        for eps in ["example.com:* example.com:1", "example.com:1 example.com:*"] {
            assert_eq!(compile(eps).unwrap().names[0].exact, PortSet::Any, "{eps}");
        }
    }

    #[test]
    fn eight_ports_fit_and_a_ninth_is_refused_at_its_endpoint() {
        let eight: Vec<String> = (1..=8).map(|p| format!("example.com:{p}")).collect();
        let c = compile(&eight.join(" ")).unwrap();
        assert_eq!(c.names[0].exact, ports(&[1, 2, 3, 4, 5, 6, 7, 8]));
        // Repeating a port already in the set is no overflow.
        assert!(compile(&format!("{} example.com:8", eight.join(" "))).is_ok());
        // Nor is "any" after eight ports.
        assert!(compile(&format!("{} example.com:*", eight.join(" "))).is_ok());

        let cases = [
            ("example.com", "for \"example.com\""),
            ("*.example.com", "for \"*.example.com\""),
            ("ab*.example.com", "for \"ab*.example.com\""),
            ("198.51.100.0/24", "for 198.51.100.0/24"),
        ];
        for (host, what) in cases {
            let eps: Vec<String> = (1..=9).map(|p| format!("{host}:{p}")).collect();
            let text = format!("{}\n{}", eps[..8].join(" "), eps[8]);
            let err = compile(&text).unwrap_err();
            assert_eq!((err.line, err.column), (2, 1), "{host}");
            assert_eq!(err.token, eps[8]);
            assert!(err.message.contains(what), "{host}: {err}");
            assert!(err.message.contains("beyond the 8"), "{host}: {err}");
        }
    }

    #[test]
    fn four_globs_fit_and_a_fifth_is_refused_at_its_endpoint() {
        let four = "a*.example.com b*.example.com c*.example.com d*.example.com";
        assert_eq!(compile(four).unwrap().names[0].globs.len(), 4);
        // The same glob again, or a glob under another parent, is no overflow.
        assert!(compile(&format!("{four} A*.example.com:80 e*.example.org")).is_ok());
        let err = compile(&format!("{four}  e*.example.com:*")).unwrap_err();
        assert_eq!((err.line, err.column), (1, 62));
        assert_eq!(err.token, "e*.example.com:*");
        assert!(
            err.to_string().starts_with(
                "--allow:1:62: endpoint \"e*.example.com:*\" is a label glob beyond the 4"
            ),
            "{err}"
        );
    }
}
