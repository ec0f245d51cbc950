//! The per-job report: what a job connected to, what was blocked, and which names it resolved.
//!
//! Flow events are aggregated into rows by (domain, address, port, protocol, verdict, reason);
//! each row keeps a count and the earliest event's process and time. Earliest, not first
//! added, so the report does not depend on the order events arrive in.
//!
//! Memory is bounded: past `max_destinations` rows (or DNS names), flows fold into one row
//! per (protocol, verdict, reason) and answers into a count. Every such cut, and the events
//! the agent did not write (rate limit, file size limit), is counted, included in the totals
//! and said in plain words ([`Cuts`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::SystemTime;

use serde::Serialize;
use thiserror::Error;

use crate::trail::baseline::Baseline;
use crate::trail::events::{
    format_ts, Ancestor, Event, FlowEvent, Parents, Proto, Reason, Verdict,
};
use crate::trail::exfil::{Finding, Signal};
use crate::trail::limits::{Bytes, CutCounts, Limits};

#[path = "report_html.rs"]
mod html;

/// How a report is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned table for a terminal or a log.
    Text,
    /// One object, for machines.
    Json,
    /// A GitHub-flavoured table, for a job summary.
    Markdown,
    /// One self-contained page (no scripts, fonts or fetches): the job's insights.
    Html,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown report format {0:?} (expected text, json, markdown or html)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, UnknownFormat> {
        <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| UnknownFormat(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RowKey {
    domain: Option<String>,
    dst: IpAddr,
    port: u16,
    proto: Proto,
    verdict: Verdict,
    reason: Reason,
}

#[derive(Debug, Clone)]
struct Row {
    count: usize,
    first_ts: SystemTime,
    first_pid: u32,
    first_comm: String,
    /// The earliest flow's executable and parent chain (as the events file has them).
    first_exe: Option<std::sync::Arc<str>>,
    first_parents: Parents,
    /// A step's call (see `step_calls`) to a destination new since the baseline.
    new: bool,
    /// The steps its outbound flows came from, each with its own count and earliest
    /// process (one lookup per flow serves both tables).
    steps: Vec<StepHit>,
}

/// A row's outbound flows from one step.
#[derive(Debug, Clone)]
struct StepHit {
    /// Index into `Report::steps`.
    step: usize,
    count: usize,
    first_ts: SystemTime,
    first_pid: u32,
    first_comm: String,
    first_exe: Option<std::sync::Arc<str>>,
    first_parents: Parents,
}

#[derive(Debug, Clone, Default)]
struct DnsRow {
    count: usize,
    /// Distinct answers in the order first seen: the CNAME targets, and the addresses kept
    /// as addresses (17 bytes each, where their text took a `String` and a heap block of
    /// 32–48: a report can hold a million).
    cnames: Vec<Box<str>>,
    addrs: Vec<IpAddr>,
    /// Bound by any answer: the policy is per job, so in practice all or none.
    bound: bool,
    /// Sorted, distinct (one, nearly always: a `BTreeSet` cost a node of ~300 bytes a name).
    rcodes: Vec<Box<str>>,
}

/// A row of flows folded together once `max_destinations` rows exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FoldKey {
    verdict: Verdict,
    reason: Reason,
    proto: u8,
}

/// Answers kept per DNS name (a name can be answered with a new address every time).
const MAX_ANSWERS_PER_NAME: usize = 256;

impl DnsRow {
    /// Answers kept (CNAME targets and addresses).
    fn len(&self) -> usize {
        self.cnames.len() + self.addrs.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps one answer as the event wrote it, if it is new and there is room; false when
    /// it is new and there is not.
    fn add_answer(&mut self, a: &str) -> bool {
        // An address is kept as one, only from its canonical text (what the agent writes):
        // anything else is kept as written.
        let addr = a.parse::<IpAddr>().ok().filter(|ip| ip.to_string() == a);
        let known = match addr {
            Some(ip) => self.addrs.contains(&ip),
            None => self.cnames.iter().any(|n| &**n == a),
        };
        if known {
            return true;
        }
        if self.len() >= MAX_ANSWERS_PER_NAME {
            return false;
        }
        match addr {
            Some(ip) => self.addrs.push(ip),
            None => self.cnames.push(a.into()),
        }
        true
    }

    /// The answers as text: CNAME targets, then addresses, each in the order first seen.
    fn answers(&self) -> impl Iterator<Item = String> + '_ {
        (self.cnames.iter().map(|n| n.to_string())).chain(self.addrs.iter().map(|a| a.to_string()))
    }
}

/// `a, b, c`.
fn join_answers(row: &DnsRow) -> String {
    row.answers().collect::<Vec<_>>().join(", ")
}

/// A row's answers in the JSON report: a list of strings.
struct JsonAnswers<'a>(&'a DnsRow);

impl Serialize for JsonAnswers<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.answers())
    }
}

/// Steps tabled one by one; the flows of later ones are counted, and said to be.
const MAX_STEPS: usize = 256;

/// A step's calls new since the baseline: its index, its label, the calls.
type NewCalls<'a> = (usize, Option<&'a str>, Vec<(CallKey, Row)>);

/// A step's table as rendered: its label, its rows' cells, the calls not listed.
type StepTable<'a> = (Option<&'a str>, Vec<[String; 7]>, usize);

/// One row of a step's table: a destination the step called, and how it was judged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CallKey {
    domain: Option<String>,
    dst: IpAddr,
    port: u16,
    proto: Proto,
    verdict: Verdict,
}

/// One step of the job, as its table needs it (its rows are the `StepHit`s of the main
/// table's rows).
#[derive(Debug, Clone, Default)]
struct Step {
    /// The step's label; None for flows written before any step was named.
    label: Option<String>,
    /// Calls not listed: to destinations folded out of the main table, or past
    /// `max_destinations` step rows (all steps together).
    folded: usize,
    /// When it started: its marker's time, else its earliest flow's.
    started: Option<SystemTime>,
}

/// What was cut to keep a job within its limits. The agent knows the events it did not
/// write; a report read back from a file learns them from its `suppressed` and `truncated`
/// lines. Every count here is also in the report's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Cuts {
    /// Events the rate limit held back (`--events-rate`, `--events-burst`).
    pub suppressed: CutCounts,
    /// Events dropped because the events file reached `--events-max-bytes`.
    pub dropped: CutCounts,
    /// Answer addresses the agent did not remember (its name table was full): flows to
    /// them are not named by their domain.
    pub names_not_kept: u64,
}

/// The kernel's own counters for the job (exec loads its programs for one job), beside
/// which the report's totals can be checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KernelCounts {
    pub new_flows: u64,
    pub allowed: u64,
    /// Packets dropped by a verdict: the first of each blocked flow, and any that followed.
    pub blocked: u64,
    pub audited: u64,
    /// Events lost because the ring buffer was full (verdicts were still enforced).
    pub ringbuf_dropped: u64,
}

/// A job's counts as the metrics endpoint exports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobMetrics {
    pub flows: usize,
    pub allowed: usize,
    pub blocked: usize,
    pub audited: usize,
    pub dns_answers: usize,
    pub dns_answers_bound: usize,
    pub dns_queries_refused: usize,
    /// Distinct findings: DNS exfiltration (domain, signal) and process or dataplane alerts.
    pub findings: usize,
}

/// The report of one job, built from its events.
#[derive(Debug, Clone)]
pub struct Report {
    job: String,
    mode: String,
    /// Looked up for every flow: the fast hasher (seeded, so a job cannot aim its
    /// destinations at one bucket).
    rows: HashMap<RowKey, Row, crate::agent::FastHash>,
    dns: BTreeMap<String, DnsRow>,
    /// DNS exfiltration findings by (domain, signal).
    findings: BTreeMap<(String, Signal), Finding>,
    /// Process-level and dataplane findings (`ptrace-outside-job`, `dataplane-detached`):
    /// (signal, what happened) -> how many times. Bounded like the DNS findings.
    alerts: BTreeMap<(Signal, String), u64>,
    /// What the reader must know about the run itself (events lost, a watch not attached,
    /// an unsafe host setting), in the order given.
    warnings: Vec<String>,
    flows: usize,
    allowed: usize,
    blocked: usize,
    audited: usize,
    dns_answers: usize,
    /// Answers the kernel bound (their name was allowed), and queries it refused (blocked
    /// `dns-query` flows), for the metrics.
    dns_answers_bound: usize,
    dns_queries_refused: usize,
    limits: Limits,
    /// Flows past `limits.max_destinations` rows.
    folded: BTreeMap<FoldKey, usize>,
    folded_flows: usize,
    /// Answers for names past `limits.max_destinations` names, and answers past
    /// MAX_ANSWERS_PER_NAME of one name.
    dns_folded: usize,
    answers_not_listed: usize,
    cuts: Cuts,
    kernel: Option<KernelCounts>,
    /// The job's steps, in the order first named (by a step marker or a flow).
    steps: Vec<Step>,
    /// Rows in every step's table together (`StepHit`s, bounded by `max_destinations`).
    step_rows: usize,
    /// Outbound flows of steps past MAX_STEPS.
    steps_folded: usize,
    /// Earlier runs' destinations: what is not in it is marked new.
    baseline: Option<std::sync::Arc<Baseline>>,
}

impl Report {
    pub fn new(job: &str, mode: &str) -> Self {
        Self {
            job: job.to_owned(),
            mode: mode.to_owned(),
            rows: HashMap::default(),
            dns: BTreeMap::new(),
            findings: BTreeMap::new(),
            alerts: BTreeMap::new(),
            warnings: Vec::new(),
            flows: 0,
            allowed: 0,
            blocked: 0,
            audited: 0,
            dns_answers: 0,
            dns_answers_bound: 0,
            dns_queries_refused: 0,
            limits: Limits::unlimited(),
            folded: BTreeMap::new(),
            folded_flows: 0,
            dns_folded: 0,
            answers_not_listed: 0,
            cuts: Cuts::default(),
            kernel: None,
            steps: Vec::new(),
            step_rows: 0,
            steps_folded: 0,
            baseline: None,
        }
    }

    /// Marks, in every format, each destination no earlier run used.
    pub fn set_baseline(&mut self, b: std::sync::Arc<Baseline>) {
        self.baseline = Some(b);
    }

    /// Whether a destination is new since the baseline (false without one).
    fn is_new(&self, domain: Option<&str>, dst: IpAddr, port: u16) -> bool {
        self.baseline
            .as_ref()
            .is_some_and(|b| !b.knows(domain, dst, port))
    }

    /// Whether a row of the main table is a destination new since the baseline: an
    /// outbound flow (only those have steps) that is not a DNS query finding (its address
    /// is the resolver; the name is judged when it is connected to).
    fn is_new_row(&self, k: &RowKey, r: &Row) -> bool {
        !r.steps.is_empty()
            && !crate::trail::baseline::not_a_destination(k.reason)
            && self.is_new(k.domain.as_deref(), k.dst, k.port)
    }

    /// The limits the job ran under: `max_destinations` bounds the rows from now on, the
    /// others are named when the report says what was cut.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// What the agent cut (it counted every event before deciding not to write it, so the
    /// totals already include them).
    pub fn set_cuts(&mut self, cuts: Cuts) {
        self.cuts = cuts;
    }

    pub fn cuts(&self) -> &Cuts {
        &self.cuts
    }

    pub fn set_kernel_counts(&mut self, k: KernelCounts) {
        self.kernel = Some(k);
    }

    /// Adds flows and answers known only by their counts (a `suppressed` or `truncated`
    /// line read back from a file) to the totals.
    fn add_counts(&mut self, c: &CutCounts) {
        let (flows, blocked, audited) = (c.flows as usize, c.blocked as usize, c.audited as usize);
        self.flows += flows;
        self.blocked += blocked;
        self.audited += audited;
        self.allowed += flows.saturating_sub(blocked + audited);
        self.dns_answers += c.dns as usize;
    }

    /// Adds one event. Events of other jobs are ignored, so a whole host's events file can be
    /// fed to one job's report.
    pub fn add(&mut self, ev: &Event) {
        if ev.job() != self.job {
            return;
        }
        match ev {
            Event::Flow(f) => self.add_flow(f),
            // A finding event is written when first crossed; a later one for the same key
            // (another run's file) does not replace it.
            Event::Finding(f) if !f.signal.is_dns() => {
                let n = self.alerts.len();
                match self.alerts.get_mut(&(f.signal, f.example.clone())) {
                    Some(c) => *c += 1,
                    None if n < crate::trail::exfil::MAX_FINDINGS => {
                        self.alerts.insert((f.signal, f.example.clone()), 1);
                    }
                    None => {}
                }
            }
            Event::Finding(f) => {
                self.findings
                    .entry((f.domain.clone(), f.signal))
                    .or_insert_with(|| Finding {
                        signal: f.signal,
                        domain: f.domain.clone(),
                        value: f.value,
                        threshold: f.threshold,
                        count: 1,
                        example: f.example.clone(),
                    });
            }
            Event::Dns(d) => {
                self.dns_answers += 1;
                self.dns_answers_bound += usize::from(d.bound);
                if !self.dns.contains_key(&d.name) && self.dns.len() >= self.limits.max_destinations
                {
                    self.dns_folded += 1;
                    return;
                }
                let row = self.dns.entry(d.name.clone()).or_default();
                row.count += 1;
                row.bound |= d.bound;
                if let Err(i) = row.rcodes.binary_search_by(|r| (**r).cmp(d.rcode.as_str())) {
                    row.rcodes.insert(i, d.rcode.as_str().into());
                }
                for a in &d.answers {
                    if !row.add_answer(a) {
                        self.answers_not_listed += 1;
                    }
                }
            }
            Event::Job(j) => self.limits = j.limits,
            Event::Step(st) => {
                if let Some(i) = self.step_index(Some(&st.step)) {
                    let s = &mut self.steps[i];
                    s.started = Some(s.started.map_or(st.ts, |t| t.min(st.ts)));
                }
            }
            // Read back from a file: these flows and answers exist only as counts.
            Event::Suppressed(s) => {
                let c = CutCounts::from(s);
                self.add_counts(&c);
                self.cuts.suppressed.add(&c);
            }
            Event::Truncated(t) => {
                let c = CutCounts {
                    flows: t.flows,
                    blocked: t.blocked,
                    audited: t.audited,
                    dns: t.dns,
                    other: t.events.saturating_sub(t.flows + t.dns),
                };
                self.add_counts(&c);
                self.cuts.dropped.add(&c);
                self.limits.events_max_bytes = t.max_bytes;
            }
        }
    }

    /// The index of the step labelled `label` in `steps`, added if new; None past MAX_STEPS.
    /// Searched from the latest: flows mostly belong to the step running now.
    fn step_index(&mut self, label: Option<&str>) -> Option<usize> {
        if let Some(i) = self.steps.iter().rposition(|s| s.label.as_deref() == label) {
            return Some(i);
        }
        if self.steps.len() >= MAX_STEPS {
            return None;
        }
        self.steps.push(Step {
            label: label.map(str::to_owned),
            folded: 0,
            started: None,
        });
        Some(self.steps.len() - 1)
    }

    fn add_flow(&mut self, f: &FlowEvent) {
        // The step an outbound call was made from (inbound flows are not calls).
        let step = if f.direction.is_outbound() {
            let s = self.step_index(f.step.as_deref());
            if s.is_none() {
                self.steps_folded += 1;
            }
            if let Some(i) = s {
                let st = &mut self.steps[i];
                st.started = Some(st.started.map_or(f.ts, |t| t.min(f.ts)));
            }
            s
        } else {
            None
        };
        self.flows += 1;
        match f.verdict {
            Verdict::Allowed => self.allowed += 1,
            Verdict::Blocked => self.blocked += 1,
            Verdict::Audited => self.audited += 1,
        }
        if f.verdict == Verdict::Blocked && f.reason == Reason::DnsQuery {
            self.dns_queries_refused += 1;
        }
        let key = RowKey {
            domain: f.domain.clone(),
            dst: f.dst,
            port: f.port,
            // Through the number, so Other(6) and Tcp share a row.
            proto: Proto::from(u8::from(f.proto)),
            verdict: f.verdict,
            reason: f.reason,
        };
        let max = self.limits.max_destinations;
        // One hash for a row seen before (most flows), two for a new one.
        if let Some(row) = self.rows.get_mut(&key) {
            Self::count_in(row, f, step, &mut self.step_rows, max, &mut self.steps);
            return;
        }
        if self.rows.len() >= max {
            self.folded_flows += 1;
            *self
                .folded
                .entry(FoldKey {
                    verdict: f.verdict,
                    reason: f.reason,
                    proto: u8::from(f.proto),
                })
                .or_default() += 1;
            if let Some(i) = step {
                self.steps[i].folded += 1;
            }
            return;
        }
        let first = || Row {
            count: 0,
            first_ts: f.ts,
            first_pid: f.pid,
            first_comm: f.comm.clone(),
            first_exe: f.exe.clone(),
            first_parents: f.parents.clone(),
            new: false,
            steps: Vec::new(),
        };
        let row = self.rows.entry(key).or_insert_with(first);
        Self::count_in(row, f, step, &mut self.step_rows, max, &mut self.steps);
    }

    /// Counts flow `f` (from step `step`) in its row.
    fn count_in(
        row: &mut Row,
        f: &FlowEvent,
        step: Option<usize>,
        step_rows: &mut usize,
        max: usize,
        steps: &mut [Step],
    ) {
        if f.ts < row.first_ts {
            row.first_ts = f.ts;
            row.first_pid = f.pid;
            row.first_comm.clone_from(&f.comm);
            row.first_exe.clone_from(&f.exe);
            row.first_parents.clone_from(&f.parents);
        }
        row.count += 1;
        let Some(i) = step else {
            return;
        };
        match row.steps.iter_mut().find(|h| h.step == i) {
            Some(h) => {
                if f.ts < h.first_ts {
                    h.first_ts = f.ts;
                    h.first_pid = f.pid;
                    h.first_comm.clone_from(&f.comm);
                    h.first_exe.clone_from(&f.exe);
                    h.first_parents.clone_from(&f.parents);
                }
                h.count += 1;
            }
            None if *step_rows < max => {
                *step_rows += 1;
                row.steps.push(StepHit {
                    step: i,
                    count: 1,
                    first_ts: f.ts,
                    first_pid: f.pid,
                    first_comm: f.comm.clone(),
                    first_exe: f.exe.clone(),
                    first_parents: f.parents.clone(),
                });
            }
            None => steps[i].folded += 1,
        }
    }

    /// Replaces the findings with the detector's current ones, whose values and counts kept
    /// growing after the events were written.
    pub fn set_findings(&mut self, findings: Vec<Finding>) {
        self.findings = findings
            .into_iter()
            .map(|f| ((f.domain.clone(), f.signal), f))
            .collect();
    }

    /// The DNS exfiltration findings, by domain then signal.
    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.values()
    }

    /// Adds a warning about the run (shown in every format; a repeat is ignored).
    pub fn warn(&mut self, text: impl Into<String>) {
        let text = text.into();
        if !self.warnings.contains(&text) {
            self.warnings.push(text);
        }
    }

    /// The process-level and dataplane findings: (signal, what happened, times seen).
    pub fn alerts(&self) -> impl Iterator<Item = (Signal, &str, u64)> {
        self.alerts
            .iter()
            .map(|((s, what), n)| (*s, what.as_str(), *n))
    }

    /// The alerts' lines, unescaped.
    fn alert_lines(&self) -> Vec<String> {
        self.alerts()
            .map(|(s, what, n)| {
                if n > 1 {
                    format!("{s}: {what} ({n} times)")
                } else {
                    format!("{s}: {what}")
                }
            })
            .collect()
    }

    /// The findings' table cells, unescaped.
    fn finding_cells(&self) -> Vec<[String; 6]> {
        self.findings
            .values()
            .map(|f| {
                [
                    f.domain.clone(),
                    f.signal.to_string(),
                    number(f.value),
                    number(f.threshold),
                    f.count.to_string(),
                    f.example.clone(),
                ]
            })
            .collect()
    }

    /// (flows, allowed, blocked, audited) so far, for `ringfence status`.
    pub fn totals(&self) -> (usize, usize, usize, usize) {
        (self.flows, self.allowed, self.blocked, self.audited)
    }

    /// The job's counts for the metrics endpoint (every event so far, written or not).
    pub fn metrics(&self) -> JobMetrics {
        JobMetrics {
            flows: self.flows,
            allowed: self.allowed,
            blocked: self.blocked,
            audited: self.audited,
            dns_answers: self.dns_answers,
            dns_answers_bound: self.dns_answers_bound,
            dns_queries_refused: self.dns_queries_refused,
            findings: self.findings.len() + self.alerts.len(),
        }
    }

    /// Flow events the kernel blocked.
    pub fn blocked(&self) -> usize {
        self.blocked
    }

    /// The blocked destinations, in report order, for `--fail-on-block` (every blocked flow
    /// is counted in `flows`; flows folded past the row limit are counted, not listed).
    pub fn blocked_calls(&self) -> crate::trail::blocked::Blocked {
        let calls = self
            .sorted_rows()
            .into_iter()
            .filter(|(k, _)| k.verdict == Verdict::Blocked)
            .map(|(k, r)| crate::trail::blocked::BlockedCall {
                domain: k.domain.clone(),
                dst: k.dst.to_string(),
                port: k.port,
                proto: k.proto.to_string(),
                reason: k.reason.to_string(),
                comm: r.first_comm.clone(),
                pid: r.first_pid,
                count: r.count,
            })
            .collect();
        crate::trail::blocked::Blocked {
            flows: self.blocked,
            calls,
        }
    }

    /// Flow events that would have been blocked in block mode (audit mode let them pass).
    pub fn audited(&self) -> usize {
        self.audited
    }

    pub fn render(&self, f: Format) -> String {
        match f {
            Format::Text => self.render_text(),
            Format::Json => self.render_json(),
            Format::Markdown => self.render_markdown(),
            Format::Html => html::render(self),
        }
    }

    /// Rows in report order: blocked, then audited (what the user must look at), then allowed;
    /// within each, by domain (unknown last), address, port, protocol, reason.
    fn sorted_rows(&self) -> Vec<(&RowKey, &Row)> {
        let rank = verdict_rank;
        let mut rows: Vec<_> = self.rows.iter().collect();
        rows.sort_by(|(a, _), (b, _)| {
            (
                rank(a.verdict),
                a.domain.is_none(),
                &a.domain,
                a.dst,
                a.port,
            )
                .cmp(&(
                    rank(b.verdict),
                    b.domain.is_none(),
                    &b.domain,
                    b.dst,
                    b.port,
                ))
                .then(u8::from(a.proto).cmp(&u8::from(b.proto)))
                .then(a.reason.cmp(&b.reason))
        });
        rows
    }

    /// Folded flows in report order, like the rows.
    fn sorted_folds(&self) -> Vec<(FoldKey, usize)> {
        let mut v: Vec<_> = self.folded.iter().map(|(k, n)| (*k, *n)).collect();
        v.sort_by_key(|(k, _)| (verdict_rank(k.verdict), k.proto, k.reason));
        v
    }

    /// What was cut, in plain words; empty when nothing was.
    pub fn cut_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        let l = &self.limits;
        let max = l.max_destinations;
        let s = &self.cuts.suppressed;
        if !s.is_empty() {
            notes.push(format!(
                "{} not written to the events file: over the rate limit of {} events/s \
                 (burst {}; --events-rate, --events-burst). They are counted above.",
                kinds(s),
                l.events_per_sec,
                l.events_burst
            ));
        }
        let d = &self.cuts.dropped;
        if !d.is_empty() {
            notes.push(format!(
                "{} dropped: the events file reached its limit of {} (--events-max-bytes). \
                 They are counted above; the file ends with a \"truncated\" line.",
                kinds(d),
                Bytes(l.events_max_bytes)
            ));
        }
        if self.folded_flows > 0 {
            notes.push(format!(
                "{} flows to destinations beyond the first {max} are folded into the \
                 (others) rows (--max-destinations).",
                self.folded_flows
            ));
        }
        if self.dns_folded > 0 {
            notes.push(format!(
                "{} DNS answers for names beyond the first {max} are counted but not listed \
                 (--max-destinations).",
                self.dns_folded
            ));
        }
        if self.answers_not_listed > 0 {
            notes.push(format!(
                "{} answer addresses beyond {MAX_ANSWERS_PER_NAME} per name are not listed.",
                self.answers_not_listed
            ));
        }
        let step_folded: usize = self.steps.iter().map(|s| s.folded).sum();
        if step_folded > 0 {
            notes.push(format!(
                "{step_folded} outbound calls are not listed under their step: their \
                 destinations are beyond the first {max} (--max-destinations)."
            ));
        }
        if self.steps_folded > 0 {
            notes.push(format!(
                "{} outbound calls of steps beyond the first {MAX_STEPS} are not listed by step.",
                self.steps_folded
            ));
        }
        if self.cuts.names_not_kept > 0 {
            notes.push(format!(
                "{} answer addresses were not remembered for naming flows (more than {max}; \
                 --max-destinations): flows to them show no domain.",
                self.cuts.names_not_kept
            ));
        }
        notes
    }

    fn summary(&self) -> String {
        format!(
            "{} flows: {} blocked, {} audited, {} allowed",
            self.flows, self.blocked, self.audited, self.allowed
        )
    }

    /// The table cells of each row, then of the folded rows, unescaped.
    fn cells(&self) -> Vec<[String; 8]> {
        let folds = self.sorted_folds().into_iter().map(|(k, n)| {
            [
                "-".to_owned(),
                "(others)".to_owned(),
                "*".to_owned(),
                Proto::from(k.proto).to_string(),
                k.verdict.to_string(),
                k.reason.to_string(),
                n.to_string(),
                "-".to_owned(),
            ]
        });
        self.sorted_rows()
            .into_iter()
            .map(|(k, r)| {
                [
                    k.domain.clone().unwrap_or_else(|| "-".to_owned()),
                    k.dst.to_string(),
                    k.port.to_string(),
                    k.proto.to_string(),
                    k.verdict.to_string(),
                    k.reason.to_string(),
                    r.count.to_string(),
                    process(r),
                ]
            })
            .chain(folds)
            .collect()
    }

    /// The per-step tables, when the job has more than one step (a job of one step keeps
    /// the report it always had): each step's label and its rows' cells, unescaped, in the
    /// order of the main table.
    fn step_cells(&self) -> Vec<StepTable<'_>> {
        if self.steps.len() < 2 {
            return Vec::new();
        }
        self.steps
            .iter()
            .enumerate()
            .map(|(i, st)| {
                let cells = call_cells(&self.step_calls(i));
                (st.label.as_deref(), cells, st.folded)
            })
            .collect()
    }

    /// Step `i`'s calls in report order (blocked, audited, allowed; then domain, unknown
    /// last, address, port, protocol): its hits in the main table's rows, rows that differ
    /// only by reason merged.
    fn step_calls(&self, i: usize) -> Vec<(CallKey, Row)> {
        let mut calls: HashMap<CallKey, Row> = HashMap::new();
        for (k, r) in &self.rows {
            for h in r.steps.iter().filter(|h| h.step == i) {
                let key = CallKey {
                    domain: k.domain.clone(),
                    dst: k.dst,
                    port: k.port,
                    proto: k.proto,
                    verdict: k.verdict,
                };
                let hit = Row {
                    count: h.count,
                    first_ts: h.first_ts,
                    first_pid: h.first_pid,
                    first_comm: h.first_comm.clone(),
                    first_exe: h.first_exe.clone(),
                    first_parents: h.first_parents.clone(),
                    new: self.is_new_row(k, r),
                    steps: Vec::new(),
                };
                match calls.get_mut(&key) {
                    Some(c) => {
                        c.count += hit.count;
                        c.new |= hit.new;
                        if hit.first_ts < c.first_ts {
                            *c = Row {
                                count: c.count,
                                new: c.new,
                                ..hit
                            };
                        }
                    }
                    None => {
                        calls.insert(key, hit);
                    }
                }
            }
        }
        let mut v: Vec<_> = calls.into_iter().collect();
        v.sort_by(|(a, _), (b, _)| {
            (
                verdict_rank(a.verdict),
                a.domain.is_none(),
                &a.domain,
                a.dst,
                a.port,
            )
                .cmp(&(
                    verdict_rank(b.verdict),
                    b.domain.is_none(),
                    &b.domain,
                    b.dst,
                    b.port,
                ))
                .then(u8::from(a.proto).cmp(&u8::from(b.proto)))
        });
        v
    }

    /// The calls to destinations no earlier run used, per step (steps without any left
    /// out); None without a baseline.
    fn new_calls(&self) -> Option<Vec<NewCalls<'_>>> {
        self.baseline.as_ref()?;
        Some(
            self.steps
                .iter()
                .enumerate()
                .map(|(i, st)| {
                    let calls: Vec<_> = self
                        .step_calls(i)
                        .into_iter()
                        .filter(|(_, r)| r.new)
                        .collect();
                    (i, st.label.as_deref(), calls)
                })
                .filter(|(_, _, c)| !c.is_empty())
                .collect(),
        )
    }

    /// The baseline's heading line: how many runs, how many new destinations.
    fn new_heading(&self, new: &[NewCalls<'_>]) -> String {
        let runs = self.baseline.as_ref().map_or(0, |b| b.runs);
        let dests: BTreeSet<String> = new
            .iter()
            .flat_map(|(_, _, c)| c)
            .map(|(k, _)| crate::trail::baseline::destination(k.domain.as_deref(), k.dst, k.port))
            .collect();
        match dests.len() {
            0 => format!("Nothing new since the baseline ({runs} earlier runs)"),
            1 => format!("1 destination new since the baseline ({runs} earlier runs)"),
            n => format!("{n} destinations new since the baseline ({runs} earlier runs)"),
        }
    }

    /// The note on destinations the baseline could not hold.
    fn baseline_note(&self) -> Option<String> {
        let b = self.baseline.as_ref()?;
        (b.not_kept > 0).then(|| {
            format!(
                "the baseline holds at most {} destinations: {} more of the earlier runs were not kept, and show as new if used again",
                crate::trail::baseline::MAX_DESTINATIONS,
                b.not_kept
            )
        })
    }

    fn dns_line(name: &str, row: &DnsRow) -> String {
        let answers = if row.is_empty() {
            // No answers: the response code is the interesting part (NXDOMAIN, SERVFAIL…).
            row.rcodes.join(", ")
        } else {
            join_answers(row)
        };
        let bound = if row.bound { "bound" } else { "not bound" };
        format!("{name} -> {answers} ({bound})")
    }

    fn render_text(&self) -> String {
        let mut out = format!(
            "ringfence report: job {}, mode {}: {}\n",
            text_clean(&self.job),
            text_clean(&self.mode),
            self.summary()
        );
        let notes = self.cut_notes();
        if !notes.is_empty() {
            out.push_str("Cut to stay within limits:\n");
            for n in &notes {
                let _ = writeln!(out, "  - {}", text_clean(n));
            }
        }
        if let Some(new) = self.new_calls() {
            let _ = writeln!(out, "{}", self.new_heading(&new));
            for (i, label, calls) in &new {
                let _ = writeln!(out, "  {}", text_clean(&step_title(*i, *label)));
                let mut table = vec![STEP_HEADERS.map(str::to_owned)];
                table.extend(
                    call_cells(calls)
                        .into_iter()
                        .map(|row| row.map(|c| text_clean(&c))),
                );
                text_table(&mut out, "    ", &table);
            }
            if let Some(n) = self.baseline_note() {
                let _ = writeln!(out, "  ({})", text_clean(&n));
            }
        }
        let cells = self.cells();
        if cells.is_empty() {
            out.push_str("No outbound flows.\n");
        } else {
            let mut table = vec![HEADERS.map(str::to_owned)];
            table.extend(cells.into_iter().map(|row| row.map(|c| text_clean(&c))));
            let mut widths = [0; 8];
            for row in &table {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count());
                }
            }
            out.push('\n');
            for row in &table {
                let mut line = String::new();
                for (i, (c, w)) in row.iter().zip(widths).enumerate() {
                    if i + 1 < row.len() {
                        let _ = write!(line, "{c:<w$}  ");
                    } else {
                        line.push_str(c);
                    }
                }
                out.push_str(&line);
                out.push('\n');
            }
        }
        let steps = self.step_cells();
        if !steps.is_empty() {
            out.push_str("\nOutbound calls made from each step\n");
            for (i, (label, cells, folded)) in steps.into_iter().enumerate() {
                let _ = writeln!(out, "  {}", text_clean(&step_title(i, label)));
                if cells.is_empty() && folded == 0 {
                    out.push_str("    No outbound calls.\n");
                    continue;
                }
                let mut table = vec![STEP_HEADERS.map(str::to_owned)];
                table.extend(cells.into_iter().map(|row| row.map(|c| text_clean(&c))));
                text_table(&mut out, "    ", &table);
                if folded > 0 {
                    let _ = writeln!(out, "    (and {folded} calls not listed: see above)");
                }
            }
        }
        let findings = self.finding_cells();
        if !findings.is_empty() {
            out.push_str("\nFindings (DNS exfiltration signals: value above threshold)\n");
            let mut table = vec![FINDING_HEADERS.map(str::to_owned)];
            table.extend(findings.into_iter().map(|row| row.map(|c| text_clean(&c))));
            let mut widths = [0; 6];
            for row in &table {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count());
                }
            }
            for row in &table {
                out.push_str("  ");
                for (i, (c, w)) in row.iter().zip(widths).enumerate() {
                    if i + 1 < row.len() {
                        let _ = write!(out, "{c:<w$}  ");
                    } else {
                        out.push_str(c);
                    }
                }
                out.push('\n');
            }
        }
        let alerts = self.alert_lines();
        if !alerts.is_empty() {
            out.push_str("\nFindings (what the dataplane cannot judge)\n");
            for a in alerts {
                let _ = writeln!(out, "  {}", text_clean(&a));
            }
        }
        if !self.dns.is_empty() {
            out.push_str("\nDNS\n");
            for (name, row) in &self.dns {
                let _ = writeln!(out, "  {}", text_clean(&Self::dns_line(name, row)));
            }
        }
        for w in &self.warnings {
            let _ = write!(out, "\nwarning: {}\n", text_clean(w));
        }
        out
    }

    fn render_markdown(&self) -> String {
        let mut out = format!(
            "### ringfence: job {} ({} mode)\n\n",
            md_escape(&self.job),
            md_escape(&self.mode),
        );
        // First, for $GITHUB_STEP_SUMMARY: what this run called that no earlier run did.
        if let Some(new) = self.new_calls() {
            let _ = writeln!(out, "**{}**\n", self.new_heading(&new));
            for (i, label, calls) in &new {
                let _ = write!(out, "*{}*\n\n", md_escape(&step_title(*i, *label)));
                md_table(
                    &mut out,
                    "| Domain | Address | Port | Proto | Verdict | Count | Process |\n\
                     |---|---|---|---|---|---:|---|\n",
                    call_cells(calls),
                );
                out.push('\n');
            }
            if let Some(n) = self.baseline_note() {
                let _ = writeln!(out, "> {}\n", md_escape(&n));
            }
        }
        let _ = write!(out, "{}.\n\n", self.summary());
        let notes = self.cut_notes();
        if !notes.is_empty() {
            out.push_str("**Cut to stay within limits:**\n\n");
            for n in &notes {
                let _ = writeln!(out, "- {}", md_escape(n));
            }
            out.push('\n');
        }
        let cells = self.cells();
        if cells.is_empty() {
            out.push_str("No outbound flows.\n");
        } else {
            md_table(
                &mut out,
                "| Domain | Address | Port | Proto | Verdict | Reason | Count | First process |\n\
                 |---|---|---|---|---|---|---:|---|\n",
                cells,
            );
        }
        let steps = self.step_cells();
        if !steps.is_empty() {
            out.push_str("\n#### Outbound calls made from each step\n");
            for (i, (label, cells, folded)) in steps.into_iter().enumerate() {
                let _ = write!(out, "\n**{}**\n\n", md_escape(&step_title(i, label)));
                if cells.is_empty() && folded == 0 {
                    out.push_str("No outbound calls.\n");
                    continue;
                }
                md_table(
                    &mut out,
                    "| Domain | Address | Port | Proto | Verdict | Count | Process |\n\
                     |---|---|---|---|---|---:|---|\n",
                    cells,
                );
                if folded > 0 {
                    let _ = writeln!(out, "\n(and {folded} calls not listed: see above)");
                }
            }
        }
        let findings = self.finding_cells();
        if !findings.is_empty() {
            out.push_str("\nFindings (DNS exfiltration signals: value above threshold):\n\n");
            md_table(
                &mut out,
                "| Domain | Signal | Value | Threshold | Count | Example |\n\
                 |---|---|---:|---:|---:|---|\n",
                findings,
            );
        }
        let alerts = self.alert_lines();
        if !alerts.is_empty() {
            out.push_str("\nFindings (what the dataplane cannot judge):\n\n");
            for a in alerts {
                let _ = writeln!(out, "- {}", md_escape(&a));
            }
        }
        if !self.dns.is_empty() {
            out.push_str("\nDNS:\n\n");
            for (name, row) in &self.dns {
                let _ = writeln!(out, "- {}", md_escape(&Self::dns_line(name, row)));
            }
        }
        for w in &self.warnings {
            let _ = write!(out, "\n> **warning:** {}\n", md_escape(w));
        }
        out
    }

    fn render_json(&self) -> String {
        #[derive(Serialize)]
        struct Totals {
            flows: usize,
            blocked: usize,
            audited: usize,
            allowed: usize,
            dns_answers: usize,
        }
        #[derive(Serialize)]
        struct JsonRow<'a> {
            domain: Option<&'a str>,
            address: IpAddr,
            port: u16,
            proto: Proto,
            verdict: Verdict,
            reason: Reason,
            count: usize,
            first_pid: u32,
            first_comm: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            first_exe: Option<&'a str>,
            #[serde(skip_serializing_if = "<[Ancestor]>::is_empty")]
            first_parents: &'a [Ancestor],
            first_ts: String,
            /// Absent unless a baseline was given and no earlier run used it.
            #[serde(skip_serializing_if = "is_false")]
            new: bool,
        }
        #[derive(Serialize)]
        struct JsonCall {
            domain: Option<String>,
            address: IpAddr,
            port: u16,
            proto: Proto,
            verdict: Verdict,
            count: usize,
            first_pid: u32,
            first_comm: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            first_exe: Option<std::sync::Arc<str>>,
            #[serde(skip_serializing_if = "<[Ancestor]>::is_empty")]
            first_parents: Parents,
            first_ts: String,
            #[serde(skip_serializing_if = "is_false")]
            new: bool,
        }
        #[derive(Serialize)]
        struct JsonNew<'a> {
            step: Option<&'a str>,
            #[serde(flatten)]
            call: JsonCall,
        }
        #[derive(Serialize)]
        struct JsonBaseline<'a> {
            runs: usize,
            #[serde(skip_serializing_if = "is_zero")]
            not_kept: usize,
            /// The calls to destinations no earlier run used, step by step.
            new: Vec<JsonNew<'a>>,
        }
        #[derive(Serialize)]
        struct JsonStep<'a> {
            step: Option<&'a str>,
            calls: Vec<JsonCall>,
            #[serde(skip_serializing_if = "is_zero")]
            folded: usize,
        }
        #[derive(Serialize)]
        struct JsonDns<'a> {
            name: &'a str,
            answers: JsonAnswers<'a>,
            bound: bool,
            count: usize,
            rcodes: &'a [Box<str>],
        }
        #[derive(Serialize)]
        struct JsonFinding<'a> {
            domain: &'a str,
            signal: Signal,
            value: f64,
            threshold: f64,
            count: u64,
            example: &'a str,
        }
        #[derive(Serialize)]
        struct JsonAlert<'a> {
            signal: Signal,
            what: &'a str,
            count: u64,
        }
        #[derive(Serialize)]
        struct JsonFold {
            proto: Proto,
            verdict: Verdict,
            reason: Reason,
            count: usize,
        }
        #[derive(Serialize)]
        struct JsonCuts<'a> {
            #[serde(flatten)]
            cuts: &'a Cuts,
            folded_flows: usize,
            folded_dns_answers: usize,
            answers_not_listed: usize,
            limits: &'a Limits,
            /// The same in words, as the text report says it.
            notes: Vec<String>,
        }
        #[derive(Serialize)]
        struct JsonReport<'a> {
            job: &'a str,
            mode: &'a str,
            totals: Totals,
            #[serde(skip_serializing_if = "Option::is_none")]
            baseline: Option<JsonBaseline<'a>>,
            // Absent unless something was cut or the kernel's counters are known, so the
            // report of an ordinary job keeps its shape.
            #[serde(skip_serializing_if = "Option::is_none")]
            cuts: Option<JsonCuts<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            kernel: Option<KernelCounts>,
            rows: Vec<JsonRow<'a>>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            folded: Vec<JsonFold>,
            // Only for a job of more than one step, so a one-step job's report keeps its
            // shape.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            steps: Vec<JsonStep<'a>>,
            // Absent rather than empty, so reports of jobs without findings keep their shape.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            findings: Vec<JsonFinding<'a>>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            alerts: Vec<JsonAlert<'a>>,
            dns: Vec<JsonDns<'a>>,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            warnings: &'a [String],
        }
        let json_call = |k: CallKey, r: Row| JsonCall {
            new: r.new,
            domain: k.domain,
            address: k.dst,
            port: k.port,
            proto: k.proto,
            verdict: k.verdict,
            count: r.count,
            first_pid: r.first_pid,
            first_comm: r.first_comm,
            first_exe: r.first_exe,
            first_parents: r.first_parents,
            first_ts: format_ts(r.first_ts),
        };
        let report = JsonReport {
            baseline: self.new_calls().map(|new| JsonBaseline {
                runs: self.baseline.as_ref().map_or(0, |b| b.runs),
                not_kept: self.baseline.as_ref().map_or(0, |b| b.not_kept),
                new: new
                    .into_iter()
                    .flat_map(|(_, label, calls)| {
                        calls.into_iter().map(move |(k, r)| JsonNew {
                            step: label,
                            call: json_call(k, r),
                        })
                    })
                    .collect(),
            }),
            job: &self.job,
            mode: &self.mode,
            totals: Totals {
                flows: self.flows,
                blocked: self.blocked,
                audited: self.audited,
                allowed: self.allowed,
                dns_answers: self.dns_answers,
            },
            cuts: Some(self.cut_notes())
                .filter(|n| !n.is_empty())
                .map(|notes| JsonCuts {
                    cuts: &self.cuts,
                    folded_flows: self.folded_flows,
                    folded_dns_answers: self.dns_folded,
                    answers_not_listed: self.answers_not_listed,
                    limits: &self.limits,
                    notes,
                }),
            kernel: self.kernel,
            folded: self
                .sorted_folds()
                .into_iter()
                .map(|(k, count)| JsonFold {
                    proto: Proto::from(k.proto),
                    verdict: k.verdict,
                    reason: k.reason,
                    count,
                })
                .collect(),
            rows: self
                .sorted_rows()
                .into_iter()
                .map(|(k, r)| JsonRow {
                    domain: k.domain.as_deref(),
                    address: k.dst,
                    port: k.port,
                    proto: k.proto,
                    verdict: k.verdict,
                    reason: k.reason,
                    count: r.count,
                    first_pid: r.first_pid,
                    first_comm: &r.first_comm,
                    first_exe: r.first_exe.as_deref(),
                    first_parents: &r.first_parents,
                    first_ts: format_ts(r.first_ts),
                    // Only outbound flows have steps: an inbound peer is no destination.
                    new: self.is_new_row(k, r),
                })
                .collect(),
            steps: if self.steps.len() < 2 {
                Vec::new()
            } else {
                self.steps
                    .iter()
                    .enumerate()
                    .map(|(i, st)| JsonStep {
                        step: st.label.as_deref(),
                        calls: self
                            .step_calls(i)
                            .into_iter()
                            .map(|(k, r)| json_call(k, r))
                            .collect(),
                        folded: st.folded,
                    })
                    .collect()
            },
            findings: self
                .findings
                .values()
                .map(|f| JsonFinding {
                    domain: &f.domain,
                    signal: f.signal,
                    value: f.value,
                    threshold: f.threshold,
                    count: f.count,
                    example: &f.example,
                })
                .collect(),
            alerts: self
                .alerts()
                .map(|(signal, what, count)| JsonAlert {
                    signal,
                    what,
                    count,
                })
                .collect(),
            dns: self
                .dns
                .iter()
                .map(|(name, d)| JsonDns {
                    name,
                    answers: JsonAnswers(d),
                    bound: d.bound,
                    count: d.count,
                    rcodes: &d.rcodes,
                })
                .collect(),
            warnings: &self.warnings,
        };
        let mut s = serde_json::to_string_pretty(&report)
            .expect("the report is plain data with string keys");
        s.push('\n');
        s
    }
}

/// "comm[pid]" of a row's earliest flow; "-" for pid 0: the kernel could not tell (no
/// socket owner recorded and no task to ask, e.g. a socket opened before the job started).
fn process(r: &Row) -> String {
    if r.first_pid == 0 {
        "-".to_owned()
    } else {
        format!("{}[{}]", r.first_comm, r.first_pid)
    }
}

/// A step's label as a heading says it.
fn step_title(i: usize, label: Option<&str>) -> String {
    match label {
        Some(l) => format!("Step {}: {l}", i + 1),
        None => format!("Step {}: (before any step was named)", i + 1),
    }
}

/// An aligned table (headers first), each line indented by `indent`.
fn text_table<const N: usize>(out: &mut String, indent: &str, table: &[[String; N]]) {
    let mut widths = [0; N];
    for row in table {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in table {
        out.push_str(indent);
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 < row.len() {
                let _ = write!(out, "{c:<w$}  ");
            } else {
                out.push_str(c);
            }
        }
        out.push('\n');
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A step table's cells for these calls, unescaped.
fn call_cells(calls: &[(CallKey, Row)]) -> Vec<[String; 7]> {
    calls
        .iter()
        .map(|(k, r)| {
            [
                k.domain.clone().unwrap_or_else(|| "-".to_owned()),
                k.dst.to_string(),
                k.port.to_string(),
                k.proto.to_string(),
                k.verdict.to_string(),
                r.count.to_string(),
                process(r),
            ]
        })
        .collect()
}

fn verdict_rank(v: Verdict) -> u8 {
    match v {
        Verdict::Blocked => 0,
        Verdict::Audited => 1,
        Verdict::Allowed => 2,
    }
}

/// "12 flow events (10 blocked, 2 audited) and 3 DNS answer events", and other lines.
fn kinds(c: &CutCounts) -> String {
    let mut parts = Vec::new();
    if c.flows > 0 {
        let mut of = Vec::new();
        if c.blocked > 0 {
            of.push(format!("{} blocked", c.blocked));
        }
        if c.audited > 0 {
            of.push(format!("{} audited", c.audited));
        }
        let allowed = c.flows.saturating_sub(c.blocked + c.audited);
        if allowed > 0 {
            of.push(format!("{allowed} allowed"));
        }
        parts.push(format!("{} flow events ({})", c.flows, of.join(", ")));
    }
    if c.dns > 0 {
        parts.push(format!("{} DNS answer events", c.dns));
    }
    if c.other > 0 {
        parts.push(format!("{} other lines", c.other));
    }
    parts.join(" and ")
}

const HEADERS: [&str; 8] = [
    "DOMAIN",
    "ADDRESS",
    "PORT",
    "PROTO",
    "VERDICT",
    "REASON",
    "COUNT",
    "FIRST PROCESS",
];

const STEP_HEADERS: [&str; 7] = [
    "DOMAIN", "ADDRESS", "PORT", "PROTO", "VERDICT", "COUNT", "PROCESS",
];

const FINDING_HEADERS: [&str; 6] = ["DOMAIN", "SIGNAL", "VALUE", "THRESHOLD", "COUNT", "EXAMPLE"];

/// Whole numbers without decimals (label lengths, name counts), others with two (entropy).
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A process picks its own `comm`, and job and step names come from CI configuration:
/// control characters in them must not reach a terminal as escape sequences.
pub(crate) fn text_clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
}

/// Escapes what GitHub-flavoured Markdown would interpret inside a table cell or list item:
/// `|` ends a cell, and a `comm` like `x](https://…)` must not become a link in a job summary.
fn md_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in text_clean(s).chars() {
        if matches!(
            c,
            '\\' | '|' | '`' | '*' | '_' | '[' | ']' | '<' | '~' | '#'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A GitHub-flavoured table: `head` is the header and alignment rows, each cell escaped.
fn md_table<R: IntoIterator<Item = String>>(
    out: &mut String,
    head: &str,
    rows: impl IntoIterator<Item = R>,
) {
    out.push_str(head);
    for row in rows {
        out.push('|');
        for c in row {
            let _ = write!(out, " {} |", md_escape(&c));
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::events::DnsEvent;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        // 2026-11-25T21:04:05Z + secs
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_640_645 + secs)
    }

    #[allow(clippy::too_many_arguments)]
    fn flow(
        secs: u64,
        comm: &str,
        pid: u32,
        domain: Option<&str>,
        dst: &str,
        port: u16,
        verdict: Verdict,
        reason: Reason,
    ) -> Event {
        Event::Flow(FlowEvent {
            ts: at(secs),
            job: "build-42".into(),
            step: Some("npm install".into()),
            pid,
            comm: comm.into(),
            exe: None,
            parents: Parents::default(),
            cgroup: 12345,
            container: None,
            proto: Proto::Tcp,
            dst: dst.parse().unwrap(),
            port,
            domain: domain.map(str::to_owned),
            verdict,
            reason,
            direction: Default::default(),
        })
    }

    fn dns(name: &str, answers: &[&str], bound: bool, rcode: &str) -> Event {
        Event::Dns(DnsEvent {
            ts: at(0),
            job: "build-42".into(),
            step: None,
            name: name.into(),
            qtype: "A".into(),
            answers: answers.iter().map(|s| s.to_string()).collect(),
            ttl: 60,
            server: "127.0.0.53".parse().unwrap(),
            rcode: rcode.into(),
            bound,
        })
    }

    use Reason as R;
    use Verdict as V;

    /// A small job: allowed traffic to GitHub (twice, from two processes), one block, one
    /// audited direct-IP connection, DNS for both names and one NXDOMAIN.
    fn sample() -> Report {
        let mut r = Report::new("build-42", "block");
        let events = [
            dns("github.com", &["140.82.112.3"], true, "NOERROR"),
            // Added out of order: the row must still name curl, the earlier process.
            flow(
                5,
                "git",
                300,
                Some("github.com"),
                "140.82.112.3",
                443,
                V::Allowed,
                R::Allowed,
            ),
            flow(
                1,
                "curl",
                200,
                Some("github.com"),
                "140.82.112.3",
                443,
                V::Allowed,
                R::Allowed,
            ),
            dns("attacker.test", &["198.51.100.66"], false, "NOERROR"),
            flow(
                2,
                "node",
                4242,
                Some("attacker.test"),
                "198.51.100.66",
                443,
                V::Blocked,
                R::NotAllowed,
            ),
            flow(
                3,
                "nc",
                77,
                None,
                "203.0.113.9",
                8080,
                V::Audited,
                R::DirectIp,
            ),
            dns("nope.example", &[], false, "NXDOMAIN"),
        ];
        for e in &events {
            r.add(e);
        }
        r
    }

    #[test]
    fn text_golden() {
        let expected = "\
ringfence report: job build-42, mode block: 4 flows: 1 blocked, 1 audited, 2 allowed

DOMAIN         ADDRESS        PORT  PROTO  VERDICT  REASON       COUNT  FIRST PROCESS
attacker.test  198.51.100.66  443   tcp    blocked  not-allowed  1      node[4242]
-              203.0.113.9    8080  tcp    audited  direct-ip    1      nc[77]
github.com     140.82.112.3   443   tcp    allowed  allowed      2      curl[200]

DNS
  attacker.test -> 198.51.100.66 (not bound)
  github.com -> 140.82.112.3 (bound)
  nope.example -> NXDOMAIN (not bound)
";
        assert_eq!(sample().render(Format::Text), expected);
    }

    #[test]
    fn markdown_golden() {
        let expected = "\
### ringfence: job build-42 (block mode)

4 flows: 1 blocked, 1 audited, 2 allowed.

| Domain | Address | Port | Proto | Verdict | Reason | Count | First process |
|---|---|---|---|---|---|---:|---|
| attacker.test | 198.51.100.66 | 443 | tcp | blocked | not-allowed | 1 | node\\[4242\\] |
| - | 203.0.113.9 | 8080 | tcp | audited | direct-ip | 1 | nc\\[77\\] |
| github.com | 140.82.112.3 | 443 | tcp | allowed | allowed | 2 | curl\\[200\\] |

DNS:

- attacker.test -> 198.51.100.66 (not bound)
- github.com -> 140.82.112.3 (bound)
- nope.example -> NXDOMAIN (not bound)
";
        assert_eq!(sample().render(Format::Markdown), expected);
    }

    /// A flow of step `step` (None: before any step was named).
    fn in_step(step: Option<&str>, ev: Event) -> Event {
        match ev {
            Event::Flow(mut f) => {
                f.step = step.map(str::to_owned);
                Event::Flow(f)
            }
            other => other,
        }
    }

    fn step_marker(secs: u64, step: &str) -> Event {
        Event::Step(crate::trail::events::StepEvent {
            ts: at(secs),
            job: "build-42".into(),
            step: step.into(),
            command: None,
        })
    }

    /// A job of three steps: checkout calls GitHub (twice, from two processes), npm install
    /// calls the registry and is blocked reaching attacker.test (and is called from outside,
    /// which is not an outbound call), npm test calls nothing.
    fn stepped() -> Report {
        let mut r = Report::new("build-42", "block");
        let gh = |secs, comm, pid| {
            flow(
                secs,
                comm,
                pid,
                Some("github.com"),
                "140.82.112.3",
                443,
                V::Allowed,
                R::Allowed,
            )
        };
        let mut inbound = flow(
            9,
            "node",
            4242,
            None,
            "203.0.113.9",
            8080,
            V::Allowed,
            R::Allowed,
        );
        if let Event::Flow(f) = &mut inbound {
            f.direction = crate::trail::events::Direction::Inbound;
        }
        let events = [
            step_marker(0, "checkout"),
            // Added out of order: the row still names the earlier process.
            in_step(Some("checkout"), gh(3, "git", 301)),
            in_step(Some("checkout"), gh(2, "git", 300)),
            step_marker(5, "npm install"),
            in_step(
                Some("npm install"),
                flow(
                    6,
                    "node",
                    4242,
                    Some("registry.npmjs.org"),
                    "104.16.0.35",
                    443,
                    V::Allowed,
                    R::Allowed,
                ),
            ),
            in_step(
                Some("npm install"),
                flow(
                    7,
                    "node",
                    4242,
                    Some("attacker.test"),
                    "198.51.100.66",
                    443,
                    V::Blocked,
                    R::NotAllowed,
                ),
            ),
            in_step(Some("npm install"), gh(8, "node", 4242)),
            in_step(Some("npm install"), inbound),
            step_marker(10, "npm test"),
        ];
        for e in &events {
            r.add(e);
        }
        r
    }

    #[test]
    fn per_step_tables_text() {
        let expected = "\
ringfence report: job build-42, mode block: 6 flows: 1 blocked, 0 audited, 5 allowed

DOMAIN              ADDRESS        PORT  PROTO  VERDICT  REASON       COUNT  FIRST PROCESS
attacker.test       198.51.100.66  443   tcp    blocked  not-allowed  1      node[4242]
github.com          140.82.112.3   443   tcp    allowed  allowed      3      git[300]
registry.npmjs.org  104.16.0.35    443   tcp    allowed  allowed      1      node[4242]
-                   203.0.113.9    8080  tcp    allowed  allowed      1      node[4242]

Outbound calls made from each step
  Step 1: checkout
    DOMAIN      ADDRESS       PORT  PROTO  VERDICT  COUNT  PROCESS
    github.com  140.82.112.3  443   tcp    allowed  2      git[300]
  Step 2: npm install
    DOMAIN              ADDRESS        PORT  PROTO  VERDICT  COUNT  PROCESS
    attacker.test       198.51.100.66  443   tcp    blocked  1      node[4242]
    github.com          140.82.112.3   443   tcp    allowed  1      node[4242]
    registry.npmjs.org  104.16.0.35    443   tcp    allowed  1      node[4242]
  Step 3: npm test
    No outbound calls.
";
        assert_eq!(stepped().render(Format::Text), expected);
    }

    #[test]
    fn per_step_tables_markdown() {
        let expected = "\
### ringfence: job build-42 (block mode)

6 flows: 1 blocked, 0 audited, 5 allowed.

| Domain | Address | Port | Proto | Verdict | Reason | Count | First process |
|---|---|---|---|---|---|---:|---|
| attacker.test | 198.51.100.66 | 443 | tcp | blocked | not-allowed | 1 | node\\[4242\\] |
| github.com | 140.82.112.3 | 443 | tcp | allowed | allowed | 3 | git\\[300\\] |
| registry.npmjs.org | 104.16.0.35 | 443 | tcp | allowed | allowed | 1 | node\\[4242\\] |
| - | 203.0.113.9 | 8080 | tcp | allowed | allowed | 1 | node\\[4242\\] |

#### Outbound calls made from each step

**Step 1: checkout**

| Domain | Address | Port | Proto | Verdict | Count | Process |
|---|---|---|---|---|---:|---|
| github.com | 140.82.112.3 | 443 | tcp | allowed | 2 | git\\[300\\] |

**Step 2: npm install**

| Domain | Address | Port | Proto | Verdict | Count | Process |
|---|---|---|---|---|---:|---|
| attacker.test | 198.51.100.66 | 443 | tcp | blocked | 1 | node\\[4242\\] |
| github.com | 140.82.112.3 | 443 | tcp | allowed | 1 | node\\[4242\\] |
| registry.npmjs.org | 104.16.0.35 | 443 | tcp | allowed | 1 | node\\[4242\\] |

**Step 3: npm test**

No outbound calls.
";
        assert_eq!(stepped().render(Format::Markdown), expected);
    }

    #[test]
    fn per_step_tables_json() {
        let v: serde_json::Value = serde_json::from_str(&stepped().render(Format::Json)).unwrap();
        let steps = v["steps"].as_array().expect("steps in the JSON report");
        let labels: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
        assert_eq!(labels, ["checkout", "npm install", "npm test"]);
        assert_eq!(
            steps[0]["calls"],
            serde_json::json!([{
                "domain": "github.com",
                "address": "140.82.112.3",
                "port": 443,
                "proto": "tcp",
                "verdict": "allowed",
                "count": 2,
                "first_pid": 300,
                "first_comm": "git",
                "first_ts": "2026-11-25T21:04:07.000000Z",
            }])
        );
        let calls: Vec<(&str, &str, u64)> = steps[1]["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["domain"].as_str().unwrap(),
                    c["verdict"].as_str().unwrap(),
                    c["count"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            calls,
            [
                ("attacker.test", "blocked", 1),
                ("github.com", "allowed", 1),
                ("registry.npmjs.org", "allowed", 1)
            ]
        );
        assert_eq!(steps[2]["calls"], serde_json::json!([]));
        assert!(steps.iter().all(|s| s.get("folded").is_none()));
    }

    /// One step, by marker or by label: the report looks as it did before steps were tabled.
    #[test]
    fn one_step_keeps_the_report_as_it_was() {
        let mut r = sample();
        r.add(&step_marker(0, "npm install"));
        let text = r.render(Format::Text);
        assert!(!text.contains("each step"), "{text}");
        assert_eq!(text, sample().render(Format::Text));
        assert_eq!(
            r.render(Format::Markdown),
            sample().render(Format::Markdown)
        );
        assert_eq!(r.render(Format::Json), sample().render(Format::Json));
    }

    /// The step tables share the report's row limit; what does not fit is counted and said.
    #[test]
    fn step_tables_are_bounded() {
        let mut r = Report::new("build-42", "block");
        r.set_limits(Limits {
            max_destinations: 2,
            ..Limits::unlimited()
        });
        r.add(&step_marker(0, "one"));
        r.add(&step_marker(1, "two"));
        for (i, dst) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
            .iter()
            .enumerate()
        {
            let step = if i == 0 { "one" } else { "two" };
            r.add(&in_step(
                Some(step),
                flow(2, "x", 1, None, dst, 80, V::Audited, R::DirectIp),
            ));
        }
        let text = r.render(Format::Text);
        assert!(
            text.contains("(and 1 calls not listed: see above)"),
            "{text}"
        );
        assert!(
            text.contains("1 outbound calls are not listed under their step"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&r.render(Format::Json)).unwrap();
        assert_eq!(v["steps"][1]["folded"], 1);
        // A destination already in the main table, from a third step: the step rows are
        // bounded on their own.
        r.add(&in_step(
            Some("three"),
            flow(3, "x", 1, None, "198.51.100.1", 80, V::Audited, R::DirectIp),
        ));
        let v: serde_json::Value = serde_json::from_str(&r.render(Format::Json)).unwrap();
        assert_eq!(v["steps"][2]["step"], "three");
        assert_eq!(v["steps"][2]["calls"], serde_json::json!([]));
        assert_eq!(v["steps"][2]["folded"], 1);
        assert_eq!(v["rows"][0]["count"], 2);
    }

    #[test]
    fn json_golden() {
        let expected = r#"{
  "job": "build-42",
  "mode": "block",
  "totals": {
    "flows": 4,
    "blocked": 1,
    "audited": 1,
    "allowed": 2,
    "dns_answers": 3
  },
  "rows": [
    {
      "domain": "attacker.test",
      "address": "198.51.100.66",
      "port": 443,
      "proto": "tcp",
      "verdict": "blocked",
      "reason": "not-allowed",
      "count": 1,
      "first_pid": 4242,
      "first_comm": "node",
      "first_ts": "2026-11-25T21:04:07.000000Z"
    },
    {
      "domain": null,
      "address": "203.0.113.9",
      "port": 8080,
      "proto": "tcp",
      "verdict": "audited",
      "reason": "direct-ip",
      "count": 1,
      "first_pid": 77,
      "first_comm": "nc",
      "first_ts": "2026-11-25T21:04:08.000000Z"
    },
    {
      "domain": "github.com",
      "address": "140.82.112.3",
      "port": 443,
      "proto": "tcp",
      "verdict": "allowed",
      "reason": "allowed",
      "count": 2,
      "first_pid": 200,
      "first_comm": "curl",
      "first_ts": "2026-11-25T21:04:06.000000Z"
    }
  ],
  "dns": [
    {
      "name": "attacker.test",
      "answers": [
        "198.51.100.66"
      ],
      "bound": false,
      "count": 1,
      "rcodes": [
        "NOERROR"
      ]
    },
    {
      "name": "github.com",
      "answers": [
        "140.82.112.3"
      ],
      "bound": true,
      "count": 1,
      "rcodes": [
        "NOERROR"
      ]
    },
    {
      "name": "nope.example",
      "answers": [],
      "bound": false,
      "count": 1,
      "rcodes": [
        "NXDOMAIN"
      ]
    }
  ]
}
"#;
        assert_eq!(sample().render(Format::Json), expected);
    }

    fn finding(signal: Signal, domain: &str, value: f64, threshold: f64, example: &str) -> Event {
        Event::Finding(crate::trail::events::FindingEvent {
            ts: at(4),
            job: "build-42".into(),
            step: Some("npm install".into()),
            signal,
            domain: domain.into(),
            value,
            threshold,
            example: example.into(),
            detail: Default::default(),
        })
    }

    /// The sample job, plus a leak through DNS: the events as first crossed, then the
    /// detector's final counts laid over them.
    fn with_findings() -> Report {
        let mut r = sample();
        let hex = "3f9a0c1be27d4c5e8a9b0c1d2e3f4a5b";
        for e in [
            finding(
                Signal::ManyNames,
                "leak.test",
                51.0,
                50.0,
                &format!("{hex}.leak.test"),
            ),
            finding(
                Signal::HighEntropy,
                "attacker.test",
                4.21,
                4.0,
                "mzxw6ytboi3tmnrtgq2dkmrqgaydamb.attacker.test",
            ),
            finding(
                Signal::LongLabel,
                "leak.test",
                56.0,
                50.0,
                &format!("{hex}0123456789abcdef01234567.leak.test"),
            ),
        ] {
            r.add(&e);
        }
        let mut current: Vec<Finding> = r.findings().cloned().collect();
        for f in &mut current {
            if f.signal == Signal::ManyNames {
                f.count = 60;
            }
        }
        r.set_findings(current);
        r
    }

    #[test]
    fn findings_text_golden() {
        let text = with_findings().render(Format::Text);
        let expected = "\
github.com     140.82.112.3   443   tcp    allowed  allowed      2      curl[200]

Findings (DNS exfiltration signals: value above threshold)
  DOMAIN         SIGNAL        VALUE  THRESHOLD  COUNT  EXAMPLE
  attacker.test  high-entropy  4.21   4          1      mzxw6ytboi3tmnrtgq2dkmrqgaydamb.attacker.test
  leak.test      long-label    56     50         1      3f9a0c1be27d4c5e8a9b0c1d2e3f4a5b0123456789abcdef01234567.leak.test
  leak.test      many-names    51     50         60     3f9a0c1be27d4c5e8a9b0c1d2e3f4a5b.leak.test

DNS
";
        assert!(text.contains(expected), "{text}");
        // Without findings, nothing changes (the other goldens).
        assert!(!sample().render(Format::Text).contains("Findings"));
    }

    #[test]
    fn findings_markdown_golden() {
        let md = with_findings().render(Format::Markdown);
        let expected = "\
| github.com | 140.82.112.3 | 443 | tcp | allowed | allowed | 2 | curl\\[200\\] |

Findings (DNS exfiltration signals: value above threshold):

| Domain | Signal | Value | Threshold | Count | Example |
|---|---|---:|---:|---:|---|
| attacker.test | high-entropy | 4.21 | 4 | 1 | mzxw6ytboi3tmnrtgq2dkmrqgaydamb.attacker.test |
| leak.test | long-label | 56 | 50 | 1 | 3f9a0c1be27d4c5e8a9b0c1d2e3f4a5b0123456789abcdef01234567.leak.test |
| leak.test | many-names | 51 | 50 | 60 | 3f9a0c1be27d4c5e8a9b0c1d2e3f4a5b.leak.test |

DNS:
";
        assert!(md.contains(expected), "{md}");
    }

    #[test]
    fn findings_json_golden() {
        let json = with_findings().render(Format::Json);
        let expected = r#"  ],
  "findings": [
    {
      "domain": "attacker.test",
      "signal": "high-entropy",
      "value": 4.21,
      "threshold": 4.0,
      "count": 1,
      "example": "mzxw6ytboi3tmnrtgq2dkmrqgaydamb.attacker.test"
    },
    {
      "domain": "leak.test",
      "signal": "long-label",
      "value": 56.0,
      "threshold": 50.0,
      "count": 1,
      "example": "3f9a0c1be27d4c5e8a9b0c1d2e3f4a5b0123456789abcdef01234567.leak.test"
    },
    {
      "domain": "leak.test",
      "signal": "many-names",
      "value": 51.0,
      "threshold": 50.0,
      "count": 60,
      "example": "3f9a0c1be27d4c5e8a9b0c1d2e3f4a5b.leak.test"
    }
  ],
  "dns": [
"#;
        assert!(json.contains(expected), "{json}");
        assert!(!sample().render(Format::Json).contains("findings"));
    }

    #[test]
    fn finding_events_of_other_jobs_are_ignored() {
        let mut r = Report::new("other-job", "audit");
        r.add(&finding(
            Signal::LongLabel,
            "leak.test",
            60.0,
            50.0,
            "x.leak.test",
        ));
        assert_eq!(r.findings().count(), 0);
    }

    #[test]
    fn counts() {
        let r = sample();
        assert_eq!(r.blocked(), 1);
        assert_eq!(r.audited(), 1);
    }

    #[test]
    fn aggregation_splits_on_every_key_field() {
        let mut r = Report::new("build-42", "audit");
        let base = || {
            flow(
                0,
                "a",
                1,
                Some("x.test"),
                "192.0.2.1",
                443,
                V::Allowed,
                R::Allowed,
            )
        };
        let variants = [
            base(),
            base(), // same key: same row
            flow(
                0,
                "a",
                1,
                Some("y.test"),
                "192.0.2.1",
                443,
                V::Allowed,
                R::Allowed,
            ),
            flow(0, "a", 1, None, "192.0.2.1", 443, V::Allowed, R::Allowed),
            flow(
                0,
                "a",
                1,
                Some("x.test"),
                "192.0.2.2",
                443,
                V::Allowed,
                R::Allowed,
            ),
            flow(
                0,
                "a",
                1,
                Some("x.test"),
                "192.0.2.1",
                80,
                V::Allowed,
                R::Allowed,
            ),
            flow(
                0,
                "a",
                1,
                Some("x.test"),
                "192.0.2.1",
                443,
                V::Audited,
                R::Allowed,
            ),
            flow(
                0,
                "a",
                1,
                Some("x.test"),
                "192.0.2.1",
                443,
                V::Allowed,
                R::Metadata,
            ),
            // A different process alone does not split the row.
            flow(
                0,
                "b",
                2,
                Some("x.test"),
                "192.0.2.1",
                443,
                V::Allowed,
                R::Allowed,
            ),
        ];
        for e in &variants {
            r.add(e);
        }
        let mut udp = base();
        if let Event::Flow(f) = &mut udp {
            f.proto = Proto::Udp;
        }
        r.add(&udp);
        // Other(6) is TCP: same row as base.
        let mut tcp_by_number = base();
        if let Event::Flow(f) = &mut tcp_by_number {
            f.proto = Proto::Other(6);
        }
        r.add(&tcp_by_number);

        assert_eq!(r.rows.len(), 8);
        let base_key = RowKey {
            domain: Some("x.test".into()),
            dst: "192.0.2.1".parse().unwrap(),
            port: 443,
            proto: Proto::Tcp,
            verdict: V::Allowed,
            reason: R::Allowed,
        };
        let row = &r.rows[&base_key];
        assert_eq!(row.count, 4);
        // Ties on time keep the first added.
        assert_eq!((row.first_comm.as_str(), row.first_pid), ("a", 1));
    }

    #[test]
    fn ordering_puts_what_needs_attention_first() {
        let mut r = Report::new("j", "audit");
        let mk = |domain: Option<&str>, dst: &str, port, v| {
            let mut e = flow(0, "p", 1, domain, dst, port, v, R::Allowed);
            if let Event::Flow(f) = &mut e {
                f.job = "j".into();
            }
            e
        };
        for e in [
            mk(Some("a.test"), "192.0.2.1", 443, V::Allowed),
            mk(None, "192.0.2.9", 443, V::Blocked),
            mk(Some("b.test"), "192.0.2.1", 443, V::Audited),
            mk(Some("z.test"), "192.0.2.1", 443, V::Blocked),
            mk(Some("a.test"), "192.0.2.1", 80, V::Allowed),
            mk(Some("a.test"), "10.0.0.1", 443, V::Allowed),
        ] {
            r.add(&e);
        }
        let order: Vec<_> = r
            .sorted_rows()
            .into_iter()
            .map(|(k, _)| (k.verdict, k.domain.clone(), k.dst.to_string(), k.port))
            .collect();
        let s = |d: &str| Some(d.to_owned());
        assert_eq!(
            order,
            vec![
                (V::Blocked, s("z.test"), "192.0.2.1".into(), 443),
                (V::Blocked, None, "192.0.2.9".into(), 443),
                (V::Audited, s("b.test"), "192.0.2.1".into(), 443),
                (V::Allowed, s("a.test"), "10.0.0.1".into(), 443),
                (V::Allowed, s("a.test"), "192.0.2.1".into(), 80),
                (V::Allowed, s("a.test"), "192.0.2.1".into(), 443),
            ]
        );
    }

    #[test]
    fn other_jobs_are_ignored() {
        let mut r = Report::new("other-job", "block");
        for e in [
            flow(0, "a", 1, None, "192.0.2.1", 443, V::Blocked, R::DirectIp),
            dns("github.com", &["140.82.112.3"], true, "NOERROR"),
        ] {
            r.add(&e);
        }
        assert_eq!(r.blocked(), 0);
        assert_eq!(
            r.render(Format::Text),
            "ringfence report: job other-job, mode block: 0 flows: 0 blocked, 0 audited, 0 allowed\n\
             No outbound flows.\n"
        );
    }

    #[test]
    fn repeated_dns_answers_merge() {
        let mut r = Report::new("build-42", "block");
        r.add(&dns(
            "cdn.test",
            &["192.0.2.1", "192.0.2.2"],
            true,
            "NOERROR",
        ));
        r.add(&dns(
            "cdn.test",
            &["192.0.2.2", "192.0.2.3"],
            true,
            "NOERROR",
        ));
        let d = &r.dns["cdn.test"];
        assert_eq!(d.count, 2);
        assert_eq!(join_answers(d), "192.0.2.1, 192.0.2.2, 192.0.2.3");
        assert!(r
            .render(Format::Text)
            .contains("  cdn.test -> 192.0.2.1, 192.0.2.2, 192.0.2.3 (bound)\n"));
    }

    #[test]
    fn hostile_process_names_are_escaped() {
        let mut r = Report::new("build-42", "block");
        r.add(&flow(
            0,
            "x|y](http://e)\u{1b}[2J",
            9,
            Some("a_b.test"),
            "192.0.2.1",
            443,
            V::Blocked,
            R::NotAllowed,
        ));
        let md = r.render(Format::Markdown);
        assert!(
            md.contains("| x\\|y\\](http://e)\\\\u{1b}\\[2J\\[9\\] |"),
            "{md}"
        );
        assert!(md.contains("| a\\_b.test |"), "{md}");
        let text = r.render(Format::Text);
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("x|y](http://e)\\u{1b}[2J[9]"), "{text}");
    }

    fn blocked_udp(i: u32) -> Event {
        let mut e = flow(
            0,
            "python3",
            9,
            None,
            "203.0.113.1",
            0,
            V::Blocked,
            R::DirectIp,
        );
        if let Event::Flow(f) = &mut e {
            f.dst = IpAddr::from(std::net::Ipv4Addr::from(0xcb00_7100 + (i & 0xff)));
            f.port = 20_000 + (i >> 8) as u16;
            f.proto = Proto::Udp;
        }
        e
    }

    #[test]
    fn rows_past_the_limit_fold_and_are_counted() {
        let mut r = Report::new("build-42", "block");
        r.set_limits(Limits {
            max_destinations: 3,
            ..Limits::default()
        });
        for i in 0..10 {
            r.add(&blocked_udp(i));
        }
        // Known destinations keep their rows.
        r.add(&blocked_udp(0));
        r.add(&flow(
            0,
            "curl",
            1,
            Some("github.com"),
            "140.82.112.3",
            443,
            V::Allowed,
            R::Allowed,
        ));
        for i in 0..5 {
            r.add(&dns(
                &format!("n{i}.test"),
                &["192.0.2.1"],
                false,
                "NOERROR",
            ));
        }
        assert_eq!(r.rows.len(), 3);
        assert_eq!(r.folded_flows, 8);
        assert_eq!(r.blocked(), 11);
        assert_eq!(r.dns.len(), 3);
        assert_eq!(r.dns_folded, 2);
        let text = r.render(Format::Text);
        assert!(text.starts_with(
            "ringfence report: job build-42, mode block: 12 flows: 11 blocked, 0 audited, 1 allowed\n\
             Cut to stay within limits:\n  \
             - 8 flows to destinations beyond the first 3 are folded into the (others) rows (--max-destinations).\n  \
             - 2 DNS answers for names beyond the first 3 are counted but not listed (--max-destinations).\n"
        ), "{text}");
        assert!(
            text.contains("-       (others)     *      udp    blocked  direct-ip  7      -\n"),
            "{text}"
        );
        assert!(
            text.contains("(others)     *      tcp    allowed  allowed    1      -\n"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.render(Format::Json)).unwrap();
        assert_eq!(json["cuts"]["folded_flows"], 8);
        assert_eq!(json["cuts"]["folded_dns_answers"], 2);
        assert_eq!(json["folded"][0]["count"], 7);
        assert_eq!(json["totals"]["blocked"], 11);
        let md = r.render(Format::Markdown);
        assert!(
            md.contains("**Cut to stay within limits:**\n\n- 8 flows"),
            "{md}"
        );
        assert!(
            md.contains("| - | (others) | \\* | udp | blocked | direct-ip | 7 | - |"),
            "{md}"
        );
    }

    #[test]
    fn answers_of_one_name_are_bounded() {
        let mut r = Report::new("build-42", "block");
        for i in 0..300u32 {
            let a = std::net::Ipv4Addr::from(0xc000_0200 + i).to_string();
            r.add(&dns("cdn.test", &[a.as_str()], true, "NOERROR"));
        }
        assert_eq!(r.dns["cdn.test"].len(), MAX_ANSWERS_PER_NAME);
        assert_eq!(r.answers_not_listed, 300 - MAX_ANSWERS_PER_NAME);
        assert!(r
            .render(Format::Text)
            .contains("44 answer addresses beyond 256 per name"));
    }

    #[test]
    fn what_the_agent_cut_is_said_and_a_file_says_the_same() {
        use crate::trail::events::{JobEvent, PolicySummary, SuppressedEvent, TruncatedEvent};
        let limits = Limits {
            events_per_sec: 100,
            events_burst: 1000,
            events_max_bytes: 1 << 20,
            max_destinations: 10_000,
        };
        // Live: the agent counted every flow, then tells the report what it did not write.
        let mut live = Report::new("build-42", "block");
        live.set_limits(limits);
        for i in 0..20 {
            live.add(&blocked_udp(i));
        }
        live.set_cuts(Cuts {
            suppressed: CutCounts {
                flows: 12,
                blocked: 12,
                ..CutCounts::default()
            },
            dropped: CutCounts {
                flows: 3,
                blocked: 3,
                other: 1,
                ..CutCounts::default()
            },
            names_not_kept: 0,
        });
        let text = live.render(Format::Text);
        assert!(text.contains(
            "  - 12 flow events (12 blocked) not written to the events file: over the rate limit of 100 events/s (burst 1000; --events-rate, --events-burst). They are counted above.\n\
             \x20 - 3 flow events (3 blocked) and 1 other lines dropped: the events file reached its limit of 1 MiB (--events-max-bytes). They are counted above; the file ends with a \"truncated\" line.\n"
        ), "{text}");

        // Read back: 5 flows written, the rest as counts in the cut lines.
        let mut file = Report::new("build-42", "block");
        file.add(&Event::Job(JobEvent {
            ts: at(0),
            job: "build-42".into(),
            mode: "block".into(),
            command: vec!["python3".into()],
            policy: PolicySummary {
                direct_ip: "block".into(),
                dns_policy: "allowed-only".into(),
                dns_resolvers: vec![],
                allowed_endpoints: vec![],
            },
            limits,
        }));
        for i in 0..5 {
            file.add(&blocked_udp(i));
        }
        file.add(&Event::Suppressed(SuppressedEvent {
            ts: at(1),
            job: "build-42".into(),
            flows: 12,
            blocked: 12,
            audited: 0,
            dns: 0,
            since: at(0),
        }));
        file.add(&Event::Truncated(TruncatedEvent {
            ts: at(2),
            job: "build-42".into(),
            max_bytes: 1 << 20,
            events: 4,
            flows: 3,
            blocked: 3,
            audited: 0,
            dns: 0,
        }));
        assert_eq!(file.blocked(), live.blocked());
        assert_eq!(file.cut_notes(), live.cut_notes());
        assert_eq!(file.summary(), live.summary());
    }

    #[test]
    fn format_parses() {
        assert_eq!("text".parse(), Ok(Format::Text));
        assert_eq!("JSON".parse(), Ok(Format::Json));
        assert_eq!("markdown".parse(), Ok(Format::Markdown));
        assert_eq!("html".parse(), Ok(Format::Html));
        assert_eq!("pdf".parse::<Format>(), Err(UnknownFormat("pdf".into())));
    }

    /// The stepped job against a baseline in which checkout reached GitHub and npm install
    /// the registry, but nothing ever called attacker.test.
    fn with_baseline() -> Report {
        let mut r = stepped();
        let mut b = Baseline {
            runs: 2,
            ..Default::default()
        };
        b.destinations.insert("github.com:443".into());
        b.destinations.insert("registry.npmjs.org:443".into());
        r.set_baseline(std::sync::Arc::new(b));
        r
    }

    #[test]
    fn baseline_marks_exactly_the_new_destinations() {
        let r = with_baseline();
        let md = r.render(Format::Markdown);
        let (head, _) = md.split_once(" flows: ").unwrap();
        // The markdown starts with what is new, per step, before anything else.
        assert!(
            head.starts_with(
                "### ringfence: job build-42 (block mode)\n\n\
                 **1 destination new since the baseline (2 earlier runs)**\n\n\
                 *Step 2: npm install*\n\n\
                 | Domain | Address | Port | Proto | Verdict | Count | Process |\n\
                 |---|---|---|---|---|---:|---|\n\
                 | attacker.test | 198.51.100.66 | 443 | tcp | blocked | 1 | node\\[4242\\] |\n"
            ),
            "{md}"
        );
        let text = r.render(Format::Text);
        assert!(
            text.contains(
                "1 destination new since the baseline (2 earlier runs)\n  Step 2: npm install\n"
            ),
            "{text}"
        );
        let j: serde_json::Value = serde_json::from_str(&r.render(Format::Json)).unwrap();
        assert_eq!(j["baseline"]["runs"], 2);
        let new = j["baseline"]["new"].as_array().unwrap();
        assert_eq!(new.len(), 1, "{j:#}");
        assert_eq!(new[0]["step"], "npm install");
        assert_eq!(new[0]["domain"], "attacker.test");
        let flagged: Vec<_> = j["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["new"] == true)
            .map(|r| r["domain"].as_str().unwrap())
            .collect();
        assert_eq!(flagged, ["attacker.test"]);
        // Without a baseline nothing is said about it.
        assert!(!stepped().render(Format::Json).contains("\"new\""));
        assert!(!stepped().render(Format::Text).contains("baseline"));
        // An empty baseline's answer is explicit.
        let mut all = stepped();
        let mut b = with_baseline().baseline.unwrap().as_ref().clone();
        b.destinations.insert("attacker.test:443".into());
        all.set_baseline(std::sync::Arc::new(b));
        assert!(all
            .render(Format::Text)
            .contains("Nothing new since the baseline (2 earlier runs)"));
    }

    #[test]
    fn html_escapes_every_string_and_loads_nothing() {
        let hostile = "<img src=x onerror=alert(1)>";
        let mut r = Report::new("build-42", "audit");
        let mut ev = flow(
            1,
            hostile,
            4242,
            Some(hostile),
            "198.51.100.66",
            443,
            V::Audited,
            R::NotAllowed,
        );
        if let Event::Flow(f) = &mut ev {
            f.step = Some(hostile.into());
            f.exe = Some(format!("/tmp/{hostile}").into());
            f.parents = vec![Ancestor {
                pid: 1,
                exe: Some(format!("/bin/\"{hostile}")),
            }]
            .into();
        }
        r.add(&step_marker(0, hostile));
        r.add(&ev);
        r.add(&dns(hostile, &["198.51.100.66"], false, "NOERROR"));
        let page = r.render(Format::Html);
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(page.contains("/bin/&quot;&lt;img"));
        // Nothing that could fetch: no script, no external reference of any kind.
        for bad in [
            "<script",
            "src=\"",
            "href=\"http",
            "url(",
            "@import",
            "<link",
            "<iframe",
        ] {
            assert!(!page.contains(bad), "{bad} in the page");
        }
        assert!(page.contains("content=\"default-src 'none'; style-src 'unsafe-inline'\""));
        // The parent chain and the DNS name behind the address are on the page.
        assert!(page.contains("← <code>/bin/&quot;&lt;img"), "{page}");
        assert!(page.contains("<h3>The names each address came from</h3>"));
    }
}
