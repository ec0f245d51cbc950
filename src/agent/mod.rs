//! The agent: turns what the kernel reports into the audit trail, and keeps learned state
//! honest. One thread, one mio loop: the ring buffer's epoll fd, signals, the job's pidfd
//! and the expiry timer all wake the same `poll`, so nothing needs a lock.
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

pub mod lineage;
pub mod names;

use crate::kernel::abi;
use crate::kernel::dataplane::Dataplane;
use crate::trail::dns;
use crate::trail::events::{
    boottime_to_system, BootClock, DnsEvent, Event, FindingEvent, FlowEvent, JobEvent,
    JsonLinesWriter, PolicySummary, Proto, Reason, StepEvent, SuppressedEvent, TruncatedEvent,
    Verdict,
};
use crate::trail::exfil::{ExfilDetector, Thresholds};
use crate::trail::limits::{CutCounts, FloodGuard, Limits};
use crate::trail::report::{Cuts, Report};

/// How long a learned address outlives its TTL while a flow to it was seen recently.
/// (Live flows do not need the trie at all — their verdict is cached in the flow table —
/// this only keeps a just-used address for the flow's next connection.)
const FLOW_IDLE_NS: u64 = 60_000_000_000;

/// How often the names of expired answers are forgotten (a pass over every job's names).
const NAMES_SWEEP_NS: u64 = 5_000_000_000;

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
    /// Address -> the question name whose answer produced it (for naming flows), kept for
    /// the answer's TTL and while flows use the address. At most `limits.max_destinations`
    /// addresses.
    names: names::Names,
    limits: Limits,
    /// The rate limit on the job's flow and DNS events, and what it held back.
    guard: FloodGuard,
    /// The job's lines that did not fit in the events file.
    dropped: CutCounts,
    /// Answer addresses not put in `names` because it was full.
    names_not_kept: u64,
    /// The job's own events file (the daemon: one per job); without one, the agent's.
    sink: Option<Sink>,
    /// Webhooks told of the job's blocked flows and findings (the host's and the job's own).
    pub notify: Vec<crate::notify::Sink>,
}

type Sink = JsonLinesWriter<io::BufWriter<std::fs::File>>;

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
    /// stamp, pid, comm, cgroup), `to` the destination and the name behind it. The process's
    /// executable and parent chain are added when the event is written (`Agent::emit_at`).
    fn flow(
        &self,
        who: (std::time::SystemTime, u32, &[i8; 16], u64),
        proto: Proto,
        to: (IpAddr, u16, Option<String>),
        verdict: Verdict,
        reason: Reason,
    ) -> FlowEvent {
        let (ts, pid, comm, cgroup) = who;
        let (pid, comm) = self.attribute(pid, comm);
        let (dst, port, domain) = to;
        FlowEvent {
            ts,
            job: self.name.clone(),
            step: self.step.clone(),
            pid,
            comm,
            exe: None,
            parents: Default::default(),
            cgroup,
            container: None,
            proto,
            dst,
            port,
            domain,
            verdict,
            reason,
            direction: Default::default(),
        }
    }

    /// Block mode with query filtering: the kernel refuses or drops every query copy it
    /// reports (a TCP segment it cannot answer REFUSED cleanly is dropped, not flagged).
    fn filters_queries(&self) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|p| p.mode == crate::policy::Mode::Block && p.dns_filter)
    }

    /// The ports the job's policy allows for addresses of `name` (none without a policy).
    fn ports_for(&self, name: &str) -> crate::policy::PortSet {
        self.policy
            .as_ref()
            .map(|p| p.ports_for(name))
            .unwrap_or(crate::policy::PortSet::None)
    }

    /// The kernel names the sender only when it knows it (the sending task in the socket's
    /// cgroup, or the socket's recorded owner: see sender_of in bpf/dns.h), so pid 0 is "not
    /// known" and needs no /proc check.
    fn attribute(&self, pid: u32, comm: &[i8; 16]) -> (u32, String) {
        if pid == 0 {
            (0, String::new())
        } else {
            (pid, comm_string(comm))
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
            names: names::Names::default(),
            limits: Limits::unlimited(),
            guard: FloodGuard::new(&Limits::unlimited(), 0),
            dropped: CutCounts::default(),
            names_not_kept: 0,
            sink: None,
            notify: Vec::new(),
        }
    }

    /// Gives the job its own events file, appended to (a restarted daemon goes on where
    /// the last one stopped) and kept to `max_bytes` (0: no limit).
    pub fn with_events_file(mut self, path: &std::path::Path, max_bytes: u64) -> Result<JobState> {
        let w = JsonLinesWriter::append(path)
            .with_context(|| format!("opening the events file {}", path.display()))?;
        self.sink = Some(w.with_max_bytes(max_bytes));
        Ok(self)
    }

    /// The job's limits (see [`crate::trail::limits`]); a new job has none.
    pub fn with_limits(mut self, limits: Limits) -> JobState {
        self.limits = limits;
        self.guard = FloodGuard::new(&limits, boottime_ns());
        self.report.set_limits(limits);
        self
    }

    /// Remembers that `addr` came from an answer for `name` until `until_ns`, if the table
    /// has room (the table is bounded; what does not fit is counted).
    fn remember_name(&mut self, addr: IpAddr, name: &str, until_ns: u64) {
        if self.names.len() < self.limits.max_destinations || self.names.contains(addr) {
            self.names.insert(addr, name, until_ns);
        } else {
            self.names_not_kept += 1;
        }
    }

    /// Addresses whose DNS name the job remembers now.
    pub fn names_kept(&self) -> usize {
        self.names.len()
    }

    /// Everything the job's limits cut so far, as the report says it.
    pub fn cuts(&self) -> Cuts {
        Cuts {
            suppressed: self.guard.suppressed,
            dropped: self.dropped,
            names_not_kept: self.names_not_kept,
        }
    }
}

/// The hasher of the maps the agent touches for every event (jobs, processes, report rows,
/// names): seeded per process like std's, and several times faster than its SipHash —
/// which took a sixth of the agent's time per event.
pub type FastHash = foldhash::fast::RandomState;

pub struct Agent {
    pub jobs: HashMap<u32, JobState, FastHash>,
    /// Names for the senders of forwarded flows (containers).
    container_names: crate::job::containers::ContainerNames,
    sink: Option<JsonLinesWriter<io::BufWriter<std::fs::File>>>,
    /// Learned addresses to re-check.
    expiry: Expiry,
    /// When the names of expired answers were last forgotten (CLOCK_BOOTTIME ns).
    names_swept_ns: u64,
    /// Both clocks as of the last flush: event stamps become wall-clock times with it.
    clock: BootClock,
    min_ttl_ns: u64,
    grace_ns: u64,
    pub decode_errors: u64,
    pub expired: u64,
    /// Addresses bound from userspace, late (their answer was split across TCP segments).
    pub bound_late: u64,
    streams: HashMap<(IpAddr, u16), Stream>,
    pending: Vec<Pending>,
    /// Attachment problems already reported.
    detached: std::collections::HashSet<crate::kernel::dataplane::AttachmentProblem>,
    /// The events file failed to take a line (disk full…): said once, then counted.
    write_failed: bool,
    /// TCP answers given up half-assembled to keep at most MAX_STREAMS.
    pub streams_evicted: u64,
    /// Executables and parent chains of the processes flows name (one host, one pid space:
    /// shared by every job), read when a flow event is written.
    procs: lineage::ProcCache,
    /// The latest flow events of every job, numbered, for `ringfence watch` (the daemon turns
    /// it on; bounded by RECENT).
    pub recent: Option<Recent>,
    /// Ring buffer records handled, and as of the last flush: how busy the last drain was.
    records: u64,
    records_at_flush: u64,
    /// The last drain found more than [`BUSY_RECORDS`]: the loop drains again sooner.
    busy: bool,
}

/// A drain (one tick of the loop) with more records than this makes the next tick
/// [`BUSY_TICK`]: ~100k events/s at the 10 ms tick.
const BUSY_RECORDS: u64 = 1000;

/// The loop's tick while events pour in. The kernel forces a wakeup with every record while
/// more than 2 MiB wait (RF_WAKE_BYTES in bpf/lib/common.h), each an inter-processor
/// interrupt (a VM exit in a VM): at 1M flow events/s (88 bytes each) a 10 ms tick leaves
/// ~1 MiB, and one late tick makes every event cost the kernel an interrupt — measured,
/// the producer then fell from 2.4M to under 0.9M events/s. At 1 ms the backlog stays
/// near 100 KiB.
const BUSY_TICK: Duration = Duration::from_millis(1);

/// Learned addresses to re-check, soonest first, grouped by (deadline second, job): 16
/// bytes an address (the address alone; an answer's addresses share their deadline and
/// job). A heap of (deadline, job, address) took 24 each, 24 MiB of the 1M-address agent.
/// Deadlines are kept in whole CLOCK_BOOTTIME seconds, rounded up: an address outlives its
/// TTL and grace by less than a second more.
#[derive(Default)]
struct Expiry {
    /// (deadline second, job) -> the addresses due then, as the kernel keys them.
    due: BTreeMap<(u32, u32), Vec<[u8; 16]>>,
}

impl Expiry {
    fn push(&mut self, deadline_ns: u64, job_id: u32, addr: IpAddr) {
        let s = u32::try_from(deadline_ns.div_ceil(1_000_000_000)).unwrap_or(u32::MAX);
        self.due
            .entry((s, job_id))
            .or_default()
            .push(abi::addr_to_bytes(addr));
    }

    /// CLOCK_BOOTTIME ns.
    fn next_deadline(&self) -> Option<u64> {
        self.due
            .first_key_value()
            .map(|((s, _), _)| u64::from(*s) * 1_000_000_000)
    }

    /// The next (job, address) due by `now_ns`, taken off the queue.
    fn pop_due(&mut self, now_ns: u64) -> Option<(u32, IpAddr)> {
        let mut first = self.due.first_entry()?;
        let (s, job_id) = *first.key();
        if u64::from(s) * 1_000_000_000 > now_ns {
            return None;
        }
        let addrs = first.get_mut();
        let addr = addrs.pop();
        if addrs.is_empty() {
            first.remove();
        }
        // A group is never left empty, so it always had one.
        Some((job_id, abi::addr_from_bytes(addr?)))
    }

    fn forget_job(&mut self, job_id: u32) {
        self.due.retain(|(_, id), _| *id != job_id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.due.values().map(Vec::len).sum()
    }
}

/// Returns the heap's free pages to the kernel (glibc's `malloc_trim(0)`). glibc keeps what
/// a program frees for its next allocations, and gives back only the top of its heap on
/// its own: an ended job's report, names and events (tens of MiB after a flood) stayed in
/// the daemon's RSS, and the next jobs' blocks scattered among them kept the heap from
/// shrinking (`rfbench churn`: x1.12 over 200k names with the agent's live data flat
/// within 3%). Called when a job is forgotten; it walks the free lists once (well under
/// a millisecond for the heaps measured).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Flow events kept for `ringfence watch`.
pub const RECENT: usize = 4096;

/// The latest flow events, each with a sequence number (the first is 1).
#[derive(Default)]
pub struct Recent {
    /// Kept as events, serialized only when a watcher asks (a flood costs a clone each).
    pub events: std::collections::VecDeque<(u64, Event)>,
    pub seq: u64,
}

/// TCP DNS answers the agent assembles at once: as many as the kernel follows (tcp_streams).
const MAX_STREAMS: usize = abi::rf_limits::RF_TCP_STREAMS_MAX.0 as usize;

/// The kernel's comm as a string: [`abi::comm_to_string`] with one allocation for the
/// usual valid UTF-8 (every flow event has a comm).
fn comm_string(c: &[i8; 16]) -> String {
    let bytes = c.map(|b| b as u8);
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
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
            jobs: HashMap::default(),
            sink,
            expiry: Expiry::default(),
            names_swept_ns: 0,
            clock: BootClock::now(),
            container_names: Default::default(),
            min_ttl_ns: min_ttl.as_nanos() as u64,
            grace_ns: grace.as_nanos() as u64,
            decode_errors: 0,
            expired: 0,
            bound_late: 0,
            streams: HashMap::new(),
            pending: Vec::new(),
            detached: Default::default(),
            write_failed: false,
            streams_evicted: 0,
            recent: None,
            procs: lineage::ProcCache::default(),
            records: 0,
            records_at_flush: 0,
            busy: false,
        })
    }

    /// Keeps the events file to `max` bytes (0: no limit); see [`JsonLinesWriter`].
    pub fn set_events_max_bytes(&mut self, max: u64) {
        self.sink = self.sink.take().map(|w| w.with_max_bytes(max));
    }

    /// Registers a job and writes its header and first step: the command line, the policy
    /// and the limits are named there once, and the step's short label in every event.
    pub fn start_job(
        &mut self,
        job_id: u32,
        state: JobState,
        command: Vec<String>,
        policy: &crate::policy::Policy,
    ) {
        let ts = std::time::SystemTime::now();
        let header = Event::Job(JobEvent {
            ts,
            job: state.name.clone(),
            mode: policy.mode.to_string(),
            command: command.clone(),
            policy: PolicySummary::of(policy),
            limits: state.limits,
        });
        let step = state.step.clone().map(|step| {
            Event::Step(StepEvent {
                ts,
                job: state.name.clone(),
                step,
                command: Some(command),
            })
        });
        self.jobs.insert(job_id, state);
        self.emit(job_id, header);
        if let Some(step) = step {
            self.emit(job_id, step);
        }
    }

    /// Takes over a job a previous daemon started: no header is written again (its events
    /// file has one), and its report is rebuilt from what that file holds.
    pub fn adopt_job(&mut self, job_id: u32, state: JobState) {
        self.jobs.insert(job_id, state);
    }

    /// A new step of a job: its label goes on every later event.
    pub fn step(&mut self, job_id: u32, step: &str) {
        let Some(j) = self.jobs.get_mut(&job_id) else {
            return;
        };
        j.step = Some(step.to_string());
        let ev = Event::Step(StepEvent {
            ts: std::time::SystemTime::now(),
            job: j.name.clone(),
            step: step.to_string(),
            command: None,
        });
        self.emit(job_id, ev);
    }

    /// Re-checks a learned address at `deadline` (a daemon taking over pinned maps).
    pub fn watch_expiry(&mut self, job_id: u32, addr: IpAddr, deadline: u64) {
        self.expiry.push(deadline, job_id, addr);
    }

    fn emit(&mut self, job_id: u32, ev: Event) {
        self.emit_at(job_id, ev, boottime_ns());
    }

    /// Every event reaches the job's report, whatever the limits; it is written if the job's
    /// rate limit lets it. An admitted flow gets its lineage before the report sees it, so
    /// the report (the HTML page's parent chains) names the same process the file does.
    fn emit_at(&mut self, job_id: u32, ev: Event, now_ns: u64) {
        let admitted = match self.jobs.get_mut(&job_id) {
            Some(j) => j.guard.admit(&ev, now_ns),
            None => true,
        };
        let ev = if admitted {
            self.with_lineage(ev, now_ns)
        } else {
            ev
        };
        if let Some(j) = self.jobs.get_mut(&job_id) {
            j.report.add(&ev);
        }
        if admitted {
            self.write(job_id, &ev, false);
        }
        if let (Some(r), Event::Flow(_)) = (self.recent.as_mut(), &ev) {
            r.seq += 1;
            if r.events.len() >= RECENT {
                r.events.pop_front();
            }
            r.events.push_back((r.seq, ev.clone()));
        }
        // After the trail: a notice is queued (never waited for), written or rate-limited
        // alike, so the receiver hears of every block the report counts.
        if let Some(j) = self.jobs.get(&job_id) {
            if !j.notify.is_empty() && crate::notify::wanted(&ev) {
                if let Ok(v) = serde_json::to_value(&ev) {
                    for n in &j.notify {
                        n.send(v.clone());
                    }
                }
            }
        }
    }

    /// A flow event with its process's executable and parent chain (see [`lineage`]). Only
    /// events that are written get them: what the rate limit holds back costs no /proc read.
    fn with_lineage(&mut self, ev: Event, now_ns: u64) -> Event {
        match ev {
            Event::Flow(mut f) if f.pid != 0 && f.exe.is_none() && f.parents.is_empty() => {
                let l = self.procs.lineage_at(f.pid, &f.comm, now_ns);
                f.exe = l.exe;
                f.parents = l.parents;
                Event::Flow(f)
            }
            ev => ev,
        }
    }

    /// Writes one line; a line that does not fit (or fails) is counted against its job.
    fn write(&mut self, job_id: u32, ev: &Event, marker: bool) {
        if self.try_write(job_id, ev, marker) {
            return;
        }
        let Some(j) = self.jobs.get_mut(&job_id) else {
            return;
        };
        match ev {
            // The events a dropped `suppressed` line stood for move from one cut to the
            // other, so that written + suppressed + dropped is every event, once, and a
            // report read back from the file (whose `truncated` line carries them) agrees.
            Event::Suppressed(s) => {
                let c = CutCounts::from(s);
                j.dropped.add(&c);
                j.guard.suppressed.sub(&c);
            }
            _ => j.dropped.count(ev),
        }
    }

    /// Whether the line went to the file (true without a file: nothing is lost). A job
    /// with its own file writes there, the others to the agent's.
    fn try_write(&mut self, job_id: u32, ev: &Event, marker: bool) -> bool {
        let own = self.jobs.get_mut(&job_id).and_then(|j| j.sink.as_mut());
        let Some(w) = own.or(self.sink.as_mut()) else {
            return true;
        };
        let res = if marker {
            w.write_marker(ev)
        } else {
            w.write(ev)
        };
        let written = res.unwrap_or_else(|e| {
            if !std::mem::replace(&mut self.write_failed, true) {
                tracing::error!(
                    "writing the events file: {e} (later lines are counted, not written)"
                );
            }
            false
        });
        written
    }

    /// Writes a `suppressed` line for each job whose rate limit held events back, at most
    /// once a second per job (or now, at the end).
    ///
    /// A line that finds the file full is not lost: its counts wait for the next line, and
    /// the last one, at the end, may use the room kept for final lines. Only if even that
    /// fails are its events counted as dropped.
    fn summarize(&mut self, now_ns: u64, at_end: bool) {
        let mut lines = Vec::new();
        for (id, j) in self.jobs.iter_mut() {
            if let Some((c, since)) = j.guard.summary_due(now_ns, at_end) {
                let ev = Event::Suppressed(SuppressedEvent {
                    ts: boottime_to_system(now_ns),
                    job: j.name.clone(),
                    flows: c.flows,
                    blocked: c.blocked,
                    audited: c.audited,
                    dns: c.dns,
                    since: boottime_to_system(since),
                });
                lines.push((*id, ev, c, since));
            }
        }
        for (id, ev, c, since) in lines {
            if at_end {
                self.write(id, &ev, true);
            } else if !self.try_write(id, &ev, false) {
                if let Some(j) = self.jobs.get_mut(&id) {
                    j.guard.hold_over(&c, since);
                }
            }
        }
    }

    /// The end of the trail: what the rate limit still held back, then, for each job that
    /// lost lines to the size limit, one `truncated` line saying how many. The reports learn
    /// what was cut.
    pub fn finish(&mut self) {
        let now = boottime_ns();
        self.summarize(now, true);
        let ids: Vec<u32> = self.jobs.keys().copied().collect();
        for id in ids {
            self.close_trail(id, now);
        }
        self.flush();
    }

    /// The end of one job's trail (the daemon's `job end`): as [`Self::finish`], for it
    /// alone. The job stays registered until [`Self::remove_job`].
    pub fn finish_job(&mut self, job_id: u32) {
        let now = boottime_ns();
        if let Some(j) = self.jobs.get_mut(&job_id) {
            // Only this job's held-back events are summarized now.
            if let Some((c, since)) = j.guard.summary_due(now, true) {
                let ev = Event::Suppressed(SuppressedEvent {
                    ts: boottime_to_system(now),
                    job: j.name.clone(),
                    flows: c.flows,
                    blocked: c.blocked,
                    audited: c.audited,
                    dns: c.dns,
                    since: boottime_to_system(since),
                });
                self.write(job_id, &ev, true);
            }
        }
        self.close_trail(job_id, now);
        self.flush();
    }

    /// Forgets a job (after [`Self::finish_job`]): its report, names and pending expiry,
    /// and gives the memory they held back to the kernel ([`trim_heap`]). Whether the job
    /// was known.
    pub fn remove_job(&mut self, job_id: u32) -> bool {
        self.expiry.forget_job(job_id);
        self.streams.retain(|_, st| st.job_id != job_id);
        let known = self.jobs.remove(&job_id).is_some();
        trim_heap();
        known
    }

    /// The `truncated` line of one job, if it lost lines, and its report's cuts.
    fn close_trail(&mut self, job_id: u32, now: u64) {
        let default_max = self.sink.as_ref().map_or(0, |w| w.max_bytes());
        let Some(j) = self.jobs.get_mut(&job_id) else {
            return;
        };
        if !j.dropped.is_empty() {
            let d = j.dropped;
            let max_bytes = j.sink.as_ref().map_or(default_max, |w| w.max_bytes());
            let ev = Event::Truncated(TruncatedEvent {
                ts: boottime_to_system(now),
                job: j.name.clone(),
                max_bytes,
                events: d.events(),
                flows: d.flows,
                blocked: d.blocked,
                audited: d.audited,
                dns: d.dns,
            });
            let w = match j.sink.as_mut() {
                Some(w) => Some(w),
                None => self.sink.as_mut(),
            };
            if !matches!(w.map(|w| w.write_marker(&ev)), Some(Ok(true))) {
                tracing::error!("no room left for the events file's final line: {ev:?}");
            }
        }
        let j = self.jobs.get_mut(&job_id).expect("checked above");
        let cuts = j.cuts();
        j.report.set_cuts(cuts);
    }

    /// Puts the kernel's counters and what they warn of into a job's report, before it is
    /// rendered (the counters are the dataplane's, shared by every job it holds).
    pub fn close_report(&mut self, job_id: u32, counters: &[u64; abi::COUNTERS]) {
        let streams_evicted = self.streams_evicted;
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        // The events carry each finding as first crossed; the report shows the final counts.
        job.report.set_findings(job.exfil.findings());
        let c = |k: abi::rf_counter| counters[k.0 as usize];
        use abi::rf_counter as cnt;
        job.report
            .set_kernel_counts(crate::trail::report::KernelCounts {
                new_flows: c(cnt::RF_CNT_NEW_FLOWS),
                allowed: c(cnt::RF_CNT_ALLOWED),
                blocked: c(cnt::RF_CNT_BLOCKED),
                audited: c(cnt::RF_CNT_AUDITED),
                ringbuf_dropped: c(cnt::RF_CNT_RINGBUF_DROP),
            });
        let warnings = [
            (
                c(abi::rf_counter::RF_CNT_RINGBUF_DROP),
                "events were lost (ring buffer full); verdicts were still enforced",
            ),
            (
                c(abi::rf_counter::RF_CNT_TRIE_FULL),
                "learned addresses did not fit the map: connections to them were blocked",
            ),
            (
                c(abi::rf_counter::RF_CNT_DNS_TCP_SPLIT),
                "DNS answers over TCP were split across segments and not bound in the kernel",
            ),
            (
                c(abi::rf_counter::RF_CNT_DNS_FRAGMENT),
                "DNS answers arrived as IP fragments and were not bound (fail closed)",
            ),
            (
                streams_evicted,
                "split TCP DNS answers were given up half-assembled (too many at once) and not bound",
            ),
        ];
        for (n, what) in warnings {
            if n > 0 {
                job.report.warn(format!("{n} {what}"));
            }
        }
    }

    /// One ring buffer record.
    pub fn handle(&mut self, data: &[u8]) {
        self.records += 1;
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
            abi::rf_event_type::RF_EVENT_GUARD => {
                match abi::from_bytes::<abi::rf_guard_event>(data) {
                    Some(ev) => self.on_guard(&ev),
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

    /// A job process acted on another process (bpf/guard.h): a finding if that process is
    /// outside the job.
    fn on_guard(&mut self, ev: &abi::rf_guard_event) {
        let Some(job) = self.jobs.get(&ev.hdr.job_id) else {
            return;
        };
        let Some(cgroup) = job.cgroup.as_deref() else {
            return;
        };
        let ts = boottime_to_system(ev.hdr.ts_ns);
        if let Some(f) =
            crate::job::tamper::guard_finding(ev, ts, &job.name, job.step.as_deref(), cgroup)
        {
            tracing::warn!(job = job.name, "{}", f.example);
            self.emit(ev.hdr.job_id, Event::Finding(f));
        }
    }

    /// Checks that the dataplane is still attached where it was; each problem becomes a
    /// finding of every job, once.
    pub fn check_dataplane(&mut self, dp: &Dataplane) {
        for p in dp.attachment_problems() {
            if !self.detached.insert(p.clone()) {
                continue;
            }
            tracing::error!(ifname = p.ifname, dir = p.dir, "{}", p.what);
            let ts = std::time::SystemTime::now();
            let ids: Vec<u32> = self.jobs.keys().copied().collect();
            for id in ids {
                let job = &self.jobs[&id];
                let f =
                    crate::job::tamper::detached_finding(&p, ts, &job.name, job.step.as_deref());
                self.emit(id, Event::Finding(f));
            }
        }
    }

    fn on_flow(&mut self, ev: &abi::rf_flow_event) {
        let Some(job) = self.jobs.get(&ev.hdr.job_id) else {
            return;
        };
        let dst = abi::addr_from_bytes(ev.daddr);
        let domain = job.names.get(dst).map(|n| n.to_string());
        let mut reason = Reason::try_from(ev.reason).unwrap_or(Reason::DirectIp);
        // In block mode the kernel does not keep addresses of names it will not allow, so
        // it can only say "direct-ip"; the agent saw the answer and knows better.
        if reason == Reason::DirectIp && domain.is_some() {
            reason = Reason::NotAllowed;
        }
        let direction = crate::trail::events::Direction::from_abi(ev.direction);
        // An inbound connection is named by its peer and the job's port it reached.
        let port = if direction.is_outbound() {
            ev.dport
        } else {
            ev.sport
        };
        let flow = job.flow(
            (
                self.clock.to_system(ev.hdr.ts_ns),
                ev.pid,
                &ev.comm,
                ev.cgroup_id,
            ),
            Proto::from(ev.proto),
            (dst, port, domain),
            Verdict::try_from(ev.verdict).unwrap_or(Verdict::Blocked),
            reason,
        );
        let mut flow = FlowEvent { direction, ..flow };
        // Came in on a device (a container's or namespace's link, forwarded): named after
        // its container.
        self.container_names
            .name(&mut flow, ev.ifindex, Some(abi::addr_from_bytes(ev.saddr)));
        // At the kernel's stamp (CLOCK_BOOTTIME, as the agent's clock is): the rate limit
        // counts flows by when they happened, not by when a drain of the ring buffer
        // reached them, and no clock is read per event.
        self.emit_at(ev.hdr.job_id, Event::Flow(flow), ev.hdr.ts_ns);
    }

    /// One raw segment of a TCP DNS answer the kernel could not parse whole. When every
    /// byte of the message is there, it is parsed here and, if its name is allowed, bound.
    fn on_segment(&mut self, ev: &abi::rf_dns_event, data: &[u8]) {
        let server = abi::addr_from_bytes(ev.server);
        let key = (server, ev.client_port);
        if ev.flags & abi::DNS_TCP_FIRST != 0 && data.len() >= 2 {
            let total = 2 + usize::from(u16::from_be_bytes([data[0], data[1]]));
            // An answer that never completes must not hold its buffer for ever: keep as many
            // as the kernel tracks (its tcp_streams map). The one evicted is not bound (fail
            // closed), and counted.
            if self.streams.len() >= MAX_STREAMS && !self.streams.contains_key(&key) {
                if let Some(old) = self.streams.keys().next().copied() {
                    self.streams.remove(&old);
                    self.streams_evicted += 1;
                    if self.streams_evicted == 1 {
                        tracing::warn!("more than {MAX_STREAMS} split TCP DNS answers at once: some are given up, not bound (counted in the report)");
                    }
                }
            }
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
                                self.expiry.push(exp, job_id, a);
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
        if ev.flags & abi::DNS_UNJUDGED != 0 {
            self.on_unjudged(ev, payload);
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

    /// DNS to a resolver that the kernel could not fully judge (a fragment, a message it
    /// cannot parse, a TCP stream it lost track of): refused or dropped in block mode with
    /// query filtering, let through in audit mode, reported either way. The copy may be a
    /// message, the start of one, or raw segment bytes: it is named when its question reads.
    fn on_unjudged(&mut self, ev: &abi::rf_dns_event, payload: &[u8]) {
        let job_id = ev.hdr.job_id;
        let clock = self.clock;
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let tcp = ev.flags & abi::DNS_TCP != 0;
        // A raw TCP segment may start with a message's 2-byte length prefix.
        let name = dns::parse(payload)
            .ok()
            .or_else(|| (tcp && payload.len() > 2).then(|| dns::parse(&payload[2..]).ok())?)
            .and_then(|m| m.question)
            .map(|q| q.name);
        let verdict = if ev.flags & abi::DNS_REFUSED != 0 || job.filters_queries() {
            Verdict::Blocked
        } else {
            Verdict::Audited
        };
        let ts = clock.to_system(ev.hdr.ts_ns);
        let findings: Vec<Event> = match &name {
            Some(n) => (job.exfil.observe(n).iter())
                .map(|f| Event::Finding(FindingEvent::new(f, ts, &job.name, job.step.as_deref())))
                .collect(),
            None => Vec::new(),
        };
        let flow = job.flow(
            (ts, ev.pid, &ev.comm, ev.cgroup_id),
            if tcp { Proto::Tcp } else { Proto::Udp },
            (abi::addr_from_bytes(ev.server), 53, name),
            verdict,
            Reason::DnsUnjudged,
        );
        self.emit(job_id, Event::Flow(flow));
        findings.into_iter().for_each(|f| self.emit(job_id, f));
    }

    fn on_dns_message(&mut self, ev: &abi::rf_dns_event, msg: dns::DnsMessage) {
        let job_id = ev.hdr.job_id;
        let clock = self.clock;
        let (min_ttl_ns, grace_ns) = (self.min_ttl_ns, self.grace_ns);
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let Some(q) = msg.question.as_ref() else {
            return;
        };
        // Every name the job looks up reaches here once or twice (the query copy of a name
        // the policy does not allow, and any answer): the detector counts a lookup once.
        let ts = clock.to_system(ev.hdr.ts_ns);
        let findings: Vec<Event> = (job.exfil.observe(&q.name).iter())
            .map(|f| Event::Finding(FindingEvent::new(f, ts, &job.name, job.step.as_deref())))
            .collect();
        if ev.flags & abi::DNS_QUERY != 0 {
            // A query for a name the policy does not allow: refused in the kernel (block
            // mode) or let through and reported (audit mode). Either way it is a finding.
            let verdict = if ev.flags & abi::DNS_REFUSED != 0 || job.filters_queries() {
                Verdict::Blocked
            } else {
                Verdict::Audited
            };
            let mut flow = job.flow(
                (ts, ev.pid, &ev.comm, ev.cgroup_id),
                if ev.flags & abi::DNS_TCP != 0 {
                    Proto::Tcp
                } else {
                    Proto::Udp
                },
                (abi::addr_from_bytes(ev.server), 53, Some(q.name.clone())),
                verdict,
                Reason::DnsQuery,
            );
            self.container_names.name(&mut flow, ev.ifindex, None);
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
        // Named as long as the kernel may keep the address (its TTL and grace), and a
        // flow's idle time more: a connection made just before the entry went is named too.
        for (a, ttl) in &addrs {
            let life = (u64::from(*ttl) * 1_000_000_000).max(min_ttl_ns);
            let until = ev.hdr.ts_ns + life + grace_ns + FLOW_IDLE_NS;
            job.remember_name(*a, &q.name, until);
        }
        let mut answers: Vec<String> = msg.cname_chain().into_iter().skip(1).collect();
        answers.extend(addrs.iter().map(|(a, _)| a.to_string()));
        let bound = ev.flags & abi::DNS_ALLOWED != 0 && ev.bound > 0;
        let dns_ev = DnsEvent {
            ts,
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
                    .push(ev.hdr.ts_ns + life + self.grace_ns, job_id, *a);
            }
        }
        if ev.flags & abi::DNS_TRIE_FULL != 0 {
            tracing::warn!(job = dns_ev.job, name = dns_ev.name, "the learned-address map is full: some answers were not bound, connections to them are blocked (fail closed)");
            // In this job's own report: the host-wide counter does not say whose answers
            // went unbound, and the blocks it caused look like the policy's doing.
            job.report.warn(
                "the learned-address map (allow) was full: some DNS answers were not bound and                  connections to them were blocked; raise max-learned-addresses",
            );
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

    /// How long the event loop may sleep: until the next expiry, at most `tick` — or
    /// [`BUSY_TICK`] while the last drain was busy.
    pub fn poll_timeout(&self, tick: Duration) -> Duration {
        let tick = if self.busy { tick.min(BUSY_TICK) } else { tick };
        self.next_deadline()
            .map(|t| Duration::from_nanos(t.saturating_sub(boottime_ns())))
            .unwrap_or(tick)
            .min(tick)
    }

    /// The next expiry deadline, CLOCK_BOOTTIME ns.
    pub fn next_deadline(&self) -> Option<u64> {
        self.expiry.next_deadline()
    }

    /// Removes learned addresses whose TTL and grace have run out and that no flow used
    /// lately. The kernel may have refreshed an entry since it was scheduled: its own
    /// `expires_ns` decides, and the entry is re-queued for then.
    pub fn expire(&mut self, dp: &Dataplane, now: u64) {
        while let Some((job_id, addr)) = self.expiry.pop_due(now) {
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
                self.expiry.push(keep_until, job_id, addr);
                if let Some(j) = self.jobs.get_mut(&job_id) {
                    j.names.keep(addr, keep_until + FLOW_IDLE_NS);
                }
                continue;
            }
            match dp.delete_host_entry(job_id, addr) {
                Ok(()) => self.expired += 1,
                Err(e) => tracing::warn!("expiring {addr}: {e}"),
            }
        }
        self.forget_names(now);
    }

    /// Forgets the names of answers that expired (every [`NAMES_SWEEP_NS`] at most): a
    /// daemon's memory follows the names alive, not the most it ever saw. (The expiry
    /// queue needs no such pass: a group's room goes with its last address.)
    pub fn forget_names(&mut self, now: u64) {
        if now < self.names_swept_ns.saturating_add(NAMES_SWEEP_NS) {
            return;
        }
        self.names_swept_ns = now;
        let mut forgotten = 0;
        for j in self.jobs.values_mut() {
            forgotten += j.names.expire(now);
        }
        if forgotten > 0 {
            tracing::debug!(forgotten, "names of expired answers forgotten");
        }
    }

    /// Writes any `suppressed` lines that are due, then pushes buffered lines to the files.
    pub fn flush(&mut self) {
        self.busy = self.records - self.records_at_flush > BUSY_RECORDS;
        self.records_at_flush = self.records;
        self.clock = BootClock::now();
        self.summarize(boottime_ns(), false);
        let own = self.jobs.values_mut().filter_map(|j| j.sink.as_mut());
        for w in own.chain(self.sink.as_mut()) {
            if let Err(e) = w.flush() {
                tracing::error!("flushing an events file: {e}");
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
/// How often the loop checks that the programs are still attached.
const ATTACH_CHECK: Duration = Duration::from_secs(1);

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
    links: Option<&crate::kernel::netif::LinkWatcher>,
    mut guard: Option<&mut crate::job::guard::Guard>,
    mut containers: Option<&mut crate::job::containers::ContainerLinks>,
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
    let mut next_check = std::time::Instant::now() + ATTACH_CHECK;
    let mut cgroup_scan = crate::job::containers::CgroupScan::new();
    let status = loop {
        // The kernel wakes the loop only when the ring buffer fills up or a record is urgent
        // (see ringbuf_flags in bpf/lib/common.h); the 10 ms tick drains the rest.
        let timeout = agent.borrow().poll_timeout(TICK);
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
                        let held = dp.follow_links(l);
                        // An interface attached mid-job is enforced past ringfence's death
                        // too: the guard takes duplicates of its links.
                        if let (false, Some(g)) = (held.is_empty(), guard.as_deref_mut()) {
                            if let Err(e) = g.hold(&held) {
                                tracing::warn!("handing a new interface to the guard: {e:#}");
                            }
                        }
                        // A container's link is claimed as soon as it is attached.
                        if let Some(c) = containers.as_deref_mut() {
                            c.refresh(dp, true);
                        }
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
        if let Some(c) = containers.as_deref_mut() {
            let claimed = c.refresh_cgroups(dp, true, &cgroup_scan.scan());
            // If ringfence dies, the guard kills them with the job.
            if let (false, Some(g)) = (claimed.is_empty(), guard.as_deref_mut()) {
                let held = crate::kernel::dataplane::Held {
                    cgroups: claimed,
                    ..Default::default()
                };
                if let Err(e) = g.hold(&held) {
                    tracing::warn!("handing a container's cgroup to the guard: {e:#}");
                }
            }
        }
        if std::time::Instant::now() >= next_check {
            agent.borrow_mut().check_dataplane(dp);
            // Addresses come after their links (a bridge's): shared networks are re-read.
            if let Some(c) = containers.as_deref_mut() {
                c.refresh(dp, true);
            }
            next_check = std::time::Instant::now() + ATTACH_CHECK;
        }
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
    agent.borrow_mut().check_dataplane(dp);
    agent.borrow_mut().finish();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::events::{read_events, Direction};
    use crate::trail::limits::Limits;
    use crate::trail::report::Format;

    const SEC: u64 = 1_000_000_000;

    fn blocked(i: u32) -> Event {
        Event::Flow(FlowEvent {
            ts: std::time::SystemTime::now(),
            job: "flood".into(),
            step: Some("python3".into()),
            pid: 7,
            comm: "python3".into(),
            exe: None,
            parents: Default::default(),
            cgroup: 1,
            container: None,
            proto: Proto::Udp,
            dst: IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + (i & 0xff))),
            port: 20_000 + (i >> 8) as u16,
            domain: None,
            verdict: Verdict::Blocked,
            reason: Reason::DirectIp,
            direction: Direction::Outbound,
        })
    }

    /// A flood of 10,000 flows in 2.5 s through a job limited to 100 events/s (burst 50),
    /// 100 destinations and 20 KiB of events: the file stays under its limit and says what
    /// it lost, and the report counts every flow and says what was cut.
    #[test]
    fn a_flood_is_bounded_and_every_cut_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let limits = Limits {
            events_per_sec: 100,
            events_burst: 50,
            events_max_bytes: 20 << 10,
            max_destinations: 100,
        };
        let mut agent = Agent::new(Some(&path), Duration::ZERO, Duration::ZERO).unwrap();
        agent.set_events_max_bytes(limits.events_max_bytes);
        let mut job = JobState::new("flood", "block", None).with_limits(limits);
        job.step = Some("python3".into());
        // The bucket starts full at "now"; the flood runs from then on.
        let t0 = boottime_ns();
        agent.start_job(
            1,
            job,
            vec!["python3".into(), "-c".into(), "…".into()],
            &Default::default(),
        );
        for i in 0..10_000u32 {
            let now = t0 + u64::from(i) * SEC / 4_000;
            agent.emit_at(1, blocked(i), now);
            if i % 40 == 0 {
                agent.summarize(now, false);
            }
        }
        agent.finish();
        let events = read_events(io::BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= limits.events_max_bytes, "{size}");

        let written = events
            .iter()
            .filter(|e| matches!(e, Event::Flow(_)))
            .count() as u64;
        let suppressed: u64 = events
            .iter()
            .filter_map(|e| match e {
                Event::Suppressed(s) => Some(s.flows),
                _ => None,
            })
            .sum();
        let truncated: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Truncated(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        assert!(matches!(events[0], Event::Job(_)), "{:?}", events[0]);
        assert!(matches!(events[1], Event::Step(_)));
        assert_eq!(truncated.len(), 1);
        assert!(matches!(events.last(), Some(Event::Truncated(_))));
        // The suppressed lines that found the file full were held over to the last one,
        // which the room kept for final lines took.
        assert!(
            matches!(&events[events.len() - 2], Event::Suppressed(s) if s.flows > 1_000),
            "{:?}",
            events[events.len() - 2]
        );
        let j = &agent.jobs[&1];
        let cuts = j.cuts();
        // Every flow is accounted for: written, suppressed (in a line or in a dropped line),
        // or dropped.
        assert_eq!(cuts.suppressed.flows + written + cuts.dropped.flows, 10_000);
        // Burst 50 + 100/s over 2.5 s: at most 300 got past the rate limit (some of them
        // then found no room in the file).
        assert!(written > 0 && written <= 301, "{written} {cuts:?}");
        // The suppressed lines that fit say what the report calls suppressed; the flows of
        // those that did not fit are in the truncated line.
        assert_eq!(suppressed, cuts.suppressed.flows);
        assert!(
            cuts.suppressed.flows > 0 && cuts.dropped.flows > 0,
            "{cuts:?}"
        );
        assert_eq!(truncated[0].flows, cuts.dropped.flows);
        assert_eq!(truncated[0].events, cuts.dropped.events());
        // The report: every flow counted, rows bounded, cuts in words.
        assert_eq!(j.report.blocked(), 10_000);
        let text = j.report.render(Format::Text);
        assert!(text.contains("10000 flows: 10000 blocked"), "{text}");
        assert!(
            text.contains("not written to the events file: over the rate limit of 100 events/s"),
            "{text}"
        );
        assert!(
            text.contains("dropped: the events file reached its limit of 20 KiB"),
            "{text}"
        );
        assert!(
            text.contains("9900 flows to destinations beyond the first 100 are folded"),
            "{text}"
        );
        // Read back, the file gives the same totals.
        let mut back = Report::new("flood", "block");
        events.iter().for_each(|e| back.add(e));
        assert_eq!(back.blocked(), 10_000);
        assert_eq!(back.cuts(), j.report.cuts());
    }

    /// A written flow event names its process's executable and parent chain; one the rate
    /// limit holds back costs no /proc read.
    #[test]
    fn written_flows_carry_the_parent_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let limits = Limits {
            events_per_sec: 1,
            events_burst: 1,
            ..Limits::unlimited()
        };
        let mut agent = Agent::new(Some(&path), Duration::ZERO, Duration::ZERO).unwrap();
        let job = JobState::new("flood", "block", None).with_limits(limits);
        let t0 = boottime_ns();
        agent.start_job(1, job, vec!["sleep".into()], &Default::default());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap() != "sleep\n" {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let of_child = |i| match blocked(i) {
            Event::Flow(mut f) => {
                f.pid = child.id();
                f.comm = "sleep".into();
                Event::Flow(f)
            }
            _ => unreachable!(),
        };
        agent.emit_at(1, of_child(0), t0);
        let reads = agent.procs.reads;
        assert!(reads >= 2, "{reads}");
        // Held back by the rate limit (burst 1): not written, nothing read.
        for i in 1..100 {
            agent.emit_at(1, of_child(i), t0);
        }
        assert_eq!(agent.procs.reads, reads);
        agent.finish();
        let _ = child.kill();
        let _ = child.wait();
        let events = read_events(io::BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
        let flows: Vec<&FlowEvent> = events
            .iter()
            .filter_map(|e| match e {
                Event::Flow(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(flows.len(), 1);
        let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
        assert_eq!(flows[0].exe.as_deref(), sleep.to_str());
        assert_eq!(flows[0].parents[0].pid, std::process::id());
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(flows[0].parents[0].exe.as_deref(), me.to_str());
    }

    /// The JSON Lines the agent writes for a fixed run of ring-buffer records, byte for
    /// byte: flows of three jobs (names, steps and comms that need escaping, every
    /// protocol, verdict, reason and direction, IPv4, IPv6 and mapped addresses), processes
    /// from a fake `/proc` (exe and parent chain, an exe that needs escaping, a process with
    /// no exe, one gone), names learned from DNS answers, a flow that came in on a device.
    /// The file was written by the agent before its flow lines got a writer of their own
    /// (`RF_BLESS=1` writes it again): how the lines are made may change, not what they say.
    #[test]
    fn flow_lines_are_byte_identical_to_the_golden_file() {
        let golden =
            env!("CARGO_MANIFEST_DIR").to_string() + "/src/agent/testdata/flow_lines.jsonl";
        let dir = tempfile::tempdir().unwrap();
        let proc_root = dir.path().join("proc");
        for (pid, stat, exe) in [
            (100, "100 (node) S 50 1 1 0", Some("/usr/bin/node")),
            (50, "50 (s\"h) S 1 1 1 0", Some("/bin/s\"h\\x")),
            (1, "1 (init) S 0 1 1 0", Some("/sbin/init")),
            (200, "200 (kworker) S 2 0 0 0", None),
            (2, "2 (kthreadd) S 0 0 0 0", None),
            (300, "300 (ünï) S 100 1 1 0", Some("/opt/ünï/bin")),
        ] {
            let d = proc_root.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("stat"), stat).unwrap();
            if let Some(exe) = exe {
                std::os::unix::fs::symlink(exe, d.join("exe")).unwrap();
            }
        }
        let path = dir.path().join("events.jsonl");
        let mut agent = Agent::new(Some(&path), Duration::ZERO, Duration::ZERO).unwrap();
        agent.procs = lineage::ProcCache::with_root(16, proc_root);
        // 2026-11-25T21:04:05.123456Z at boot time 1000 s.
        let wall = std::time::UNIX_EPOCH + Duration::from_micros(1_764_104_645_123_456);
        agent.clock = BootClock::at(1000 * SEC, wall);
        let jobs = [
            (1, "build-42", Some("npm install")),
            (2, "we\"ird\\job\n\u{1}", None),
            (3, "ünïcode ✓", Some("tab\tstep")),
        ];
        for (id, name, step) in jobs {
            let mut j = JobState::new(name, "block", None);
            j.step = step.map(str::to_string);
            agent.jobs.insert(id, j);
        }
        let comm = |s: &[u8]| {
            let mut c = [0i8; 16];
            for (d, b) in c.iter_mut().zip(s) {
                *d = *b as i8;
            }
            c
        };
        // Names for some destinations: an answer for each job.
        for (job, name, addr) in [
            (1u32, "api.example.test", [198, 51, 100, 7]),
            (3, "xn--bcher-kva.example", [203, 0, 113, 9]),
        ] {
            let msg = crate::testkit::testrun::dns_answer(
                7,
                name,
                1,
                &[crate::testkit::testrun::Rr::A(name, 300, addr)],
            );
            let mut ev = abi::rf_dns_event::default();
            ev.hdr.r#type = abi::rf_event_type::RF_EVENT_DNS.0;
            ev.hdr.job_id = job;
            ev.hdr.ts_ns = 999 * SEC;
            ev.server = abi::addr_to_bytes("198.51.100.53".parse().unwrap());
            ev.len = msg.len() as u16;
            ev.flags = abi::DNS_ALLOWED;
            ev.bound = 1;
            let mut rec = abi::bytes_of(&ev).to_vec();
            rec.extend_from_slice(&msg);
            agent.handle(&rec);
        }
        let dsts: [IpAddr; 6] = [
            "198.51.100.7".parse().unwrap(),
            "203.0.113.9".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
            "2001:db8:0:0:1:0:0:1".parse().unwrap(),
            "fe80::1:0:0:0".parse().unwrap(),
            "2001:db8:ab:cd:ef01:2345:6789:abcd".parse().unwrap(),
        ];
        let comms: [&[u8]; 6] = [
            b"node",
            b"sh",
            b"a\"b\\c",
            b"\xff\xfeok",
            b"",
            b"0123456789abcdef",
        ];
        let pids = [100u32, 50, 200, 300, 0, 4_000_000];
        for i in 0..240u32 {
            let mut ev = abi::rf_flow_event::default();
            ev.hdr.r#type = abi::rf_event_type::RF_EVENT_FLOW.0;
            ev.hdr.job_id = 1 + i % 4; // job 4 is unknown: no line
            ev.hdr.ts_ns = 990 * SEC + u64::from(i) * 1_234_567;
            ev.cgroup_id = 4242 + u64::from(i % 3);
            ev.pid = pids[(i / 4) as usize % pids.len()];
            ev.comm = comm(comms[(i / 3) as usize % comms.len()]);
            ev.saddr = abi::addr_to_bytes("198.51.100.1".parse().unwrap());
            ev.daddr = abi::addr_to_bytes(dsts[(i / 2) as usize % dsts.len()]);
            ev.sport = 40000 + i as u16;
            ev.dport = [443, 53, 80, 0, 65535][(i / 5) as usize % 5];
            ev.proto = [6, 17, 1, 58, 132][(i / 7) as usize % 5];
            ev.verdict = (i % 4) as u8; // 3 is out of range: read as blocked
            ev.reason = (i / 11 % 11) as u8; // the last ones out of range: direct-ip
            ev.direction = u8::from(i % 13 == 0);
            // A few came in on a device (a container's link): lo is 1 in every namespace.
            ev.ifindex = u32::from(i % 17 == 0);
            agent.handle(abi::bytes_of(&ev));
        }
        // A step of job 1 starts: later flows carry it.
        agent.jobs.get_mut(&1).unwrap().step = Some("test \u{7f}".into());
        let mut ev = abi::rf_flow_event::default();
        ev.hdr.r#type = abi::rf_event_type::RF_EVENT_FLOW.0;
        ev.hdr.job_id = 1;
        ev.hdr.ts_ns = 1001 * SEC;
        ev.daddr = abi::addr_to_bytes(dsts[0]);
        ev.dport = 443;
        ev.proto = 6;
        agent.handle(abi::bytes_of(&ev));
        drop(agent);
        let got = std::fs::read_to_string(&path).unwrap();
        if std::env::var_os("RF_BLESS").is_some() {
            std::fs::write(&golden, &got).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap();
        assert!(got.lines().count() > 180, "{got}");
        for (n, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            assert_eq!(g, w, "line {}", n + 1);
        }
        assert_eq!(got, want);
    }

    /// A busy drain makes the loop's next tick short; a quiet one gives the tick back.
    #[test]
    fn a_busy_drain_shortens_the_tick() {
        let mut agent = Agent::new(None, Duration::ZERO, Duration::ZERO).unwrap();
        let tick = Duration::from_millis(10);
        assert_eq!(agent.poll_timeout(tick), tick);
        let mut ev = abi::rf_flow_event::default();
        ev.hdr.r#type = abi::rf_event_type::RF_EVENT_FLOW.0;
        for _ in 0..=BUSY_RECORDS {
            agent.handle(abi::bytes_of(&ev));
        }
        agent.flush();
        assert_eq!(agent.poll_timeout(tick), BUSY_TICK);
        for _ in 0..10 {
            agent.handle(abi::bytes_of(&ev));
        }
        agent.flush();
        assert_eq!(agent.poll_timeout(tick), tick);
    }

    #[test]
    fn half_assembled_tcp_answers_are_bounded() {
        let mut agent = Agent::new(None, Duration::ZERO, Duration::ZERO).unwrap();
        agent.jobs.insert(1, JobState::new("j", "block", None));
        let mut ev = abi::rf_dns_event::default();
        ev.hdr.job_id = 1;
        ev.flags = abi::DNS_TCP_SEGMENT | abi::DNS_TCP_FIRST;
        ev.server = abi::addr_to_bytes("198.51.100.53".parse().unwrap());
        // First segments of 60,000-byte answers that never complete, on every client port.
        for port in 0..(MAX_STREAMS as u16 + 100) {
            ev.client_port = port;
            agent.on_segment(&ev, &[0xea, 0x60, 0, 0]);
        }
        assert_eq!(agent.streams.len(), MAX_STREAMS);
        assert_eq!(agent.streams_evicted, 100);
    }

    #[test]
    fn names_are_bounded() {
        let mut job = JobState::new("j", "audit", None).with_limits(Limits {
            max_destinations: 2,
            ..Limits::default()
        });
        let addr = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xc000_0200 + i));
        for i in 0..5 {
            job.remember_name(addr(i), "x.test", 100 * SEC);
        }
        assert_eq!(job.names.len(), 2);
        assert_eq!(job.names_not_kept, 3);
        // An address already there is renamed: it takes no room.
        job.remember_name(addr(1), "y.test", 100 * SEC);
        assert_eq!(job.names.get(addr(1)).map(|n| &**n), Some("y.test"));
        assert_eq!(job.cuts().names_not_kept, 3);
    }

    /// The expiry queue gives addresses back soonest first, whatever order they came in,
    /// each once, and forgets a job's alone.
    #[test]
    fn expiry_queue_orders_by_deadline_and_forgets_a_job() {
        const S: u64 = 1_000_000_000;
        let a = |i: u8| IpAddr::from([198, 51, 100, i]);
        let mut q = Expiry::default();
        assert_eq!(q.next_deadline(), None);
        q.push(30 * S, 7, a(1));
        q.push(10 * S + 1, 7, a(2)); // rounded up to second 11
        q.push(10 * S + 1, 7, a(3));
        q.push(20 * S, 8, a(4));
        q.push(20 * S, 9, a(5));
        assert_eq!(q.len(), 5);
        assert_eq!(q.next_deadline(), Some(11 * S));
        assert_eq!(
            q.pop_due(10 * S + 1),
            None,
            "not due before its second ends"
        );
        let mut got = vec![q.pop_due(11 * S).unwrap(), q.pop_due(11 * S).unwrap()];
        got.sort();
        assert_eq!(got, vec![(7, a(2)), (7, a(3))]);
        assert_eq!(q.pop_due(19 * S), None);
        q.forget_job(8);
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_deadline(), Some(20 * S));
        assert_eq!(q.pop_due(100 * S), Some((9, a(5))));
        // An IPv4 address comes back as IPv4 (kept mapped, as the kernel keys it).
        assert_eq!(q.pop_due(100 * S), Some((7, a(1))));
        assert_eq!((q.pop_due(u64::MAX), q.len()), (None, 0));
        assert!(q.due.is_empty(), "no empty group is left behind");
    }
}
