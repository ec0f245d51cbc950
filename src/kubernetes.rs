//! `ringfence kubernetes`: the node agent for Actions Runner Controller (ARC). It watches
//! the pods scheduled on its node that carry the runner label (the API server's list and
//! watch, `fieldSelector=spec.nodeName=NODE`), finds each pod's cgroup as kubelet laid it
//! out (systemd or cgroupfs driver, any QoS class, cgroup v2), and starts a ringfence job
//! on that cgroup through the daemon's control socket: the pod's containers are the job.
//! The policy is the pod's `ringfence.dev/policy` annotation (inline TOML), or the policy
//! its `ringfence.dev/policy-name` annotation names in the policies directory (the
//! ConfigMap), or the cluster default there. A pod on a network namespace of its own (not
//! `hostNetwork`) also has its host-side veth linked to the job (`job link`), found from one
//! of its processes' namespace ([`host_veth_of`]). The job ends when the pod is deleted or has
//! finished. It is a client of the daemon like `ringfence job start`, so it runs without
//! BPF privileges (deploy/kubernetes/ runs it as a container of its own beside the daemon).
//!
//! The API is read with plain HTTP(S) (ureq, already a dependency): two GET requests and
//! a JSON line stream do not justify a Kubernetes client crate and its dependency tree.
use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::daemon::client::{call, SocketArg};
use crate::daemon::protocol::{Request, Response, Target};
use crate::job::spec::{PolicySpec, PolicyText};

#[derive(Debug, clap::Args)]
pub struct KubeArgs {
    /// The agent's settings (TOML; every key optional: see deploy/kubernetes/).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// The `[kubernetes]` settings. Defaults fit the in-cluster DaemonSet of deploy/kubernetes.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KubeConfig {
    /// The API server; default `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`
    /// (its CA: `SSL_CERT_FILE`, which the DaemonSet points at the service account's).
    #[serde(default)]
    pub api: Option<String>,
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// This node's name; default `$NODE_NAME` (the DaemonSet sets it from spec.nodeName).
    #[serde(default)]
    pub node_name: Option<String>,
    /// Which pods are runners: a label selector. ARC gives every runner pod of a scale set
    /// `actions-ephemeral-runner=True` (and its listener pods not).
    #[serde(default = "default_selector")]
    pub label_selector: String,
    #[serde(default = "default_policy_annotation")]
    pub policy_annotation: String,
    #[serde(default = "default_policy_name_annotation")]
    pub policy_name_annotation: String,
    /// Named policies, one `<name>.toml` each (the ConfigMap's mount).
    #[serde(default = "default_policies_dir")]
    pub policies_dir: PathBuf,
    /// The policy of a runner pod that names none.
    #[serde(default = "default_default_policy")]
    pub default_policy: String,
    /// Where kubelet's tree starts; default: the cgroup2 mount.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
}

fn default_token_file() -> PathBuf {
    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
}
fn default_selector() -> String {
    "actions-ephemeral-runner=True".into()
}
fn default_policy_annotation() -> String {
    "ringfence.dev/policy".into()
}
fn default_policy_name_annotation() -> String {
    "ringfence.dev/policy-name".into()
}
fn default_policies_dir() -> PathBuf {
    "/etc/ringfence/policies".into()
}
fn default_default_policy() -> String {
    "default".into()
}

impl Default for KubeConfig {
    fn default() -> Self {
        toml::from_str("").expect("every key has a default")
    }
}

/// A pod as far as the agent reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub phase: String,
    /// `spec.hostNetwork`: the pod shares the node's network namespace, where the daemon
    /// attaches.
    pub host_network: bool,
    pub annotations: BTreeMap<String, String>,
}

impl Pod {
    pub fn from_json(v: &Value) -> Option<Pod> {
        let m = &v["metadata"];
        let s = |x: &Value| x.as_str().map(str::to_string);
        Some(Pod {
            namespace: s(&m["namespace"]).unwrap_or_default(),
            name: s(&m["name"])?,
            uid: s(&m["uid"])?,
            phase: s(&v["status"]["phase"]).unwrap_or_default(),
            host_network: v["spec"]["hostNetwork"].as_bool().unwrap_or(false),
            annotations: m["annotations"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The job id: `k8s-<namespace>.<name>-<uid's first 8>`, within the daemon's 128.
    pub fn job_id(&self) -> String {
        let uid: String = self.uid.chars().filter(|c| *c != '-').take(8).collect();
        let mut base = format!("k8s-{}.{}", self.namespace, self.name);
        base.retain(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        base.truncate(128 - 1 - uid.len());
        format!("{base}-{uid}")
    }

    fn finished(&self) -> bool {
        matches!(self.phase.as_str(), "Succeeded" | "Failed")
    }
}

/// Where kubelet puts a pod's cgroup, relative to its root, for each driver and QoS class:
/// systemd `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid, - as _>.slice`,
/// cgroupfs `kubepods/<qos>/pod<uid>`; Guaranteed pods sit directly under kubepods.
pub fn pod_cgroup_candidates(uid: &str) -> Vec<PathBuf> {
    let u = uid.replace('-', "_");
    vec![
        format!("kubepods.slice/kubepods-pod{u}.slice").into(),
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice").into(),
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice").into(),
        format!("kubepods/pod{uid}").into(),
        format!("kubepods/burstable/pod{uid}").into(),
        format!("kubepods/besteffort/pod{uid}").into(),
    ]
}

/// The pod's cgroup under `root`, once kubelet has made it.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Option<PathBuf> {
    // A uid is a UUID: anything else could walk the tree.
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return None;
    }
    pod_cgroup_candidates(uid)
        .into_iter()
        .map(|p| root.join(p))
        .find(|p| p.join("cgroup.procs").exists())
}

fn valid_policy_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'))
        && !n.starts_with('.')
}

impl KubeConfig {
    pub fn load(path: Option<&Path>) -> Result<KubeConfig> {
        let Some(p) = path else {
            return Ok(KubeConfig::default());
        };
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        toml::from_str(&text).map_err(|e| {
            crate::job::spec::UsageError::Other(format!("{}: {e}", p.display())).into()
        })
    }

    /// The policy of `pod`: its inline annotation, the named one, or the default. An
    /// annotation that does not parse, or names no policy, gets the default (the cluster's
    /// secure default rather than no job at all) and is said in the log.
    pub fn policy_for(&self, pod: &Pod) -> Result<PolicySpec> {
        let who = format!("pod {}/{}", pod.namespace, pod.name);
        if let Some(text) = pod.annotations.get(&self.policy_annotation) {
            let spec = PolicySpec {
                file: Some(PolicyText {
                    source: format!("{who} annotation {}", self.policy_annotation),
                    text: text.clone(),
                }),
                ..Default::default()
            };
            let checked = if crate::policy::file_cidr_files(text).is_empty() {
                spec.build().map_err(anyhow::Error::new).and_then(|p| {
                    p.compile()?;
                    Ok(())
                })
            } else {
                Err(anyhow::anyhow!(
                    "allowed-cidr-files is not taken from an annotation (name a policy in the ConfigMap)"
                ))
            };
            match checked {
                Ok(()) => return Ok(spec),
                Err(e) => tracing::error!(
                    pod = %who,
                    "the {} annotation is refused, the default policy applies: {e:#}",
                    self.policy_annotation
                ),
            }
        }
        let named = pod.annotations.get(&self.policy_name_annotation);
        if let Some(n) = named {
            if valid_policy_name(n) && self.policies_dir.join(format!("{n}.toml")).exists() {
                return self.named(n);
            }
            tracing::error!(pod = %who, "{} names {n:?}, which is not a policy in {}: the default policy applies", self.policy_name_annotation, self.policies_dir.display());
        }
        self.named(&self.default_policy)
    }

    fn named(&self, name: &str) -> Result<PolicySpec> {
        let args = crate::job::spec::PolicyArgs {
            policy: Some(self.policies_dir.join(format!("{name}.toml"))),
            ..Default::default()
        };
        let spec = args.to_spec()?;
        spec.build()?.compile()?;
        Ok(spec)
    }

    fn api(&self) -> Result<String> {
        if let Some(a) = &self.api {
            return Ok(a.trim_end_matches('/').to_string());
        }
        let host = std::env::var("KUBERNETES_SERVICE_HOST").context(
            "no api in the config and KUBERNETES_SERVICE_HOST is not set (not in a cluster?)",
        )?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(format!("https://{host}:{port}"))
    }

    fn node(&self) -> Result<String> {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .filter(|n| !n.is_empty())
            .context("no node-name in the config and NODE_NAME is not set (the DaemonSet sets it from spec.nodeName)")
    }
}

/// What the API watcher thread hands the agent.
enum Msg {
    /// A fresh list: exactly these pods exist.
    Sync(Vec<Pod>),
    Upsert(Pod),
    Deleted(Pod),
}

fn pods_url(api: &str, node: &str, selector: &str) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "{api}/api/v1/pods?fieldSelector={}&labelSelector={}",
        enc(&format!("spec.nodeName={node}")),
        enc(selector)
    )
}

/// List, then watch from the list's resourceVersion; on any error or an expired version,
/// list again. Runs until the agent goes.
fn watch_api(cfg: KubeConfig, tx: mpsc::Sender<Msg>) {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .build();
    let mut backoff = Duration::from_secs(1);
    loop {
        let r = (|| -> Result<()> {
            let api = cfg.api()?;
            let url = pods_url(&api, &cfg.node()?, &cfg.label_selector);
            let token = std::fs::read_to_string(&cfg.token_file)
                .with_context(|| format!("reading the token {}", cfg.token_file.display()))?;
            let auth = format!("Bearer {}", token.trim());
            let list: Value = agent
                .get(&url)
                .set("Authorization", &auth)
                .timeout(Duration::from_secs(60))
                .call()
                .with_context(|| format!("listing pods: GET {url}"))?
                .into_json()?;
            let pods = list["items"]
                .as_array()
                .map(|a| a.iter().filter_map(Pod::from_json).collect())
                .unwrap_or_default();
            let mut rv = list["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if tx.send(Msg::Sync(pods)).is_err() {
                return Ok(());
            }
            loop {
                let w = format!(
                    "{url}&watch=true&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion={rv}"
                );
                let resp = agent
                    .get(&w)
                    .set("Authorization", &auth)
                    .call()
                    .with_context(|| format!("watching pods: GET {w}"))?;
                let mut reader = std::io::BufReader::new(resp.into_reader());
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 {
                        break; // the server's timeout: watch again from rv
                    }
                    if line.trim().is_empty() {
                        continue;
                    }
                    let ev: Value = serde_json::from_str(&line)
                        .with_context(|| format!("a watch event that does not parse: {line:?}"))?;
                    let obj = &ev["object"];
                    if let Some(v) = obj["metadata"]["resourceVersion"].as_str() {
                        rv = v.to_string();
                    }
                    let msg = match ev["type"].as_str() {
                        Some("ADDED") | Some("MODIFIED") => Pod::from_json(obj).map(Msg::Upsert),
                        Some("DELETED") => Pod::from_json(obj).map(Msg::Deleted),
                        Some("BOOKMARK") => None,
                        // 410 Gone (the version expired) and the rest: list again.
                        _ => anyhow::bail!("watch error: {}", obj),
                    };
                    if let Some(m) = msg {
                        if tx.send(m).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
        })();
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!("kubernetes API: {e:#}; listing again in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The agent's own view: which runner pods have a job, which wait for their cgroup.
struct Agent {
    cfg: KubeConfig,
    socket: PathBuf,
    root: PathBuf,
    /// uid → pod, for pods that should have a job.
    pods: HashMap<String, Pod>,
    /// uid → job id, for pods that have one.
    jobs: HashMap<String, String>,
    /// Pods whose veth was not found yet (said once each).
    refused: std::collections::HashSet<String>,
    /// Pods on a network namespace of their own whose veth is linked to their job.
    linked: std::collections::HashSet<String>,
}

impl Agent {
    fn daemon_jobs(&self) -> Result<Vec<String>> {
        let Response::Status(v) = call(&self.socket, &Request::Status)? else {
            anyhow::bail!("unexpected answer to status");
        };
        Ok(v["jobs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|j| j["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn sync(&mut self, pods: Vec<Pod>) {
        let listed: HashMap<String, Pod> = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
        // Jobs of pods that are gone (also while the agent was away: a restarted agent
        // finds its jobs in the daemon by their k8s- ids).
        let running = self.daemon_jobs().unwrap_or_else(|e| {
            tracing::warn!("asking the daemon for its jobs: {e:#}");
            Vec::new()
        });
        let wanted: HashMap<String, String> = listed
            .values()
            .map(|p| (p.job_id(), p.uid.clone()))
            .collect();
        for id in running.iter().filter(|i| i.starts_with("k8s-")) {
            match wanted.get(id) {
                Some(uid) => {
                    self.jobs.insert(uid.clone(), id.clone());
                }
                None => self.end(id, "its pod is gone"),
            }
        }
        let gone: Vec<String> = self
            .jobs
            .keys()
            .filter(|u| !listed.contains_key(*u))
            .cloned()
            .collect();
        for u in gone {
            if let Some(id) = self.jobs.remove(&u) {
                self.end(&id, "its pod is gone");
            }
        }
        self.pods.clear();
        for p in listed.into_values() {
            self.upsert(p);
        }
    }

    fn upsert(&mut self, pod: Pod) {
        if pod.finished() {
            self.deleted(&pod, "its pod finished");
            return;
        }
        self.pods.insert(pod.uid.clone(), pod.clone());
        self.start_pending();
    }

    fn deleted(&mut self, pod: &Pod, why: &str) {
        self.pods.remove(&pod.uid);
        self.linked.remove(&pod.uid);
        self.refused.remove(&pod.uid);
        if let Some(id) = self.jobs.remove(&pod.uid) {
            self.end(&id, why);
        }
    }

    /// Starts a job for every wanted pod whose cgroup kubelet has made by now.
    fn start_pending(&mut self) {
        let pending: Vec<Pod> = self
            .pods
            .values()
            .filter(|p| !self.jobs.contains_key(&p.uid))
            .cloned()
            .collect();
        for pod in pending {
            let Some(cg) = find_pod_cgroup(&self.root, &pod.uid) else {
                continue;
            };
            let id = pod.job_id();
            let policy = match self.cfg.policy_for(&pod) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(pod = %pod.name, "no policy for the pod (not even the default): {e:#}");
                    continue;
                }
            };
            let req = Request::JobStart {
                id: id.clone(),
                target: Target::Cgroup(cg.display().to_string()),
                policy,
                fail_on_block: false,
                webhook: None,
                claim_running_containers: false,
            };
            match call(&self.socket, &req) {
                Ok(_) => {
                    tracing::info!(job = %id, pod = %format!("{}/{}", pod.namespace, pod.name), cgroup = %cg.display(), "job started");
                    self.jobs.insert(pod.uid.clone(), id);
                }
                Err(e) if e.to_string().contains("already") => {
                    self.jobs.insert(pod.uid.clone(), id);
                }
                Err(e) => tracing::error!(job = %id, "starting the pod's job: {e:#}"),
            }
        }
    }

    /// Links each pod on a network namespace of its own to its job: its host-side veth
    /// (found from a process of the pod) becomes the job's link. Until the pod has a
    /// process and its veth, it is looked for again every half second.
    fn link_pending(&mut self) {
        let pending: Vec<(Pod, String)> = self
            .pods
            .values()
            .filter(|p| !p.host_network && !self.linked.contains(&p.uid))
            .filter_map(|p| Some((p.clone(), self.jobs.get(&p.uid)?.clone())))
            .collect();
        for (pod, id) in pending {
            let who = format!("{}/{}", pod.namespace, pod.name);
            let Some(cg) = find_pod_cgroup(&self.root, &pod.uid) else {
                continue;
            };
            let veth = match host_veth_of(&cg) {
                Ok(Some(v)) => v,
                Ok(None) => {
                    if self.refused.insert(pod.uid.clone()) {
                        tracing::info!(pod = %who, "waiting for the pod's network namespace and its veth (until then only its sockets in the node's namespace are judged)");
                    }
                    continue;
                }
                Err(e) => {
                    if self.refused.insert(pod.uid.clone()) {
                        tracing::error!(pod = %who, "finding the pod's veth: {e:#} (looked for again every half second)");
                    }
                    continue;
                }
            };
            let req = Request::JobLink {
                id: id.clone(),
                interface: veth.clone(),
            };
            match call(&self.socket, &req) {
                Ok(_) => {
                    tracing::info!(job = %id, pod = %who, interface = %veth, "the pod's veth linked to its job");
                    self.linked.insert(pod.uid.clone());
                }
                Err(e) => {
                    tracing::error!(job = %id, interface = %veth, "linking the pod's veth: {e:#}")
                }
            }
        }
    }

    fn end(&self, id: &str, why: &str) {
        let req = Request::JobEnd {
            id: id.to_string(),
            format: Some("text".into()),
            // kubelet owns the pod's cgroup and what is in it.
            keep_processes: true,
        };
        match call(&self.socket, &req) {
            Ok(_) => tracing::info!(job = id, "job ended: {why}"),
            Err(e) => tracing::warn!(job = id, "ending the job ({why}): {e:#}"),
        }
    }
}

pub fn run(args: &KubeArgs) -> Result<i32> {
    let cfg = KubeConfig::load(args.config.as_deref())?;
    // Said at once rather than in a retry loop.
    cfg.api()?;
    cfg.node()?;
    let root = match &cfg.cgroup_root {
        Some(r) => r.clone(),
        None => crate::job::cgroup::find_cgroup2()?,
    };
    let (tx, rx) = mpsc::channel();
    let wcfg = cfg.clone();
    std::thread::spawn(move || watch_api(wcfg, tx));
    let mut agent = Agent {
        cfg,
        socket: args.socket.socket.clone(),
        root,
        pods: HashMap::new(),
        jobs: HashMap::new(),
        refused: Default::default(),
        linked: Default::default(),
    };
    tracing::info!(node = %agent.cfg.node()?, selector = %agent.cfg.label_selector, "watching runner pods");
    let mut last_tick = Instant::now();
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(Msg::Sync(pods)) => agent.sync(pods),
            Ok(Msg::Upsert(p)) => {
                agent.upsert(p);
                agent.link_pending();
            }
            Ok(Msg::Deleted(p)) => agent.deleted(&p, "its pod was deleted"),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("the API watcher stopped"),
        }
        // A pod seen before kubelet made its cgroup: look again.
        if last_tick.elapsed() >= Duration::from_millis(500) {
            agent.start_pending();
            agent.link_pending();
            last_tick = Instant::now();
        }
    }
}

/// The pids in cgroup `dir` and below it (as this process's pid namespace numbers them:
/// the agent runs with the node's, `hostPID`).
fn pids_below(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(t) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(t.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids_below(&e.path(), out);
            }
        }
    }
}

/// The host side (in this process's network namespace, the node's) of the veth of the pod
/// whose cgroup is `cg`: its first process's network namespace is entered (in a thread of
/// its own) and asked which of its links have a peer elsewhere (IFLA_LINK: the peer's
/// index here); the index must name a veth here whose own peer is elsewhere. `None` until
/// the pod has a process on a network namespace of its own and the veth exists.
pub fn host_veth_of(cg: &Path) -> Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    let mut pids = Vec::new();
    pids_below(cg, &mut pids);
    for pid in pids {
        let Ok(f) = std::fs::File::open(format!("/proc/{pid}/ns/net")) else {
            continue; // gone meanwhile
        };
        let m = f.metadata()?;
        if (m.dev(), m.ino()) == (own.dev(), own.ino()) {
            continue; // on the node's network
        }
        let links = crate::kernel::netif::peer_links_in(f)
            .with_context(|| format!("listing the links of process {pid}'s network namespace (the agent needs CAP_SYS_ADMIN)"))?;
        for (_, peer) in links {
            let Ok(name) = nix::net::if_::if_indextoname(peer) else {
                continue;
            };
            let name = name.to_string_lossy().into_owned();
            if crate::kernel::netif::driver(&name).is_ok_and(|d| d == "veth")
                && crate::kernel::netif::peer_elsewhere(peer).unwrap_or(false)
            {
                return Ok(Some(name));
            }
        }
        // Every process of a pod shares its network namespace: one is enough.
        return Ok(None);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_of_both_drivers_and_every_qos() {
        let uid = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";
        let c = pod_cgroup_candidates(uid);
        let s: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
        assert!(s.contains(
            &"kubepods.slice/kubepods-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice".into()
        ));
        assert!(s.contains(&"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice".into()));
        assert!(s.contains(&"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d_4e5f_6789_abcd_ef0123456789.slice".into()));
        assert!(s.contains(&format!("kubepods/pod{uid}")));
        assert!(s.contains(&format!("kubepods/burstable/pod{uid}")));
        assert!(s.contains(&format!("kubepods/besteffort/pod{uid}")));
        // Not a UUID: never a path.
        assert_eq!(find_pod_cgroup(Path::new("/"), "../../etc"), None);
    }

    #[test]
    fn job_ids_fit_and_are_valid() {
        let p = Pod {
            namespace: "arc-runners".into(),
            name: "x".repeat(300),
            uid: "0a1b2c3d-4e5f-6789-abcd-ef0123456789".into(),
            phase: "Running".into(),
            host_network: true,
            annotations: BTreeMap::new(),
        };
        let id = p.job_id();
        assert!(id.len() <= 128, "{id}");
        assert!(id.starts_with("k8s-arc-runners.xxx"));
        assert!(id.ends_with("-0a1b2c3d"));
    }

    #[test]
    fn url_selects_node_and_label() {
        assert_eq!(
            pods_url("https://k:443", "node-1", "actions-ephemeral-runner=True"),
            "https://k:443/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1&labelSelector=actions-ephemeral-runner%3DTrue"
        );
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c = KubeConfig::default();
        assert_eq!(c.policy_annotation, "ringfence.dev/policy");
        assert!(toml::from_str::<KubeConfig>("nodename = \"x\"").is_err());
    }
}
