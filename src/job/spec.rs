//! What a job is asked to enforce, as the command line gives it (`exec` and `job start`
//! share the flags) and as it crosses the control socket: the policy file's text, not its
//! path (the daemon runs as root and must not open files on a client's say-so), and the
//! flags laid over it.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::policy::{Mode, Policy, PolicyBuilder, PolicyError};

/// The policy flags of `exec` and `job start`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct PolicyArgs {
    /// audit: report, block nothing the policy would allow in block mode; block: enforce.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Allowed endpoints, as in a policy's allowed-endpoints ("github.com:443 *.npmjs.org").
    /// May be given more than once; adds to --policy.
    #[arg(long = "allow", value_name = "ENDPOINTS")]
    pub allow: Vec<String>,
    /// Peers that may connect to sockets the job listens on, as in a policy's
    /// allowed-inbound ("198.51.100.7 203.0.113.0/24:8080", "*" for all). Repeatable.
    #[arg(long = "allow-inbound", value_name = "PEERS")]
    pub allow_inbound: Vec<String>,
    /// A TOML policy file.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Connections to addresses no DNS answer produced: block (default) or audit.
    #[arg(long = "direct-ip", value_enum)]
    pub direct_ip: Option<ModeArg>,
    /// allowed-only (default): in block mode, DNS queries for names the policy does not
    /// allow are answered REFUSED and never leave the host; any: no query filtering.
    #[arg(long = "dns-policy", value_parser = ["allowed-only", "any"])]
    pub dns_policy: Option<String>,
    /// A DNS server the job may use (repeatable). Default: the policy's, else /etc/resolv.conf.
    #[arg(long = "dns-resolver", value_name = "IP")]
    pub dns_resolvers: Vec<std::net::IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeArg {
    Audit,
    Block,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Audit => Mode::Audit,
            ModeArg::Block => Mode::Block,
        }
    }
}

/// Errors that are the user's input, not the machine: exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Other(String),
}

/// A policy file's text and the name errors call it by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyText {
    pub source: String,
    pub text: String,
}

/// A job's policy as sent over the control socket: everything [`PolicyArgs`] says, with
/// the file read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PolicyText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ModeArg>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_inbound: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_ip: Option<ModeArg>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_resolvers: Vec<std::net::IpAddr>,
    /// The policy file's `allowed-cidr-files`, read by the client (each `source` is the
    /// path resolved from the policy file's directory): the daemon opens no user's paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidr_files: Vec<PolicyText>,
}

impl PolicyArgs {
    /// Reads the policy file (if any) into a spec. Errors name the file.
    pub fn to_spec(&self) -> Result<PolicySpec, UsageError> {
        let mut cidr_files = Vec::new();
        let file = match &self.policy {
            Some(p) => {
                let source = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|e| {
                    PolicyError::whole(&source, format!("cannot read the policy file: {e}"))
                })?;
                let dir = crate::policy::cidr_file::policy_dir(&source);
                for f in crate::policy::file_cidr_files(&text) {
                    let path = dir.join(&f);
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        PolicyError::whole(
                            &source,
                            format!("allowed-cidr-files: cannot read {}: {e}", path.display()),
                        )
                    })?;
                    cidr_files.push(PolicyText {
                        source: path.display().to_string(),
                        text,
                    });
                }
                Some(PolicyText { source, text })
            }
            None => None,
        };
        Ok(PolicySpec {
            file,
            mode: self.mode,
            allow: self.allow.clone(),
            allow_inbound: self.allow_inbound.clone(),
            direct_ip: self.direct_ip,
            dns_policy: self.dns_policy.clone(),
            dns_resolvers: self.dns_resolvers.clone(),
            cidr_files,
        })
    }

    /// The policy: the file, then the flags on top of it. Callers compile it (once: a
    /// large policy's compile is most of its cost) before anything loads.
    pub fn build(&self) -> Result<Policy, UsageError> {
        self.to_spec()?.build()
    }
}

impl PolicySpec {
    /// The policy: the file, then the flags on top of it (not compiled yet).
    pub fn build(&self) -> Result<Policy, UsageError> {
        let mut b = match &self.file {
            Some(f) => {
                let mut b = PolicyBuilder::from_toml_str(&f.text, &f.source)?;
                b.read_cidr_files(crate::policy::cidr_file::policy_dir(&f.source), |p| {
                    let p = p.display().to_string();
                    self.cidr_files
                        .iter()
                        .find(|c| c.source == p)
                        .map(|c| c.text.clone())
                        .ok_or_else(|| "its text was not sent with the job".to_string())
                })?;
                b
            }
            None => PolicyBuilder::new(),
        };
        if let Some(m) = self.mode {
            b.mode = Some(m.into());
        }
        if let Some(m) = self.direct_ip {
            b.direct_ip = Some(m.into());
        }
        for a in &self.allow {
            b.allow(a, "--allow")?;
        }
        for a in &self.allow_inbound {
            b.allow_inbound(a, "--allow-inbound")?;
        }
        if !self.dns_resolvers.is_empty() {
            b.dns_resolvers = Some(self.dns_resolvers.clone());
        }
        if let Some(p) = &self.dns_policy {
            b.dns_filter = Some(crate::policy::parse_dns_policy(p).ok_or_else(|| {
                UsageError::Other(format!(
                    "dns-policy {p:?}: expected \"allowed-only\" or \"any\""
                ))
            })?);
        }
        Ok(b.build()?)
    }
}

pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Audit => "audit",
        Mode::Block => "block",
    }
}
