//! The agent: turns what the kernel reports into the audit trail, and keeps learned state
//! honest. One thread, one mio loop: the ring buffer's epoll fd, signals, the job's pidfd
//! and the expiry timer all wake the same `poll`, so nothing needs a lock.
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::abi;
use crate::dataplane::Dataplane;
use crate::dns;
use crate::events::{
    boottime_to_system, DnsEvent, Event, FindingEvent, FlowEvent, JsonLinesWriter, Proto, Reason,
    Verdict,
};
use crate::exfil::{ExfilDetector, Thresholds};
use crate::report::Report;

/// How long a learned address outlives its TTL while a flow to it was seen recently.
/// (Live flows do not need the trie at all — their verdict is cached in the flow table —
/// this only keeps a just-used address for the flow's next connection.)
const FLOW_IDLE_NS: u64 = 60_000_000_000;

/// One job as the agent knows it.
pub struct JobState {
    pub name: String,
    pub step: Option<String>,
    /// The job's cgroup directory.
    pub cgroup: Option<PathBuf>,
    pub report: Report,
    /// For answers bound from userspace (TCP answers split across segments).
    pub policy: Option<crate::policy::Policy>,
    /// DNS exfiltration signals over every query name of the job.
    pub exfil: ExfilDetector,
    /// Address -> the question name whose answer produced it (for naming flows).
    /// One shared string per answer, not one per address: a job can learn a million.
    names: HashMap<IpAddr, std::sync::Arc<str>>,
}

/// A TCP DNS answer being put back together from the segments the kernel copied.
struct Stream {
    job_id: u32,
    base_seq: u32,
    buf: Vec<u8>,
    filled: Vec<bool>,
    got: usize,
}

/// Map work found while handling ring-buffer records, done when the dataplane is at hand.
enum Pending {
    Bind {
        job_id: u32,
        addrs: Vec<(IpAddr, u32)>,
        ports: crate::policy::PortSet,
        ts_ns: u64,
    },
    ForgetStream(IpAddr, u16),
}

impl JobState {
    /// A flow event of this job: `who` is what the kernel said of the sender (boot-time
    /// stamp, pid, comm, cgroup), `to` the destination and the name behind it.
    fn flow(
        &self,
        who: (u64, u32, &[i8; 16], u64),
        proto: Proto,
        to: (IpAddr, u16, Option<String>),
        verdict: Verdict,
        reason: Reason,
    ) -> FlowEvent {
        let (ts_ns, pid, comm, cgroup) = who;
        let (pid, comm) = self.attribute(pid, abi::comm_to_string(comm));
        let (dst, port, domain) = to;
        FlowEvent {
            ts: boottime_to_system(ts_ns),
            job: self.name.clone(),
            step: self.step.clone(),
            pid,
            comm,
            cgroup,
            proto,
            dst,
            port,
            domain,
            verdict,
            reason,
            direction: Default::default(),
        }
    }

    /// The ports the job's policy allows for addresses of `name` (none without a policy).
    fn ports_for(&self, name: &str) -> crate::policy::PortSet {
        self.policy
            .as_ref()
            .map(|p| p.ports_for(name))
            .unwrap_or(crate::policy::PortSet::None)
    }

    /// The kernel keeps a pid only when the sending task was in the socket's cgroup (see
    /// emit_flow in bpf/ringfence.bpf.c), so no /proc lookup is needed here.
    fn attribute(&self, pid: u32, comm: String) -> (u32, String) {
        if pid == 0 {
            (0, String::new())
        } else {
            (pid, comm)
        }
    }

    pub fn new(name: &str, mode: &str, cgroup: Option<PathBuf>) -> JobState {
        JobState {
            name: name.to_string(),
            step: None,
            cgroup,
            report: Report::new(name, mode),
            policy: None,
            exfil: ExfilDetector::new(Thresholds::default()),
            names: HashMap::new(),
        }
    }
}

pub struct Agent {
    pub jobs: HashMap<u32, JobState>,
    sink: Option<JsonLinesWriter<io::BufWriter<std::fs::File>>>,
    /// (deadline in CLOCK_BOOTTIME ns, job, address) of learned addresses to re-check.
    expiry: BinaryHeap<Reverse<(u64, u32, IpAddr)>>,
    min_ttl_ns: u64,
    grace_ns: u64,
    pub decode_errors: u64,
    pub expired: u64,
    /// Addresses bound from userspace, late (their answer was split across TCP segments).
    pub bound_late: u64,
    streams: HashMap<(IpAddr, u16), Stream>,
    pending: Vec<Pending>,
}

pub fn boottime_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

fn rcode_name(r: u16) -> String {
    match r {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

fn qtype_name(t: u16) -> String {
    match t {
        1 => "A".into(),
        28 => "AAAA".into(),
        5 => "CNAME".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        33 => "SRV".into(),
        65 => "HTTPS".into(),
        n => format!("TYPE{n}"),
    }
}

impl Agent {
    pub fn new(
        events_file: Option<&std::path::Path>,
        min_ttl: Duration,
        grace: Duration,
    ) -> Result<Agent> {
        let sink = match events_file {
            Some(p) => Some(
                JsonLinesWriter::create(p)
                    .with_context(|| format!("creating the events file {}", p.display()))?,
            ),
            None => None,
        };
        Ok(Agent {
            jobs: HashMap::new(),
            sink,
            expiry: BinaryHeap::new(),
            min_ttl_ns: min_ttl.as_nanos() as u64,
            grace_ns: grace.as_nanos() as u64,
            decode_errors: 0,
            expired: 0,
            bound_late: 0,
            streams: HashMap::new(),
            pending: Vec::new(),
        })
    }

    fn emit(&mut self, job_id: u32, ev: Event) {
        if let Some(w) = self.sink.as_mut() {
            if let Err(e) = w.write(&ev) {
                tracing::error!("writing the events file: {e}");
            }
        }
        if let Some(j) = self.jobs.get_mut(&job_id) {
            j.report.add(&ev);
        }
    }

    /// One ring buffer record.
    pub fn handle(&mut self, data: &[u8]) {
        let Some(hdr) = abi::from_bytes::<abi::rf_event_hdr>(data) else {
            self.decode_errors += 1;
            return;
        };
        match abi::rf_event_type(hdr.r#type) {
            abi::rf_event_type::RF_EVENT_FLOW => {
                match abi::from_bytes::<abi::rf_flow_event>(data) {
                    Some(ev) => self.on_flow(&ev),
                    None => self.decode_errors += 1,
                }
            }
            abi::rf_event_type::RF_EVENT_DNS => {
                let n = std::mem::size_of::<abi::rf_dns_event>();
                match abi::from_bytes::<abi::rf_dns_event>(data) {
                    Some(ev) if data.len() >= n + ev.len as usize => {
                        self.on_dns(&ev, &data[n..n + ev.len as usize])
                    }
                    _ => self.decode_errors += 1,
                }
            }
            _ => self.decode_errors += 1,
        }
    }

    fn on_flow(&mut self, ev: &abi::rf_flow_event) {
        let Some(job) = self.jobs.get(&ev.hdr.job_id) else {
            return;
        };
        let dst = abi::addr_from_bytes(ev.daddr);
        let domain = job.names.get(&dst).map(|n| n.to_string());
        let mut reason = Reason::try_from(ev.reason).unwrap_or(Reason::DirectIp);
        // In block mode the kernel does not keep addresses of names it will not allow, so
        // it can only say "direct-ip"; the agent saw the answer and knows better.
        if reason == Reason::DirectIp && domain.is_some() {
            reason = Reason::NotAllowed;
        }
        let direction = crate::events::Direction::from_abi(ev.direction);
        // An inbound connection is named by its peer and the job's port it reached.
        let port = if direction.is_outbound() {
            ev.dport
        } else {
            ev.sport
        };
        let flow = job.flow(
            (ev.hdr.ts_ns, ev.pid, &ev.comm, ev.cgroup_id),
            Proto::from(ev.proto),
            (dst, port, domain),
            Verdict::try_from(ev.verdict).unwrap_or(Verdict::Blocked),
            reason,
        );
        let flow = FlowEvent { direction, ..flow };
        self.emit(ev.hdr.job_id, Event::Flow(flow));
    }

    /// One raw segment of a TCP DNS answer the kernel could not parse whole. When every
    /// byte of the message is there, it is parsed here and, if its name is allowed, bound.
    fn on_segment(&mut self, ev: &abi::rf_dns_event, data: &[u8]) {
        let server = abi::addr_from_bytes(ev.server);
        let key = (server, ev.client_port);
        if ev.flags & abi::DNS_TCP_FIRST != 0 && data.len() >= 2 {
            let total = 2 + usize::from(u16::from_be_bytes([data[0], data[1]]));
            self.streams.insert(
                key,
                Stream {
                    job_id: ev.hdr.job_id,
                    base_seq: ev.seq,
                    buf: vec![0; total],
                    filled: vec![false; total],
                    got: 0,
                },
            );
        }
        let Some(st) = self.streams.get_mut(&key) else {
            return;
        };
        let off = ev.seq.wrapping_sub(st.base_seq) as usize;
        for (i, b) in data.iter().enumerate() {
            let at = off.saturating_add(i);
            if at >= st.buf.len() {
                break;
            }
            if !st.filled[at] {
                st.filled[at] = true;
                st.buf[at] = *b;
                st.got += 1;
            }
        }
        if st.got < st.buf.len() {
            return;
        }
        let st = self.streams.remove(&key).expect("present");
        self.pending
            .push(Pending::ForgetStream(server, ev.client_port));
        let Ok(msg) = dns::parse(&st.buf[2..]) else {
            self.decode_errors += 1;
            return;
        };
        let Some(job) = self.jobs.get(&st.job_id) else {
            return;
        };
        let Some(q) = msg.question.as_ref() else {
            return;
        };
        let ports = job.ports_for(&q.name);
        let addrs = msg.addresses();
        let allowed = !matches!(ports, crate::policy::PortSet::None) && msg.rcode == 0;
        if allowed && !addrs.is_empty() {
            tracing::info!(
                job = job.name,
                name = q.name,
                n = addrs.len(),
                "TCP answer split across segments: bound by the agent (late)"
            );
            self.pending.push(Pending::Bind {
                job_id: st.job_id,
                addrs: addrs.clone(),
                ports,
                ts_ns: ev.hdr.ts_ns,
            });
        }
        // The trail gets the answer like any other.
        let mut copy = *ev;
        copy.flags = abi::DNS_TCP | abi::DNS_TCP_SPLIT | if allowed { abi::DNS_ALLOWED } else { 0 };
        copy.bound = if allowed { addrs.len() as u16 } else { 0 };
        self.on_dns_message(&copy, msg);
    }

    /// Does what handling records found to do to the maps: late binds, finished streams.
    pub fn apply(&mut self, dp: &Dataplane) {
        for p in std::mem::take(&mut self.pending) {
            match p {
                Pending::Bind {
                    job_id,
                    addrs,
                    ports,
                    ts_ns,
                } => {
                    for (a, ttl) in addrs {
                        let life = (u64::from(ttl) * 1_000_000_000).max(self.min_ttl_ns);
                        let exp = ts_ns + life + self.grace_ns;
                        match dp.bind_learned(job_id, a, &ports, exp) {
                            Ok(true) => {
                                self.bound_late += 1;
                                self.expiry.push(Reverse((exp, job_id, a)));
                            }
                            // A special address (reported as dns-rebinding with its answer).
                            Ok(false) => {}
                            Err(e) => tracing::warn!("binding {a} from a split TCP answer: {e}"),
                        }
                    }
                }
                Pending::ForgetStream(server, port) => {
                    if let Err(e) = dp.forget_tcp_stream(server, port) {
                        tracing::warn!("{e}");
                    }
                }
            }
        }
    }

    fn on_dns(&mut self, ev: &abi::rf_dns_event, payload: &[u8]) {
        if ev.flags & abi::DNS_TCP_SEGMENT != 0 {
            self.on_segment(ev, payload);
            return;
        }
        let msg = match dns::parse(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("DNS copy the agent cannot parse: {e}");
                self.decode_errors += 1;
                return;
            }
        };
        self.on_dns_message(ev, msg);
    }

    fn on_dns_message(&mut self, ev: &abi::rf_dns_event, msg: dns::DnsMessage) {
        let job_id = ev.hdr.job_id;
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let Some(q) = msg.question.as_ref() else {
            return;
        };
        // Every name the job looks up reaches here once or twice (the query copy of a name
        // the policy does not allow, and any answer): the detector counts a lookup once.
        let ts = boottime_to_system(ev.hdr.ts_ns);
        let findings: Vec<Event> = (job.exfil.observe(&q.name).iter())
            .map(|f| Event::Finding(FindingEvent::new(f, ts, &job.name, job.step.as_deref())))
            .collect();
        if ev.flags & abi::DNS_QUERY != 0 {
            // A query for a name the policy does not allow: refused in the kernel (block
            // mode) or let through and reported (audit mode). Either way it is a finding.
            let verdict = if ev.flags & abi::DNS_REFUSED != 0 {
                Verdict::Blocked
            } else {
                Verdict::Audited
            };
            let flow = job.flow(
                (ev.hdr.ts_ns, ev.pid, &ev.comm, ev.cgroup_id),
                Proto::Udp,
                (abi::addr_from_bytes(ev.server), 53, Some(q.name.clone())),
                verdict,
                Reason::DnsQuery,
            );
            self.emit(job_id, Event::Flow(flow));
            findings.into_iter().for_each(|f| self.emit(job_id, f));
            return;
        }
        let addrs = msg.addresses();
        // Special addresses (loopback, link-local, metadata…) are never bound from an
        // answer; an answer that names them is a DNS rebinding attempt, and a finding.
        let special: Vec<IpAddr> = addrs
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| crate::policy::is_special(*a))
            .collect();
        let mut findings = findings;
        if !special.is_empty() {
            tracing::warn!(job = job.name, name = q.name, addrs = ?special, "DNS answer names special addresses: not bound (dns-rebinding)");
            if let Some(f) = job.exfil.rebinding(&q.name, &special) {
                findings.push(Event::Finding(FindingEvent::new(
                    &f,
                    ts,
                    &job.name,
                    job.step.as_deref(),
                )));
            }
        }
        let name: std::sync::Arc<str> = q.name.as_str().into();
        for (a, _) in &addrs {
            job.names.insert(*a, name.clone());
        }
        let mut answers: Vec<String> = msg.cname_chain().into_iter().skip(1).collect();
        answers.extend(addrs.iter().map(|(a, _)| a.to_string()));
        let bound = ev.flags & abi::DNS_ALLOWED != 0 && ev.bound > 0;
        let dns_ev = DnsEvent {
            ts: boottime_to_system(ev.hdr.ts_ns),
            job: job.name.clone(),
            step: job.step.clone(),
            name: q.name.clone(),
            qtype: qtype_name(q.qtype),
            answers,
            ttl: msg.min_ttl().unwrap_or(0),
            server: abi::addr_from_bytes(ev.server),
            rcode: rcode_name(msg.rcode),
            bound,
        };
        // The kernel binds the first RF_DNS_ADDRS_MAX addresses of an answer; the rest are
        // in the copy, and bound here (late: a connection to one may wait a retransmit).
        if ev.flags & abi::DNS_OVERFLOW != 0 && ev.flags & abi::DNS_ALLOWED != 0 {
            let ports = job.ports_for(&q.name);
            let rest: Vec<(IpAddr, u32)> = addrs.iter().skip(abi::DNS_ADDRS_MAX).copied().collect();
            if !rest.is_empty() && !matches!(ports, crate::policy::PortSet::None) {
                self.pending.push(Pending::Bind {
                    job_id,
                    addrs: rest,
                    ports,
                    ts_ns: ev.hdr.ts_ns,
                });
            }
        }
        if ev.bound > 0 {
            for (a, ttl) in &addrs {
                let life = (u64::from(*ttl) * 1_000_000_000).max(self.min_ttl_ns);
                self.expiry
                    .push(Reverse((ev.hdr.ts_ns + life + self.grace_ns, job_id, *a)));
            }
        }
        if ev.flags & abi::DNS_TRIE_FULL != 0 {
            tracing::warn!(job = dns_ev.job, name = dns_ev.name, "the learned-address map is full: some answers were not bound, connections to them are blocked (fail closed)");
        }
        if ev.flags & abi::DNS_MALFORMED != 0 {
            tracing::warn!(
                job = dns_ev.job,
                name = dns_ev.name,
                "DNS answer did not validate in the kernel: nothing bound"
            );
        }
        self.emit(job_id, Event::Dns(dns_ev));
        findings.into_iter().for_each(|f| self.emit(job_id, f));
    }

    /// The next expiry deadline, CLOCK_BOOTTIME ns.
    pub fn next_deadline(&self) -> Option<u64> {
        self.expiry.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Removes learned addresses whose TTL and grace have run out and that no flow used
    /// lately. The kernel may have refreshed an entry since it was scheduled: its own
    /// `expires_ns` decides, and the entry is re-queued for then.
    pub fn expire(&mut self, dp: &Dataplane, now: u64) {
        while let Some(Reverse((t, job_id, addr))) = self.expiry.peek().copied() {
            if t > now {
                break;
            }
            self.expiry.pop();
            let Ok(Some(v)) = dp.host_entry(job_id, addr) else {
                continue;
            };
            if v.flags & abi::ADDR_STATIC != 0 || v.expires_ns == 0 {
                continue;
            }
            let keep_until = v
                .expires_ns
                .max(v.last_used_ns.saturating_add(FLOW_IDLE_NS));
            if keep_until > now {
                self.expiry.push(Reverse((keep_until, job_id, addr)));
                continue;
            }
            match dp.delete_host_entry(job_id, addr) {
                Ok(()) => self.expired += 1,
                Err(e) => tracing::warn!("expiring {addr}: {e}"),
            }
        }
    }

    pub fn flush(&mut self) {
        if let Some(w) = self.sink.as_mut() {
            if let Err(e) = w.flush() {
                tracing::error!("flushing the events file: {e}");
            }
        }
    }
}

/// Opens a pidfd for `pid` (Linux 5.3+): readable when the process exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// How often the loop drains the ring buffer when the kernel did not wake it.
const TICK: Duration = Duration::from_millis(10);

const RINGBUF: Token = Token(0);
const SIGNALS: Token = Token(1);
const CHILD: Token = Token(2);
const LINKS: Token = Token(3);

/// Runs the event loop until `child` exits; returns its wait status. Signals that would
/// stop ringfence (INT, TERM, HUP, QUIT) are forwarded to the child instead: the job ends,
/// and the report and the events of everything it did are still written.
pub fn run_until_exit(
    dp: &mut Dataplane,
    agent: &mut Agent,
    child: &mut std::process::Child,
    links: Option<&crate::netif::LinkWatcher>,
) -> Result<std::process::ExitStatus> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};

    let agent = RefCell::new(agent);
    let events_map = dp.events_map()?;
    let mut rb_builder = libbpf_rs::RingBufferBuilder::new();
    rb_builder
        .add(&events_map, |data: &[u8]| {
            agent.borrow_mut().handle(data);
            0
        })
        .context("setting up the ring buffer")?;
    let rb = rb_builder.build().context("setting up the ring buffer")?;

    let mut poll = Poll::new().context("creating the event loop")?;
    let rb_fd = rb.epoll_fd();
    poll.registry()
        .register(&mut SourceFd(&rb_fd), RINGBUF, Interest::READABLE)?;
    let mut signals = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
        .context("installing signal handlers")?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    let pidfd = pidfd_open(child.id()).context("pidfd_open on the job's process")?;
    let pidfd_raw = pidfd.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&pidfd_raw), CHILD, Interest::READABLE)?;
    if let Some(l) = links {
        poll.registry()
            .register(&mut SourceFd(&l.raw_fd()), LINKS, Interest::READABLE)?;
    }

    let mut events = Events::with_capacity(64);
    let status = loop {
        // The kernel wakes the loop only when the ring buffer fills up or a record is urgent
        // (see ringbuf_flags in bpf/dns.h); the 10 ms tick drains the rest.
        let timeout = agent
            .borrow()
            .next_deadline()
            .map(|t| Duration::from_nanos(t.saturating_sub(boottime_ns())))
            .unwrap_or(TICK)
            .min(TICK);
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("polling"),
        }
        let mut child_done = false;
        for e in events.iter() {
            match e.token() {
                RINGBUF => {
                    if let Err(e) = rb.consume() {
                        tracing::warn!("reading the ring buffer: {e}");
                    }
                    agent.borrow_mut().apply(dp);
                }
                SIGNALS => {
                    for sig in signals.pending() {
                        tracing::info!("signal {sig}: passing it to the job");
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(child.id() as i32),
                            nix::sys::signal::Signal::try_from(sig).ok(),
                        );
                    }
                }
                CHILD => child_done = true,
                LINKS => {
                    if let Some(l) = links {
                        dp.follow_links(l);
                    }
                }
                _ => {}
            }
        }
        if let Err(e) = rb.consume() {
            tracing::warn!("reading the ring buffer: {e}");
        }
        agent.borrow_mut().apply(dp);
        agent.borrow_mut().expire(dp, boottime_ns());
        agent.borrow_mut().flush();
        if child_done {
            if let Some(st) = child.try_wait()? {
                break st;
            }
        }
    };
    // Whatever the job's last packets produced is already in the ring buffer: drain it.
    let _ = rb.consume();
    agent.borrow_mut().apply(dp);
    agent.borrow_mut().flush();
    Ok(status)
}
