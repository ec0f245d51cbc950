//! `ringfence run`: one process that owns the pinned dataplane and serves any number of
//! jobs through the control socket, in one mio loop (ring buffer, signals, new interfaces,
//! the socket and its connections). Nothing here is on the enforcement path: the kernel
//! judges every packet from the pinned maps whether or not this process is alive.
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::agent::{boottime_ns, Agent, JobState};
use crate::daemon::config::Config;
use crate::daemon::protocol::{check_job_id, Request, Response, Target, MAX_REQUEST};
use crate::daemon::state::{JobRecord, State, HOST_SLOT};
use crate::job::cgroup;
use crate::job::spec::{mode_name, PolicySpec};
use crate::kernel::abi;
use crate::kernel::capacity::Usage;
use crate::kernel::dataplane::{self, Dataplane, TcFilter};
use crate::kernel::pins::Pins;
use crate::policy::Policy;
use crate::trail::events::read_events;
use crate::trail::report::Format;

// What the daemon shows while it runs (the metrics text, `watch` polls): methods of
// `Daemon` in a file of their own.
#[path = "observe.rs"]
mod observe;

/// `ringfence run`'s flags: each overrides the config file's key.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// The daemon's configuration (TOML; see the README). Default: built-in defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The control socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Where programs' maps and links are pinned (on a bpffs).
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// The daemon's state (for re-adoption after a restart).
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Each job's events file and report: DIR/jobs/<id>/.
    #[arg(long = "data-dir", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The host default policy: traffic of sockets that belong to no job.
    #[arg(long = "host-policy", value_name = "FILE")]
    pub host_policy: Option<PathBuf>,
    /// Interfaces to attach to (repeatable). Default: every one, and new ones as they come.
    #[arg(long = "interface", value_name = "IFNAME")]
    pub interfaces: Vec<String>,
    /// Map sizes (the config's keys of the same names).
    #[command(flatten)]
    pub capacity: crate::kernel::capacity::CapacityArgs,
    /// Serve Prometheus metrics on ADDR (TCP, e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Serve Prometheus metrics on a Unix socket.
    #[arg(long = "metrics-socket", value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,
}

impl RunArgs {
    pub fn config(&self) -> Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(v) = &self.socket {
            c.socket = v.clone();
        }
        if let Some(v) = &self.bpffs {
            c.bpffs = v.clone();
        }
        if let Some(v) = &self.state_dir {
            c.state_dir = v.clone();
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.host_policy {
            c.host_policy = Some(v.clone());
        }
        if !self.interfaces.is_empty() {
            c.interfaces = self.interfaces.clone();
        }
        let cap = &self.capacity;
        for (flag, key) in [
            (cap.static_addresses, &mut c.max_static_addresses),
            (cap.learned_addresses, &mut c.max_learned_addresses),
            (cap.names, &mut c.max_names),
            (cap.inbound, &mut c.max_inbound),
            (cap.flows, &mut c.max_flows),
        ] {
            if let Some(v) = flag {
                *key = v;
            }
        }
        c.capacity().validate().map_err(|e| anyhow::anyhow!(e))?;
        if let Some(v) = &self.metrics {
            c.metrics = Some(v.clone());
        }
        if let Some(v) = &self.metrics_socket {
            c.metrics_socket = Some(v.clone());
        }
        Ok(c)
    }
}

/// A job as the daemon holds it.
struct Live {
    slot: u32,
    policy: Policy,
    cgroup_id: Option<u64>,
    /// Entries its policy holds in the capacity-checked maps.
    usage: Usage,
    /// The container links it claimed and the networks it shares with them (cgroup and
    /// pid jobs, config `containers`).
    containers: Option<crate::job::containers::ContainerLinks>,
}

/// One control connection: a request line in, a response line out, then closed.
struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    deadline: Instant,
    peer: Option<(u32, u32)>, // (pid, uid)
}

const RINGBUF: Token = Token(0);
const SIGNALS: Token = Token(1);
const LINKS: Token = Token(2);
const LISTENER: Token = Token(3);
const FIRST_CONN: usize = 16;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNS: usize = 64;
/// A client that has not sent its request (or read its answer) by then is dropped.
const CONN_TIMEOUT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(10);
const ATTACH_CHECK: Duration = Duration::from_secs(1);

pub struct Daemon {
    cfg: Config,
    /// Finds containers' cgroups for the jobs' claims (job::containers).
    cgroup_scan: crate::job::containers::CgroupScan,
    dp: Dataplane,
    agent: Rc<RefCell<Agent>>,
    state: State,
    jobs: HashMap<String, Live>,
    cg_root: PathBuf,
    events_max: u64,
    links: Option<crate::kernel::netif::LinkWatcher>,
    /// Interfaces attached at start (config or all), for status.
    started: Instant,
    watch_failed: Vec<String>,
    /// Set by an `unload` request: leave the loop and take everything down.
    unload: bool,
    /// Entries the host default policy holds in the capacity-checked maps.
    host_usage: Usage,
    /// The host's webhooks (config `[[webhook]]`), told of every job's blocks and findings.
    webhooks: Vec<crate::notify::Sink>,
    /// A job ended: once its reply (the rendered report) is sent and dropped, the heap's
    /// free pages go back to the kernel (see `agent::trim_heap`).
    trim_due: bool,
}

/// `ringfence run`.
pub fn run(args: &RunArgs) -> Result<i32> {
    let cfg = args.config()?;
    let mut d = Daemon::start(cfg)?;
    d.serve()
}

/// A directory the daemon writes in as root, created with `mode`. One that exists keeps its
/// mode (it may be shared: `--data-dir /var/lib` must not make /var/lib 0700, nor `/tmp`
/// lose its sticky bit), but one that someone other than root may write is refused: they
/// could plant links where the daemon writes (state.json.tmp, a job's events file).
fn mkdir(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) if !m.is_dir() => anyhow::bail!("{} exists and is not a directory", p.display()),
        Ok(m) if m.uid() != 0 || m.mode() & 0o022 != 0 => anyhow::bail!(
            "{} (owner uid {}, mode {:o}) may be written by others than root, who could plant links where the daemon writes: give the daemon a directory of its own",
            p.display(),
            m.uid(),
            m.mode() & 0o7777
        ),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", p.display()))
        }
        Err(e) => Err(e).with_context(|| format!("looking at {}", p.display())),
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Daemon {
    /// Loads (or takes over) the pinned dataplane, re-registers the jobs an earlier daemon
    /// left, and attaches. Nothing is served yet.
    pub fn start(cfg: Config) -> Result<Daemon> {
        dataplane::preflight()?;
        let events_max = cfg.events_max().map_err(|e| anyhow::anyhow!(e))?;
        // A second daemon on the same socket would fight the first over the same pins.
        if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
            anyhow::bail!(
                "a ringfence daemon is already serving {} (stop it first, or give this one another --socket and --bpffs)",
                cfg.socket.display()
            );
        }
        mkdir(&cfg.state_dir, 0o755)?;
        mkdir(&cfg.data_dir, 0o700)?;
        let host_policy = match &cfg.host_policy {
            Some(p) => Some(
                Policy::from_file(p)
                    .map_err(|e| anyhow::Error::new(crate::job::spec::UsageError::from(e)))?,
            ),
            None => None,
        };
        let capacity = cfg.capacity();
        let mut host_usage = Usage::default();
        if let Some(p) = &host_policy {
            host_usage = Usage::of(&p.compile().map_err(anyhow::Error::new)?);
            // Refused before anything is loaded, like an exec's policy.
            capacity
                .check(host_usage, Usage::default())
                .map_err(|e| anyhow::anyhow!("host-policy: {e}"))?;
        }
        let mut state = State::load(&cfg.state_file())?;
        let cg_root = cgroup::find_cgroup2()?;
        let opts = dataplane::Options {
            attach: cfg.attach,
            pins: Some(Pins::new(&cfg.bpffs)),
            dns_min_ttl: crate::policy::DEFAULT_DNS_MIN_TTL,
            dns_grace: crate::policy::DEFAULT_DNS_GRACE,
            capacity,
            ..Default::default()
        };
        let mut dp = Dataplane::load(&opts)?;
        if dp.adopted() {
            tracing::info!(bpffs = %cfg.bpffs.display(), jobs = state.jobs.len(), "taking over the pinned dataplane");
        } else if !state.jobs.is_empty() {
            // The pins went (a reboot keeps no bpffs; someone removed them) but the state
            // did not: the jobs are enforced again from here on, their learned names lost.
            tracing::warn!(
                jobs = state.jobs.len(),
                "the state names jobs but nothing was pinned: re-registering them on a fresh dataplane"
            );
        }
        let filters: Vec<TcFilter> = state
            .filters
            .iter()
            .filter_map(|f| TcFilter::parse_arg(f).ok())
            .collect();
        dp.adopt_filters(&filters);
        let webhooks = cfg
            .webhook
            .iter()
            .map(|w| crate::notify::Sink::start(w.clone()))
            .collect::<io::Result<Vec<_>>>()
            .context("starting the webhook senders")?;
        let mut agent = Agent::new(
            None,
            crate::policy::DEFAULT_DNS_MIN_TTL,
            crate::policy::DEFAULT_DNS_GRACE,
        )?;
        // The host default policy.
        match &host_policy {
            Some(p) => {
                dp.install_policy(HOST_SLOT, &p.compile()?, &p.dns_resolvers)?;
                dp.set_host_job(Some(abi::rf_job::for_policy(HOST_SLOT, p)))?;
                tracing::info!(mode = mode_name(p.mode), "host default policy installed");
            }
            None => {
                dp.set_host_job(None)?;
                if dp.adopted() {
                    dp.purge_job(HOST_SLOT)?;
                }
            }
        }
        // Forwarded traffic no job judged (containers no job claimed): under the host
        // default policy, or passed (config `forwarded`).
        match (&host_policy, cfg.forwarded) {
            (Some(p), super::config::ForwardedMode::HostDefault) => {
                dp.set_forward_job(Some(abi::rf_job::for_policy(HOST_SLOT, p)))?
            }
            _ => dp.set_forward_job(None)?,
        }
        // The jobs an earlier daemon left.
        let mut jobs = HashMap::new();
        let records = std::mem::take(&mut state.jobs);
        for r in records {
            let mut notify = webhooks.clone();
            if let Some(w) = r.webhook.clone() {
                notify.extend(crate::notify::Sink::start(w).ok());
            }
            match readopt(&mut dp, &mut agent, &r, events_max, notify, cfg.containers) {
                Ok(live) => {
                    jobs.insert(r.id.clone(), live);
                    let mut r = r;
                    r.links.retain(still_there); // readopt() left the gone ones out
                    state.jobs.push(r);
                }
                Err(e) => {
                    tracing::warn!(job = r.id, "cannot take the job over, ending it: {e:#}");
                    let _ = dp.purge_job(r.slot);
                    dp.detach_job_hooks(&r.slot.to_string());
                    for i in r.ifindex.iter().chain(r.links.iter().map(|(l, _)| l)) {
                        let _ = dp.remove_interface_job(*i);
                    }
                }
            }
        }
        // Slots are never reused while the maps live: one the state does not name may still
        // hold an earlier job's policy and pinned links, which a new job would inherit.
        if dp.adopted() {
            let known: std::collections::BTreeSet<u32> =
                state.jobs.iter().map(|j| j.slot).collect();
            let pinned = dp.slots_in_use();
            let orphans: Vec<u32> = pinned
                .iter()
                .copied()
                .filter(|s| *s != HOST_SLOT && !known.contains(s))
                .collect();
            if !orphans.is_empty() {
                tracing::warn!(
                    ?orphans,
                    "the pinned dataplane holds job slots the state does not name (a lost state, or a daemon killed inside a job start): they stay as they are until `unload`, and no new job gets them"
                );
            }
            if let Some(max) = pinned.iter().copied().filter(|s| *s != HOST_SLOT).max() {
                state.next_slot = state.next_slot.max(max.saturating_add(1));
            }
        }
        // Learned addresses go on expiring where the last daemon left off.
        if dp.adopted() {
            for e in dp.allow_entries() {
                if e.val.expires_ns != 0 && e.prefix_bits == abi::LPM_FULL {
                    agent.watch_expiry(e.job_id, e.addr, e.val.expires_ns);
                }
            }
        }
        let auto = cfg.interfaces.is_empty();
        let links = if auto {
            Some(
                crate::kernel::netif::LinkWatcher::open()
                    .context("watching rtnetlink for new interfaces")?,
            )
        } else {
            None
        };
        let mut ifaces = if auto {
            crate::kernel::netif::all_interfaces()
        } else {
            cfg.interfaces.clone()
        };
        if !ifaces.iter().any(|i| i == "lo") {
            ifaces.push("lo".into());
        }
        // Every interface an earlier daemon attached to is taken over too, whatever this
        // daemon's list says: a link left running the old programs would judge with their
        // settings (their idea of which cgroup levels hold jobs), not this daemon's.
        let pinned: Vec<u32> = Pins::new(&cfg.bpffs)
            .list_links()
            .iter()
            .filter_map(|(name, _)| name.strip_prefix("tcx-")?.split('-').next()?.parse().ok())
            .chain(filters.iter().map(|f| f.ifindex as u32))
            .collect();
        for i in pinned {
            if let Ok(name) = nix::net::if_::if_indextoname(i) {
                let name = name.to_string_lossy().into_owned();
                if !ifaces.contains(&name) {
                    tracing::info!(
                        ifname = name,
                        "taking over an interface an earlier daemon attached to"
                    );
                    ifaces.push(name);
                }
            }
        }
        for i in &ifaces {
            match dp.attach(i) {
                Ok(()) => {}
                Err(e) if auto => {
                    tracing::warn!("{e}: job traffic through it is not let out in block mode")
                }
                Err(e) => return Err(e.into()),
            }
        }
        let watch_failed = dp.attach_process_watch();
        for f in &watch_failed {
            tracing::warn!("the process watch is not attached: {f}");
        }
        let mut d = Daemon {
            cgroup_scan: crate::job::containers::CgroupScan::new(),
            cfg,
            dp,
            agent: Rc::new(RefCell::new(agent)),
            state,
            jobs,
            cg_root,
            events_max,
            links,
            started: Instant::now(),
            watch_failed,
            unload: false,
            host_usage,
            webhooks,
            trim_due: false,
        };
        d.agent.borrow_mut().recent = Some(Default::default());
        d.save_state();
        Ok(d)
    }

    /// What each job's trail may cost (the rate and size limits `exec` has by default).
    fn limits(&self) -> crate::trail::limits::Limits {
        crate::trail::limits::Limits {
            events_max_bytes: self.events_max,
            ..Default::default()
        }
    }

    fn save_state(&mut self) {
        self.state.filters = self.dp.held().filters.iter().map(|f| f.to_arg()).collect();
        if let Err(e) = self.state.save(&self.cfg.state_file()) {
            tracing::error!(
                "writing the daemon state {}: {e}",
                self.cfg.state_file().display()
            );
        }
    }

    fn counters(&self) -> [u64; abi::COUNTERS] {
        self.dp.counters().unwrap_or([0; abi::COUNTERS])
    }

    fn bind(&self) -> Result<UnixListener> {
        let path = &self.cfg.socket;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing the stale socket {}", path.display()))
            }
        }
        // Created 0600 from the start: no moment where anyone else may connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let l = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let l = l.with_context(|| format!("binding the control socket {}", path.display()))?;
        if let Some(g) = &self.cfg.group {
            let group = nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| anyhow::anyhow!("group {g:?} (config `group`) does not exist"))?;
            nix::unistd::chown(path, None, Some(group.gid))
                .with_context(|| format!("giving {} to group {g}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        }
        Ok(l)
    }

    /// The event loop, until SIGTERM/SIGINT (everything stays pinned and enforced) or an
    /// `unload` request (everything is taken down).
    pub fn serve(&mut self) -> Result<i32> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
        let mut listener = self.bind()?;
        let mut metrics = crate::daemon::metrics::Exporter::start(
            self.cfg.metrics.as_deref(),
            self.cfg.metrics_socket.as_deref(),
        )?;
        let agent = self.agent.clone();
        let events_map = self.dp.events_map()?;
        let mut rbb = libbpf_rs::RingBufferBuilder::new();
        rbb.add(&events_map, move |data: &[u8]| {
            agent.borrow_mut().handle(data);
            0
        })
        .context("setting up the ring buffer")?;
        let rb = rbb.build().context("setting up the ring buffer")?;
        // What the kernel wrote while no daemon ran is read first; what it could not write
        // (the ring buffer was full) is counted, and said in every job's report.
        let _ = rb.consume();
        self.agent.borrow_mut().apply(&self.dp);
        let drops = self.counters()[abi::rf_counter::RF_CNT_RINGBUF_DROP.0 as usize];
        let lost = drops.saturating_sub(self.state.ringbuf_drops_seen);
        if lost > 0 && self.dp.adopted() {
            tracing::warn!(lost, "events were lost while no daemon ran (the ring buffer was full); verdicts were still enforced");
            let mut a = self.agent.borrow_mut();
            for j in a.jobs.values_mut() {
                j.report.warn(format!(
                    "{lost} events were lost while no daemon ran (ring buffer full); verdicts were still enforced"
                ));
            }
        }
        self.state.ringbuf_drops_seen = drops;
        self.save_state();

        let mut poll = Poll::new().context("creating the event loop")?;
        let rb_fd = rb.epoll_fd();
        poll.registry()
            .register(&mut SourceFd(&rb_fd), RINGBUF, Interest::READABLE)?;
        let mut signals = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
            .context("installing signal handlers")?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        if let Some(l) = &self.links {
            poll.registry()
                .register(&mut SourceFd(&l.raw_fd()), LINKS, Interest::READABLE)?;
        }
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        tracing::info!(
            socket = %self.cfg.socket.display(),
            bpffs = %self.cfg.bpffs.display(),
            attach = self.dp.attach_kind().name(),
            jobs = self.jobs.len(),
            "ringfence daemon serving"
        );
        // Readiness for systemd (Type=notify) and scripts: the socket answers from here on.
        notify_ready();

        let mut conns: HashMap<usize, Conn> = HashMap::new();
        let mut next_conn = FIRST_CONN;
        let mut events = Events::with_capacity(128);
        let mut next_check = Instant::now() + ATTACH_CHECK;
        let mut stop = false;
        while !stop && !self.unload {
            let timeout = self.agent.borrow().poll_timeout(TICK);
            match poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("polling"),
            }
            for ev in events.iter() {
                match ev.token() {
                    RINGBUF => {
                        let _ = rb.consume();
                    }
                    SIGNALS => {
                        for sig in signals.pending() {
                            if sig == SIGHUP {
                                tracing::info!(
                                    "SIGHUP: nothing to reload (restart to change the config)"
                                );
                                continue;
                            }
                            tracing::info!("signal {sig}: stopping; programs, maps and jobs stay pinned and enforced");
                            stop = true;
                        }
                    }
                    LINKS => {
                        if let Some(l) = &self.links {
                            let _ = self.dp.follow_links(l);
                            self.claim_containers();
                            self.save_state();
                        }
                    }
                    LISTENER => loop {
                        match listener.accept() {
                            Ok((mut stream, _)) => {
                                if conns.len() >= MAX_CONNS {
                                    let _ = stream.write_all(
                                        (line(&Response::error(
                                            "too many control connections at once; try again",
                                        )))
                                        .as_bytes(),
                                    );
                                    continue;
                                }
                                let token = next_conn;
                                next_conn = if next_conn == usize::MAX {
                                    FIRST_CONN
                                } else {
                                    next_conn + 1
                                };
                                // Who is asking is decided now, while the process that
                                // connected is most likely still there: a job's
                                // connections are closed at once, so a job cannot hold
                                // the daemon's connections either.
                                let peer = peer_of(&stream);
                                if let Some(why) = self.refuse_peer(peer) {
                                    let _ =
                                        stream.write_all(line(&Response::error(why)).as_bytes());
                                    continue;
                                }
                                if poll
                                    .registry()
                                    .register(&mut stream, Token(token), Interest::READABLE)
                                    .is_ok()
                                {
                                    conns.insert(
                                        token,
                                        Conn {
                                            stream,
                                            inbuf: Vec::new(),
                                            out: Vec::new(),
                                            sent: 0,
                                            deadline: Instant::now() + CONN_TIMEOUT,
                                            peer,
                                        },
                                    );
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::warn!("accepting a control connection: {e}");
                                break;
                            }
                        }
                    },
                    Token(t) => {
                        let done = match conns.get_mut(&t) {
                            Some(c) => self.on_conn(c, &rb, &poll, Token(t)),
                            None => false,
                        };
                        if done {
                            if let Some(mut c) = conns.remove(&t) {
                                let _ = poll.registry().deregister(&mut c.stream);
                            }
                            // After a 32-job flood the ended jobs' freed heap stayed in the
                            // daemon's RSS (193-274 MiB; trimmed: 40-44, rfbench daemon).
                            if std::mem::take(&mut self.trim_due) {
                                crate::agent::trim_heap();
                            }
                        }
                    }
                }
            }
            let _ = rb.consume();
            {
                let mut a = self.agent.borrow_mut();
                a.apply(&self.dp);
                a.expire(&self.dp, boottime_ns());
            }
            if self.jobs.values().any(|l| l.containers.is_some()) {
                let now = self.cgroup_scan.scan();
                let sole = self.jobs.len() == 1;
                for live in self.jobs.values_mut() {
                    if let Some(c) = live.containers.as_mut() {
                        c.refresh_cgroups(&mut self.dp, sole, &now);
                    }
                }
            }
            if Instant::now() >= next_check {
                self.agent.borrow_mut().check_dataplane(&self.dp);
                // Addresses come after their links (a bridge's): shared networks re-read.
                self.claim_containers();
                next_check = Instant::now() + ATTACH_CHECK;
            }
            self.agent.borrow_mut().flush();
            if let Some(m) = metrics.as_mut().filter(|m| m.due()) {
                m.publish(self.metrics_text());
            }
            let now = Instant::now();
            conns.retain(|_, c| {
                let keep = c.deadline > now;
                if !keep {
                    let _ = poll.registry().deregister(&mut c.stream);
                }
                keep
            });
        }
        let _ = rb.consume();
        self.agent.borrow_mut().apply(&self.dp);
        self.agent.borrow_mut().flush();
        drop(listener);
        drop(metrics);
        let _ = std::fs::remove_file(&self.cfg.socket);
        if self.unload {
            return self.take_down();
        }
        self.state.ringbuf_drops_seen =
            self.counters()[abi::rf_counter::RF_CNT_RINGBUF_DROP.0 as usize];
        self.save_state();
        Ok(0)
    }

    /// Reads, answers and writes one connection; true when it is finished with.
    fn on_conn(
        &mut self,
        c: &mut Conn,
        rb: &libbpf_rs::RingBuffer,
        poll: &Poll,
        token: Token,
    ) -> bool {
        if c.out.is_empty() {
            let mut buf = [0u8; 16384];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(n) => {
                        c.inbuf.extend_from_slice(&buf[..n]);
                        if c.inbuf.len() > MAX_REQUEST {
                            c.out = line(&Response::error(format!(
                                "request larger than {MAX_REQUEST} bytes: refused"
                            )))
                            .into_bytes();
                            break;
                        }
                        if let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') {
                            let req = c.inbuf[..nl].to_vec();
                            let resp = self.answer(&req, c.peer, rb);
                            c.out = line(&resp).into_bytes();
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return true,
                }
            }
            let _ = poll
                .registry()
                .reregister(&mut c.stream, token, Interest::WRITABLE);
        }
        while c.sent < c.out.len() {
            match c.stream.write(&c.out[c.sent..]) {
                Ok(0) => return true,
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
        true
    }

    /// One request line: parsed, checked against who sent it, carried out.
    fn answer(
        &mut self,
        raw: &[u8],
        peer: Option<(u32, u32)>,
        rb: &libbpf_rs::RingBuffer,
    ) -> Response {
        let req: Request = match serde_json::from_slice(raw) {
            Ok(r) => r,
            Err(e) => return Response::error(format!("malformed request: {e}")),
        };
        if let Some(why) = self.refuse_peer(peer) {
            return Response::error(why);
        }
        if peer.is_some_and(|(_, uid)| uid != 0) && matches!(req, Request::Unload { .. }) {
            return Response::error("refused: only root may unload ringfence");
        }
        let res = match req {
            Request::JobStart {
                id,
                target,
                policy,
                fail_on_block,
                webhook,
                claim_running_containers,
            } => self.job_start(
                &id,
                target,
                policy,
                (fail_on_block, claim_running_containers),
                webhook,
            ),
            Request::JobStep { id, name } => self.job_step(&id, &name),
            Request::JobLink { id, interface } => self.job_link(&id, &interface),
            Request::JobEnd {
                id,
                format,
                keep_processes,
            } => self.job_end(&id, format.as_deref(), keep_processes, rb),
            Request::Report {
                id,
                format,
                baseline,
            } => self.report(&id, format.as_deref(), baseline, rb),
            Request::Status => Ok(Response::Status(self.status())),
            Request::Watch { job, after } => self.watch(job.as_deref(), after, rb),
            Request::Unload { force } => self.request_unload(force),
        };
        res.unwrap_or_else(|e| Response::error(format!("{e:#}")))
    }

    /// Why a connection from `peer` (pid, uid) is refused, if it is. The socket's mode keeps
    /// out everyone but root and the configured group; within that, a process inside a job
    /// may not steer the jobs (a job in the group would otherwise end itself, or change its
    /// policy). SO_PEERCRED names the process that called connect(): one that is gone by
    /// now cannot be placed, and is refused — else a job would connect from a child that
    /// hands the socket on and exits (see tests/redteam9.rs). (SO_PEERPIDFD, Linux 6.5,
    /// would also close the window in which that pid could be reused.)
    fn refuse_peer(&self, peer: Option<(u32, u32)>) -> Option<String> {
        let Some((pid, uid)) = peer else {
            return Some("cannot tell who is asking (SO_PEERCRED failed)".into());
        };
        if uid == 0 {
            return None;
        }
        let Some(rel) = cgroup::cgroup_of(pid) else {
            return Some(format!(
                "refused: the process that connected (pid {pid}) is gone, so it cannot be told whether it was inside a job; ask from a process that waits for the answer"
            ));
        };
        self.job_of_cgroup(&rel).map(|job| {
            format!(
                "refused: the asking process (pid {pid}) is inside job {job:?}; jobs cannot use the control socket"
            )
        })
    }

    /// The job whose cgroup holds `pid`, if any.
    fn job_of_pid(&self, pid: u32) -> Option<String> {
        self.job_of_cgroup(&cgroup::cgroup_of(pid)?)
    }

    /// The job whose cgroup is `rel` (as /proc/PID/cgroup names it) or holds it.
    fn job_of_cgroup(&self, rel: &Path) -> Option<String> {
        let abs = self.cg_root.join(rel.strip_prefix("/").unwrap_or(rel));
        self.state
            .jobs
            .iter()
            .find(|j| j.cgroup.as_deref().is_some_and(|c| abs.starts_with(c)))
            .map(|j| j.id.clone())
    }

    fn resolve_cgroup(&self, p: &str) -> Result<PathBuf> {
        let path = Path::new(p);
        let abs = if path.starts_with(&self.cg_root) {
            path.to_path_buf()
        } else {
            self.cg_root.join(path.strip_prefix("/").unwrap_or(path))
        };
        if abs
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            anyhow::bail!("cgroup {p:?}: no '..' in cgroup paths");
        }
        if !abs.join("cgroup.procs").exists() {
            anyhow::bail!(
                "cgroup {p:?} does not exist (looked for {} in the cgroup2 hierarchy at {})",
                abs.display(),
                self.cg_root.display()
            );
        }
        if abs == self.cg_root {
            anyhow::bail!("cgroup {p:?} is the root cgroup: a job is a cgroup below it (use the config's host-policy for the whole host)");
        }
        Ok(abs)
    }

    /// After links or addresses changed: a container link that appeared is claimed by the
    /// job running alone (config `containers = "sole-job"`); with several running, by none.
    fn claim_containers(&mut self) {
        let sole = self.jobs.len() == 1;
        for live in self.jobs.values_mut() {
            if let Some(c) = live.containers.as_mut() {
                c.refresh(&mut self.dp, sole);
            }
        }
    }

    fn job_start(
        &mut self,
        id: &str,
        target: Target,
        spec: PolicySpec,
        (fail_on_block, claim_running): (bool, bool),
        webhook: Option<crate::notify::Webhook>,
    ) -> Result<Response> {
        check_job_id(id).map_err(|e| anyhow::anyhow!(e))?;
        if let Some(w) = &webhook {
            w.check().map_err(|e| anyhow::anyhow!(e))?;
        }
        if self.jobs.contains_key(id) {
            anyhow::bail!("job {id:?} is already running (end it first, or choose another id)");
        }
        if self.jobs.len() >= self.cfg.max_jobs {
            anyhow::bail!(
                "{} jobs are running, the most this daemon takes (config max-jobs)",
                self.jobs.len()
            );
        }
        let policy = spec.build().map_err(anyhow::Error::new)?;
        let compiled = policy.compile()?;
        // The maps hold every job's policy at once: refused before anything changes, with
        // the setting that makes room, and the daemon goes on serving the others.
        let usage = Usage::of(&compiled);
        let in_use = self
            .jobs
            .values()
            .fold(self.host_usage, |sum, l| sum + l.usage);
        self.cfg.capacity().check(in_use + usage, in_use)?;
        // Where the job is, checked before anything changes.
        let mut cgroup_dir = None;
        let mut origin = None;
        let mut ifindex = None;
        match &target {
            Target::Cgroup(p) => {
                let abs = self.resolve_cgroup(p)?;
                self.check_no_overlap(&abs)?;
                self.check_not_delegated(&abs)?;
                cgroup_dir = Some(abs);
            }
            Target::Pid(pid) => {
                let rel = cgroup::cgroup_of(*pid)
                    .ok_or_else(|| anyhow::anyhow!("process {pid} does not exist"))?;
                let from = self.cg_root.join(rel.strip_prefix("/").unwrap_or(&rel));
                if let Some(j) = self.job_of_pid(*pid) {
                    anyhow::bail!("process {pid} is already in job {j:?}");
                }
                origin = Some((*pid, from));
            }
            Target::Interface(name) => {
                let i = nix::net::if_::if_nametoindex(name.as_str()).map_err(|_| {
                    anyhow::anyhow!(
                        "interface {name:?} does not exist in the daemon's network namespace"
                    )
                })?;
                if self
                    .state
                    .jobs
                    .iter()
                    .any(|j| j.ifindex == Some(i) || j.links.iter().any(|(l, _)| *l == i))
                {
                    anyhow::bail!("interface {name:?} is already a job's");
                }
                if i == 1 {
                    anyhow::bail!("interface {name:?} is loopback: an interface job is the host side of a job's veth or tap");
                }
                ifindex = Some(i);
            }
        }
        let slot = self.state.take_slot();
        let job_dir = self.cfg.job_dir(id);
        mkdir(&job_dir, 0o700)?;
        let events = job_dir.join("events.jsonl");
        let _ = std::fs::remove_file(&events);
        let record = JobRecord {
            id: id.to_string(),
            slot,
            target: target.clone(),
            cgroup: cgroup_dir.clone(),
            created_cgroup: false,
            origin: origin.clone(),
            ifindex,
            links: Vec::new(),
            policy: spec,
            step: None,
            events: events.clone(),
            started: now_rfc3339(),
            fail_on_block,
            webhook: webhook.clone(),
        };
        let rec = match self.register(record, &policy, &compiled) {
            Ok(r) => r,
            Err(e) => {
                // Nothing of the job stays behind.
                let _ = self.dp.purge_job(slot);
                self.dp.detach_job_hooks(&slot.to_string());
                return Err(e);
            }
        };
        let mut st = JobState::new(id, mode_name(policy.mode), rec.cgroup.clone())
            .with_limits(self.limits())
            .with_events_file(&events, self.events_max)?;
        st.policy = Some(policy.clone());
        st.exfil = crate::trail::exfil::ExfilDetector::new(policy.dns_exfil);
        st.notify = self.job_webhooks(webhook);
        let what = match &target {
            Target::Cgroup(p) => format!("cgroup:{p}"),
            Target::Pid(p) => format!("pid:{p}"),
            Target::Interface(i) => format!("interface:{i}"),
        };
        self.agent
            .borrow_mut()
            .start_job(slot, st, vec![what], &policy);
        let cgroup_id = rec.cgroup.as_deref().and_then(cgroup_id_of);
        // Containers it starts are its own while it is the only job (config `containers`).
        let containers = match (&target, self.cfg.containers) {
            (Target::Interface(_), _) | (_, super::config::ContainersMode::Off) => None,
            _ => {
                let entry = abi::rf_job::for_policy(slot, &policy);
                // Those running now are its own only when asked, and only if it runs alone.
                let claim = claim_running && self.jobs.is_empty();
                let mut c = if claim {
                    crate::job::containers::ContainerLinks::claiming_running(slot, entry)
                } else {
                    crate::job::containers::ContainerLinks::new(slot, entry, &self.dp)
                };
                c.refresh(&mut self.dp, claim);
                let now = self.cgroup_scan.scan();
                c.refresh_cgroups(&mut self.dp, claim, &now);
                Some(c)
            }
        };
        self.jobs.insert(
            id.to_string(),
            Live {
                slot,
                policy,
                cgroup_id,
                usage,
                containers,
            },
        );
        let resp = Response::JobStarted {
            id: id.to_string(),
            slot,
            cgroup: rec.cgroup.as_ref().map(|c| c.display().to_string()),
            interface: match &target {
                Target::Interface(i) => Some(i.clone()),
                _ => None,
            },
            events: events.display().to_string(),
        };
        self.state.jobs.push(rec);
        self.save_state();
        tracing::info!(job = id, slot, target = ?target, "job started");
        Ok(resp)
    }

    /// cgroup v2 lets a process move to another cgroup when it may write that cgroup's
    /// cgroup.procs and the common ancestor's. Inside a subtree delegated to a user (systemd
    /// `Delegate=yes`, a user's own slice) that user may do both: a job there would move
    /// itself into a sibling it creates and be no job's. So every ancestor of a job's cgroup
    /// below the root must be root's alone (the job's own cgroup may be delegated: what its
    /// processes make inside it is still the job).
    fn check_not_delegated(&self, abs: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut dir = abs.parent();
        while let Some(d) = dir {
            if d == self.cg_root || !d.starts_with(&self.cg_root) {
                break;
            }
            for p in [d.to_path_buf(), d.join("cgroup.procs")] {
                let m =
                    std::fs::metadata(&p).with_context(|| format!("looking at {}", p.display()))?;
                if m.uid() != 0 || m.mode() & 0o022 != 0 {
                    anyhow::bail!(
                        "cgroup {}: its ancestor {} may be changed by others than root (owner uid {}, mode {:o}; a delegated subtree): the job's processes could move themselves out of the job. Use a cgroup whose ancestors only root may change, or the delegated subtree's own root",
                        abs.display(),
                        p.display(),
                        m.uid(),
                        m.mode() & 0o7777
                    );
                }
            }
            dir = d.parent();
        }
        Ok(())
    }

    fn check_no_overlap(&self, abs: &Path) -> Result<()> {
        for j in &self.state.jobs {
            if let Some(c) = &j.cgroup {
                if abs.starts_with(c) || c.starts_with(abs) {
                    anyhow::bail!(
                        "cgroup {} overlaps job {:?}'s cgroup {}: jobs do not nest",
                        abs.display(),
                        j.id,
                        c.display()
                    );
                }
            }
        }
        Ok(())
    }

    /// Puts a job into the kernel: policy first, then its cgroup programs, then the job
    /// entry (from which moment its packets are judged), then — for a pid job — the
    /// process. Undone by the caller on error.
    fn register(
        &mut self,
        mut r: JobRecord,
        policy: &Policy,
        compiled: &crate::policy::Compiled,
    ) -> Result<JobRecord> {
        self.dp
            .install_policy(r.slot, compiled, &policy.dns_resolvers)?;
        let entry = abi::rf_job::for_policy(r.slot, policy);
        if let Some((pid, _)) = &r.origin {
            let dir = self.cg_root.join("ringfence").join("jobs").join(&r.id);
            match std::fs::create_dir_all(&dir) {
                Ok(()) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating the job's cgroup {}", dir.display()))
                }
            }
            r.cgroup = Some(dir.clone());
            r.created_cgroup = true;
            let undo = |dir: &Path| {
                let _ = std::fs::remove_dir(dir);
            };
            if let Err(e) = self.dp.attach_job_hooks(&r.slot.to_string(), &dir) {
                undo(&dir);
                return Err(e.into());
            }
            let (id, level) = cgroup_id_level(&self.cg_root, &dir)?;
            if let Err(e) = self.dp.add_job(id, level, entry) {
                undo(&dir);
                return Err(e.into());
            }
            if let Err(e) = std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
                let _ = self.dp.remove_job(id);
                self.dp.detach_job_hooks(&r.slot.to_string());
                undo(&dir);
                anyhow::bail!("moving process {pid} into the job's cgroup: {e}");
            }
        } else if let Some(dir) = r.cgroup.clone() {
            self.dp.attach_job_hooks(&r.slot.to_string(), &dir)?;
            let (id, level) = cgroup_id_level(&self.cg_root, &dir)?;
            self.dp.add_job(id, level, entry)?;
        } else if let Some(i) = r.ifindex {
            let Target::Interface(name) = &r.target else {
                unreachable!("an ifindex comes from an interface target")
            };
            self.dp.attach(name)?;
            // An --interface is the host side of the job's veth or tap: its packets come in
            // there and are judged there.
            self.dp.add_interface_job(i, entry.host_side())?;
        }
        Ok(r)
    }

    /// The host's webhooks, and the job's own (its sender thread starts here).
    fn job_webhooks(&self, own: Option<crate::notify::Webhook>) -> Vec<crate::notify::Sink> {
        let mut v = self.webhooks.clone();
        if let Some(w) = own {
            match crate::notify::Sink::start(w) {
                Ok(s) => v.push(s),
                Err(e) => tracing::warn!("starting a job's webhook sender: {e}"),
            }
        }
        v
    }

    /// `job link`: the host side of a veth or tap (a pod's, whose processes are the job's
    /// cgroup but send from a network namespace of their own) becomes the job's link, as a
    /// container link it claimed would. Asking again for the same link is no change.
    fn job_link(&mut self, id: &str, ifname: &str) -> Result<Response> {
        let live = self.jobs.get(id).ok_or_else(|| unknown_job(id))?;
        let entry = abi::rf_job::for_policy(live.slot, &live.policy);
        let i = nix::net::if_::if_nametoindex(ifname).map_err(|_| {
            anyhow::anyhow!("interface {ifname:?} does not exist in the daemon's network namespace")
        })?;
        if i == 1 {
            anyhow::bail!(
                "interface {ifname:?} is loopback: a job's link is the host side of a veth or tap"
            );
        }
        for j in self.state.jobs.iter_mut() {
            // A link whose device went (its pod did) while its job runs is not held against
            // a new device that got the same index.
            j.links.retain(|l| still_there(l) || l.0 != i);
            if j.ifindex == Some(i) || j.links.iter().any(|(l, _)| *l == i) {
                if j.id == id {
                    return Ok(Response::Ok {
                        message: Some(format!("interface {ifname} is already job {id}'s link")),
                    });
                }
                anyhow::bail!("interface {ifname:?} is already job {:?}'s", j.id);
            }
        }
        // A link some job claimed as its container's (it was running alone when the link
        // appeared) is given to the job named now: the caller knows whose it is.
        for (other, l) in self.jobs.iter_mut() {
            if let Some(c) = l.containers.as_mut() {
                if other != id && c.give_up(i) {
                    tracing::warn!(
                        ifname,
                        job = other,
                        "a link claimed as this job's container is job {id}'s"
                    );
                }
            }
        }
        self.dp.attach(ifname)?;
        self.dp.add_interface_job(i, entry.host_side())?;
        if let Some(r) = self.state.jobs.iter_mut().find(|j| j.id == id) {
            r.links.push((i, ifname.to_string()));
        }
        self.save_state();
        tracing::info!(job = id, ifname, ifindex = i, "interface linked to the job");
        Ok(Response::Ok {
            message: Some(format!("interface {ifname} linked to job {id}")),
        })
    }

    fn job_step(&mut self, id: &str, name: &str) -> Result<Response> {
        if name.is_empty() || name.len() > 128 {
            anyhow::bail!("a step name is 1 to 128 bytes (it is repeated in every event)");
        }
        let live = self.jobs.get(id).ok_or_else(|| unknown_job(id))?;
        self.agent.borrow_mut().step(live.slot, name);
        if let Some(r) = self.state.jobs.iter_mut().find(|j| j.id == id) {
            r.step = Some(name.to_string());
        }
        self.save_state();
        Ok(Response::Ok { message: None })
    }

    fn render(&mut self, slot: u32, format: Option<&str>) -> Result<String> {
        let f: Format = format.unwrap_or("text").parse()?;
        let counters = self.counters();
        let mut a = self.agent.borrow_mut();
        a.close_report(slot, &counters);
        let job = a
            .jobs
            .get_mut(&slot)
            .ok_or_else(|| anyhow::anyhow!("job slot {slot} has no trail"))?;
        let cuts = job.cuts();
        job.report.set_cuts(cuts);
        for w in &self.watch_failed {
            job.report.warn(format!(
                "ptrace of processes outside the job was not watched ({w})"
            ));
        }
        Ok(job.report.render(f))
    }

    fn report(
        &mut self,
        id: &str,
        format: Option<&str>,
        baseline: Option<crate::trail::baseline::Baseline>,
        rb: &libbpf_rs::RingBuffer,
    ) -> Result<Response> {
        let slot = self.jobs.get(id).ok_or_else(|| unknown_job(id))?.slot;
        let _ = rb.consume();
        self.agent.borrow_mut().apply(&self.dp);
        // A report is a snapshot: it is rendered from a copy, so warnings are not repeated
        // in the next one.
        let text = {
            let f: Format = format.unwrap_or("text").parse()?;
            let counters = self.counters();
            let mut a = self.agent.borrow_mut();
            let j = a.jobs.get_mut(&slot).ok_or_else(|| unknown_job(id))?;
            let saved = j.report.clone();
            let cuts = j.cuts();
            j.report.set_cuts(cuts);
            if let Some(b) = baseline {
                j.report.set_baseline(std::sync::Arc::new(b));
            }
            drop(a);
            self.agent.borrow_mut().close_report(slot, &counters);
            let mut a = self.agent.borrow_mut();
            let j = a.jobs.get_mut(&slot).expect("present");
            let text = j.report.render(f);
            j.report = saved;
            text
        };
        Ok(Response::Report {
            text,
            blocked: None,
        })
    }

    fn job_end(
        &mut self,
        id: &str,
        format: Option<&str>,
        keep_processes: bool,
        rb: &libbpf_rs::RingBuffer,
    ) -> Result<Response> {
        let live = self.jobs.get_mut(id).ok_or_else(|| unknown_job(id))?;
        let slot = live.slot;
        let cgroup_id = live.cgroup_id;
        let containers = live.containers.take();
        let _ = format.unwrap_or("text").parse::<Format>()?;
        let rec = self
            .state
            .jobs
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or_else(|| unknown_job(id))?;
        // A pid job: its process goes back where it came from, whatever else it started
        // ends with the job (a job's daemons do not outlive it).
        if rec.created_cgroup {
            if let Some(dir) = &rec.cgroup {
                if let Some((pid, from)) = &rec.origin {
                    let back = if from.join("cgroup.procs").exists() {
                        from.clone()
                    } else {
                        self.cg_root.clone()
                    };
                    let mine =
                        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    if mine.lines().any(|l| l.trim() == pid.to_string()) {
                        if let Err(e) = std::fs::write(back.join("cgroup.procs"), pid.to_string()) {
                            tracing::warn!(
                                job = id,
                                "moving process {pid} back to {}: {e}",
                                back.display()
                            );
                        }
                    }
                }
                let cg = crate::job::cgroup::JobCgroup::adopt(dir);
                cg.kill_all();
                std::mem::forget(cg);
            }
        } else if let (Some(dir), false) = (&rec.cgroup, keep_processes) {
            // A --cgroup job: the operator named the cgroup as the job, so what is still in
            // it is the job's (a double-forked background process, say). It ends with the
            // job rather than going on unjudged. The cgroup itself is the operator's.
            let cg = crate::job::cgroup::JobCgroup::adopt(dir);
            cg.kill_all();
            std::mem::forget(cg);
        }
        // Whatever the job's last packets produced is read before its trail closes.
        let _ = rb.consume();
        self.agent.borrow_mut().apply(&self.dp);
        let text = self.render(slot, format)?;
        let blocked = rec.fail_on_block.then(|| {
            let a = self.agent.borrow();
            a.jobs
                .get(&slot)
                .map(|j| j.report.blocked_calls())
                .unwrap_or_default()
        });
        // The insights page goes beside the events whatever format was asked for: a CI
        // artifact to open later.
        let page = if format == Some("html") {
            None
        } else {
            self.render(slot, Some("html")).ok()
        };
        self.agent.borrow_mut().finish_job(slot);
        // Then the kernel forgets it: its packets are no longer its own, its entries go.
        if let Some(cid) = cgroup_id {
            let _ = self.dp.remove_job(cid);
        }
        for i in rec.ifindex.iter().chain(rec.links.iter().map(|(l, _)| l)) {
            let _ = self.dp.remove_interface_job(*i);
        }
        if let Some(mut c) = containers {
            // Its containers end with it, as its processes do (not with --keep-processes).
            if !keep_processes {
                c.kill_containers();
            }
            c.release(&mut self.dp);
        }
        self.dp.detach_job_hooks(&slot.to_string());
        let purged = self.dp.purge_job(slot).unwrap_or(0);
        if rec.created_cgroup {
            if let Some(dir) = &rec.cgroup {
                if let Err(e) = std::fs::remove_dir(dir) {
                    tracing::warn!(job = id, "removing the job's cgroup {}: {e}", dir.display());
                }
            }
        }
        self.agent.borrow_mut().remove_job(slot);
        self.trim_due = true;
        self.jobs.remove(id);
        self.state.jobs.retain(|j| j.id != id);
        self.save_state();
        let ext = match format.unwrap_or("text") {
            "json" => "json",
            "markdown" => "md",
            "html" => "html",
            _ => "txt",
        };
        let _ = std::fs::write(self.cfg.job_dir(id).join(format!("report.{ext}")), &text);
        if let Some(page) = page {
            let _ = std::fs::write(self.cfg.job_dir(id).join("report.html"), page);
        }
        tracing::info!(job = id, slot, purged, "job ended");
        Ok(Response::Report { text, blocked })
    }

    fn status(&self) -> serde_json::Value {
        let values = self.counters();
        let counters: serde_json::Map<String, serde_json::Value> = COUNTER_NAMES
            .iter()
            .map(|(c, n)| (n.to_string(), values[c.0 as usize].into()))
            .collect();
        let a = self.agent.borrow();
        let mut jobs: Vec<serde_json::Value> = self
            .state
            .jobs
            .iter()
            .map(|r| {
                let live = &self.jobs[&r.id];
                let (flows, allowed, blocked, audited) = a
                    .jobs
                    .get(&r.slot)
                    .map(|j| j.report.totals())
                    .unwrap_or_default();
                serde_json::json!({
                    "id": r.id,
                    "slot": r.slot,
                    "mode": mode_name(live.policy.mode),
                    "target": r.target,
                    "cgroup": r.cgroup,
                    "links": r.links.iter().map(|(_, n)| n).collect::<Vec<_>>(),
                    "step": r.step,
                    "started": r.started,
                    "events": r.events,
                    "flows": flows,
                    "allowed": allowed,
                    "blocked": blocked,
                    "audited": audited,
                })
            })
            .collect();
        jobs.sort_by_key(|j| j["slot"].as_u64());
        let maps: Vec<serde_json::Value> = self
            .dp
            .map_fill()
            .into_iter()
            .map(|(n, e, c)| serde_json::json!({"map": n, "entries": e, "capacity": c}))
            .collect();
        let k = self.dp.kernel();
        serde_json::json!({
            "kernel": k.release,
            "attach": self.dp.attach_kind().name(),
            "bpffs": self.cfg.bpffs,
            "socket": self.cfg.socket,
            "adopted": self.dp.adopted(),
            "uptime_s": self.started.elapsed().as_secs(),
            "host_policy": self.cfg.host_policy,
            "jobs": jobs,
            "counters": counters,
            "maps": maps,
            "decode_errors": a.decode_errors,
            "process_watch": self.watch_failed.is_empty(),
        })
    }

    fn request_unload(&mut self, force: bool) -> Result<Response> {
        if !self.jobs.is_empty() && !force {
            let ids: Vec<&String> = self.jobs.keys().collect();
            anyhow::bail!(
                "{} jobs are running ({ids:?}): unloading stops enforcing them. End them first, or unload --force",
                ids.len()
            );
        }
        self.unload = true;
        Ok(Response::Ok {
            message: Some("unloading: every program is detached and every pin removed".into()),
        })
    }

    /// After `unload`: jobs' trails closed, every program detached, every pin and the
    /// state removed.
    fn take_down(&mut self) -> Result<i32> {
        let slots: Vec<u32> = self.jobs.values().map(|l| l.slot).collect();
        for s in slots {
            self.agent.borrow_mut().finish_job(s);
        }
        for r in &self.state.jobs {
            if r.created_cgroup {
                if let (Some(dir), Some((pid, from))) = (&r.cgroup, &r.origin) {
                    let _ = std::fs::write(from.join("cgroup.procs"), pid.to_string());
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
        self.dp.unload()?;
        let _ = std::fs::remove_file(self.cfg.state_file());
        tracing::info!("unloaded: nothing of ringfence is left in the kernel");
        Ok(0)
    }
}

/// A job an earlier daemon left: its entries are written again (the same values: a no-op
/// for the kernel), its cgroup links taken over in place, its trail reopened.
fn readopt(
    dp: &mut Dataplane,
    agent: &mut Agent,
    r: &JobRecord,
    events_max: u64,
    notify: Vec<crate::notify::Sink>,
    containers: super::config::ContainersMode,
) -> Result<Live> {
    let policy = r.policy.build().map_err(anyhow::Error::new)?;
    let compiled = policy.compile()?;
    dp.install_policy(r.slot, &compiled, &policy.dns_resolvers)?;
    let entry = abi::rf_job::for_policy(r.slot, &policy);
    let mut cgroup_id = None;
    if let Some(dir) = &r.cgroup {
        if !dir.join("cgroup.procs").exists() {
            anyhow::bail!("its cgroup {} is gone", dir.display());
        }
        let root = cgroup::find_cgroup2()?;
        // The job entry (and with it the programs' cgroup levels) before the cgroup links
        // move to this daemon's programs: they never run without knowing the job.
        let (id, level) = cgroup_id_level(&root, dir)?;
        dp.add_job(id, level, entry)?;
        dp.attach_job_hooks(&r.slot.to_string(), dir)?;
        cgroup_id = Some(id);
        // Its `job link`s, where the same interface is still there (a pod's veth goes with
        // the pod; an index reused by another device is not the job's).
        for l @ (i, name) in &r.links {
            if still_there(l) && dp.attach(name).is_ok() {
                dp.add_interface_job(*i, entry.host_side())?;
            } else {
                let _ = dp.remove_interface_job(*i);
            }
        }
    } else if let (Some(i), Target::Interface(name)) = (r.ifindex, &r.target) {
        dp.attach(name)?;
        dp.add_interface_job(i, entry.host_side())?;
    }
    let mut st = JobState::new(&r.id, mode_name(policy.mode), r.cgroup.clone()).with_limits(
        crate::trail::limits::Limits {
            events_max_bytes: events_max,
            ..Default::default()
        },
    );
    // The report so far, from the trail the last daemon wrote.
    if let Ok(f) = std::fs::File::open(&r.events) {
        match read_events(io::BufReader::new(f)) {
            Ok(evs) => evs.iter().for_each(|e| st.report.add(e)),
            Err(e) => tracing::warn!(job = r.id, "reading back {}: {e}", r.events.display()),
        }
    }
    let mut st = st.with_events_file(&r.events, events_max)?;
    st.step = r.step.clone();
    st.policy = Some(policy.clone());
    st.exfil = crate::trail::exfil::ExfilDetector::new(policy.dns_exfil);
    st.notify = notify;
    agent.adopt_job(r.slot, st);
    tracing::info!(job = r.id, slot = r.slot, "job taken over");
    // Links it claimed before the restart stay claimed in the pinned maps (and go with
    // its slot at job end); from here on it claims new ones as before.
    let containers = (r.ifindex.is_none() && containers != super::config::ContainersMode::Off)
        .then(|| crate::job::containers::ContainerLinks::new(r.slot, entry, dp));
    Ok(Live {
        slot: r.slot,
        policy,
        cgroup_id,
        usage: Usage::of(&compiled),
        containers,
    })
}

/// The counters `status` shows, named (values from the skeleton's enum).
const COUNTER_NAMES: &[(abi::rf_counter, &str)] = {
    use abi::rf_counter as c;
    &[
        (c::RF_CNT_NEW_FLOWS, "new_flows"),
        (c::RF_CNT_ALLOWED, "allowed"),
        (c::RF_CNT_BLOCKED, "blocked"),
        (c::RF_CNT_AUDITED, "audited"),
        (c::RF_CNT_DNS_QUERIES, "dns_queries"),
        (c::RF_CNT_DNS_ANSWERS, "dns_answers"),
        (c::RF_CNT_DNS_BOUND, "dns_bound"),
        (c::RF_CNT_DNS_REFUSED, "dns_refused"),
        (c::RF_CNT_DNS_MALFORMED, "dns_malformed"),
        (c::RF_CNT_DNS_UNMATCHED, "dns_unmatched"),
        (c::RF_CNT_DNS_FRAGMENT, "dns_fragment"),
        (c::RF_CNT_DNS_TOO_BIG, "dns_too_big"),
        (c::RF_CNT_DNS_TCP_SPLIT, "dns_tcp_split"),
        (c::RF_CNT_DNS_OVERFLOW, "dns_overflow"),
        (c::RF_CNT_DNS_UNJUDGED, "dns_unjudged"),
        (c::RF_CNT_DNS_SPECIAL, "dns_special"),
        (c::RF_CNT_UNPARSED, "unparsed"),
        (c::RF_CNT_INBOUND, "inbound"),
        (c::RF_CNT_TRIE_FULL, "trie_full"),
        (c::RF_CNT_RINGBUF_DROP, "ringbuf_drop"),
    ]
};

/// Whether a `job link`ed interface (index, name) is still the same device.
fn still_there((i, name): &(u32, String)) -> bool {
    nix::net::if_::if_indextoname(*i).is_ok_and(|n| n.to_string_lossy() == name.as_str())
}

fn unknown_job(id: &str) -> anyhow::Error {
    anyhow::anyhow!("no job {id:?} is running")
}

fn cgroup_id_of(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// A cgroup's id (its inode) and level below the root (bpf_skb_ancestor_cgroup_id's).
fn cgroup_id_level(root: &Path, dir: &Path) -> Result<(u64, u32)> {
    let id =
        cgroup_id_of(dir).ok_or_else(|| anyhow::anyhow!("cgroup {} is gone", dir.display()))?;
    let level = dir
        .strip_prefix(root)
        .map(|p| p.components().count() as u32)
        .map_err(|_| {
            anyhow::anyhow!(
                "{} is not below the cgroup2 root {}",
                dir.display(),
                root.display()
            )
        })?;
    Ok((id, level))
}

fn line(r: &Response) -> String {
    let mut s = serde_json::to_string(r)
        .unwrap_or_else(|_| r#"{"error":{"error":"unserializable"}}"#.into());
    s.push('\n');
    s
}

/// (pid, uid) of the peer.
fn peer_of(s: &UnixStream) -> Option<(u32, u32)> {
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(s.as_raw_fd()) };
    let c = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some((c.pid() as u32, c.uid()))
}

/// sd_notify READY=1 when started by systemd with Type=notify (NOTIFY_SOCKET set).
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let p = PathBuf::from(&path);
    let r = if let Some(abs) = path.to_str().and_then(|s| s.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &p)
    };
    if let Err(e) = r {
        tracing::warn!("telling systemd the daemon is ready: {e}");
    }
}
