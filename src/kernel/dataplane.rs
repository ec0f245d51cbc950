//! The kernel side as the agent sees it: load the skeleton, attach it to interfaces (TCX on
//! 6.6+, clsact through netlink before), and read and write its maps.
use ipnet::IpNet;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;
use std::time::Duration;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{
    AsRawLibbpf, Link, MapCore, MapFlags, MapHandle, ProgramAttachType, TcHook, TcHookBuilder,
    TC_EGRESS, TC_INGRESS,
};
use thiserror::Error;

use crate::kernel::abi::{self, bytes_of, from_bytes};
use crate::kernel::skel::{RingfenceSkel, RingfenceSkelBuilder};
use crate::policy::{Compiled, PortSet};

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("ringfence must run as root (it loads BPF programs and attaches them to interfaces)")]
    NotRoot,
    #[error("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); ringfence needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error("kernel {0} is too old: ringfence needs Linux 5.17 or newer (bpf_loop)")]
    KernelTooOld(String),
    #[error("interface {0:?} does not exist in this network namespace")]
    NoInterface(String),
    #[error("loading the BPF programs failed: {0} (run with RUST_LOG=debug for the verifier log)")]
    Load(#[source] libbpf_rs::Error),
    #[error("attaching to {ifname} ({dir}) with {kind} failed: {source}")]
    Attach {
        ifname: String,
        dir: &'static str,
        kind: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("policy does not fit the dataplane: {0}")]
    Policy(String),
    #[error(transparent)]
    Pin(#[from] crate::kernel::pins::PinError),
    #[error("the dataplane pinned at {base} has map {map} sized for {pinned} entries; this configuration asks for {want}. Map sizes are fixed once pinned: run `ringfence unload` (it detaches everything; end the jobs first) and start the daemon again, or set the daemon's config back to the sizes it was started with")]
    PinnedSize {
        base: String,
        map: &'static str,
        pinned: u32,
        want: u32,
    },
    #[error("reusing the maps pinned at {base} failed: {source} (were they made with other map sizes? a daemon must be configured as the one that pinned them, or unloaded first)")]
    Reuse {
        base: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("pinning {what} at {path}: {source}")]
    PinLink {
        what: String,
        path: String,
        #[source]
        source: libbpf_rs::Error,
    },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// How programs are attached. `Auto` takes TCX where the kernel has it (6.6+).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachMode {
    #[default]
    Auto,
    Tcx,
    Clsact,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachKind {
    Tcx,
    Clsact,
}

impl AttachKind {
    pub fn name(self) -> &'static str {
        match self {
            AttachKind::Tcx => "tcx",
            AttachKind::Clsact => "clsact",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub attach: AttachMode,
    /// Learned addresses live at least this long, whatever the DNS TTL.
    pub dns_min_ttl: Duration,
    /// Added to every learned address's TTL: clients reuse answers a little past their TTL.
    pub dns_grace: Duration,
    /// Off only for benchmarks.
    pub emit_events: bool,
    /// Benchmarks only: judge every packet as a new flow (skips the flow cache).
    pub always_judge: bool,
    /// How many entries the maps hold (see [`crate::kernel::capacity`]).
    pub capacity: crate::kernel::capacity::Capacity,
    /// Pin maps and links under this bpffs base (the daemon): they outlive the process,
    /// and a later load with the same ABI reuses them (`Dataplane::adopted`).
    pub pins: Option<crate::kernel::pins::Pins>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            attach: AttachMode::Auto,
            dns_min_ttl: Duration::from_secs(0),
            dns_grace: Duration::from_secs(30),
            emit_events: true,
            always_judge: false,
            capacity: Default::default(),
            pins: None,
        }
    }
}

/// The running kernel's release and what it supports.
#[derive(Clone, Debug)]
pub struct KernelInfo {
    pub release: String,
    pub version: (u32, u32),
    pub btf: bool,
    pub tcx: bool,
}

impl KernelInfo {
    pub fn probe() -> KernelInfo {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let version = parse_release(&release);
        KernelInfo {
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            tcx: version >= (6, 6),
            version,
            release,
        }
    }
}

fn parse_release(r: &str) -> (u32, u32) {
    let mut it = r.split(|c: char| !c.is_ascii_digit());
    let major = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// What must hold before anything is loaded, each with an error that names the cause.
pub fn preflight() -> Result<KernelInfo> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DataplaneError::NotRoot);
    }
    let k = KernelInfo::probe();
    if k.version < (5, 17) {
        return Err(DataplaneError::KernelTooOld(k.release));
    }
    if !k.btf {
        return Err(DataplaneError::NoBtf);
    }
    Ok(k)
}

/// Can TC programs call bpf_get_current_pid_tgid and bpf_get_current_comm here? (Newer
/// kernels allow it; where they do not, flows carry no pid and the agent says so.)
pub fn task_helpers_in_tc() -> bool {
    use libbpf_rs::libbpf_sys as sys;
    let probe = |helper| {
        // SAFETY: a read-only feature probe; NULL opts are allowed.
        unsafe {
            sys::libbpf_probe_bpf_helper(sys::BPF_PROG_TYPE_SCHED_CLS, helper, std::ptr::null())
                == 1
        }
    };
    probe(sys::BPF_FUNC_get_current_pid_tgid)
        && probe(sys::BPF_FUNC_get_current_comm)
        && probe(sys::BPF_FUNC_get_current_cgroup_id)
}

/// Whether a program of type `prog_type` may call every helper in `helpers` here.
fn helpers_in(prog_type: libbpf_rs::libbpf_sys::bpf_prog_type, helpers: &[u32]) -> bool {
    helpers.iter().all(|&helper| {
        // SAFETY: a read-only feature probe; NULL opts are allowed.
        unsafe {
            libbpf_rs::libbpf_sys::libbpf_probe_bpf_helper(prog_type, helper, std::ptr::null()) == 1
        }
    })
}

/// Can the cgroup socket hooks that record socket owners (bpf/sockowner.h) load here? They
/// name the process of a flow where TC programs cannot ask the current task (kernels before
/// 6.10, packets sent from timers). Where they cannot, they are left out and flows of such
/// kernels carry no pid.
pub fn sock_owner_hooks() -> bool {
    use libbpf_rs::libbpf_sys as sys;
    let needs = [
        sys::BPF_FUNC_get_socket_cookie,
        sys::BPF_FUNC_get_current_pid_tgid,
        sys::BPF_FUNC_get_current_comm,
        sys::BPF_FUNC_get_current_cgroup_id,
    ];
    helpers_in(sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, &needs)
        && helpers_in(sys::BPF_PROG_TYPE_CGROUP_SOCK, &needs)
}

/// Can a flow event name its process on this kernel, one way or the other?
pub fn process_attribution() -> bool {
    task_helpers_in_tc() || sock_owner_hooks()
}

enum Attachment {
    /// A TCX link: detached when the link is dropped (or the process dies).
    Tcx(#[allow(dead_code)] Link),
    /// A clsact filter: netlink state that outlives the process, so it is detached on drop.
    /// `true` when this instance created the clsact qdisc (removed again after the filters).
    Clsact(TcHook, bool),
}

pub struct Dataplane {
    skel: RingfenceSkel<'static>,
    kind: AttachKind,
    /// Where each program was attached, for the guard process and the attachment check
    /// (one entry per entry of `attached`).
    watched: Vec<Watched>,
    /// The process watch's tracepoint links (bpf/guard.h); empty when not attached.
    process_watch: Vec<Link>,
    /// (interface name, ifindex, attachment), two per interface (egress and ingress).
    attached: Vec<(String, u32, Attachment)>,
    /// Each job's cgroup links, by owner (the job's slot, or "exec"): the backstop (see
    /// rf_backstop in bpf/ringfence.bpf.c) and the socket hooks, by program name.
    job_links: Vec<(String, String, Link)>,
    /// The socket-owner hooks (bpf/sockowner.h) are loaded, to attach with the backstop.
    owner_hooks: bool,
    kernel: KernelInfo,
    /// Where maps and links are pinned (the daemon), if anywhere.
    pins: Option<crate::kernel::pins::Pins>,
    /// The maps were reused from an earlier daemon's pins.
    adopted: bool,
    /// clsact filters an earlier daemon left, by (ifindex, egress): replaced in place.
    adopt_filters: std::collections::HashMap<(i32, bool), (u32, u32)>,
    /// New veths not attached yet: their peer was still here (see follow_links).
    deferred: std::collections::BTreeMap<u32, u16>,
    /// The XDP pre-judge (bpf/xdp.h) on the host side of each interface job's link, by
    /// ifindex: its link's fd. An accelerator, never the enforcement (TC judges all it
    /// passes), so it is not pinned: it goes with the process, and TC's programs stay.
    xdp: std::collections::BTreeMap<u32, std::os::fd::OwnedFd>,
    /// Whether interface jobs get the XDP pre-judge ([`set_xdp_prejudge`]). Off by default:
    /// measured on veth and tap (`rfbench xdp`, bench/README.md), it costs more than the TC
    /// program alone, dropping and passing.
    ///
    /// [`set_xdp_prejudge`]: Dataplane::set_xdp_prejudge
    xdp_prejudge: bool,
}

/// How [`Dataplane::attach_xdp`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// In the driver (veth, tun/tap, most NICs): before the stack builds its skb.
    Native,
    /// Not attached, and why: TC judges the device's packets alone, as without XDP.
    Skipped(&'static str),
}

/// One clsact filter ringfence added: enough to find it again (and to tell it from a filter
/// someone else put in its place) without the process that added it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub ifindex: i32,
    pub egress: bool,
    pub handle: u32,
    pub priority: u32,
    pub prog_id: u32,
}

impl TcFilter {
    /// `IFINDEX:egress|ingress:HANDLE:PRIORITY:PROG_ID`, as the guard process takes it.
    pub fn to_arg(&self) -> String {
        let dir = if self.egress { "egress" } else { "ingress" };
        format!(
            "{}:{dir}:{}:{}:{}",
            self.ifindex, self.handle, self.priority, self.prog_id
        )
    }

    pub fn parse_arg(s: &str) -> std::result::Result<TcFilter, String> {
        let bad = || format!("{s:?} is not IFINDEX:egress|ingress:HANDLE:PRIORITY:PROG_ID");
        let p: Vec<&str> = s.split(':').collect();
        let [ifindex, dir, handle, priority, prog_id] = p[..] else {
            return Err(bad());
        };
        Ok(TcFilter {
            ifindex: ifindex.parse().map_err(|_| bad())?,
            egress: match dir {
                "egress" => true,
                "ingress" => false,
                _ => return Err(bad()),
            },
            handle: handle.parse().map_err(|_| bad())?,
            priority: priority.parse().map_err(|_| bad())?,
            prog_id: prog_id.parse().map_err(|_| bad())?,
        })
    }

    fn hook(&self) -> libbpf_rs::libbpf_sys::bpf_tc_hook {
        libbpf_rs::libbpf_sys::bpf_tc_hook {
            sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_tc_hook>() as _,
            ifindex: self.ifindex,
            attach_point: if self.egress {
                libbpf_rs::libbpf_sys::BPF_TC_EGRESS
            } else {
                libbpf_rs::libbpf_sys::BPF_TC_INGRESS
            },
            ..Default::default()
        }
    }

    /// The program id the filter runs now (ENOENT when it is gone).
    pub fn query(&self) -> std::io::Result<u32> {
        let hook = self.hook();
        let mut opts = libbpf_rs::libbpf_sys::bpf_tc_opts {
            sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_tc_opts>() as _,
            handle: self.handle,
            priority: self.priority,
            ..Default::default()
        };
        // SAFETY: both structs are initialised with their sizes; libbpf writes opts only.
        let err = unsafe { libbpf_rs::libbpf_sys::bpf_tc_query(&hook, &mut opts) };
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(-err));
        }
        Ok(opts.prog_id)
    }

    /// Removes the filter if it still runs ringfence's program (a filter someone else put
    /// at the same handle and priority is left alone).
    pub fn remove_if_ours(&self) -> std::io::Result<()> {
        match self.query() {
            Ok(id) if id == self.prog_id => {}
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        let hook = self.hook();
        let opts = libbpf_rs::libbpf_sys::bpf_tc_opts {
            sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_tc_opts>() as _,
            handle: self.handle,
            priority: self.priority,
            ..Default::default()
        };
        // SAFETY: as in query; detach reads both.
        let err = unsafe { libbpf_rs::libbpf_sys::bpf_tc_detach(&hook, &opts) };
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(-err));
        }
        Ok(())
    }
}

/// Removes the clsact qdisc of `ifindex` with every filter on it (one ringfence created).
pub fn remove_clsact(ifindex: i32) -> std::io::Result<()> {
    let mut hook = libbpf_rs::libbpf_sys::bpf_tc_hook {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_tc_hook>() as _,
        ifindex,
        attach_point: libbpf_rs::libbpf_sys::BPF_TC_EGRESS | libbpf_rs::libbpf_sys::BPF_TC_INGRESS,
        ..Default::default()
    };
    // SAFETY: an initialised hook; libbpf only reads it.
    let err = unsafe { libbpf_rs::libbpf_sys::bpf_tc_hook_destroy(&mut hook) };
    match err {
        0 => Ok(()),
        e if -e == libc::ENOENT || -e == libc::EINVAL || -e == libc::ENODEV => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(-e)),
    }
}

/// Where one program was attached.
#[derive(Clone, Debug)]
struct Watched {
    ifname: String,
    ifindex: i32,
    egress: bool,
    prog_id: u32,
    /// TCX: the link's fd (owned by `attached`), and the programs that ran ahead of ours
    /// when it was attached (anything new there runs first and can pass packets unjudged).
    link_fd: Option<std::os::fd::RawFd>,
    ahead: Vec<u32>,
    /// clsact: the filter, and whether ringfence created the qdisc it sits on.
    tc: Option<(TcFilter, bool)>,
}

/// What the guard process needs to keep the dataplane up, and to clean up after ringfence
/// (see src/job/guard.rs).
#[derive(Clone, Debug, Default)]
pub struct Held {
    /// TCX links: while any duplicate of a link's fd is open, the program stays attached.
    pub link_fds: Vec<std::os::fd::RawFd>,
    /// clsact filters: netlink state that outlives every process, removed by whoever is last.
    pub filters: Vec<TcFilter>,
    /// Interfaces whose clsact qdisc ringfence created.
    pub qdiscs: Vec<i32>,
    /// Cgroups that end with the job: its containers' (job::containers).
    pub cgroups: Vec<std::path::PathBuf>,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.link_fds.is_empty()
            && self.filters.is_empty()
            && self.qdiscs.is_empty()
            && self.cgroups.is_empty()
    }

    fn add(&mut self, more: Held) {
        self.link_fds.extend(more.link_fds);
        self.filters.extend(more.filters);
        for q in more.qdiscs {
            if !self.qdiscs.contains(&q) {
                self.qdiscs.push(q);
            }
        }
        self.cgroups.extend(more.cgroups);
    }
}

/// A program that is no longer where ringfence attached it, or that something now runs
/// ahead of.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AttachmentProblem {
    pub ifname: String,
    /// "egress" or "ingress".
    pub dir: &'static str,
    pub what: String,
}

/// The tracefs `events` directory. libbpf looks only under /sys/kernel/tracing and
/// /sys/kernel/debug/tracing, which are often not mounted (and `ip netns exec` hides /sys
/// behind a fresh sysfs): when neither is there, tracefs is mounted privately under /run,
/// as cgroup2 is.
fn tracefs_events() -> std::result::Result<std::path::PathBuf, String> {
    for p in [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ] {
        if Path::new(p).join("syscalls").is_dir() {
            return Ok(p.into());
        }
    }
    const PRIVATE: &str = "/run/ringfence/tracefs";
    let events = Path::new(PRIVATE).join("events");
    if events.join("syscalls").is_dir() {
        return Ok(events);
    }
    std::fs::create_dir_all(PRIVATE).map_err(|e| format!("creating {PRIVATE}: {e}"))?;
    nix::mount::mount(
        Some("tracefs"),
        PRIVATE,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("no tracefs is mounted and mounting one at {PRIVATE} failed: {e}"))?;
    if events.join("syscalls").is_dir() {
        Ok(events)
    } else {
        Err("this kernel has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS)".into())
    }
}

/// A perf event for tracepoint `id`, to attach a program to (as libbpf does: every CPU
/// runs the program; the event itself only names the tracepoint).
fn tracepoint_perf_event(id: u64) -> std::io::Result<i32> {
    use libbpf_rs::libbpf_sys as sys;
    // SAFETY: an all-zero perf_event_attr is valid; the fields set below are plain data.
    let mut attr: sys::perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = sys::PERF_TYPE_TRACEPOINT;
    attr.size = std::mem::size_of::<sys::perf_event_attr>() as u32;
    attr.config = id;
    // SAFETY: attr outlives the call; the returned fd is the caller's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const sys::perf_event_attr,
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            // PERF_FLAG_FD_CLOEXEC (include/uapi/linux/perf_event.h).
            8 as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd as i32)
}

/// The programs attached at `ifindex`'s TCX hook, in the order they run.
fn tcx_programs(ifindex: i32, egress: bool) -> std::io::Result<Vec<u32>> {
    Ok(tcx_query(ifindex, egress)?
        .into_iter()
        .map(|(p, _)| p)
        .collect())
}

/// (program id, link id) of every TCX program at `ifindex` in one direction, in the order
/// they run; empty when the query fails. For tests and status: bpftool before 7.3 does
/// not list TCX.
pub fn tcx_links_of(ifindex: i32, egress: bool) -> Vec<(u32, u32)> {
    tcx_query(ifindex, egress).unwrap_or_default()
}

fn tcx_query(ifindex: i32, egress: bool) -> std::io::Result<Vec<(u32, u32)>> {
    use libbpf_rs::libbpf_sys as sys;
    let mut ids = [0u32; 64];
    let mut links = [0u32; 64];
    let mut opts = sys::bpf_prog_query_opts {
        sz: std::mem::size_of::<sys::bpf_prog_query_opts>() as _,
        prog_ids: ids.as_mut_ptr(),
        link_ids: links.as_mut_ptr(),
        ..Default::default()
    };
    opts.__bindgen_anon_1.count = ids.len() as u32;
    let at = if egress {
        sys::BPF_TCX_EGRESS
    } else {
        sys::BPF_TCX_INGRESS
    };
    // SAFETY: prog_ids and link_ids point at `count` u32s each that outlive the call.
    let err = unsafe { sys::bpf_prog_query_opts(ifindex, at, &mut opts) };
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(-err));
    }
    // SAFETY: the kernel wrote how many ids it filled in.
    let n = unsafe { opts.__bindgen_anon_1.count } as usize;
    let n = n.min(ids.len());
    Ok(ids[..n]
        .iter()
        .copied()
        .zip(links[..n].iter().copied())
        .collect())
}

/// A host entry of the allow trie as userspace reads it.
#[derive(Clone, Debug)]
pub struct AddrEntry {
    pub job_id: u32,
    pub addr: IpAddr,
    pub prefix_bits: u32,
    pub val: abi::rf_addr_val,
}

fn map_err(map: &'static str) -> impl FnOnce(libbpf_rs::Error) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// The `allow` key of network `net` in job `job_id`'s share of the trie.
fn net_key(job_id: u32, net: IpNet) -> abi::rf_lpm_key {
    let addr = net.network();
    abi::rf_lpm_key {
        prefixlen: abi::lpm_prefixlen(addr, net.prefix_len()),
        job_id,
        addr: abi::addr_to_bytes(addr),
    }
}

fn ports_to_abi(p: &PortSet) -> abi::rf_ports {
    let mut out = abi::rf_ports::default();
    match p {
        PortSet::None => {}
        PortSet::Any => out.any = 1,
        PortSet::Ports(set) => {
            for (i, port) in set.iter().take(abi::MAX_PORTS).enumerate() {
                out.port[i] = *port;
                out.n = (i + 1) as u8;
            }
        }
    }
    out
}

/// The trie key of one address of one job (a host entry, not a prefix).
fn host_key(job_id: u32, addr: IpAddr) -> abi::rf_lpm_key {
    abi::rf_lpm_key {
        prefixlen: abi::LPM_FULL,
        job_id,
        addr: abi::addr_to_bytes(addr),
    }
}

/// A daemon reusing pinned maps must want them the size they are: libbpf would refuse them
/// with a bare "Invalid argument" otherwise. Checked before anything is loaded.
fn check_pinned_sizes(
    pins: &crate::kernel::pins::Pins,
    sizes: &[(&'static str, u32)],
) -> Result<()> {
    for &(name, want) in sizes {
        let path = pins.map(name);
        let Ok(h) = MapHandle::from_pinned_path(&path) else {
            continue;
        };
        let pinned = h.max_entries();
        if pinned != want {
            return Err(DataplaneError::PinnedSize {
                base: pins.base().display().to_string(),
                map: name,
                pinned,
                want,
            });
        }
    }
    Ok(())
}

/// a |= b, the kernel's rule: `any` absorbs, ports that do not fit are left out.
fn merge_ports(a: &mut abi::rf_ports, b: &abi::rf_ports) {
    if b.any != 0 {
        a.any = 1;
        return;
    }
    for &p in &b.port[..usize::from(b.n).min(abi::MAX_PORTS)] {
        let n = usize::from(a.n).min(abi::MAX_PORTS);
        if a.port[..n].contains(&p) || n == abi::MAX_PORTS {
            continue;
        }
        a.port[n] = p;
        a.n += 1;
    }
}

impl Dataplane {
    /// Opens and loads the embedded object. Nothing is attached yet.
    pub fn load(opts: &Options) -> Result<Dataplane> {
        let kernel = preflight()?;
        crate::logging::route_libbpf_logs();
        let mut adopted = false;
        if let Some(pins) = &opts.pins {
            pins.prepare()?;
            adopted = pins.check(abi::ABI_VERSION)? == crate::kernel::pins::Found::Adoptable;
        }
        let kind = match opts.attach {
            AttachMode::Tcx => AttachKind::Tcx,
            AttachMode::Clsact => AttachKind::Clsact,
            AttachMode::Auto if kernel.tcx => AttachKind::Tcx,
            AttachMode::Auto => AttachKind::Clsact,
        };
        // The skeleton borrows its object storage for its whole life; the dataplane lives as
        // long as the process, so the (pointer-sized) storage is leaked on purpose.
        let storage: &'static mut MaybeUninit<libbpf_rs::OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let owner_hooks = sock_owner_hooks();
        let mut open = RingfenceSkelBuilder::default()
            .open(storage)
            .map_err(DataplaneError::Load)?;
        {
            let ro = open
                .maps
                .rodata_data
                .as_deref_mut()
                .expect("rodata is mmapped by the skeleton");
            // Every setting, here and only here (struct rf_config): a field added in C
            // fails to build until it is set.
            ro.config = abi::rf_config {
                dns_min_ttl_ns: opts.dns_min_ttl.as_nanos() as u64,
                dns_grace_ns: opts.dns_grace.as_nanos() as u64,
                emit_events: u8::from(opts.emit_events),
                always_judge: u8::from(opts.always_judge),
                have_task_helpers: u8::from(task_helpers_in_tc()),
                have_sock_owner: u8::from(owner_hooks),
                // The multicast-join check names its caller when setsockopt hooks may ask.
                have_sockopt_task: u8::from(helpers_in(
                    libbpf_rs::libbpf_sys::BPF_PROG_TYPE_CGROUP_SOCKOPT,
                    &[
                        libbpf_rs::libbpf_sys::BPF_FUNC_get_current_pid_tgid,
                        libbpf_rs::libbpf_sys::BPF_FUNC_get_current_comm,
                    ],
                )),
                _pad: [0; 3],
            };
        }
        // Hooks this kernel would refuse are not loaded (the rest of the object still is).
        if !owner_hooks {
            for p in [
                &mut open.progs.rf_own_create,
                &mut open.progs.rf_own_connect4,
                &mut open.progs.rf_own_connect6,
                &mut open.progs.rf_own_sendmsg4,
                &mut open.progs.rf_own_sendmsg6,
            ] {
                p.set_autoload(false);
            }
        }
        let cap = &opts.capacity;
        let sizes = [
            ("allow", cap.allow_entries()),
            ("allow_cidrs", cap.allow_entries()),
            ("names", cap.names),
            ("inbound", cap.inbound),
            ("flows", cap.flows),
            ("jobs", cap.job_map_entries()),
            ("ifjobs", cap.job_map_entries()),
        ];
        if let (Some(pins), true) = (&opts.pins, adopted) {
            check_pinned_sizes(pins, &sizes)?;
        }
        let maps = &mut open.maps;
        for (m, (name, entries)) in [
            &mut maps.allow,
            &mut maps.allow_cidrs,
            &mut maps.names,
            &mut maps.inbound,
            &mut maps.flows,
            &mut maps.jobs,
            &mut maps.ifjobs,
        ]
        .into_iter()
        .zip(sizes)
        {
            m.set_max_entries(entries).map_err(map_err(name))?;
        }
        if kind == AttachKind::Tcx {
            open.progs
                .rf_egress
                .set_attach_type(ProgramAttachType::TcxEgress);
            open.progs
                .rf_ingress
                .set_attach_type(ProgramAttachType::TcxIngress);
            open.progs
                .rf_empty
                .set_attach_type(ProgramAttachType::TcxEgress);
        }
        if let Some(pins) = &opts.pins {
            // libbpf reuses a map already pinned at its path (checking type, sizes and
            // flags) and pins the ones it creates. The internal maps (.rodata, .bss) are the
            // programs' own: every load gets fresh ones, set from the daemon's state.
            for mut m in open.open_object_mut().maps_mut() {
                let name = m.name().to_string_lossy().into_owned();
                // sk_flows (verdicts kept with sockets) is valid only with this load's
                // `verdict_gen`: a new load starts it empty.
                if name.contains('.') || name == "sk_flows" {
                    continue;
                }
                m.set_pin_path(pins.map(&name))
                    .map_err(map_err("pin path"))?;
            }
        }
        let skel = open.load().map_err(|e| match &opts.pins {
            Some(p) if adopted => DataplaneError::Reuse {
                base: p.base().display().to_string(),
                source: e,
            },
            _ => DataplaneError::Load(e),
        })?;
        if let (Some(pins), false) = (&opts.pins, adopted) {
            pins.write_abi(abi::ABI_VERSION)?;
        }
        let mut dp = Dataplane {
            skel,
            kind,
            attached: Vec::new(),
            watched: Vec::new(),
            process_watch: Vec::new(),
            job_links: Vec::new(),
            owner_hooks,
            kernel,
            pins: opts.pins.clone(),
            adopted,
            adopt_filters: Default::default(),
            deferred: Default::default(),
            xdp: Default::default(),
            xdp_prejudge: false,
        };
        // A generation no earlier load used, so nothing kept before can match (the kept
        // verdicts' map is never pinned; this is belt and braces).
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
            .unwrap_or(1);
        dp.bss().verdict_gen = seed;
        Ok(dp)
    }

    /// The programs' global variables (`job_levels`, `have_ifjobs`), mmapped.
    fn bss(&mut self) -> &mut crate::kernel::skel::types::bss {
        self.skel
            .maps
            .bss_data
            .as_deref_mut()
            .expect("bss is mmapped by the skeleton")
    }

    /// Every verdict kept with a socket (the established fast path: `sk_flows` in
    /// bpf/maps.h) stops holding: called after any change to which job a socket belongs
    /// to, what a device is, or what a job's policy says. Always *after* the change: a
    /// packet that read the old generation is kept under it and no longer matches; one that
    /// read the new one saw the change.
    fn invalidate_kept(&mut self) {
        let bss = self.bss();
        bss.verdict_gen = bss.verdict_gen.wrapping_add(1);
    }

    /// Every program of the loaded object, loaded or not (a hook this kernel lacks is left
    /// out of the load: `autoload()` is false and it has no fd). For bench/verifier.json.
    pub fn programs(&self) -> impl Iterator<Item = libbpf_rs::Program<'_>> {
        use libbpf_rs::skel::Skel;
        self.skel.object().progs()
    }

    pub fn attach_kind(&self) -> AttachKind {
        self.kind
    }

    /// Whether the maps were reused from an earlier daemon's pins (its jobs, learned
    /// addresses, flows and unread events are all still there).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// clsact filters an earlier daemon attached: attaching to their interface replaces
    /// their program in place (same handle and priority) instead of adding a second filter.
    pub fn adopt_filters(&mut self, filters: &[TcFilter]) {
        for f in filters {
            self.adopt_filters
                .insert((f.ifindex, f.egress), (f.handle, f.priority));
        }
    }

    pub fn kernel(&self) -> &KernelInfo {
        &self.kernel
    }

    /// Attaches the egress verdict program and the ingress DNS program to `ifname`, and
    /// records its link header (see `devices` in bpf/maps.h).
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|_| DataplaneError::NoInterface(ifname.to_string()))?;
        let arphrd =
            crate::kernel::netif::link_type(ifname).map_err(|source| DataplaneError::Attach {
                ifname: ifname.to_string(),
                dir: "link type",
                kind: "SIOCGIFHWADDR",
                source,
            })?;
        self.attach_index(ifname, ifindex, arphrd)
    }

    /// As [`attach`](Self::attach), for an interface known by index and link type (one
    /// that rtnetlink just announced).
    pub fn attach_index(&mut self, ifname: &str, ifindex: u32, arphrd: u16) -> Result<()> {
        if self.is_attached(ifindex) {
            return Ok(());
        }
        let l2 = crate::kernel::netif::link_header_len(arphrd);
        // Recorded before attaching, so the first packet the program sees parses right.
        self.set_device(ifindex, l2)?;
        // And which way it faces, so that its first answer to a container is not judged as
        // forwarded outbound traffic.
        let inside = crate::kernel::netif::faces_containers(ifname);
        self.set_inside(ifindex, inside)?;
        let egress = self.attach_one(ifname, ifindex as i32, true)?;
        self.watched
            .push(self.watched_of(ifname, ifindex as i32, true, &egress));
        self.attached.push((ifname.to_string(), ifindex, egress));
        let ingress = self.attach_one(ifname, ifindex as i32, false)?;
        self.watched
            .push(self.watched_of(ifname, ifindex as i32, false, &ingress));
        self.attached.push((ifname.to_string(), ifindex, ingress));
        tracing::info!(
            ifname,
            ifindex,
            arphrd,
            l2,
            attach = self.kind.name(),
            "attached"
        );
        Ok(())
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attached.iter().any(|(_, i, _)| *i == ifindex)
    }

    /// Marks `ifindex` as watched with link header length `l2` (enum rf_link). Only a
    /// device that is not Ethernet makes the verdict program look its interface up.
    pub fn set_device(&mut self, ifindex: u32, l2: u32) -> Result<()> {
        self.skel
            .maps
            .devices
            .update(&ifindex.to_ne_bytes(), &l2.to_ne_bytes(), MapFlags::ANY)
            .map_err(map_err("devices"))?;
        if l2 != crate::kernel::skel::types::rf_link::RF_L2_ETHER.0 {
            self.bss().have_l3_devs = 1;
        }
        self.invalidate_kept();
        Ok(())
    }

    /// Records whether `ifindex` faces containers or namespaces (`inside_devs` in
    /// bpf/maps.h): forwarded packets leaving through it are going to them, not judged.
    pub fn set_inside(&mut self, ifindex: u32, inside: bool) -> Result<()> {
        let key = ifindex.to_ne_bytes();
        let r = if inside {
            self.skel
                .maps
                .inside_devs
                .update(&key, &[1u8], MapFlags::ANY)
                .map_err(map_err("inside_devs"))
        } else {
            match self.skel.maps.inside_devs.delete(&key) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(map_err("inside_devs")(e)),
            }
        };
        self.invalidate_kept();
        r
    }

    /// Whether `ifindex` is recorded as facing containers.
    pub fn is_inside(&self, ifindex: u32) -> bool {
        matches!(
            self.skel
                .maps
                .inside_devs
                .lookup(&ifindex.to_ne_bytes(), MapFlags::ANY),
            Ok(Some(_))
        )
    }

    /// The job forwarded traffic is judged under where no job judged it on its way in
    /// (`forwarded_job` in bpf/ringfence.bpf.c): packets from containers and namespaces
    /// behind NAT that leave through an uplink with no socket. `None`: they pass unjudged.
    pub fn set_forward_job(&mut self, job: Option<abi::rf_job>) -> Result<()> {
        match job {
            Some(j) => {
                self.skel
                    .maps
                    .fwd_job
                    .update(&0u32.to_ne_bytes(), bytes_of(&j), MapFlags::ANY)
                    .map_err(map_err("fwd_job"))?;
                self.bss().have_fwd_job = 1;
            }
            None => self.bss().have_fwd_job = 0,
        }
        self.invalidate_kept();
        Ok(())
    }

    /// exec: sockets of cgroups made after `cgroup_id` (the job's own; ids only grow) that
    /// no job claims yet are judged under the forwarded-traffic job (a container started on
    /// the host's network, before its cgroup is claimed). 0 turns it off.
    pub fn set_fwd_after_cgroup(&mut self, cgroup_id: u64) {
        self.bss().fwd_after_cgroup = cgroup_id;
        self.invalidate_kept();
    }

    /// An interface went away: its TCX links went with it; forget it.
    pub fn forget_interface(&mut self, ifindex: u32) {
        let _ = self.skel.maps.devices.delete(&ifindex.to_ne_bytes());
        let _ = self.skel.maps.inside_devs.delete(&ifindex.to_ne_bytes());
        self.invalidate_kept();
        // Not a detach to report: the device itself is gone.
        self.watched.retain(|w| w.ifindex as u32 != ifindex);
        let (gone, kept): (Vec<_>, Vec<_>) =
            self.attached.drain(..).partition(|(_, i, _)| *i == ifindex);
        self.attached = kept;
        for (ifname, _, a) in gone {
            // A clsact filter died with its device: nothing to detach.
            if let Attachment::Clsact(..) = a {
                std::mem::forget(a);
            }
            tracing::info!(ifname, ifindex, "interface gone");
        }
    }

    /// Attaches to interfaces that appeared since the last look (until then the cgroup
    /// backstop holds the job's packets through them) and forgets those that went away.
    /// Returns what was attached, for the guard to hold (`Guard::hold`).
    pub fn follow_links(&mut self, links: &crate::kernel::netif::LinkWatcher) -> Held {
        use crate::kernel::netif::LinkChange;
        let mut held = Held::default();
        let changes = match links.read() {
            Ok(c) => c,
            Err(e) => {
                // Events were lost (the socket's buffer overran): look at every interface.
                tracing::warn!("reading rtnetlink: {e}; rescanning the interfaces");
                for name in crate::kernel::netif::all_interfaces() {
                    let mark = self.attachment_count();
                    if let Err(e) = self.attach(&name) {
                        tracing::warn!("{e}");
                    }
                    held.add(self.held_since(mark));
                }
                return held;
            }
        };
        for c in changes {
            match c {
                LinkChange::New {
                    ifindex,
                    arphrd,
                    peer_elsewhere,
                } => {
                    // lo (1) stays on the host; the backstop lets it be.
                    if ifindex == 1 || self.is_attached(ifindex) {
                        continue;
                    }
                    let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
                        continue; // gone again already
                    };
                    let name = name.to_string_lossy().into_owned();
                    // A new veth pair has both ends here at first, and a container engine
                    // moves one into the container at once: programs attached to that end
                    // would go with it, and their link job with them. It is attached once
                    // its peer is elsewhere; until then what crosses it is forwarded
                    // traffic, judged at the uplink.
                    if !peer_elsewhere
                        && crate::kernel::netif::driver(&name).is_ok_and(|d| d == "veth")
                    {
                        self.deferred.insert(ifindex, arphrd);
                        continue;
                    }
                    self.deferred.remove(&ifindex);
                    let mark = self.attachment_count();
                    if let Err(e) = self.attach_index(&name, ifindex, arphrd) {
                        tracing::warn!("{e}: only the backstop sees the job's traffic through it (dropped in block mode)");
                    }
                    held.add(self.held_since(mark));
                }
                LinkChange::Gone { ifindex } => {
                    self.deferred.remove(&ifindex);
                    self.forget_interface(ifindex)
                }
            }
        }
        // Veths whose peer has moved since, without an event for this end.
        for (ifindex, arphrd) in std::mem::take(&mut self.deferred) {
            match crate::kernel::netif::peer_elsewhere(ifindex) {
                Ok(true) => {
                    let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
                        continue;
                    };
                    let name = name.to_string_lossy().into_owned();
                    let mark = self.attachment_count();
                    if let Err(e) = self.attach_index(&name, ifindex, arphrd) {
                        tracing::warn!("{e}: only the backstop sees the job's traffic through it (dropped in block mode)");
                    }
                    held.add(self.held_since(mark));
                }
                Ok(false) => {
                    self.deferred.insert(ifindex, arphrd);
                }
                Err(_) => {} // gone
            }
        }
        held
    }

    /// Attaches the backstop to the job's cgroup: the job's packets leaving through an
    /// interface the TC programs are not attached to are unparsed (dropped in block mode),
    /// and new flows to blocked destinations are dropped before neighbour resolution (ARP and
    /// neighbour discovery would put the address on the link). With it, the multicast-join
    /// check (rf_sockopt): the kernel's IGMP/MLD reports carry the group the job chose. And
    /// the socket-owner hooks (bpf/sockowner.h), which only record who owns each socket, so
    /// that flows name their process where TC cannot ask (they always allow).
    pub fn attach_backstop(&mut self, cgroup: &Path) -> Result<()> {
        self.attach_job_hooks("exec", cgroup)
    }

    /// The cgroup programs every job carries: (program, name, hook, program type).
    fn job_progs(
        &self,
    ) -> Vec<(
        &libbpf_rs::ProgramMut<'static>,
        &'static str,
        &'static str,
        &'static str,
    )> {
        let mut progs = vec![
            (
                &self.skel.progs.rf_backstop,
                "rf_backstop",
                "cgroup egress",
                "cgroup_skb",
            ),
            (
                &self.skel.progs.rf_sockopt,
                "rf_sockopt",
                "cgroup setsockopt",
                "cgroup_sockopt",
            ),
        ];
        // The socket-owner hooks, where this kernel loads them (Dataplane::load).
        if self.owner_hooks {
            progs.extend([
                (
                    &self.skel.progs.rf_own_create,
                    "rf_own_create",
                    "cgroup sock_create",
                    "cgroup_sock",
                ),
                (
                    &self.skel.progs.rf_own_connect4,
                    "rf_own_connect4",
                    "cgroup connect4",
                    "cgroup_sock_addr",
                ),
                (
                    &self.skel.progs.rf_own_connect6,
                    "rf_own_connect6",
                    "cgroup connect6",
                    "cgroup_sock_addr",
                ),
                (
                    &self.skel.progs.rf_own_sendmsg4,
                    "rf_own_sendmsg4",
                    "cgroup sendmsg4",
                    "cgroup_sock_addr",
                ),
                (
                    &self.skel.progs.rf_own_sendmsg6,
                    "rf_own_sendmsg6",
                    "cgroup sendmsg6",
                    "cgroup_sock_addr",
                ),
            ]);
        }
        progs
    }

    /// Attaches the job's cgroup programs (see [`Self::attach_backstop`]) for `owner` (a
    /// daemon job's slot, or "exec"). Pinned, a link an earlier daemon left for the same
    /// owner is taken over and its program replaced in place, so there is no gap.
    pub fn attach_job_hooks(&mut self, owner: &str, cgroup: &Path) -> Result<()> {
        let dir = std::fs::File::open(cgroup).map_err(|source| DataplaneError::Attach {
            ifname: cgroup.display().to_string(),
            dir: "cgroup egress",
            kind: "cgroup_skb",
            source,
        })?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
        let cgroup_id = std::os::unix::fs::MetadataExt::ino(&dir.metadata().map_err(|source| {
            DataplaneError::Attach {
                ifname: cgroup.display().to_string(),
                dir: "cgroup egress",
                kind: "cgroup_skb",
                source,
            }
        })?);
        let mut links = Vec::new();
        for (prog, name, dir_name, kind) in self.job_progs() {
            let err = |e: libbpf_rs::Error| DataplaneError::Attach {
                ifname: cgroup.display().to_string(),
                dir: dir_name,
                kind,
                source: std::io::Error::other(e.to_string()),
            };
            let pin = self.pins.as_ref().map(|p| p.job_link(owner, name));
            // A pinned link is taken over only if it is still attached to this very cgroup:
            // one whose cgroup was removed (and perhaps made again under the same path while
            // no daemon ran) is severed, and updating it would leave the cgroup without
            // programs (see tests/redteam9.rs).
            let adopted = match &pin {
                Some(path) if path.exists() => match Link::open(path) {
                    Ok(mut l) if link_cgroup_id(&l) == Some(cgroup_id) => {
                        l.update_prog(prog).map_err(err)?;
                        Some(l)
                    }
                    Ok(mut l) => {
                        let _ = l.unpin();
                        None
                    }
                    Err(e) => {
                        tracing::warn!("opening {}: {e}", path.display());
                        let _ = std::fs::remove_file(path);
                        None
                    }
                },
                _ => None,
            };
            let link = match adopted {
                Some(l) => l,
                None => {
                    let mut l = prog.attach_cgroup(fd).map_err(err)?;
                    if let Some(path) = &pin {
                        l.pin(path).map_err(|source| DataplaneError::PinLink {
                            what: format!("{name} of job {owner}"),
                            path: path.display().to_string(),
                            source,
                        })?;
                    }
                    l
                }
            };
            links.push((owner.to_string(), name.to_string(), link));
        }
        self.job_links.extend(links);
        Ok(())
    }

    /// Detaches a job's cgroup programs and removes their pins.
    pub fn detach_job_hooks(&mut self, owner: &str) {
        let (gone, kept): (Vec<_>, Vec<_>) =
            self.job_links.drain(..).partition(|(o, _, _)| o == owner);
        self.job_links = kept;
        for (_, name, mut link) in gone {
            if link.pin_path().is_some() {
                if let Err(e) = link.unpin() {
                    tracing::warn!("unpinning {name} of job {owner}: {e}");
                }
            }
            if let Err(e) = link.detach() {
                tracing::warn!("detaching {name} of job {owner}: {e}");
            }
        }
    }

    fn attach_one(&self, ifname: &str, ifindex: i32, egress: bool) -> Result<Attachment> {
        let prog = if egress {
            &self.skel.progs.rf_egress
        } else {
            &self.skel.progs.rf_ingress
        };
        let dir = if egress { "egress" } else { "ingress" };
        let err = |source: std::io::Error| DataplaneError::Attach {
            ifname: ifname.to_string(),
            dir,
            kind: self.kind.name(),
            source,
        };
        match self.kind {
            AttachKind::Tcx => {
                // Pinned: an earlier daemon's link on this device is taken over, its program
                // replaced in place (the device never runs without ringfence).
                let pin = self
                    .pins
                    .as_ref()
                    .map(|p| p.tcx_link(ifindex as u32, egress));
                if let Some(path) = pin.as_ref().filter(|p| p.exists()) {
                    match Link::open(path) {
                        Ok(mut l) if link_ifindex(&l) == Some(ifindex as u32) => {
                            l.update_prog(prog)
                                .map_err(|e| err(std::io::Error::other(e.to_string())))?;
                            return Ok(Attachment::Tcx(l));
                        }
                        // A link whose device went away (or an index reused): start over.
                        Ok(mut l) => {
                            let _ = l.unpin();
                        }
                        Err(e) => tracing::warn!("opening {}: {e}", path.display()),
                    }
                    let _ = std::fs::remove_file(path);
                }
                // libbpf-rs 0.27 does not wrap TCX attach; the link it returns is owned here.
                let raw = prog.as_libbpf_object().as_ptr();
                // SAFETY: raw is a loaded program of this skeleton; NULL opts are allowed.
                let link = unsafe {
                    libbpf_rs::libbpf_sys::bpf_program__attach_tcx(raw, ifindex, std::ptr::null())
                };
                let link =
                    NonNull::new(link).ok_or_else(|| err(std::io::Error::last_os_error()))?;
                // SAFETY: a fresh link from libbpf, owned by nobody else.
                let mut link = unsafe { Link::from_ptr(link) };
                if let Some(path) = &pin {
                    link.pin(path).map_err(|source| DataplaneError::PinLink {
                        what: format!("the {dir} link of {ifname}"),
                        path: path.display().to_string(),
                        source,
                    })?;
                }
                Ok(Attachment::Tcx(link))
            }
            AttachKind::Clsact => {
                let mut b = TcHookBuilder::new(prog.as_fd());
                // handle 0 and priority 0: the kernel picks free ones, so several ringfence
                // instances (and other tools) can share the device.
                match self.adopt_filters.get(&(ifindex, egress)) {
                    // An earlier daemon's filter: its program is replaced in place.
                    Some(&(handle, priority)) => {
                        b.ifindex(ifindex)
                            .replace(true)
                            .handle(handle)
                            .priority(priority);
                    }
                    None => {
                        b.ifindex(ifindex).replace(false).handle(0).priority(0);
                    }
                }
                let mut hook = b.hook(if egress { TC_EGRESS } else { TC_INGRESS });
                let created = match hook.create() {
                    Ok(_) => true,
                    // EEXIST: the clsact qdisc is already there (another tool's, or ours
                    // from the other direction), which is fine.
                    Err(e) if e.kind() == libbpf_rs::ErrorKind::AlreadyExists => false,
                    Err(e) => return Err(err(std::io::Error::other(e.to_string()))),
                };
                let attached = hook
                    .attach()
                    .map_err(|e| err(std::io::Error::other(e.to_string())))?;
                Ok(Attachment::Clsact(attached, created))
            }
        }
    }

    fn watched_of(&self, ifname: &str, ifindex: i32, egress: bool, a: &Attachment) -> Watched {
        let prog = if egress {
            &self.skel.progs.rf_egress
        } else {
            &self.skel.progs.rf_ingress
        };
        let prog_id = libbpf_rs::Program::id_from_fd(prog.as_fd()).unwrap_or(0);
        let mut w = Watched {
            ifname: ifname.to_string(),
            ifindex,
            egress,
            prog_id,
            link_fd: None,
            ahead: Vec::new(),
            tc: None,
        };
        match a {
            Attachment::Tcx(link) => {
                use std::os::fd::AsRawFd;
                w.link_fd = Some(link.as_fd().as_raw_fd());
                w.ahead = tcx_programs(ifindex, egress)
                    .unwrap_or_default()
                    .into_iter()
                    .take_while(|&id| id != prog_id)
                    .collect();
            }
            Attachment::Clsact(hook, created) => {
                let f = TcFilter {
                    ifindex,
                    egress,
                    handle: hook.get_handle(),
                    priority: hook.get_priority(),
                    prog_id,
                };
                w.tc = Some((f, *created));
            }
        }
        w
    }

    /// What a guard process must hold and know to keep enforcement up after ringfence dies,
    /// and to clean up once it has killed the job.
    pub fn held(&self) -> Held {
        let mut h = self.held_since(0);
        // The cgroup backstop too: it covers interfaces that appear after ringfence died.
        h.link_fds.extend(
            self.job_links
                .iter()
                .map(|(_, _, l)| std::os::fd::AsRawFd::as_raw_fd(&l.as_fd())),
        );
        h
    }

    /// How many programs are attached (a mark for [`Self::held_since`]).
    pub fn attachment_count(&self) -> usize {
        self.watched.len()
    }

    /// What was attached after `mark` (an earlier [`Self::attachment_count`]): hand it to the
    /// guard (`Guard::hold`) when attaching to an interface while the job runs.
    pub fn held_since(&self, mark: usize) -> Held {
        let mut h = Held::default();
        for w in self.watched.iter().skip(mark) {
            h.link_fds.extend(w.link_fd);
            if let Some((f, created)) = w.tc {
                h.filters.push(f);
                if created && !h.qdiscs.contains(&f.ifindex) {
                    h.qdiscs.push(f.ifindex);
                }
            }
        }
        h
    }

    /// Every program that is no longer attached where this instance attached it, or that a
    /// program attached since runs ahead of (TCX: it can pass packets before ringfence sees
    /// them). Only root can do either; a job that can is outside what ringfence holds, and
    /// this is how it shows.
    pub fn attachment_problems(&self) -> Vec<AttachmentProblem> {
        let mut out = Vec::new();
        for w in &self.watched {
            let dir = if w.egress { "egress" } else { "ingress" };
            let mut problem = |what: String| {
                out.push(AttachmentProblem {
                    ifname: w.ifname.clone(),
                    dir,
                    what,
                })
            };
            if let Some((f, _)) = w.tc {
                match f.query() {
                    Ok(id) if id == w.prog_id => {}
                    Ok(id) => problem(format!(
                        "the clsact filter runs program {id}, not ringfence's ({})",
                        w.prog_id
                    )),
                    Err(e) => problem(format!(
                        "ringfence's clsact filter (program {}) is gone: {e}",
                        w.prog_id
                    )),
                }
                continue;
            }
            match tcx_programs(w.ifindex, w.egress) {
                Ok(ids) => match ids.iter().position(|&id| id == w.prog_id) {
                    None => problem(format!(
                        "ringfence's program ({}) is no longer attached (tcx)",
                        w.prog_id
                    )),
                    Some(at) => {
                        let new: Vec<String> = ids[..at]
                            .iter()
                            .filter(|id| !w.ahead.contains(id))
                            .map(u32::to_string)
                            .collect();
                        if !new.is_empty() {
                            problem(format!(
                                "program {} was attached ahead of ringfence's ({}) and runs first (tcx)",
                                new.join(", "),
                                w.prog_id
                            ));
                        }
                    }
                },
                // The device went away (a container's veth deleted, or moved into the
                // container's namespace) before its link event was read: nothing to watch.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => problem(format!(
                    "querying the programs attached (tcx): {e}; ringfence's was {}",
                    w.prog_id
                )),
            }
        }
        out
    }

    /// Attaches the process watch (bpf/guard.h): job processes that ptrace, write the memory
    /// of or take descriptors from other processes. Returns what could not be attached; the
    /// dataplane does not depend on it.
    pub fn attach_process_watch(&mut self) -> Vec<String> {
        let events = match tracefs_events() {
            Ok(p) => p,
            Err(e) => return vec![e],
        };
        let progs = [
            ("sys_enter_ptrace", &self.skel.progs.rf_guard_ptrace),
            (
                "sys_enter_process_vm_writev",
                &self.skel.progs.rf_guard_vm_writev,
            ),
            (
                "sys_enter_pidfd_getfd",
                &self.skel.progs.rf_guard_pidfd_getfd,
            ),
        ];
        let mut failed = Vec::new();
        let mut links = Vec::new();
        for (tp, prog) in progs {
            let attach = || -> std::result::Result<Link, String> {
                let id_path = events.join("syscalls").join(tp).join("id");
                let id: u64 = std::fs::read_to_string(&id_path)
                    .map_err(|e| format!("{}: {e}", id_path.display()))?
                    .trim()
                    .parse()
                    .map_err(|e| format!("{}: {e}", id_path.display()))?;
                let pfd = tracepoint_perf_event(id).map_err(|e| format!("perf_event_open: {e}"))?;
                // The link owns the perf event fd from here on (libbpf closes it).
                prog.attach_perf_event(pfd).map_err(|e| {
                    // SAFETY: libbpf did not take the fd when attaching failed.
                    unsafe { libc::close(pfd) };
                    e.to_string()
                })
            };
            match attach() {
                Ok(l) => links.push(l),
                Err(e) => failed.push(format!("syscalls/{tp}: {e}")),
            }
        }
        self.process_watch.extend(links);
        failed
    }

    /// Detaches everything this instance attached (also done on drop).
    pub fn detach_all(&mut self) {
        self.xdp.clear();
        self.watched.clear();
        self.process_watch.clear();
        let owners: Vec<String> = self.job_links.iter().map(|(o, _, _)| o.clone()).collect();
        for o in owners {
            self.detach_job_hooks(&o);
        }
        for (ifname, _, a) in self.attached.drain(..) {
            match a {
                // Detached explicitly: dropping only closes this process's fd, and a guard
                // process may still hold a duplicate (src/job/guard.rs).
                Attachment::Tcx(mut link) => {
                    if link.pin_path().is_some() {
                        let _ = link.unpin();
                    }
                    if let Err(e) = link.detach() {
                        tracing::warn!(ifname, "detaching the tcx link: {e}");
                    }
                    drop(link)
                }
                Attachment::Clsact(mut hook, created) => {
                    if let Err(e) = hook.detach() {
                        tracing::warn!(ifname, "detaching clsact filter: {e}");
                    }
                    // A qdisc this instance created goes too, so nothing is left behind.
                    if created {
                        let mut all = hook;
                        all.attach_point(TC_EGRESS | TC_INGRESS);
                        if let Err(e) = all.destroy() {
                            tracing::warn!(ifname, "removing the clsact qdisc: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Registers a job: packets from `cgroup_id` and its descendants belong to it.
    pub fn add_job(&mut self, cgroup_id: u64, cgroup_level: u32, job: abi::rf_job) -> Result<()> {
        self.skel
            .maps
            .jobs
            .update(&cgroup_id.to_ne_bytes(), bytes_of(&job), MapFlags::ANY)
            .map_err(map_err("jobs"))?;
        if cgroup_level < 32 {
            self.bss().job_levels |= 1 << cgroup_level;
        }
        self.invalidate_kept();
        Ok(())
    }

    /// Registers a job by interface. A job's namespace, container or microVM behind a veth
    /// or tap is registered on the host side of its link with [`abi::rf_job::host_side`]:
    /// what comes in there is the job's and is judged, what goes out there is for the job
    /// (its DNS answers bind there). Without the flag, every packet the verdict program sees
    /// leaving `ifindex` is the job's own (BPF_PROG_TEST_RUN). Both programs must be
    /// attached to `ifindex` ([`attach`](Self::attach)).
    pub fn add_interface_job(&mut self, ifindex: u32, job: abi::rf_job) -> Result<()> {
        self.skel
            .maps
            .ifjobs
            .update(&ifindex.to_ne_bytes(), bytes_of(&job), MapFlags::ANY)
            .map_err(map_err("ifjobs"))?;
        // The far end's index, for the backstop (peer_devs in bpf/maps.h).
        if job.flags & abi::rf_job::host_side_flag() != 0 {
            if let Ok(Some(peer)) = crate::kernel::netif::peer_index(ifindex) {
                let v = (u64::from(job.job_id) << 32) | u64::from(ifindex);
                self.skel
                    .maps
                    .peer_devs
                    .update(&peer.to_ne_bytes(), &v.to_ne_bytes(), MapFlags::ANY)
                    .map_err(map_err("peer_devs"))?;
            }
        }
        let bss = self.bss();
        bss.have_ifjobs = 1;
        self.invalidate_kept();
        if self.xdp_prejudge && job.flags & abi::rf_job::host_side_flag() != 0 {
            match self.attach_xdp(ifindex) {
                Ok(XdpAttach::Native) => tracing::debug!(ifindex, "xdp pre-judge attached"),
                Ok(XdpAttach::Skipped(why)) => {
                    tracing::info!(ifindex, "no xdp pre-judge ({why}): tc judges alone")
                }
                // Not fatal: TC judges every packet of the job as before.
                Err(e) => tracing::warn!(ifindex, "attaching the xdp pre-judge: {e}"),
            }
        }
        Ok(())
    }

    /// Interface jobs registered from now on get the XDP pre-judge on the host side of their
    /// link ([`attach_xdp`](Self::attach_xdp)), TC still judging all it passes. Off by
    /// default: see `xdp_prejudge`.
    pub fn set_xdp_prejudge(&mut self, on: bool) {
        self.xdp_prejudge = on;
    }

    /// Attaches the XDP pre-judge (rf_xdp, bpf/xdp.h) to `ifindex`, the host side of an
    /// interface job's link, in driver mode only. Generic (skb) XDP is not used: it runs
    /// after the skb exists, linearizes it, and costs more than the TC program it would
    /// spare. Nor is another XDP program replaced (the device's owner put it there).
    pub fn attach_xdp(&mut self, ifindex: u32) -> Result<XdpAttach> {
        use libbpf_rs::libbpf_sys as sys;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

        if self.xdp.contains_key(&ifindex) {
            return Ok(XdpAttach::Native);
        }
        let prog = self.skel.progs.rf_xdp.as_fd().as_raw_fd();
        // SAFETY: a zeroed opts struct with its size set is libbpf's documented default.
        let mut opts: sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<sys::bpf_link_create_opts>() as _;
        opts.flags = sys::XDP_FLAGS_DRV_MODE;
        // SAFETY: prog is a loaded program's fd; opts outlives the call.
        let fd = unsafe { sys::bpf_link_create(prog, ifindex as i32, sys::BPF_XDP, &opts) };
        if fd < 0 {
            return match -fd {
                libc::EOPNOTSUPP => Ok(XdpAttach::Skipped("the driver has no native XDP")),
                libc::EBUSY | libc::EEXIST => {
                    Ok(XdpAttach::Skipped("another XDP program is attached"))
                }
                // veth: a peer MTU above a page's worth of frame.
                libc::ERANGE | libc::EINVAL => Ok(XdpAttach::Skipped(
                    "the device refuses XDP (its MTU or its peer's is too large)",
                )),
                e => Err(DataplaneError::Attach {
                    ifname: format!("ifindex {ifindex}"),
                    dir: "ingress",
                    kind: "xdp",
                    source: std::io::Error::from_raw_os_error(e),
                }),
            };
        }
        // SAFETY: bpf_link_create returned a new fd that nothing else owns.
        self.xdp
            .insert(ifindex, unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(XdpAttach::Native)
    }

    /// Detaches the XDP pre-judge from `ifindex` (closing its link's only fd).
    pub fn detach_xdp(&mut self, ifindex: u32) {
        self.xdp.remove(&ifindex);
    }

    /// The interfaces the XDP pre-judge is attached to.
    pub fn xdp_interfaces(&self) -> Vec<u32> {
        self.xdp.keys().copied().collect()
    }

    /// The host default policy's job: every packet sent by a socket of no job is judged
    /// under it (forwarded packets, which have no socket, are not).
    pub fn set_host_job(&mut self, job: Option<abi::rf_job>) -> Result<()> {
        match job {
            Some(j) => {
                self.skel
                    .maps
                    .jobs
                    .update(&0u64.to_ne_bytes(), bytes_of(&j), MapFlags::ANY)
                    .map_err(map_err("jobs"))?;
                self.bss().have_host_job = 1;
            }
            None => {
                self.bss().have_host_job = 0;
                match self.skel.maps.jobs.delete(&0u64.to_ne_bytes()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                    Err(e) => return Err(map_err("jobs")(e)),
                }
            }
        }
        self.invalidate_kept();
        Ok(())
    }

    /// Allows job `job_id` every port of `net`, a network it shares with its own
    /// containers (see job::containers). Returns false, changing nothing, when the job's
    /// policy already has an entry for exactly that network: it is the policy's to keep.
    pub fn allow_network(&mut self, job_id: u32, net: IpNet) -> Result<bool> {
        let key = net_key(job_id, net);
        let (name, allow) = self.allow_map(&key);
        if let Ok(Some(_)) = allow.lookup(bytes_of(&key), MapFlags::ANY) {
            return Ok(false);
        }
        if name == "allow_cidrs" && !self.hosts_have_room() {
            return Err(self.allow_full());
        }
        let val = abi::rf_addr_val {
            ports: ports_to_abi(&PortSet::Any),
            flags: abi::ADDR_STATIC,
            prefixlen: key.prefixlen,
            ..Default::default()
        };
        allow
            .update(bytes_of(&key), bytes_of(&val), MapFlags::NO_EXIST)
            .map_err(map_err(name))?;
        // Both ways: a service container answering the job, a sibling connecting to one.
        self.skel
            .maps
            .inbound
            .update(
                bytes_of(&key),
                bytes_of(&ports_to_abi(&PortSet::Any)),
                MapFlags::ANY,
            )
            .map_err(map_err("inbound"))?;
        Ok(true)
    }

    /// Takes back what [`allow_network`](Self::allow_network) added.
    pub fn forget_network(&mut self, job_id: u32, net: IpNet) -> Result<()> {
        let key = net_key(job_id, net);
        for (name, map) in [self.allow_map(&key), ("inbound", &self.skel.maps.inbound)] {
            match map.delete(bytes_of(&key)) {
                Ok(()) => {}
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        self.invalidate_kept();
        Ok(())
    }

    /// The interfaces the TC programs are attached to, by index and name.
    pub fn attached_interfaces(&self) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = self
            .attached
            .iter()
            .map(|(n, i, _)| (*i, n.clone()))
            .collect();
        v.dedup();
        v
    }

    /// Forgets a job keyed by interface.
    pub fn remove_interface_job(&mut self, ifindex: u32) -> Result<()> {
        let maps = &self.skel.maps;
        let keys: Vec<Vec<u8>> = maps.peer_devs.keys().collect();
        for k in keys {
            if let Ok(Some(v)) = maps.peer_devs.lookup(&k, MapFlags::ANY) {
                if v.len() == 8
                    && u64::from_ne_bytes(v[..8].try_into().expect("8")) as u32 == ifindex
                {
                    let _ = maps.peer_devs.delete(&k);
                }
            }
        }
        self.detach_xdp(ifindex);
        let r = match self.skel.maps.ifjobs.delete(&ifindex.to_ne_bytes()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(map_err("ifjobs")(e)),
        };
        self.invalidate_kept();
        r
    }

    /// Removes every trace of job slot `job_id` from the maps: its policy (names, static
    /// and learned addresses, resolvers, inbound peers), its flows, outstanding queries and
    /// DNS streams. Other jobs' entries are untouched. Returns how many entries went.
    pub fn purge_job(&mut self, job_id: u32) -> Result<u64> {
        let maps = &self.skel.maps;
        let mut n = 0u64;
        let mut purge = |name: &'static str,
                         map: &libbpf_rs::MapMut<'static>,
                         by_key: Option<usize>,
                         by_val: Option<usize>|
         -> Result<()> {
            let keys: Vec<Vec<u8>> = map.keys().collect();
            for k in keys {
                let owner = if let Some(off) = by_key {
                    k.get(off..off + 4)
                        .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
                } else if let Some(off) = by_val {
                    map.lookup(&k, MapFlags::ANY).ok().flatten().and_then(|v| {
                        v.get(off..off + 4)
                            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
                    })
                } else {
                    None
                };
                if owner == Some(job_id) {
                    match map.delete(&k) {
                        Ok(()) => n += 1,
                        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                        Err(e) => return Err(map_err(name)(e)),
                    }
                }
            }
            Ok(())
        };
        use std::mem::offset_of;
        for (name, map) in [("allow", &maps.allow), ("allow_cidrs", &maps.allow_cidrs)] {
            purge(name, map, Some(offset_of!(abi::rf_lpm_key, job_id)), None)?;
        }
        purge(
            "inbound",
            &maps.inbound,
            Some(offset_of!(abi::rf_lpm_key, job_id)),
            None,
        )?;
        purge(
            "names",
            &maps.names,
            Some(offset_of!(abi::rf_name_key, job_id)),
            None,
        )?;
        purge(
            "resolvers",
            &maps.resolvers,
            Some(offset_of!(abi::rf_resolver_key, job_id)),
            None,
        )?;
        purge(
            "flows",
            &maps.flows,
            Some(offset_of!(abi::rf_flow_key, job_id)),
            None,
        )?;
        purge(
            "queries",
            &maps.queries,
            None,
            Some(offset_of!(abi::rf_query_val, job_id)),
        )?;
        purge(
            "tcp_streams",
            &maps.tcp_streams,
            None,
            Some(offset_of!(
                crate::kernel::skel::types::rf_stream_val,
                job_id
            )),
        )?;
        // The far ends of its links (by the job id in the value's high half).
        purge(
            "peer_devs",
            &maps.peer_devs,
            None,
            Some(if cfg!(target_endian = "little") { 4 } else { 0 }),
        )?;
        // Container cgroups and links the job claimed (job::containers), its own cgroup's
        // entry and its interface job.
        purge(
            "jobs",
            &maps.jobs,
            None,
            Some(offset_of!(abi::rf_job, job_id)),
        )?;
        purge(
            "ifjobs",
            &maps.ifjobs,
            None,
            Some(offset_of!(abi::rf_job, job_id)),
        )?;
        purge(
            "dns_streams",
            &maps.dns_streams,
            Some(offset_of!(
                crate::kernel::skel::types::rf_dns_stream_key,
                job_id
            )),
            None,
        )?;
        self.invalidate_kept();
        Ok(n)
    }

    /// Entries in each map, for `ringfence status` (name, entries, capacity).
    pub fn map_fill(&self) -> Vec<(&'static str, u64, u32)> {
        let maps = &self.skel.maps;
        let count = |m: &libbpf_rs::MapMut<'static>| m.keys().count() as u64;
        vec![
            ("jobs", count(&maps.jobs), maps.jobs.max_entries()),
            ("ifjobs", count(&maps.ifjobs), maps.ifjobs.max_entries()),
            // One figure for the two halves of the allow map (see bpf/maps.h): each holds up
            // to the capacity, host entries are the bulk.
            (
                "allow",
                count(&maps.allow) + count(&maps.allow_cidrs),
                maps.allow.max_entries(),
            ),
            ("names", count(&maps.names), maps.names.max_entries()),
            (
                "resolvers",
                count(&maps.resolvers),
                maps.resolvers.max_entries(),
            ),
            ("inbound", count(&maps.inbound), maps.inbound.max_entries()),
            ("flows", count(&maps.flows), maps.flows.max_entries()),
            ("queries", count(&maps.queries), maps.queries.max_entries()),
            (
                "dns_streams",
                count(&maps.dns_streams),
                maps.dns_streams.max_entries(),
            ),
        ]
    }

    /// Detaches everything this instance attached and removes every pin: nothing of
    /// ringfence stays in the kernel (`ringfence unload`).
    pub fn unload(&mut self) -> Result<()> {
        self.detach_all();
        if let Some(p) = self.pins.take() {
            p.remove_all()?;
        }
        Ok(())
    }

    pub fn remove_job(&mut self, cgroup_id: u64) -> Result<()> {
        let r = self
            .skel
            .maps
            .jobs
            .delete(&cgroup_id.to_ne_bytes())
            .map_err(map_err("jobs"));
        self.invalidate_kept();
        r
    }

    /// Writes a job's compiled policy: names, static prefixes and resolvers.
    pub fn install_policy(
        &mut self,
        job_id: u32,
        compiled: &Compiled,
        resolvers: &[IpAddr],
    ) -> Result<()> {
        for n in &compiled.names {
            if n.wire.len() > abi::NAME_MAX - 1 || n.globs.len() > abi::GLOBS_MAX {
                return Err(DataplaneError::Policy(format!(
                    "name entry {:?} does not fit",
                    String::from_utf8_lossy(&n.wire)
                )));
            }
            let key = abi::rf_name_key {
                job_id,
                _pad: 0,
                hash: n.hash,
            };
            let mut val = abi::rf_name_val {
                exact: ports_to_abi(&n.exact),
                wildcard: ports_to_abi(&n.wildcard),
                nglobs: n.globs.len() as u32,
                name_len: n.wire.len() as u32,
                ..Default::default()
            };
            // Right-aligned, lowercased: see rf_name_val in bpf/abi.h.
            let start = abi::NAME_MAX - n.wire.len();
            for (i, b) in n.wire.iter().enumerate() {
                val.name[start + i] = b.to_ascii_lowercase();
            }
            for (i, g) in n.globs.iter().enumerate() {
                let gl = &mut val.globs[i];
                if g.prefix.len() > abi::GLOB_PART_MAX || g.suffix.len() > abi::GLOB_PART_MAX {
                    return Err(DataplaneError::Policy("glob label too long".into()));
                }
                gl.ports = ports_to_abi(&g.ports);
                gl.prefix_len = g.prefix.len() as u8;
                gl.suffix_len = g.suffix.len() as u8;
                gl.prefix[..g.prefix.len()].copy_from_slice(&g.prefix);
                gl.suffix[..g.suffix.len()].copy_from_slice(&g.suffix);
            }
            self.skel
                .maps
                .names
                .update(bytes_of(&key), bytes_of(&val), MapFlags::ANY)
                .map_err(map_err("names"))?;
        }
        for (net, ports) in &compiled.prefixes {
            let addr = net.network();
            let prefixlen = abi::lpm_prefixlen(addr, net.prefix_len());
            let key = abi::rf_lpm_key {
                prefixlen,
                job_id,
                addr: abi::addr_to_bytes(addr),
            };
            let val = abi::rf_addr_val {
                ports: ports_to_abi(ports),
                flags: abi::ADDR_STATIC,
                prefixlen,
                ..Default::default()
            };
            let (name, allow) = self.allow_map(&key);
            // The fit check counts static entries only: learned addresses past their share
            // can still leave no room. Say so rather than a bare ENOSPC.
            if name == "allow_cidrs" && !self.hosts_have_room() {
                return Err(self.allow_full());
            }
            allow
                .update(bytes_of(&key), bytes_of(&val), MapFlags::ANY)
                .map_err(|e| {
                    if allow.keys().count() as u64 >= u64::from(allow.max_entries()) {
                        self.allow_full()
                    } else {
                        map_err(name)(e)
                    }
                })?;
        }
        for (net, ports) in &compiled.inbound {
            let addr = net.network();
            let prefixlen = abi::lpm_prefixlen(addr, net.prefix_len());
            let key = abi::rf_lpm_key {
                prefixlen,
                job_id,
                addr: abi::addr_to_bytes(addr),
            };
            self.skel
                .maps
                .inbound
                .update(
                    bytes_of(&key),
                    bytes_of(&ports_to_abi(ports)),
                    MapFlags::ANY,
                )
                .map_err(map_err("inbound"))?;
        }
        for r in resolvers {
            let key = abi::rf_resolver_key {
                job_id,
                addr: abi::addr_to_bytes(*r),
            };
            self.skel
                .maps
                .resolvers
                .update(bytes_of(&key), &[1u8], MapFlags::ANY)
                .map_err(map_err("resolvers"))?;
        }
        self.invalidate_kept();
        Ok(())
    }

    /// Forgets every job, policy, learned address, flow and counter, as if freshly loaded
    /// (reloading means verifying the programs again, which is slow under emulation: tests
    /// and benchmarks reuse one instance). Pending ring-buffer records are discarded.
    pub fn reset(&mut self) -> Result<()> {
        let maps = &self.skel.maps;
        for (name, map) in [
            ("jobs", &maps.jobs),
            ("ifjobs", &maps.ifjobs),
            ("names", &maps.names),
            ("allow", &maps.allow),
            ("allow_cidrs", &maps.allow_cidrs),
            ("resolvers", &maps.resolvers),
            ("queries", &maps.queries),
            ("flows", &maps.flows),
            ("tcp_streams", &maps.tcp_streams),
            ("dns_streams", &maps.dns_streams),
            ("inbound", &maps.inbound),
            ("devices", &maps.devices),
            ("inside_devs", &maps.inside_devs),
            ("peer_devs", &maps.peer_devs),
        ] {
            let keys: Vec<Vec<u8>> = map.keys().collect();
            for k in keys {
                map.delete(&k).map_err(map_err(name))?;
            }
        }
        let ncpu = libbpf_rs::num_possible_cpus().map_err(map_err("counters"))?;
        let zeros = vec![vec![0u8; 8]; ncpu];
        for i in 0..abi::COUNTERS as u32 {
            maps.counters
                .update_percpu(&i.to_ne_bytes(), &zeros, MapFlags::ANY)
                .map_err(map_err("counters"))?;
        }
        let events = self.events_map()?;
        let mut b = libbpf_rs::RingBufferBuilder::new();
        b.add(&events, |_: &[u8]| 0).map_err(map_err("events"))?;
        b.build()
            .map_err(map_err("events"))?
            .consume()
            .map_err(map_err("events"))?;
        let bss = self.bss();
        bss.job_levels = 0;
        bss.have_ifjobs = 0;
        bss.have_l3_devs = 0;
        bss.have_host_job = 0;
        bss.have_fwd_job = 0;
        bss.fwd_after_cgroup = 0;
        self.invalidate_kept();
        Ok(())
    }

    /// The ring buffer map, as an owned handle the event loop can poll.
    pub fn events_map(&self) -> Result<MapHandle> {
        MapHandle::try_from(&self.skel.maps.events).map_err(map_err("events"))
    }

    /// Per-CPU counters summed, indexed by `rf_counter`.
    pub fn counters(&self) -> Result<[u64; abi::COUNTERS]> {
        let mut out = [0u64; abi::COUNTERS];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .skel
                .maps
                .counters
                .lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY)
                .map_err(map_err("counters"))?
                .unwrap_or_default();
            *slot = per_cpu
                .iter()
                .map(|v| u64::from_ne_bytes(v[..8].try_into().unwrap_or([0; 8])))
                .sum();
        }
        Ok(out)
    }

    /// The map an allow entry of `key` lives in (see bpf/maps.h): host entries (the whole
    /// address) in the `allow` hash, shorter prefixes in the `allow_cidrs` trie.
    fn allow_map(&self, key: &abi::rf_lpm_key) -> (&'static str, &libbpf_rs::MapMut<'static>) {
        if key.prefixlen == abi::LPM_FULL {
            ("allow", &self.skel.maps.allow)
        } else {
            ("allow_cidrs", &self.skel.maps.allow_cidrs)
        }
    }

    /// Whether the `allow` hash can take one more entry. Its two halves share one budget,
    /// static and learned entries together, as the one trie did: a CIDR is refused once the
    /// host entries (learned addresses, mostly) have used it up. A hash keeps no count that
    /// userspace can read without walking every key, so it is asked by inserting a probe
    /// entry and deleting it again: job slot `u32::MAX` (no job's) and address `::` (never a
    /// destination, never bound), so no packet can match it meanwhile.
    fn hosts_have_room(&self) -> bool {
        let key = abi::rf_lpm_key {
            prefixlen: abi::LPM_FULL,
            job_id: u32::MAX,
            addr: [0; 16],
        };
        let map = &self.skel.maps.allow;
        let probe = abi::rf_addr_val {
            prefixlen: abi::LPM_FULL,
            ..Default::default()
        };
        match map.update(bytes_of(&key), bytes_of(&probe), MapFlags::NO_EXIST) {
            Ok(()) => {
                let _ = map.delete(bytes_of(&key));
                true
            }
            // Full (E2BIG), or no memory for one more: no room either way.
            Err(_) => false,
        }
    }

    fn allow_full(&self) -> DataplaneError {
        DataplaneError::Policy(format!(
            "map allow is full ({} entries: the jobs' static entries and the addresses learned \
             from DNS answers): raise max-learned-addresses (exec --max-learned-addresses, \
             daemon config max-learned-addresses)",
            self.skel.maps.allow.max_entries()
        ))
    }

    /// The host entry for `addr` in job `job_id`'s allow map, if there is one.
    pub fn host_entry(&self, job_id: u32, addr: IpAddr) -> Result<Option<abi::rf_addr_val>> {
        let key = host_key(job_id, addr);
        let v = self
            .skel
            .maps
            .allow
            .lookup(bytes_of(&key), MapFlags::ANY)
            .map_err(map_err("allow"))?;
        Ok(v.and_then(|b| from_bytes::<abi::rf_addr_val>(&b))
            .filter(|v| v.prefixlen == abi::LPM_FULL))
    }

    /// Binds `addr` for `job_id` from userspace, as the kernel does for answers it can
    /// parse: refresh a host entry in place (ports merged, expiry extended), or insert one
    /// that inherits the ports of a covering CIDR. For answers the kernel could not parse
    /// (DNS over TCP split across segments). Like the kernel, it never binds a special
    /// address (loopback, link-local, metadata, multicast…: [`crate::policy::is_special`]):
    /// returns `Ok(false)` for those, `Ok(true)` when bound.
    pub fn bind_learned(
        &self,
        job_id: u32,
        addr: IpAddr,
        ports: &PortSet,
        expires_ns: u64,
    ) -> Result<bool> {
        if crate::policy::is_special(addr) {
            return Ok(false);
        }
        let key = host_key(job_id, addr);
        // The longest match, as the programs' allow_lookup finds it: the host entry, else
        // the covering CIDR's.
        let found = match self.host_entry(job_id, addr)? {
            Some(v) => Some(v),
            None => self
                .skel
                .maps
                .allow_cidrs
                .lookup(bytes_of(&key), MapFlags::ANY)
                .map_err(map_err("allow_cidrs"))?
                .and_then(|b| from_bytes::<abi::rf_addr_val>(&b)),
        };
        let mut v = match found {
            Some(v) if v.prefixlen == abi::LPM_FULL => v,
            Some(cover) => abi::rf_addr_val {
                ports: cover.ports,
                flags: cover.flags & abi::ADDR_STATIC,
                ..Default::default()
            },
            None => abi::rf_addr_val::default(),
        };
        merge_ports(&mut v.ports, &ports_to_abi(ports));
        v.flags |= abi::ADDR_LEARNED;
        v.prefixlen = abi::LPM_FULL;
        v.expires_ns = v.expires_ns.max(expires_ns);
        self.skel
            .maps
            .allow
            .update(bytes_of(&key), bytes_of(&v), MapFlags::ANY)
            .map_err(map_err("allow"))?;
        Ok(true)
    }

    /// The agent has reassembled a TCP DNS answer: stop copying that stream's segments.
    pub fn forget_tcp_stream(&self, server: IpAddr, client_port: u16) -> Result<()> {
        let key = abi::rf_stream_key {
            server: abi::addr_to_bytes(server),
            client_port,
            _pad: 0,
        };
        match self.skel.maps.tcp_streams.delete(bytes_of(&key)) {
            Ok(()) => Ok(()),
            // Already gone (LRU) is fine.
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(map_err("tcp_streams")(e)),
        }
    }

    pub fn delete_host_entry(&self, job_id: u32, addr: IpAddr) -> Result<()> {
        let key = host_key(job_id, addr);
        self.skel
            .maps
            .allow
            .delete(bytes_of(&key))
            .map_err(map_err("allow"))
    }

    /// Every job slot the pinned dataplane still holds anything of: job entries (by cgroup
    /// and by interface), policy entries (names, addresses, resolvers, inbound peers) and
    /// pinned cgroup links (`job-<slot>-<program>`). An adopting daemon must never hand one
    /// of these to a new job, also when its own state does not name it (a state lost, or a
    /// daemon killed inside a job start before it wrote its state): the new job would inherit
    /// what is there (see tests/redteam9.rs).
    pub fn slots_in_use(&self) -> std::collections::BTreeSet<u32> {
        use std::mem::offset_of;
        let maps = &self.skel.maps;
        let mut slots = std::collections::BTreeSet::new();
        let at = |b: &[u8], off: usize| {
            b.get(off..off + 4)
                .map(|x| u32::from_ne_bytes(x.try_into().expect("4 bytes")))
        };
        for m in [&maps.jobs, &maps.ifjobs] {
            for k in m.keys() {
                if let Ok(Some(v)) = m.lookup(&k, MapFlags::ANY) {
                    slots.extend(at(&v, offset_of!(abi::rf_job, job_id)));
                }
            }
        }
        for k in maps.allow.keys().chain(maps.allow_cidrs.keys()) {
            slots.extend(at(&k, offset_of!(abi::rf_lpm_key, job_id)));
        }
        for k in maps.inbound.keys() {
            slots.extend(at(&k, offset_of!(abi::rf_lpm_key, job_id)));
        }
        for k in maps.names.keys() {
            slots.extend(at(&k, offset_of!(abi::rf_name_key, job_id)));
        }
        for k in maps.resolvers.keys() {
            slots.extend(at(&k, offset_of!(abi::rf_resolver_key, job_id)));
        }
        if let Some(p) = &self.pins {
            for (name, _) in p.list_links() {
                let slot = name
                    .strip_prefix("job-")
                    .and_then(|r| r.split('-').next())
                    .and_then(|n| n.parse::<u32>().ok());
                slots.extend(slot);
            }
        }
        slots
    }

    /// Every allow entry, host entries and CIDRs (tests, status, reports).
    pub fn allow_entries(&self) -> Vec<AddrEntry> {
        [&self.skel.maps.allow, &self.skel.maps.allow_cidrs]
            .into_iter()
            .flat_map(|map| map.keys().map(move |k| (map, k)))
            .filter_map(|(map, k)| {
                let key = from_bytes::<abi::rf_lpm_key>(&k)?;
                let v = map.lookup(&k, MapFlags::ANY).ok()??;
                let val = from_bytes::<abi::rf_addr_val>(&v)?;
                Some(AddrEntry {
                    job_id: key.job_id,
                    addr: abi::addr_from_bytes(key.addr),
                    prefix_bits: key.prefixlen,
                    val,
                })
            })
            .collect()
    }

    /// The programs, for BPF_PROG_TEST_RUN tests and benchmarks.
    pub fn egress_prog(&self) -> &libbpf_rs::ProgramMut<'static> {
        &self.skel.progs.rf_egress
    }

    pub fn ingress_prog(&self) -> &libbpf_rs::ProgramMut<'static> {
        &self.skel.progs.rf_ingress
    }

    pub fn empty_prog(&self) -> &libbpf_rs::ProgramMut<'static> {
        &self.skel.progs.rf_empty
    }

    pub fn xdp_prog(&self) -> &libbpf_rs::ProgramMut<'static> {
        &self.skel.progs.rf_xdp
    }
}

// SAFETY: the skeleton is Send; the clsact hooks hold libbpf option structs whose only
// pointer fields are unused (NULL), and links are owned file descriptors.
unsafe impl Send for Dataplane {}

impl Drop for Dataplane {
    /// Unpinned (`exec`), everything is detached. Pinned (the daemon), nothing is: the
    /// links stay in bpffs and the kernel goes on enforcing until a daemon takes them over
    /// or `ringfence unload` removes them.
    fn drop(&mut self) {
        if self.pins.is_none() {
            self.detach_all();
        } else {
            // The clsact filters are netlink state: they stay whatever happens to the hooks.
            for (_, _, a) in self.attached.drain(..) {
                std::mem::forget(a);
            }
        }
    }
}

/// What the kernel says of a link (None when it cannot be read).
fn link_info(link: &Link) -> Option<libbpf_rs::libbpf_sys::bpf_link_info> {
    use libbpf_rs::libbpf_sys as sys;
    let mut info = sys::bpf_link_info::default();
    let mut len = std::mem::size_of::<sys::bpf_link_info>() as u32;
    // SAFETY: info is a plain struct of `len` bytes that outlives the call.
    let err = unsafe {
        sys::bpf_link_get_info_by_fd(
            std::os::fd::AsRawFd::as_raw_fd(&link.as_fd()),
            &mut info,
            &mut len,
        )
    };
    (err == 0).then_some(info)
}

/// The cgroup a cgroup link is attached to (0 once that cgroup is gone: the link is severed).
fn link_cgroup_id(link: &Link) -> Option<u64> {
    // SAFETY: a cgroup link's info fills the cgroup member of the union.
    link_info(link).map(|i| unsafe { i.__bindgen_anon_1.cgroup.cgroup_id })
}

/// The device a TCX link is attached to (0 when defunct).
fn link_ifindex(link: &Link) -> Option<u32> {
    // SAFETY: a TCX link's info fills the tcx member of the union.
    link_info(link).map(|i| unsafe { i.__bindgen_anon_1.tcx.ifindex })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_filter_arg_round_trips() {
        let f = TcFilter {
            ifindex: 7,
            egress: false,
            handle: 1,
            priority: 49152,
            prog_id: 301,
        };
        assert_eq!(f.to_arg(), "7:ingress:1:49152:301");
        assert_eq!(TcFilter::parse_arg(&f.to_arg()), Ok(f));
        assert!(TcFilter::parse_arg("7:sideways:1:2:3").is_err());
        assert!(TcFilter::parse_arg("7:egress:1:2").is_err());
    }

    #[test]
    fn release_parses() {
        assert_eq!(parse_release("6.18.44-fc-v669"), (6, 18));
        assert_eq!(parse_release("6.1.0-27-amd64"), (6, 1));
        assert_eq!(parse_release("5.15.0"), (5, 15));
        assert_eq!(parse_release("garbage"), (0, 0));
    }
}
