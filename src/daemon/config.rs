//! The daemon's configuration file (TOML). Every key is optional; `ringfence run` with no
//! file runs with the defaults below.
//!
//! ```toml
//! socket = "/run/ringfence/control.sock"   # the control socket (mode 0600, or 0660 with group)
//! group = "ringfence"                        # a group granted the socket (optional)
//! bpffs = "/sys/fs/bpf/ringfence"            # where programs' maps and links are pinned
//! state-dir = "/run/ringfence"               # the daemon's state, for re-adoption
//! data-dir = "/var/lib/ringfence"            # each job's events file: jobs/<id>/events.jsonl
//! attach = "auto"                            # tcx, clsact or auto
//! interfaces = []                            # default: every interface, and new ones
//! host-policy = "/etc/ringfence/host.toml"   # traffic of no job (optional; see README)
//! max-jobs = 1024                           # jobs at once (sizes the jobs and ifjobs maps)
//! max-static-addresses = 262144              # map sizes: see README's "Map sizes"
//! max-learned-addresses = 262144
//! max-names = 65536
//! max-inbound = 16384
//! max-flows = 262144
//! events-max-bytes = "256M"                  # per job
//! ```
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::kernel::capacity::Capacity;
use crate::kernel::dataplane::AttachMode;

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default, deserialize_with = "attach_mode")]
    pub attach: AttachMode,
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub host_policy: Option<PathBuf>,
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    #[serde(default = "default_events_max")]
    pub events_max_bytes: String,
    #[serde(default = "default_static")]
    pub max_static_addresses: u32,
    #[serde(default = "default_learned")]
    pub max_learned_addresses: u32,
    #[serde(default = "default_names")]
    pub max_names: u32,
    #[serde(default = "default_inbound")]
    pub max_inbound: u32,
    #[serde(default = "default_flows")]
    pub max_flows: u32,
    /// The Prometheus endpoint: a TCP address (`127.0.0.1:9464`).
    #[serde(default)]
    pub metrics: Option<String>,
    /// The Prometheus endpoint on a Unix socket (mode 0600).
    #[serde(default)]
    pub metrics_socket: Option<PathBuf>,
    /// Webhooks told of every job's blocked calls and findings (`[[webhook]]` tables).
    #[serde(default)]
    pub webhook: Vec<crate::notify::Webhook>,
    /// Which job the containers and namespaces started on the host belong to.
    #[serde(default)]
    pub containers: ContainersMode,
    /// What forwarded traffic no job judged (containers no job claimed) is judged under.
    #[serde(default)]
    pub forwarded: ForwardedMode,
}

/// `containers`: how container links are claimed (job::containers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainersMode {
    /// A link that appears while exactly one job runs is that job's: the host of one job
    /// at a time (an ephemeral runner VM, a hosted runner). One that appears while several
    /// run is no job's (which of them started it cannot be told from the link).
    #[default]
    SoleJob,
    /// No job claims container links: their traffic is forwarded traffic.
    Off,
}

/// `forwarded`: the job forwarded traffic no job judged is judged under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedMode {
    /// The host default policy (`host-policy`); without one it passes.
    #[default]
    HostDefault,
    /// It passes unjudged (a router, a Kubernetes node whose pods are not jobs).
    Pass,
}

fn default_static() -> u32 {
    Capacity::default().static_addresses
}
fn default_learned() -> u32 {
    Capacity::default().learned_addresses
}
fn default_names() -> u32 {
    Capacity::default().names
}
fn default_inbound() -> u32 {
    Capacity::default().inbound
}
fn default_flows() -> u32 {
    Capacity::default().flows
}

pub const DEFAULT_SOCKET: &str = "/run/ringfence/control.sock";

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}
fn default_bpffs() -> PathBuf {
    crate::kernel::pins::DEFAULT_BASE.into()
}
fn default_state_dir() -> PathBuf {
    "/run/ringfence".into()
}
fn default_data_dir() -> PathBuf {
    "/var/lib/ringfence".into()
}
fn default_max_jobs() -> usize {
    Capacity::default().jobs as usize
}
fn default_events_max() -> String {
    "256M".into()
}

fn attach_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<AttachMode, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "auto" => Ok(AttachMode::Auto),
        "tcx" => Ok(AttachMode::Tcx),
        "clsact" => Ok(AttachMode::Clsact),
        _ => Err(serde::de::Error::custom(format!(
            "attach = {s:?}: expected \"auto\", \"tcx\" or \"clsact\""
        ))),
    }
}

impl Default for Config {
    fn default() -> Config {
        toml::from_str("").expect("the empty config is valid")
    }
}

impl Config {
    /// Reads a config file; errors name it and the key.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the config {}: {e}", path.display()))?;
        let c: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        c.events_max()
            .map_err(|e| anyhow::anyhow!("config {}: events-max-bytes: {e}", path.display()))?;
        for w in &c.webhook {
            w.check()
                .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        }
        if c.max_jobs == 0 {
            anyhow::bail!("config {}: max-jobs must be at least 1", path.display());
        }
        if u32::try_from(c.max_jobs).is_err() {
            anyhow::bail!("config {}: max-jobs is too large", path.display());
        }
        c.capacity()
            .validate()
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        Ok(c)
    }

    /// The map sizes this configuration asks for.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            static_addresses: self.max_static_addresses,
            learned_addresses: self.max_learned_addresses,
            names: self.max_names,
            inbound: self.max_inbound,
            flows: self.max_flows,
            jobs: u32::try_from(self.max_jobs).unwrap_or(u32::MAX),
        }
    }

    pub fn events_max(&self) -> Result<u64, String> {
        crate::trail::limits::parse_size(&self.events_max_bytes)
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("jobs").join(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::default();
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(c.max_jobs, 1024);
        assert_eq!(c.capacity(), Capacity::default());
        let c: Config = toml::from_str("max-names = 10\nmax-static-addresses = 7").unwrap();
        assert_eq!((c.capacity().names, c.capacity().static_addresses), (10, 7));
        assert!(toml::from_str::<Config>("sockett = \"/x\"").is_err());
        // Containers: the defaults, the other values, and a bad one named.
        assert_eq!(
            (c.containers, c.forwarded),
            (ContainersMode::SoleJob, ForwardedMode::HostDefault)
        );
        let c: Config = toml::from_str("containers = \"off\"\nforwarded = \"pass\"").unwrap();
        assert_eq!(
            (c.containers, c.forwarded),
            (ContainersMode::Off, ForwardedMode::Pass)
        );
        let e = toml::from_str::<Config>("containers = \"all\"").unwrap_err();
        assert!(e.to_string().contains("sole-job"), "{e}");
        // The shipped config is every key with its default.
        let shipped = Config::from_file(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/ringfence.toml"
        )))
        .unwrap();
        assert_eq!(
            (shipped.containers, shipped.forwarded),
            (ContainersMode::SoleJob, ForwardedMode::HostDefault)
        );
        let e = toml::from_str::<Config>("attach = \"xdp\"").unwrap_err();
        assert!(e.to_string().contains("expected \"auto\""), "{e}");
    }
}
