//! `ringfence policy suggest`: a block-mode policy from the events of audit runs, and
//! `--diff`: how an existing policy compares with what the runs did.
//!
//! What goes in, and why:
//! - every name an outbound flow was made to (allowed or audited), with its port: the
//!   names are what the policy matches, the addresses come and go with DNS;
//! - names that differ only by a number at the end of their first label
//!   (`cache12.ci.example.com`, `cache7.ci.example.com`) collapse into one label glob
//!   (`cache*.ci.example.com`), and only when the parent is not a public suffix (the
//!   public suffix list, ICANN and private sections, through the `psl` crate; an unknown
//!   top-level domain counts as one too). Under a public suffix anyone can register a
//!   sibling: `blob.core.windows.net` is on the list, so `productionresultssa*.blob.core.
//!   windows.net` would let in any storage account whose name starts that way, an
//!   attacker's included. Such names stay exact, and the output says why. Nothing is
//!   ever collapsed into `*.parent`, so `*.com` cannot come out;
//! - addresses only where the run's own policy allowed them by address (the user wrote
//!   that entry). Direct-IP and metadata calls, names blocked in a block-mode run, DNS
//!   queries for names never connected to, and DNS that could not be judged are comments
//!   to decide on, never entries.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::policy::check::{entry_allows_addr, entry_allows_name};
use crate::policy::{is_loopback, is_metadata, Policy};
use crate::trail::events::{Event, FlowEvent, Reason, Verdict};

/// One events file: where it came from and the job(s) in it.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub source: String,
    pub jobs: BTreeSet<String>,
    pub modes: BTreeSet<String>,
    pub flows: usize,
    pub first: Option<std::time::SystemTime>,
    pub last: Option<std::time::SystemTime>,
}

/// A destination that is a comment, not an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Aside {
    /// A name blocked in a block-mode run.
    BlockedName,
    /// An address no DNS answer produced.
    DirectIp,
    /// A cloud metadata or link-local address.
    Metadata,
    /// DNS to a server that is not a resolver.
    OtherResolver,
    /// A DNS query for a name the job never connected to.
    QueriedOnly,
    /// DNS the kernel could not judge, or a packet it could not parse.
    Unjudged,
    /// A name that is no host name (odd characters from the wire): never an entry, which
    /// it could break out of.
    BadName,
}

impl Aside {
    fn heading(self) -> &'static str {
        match self {
            Aside::BlockedName => "Names blocked in a block-mode run (add them only if the job needs them):",
            Aside::DirectIp => "Direct-IP calls (no DNS answer named them; allow an address only if you own it):",
            Aside::Metadata => "Cloud metadata / link-local calls (blocked unless listed; a job rarely needs them):",
            Aside::OtherResolver => "DNS sent to servers other than the resolvers (set dns-resolvers if they are yours):",
            Aside::QueriedOnly => "Names resolved but never connected to (with dns-policy = \"allowed-only\" their queries are refused in block mode):",
            Aside::Unjudged => "DNS or packets the kernel could not judge (dropped in block mode):",
            Aside::BadName => "Names that are not host names (left out; look at who called them):",
        }
    }
}

/// What the runs did, gathered for a policy.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub runs: Vec<RunInfo>,
    /// (name, port) -> flows, for named outbound flows that were allowed or audited.
    pub names: BTreeMap<(String, u16), usize>,
    /// (address, port) -> flows, allowed by an address entry of the run's policy.
    pub addresses: BTreeMap<(IpAddr, u16), usize>,
    /// Comments: (kind, what) -> flows.
    pub asides: BTreeMap<(Aside, String), usize>,
    /// The resolvers the runs' policies named.
    pub resolvers: BTreeSet<IpAddr>,
}

fn trim_name(d: &str) -> String {
    d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase()
}

fn addr_port(a: IpAddr, port: u16) -> String {
    match a {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

impl Usage {
    /// Adds one run's events; `source` names it in the header.
    pub fn add_run(&mut self, source: &str, events: &[Event]) {
        let mut info = RunInfo {
            source: source.to_owned(),
            ..Default::default()
        };
        // The resolvers of this run (from its header): flows to them are DNS, which
        // `dns-resolvers` covers, not endpoints.
        let mut resolvers = BTreeSet::new();
        for ev in events {
            info.jobs.insert(ev.job().to_owned());
            let ts = ev.ts();
            info.first = Some(info.first.map_or(ts, |t| t.min(ts)));
            info.last = Some(info.last.map_or(ts, |t| t.max(ts)));
            match ev {
                Event::Job(j) => {
                    info.modes.insert(j.mode.clone());
                    resolvers.extend(j.policy.dns_resolvers.iter().copied());
                }
                Event::Flow(f) => {
                    info.flows += 1;
                    self.add_flow(f, &resolvers);
                }
                _ => {}
            }
        }
        self.resolvers.extend(resolvers);
        self.runs.push(info);
        // A name queried and then connected to needs no comment.
        let used: BTreeSet<String> = self.names.keys().map(|(n, _)| n.clone()).collect();
        self.asides
            .retain(|(kind, what), _| *kind != Aside::QueriedOnly || !used.contains(what));
    }

    fn add_flow(&mut self, f: &FlowEvent, resolvers: &BTreeSet<IpAddr>) {
        if !f.direction.is_outbound() || is_loopback(f.dst) {
            return;
        }
        let aside = |kind, what: String, asides: &mut BTreeMap<_, usize>| {
            *asides.entry((kind, what)).or_default() += 1;
        };
        match (f.reason, &f.domain) {
            (Reason::DnsQuery, Some(d)) => {
                let d = trim_name(d);
                if !self.names.keys().any(|(n, _)| *n == d) {
                    aside(Aside::QueriedOnly, d, &mut self.asides);
                }
            }
            (Reason::DnsUnjudged | Reason::Unparsed, _) => aside(
                Aside::Unjudged,
                format!("{} ({})", addr_port(f.dst, f.port), f.reason),
                &mut self.asides,
            ),
            (Reason::DnsResolver, _) => aside(
                Aside::OtherResolver,
                addr_port(f.dst, f.port),
                &mut self.asides,
            ),
            (_, Some(d)) if f.verdict == Verdict::Blocked => aside(
                Aside::BlockedName,
                format!("{}:{}", trim_name(d), f.port),
                &mut self.asides,
            ),
            (_, Some(d)) if !is_hostname(&trim_name(d)) => aside(
                Aside::BadName,
                format!("{}:{}", trim_name(d), f.port),
                &mut self.asides,
            ),
            (_, Some(d)) => *self.names.entry((trim_name(d), f.port)).or_default() += 1,
            (_, None) if f.port == 53 && resolvers.contains(&f.dst) => {}
            (_, None) if f.reason == Reason::Metadata || is_metadata(f.dst) => {
                aside(Aside::Metadata, addr_port(f.dst, f.port), &mut self.asides)
            }
            (Reason::Allowed, None) => *self.addresses.entry((f.dst, f.port)).or_default() += 1,
            (_, None) => aside(Aside::DirectIp, addr_port(f.dst, f.port), &mut self.asides),
        }
    }

    /// The policy's endpoints: (entry, the names it stands for when collapsed), sorted;
    /// and the notes on sibling groups kept exact.
    pub fn endpoints(&self) -> (Vec<(String, Vec<String>)>, Vec<String>) {
        // (parent, prefix, port) -> names of the form prefix<digits>.parent
        let mut groups: BTreeMap<(String, String, u16), BTreeSet<String>> = BTreeMap::new();
        for (name, port) in self.names.keys() {
            if let Some((prefix, parent)) = numbered(name) {
                groups
                    .entry((parent.to_owned(), prefix.to_owned(), *port))
                    .or_default()
                    .insert(name.clone());
            }
        }
        let mut collapsed: BTreeMap<(String, u16), Vec<String>> = BTreeMap::new();
        let mut notes = Vec::new();
        for ((parent, prefix, port), names) in groups {
            if names.len() < 2 {
                continue;
            }
            let glob = format!("{prefix}*.{parent}");
            if is_public_suffix(&parent) {
                notes.push(format!(
                    "{} kept exact: {parent} is a public suffix (anyone can register a name \
                     directly under it), so {glob} would let in anyone's {prefix}… name there, \
                     an attacker's too",
                    names.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
                continue;
            }
            for n in &names {
                collapsed.insert((n.clone(), port), Vec::new());
            }
            collapsed.insert((glob, port), names.into_iter().collect());
        }
        let mut entries: BTreeMap<(String, u16), Vec<String>> = BTreeMap::new();
        for (name, port) in self.names.keys() {
            if !collapsed.contains_key(&(name.clone(), *port)) {
                entries.insert((name.clone(), *port), Vec::new());
            }
        }
        for (k, members) in collapsed {
            if !members.is_empty() {
                entries.insert(k, members);
            }
        }
        let mut out: Vec<(String, Vec<String>)> = entries
            .into_iter()
            .map(|((host, port), members)| (format!("{host}:{port}"), members))
            .collect();
        out.extend(
            self.addresses
                .keys()
                .map(|(a, p)| (addr_port(*a, *p), Vec::new())),
        );
        (out, notes)
    }

    /// The suggested policy, as a TOML file in the DESIGN.md syntax.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# ringfence policy suggested by `ringfence policy suggest` from these runs:\n",
        );
        for r in &self.runs {
            let jobs: Vec<&str> = r.jobs.iter().map(String::as_str).collect();
            let modes: Vec<&str> = r.modes.iter().map(String::as_str).collect();
            let when = match (r.first, r.last) {
                (Some(a), Some(b)) => format!(
                    ", {} .. {}",
                    crate::trail::events::format_ts(a),
                    crate::trail::events::format_ts(b)
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "#   {}: job {}, {} mode, {} flows{when}",
                comment(&r.source),
                comment(&jobs.join(", ")),
                comment(&if modes.is_empty() {
                    "unknown".to_owned()
                } else {
                    modes.join("/")
                }),
                r.flows
            );
        }
        out.push_str(
            "# Review every entry: an audit run allows everything it saw, an attacker's call included.\n",
        );
        let (endpoints, notes) = self.endpoints();
        out.push_str("mode = \"block\"\n");
        out.push_str("allowed-endpoints = \"\"\"\n");
        // Comments cannot go inside the string (a line there is an endpoint): they follow it.
        for (e, _) in &endpoints {
            let _ = writeln!(out, "{e}");
        }
        out.push_str("\"\"\"\n");
        let globbed: Vec<_> = endpoints.iter().filter(|(_, m)| !m.is_empty()).collect();
        if !globbed.is_empty() {
            out.push_str("# Collapsed siblings (numbered names under a parent that is not a public suffix):\n");
            for (e, members) in globbed {
                let _ = writeln!(
                    out,
                    "#   {} <- {}",
                    comment(e),
                    comment(&members.join(", "))
                );
            }
        }
        for n in &notes {
            let _ = writeln!(out, "# {}", comment(n));
        }
        if !self.resolvers.is_empty() {
            let r: Vec<String> = self.resolvers.iter().map(|a| format!("\"{a}\"")).collect();
            let _ = writeln!(
                out,
                "# The runs resolved through {}; the default is /etc/resolv.conf's nameservers:\n# dns-resolvers = [{}]",
                r.join(", "),
                r.join(", ")
            );
        }
        let mut kind = None;
        for ((k, what), n) in &self.asides {
            if kind != Some(*k) {
                let _ = writeln!(out, "# {}", k.heading());
                kind = Some(*k);
            }
            let _ = writeln!(out, "#   {} ({n} flows)", comment(what));
        }
        out
    }

    /// `--diff`: what the runs used that `policy` would block, and what it allows that no
    /// run used.
    pub fn diff(&self, policy: &Policy) -> String {
        let mut blocked = Vec::new();
        for (name, port) in self.names.keys() {
            if !policy.allows(name, *port) {
                blocked.push(format!("{name}:{port}"));
            }
        }
        for (a, port) in self.addresses.keys() {
            if !policy.allows_addr(*a, *port) {
                blocked.push(addr_port(*a, *port));
            }
        }
        for (k, what) in self.asides.keys() {
            if matches!(k, Aside::DirectIp | Aside::Metadata) {
                if let Some((a, p)) = parse_addr_port(what) {
                    if !policy.allows_addr(a, p) {
                        blocked.push(format!("{what} (direct IP)"));
                    }
                }
            }
        }
        let mut unused = Vec::new();
        let addrs: Vec<(IpAddr, u16)> = self
            .addresses
            .keys()
            .copied()
            .chain(self.asides.keys().filter_map(|(_, w)| parse_addr_port(w)))
            .collect();
        for e in &policy.endpoints {
            let used = self.names.keys().any(|(n, p)| entry_allows_name(e, n, *p))
                || addrs.iter().any(|(a, p)| entry_allows_addr(e, *a, *p));
            if !used {
                unused.push(format!(
                    "{} ({}:{})",
                    e.text, e.location.source_name, e.location.line
                ));
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Used by the runs, blocked by the policy ({}):",
            blocked.len()
        );
        for b in &blocked {
            let _ = writeln!(out, "  - {}", crate::trail::report::text_clean(b));
        }
        let _ = writeln!(
            out,
            "Allowed by the policy, used by no run ({}):",
            unused.len()
        );
        for u in &unused {
            let _ = writeln!(out, "  + {}", crate::trail::report::text_clean(u));
        }
        out
    }
}

/// Letters, digits, '-' and '_' in labels of 1-63: what may become an entry as it is (a
/// `*` would become a glob, a quote or newline would leave the string).
fn is_hostname(n: &str) -> bool {
    n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn parse_addr_port(s: &str) -> Option<(IpAddr, u16)> {
    let sa: std::net::SocketAddr = s.parse().ok()?;
    Some((sa.ip(), sa.port()))
}

/// A name's text safe on a TOML comment line: control characters (a newline would end the
/// comment) shown as escapes.
fn comment(s: &str) -> String {
    crate::trail::report::text_clean(s)
}

/// `prefix<digits>.parent` -> (prefix, parent), prefix non-empty and not ending in a digit.
fn numbered(name: &str) -> Option<(&str, &str)> {
    let (first, parent) = name.split_once('.')?;
    let prefix = first.trim_end_matches(|c: char| c.is_ascii_digit());
    if prefix.is_empty() || prefix.len() == first.len() || parent.is_empty() {
        return None;
    }
    Some((prefix, parent))
}

/// Whether `name` is a public suffix: on the list (either section), or a name the list's
/// default rule makes one (an unknown top-level domain).
pub fn is_public_suffix(name: &str) -> bool {
    psl::suffix(name.as_bytes()).is_some_and(|s| s.as_bytes().len() == name.len())
}

/// Whether a suggested policy's text may be used as it is: it parses with the policy parser.
pub fn parse_check(text: &str) -> Result<Policy, crate::policy::PolicyError> {
    crate::policy::PolicyBuilder::from_toml_str(text, "suggested policy")?
        .build_with_resolv_conf(std::path::Path::new("/dev/null"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::events::{Direction, FlowEvent, Proto};

    fn flow(domain: Option<&str>, dst: &str, port: u16, verdict: Verdict, reason: Reason) -> Event {
        Event::Flow(FlowEvent {
            ts: std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_640_645),
            job: "build-1".into(),
            step: Some("npm".into()),
            pid: 7,
            comm: "node".into(),
            exe: None,
            parents: Default::default(),
            cgroup: 1,
            container: None,
            proto: Proto::Tcp,
            dst: dst.parse().unwrap(),
            port,
            domain: domain.map(str::to_owned),
            verdict,
            reason,
            direction: Direction::Outbound,
        })
    }

    fn named(d: &str, port: u16) -> Event {
        flow(
            Some(d),
            "198.51.100.10",
            port,
            Verdict::Audited,
            Reason::NotAllowed,
        )
    }

    fn suggest(events: &[Event]) -> (Vec<String>, String) {
        let mut u = Usage::default();
        u.add_run("run1.jsonl", events);
        let text = u.render();
        let p = parse_check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        (p.endpoints.iter().map(|e| e.text.clone()).collect(), text)
    }

    #[test]
    fn numbered_siblings_collapse_only_below_a_registrable_domain() {
        let (eps, text) = suggest(&[
            named("cache12.ci.example.com", 443),
            named("cache7.ci.example.com", 443),
            named("cache7.ci.example.com", 8443),
            named("Registry.NPMjs.org.", 443),
            // Under a public suffix (private section): kept exact.
            named("productionresultssa12.blob.core.windows.net", 443),
            named("productionresultssa7.blob.core.windows.net", 443),
            // Directly under an ICANN suffix, and under an unknown TLD: kept exact.
            named("node1.com", 443),
            named("node2.com", 443),
            named("mirror1.test", 80),
            named("mirror2.test", 80),
            // One-off numbered name: exact.
            named("s3.amazonaws.example.org", 443),
            // Not numbered siblings (letters differ): exact.
            named("alpha.example.net", 443),
            named("beta.example.net", 443),
            // A bare number is no prefix.
            named("1.example.org", 443),
            named("2.example.org", 443),
        ]);
        assert_eq!(
            eps,
            [
                "1.example.org:443",
                "2.example.org:443",
                "alpha.example.net:443",
                "beta.example.net:443",
                "cache*.ci.example.com:443",
                "cache7.ci.example.com:8443",
                "mirror1.test:80",
                "mirror2.test:80",
                "node1.com:443",
                "node2.com:443",
                "productionresultssa12.blob.core.windows.net:443",
                "productionresultssa7.blob.core.windows.net:443",
                "registry.npmjs.org:443",
                "s3.amazonaws.example.org:443",
            ],
            "{text}"
        );
        assert!(
            text.contains("blob.core.windows.net is a public suffix"),
            "{text}"
        );
        assert!(!text.lines().any(|l| l.starts_with("*.")), "{text}");
        assert!(text.starts_with("# ringfence policy suggested"), "{text}");
        assert!(text.contains("run1.jsonl: job build-1"), "{text}");
    }

    #[test]
    fn public_suffixes() {
        for s in [
            "com",
            "co.uk",
            "blob.core.windows.net",
            "github.io",
            "test",
            "zz",
        ] {
            assert!(is_public_suffix(s), "{s}");
        }
        for s in [
            "example.com",
            "ci.example.co.uk",
            "core.windows.net",
            "npmjs.org",
        ] {
            assert!(!is_public_suffix(s), "{s}");
        }
    }

    #[test]
    fn direct_ip_metadata_and_queries_are_comments() {
        let (eps, text) = suggest(&[
            named("registry.npmjs.org", 443),
            flow(
                None,
                "203.0.113.9",
                8080,
                Verdict::Blocked,
                Reason::DirectIp,
            ),
            flow(
                None,
                "169.254.169.254",
                80,
                Verdict::Blocked,
                Reason::Metadata,
            ),
            flow(None, "198.51.100.7", 22, Verdict::Allowed, Reason::Allowed),
            flow(
                Some("evil.test"),
                "198.51.100.53",
                53,
                Verdict::Audited,
                Reason::DnsQuery,
            ),
            flow(
                Some("registry.npmjs.org"),
                "198.51.100.53",
                53,
                Verdict::Audited,
                Reason::DnsQuery,
            ),
            flow(
                Some("attacker.test"),
                "198.51.100.66",
                443,
                Verdict::Blocked,
                Reason::NotAllowed,
            ),
            flow(None, "127.0.0.1", 9000, Verdict::Allowed, Reason::Allowed),
        ]);
        assert_eq!(eps, ["registry.npmjs.org:443", "198.51.100.7:22"], "{text}");
        for needle in [
            "#   203.0.113.9:8080 (1 flows)",
            "#   169.254.169.254:80 (1 flows)",
            "#   evil.test (1 flows)",
            "#   attacker.test:443 (1 flows)",
        ] {
            assert!(text.contains(needle), "{needle}\n{text}");
        }
        // Connected to after its query: no comment for it.
        assert!(!text.contains("#   registry.npmjs.org"), "{text}");
        assert!(!text.contains("127.0.0.1"), "{text}");
    }

    #[test]
    fn hostile_names_stay_in_their_comment() {
        let (eps, text) = suggest(&[
            named("x\"\"\"\n[evil]\nmode = \"audit\"", 443),
            named("*.com", 443),
            named("ok.example.com", 443),
        ]);
        assert_eq!(eps, ["ok.example.com:443"], "{text}");
        assert!(
            text.contains(r#"#   x"""\n[evil]\nmode = "audit":443"#),
            "{text}"
        );
        assert!(text.contains("#   *.com:443 (1 flows)"), "{text}");
    }

    #[test]
    fn diff_both_ways() {
        let mut u = Usage::default();
        u.add_run(
            "r",
            &[
                named("registry.npmjs.org", 443),
                named("github.com", 22),
                flow(
                    None,
                    "203.0.113.9",
                    8080,
                    Verdict::Blocked,
                    Reason::DirectIp,
                ),
            ],
        );
        let p = crate::policy::PolicyBuilder::from_toml_str(
            "allowed-endpoints = \"\"\"\n*.npmjs.org\ngithub.com:443\n198.51.100.0/24:*\n\"\"\"\n",
            "p.toml",
        )
        .unwrap()
        .build_with_resolv_conf(std::path::Path::new("/dev/null"))
        .unwrap();
        let d = u.diff(&p);
        assert_eq!(
            d,
            "Used by the runs, blocked by the policy (2):\n  - github.com:22\n  - 203.0.113.9:8080 (direct IP)\n\
             Allowed by the policy, used by no run (2):\n  + github.com:443 (p.toml:3)\n  + 198.51.100.0/24:* (p.toml:4)\n"
        );
    }
}
