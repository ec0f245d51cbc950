//! Containers and network namespaces a job starts — Docker's and Podman's bridges, BuildKit's
//! `RUN` steps, an `ip netns` + veth + NAT of the job's own, a microVM's tap — are still the
//! job. Their packets leave the host forwarded, with no socket and no job cgroup, so the
//! dataplane places them by device:
//!
//! - a link that appears while the job runs and faces a container (the host end of a veth,
//!   a tap: `netif::faces_containers`, not a bridge) is **claimed**: registered as the host
//!   side of an interface job with the job's own entry. What the container sends is judged
//!   there by the job's policy, its DNS answers bind for the job as they go back in, and the
//!   flow events carry the link's index so that the trail can name the container;
//! - forwarded traffic that came through a link no job claimed (one that was there before,
//!   or the moment before a claim) is judged as it leaves through an uplink, under the
//!   forwarded-traffic job (`Dataplane::set_forward_job`): the job itself in `exec`, the
//!   host default policy in the daemon;
//! - a container's cgroup that appears while the job runs (Docker's, Podman's) is claimed
//!   as one of the job's cgroups: a container on the host's network (`--network host`)
//!   sends from sockets judged by their cgroup;
//! - the networks on the host's container-facing devices (docker0's 172.17.0.0/16, a
//!   user-defined network's bridge, the job's own veth) are the job's own: a service
//!   container, a published port, the container's gateway are reached without a rule, and
//!   not reported as leaks.
use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::kernel::abi;
use crate::kernel::dataplane::Dataplane;
use crate::kernel::netif;

/// The container links and shared networks of one job.
pub struct ContainerLinks {
    job_id: u32,
    entry: abi::rf_job,
    /// Interfaces that were there before the job: the host's, or some other tenant's.
    before: BTreeSet<u32>,
    claimed: BTreeMap<u32, String>,
    nets: BTreeSet<IpNet>,
    /// The cgroup2 root (levels are counted from it).
    cg_root: Option<std::path::PathBuf>,
    /// Container cgroups that were there before the job, and those it claimed (id → dir).
    cg_before: BTreeSet<u64>,
    cg_claimed: BTreeMap<u64, std::path::PathBuf>,
}

/// Where container engines put their containers' cgroups, below the cgroup2 root: Docker's
/// cgroupfs driver (`docker/<id>`), the systemd driver of Docker and Podman
/// (`system.slice/docker-<id>.scope`, `machine.slice/libpod-<id>.scope`), Podman's cgroupfs
/// driver (`libpod_parent/libpod-<id>`). A container's processes sit there, not in the job's
/// cgroup: one with `--network host` sends from sockets in the host's namespace, judged by
/// their cgroup, so that cgroup is claimed like a link.
const ENGINE_PARENTS: &[&str] = &["docker", "system.slice", "machine.slice", "libpod_parent"];

/// Whether `name` (a directory under one of [`ENGINE_PARENTS`]) is a container's cgroup.
fn is_container_cgroup(name: &str) -> bool {
    let id = name
        .strip_prefix("docker-")
        .or_else(|| name.strip_prefix("libpod-"))
        .map(|r| r.strip_suffix(".scope").unwrap_or(r))
        .unwrap_or(name);
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether network `n` on a container's link or bridge may be shared with the job: not one
/// so wide that it covers the world (a /8 someone put on a bridge).
fn shareable(n: IpNet) -> bool {
    match n {
        IpNet::V4(n) => n.prefix_len() >= 16,
        IpNet::V6(n) => n.prefix_len() >= 48,
    }
}

/// Kills every process in cgroup `dir` (`cgroup.kill`) and waits up to 5 s for it to
/// empty. The directory is its engine's to remove.
pub fn kill_cgroup(dir: &std::path::Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let populated = std::fs::read_to_string(dir.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false);
        if !populated {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The container cgroups directly under `dir`: (id, directory).
fn container_cgroups_in(dir: &std::path::Path, out: &mut Vec<(u64, std::path::PathBuf)>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if !is_container_cgroup(&e.file_name().to_string_lossy()) {
            continue;
        }
        if let Ok(m) = e.metadata() {
            if m.is_dir() {
                out.push((m.ino(), e.path()));
            }
        }
    }
}

/// Every container cgroup anywhere under `dir` (an engine's `--cgroup-parent` can put one
/// anywhere), at most `depth` levels down.
fn container_cgroups_deep(
    dir: &std::path::Path,
    depth: u32,
    out: &mut Vec<(u64, std::path::PathBuf)>,
) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if !m.is_dir() {
            continue;
        }
        if is_container_cgroup(&e.file_name().to_string_lossy()) {
            out.push((m.ino(), e.path()));
        } else if depth > 1 {
            container_cgroups_deep(&e.path(), depth - 1, out);
        }
    }
}

/// Finds the containers' cgroups: the engines' usual parents every tick (a few directory
/// reads), the whole tree every tenth (a container started with `--cgroup-parent`
/// elsewhere: found within 100 ms). Shared by every job of a daemon.
pub struct CgroupScan {
    root: Option<std::path::PathBuf>,
    tick: u32,
    /// Found by the last walk of the whole tree outside the usual parents.
    elsewhere: Vec<(u64, std::path::PathBuf)>,
}

impl CgroupScan {
    pub fn new() -> CgroupScan {
        CgroupScan {
            root: crate::job::cgroup::find_cgroup2().ok(),
            tick: 0,
            elsewhere: Vec::new(),
        }
    }

    /// The container cgroups there are now: (id, directory).
    pub fn scan(&mut self) -> Vec<(u64, std::path::PathBuf)> {
        let Some(root) = self.root.as_deref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for parent in ENGINE_PARENTS {
            container_cgroups_in(&root.join(parent), &mut out);
        }
        if self.tick % 10 == 0 {
            let mut all = Vec::new();
            container_cgroups_deep(root, 8, &mut all);
            self.elsewhere = all
                .into_iter()
                .filter(|(id, _)| !out.iter().any(|(o, _)| o == id))
                .collect();
        } else {
            self.elsewhere.retain(|(_, d)| d.is_dir());
        }
        self.tick = self.tick.wrapping_add(1);
        out.extend(self.elsewhere.iter().cloned());
        out
    }
}

impl Default for CgroupScan {
    fn default() -> Self {
        CgroupScan::new()
    }
}

impl ContainerLinks {
    /// For job `job_id` with entry `entry` (as given to `Dataplane::add_job`), starting now:
    /// the links attached so far are not the job's.
    pub fn new(job_id: u32, entry: abi::rf_job, dp: &Dataplane) -> ContainerLinks {
        let mut scan = CgroupScan::new();
        let cg_before = scan.scan().into_iter().map(|(id, _)| id).collect();
        ContainerLinks {
            job_id,
            entry,
            before: dp
                .attached_interfaces()
                .into_iter()
                .map(|(i, _)| i)
                .collect(),
            claimed: BTreeMap::new(),
            nets: BTreeSet::new(),
            cg_before,
            cg_root: crate::job::cgroup::find_cgroup2().ok(),
            cg_claimed: BTreeMap::new(),
        }
    }

    /// For job `job_id`, claiming the containers already running too (their links and
    /// cgroups count as appeared): the service containers a runner starts before the job's
    /// first step.
    pub fn claiming_running(job_id: u32, entry: abi::rf_job) -> ContainerLinks {
        ContainerLinks {
            job_id,
            entry,
            before: BTreeSet::new(),
            claimed: BTreeMap::new(),
            nets: BTreeSet::new(),
            cg_root: crate::job::cgroup::find_cgroup2().ok(),
            cg_before: BTreeSet::new(),
            cg_claimed: BTreeMap::new(),
        }
    }

    /// Claims the containers' cgroups that appeared since the last look (with `claim`;
    /// without, they are passed over for good), so that a container's sockets in the host's
    /// namespace (`--network host`) are the job's. Cheap (a few directory reads): the event
    /// loops call it every tick, so a container is claimed within one (10 ms) of its cgroup
    /// appearing, which its engine creates before it starts the container's process.
    /// `now`: [`CgroupScan::scan`]'s. Returns the cgroups claimed now (for exec's guard,
    /// which kills them if ringfence dies).
    pub fn refresh_cgroups(
        &mut self,
        dp: &mut Dataplane,
        claim: bool,
        now: &[(u64, std::path::PathBuf)],
    ) -> Vec<std::path::PathBuf> {
        let mut claimed_now = Vec::new();
        let Some(root) = self.cg_root.clone() else {
            return claimed_now;
        };
        let live: BTreeSet<u64> = now.iter().map(|(id, _)| *id).collect();
        // Gone (the container ended): its entry goes with it.
        let gone: Vec<u64> = self
            .cg_claimed
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            let _ = dp.remove_job(id);
            self.cg_claimed.remove(&id);
        }
        self.cg_before.retain(|id| live.contains(id));
        for (id, dir) in now {
            let id = *id;
            if self.cg_before.contains(&id) || self.cg_claimed.contains_key(&id) {
                continue;
            }
            if !claim {
                self.cg_before.insert(id);
                continue;
            }
            let level = dir
                .strip_prefix(&root)
                .map(|p| p.components().count() as u32)
                .unwrap_or(0);
            match dp.add_job(id, level, self.entry) {
                Ok(()) => {
                    tracing::info!(cgroup = %dir.display(), "container cgroup claimed for the job");
                    self.cg_claimed.insert(id, dir.clone());
                    claimed_now.push(dir.clone());
                }
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), "claiming a container's cgroup: {e}")
                }
            }
        }
        claimed_now
    }

    /// After interfaces or addresses changed (and once at the start): claims the
    /// container links that appeared (with `claim`; without, they are passed over for good:
    /// the daemon's other jobs could have started them), and allows the job the networks of
    /// every device that faces containers. Returns the names of the links claimed now.
    pub fn refresh(&mut self, dp: &mut Dataplane, claim: bool) -> Vec<String> {
        let mut now_claimed = Vec::new();
        let attached = dp.attached_interfaces();
        let live: BTreeSet<u32> = attached.iter().map(|(i, _)| *i).collect();
        self.claimed.retain(|i, _| live.contains(i));
        // The networks the job shares with its containers: those on its claimed links and
        // on the bridges they are ports of — not every bridge's on the host (one left behind
        // by an earlier job, or another tenant's, is not this job's).
        let mut sharing: BTreeSet<u32> = self.claimed.keys().copied().collect();
        for i in self.claimed.keys() {
            if let Ok(Some(m)) = netif::master_of(*i) {
                sharing.insert(m);
            }
        }
        // And the bridges that appeared while it ran (`docker network create`): its
        // containers join them a moment later.
        // (Not one made while it did not run alone: that is no one's.)
        for (i, name) in &attached {
            if !self.before.contains(i)
                && dp.is_inside(*i)
                && netif::driver(name).is_ok_and(|d| d == "bridge")
            {
                if claim {
                    sharing.insert(*i);
                } else {
                    self.before.insert(*i);
                }
            }
        }
        let mut nets = BTreeSet::new();
        for (ifindex, name) in &attached {
            if sharing.contains(ifindex) {
                nets.extend(netif::networks(name).into_iter().filter(|n| shareable(*n)));
            }
            if self.before.contains(ifindex) || self.claimed.contains_key(ifindex) {
                continue;
            }
            // Bridges are where many links meet (and where packets to the host arrive after
            // their link judged them): not links of their own to claim.
            if !netif::is_container_link(name) {
                continue;
            }
            if !claim {
                self.before.insert(*ifindex);
                continue;
            }
            match dp.add_interface_job(*ifindex, self.entry.host_side()) {
                Ok(()) => {
                    tracing::info!(ifname = name, ifindex, "container link claimed for the job");
                    self.claimed.insert(*ifindex, name.clone());
                    now_claimed.push(name.clone());
                }
                Err(e) => tracing::warn!(
                    ifname = name,
                    "claiming a container link: {e}: its traffic is judged at the uplink"
                ),
            }
        }
        for n in nets.difference(&self.nets) {
            match dp.allow_network(self.job_id, *n) {
                Ok(true) => tracing::info!(network = %n, "container network shared with the job"),
                Ok(false) => {}
                Err(e) => tracing::warn!(network = %n, "allowing a container network: {e}"),
            }
        }
        for n in self.nets.difference(&nets) {
            let _ = dp.forget_network(self.job_id, *n);
        }
        self.nets = nets;
        now_claimed
    }

    /// The links claimed, by index and name (for the trail: flows name them).
    pub fn claimed(&self) -> &BTreeMap<u32, String> {
        &self.claimed
    }

    /// Kills the containers whose cgroups the job claimed (the job ends, and its
    /// containers with it, as its background processes do).
    pub fn kill_containers(&self) {
        for dir in self.cg_claimed.values() {
            kill_cgroup(dir);
        }
    }

    /// Stops holding link `ifindex` as this job's (another job takes it, see `job link`),
    /// and never claims it again. Its entry is left for the new owner to overwrite.
    pub fn give_up(&mut self, ifindex: u32) -> bool {
        self.before.insert(ifindex);
        self.claimed.remove(&ifindex).is_some()
    }

    /// Gives back every claimed link and shared network (the job ends; the daemon reuses
    /// the slot).
    pub fn release(&mut self, dp: &mut Dataplane) {
        for i in std::mem::take(&mut self.claimed).into_keys() {
            let _ = dp.remove_interface_job(i);
        }
        for n in std::mem::take(&mut self.nets) {
            let _ = dp.forget_network(self.job_id, n);
        }
        for id in std::mem::take(&mut self.cg_claimed).into_keys() {
            let _ = dp.remove_job(id);
        }
    }
}

/// Names for the containers behind forwarded flows: the Docker Engine's names by address
/// (asked over its API socket, `DOCKER_HOST` or /var/run/docker.sock, when a flow comes
/// from an address not seen yet, at most once a second), else the device the flow came in
/// on. A DNS query copy carries no address: it is named as the last flow from its device
/// was (the query's own UDP or TCP flow to the resolver comes first).
#[derive(Default)]
pub struct ContainerNames {
    by_addr: std::collections::HashMap<std::net::IpAddr, String>,
    by_link: std::collections::HashMap<u32, String>,
    last_ask: Option<std::time::Instant>,
    /// `via <device>` by ifindex, asked of the kernel at most once a second per device: a
    /// flood of forwarded flows would otherwise cost a socket and an ioctl each.
    via: std::collections::HashMap<u32, String>,
    via_since: Option<std::time::Instant>,
}

impl ContainerNames {
    /// What to call the sender of a flow that came in on `ifindex` from `saddr` (when the
    /// event has it).
    pub fn label(&mut self, ifindex: u32, saddr: Option<std::net::IpAddr>) -> String {
        let Some(saddr) = saddr else {
            return match self.by_link.get(&ifindex) {
                Some(l) => l.clone(),
                None => self.via(ifindex),
            };
        };
        if !self.by_addr.contains_key(&saddr)
            && self
                .last_ask
                .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1))
        {
            self.last_ask = Some(std::time::Instant::now());
            if let Some(m) = docker_containers() {
                self.by_addr = m;
            }
        }
        let label = match self.by_addr.get(&saddr) {
            Some(l) => l.clone(),
            None => self.via(ifindex),
        };
        if self.by_link.get(&ifindex) != Some(&label) {
            if self.by_link.len() > 4096 {
                self.by_link.clear(); // links come and go: forget the old ones now and then
            }
            self.by_link.insert(ifindex, label.clone());
        }
        label
    }

    /// `via <device>`, from the cache while it is less than a second old (a device renamed
    /// or gone is named anew within a second).
    fn via(&mut self, ifindex: u32) -> String {
        let now = std::time::Instant::now();
        if self
            .via_since
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            self.via.clear();
            self.via_since = Some(now);
        }
        self.via
            .entry(ifindex)
            .or_insert_with(|| via(ifindex))
            .clone()
    }

    /// Names `flow` after the container it came from, and in place of a process where
    /// none is known.
    pub fn name(
        &mut self,
        flow: &mut crate::trail::events::FlowEvent,
        ifindex: u32,
        saddr: Option<std::net::IpAddr>,
    ) {
        if ifindex == 0 {
            return;
        }
        let who = self.label(ifindex, saddr);
        if flow.comm.is_empty() {
            flow.comm.clone_from(&who);
        }
        flow.container = Some(who);
    }
}

fn via(ifindex: u32) -> String {
    match nix::net::if_::if_indextoname(ifindex) {
        Ok(n) => format!("via {}", n.to_string_lossy()),
        Err(_) => format!("via interface {ifindex}"),
    }
}

/// Docker's running containers by address: `docker:<name>` for each address of each.
/// `None` when no engine answers (none installed, or not running): that is not an error.
fn docker_containers() -> Option<std::collections::HashMap<std::net::IpAddr, String>> {
    use std::io::{Read, Write};
    let path = match std::env::var("DOCKER_HOST") {
        Ok(h) => h.strip_prefix("unix://")?.to_string(),
        Err(_) => "/var/run/docker.sock".to_string(),
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .ok()?;
    // HTTP/1.0: the engine closes the connection after the body, never chunks it.
    s.write_all(b"GET /containers/json HTTP/1.0\r\nHost: docker\r\n\r\n")
        .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let at = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    let list: serde_json::Value = serde_json::from_slice(&resp[at + 4..]).ok()?;
    let mut out = std::collections::HashMap::new();
    for c in list.as_array()? {
        let name = c["Names"][0]
            .as_str()
            .map(|n| n.trim_start_matches('/').to_string())
            .or_else(|| c["Id"].as_str().map(|i| i.chars().take(12).collect()))
            .unwrap_or_default();
        let Some(nets) = c["NetworkSettings"]["Networks"].as_object() else {
            continue;
        };
        for n in nets.values() {
            for k in ["IPAddress", "GlobalIPv6Address"] {
                if let Some(a) = n[k].as_str().and_then(|a| a.parse().ok()) {
                    out.insert(a, format!("docker:{name}"));
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn container_cgroup_names() {
        let id = "e912117ee30d93b6f58aab788b727b26cd3d8680ce94cd693a07c41ab8ffe576";
        assert!(super::is_container_cgroup(id));
        assert!(super::is_container_cgroup(&format!("docker-{id}.scope")));
        assert!(super::is_container_cgroup(&format!("libpod-{id}.scope")));
        assert!(super::is_container_cgroup(&format!("libpod-{id}")));
        assert!(!super::is_container_cgroup("ssh.service"));
        assert!(!super::is_container_cgroup(&format!(
            "libpod-conmon-{id}.scope"
        )));
        assert!(!super::is_container_cgroup(&id[1..]));
    }
}
