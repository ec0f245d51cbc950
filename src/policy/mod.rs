//! Policies: which endpoints a job may reach, parsed from a TOML file or from `--allow`,
//! and compiled into the tables the dataplane loads.
//!
//! The endpoint syntax is harden-runner's `allowed-endpoints`. A policy file:
//!
//! ```
//! # use ringfence::policy::{Mode, Policy};
//! let text = r#"
//! mode = "block"                 # "audit" (default) or "block"
//! allowed-endpoints = """
//! github.com:443
//! *.npmjs.org:443
//! productionresultssa*.blob.core.windows.net:443
//! 198.51.100.0/24
//! 2001:db8::/32:443
//! """
//! direct-ip = "block"            # "block" (default) or "audit"
//! dns-resolvers = ["127.0.0.53"] # default: the nameservers in /etc/resolv.conf
//! dns-policy = "allowed-only"    # block mode: queries for unlisted names get REFUSED; "any" to send them
//! dns-min-ttl = 0                # seconds a learned address lives at least (0..86400)
//! dns-grace = 30                 # seconds added to every learned address's TTL (0..86400)
//! dns-exfil-max-label = 50       # a label longer than this is a finding (1-63)
//! dns-exfil-entropy = 4.0        # bits/char above which a run is a finding (0-8]
//! dns-exfil-entropy-min-length = 20 # runs shorter than this are not measured (1-63)
//! dns-exfil-max-names = 50       # distinct names per domain within a job (1-10000)
//! allowed-inbound = "198.51.100.7 203.0.113.0/24:8080" # peers that may connect to the job
//! ## allowed-cidr-files = ["github-actions.txt"]  # files of addresses/CIDRs, one a line
//! "#;
//! let policy = Policy::from_toml_str(text, "policy.toml").unwrap();
//! assert_eq!(policy.mode, Mode::Block);
//! assert!(policy.allows("registry.npmjs.org", 443));
//! assert!(!policy.allows("npmjs.org", 443)); // "*.x" is strictly below x
//! assert!(policy.allows("productionresultssa7.blob.core.windows.net", 443));
//! assert!(policy.allows_addr("198.51.100.9".parse().unwrap(), 443));
//! assert!(!policy.allows("github.com", 22));
//!
//! let err = Policy::from_toml_str("allowed-endpoints = \"\"\"\ngithub.com:44x\n\"\"\"", "policy.toml")
//!     .unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     r#"policy.toml:2:1: bad port "44x" in endpoint "github.com:44x": ports are 1-65535 or *"#
//! );
//! ```
//!
//! The `dns-exfil-*` keys are the thresholds of the DNS exfiltration signals (see
//! [`crate::trail::exfil`]); the values above are the defaults. They never block anything: in
//! either mode, a job's query names that cross them are reported as findings (`long-label`:
//! a label longer than `dns-exfil-max-label`; `high-entropy`: a hyphen-free run of at least
//! `dns-exfil-entropy-min-length` characters measuring more than `dns-exfil-entropy` bits
//! per character; `many-names`: more than `dns-exfil-max-names` distinct names under one
//! domain, taken as the last two labels). A value out of range is rejected with its line
//! and column like any other key.
//!
//! Endpoints: `host` (port 443), `host:PORT`, `host:*`. Hosts: an exact name; `*.example.com`
//! (every name strictly below example.com, at any depth); `ab*cd.example.com` (one `*` in the
//! leftmost label, matching any characters of exactly that label); an IPv4 or IPv6 address or
//! CIDR. IPv6 takes a port only in brackets (`[2001:db8::1]:22`) or after a prefix length
//! (`2001:db8::/32:22`).
//!
//! `allowed-inbound` lists the peers that may connect to sockets the job listens on (see
//! [`inbound`](self::inbound) for the grammar; `*` is every peer). Without it no inbound
//! connection is allowed: refused in block mode, reported in audit mode.
//!
//! A [`PolicyBuilder`] keeps what a source said and what it left unsaid, so that command-line
//! flags can override a file's values before defaults are filled in.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;

mod addr;
pub mod check;
pub mod cidr_file;
mod compile;
mod endpoint;
mod file;
mod inbound;
pub mod suggest;

pub use addr::{
    is_loopback, is_metadata, is_special, parse_resolv_conf, read_resolv_conf, RESOLV_CONF,
};
pub use compile::{
    name_hash, wire_name, Compiled, GlobEntry, NameEntry, PortSet, MAX_GLOBS, MAX_PORTS,
};
pub use endpoint::DEFAULT_PORT;
pub use file::cidr_files_of as file_cidr_files;
pub use inbound::every_peer;

/// Block or only log what the policy does not allow. Also the `direct-ip` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Audit,
    Block,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Audit => "audit",
            Mode::Block => "block",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A mode that is neither "audit" nor "block".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad mode {0:?}: expected \"audit\" or \"block\"")]
pub struct ParseModeError(pub String);

impl FromStr for Mode {
    type Err = ParseModeError;
    /// Exactly "audit" or "block", as in the policy file (no case folding there either).
    fn from_str(s: &str) -> Result<Mode, ParseModeError> {
        match s {
            "audit" => Ok(Mode::Audit),
            "block" => Ok(Mode::Block),
            _ => Err(ParseModeError(s.to_owned())),
        }
    }
}

/// The destination ports of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortSpec {
    Any,
    Port(u16),
}

impl PortSpec {
    pub fn matches(self, port: u16) -> bool {
        match self {
            PortSpec::Any => true,
            PortSpec::Port(p) => p == port,
        }
    }
}

/// The host part of an endpoint. Names are lowercased, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `github.com`
    Exact(String),
    /// `*.npmjs.org`, holding the parent `npmjs.org`: names strictly below it, any depth.
    Subdomains(String),
    /// `ab*cd.example.com`: one label starting with `prefix` and ending with `suffix`
    /// (not overlapping), directly below `parent`.
    LabelGlob {
        prefix: String,
        suffix: String,
        parent: String,
    },
    /// An address (as a /32 or /128) or a network. IPv4-mapped IPv6 is folded into IPv4.
    Net(IpNet),
}

impl HostPattern {
    /// Whether the name `name` (already lowercased, no trailing dot) matches.
    /// Address patterns match no name.
    fn matches_name(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(n) => name == n,
            HostPattern::Subdomains(parent) => {
                below(name, parent).is_some_and(|labels| !labels.is_empty())
            }
            HostPattern::LabelGlob {
                prefix,
                suffix,
                parent,
            } => below(name, parent).is_some_and(|label| {
                !label.is_empty()
                    && !label.contains('.')
                    && label.len() >= prefix.len() + suffix.len()
                    && label.starts_with(prefix.as_str())
                    && label.ends_with(suffix.as_str())
            }),
            HostPattern::Net(_) => false,
        }
    }
}

/// The labels of `name` in front of `.parent`, if `name` ends in `.parent`.
fn below<'a>(name: &'a str, parent: &str) -> Option<&'a str> {
    name.strip_suffix(parent)?.strip_suffix('.')
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Subdomains(p) => write!(f, "*.{p}"),
            HostPattern::LabelGlob {
                prefix,
                suffix,
                parent,
            } => write!(f, "{prefix}*{suffix}.{parent}"),
            HostPattern::Net(n) => write!(f, "{n}"),
        }
    }
}

/// Where something was written: a file path or "--allow", 1-based line and column
/// (columns count characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub source_name: String,
    pub line: usize,
    pub column: usize,
}

/// One allowed endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: HostPattern,
    pub port: PortSpec,
    /// The endpoint as written, for messages and reports.
    pub text: String,
    /// Where it was written, so that errors found later (compiling) can point at it.
    pub location: Location,
}

impl Endpoint {
    fn error(&self, message: String) -> PolicyError {
        PolicyError {
            source_name: self.location.source_name.clone(),
            line: self.location.line,
            column: self.location.column,
            token: self.text.clone(),
            message,
        }
    }
}

/// A policy that cannot be used. Callers exit with status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", position(.source_name, .line, .column))]
pub struct PolicyError {
    /// The file path, or "--allow" for the command line.
    pub source_name: String,
    /// 1-based; 0 when the error is about the source as a whole (e.g. it cannot be read).
    pub line: usize,
    /// 1-based, in characters; 0 with `line`.
    pub column: usize,
    /// The offending text (an endpoint, a key, a value); empty when there is none.
    pub token: String,
    /// What is wrong, naming the token.
    pub message: String,
}

fn position(source: &str, line: &usize, column: &usize) -> String {
    if *line == 0 {
        source.to_owned()
    } else {
        format!("{source}:{line}:{column}")
    }
}

impl PolicyError {
    pub fn whole(source_name: &str, message: String) -> PolicyError {
        PolicyError {
            source_name: source_name.to_owned(),
            line: 0,
            column: 0,
            token: String::new(),
            message,
        }
    }
}

/// A complete policy, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub direct_ip: Mode,
    /// Servers DNS may go to.
    pub dns_resolvers: Vec<IpAddr>,
    pub endpoints: Vec<Endpoint>,
    /// `dns-policy = "allowed-only"` (the default): in block mode, queries for names the
    /// policy does not allow are answered REFUSED in the kernel and never leave the host.
    /// `"any"` lets every query through to the resolver.
    pub dns_filter: bool,
    /// `dns-min-ttl` (seconds): learned addresses live at least this long.
    pub dns_min_ttl: std::time::Duration,
    /// `dns-grace` (seconds): added to every learned address's TTL, since clients reuse
    /// answers a little past it.
    pub dns_grace: std::time::Duration,
    /// The `dns-exfil-*` thresholds.
    pub dns_exfil: crate::trail::exfil::Thresholds,
    /// `allowed-inbound`: peers (address or network, `::/0` for `*`) and the job's local
    /// port they may connect to (`PortSpec::Any` when none was written).
    pub inbound: Vec<Endpoint>,
}

/// Defaults of `dns-min-ttl` and `dns-grace`.
pub const DEFAULT_DNS_MIN_TTL: std::time::Duration = std::time::Duration::from_secs(0);
pub const DEFAULT_DNS_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// `dns-policy` values: "allowed-only" filters queries, "any" does not.
pub fn parse_dns_policy(s: &str) -> Option<bool> {
    match s {
        "allowed-only" => Some(true),
        "any" => Some(false),
        _ => None,
    }
}

impl Default for Policy {
    /// Audit mode, direct-ip blocked, nothing allowed, and no resolver (a builder, unlike
    /// this, defaults resolvers to /etc/resolv.conf).
    fn default() -> Policy {
        Policy {
            mode: Mode::Audit,
            direct_ip: Mode::Block,
            dns_resolvers: Vec::new(),
            endpoints: Vec::new(),
            dns_filter: true,
            dns_min_ttl: DEFAULT_DNS_MIN_TTL,
            dns_grace: DEFAULT_DNS_GRACE,
            dns_exfil: crate::trail::exfil::Thresholds::default(),
            inbound: Vec::new(),
        }
    }
}

impl Policy {
    /// Parses a policy file's text; `source` names it in errors. Resolvers not given in the
    /// text are read from /etc/resolv.conf.
    pub fn from_toml_str(text: &str, source: &str) -> Result<Policy, PolicyError> {
        PolicyBuilder::from_toml_str(text, source)?.build()
    }

    /// Reads and parses a policy file.
    pub fn from_file(path: &Path) -> Result<Policy, PolicyError> {
        PolicyBuilder::from_file(path)?.build()
    }

    /// Parses a whitespace-separated endpoint list, as given to `--allow`; `source` names
    /// it in errors, whose lines and columns count within `s`.
    pub fn parse_endpoints(s: &str, source: &str) -> Result<Vec<Endpoint>, PolicyError> {
        let lines = file::LineIndex::new(s);
        file::parse_endpoint_list(s, source, |offset| lines.line_col(offset))
    }

    /// Parses a whitespace-separated `allowed-inbound` list, as given to `--allow-inbound`.
    pub fn parse_inbound(s: &str, source: &str) -> Result<Vec<Endpoint>, PolicyError> {
        let lines = file::LineIndex::new(s);
        file::parse_list(s, source, inbound::parse_token, |offset| {
            lines.line_col(offset)
        })
    }

    /// Whether `peer` may connect to the job's local `port` (loopback always may): the
    /// reference for the dataplane's inbound rule.
    pub fn allows_inbound(&self, peer: IpAddr, port: u16) -> bool {
        inbound::allows(&self.inbound, peer, port)
    }

    /// Adds endpoints (e.g. from `--allow`) to the policy.
    pub fn extend_endpoints(&mut self, endpoints: impl IntoIterator<Item = Endpoint>) {
        self.endpoints.extend(endpoints);
    }

    /// Whether a connection to `port` at an address learned from a DNS answer for `name`
    /// is allowed. The reference for the dataplane's name matching: case-insensitive, one
    /// trailing dot ignored; a name with an empty label matches nothing.
    pub fn allows(&self, name: &str, port: u16) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if name.is_empty() || name.split('.').any(str::is_empty) {
            return false;
        }
        self.endpoints
            .iter()
            .any(|e| e.port.matches(port) && e.host.matches_name(&name))
    }

    /// The ports an address learned from an answer for `name` is allowed on (the union over
    /// every endpoint whose name pattern matches; `PortSet::None` when none does).
    pub fn ports_for(&self, name: &str) -> PortSet {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if name.is_empty() || name.split('.').any(str::is_empty) {
            return PortSet::None;
        }
        let mut set = PortSet::None;
        for e in self.endpoints.iter().filter(|e| e.host.matches_name(&name)) {
            set = match (set, e.port) {
                (PortSet::Any, _) | (_, PortSpec::Any) => PortSet::Any,
                (PortSet::None, PortSpec::Port(p)) => PortSet::Ports([p].into_iter().collect()),
                (PortSet::Ports(mut ps), PortSpec::Port(p)) => {
                    ps.insert(p);
                    PortSet::Ports(ps)
                }
            };
        }
        set
    }

    /// Whether a connection to `addr:port` is allowed by the policy's addresses and
    /// networks, as the dataplane's trie decides it: loopback always is; IPv4 and
    /// IPv4-mapped IPv6 are one address (the trie stores IPv4 mapped, so `::/0` covers
    /// IPv4 too). Metadata addresses are allowed only when a listed network covers them,
    /// which is what "blocked unless listed" means. Addresses learned from DNS answers are
    /// not considered here: see [`Policy::allows`].
    pub fn allows_addr(&self, addr: IpAddr, port: u16) -> bool {
        if is_loopback(addr) {
            return true;
        }
        let addr = addr::to_mapped(addr);
        self.endpoints.iter().any(|e| match e.host {
            HostPattern::Net(net) => e.port.matches(port) && addr::mapped_contains(net, addr),
            _ => false,
        })
    }

    /// Compiles the endpoints for the dataplane, refusing what its maps cannot hold.
    pub fn compile(&self) -> Result<Compiled, PolicyError> {
        let mut c = compile::compile(&self.endpoints)?;
        c.inbound = inbound::compile(&self.inbound)?;
        Ok(c)
    }
}

/// A policy under construction: each setting is `None` until a source gives it, so later
/// sources (command-line flags) override earlier ones (the file); endpoints accumulate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyBuilder {
    pub mode: Option<Mode>,
    pub direct_ip: Option<Mode>,
    pub dns_resolvers: Option<Vec<IpAddr>>,
    pub endpoints: Vec<Endpoint>,
    pub dns_filter: Option<bool>,
    pub dns_min_ttl: Option<std::time::Duration>,
    pub dns_grace: Option<std::time::Duration>,
    pub dns_exfil_max_label: Option<u32>,
    pub dns_exfil_entropy: Option<f64>,
    pub dns_exfil_entropy_min_length: Option<u32>,
    pub dns_exfil_max_names: Option<u32>,
    /// `allowed-inbound` entries; accumulate like endpoints.
    pub inbound: Vec<Endpoint>,
    /// `allowed-cidr-files` not read yet: [`read_cidr_files`](Self::read_cidr_files)
    /// turns them into endpoints.
    pub cidr_files: Vec<cidr_file::CidrFileRef>,
}

// `dns_exfil_entropy` is never NaN: the parser accepts only values in (0, 8].
impl Eq for PolicyBuilder {}

impl PolicyBuilder {
    pub fn new() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// What a policy file's text says; `source` names it in errors.
    pub fn from_toml_str(text: &str, source: &str) -> Result<PolicyBuilder, PolicyError> {
        file::parse_toml(text, source)
    }

    /// Reads a policy file; errors name it by `path`.
    pub fn from_file(path: &Path) -> Result<PolicyBuilder, PolicyError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PolicyError::whole(&source, format!("cannot read the policy file: {e}"))
        })?;
        let mut b = PolicyBuilder::from_toml_str(&text, &source)?;
        b.read_cidr_files(cidr_file::policy_dir(&source), |p| {
            std::fs::read_to_string(p).map_err(|e| e.to_string())
        })?;
        Ok(b)
    }

    /// Adds the entries of the `allowed-cidr-files` (relative paths taken from
    /// `policy_dir`), each file's text given by `read` (the disk, or what a client sent).
    pub fn read_cidr_files(
        &mut self,
        policy_dir: &Path,
        mut read: impl FnMut(&Path) -> Result<String, String>,
    ) -> Result<&mut Self, PolicyError> {
        for f in std::mem::take(&mut self.cidr_files) {
            let path = f.resolve(policy_dir);
            let text = read(&path).map_err(|e| {
                f.error(format!(
                    "allowed-cidr-files: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            self.endpoints
                .extend(cidr_file::parse(&text, &path.display().to_string())?);
        }
        Ok(self)
    }

    /// Adds the endpoints of an `--allow` string.
    pub fn allow(&mut self, endpoints: &str, source: &str) -> Result<&mut Self, PolicyError> {
        self.endpoints
            .extend(Policy::parse_endpoints(endpoints, source)?);
        Ok(self)
    }

    /// Adds the peers of an `--allow-inbound` string.
    pub fn allow_inbound(&mut self, peers: &str, source: &str) -> Result<&mut Self, PolicyError> {
        self.inbound.extend(Policy::parse_inbound(peers, source)?);
        Ok(self)
    }

    /// Lays `later` over `self`: its settings win where given, its endpoints are added.
    pub fn merge(&mut self, later: PolicyBuilder) -> &mut Self {
        self.mode = later.mode.or(self.mode);
        self.direct_ip = later.direct_ip.or(self.direct_ip);
        self.dns_resolvers = later.dns_resolvers.or(self.dns_resolvers.take());
        self.dns_filter = later.dns_filter.or(self.dns_filter);
        self.dns_min_ttl = later.dns_min_ttl.or(self.dns_min_ttl);
        self.dns_grace = later.dns_grace.or(self.dns_grace);
        self.dns_exfil_max_label = later.dns_exfil_max_label.or(self.dns_exfil_max_label);
        self.dns_exfil_entropy = later.dns_exfil_entropy.or(self.dns_exfil_entropy);
        self.dns_exfil_entropy_min_length = later
            .dns_exfil_entropy_min_length
            .or(self.dns_exfil_entropy_min_length);
        self.dns_exfil_max_names = later.dns_exfil_max_names.or(self.dns_exfil_max_names);
        self.endpoints.extend(later.endpoints);
        self.inbound.extend(later.inbound);
        self.cidr_files.extend(later.cidr_files);
        self
    }

    /// Fills in defaults, reading resolvers from /etc/resolv.conf if none were given.
    pub fn build(self) -> Result<Policy, PolicyError> {
        self.build_with_resolv_conf(Path::new(RESOLV_CONF))
    }

    /// As [`build`](Self::build), reading default resolvers from `resolv_conf` (which is
    /// not read at all when resolvers were given).
    pub fn build_with_resolv_conf(self, resolv_conf: &Path) -> Result<Policy, PolicyError> {
        // Files are read where the policy's own path is known; text alone has no directory.
        if let Some(f) = self.cidr_files.first() {
            return Err(f.error(format!(
                "allowed-cidr-files {:?} was not read: the key works in a policy file given                  by its path (--policy, host-policy), whose directory relative paths start from",
                f.path
            )));
        }
        let dns_resolvers = match self.dns_resolvers {
            Some(r) => r,
            None => read_resolv_conf(resolv_conf)?,
        };
        Ok(Policy {
            mode: self.mode.unwrap_or(Mode::Audit),
            direct_ip: self.direct_ip.unwrap_or(Mode::Block),
            dns_resolvers,
            endpoints: self.endpoints,
            inbound: self.inbound,
            dns_filter: self.dns_filter.unwrap_or(true),
            dns_min_ttl: self.dns_min_ttl.unwrap_or(DEFAULT_DNS_MIN_TTL),
            dns_grace: self.dns_grace.unwrap_or(DEFAULT_DNS_GRACE),
            dns_exfil: {
                let d = crate::trail::exfil::Thresholds::default();
                crate::trail::exfil::Thresholds {
                    max_label: self.dns_exfil_max_label.unwrap_or(d.max_label),
                    entropy: self.dns_exfil_entropy.unwrap_or(d.entropy),
                    entropy_min_length: self
                        .dns_exfil_entropy_min_length
                        .unwrap_or(d.entropy_min_length),
                    max_names: self.dns_exfil_max_names.unwrap_or(d.max_names),
                }
            },
        })
    }
}

#[cfg(test)]
mod tests;
