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
}

impl ContainerLinks {
    /// For job `job_id` with entry `entry` (as given to `Dataplane::add_job`), starting now:
    /// the links attached so far are not the job's.
    pub fn new(job_id: u32, entry: abi::rf_job, dp: &Dataplane) -> ContainerLinks {
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
        }
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
        let mut nets = BTreeSet::new();
        for (ifindex, name) in &attached {
            if !dp.is_inside(*ifindex) {
                continue;
            }
            nets.extend(netif::networks(name));
            if self.before.contains(ifindex) || self.claimed.contains_key(ifindex) {
                continue;
            }
            if !claim {
                self.before.insert(*ifindex);
                continue;
            }
            // A bridge is where many links meet (and where packets to the host arrive after
            // their link judged them): not a link of its own to claim.
            if netif::driver(name).map(|d| d == "bridge").unwrap_or(true) {
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

    /// Gives back every claimed link and shared network (the job ends; the daemon reuses
    /// the slot).
    pub fn release(&mut self, dp: &mut Dataplane) {
        for i in std::mem::take(&mut self.claimed).into_keys() {
            let _ = dp.remove_interface_job(i);
        }
        for n in std::mem::take(&mut self.nets) {
            let _ = dp.forget_network(self.job_id, n);
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
}

impl ContainerNames {
    /// What to call the sender of a flow that came in on `ifindex` from `saddr` (when the
    /// event has it).
    pub fn label(&mut self, ifindex: u32, saddr: Option<std::net::IpAddr>) -> String {
        let Some(saddr) = saddr else {
            return self
                .by_link
                .get(&ifindex)
                .cloned()
                .unwrap_or_else(|| via(ifindex));
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
        let label = self
            .by_addr
            .get(&saddr)
            .cloned()
            .unwrap_or_else(|| via(ifindex));
        if self.by_link.len() > 4096 {
            self.by_link.clear(); // links come and go: forget the old ones now and then
        }
        self.by_link.insert(ifindex, label.clone());
        label
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
