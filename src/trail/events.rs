//! The audit trail's event schema (DESIGN.md, "Event schema") and its JSON Lines file.
//!
//! A flow event is a bare object whose keys come in the documented order; every other line
//! is the same kind of object with a leading `"type"`: `dns` (an answer), `finding`, and the
//! lines that keep the trail compact and honest: `job` (once, first: the command line, the
//! policy and the limits, so no event repeats them), `step` (a step starts; events carry its
//! short label), `suppressed` (events the rate limit held back, counted) and `truncated`
//! (lines dropped at the file's size limit, counted). Reading tells them apart by `type`, so
//! a line without it (or with `"type":"flow"`) is a flow event.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufWriter, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::macros::format_description;
use time::PrimitiveDateTime;

use crate::kernel::abi::{rf_direction, rf_reason, rf_verdict};
use crate::trail::dns::{self, DnsMessage, RecordData};
use crate::trail::limits::Limits;

/// What the kernel did with a flow (enum rf_verdict in bpf/abi.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Blocked,
    /// Would have been blocked; audit mode let it pass.
    Audited,
}

/// Why (enum rf_reason in bpf/abi.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    Allowed,
    NotAllowed,
    DirectIp,
    DnsResolver,
    Metadata,
    /// A DNS query for a name the policy does not allow (the name is the event's domain).
    DnsQuery,
    /// DNS traffic the kernel could not fully judge (split oddly, too large, several
    /// questions, fragmented…): dropped or refused in block mode, never passed.
    DnsUnjudged,
    /// A packet the dataplane could not parse (an odd device or odd headers).
    Unparsed,
    /// An inbound connection from a peer the policy does not list.
    Inbound,
}

/// Who opened a flow (enum rf_direction in bpf/abi.h). Outbound is the default and is not
/// written, so the documented flow schema is unchanged for the common case.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Outbound,
    /// A peer connected to a socket the job listens on.
    Inbound,
}

impl Direction {
    pub fn is_outbound(&self) -> bool {
        *self == Direction::Outbound
    }

    /// A value outside the enum is read as outbound: the default, whose events name the
    /// destination port (the verdict and reason still say what happened).
    pub fn from_abi(v: u8) -> Direction {
        if rf_direction(v.into()) == rf_direction::RF_DIR_INBOUND {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }
}

/// A kernel value outside the enum it should belong to: the object and the agent disagree
/// about the ABI.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("unknown {what} value {value} from the kernel")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: u8,
}

impl TryFrom<u8> for Verdict {
    type Error = UnknownValue;
    fn try_from(v: u8) -> Result<Self, UnknownValue> {
        Ok(match rf_verdict(v.into()) {
            rf_verdict::RF_VERDICT_ALLOWED => Self::Allowed,
            rf_verdict::RF_VERDICT_BLOCKED => Self::Blocked,
            rf_verdict::RF_VERDICT_AUDITED => Self::Audited,
            _ => {
                return Err(UnknownValue {
                    what: "verdict",
                    value: v,
                })
            }
        })
    }
}

impl TryFrom<u8> for Reason {
    type Error = UnknownValue;
    fn try_from(v: u8) -> Result<Self, UnknownValue> {
        Ok(match rf_reason(v.into()) {
            rf_reason::RF_REASON_ALLOWED => Self::Allowed,
            rf_reason::RF_REASON_NOT_ALLOWED => Self::NotAllowed,
            rf_reason::RF_REASON_DIRECT_IP => Self::DirectIp,
            rf_reason::RF_REASON_DNS_RESOLVER => Self::DnsResolver,
            rf_reason::RF_REASON_METADATA => Self::Metadata,
            rf_reason::RF_REASON_DNS_QUERY => Self::DnsQuery,
            rf_reason::RF_REASON_DNS_UNJUDGED => Self::DnsUnjudged,
            rf_reason::RF_REASON_UNPARSED => Self::Unparsed,
            rf_reason::RF_REASON_INBOUND => Self::Inbound,
            _ => {
                return Err(UnknownValue {
                    what: "reason",
                    value: v,
                })
            }
        })
    }
}

impl Verdict {
    /// As the event schema spells it (serde's name for it, tested).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Blocked => "blocked",
            Self::Audited => "audited",
        }
    }
}

impl Reason {
    /// As the event schema spells it (serde's name for it, tested).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::NotAllowed => "not-allowed",
            Self::DirectIp => "direct-ip",
            Self::DnsResolver => "dns-resolver",
            Self::Metadata => "metadata",
            Self::DnsQuery => "dns-query",
            Self::DnsUnjudged => "dns-unjudged",
            Self::Unparsed => "unparsed",
            Self::Inbound => "inbound",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The IP protocol of a flow. Serialised as "tcp", "udp", "icmp", "icmpv6", or the protocol
/// number for anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    /// Any other IPPROTO_* number. `Other(6)` and `Tcp` are the same protocol; compare
    /// through `u8::from` when that matters (`From<u8>` never builds such a value).
    Other(u8),
}

impl From<u8> for Proto {
    fn from(n: u8) -> Self {
        match n {
            6 => Self::Tcp,
            17 => Self::Udp,
            1 => Self::Icmp,
            58 => Self::Icmpv6,
            n => Self::Other(n),
        }
    }
}

impl From<Proto> for u8 {
    fn from(p: Proto) -> u8 {
        match p {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
            Proto::Icmpv6 => 58,
            Proto::Other(n) => n,
        }
    }
}

impl Proto {
    /// The name of a named protocol; an `Other` one's is its number, written by callers.
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
            Self::Other(_) => "",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Through the number, so Other(6) prints as "tcp" like Tcp does.
        match Proto::from(u8::from(*self)) {
            Self::Tcp => f.write_str("tcp"),
            Self::Udp => f.write_str("udp"),
            Self::Icmp => f.write_str("icmp"),
            Self::Icmpv6 => f.write_str("icmpv6"),
            Self::Other(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Proto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match Proto::from(u8::from(*self)) {
            Self::Other(n) => s.serialize_u8(n),
            named => s.collect_str(&named),
        }
    }
}

impl<'de> Deserialize<'de> for Proto {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u8),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Proto::from(n)),
            Raw::Name(s) => match s.as_str() {
                "tcp" => Ok(Self::Tcp),
                "udp" => Ok(Self::Udp),
                "icmp" => Ok(Self::Icmp),
                "icmpv6" => Ok(Self::Icmpv6),
                other => Err(de::Error::invalid_value(
                    de::Unexpected::Str(other),
                    &"tcp, udp, icmp, icmpv6 or a protocol number",
                )),
            },
        }
    }
}

/// One new flow or one block, as the kernel reported it and the agent attributed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    #[serde(with = "ts_serde")]
    pub ts: SystemTime,
    pub job: String,
    pub step: Option<String>,
    /// 0 when the packet was not sent from process context.
    pub pid: u32,
    pub comm: String,
    /// The process's executable (`/proc/PID/exe` as the agent read it); absent when the
    /// process was gone by then, or no pid is known.
    /// Shared with the agent's process cache and every other flow of the process.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "shared_json::exe"
    )]
    pub exe: Option<Arc<str>>,
    /// Its parent, grandparent… (at most [`MAX_PARENTS`]), nearest first. Absent when empty:
    /// no pid, or the process was gone before the agent read its event.
    #[serde(
        default,
        skip_serializing_if = "parents_empty",
        serialize_with = "shared_json::parents"
    )]
    pub parents: Parents,
    pub cgroup: u64,
    /// For a packet no socket sent — forwarded from a container or a namespace the job
    /// started — who sent it: `docker:<name>` where the Docker Engine names the address,
    /// else `via <device>` it came in on (job::containers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub proto: Proto,
    #[serde(serialize_with = "ip_serde::serialize")]
    pub dst: IpAddr,
    pub port: u16,
    /// The DNS name whose answer produced `dst`, when one did.
    pub domain: Option<String>,
    pub verdict: Verdict,
    pub reason: Reason,
    /// Written only for inbound connections.
    #[serde(default, skip_serializing_if = "Direction::is_outbound")]
    pub direction: Direction,
}

impl FlowEvent {
    /// Appends the event's JSON to `out`: what `serde_json` writes for it, byte for byte
    /// (tested against it, and the agent's lines against a golden file), without serde's
    /// machinery. Flow lines are nearly all of a busy trail; through serde they were half
    /// of the agent's time per event (each key and value a call, every string scanned
    /// byte by byte for escapes).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let int = |out: &mut Vec<u8>, key: &[u8], v: u64| {
            out.extend_from_slice(key);
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        };
        let opt_str = |out: &mut Vec<u8>, key: &[u8], v: Option<&str>| {
            out.extend_from_slice(key);
            match v {
                Some(v) => put_json_str(out, v),
                None => out.extend_from_slice(b"null"),
            }
        };
        out.extend_from_slice(b"{\"ts\":\"");
        let mut ts = [0; TS_LEN];
        ts_bytes(self.ts, &mut ts);
        out.extend_from_slice(&ts);
        out.extend_from_slice(b"\",\"job\":");
        put_json_str(out, &self.job);
        opt_str(out, b",\"step\":", self.step.as_deref());
        int(out, b",\"pid\":", self.pid.into());
        out.extend_from_slice(b",\"comm\":");
        put_json_str(out, &self.comm);
        if let Some(exe) = &self.exe {
            out.extend_from_slice(b",\"exe\":");
            shared_json::exe_into(exe, out);
        }
        if !self.parents.is_empty() {
            out.extend_from_slice(b",\"parents\":");
            shared_json::parents_into(&self.parents, out);
        }
        int(out, b",\"cgroup\":", self.cgroup);
        if let Some(c) = &self.container {
            out.extend_from_slice(b",\"container\":");
            put_json_str(out, c);
        }
        match Proto::from(u8::from(self.proto)) {
            Proto::Other(n) => int(out, b",\"proto\":", n.into()),
            named => {
                out.extend_from_slice(b",\"proto\":\"");
                out.extend_from_slice(named.name().as_bytes());
                out.push(b'"');
            }
        }
        out.extend_from_slice(b",\"dst\":\"");
        let mut ip = [0; 48];
        let n = ip_bytes(self.dst, &mut ip);
        out.extend_from_slice(&ip[..n]);
        out.push(b'"');
        int(out, b",\"port\":", self.port.into());
        opt_str(out, b",\"domain\":", self.domain.as_deref());
        out.extend_from_slice(b",\"verdict\":\"");
        out.extend_from_slice(self.verdict.as_str().as_bytes());
        out.extend_from_slice(b"\",\"reason\":\"");
        out.extend_from_slice(self.reason.as_str().as_bytes());
        out.push(b'"');
        if !self.direction.is_outbound() {
            out.extend_from_slice(b",\"direction\":\"inbound\"");
        }
        out.push(b'}');
    }
}

/// `s` as a JSON string. Names, comms and paths rarely need escaping: those that do go
/// through `serde_json`, so the escapes are its own.
fn put_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        serde_json::to_writer(&mut *out, s).expect("a str always serialises");
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Ancestors a flow event names: the parent chain up to here.
pub const MAX_PARENTS: usize = 4;

/// A parent chain, shared by every flow of a process (see `agent::lineage`): a flow event
/// costs a reference count, not a copy of the chain.
pub type Parents = Arc<[Ancestor]>;

fn parents_empty(p: &Parents) -> bool {
    p.is_empty()
}

/// One ancestor of a flow's process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    /// Its executable; absent when it could not be read (a kernel thread, a process that
    /// exited while the chain was read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

/// One DNS answer the kernel saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "dns")]
pub struct DnsEvent {
    #[serde(with = "ts_serde")]
    pub ts: SystemTime,
    pub job: String,
    pub step: Option<String>,
    /// The question name, lowercase, no trailing dot.
    pub name: String,
    /// "A", "AAAA", … (`TYPEnnn` for types without a mnemonic).
    pub qtype: String,
    /// CNAME targets and addresses that answer the question, in message order.
    pub answers: Vec<String>,
    /// The smallest TTL among those answers; 0 when there are none.
    pub ttl: u32,
    pub server: IpAddr,
    /// "NOERROR", "NXDOMAIN", … (`RCODEnnn` for codes without a mnemonic).
    pub rcode: String,
    /// The question name is allowed by the job's policy, so the kernel bound the addresses.
    pub bound: bool,
}

impl DnsEvent {
    /// The event for a parsed answer; `None` when it has no question to name it by.
    ///
    /// `answers` holds only the records that answer the question (see
    /// [`DnsMessage::chain_records`]): those are the ones that bind addresses.
    pub fn from_message(
        msg: &DnsMessage,
        ts: SystemTime,
        job: &str,
        step: Option<&str>,
        server: IpAddr,
        bound: bool,
    ) -> Option<Self> {
        let q = msg.question.as_ref()?;
        let answers = msg
            .chain_records()
            .into_iter()
            .filter_map(|r| match &r.data {
                RecordData::A(a) => Some(a.to_string()),
                RecordData::Aaaa(a) => Some(a.to_string()),
                RecordData::Cname(target) => Some(target.clone()),
                RecordData::Other(_) => None,
            })
            .collect();
        Some(Self {
            ts,
            job: job.to_owned(),
            step: step.map(str::to_owned),
            name: q.name.clone(),
            qtype: dns::qtype_name(q.qtype),
            answers,
            ttl: msg.min_ttl().unwrap_or(0),
            server,
            rcode: dns::rcode_name(msg.rcode),
            bound,
        })
    }
}

/// A DNS exfiltration signal crossing its threshold for one domain in a job (see
/// [`crate::trail::exfil`]): written once per (signal, domain), when first crossed. Also what the
/// dataplane cannot judge but ringfence saw: a job process taking hold of a process outside
/// the job (`ptrace-outside-job`), ringfence's programs detached (`dataplane-detached`);
/// those have no domain, value or threshold, and say who did what in `detail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "finding")]
pub struct FindingEvent {
    #[serde(with = "ts_serde")]
    pub ts: SystemTime,
    pub job: String,
    pub step: Option<String>,
    pub signal: crate::trail::exfil::Signal,
    /// The last two labels of the names.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    // A DNS signal's value and threshold are never 0 (thresholds are at least 1, or above
    // 0 bits): 0 means "not a measured signal".
    #[serde(default, skip_serializing_if = "is_zero")]
    pub value: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub threshold: f64,
    /// The name that crossed the threshold; for the other signals, what happened, in words.
    pub example: String,
    #[serde(flatten)]
    pub detail: FindingDetail,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Who and what a process-level or dataplane finding is about (absent fields are unknown or
/// do not apply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingDetail {
    /// The job process that acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// The process it acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_comm: Option<String>,
    /// The interface whose program went missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

// The detector never produces NaN, and one read back from a file cannot be NaN either:
// JSON has no NaN.
impl Eq for FindingEvent {}

impl FindingEvent {
    pub fn new(
        f: &crate::trail::exfil::Finding,
        ts: SystemTime,
        job: &str,
        step: Option<&str>,
    ) -> FindingEvent {
        FindingEvent {
            ts,
            job: job.to_owned(),
            step: step.map(str::to_owned),
            signal: f.signal,
            domain: f.domain.clone(),
            value: f.value,
            threshold: f.threshold,
            example: f.example.clone(),
            detail: FindingDetail::default(),
        }
    }
}

/// The job's header: written once when the job starts, it names what every later line of
/// the job would otherwise repeat (the command line, the policy, the limits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "job")]
pub struct JobEvent {
    #[serde(with = "ts_serde")]
    pub ts: SystemTime,
    pub job: String,
    /// "audit" or "block".
    pub mode: String,
    /// The command the job runs, one string per argument.
    pub command: Vec<String>,
    pub policy: PolicySummary,
    pub limits: Limits,
}

/// The parts of a policy that decide verdicts, as a reader of the trail needs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySummary {
    /// "audit" or "block".
    pub direct_ip: String,
    /// "allowed-only" or "any".
    pub dns_policy: String,
    pub dns_resolvers: Vec<IpAddr>,
    /// The endpoints as written.
    pub allowed_endpoints: Vec<String>,
}

impl PolicySummary {
    pub fn of(p: &crate::policy::Policy) -> PolicySummary {
        PolicySummary {
            direct_ip: p.direct_ip.to_string(),
            dns_policy: if p.dns_filter { "allowed-only" } else { "any" }.to_owned(),
            dns_resolvers: p.dns_resolvers.clone(),
            allowed_endpoints: p.endpoints.iter().map(|e| e.text.clone()).collect(),
        }
    }
}

/// A step starts: later events of the job carry its label in `step`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "step")]
pub struct StepEvent {
    #[serde(with = "ts_serde")]
    pub ts: SystemTime,
    pub job: String,
    /// The short label flow, DNS and finding events carry.
    pub step: String,
    /// What the step runs, when ringfence started it (`exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
}

/// Flow and DNS events the job's rate limit held back since `since` (see
/// [`crate::trail::limits`]). The report still counts every one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "suppressed")]
pub struct SuppressedEvent {
    #[serde(with = "ts_serde")]
    pub ts: SystemTime,
    pub job: String,
    /// Flow events not written, every verdict.
    pub flows: u64,
    /// Of which blocked.
    pub blocked: u64,
    /// Of which audited.
    pub audited: u64,
    /// DNS answer events not written.
    pub dns: u64,
    /// When the first of them happened.
    #[serde(with = "ts_serde")]
    pub since: SystemTime,
}

/// The last line of a job in an events file that reached its size limit: how many of the
/// job's lines were dropped for want of room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "truncated")]
pub struct TruncatedEvent {
    #[serde(with = "ts_serde")]
    pub ts: SystemTime,
    pub job: String,
    /// The limit (`--events-max-bytes`).
    pub max_bytes: u64,
    /// Lines dropped, every kind.
    pub events: u64,
    /// Of which flow events…
    pub flows: u64,
    /// …blocked…
    pub blocked: u64,
    /// …audited…
    pub audited: u64,
    /// …and DNS answers.
    pub dns: u64,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Flow(FlowEvent),
    Dns(DnsEvent),
    Finding(FindingEvent),
    Job(JobEvent),
    Step(StepEvent),
    Suppressed(SuppressedEvent),
    Truncated(TruncatedEvent),
}

impl Event {
    pub fn job(&self) -> &str {
        match self {
            Self::Flow(f) => &f.job,
            Self::Dns(d) => &d.job,
            Self::Finding(f) => &f.job,
            Self::Job(j) => &j.job,
            Self::Step(s) => &s.job,
            Self::Suppressed(s) => &s.job,
            Self::Truncated(t) => &t.job,
        }
    }

    pub fn ts(&self) -> SystemTime {
        match self {
            Self::Flow(f) => f.ts,
            Self::Dns(d) => d.ts,
            Self::Finding(f) => f.ts,
            Self::Job(j) => j.ts,
            Self::Step(s) => s.ts,
            Self::Suppressed(s) => s.ts,
            Self::Truncated(t) => t.ts,
        }
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Flow(f) => f.serialize(s),
            Self::Dns(d) => d.serialize(s),
            Self::Finding(f) => f.serialize(s),
            Self::Job(j) => j.serialize(s),
            Self::Step(st) => st.serialize(s),
            Self::Suppressed(st) => st.serialize(s),
            Self::Truncated(t) => t.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Event {
    /// Dispatches on `type` first, so a bad field is reported as such rather than as
    /// "matches no variant".
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let kind = match v.get("type") {
            None => "flow",
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(_) => return Err(de::Error::custom("event `type` is not a string")),
        };
        match kind {
            "flow" => FlowEvent::deserialize(v)
                .map(Self::Flow)
                .map_err(de::Error::custom),
            "dns" => DnsEvent::deserialize(v)
                .map(Self::Dns)
                .map_err(de::Error::custom),
            "finding" => FindingEvent::deserialize(v)
                .map(Self::Finding)
                .map_err(de::Error::custom),
            "job" => JobEvent::deserialize(v)
                .map(Self::Job)
                .map_err(de::Error::custom),
            "step" => StepEvent::deserialize(v)
                .map(Self::Step)
                .map_err(de::Error::custom),
            "suppressed" => SuppressedEvent::deserialize(v)
                .map(Self::Suppressed)
                .map_err(de::Error::custom),
            "truncated" => TruncatedEvent::deserialize(v)
                .map(Self::Truncated)
                .map_err(de::Error::custom),
            other => Err(de::Error::custom(format!("unknown event type {other:?}"))),
        }
    }
}

/// `2026-11-25T21:04:05.123456Z`: UTC, microseconds.
///
/// Times outside 1970-01-01 … 9999-12-31 are clamped to those bounds: an event carries no
/// such time unless a clock is broken, and the line must still be written and read back.
pub fn format_ts(t: SystemTime) -> String {
    let mut buf = [0u8; TS_LEN];
    write_ts(t, &mut buf).to_string()
}

/// The length of what [`format_ts`] writes.
const TS_LEN: usize = 27;

/// [`format_ts`] into a buffer on the stack. Hand-written rather than `time`'s formatter:
/// every event has a timestamp, and at a million events a second the general formatter
/// (format items, a `String` each) was a tenth of the agent's time. Tested against it.
fn write_ts(t: SystemTime, buf: &mut [u8; TS_LEN]) -> &str {
    ts_bytes(t, buf);
    std::str::from_utf8(buf).expect("digits and ASCII punctuation")
}

/// Fills `buf` with [`format_ts`]'s text. The date and time to the second are made once a
/// second (a thread's last one is kept): events come many to a second.
fn ts_bytes(t: SystemTime, buf: &mut [u8; TS_LEN]) {
    use std::cell::Cell;
    // 9999-12-31T23:59:59.999999Z, the last instant a 4-digit year can say.
    const MAX_US: u64 = 253_402_300_799_999_999;
    /// `YYYY-MM-DDTHH:MM:SS.` of the last second written, and that second.
    const PREFIX: usize = 20;
    thread_local! {
        static LAST: Cell<(u64, [u8; PREFIX])> = const { Cell::new((u64::MAX, [0; PREFIX])) };
    }
    let since_epoch = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let us = u64::try_from(since_epoch.as_micros())
        .unwrap_or(MAX_US)
        .min(MAX_US);
    let (secs, micros) = (us / 1_000_000, us % 1_000_000);
    let put = |buf: &mut [u8], at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    let (last, prefix) = LAST.get();
    if last == secs {
        buf[..PREFIX].copy_from_slice(&prefix);
    } else {
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days);
        put(buf, 0, 4, y);
        put(buf, 5, 2, m);
        put(buf, 8, 2, d);
        put(buf, 11, 2, rem / 3600);
        put(buf, 14, 2, rem / 60 % 60);
        put(buf, 17, 2, rem % 60);
        for (i, c) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
        ] {
            buf[i] = c;
        }
        let mut p = [0; PREFIX];
        p.copy_from_slice(&buf[..PREFIX]);
        LAST.set((secs, p));
    }
    put(buf, 20, 6, micros);
    buf[26] = b'Z';
}

/// (year, month, day) of the day `days` after 1970-01-01, proleptic Gregorian: Howard
/// Hinnant's `civil_from_days` (chrono-compatible algorithms), for days ≥ 0.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Parses what [`format_ts`] writes.
pub fn parse_ts(s: &str) -> Result<SystemTime, time::error::Parse> {
    let dt = PrimitiveDateTime::parse(s, TS_FORMAT)?.assume_utc();
    Ok(SystemTime::from(dt))
}

const TS_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// An address as `Display` writes it, without the formatting machinery: every flow event
/// has one, and `Ipv6Addr`'s `Display` (RFC 5952, through `fmt::Formatter`) was a tenth of
/// the agent's time at a million events a second. Tested against `Display`.
fn write_ip(a: IpAddr, buf: &mut [u8; 48]) -> &str {
    let n = ip_bytes(a, buf);
    std::str::from_utf8(&buf[..n]).expect("ASCII")
}

/// Writes [`write_ip`]'s text at the start of `buf`; returns its length.
fn ip_bytes(a: IpAddr, buf: &mut [u8; 48]) -> usize {
    struct Cursor<'a> {
        buf: &'a mut [u8; 48],
        n: usize,
    }
    impl Cursor<'_> {
        fn put(&mut self, b: u8) {
            self.buf[self.n] = b;
            self.n += 1;
        }
        fn dec(&mut self, v: u8) {
            if v >= 100 {
                self.put(b'0' + v / 100);
            }
            if v >= 10 {
                self.put(b'0' + v / 10 % 10);
            }
            self.put(b'0' + v % 10);
        }
        fn v4(&mut self, o: [u8; 4]) {
            for (i, b) in o.into_iter().enumerate() {
                if i > 0 {
                    self.put(b'.');
                }
                self.dec(b);
            }
        }
        /// One segment in lowercase hex, no leading zeros.
        fn hex(&mut self, s: u16) {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut started = false;
            for sh in [12, 8, 4, 0] {
                let d = (s >> sh) & 0xf;
                if d != 0 || started || sh == 0 {
                    started = true;
                    self.put(HEX[d as usize]);
                }
            }
        }
    }
    let mut c = Cursor { buf, n: 0 };
    match a {
        IpAddr::V4(a) => c.v4(a.octets()),
        IpAddr::V6(a) => {
            if let Some(m) = a.to_ipv4_mapped() {
                for &b in b"::ffff:" {
                    c.put(b);
                }
                c.v4(m.octets());
            } else {
                let seg = a.segments();
                // The longest run of zero segments (the first of equals), if longer than one.
                let (mut best, mut best_len, mut cur, mut cur_len) = (0, 0, 0, 0);
                for (i, &s) in seg.iter().enumerate() {
                    if s == 0 {
                        if cur_len == 0 {
                            cur = i;
                        }
                        cur_len += 1;
                        if cur_len > best_len {
                            (best, best_len) = (cur, cur_len);
                        }
                    } else {
                        cur_len = 0;
                    }
                }
                let mut i = 0;
                while i < 8 {
                    if best_len > 1 && i == best {
                        c.put(b':');
                        c.put(b':');
                        i += best_len;
                        continue;
                    }
                    if i > 0 && !(best_len > 1 && i == best + best_len) {
                        c.put(b':');
                    }
                    c.hex(seg[i]);
                    i += 1;
                }
            }
        }
    }
    c.n
}

/// The JSON of a process's executable and parent chain, made once per process: every flow
/// of a process shares them (`Arc`s from the agent's process cache), and their paths were
/// most of the bytes each line escaped. Cached by the `Arc`'s address, with a clone of it
/// held so the address cannot be another's while cached.
mod shared_json {
    use super::*;
    use serde_json::value::RawValue;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Entries at most; past it the cache starts again.
    const ENTRIES: usize = 4096;

    /// By the `Arc`'s address: the `Arc` (held, so the address stays its own) and its JSON.
    /// Addresses are not chosen by anyone a job controls: the fast hash is enough.
    type Cache<T> = RefCell<HashMap<usize, (Arc<T>, Box<RawValue>), foldhash::fast::RandomState>>;

    thread_local! {
        static EXES: Cache<str> = RefCell::default();
        static PARENTS: Cache<[Ancestor]> = RefCell::default();
    }

    /// Runs `f` on the JSON of `v`, made now if it is not cached (None: it does not
    /// serialise, which a str or a list of ancestors always does).
    fn with_cached<T: ?Sized + Serialize, R>(
        cache: &'static std::thread::LocalKey<Cache<T>>,
        v: &Arc<T>,
        f: impl FnOnce(Option<&RawValue>) -> R,
    ) -> R {
        let key = Arc::as_ptr(v) as *const u8 as usize;
        cache.with(|c| {
            let mut c = c.borrow_mut();
            if !c.contains_key(&key) {
                let raw = serde_json::to_string(&**v)
                    .ok()
                    .and_then(|j| RawValue::from_string(j).ok());
                let Some(raw) = raw else {
                    return f(None);
                };
                if c.len() >= ENTRIES {
                    c.clear();
                }
                c.insert(key, (v.clone(), raw));
            }
            f(Some(&c[&key].1))
        })
    }

    fn cached<T: ?Sized + Serialize, S: Serializer>(
        cache: &'static std::thread::LocalKey<Cache<T>>,
        v: &Arc<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        with_cached(cache, v, |raw| match raw {
            Some(raw) => raw.serialize(s),
            None => v.serialize(s),
        })
    }

    /// Appends the JSON of `v` to `out`.
    fn cached_into<T: ?Sized + Serialize>(
        cache: &'static std::thread::LocalKey<Cache<T>>,
        v: &Arc<T>,
        out: &mut Vec<u8>,
    ) {
        with_cached(cache, v, |raw| match raw {
            Some(raw) => out.extend_from_slice(raw.get().as_bytes()),
            None => serde_json::to_writer(&mut *out, &**v).expect("serialises"),
        })
    }

    pub fn exe<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => cached(&EXES, v, s),
            None => s.serialize_none(),
        }
    }

    pub fn parents<S: Serializer>(v: &Parents, s: S) -> Result<S::Ok, S::Error> {
        cached(&PARENTS, v, s)
    }

    pub fn exe_into(v: &Arc<str>, out: &mut Vec<u8>) {
        cached_into(&EXES, v, out)
    }

    pub fn parents_into(v: &Parents, out: &mut Vec<u8>) {
        cached_into(&PARENTS, v, out)
    }
}

mod ip_serde {
    use super::*;

    pub fn serialize<S: Serializer>(a: &IpAddr, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(write_ip(*a, &mut [0; 48]))
        } else {
            a.serialize(s)
        }
    }
}

mod ts_serde {
    use super::*;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(write_ts(*t, &mut [0; TS_LEN]))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        parse_ts(&s).map_err(|e| de::Error::custom(format!("bad timestamp {s:?}: {e}")))
    }
}

/// Converts a CLOCK_BOOTTIME stamp in nanoseconds (what `bpf_ktime_get_boot_ns` returns) to
/// wall-clock time.
///
/// Both clocks are read on every call rather than once at start-up: runner VMs often step
/// their wall clock (NTP) after the agent has started, and a cached offset would then date
/// every later event wrongly. BOOTTIME, unlike MONOTONIC, keeps counting through suspend, so
/// the offset between the two stays meaningful. (The agent's event path reads them once
/// per batch instead: [`BootClock`].)
pub fn boottime_to_system(boot_ns: u64) -> SystemTime {
    BootClock::now().to_system(boot_ns)
}

/// Both clocks, read at one moment: converts boot-time stamps to wall-clock time the way
/// [`boottime_to_system`] does, without reading the clocks for each. The agent reads it
/// again on every flush (each tick of its loop, 10 ms), so a step of the wall clock dates
/// events wrongly for at most that long.
#[derive(Debug, Clone, Copy)]
pub struct BootClock {
    boot_ns: u64,
    wall: SystemTime,
}

impl BootClock {
    pub fn now() -> BootClock {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid, writable timespec; CLOCK_BOOTTIME exists on every
        // kernel that runs BPF programs (2.6.39+), so the call cannot fail.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
        let wall = SystemTime::now();
        debug_assert_eq!(rc, 0);
        let boot_ns = (now.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(now.tv_nsec as u64);
        BootClock { boot_ns, wall }
    }

    /// The clocks as they were at one known moment (tests that need fixed times).
    pub fn at(boot_ns: u64, wall: SystemTime) -> BootClock {
        BootClock { boot_ns, wall }
    }

    pub fn to_system(&self, boot_ns: u64) -> SystemTime {
        if boot_ns <= self.boot_ns {
            let age = Duration::from_nanos(self.boot_ns - boot_ns);
            self.wall.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH)
        } else {
            // A stamp taken after the clocks were read (the agent reads them once a batch).
            self.wall + Duration::from_nanos(boot_ns - self.boot_ns)
        }
    }
}

/// Writes events as JSON Lines, within an optional size limit.
///
/// Writes are buffered and not flushed per event: the event loop calls [`flush`] after each
/// ring-buffer batch, so a burst of events costs one `write(2)` and a crash loses at most the
/// batch being handled. Dropping the writer flushes too (errors on drop are ignored; call
/// `flush` to see them).
///
/// With a limit, a line that would take the file within [`MARKER_RESERVE`] bytes of it is
/// dropped (the caller counts it); the reserve is for the `truncated` lines that say so,
/// written with [`write_marker`]. The file never exceeds the limit.
///
/// [`flush`]: JsonLinesWriter::flush
/// [`write_marker`]: JsonLinesWriter::write_marker
pub struct JsonLinesWriter<W: Write = BufWriter<File>> {
    w: W,
    /// Bytes in the file, including any it had when opened.
    written: u64,
    /// 0: no limit.
    max_bytes: u64,
    /// Lines not yet handed to `w`: serialised straight into it (no copy per line, no
    /// allocation), handed over [`PENDING`] bytes at a time and on flush.
    pending: Vec<u8>,
}

/// Bytes of lines the writer keeps before handing them to the file.
const PENDING: usize = 64 << 10;

/// Room kept below the size limit for the final `truncated` lines (one is ~200 bytes).
pub const MARKER_RESERVE: u64 = 1024;

impl JsonLinesWriter<BufWriter<File>> {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self::new(BufWriter::new(File::create(path)?)))
    }

    /// Opens the file at `path` for appending, creating it if needed: for a daemon that
    /// restarts and must not erase the trail its previous run wrote.
    pub fn append(path: impl AsRef<Path>) -> io::Result<Self> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        let len = f.metadata()?.len();
        let mut w = Self::new(BufWriter::new(f));
        w.written = len;
        Ok(w)
    }
}

impl<W: Write> JsonLinesWriter<W> {
    pub fn new(w: W) -> Self {
        Self {
            w,
            written: 0,
            max_bytes: 0,
            pending: Vec::new(),
        }
    }

    /// Limits the file to `max` bytes (0: no limit).
    pub fn with_max_bytes(mut self, max: u64) -> Self {
        self.max_bytes = max;
        self
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes written so far (buffered or not).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends one event and a newline (buffered; see the type's documentation). Returns
    /// false, writing nothing, when the line does not fit below the limit.
    pub fn write(&mut self, ev: &Event) -> io::Result<bool> {
        self.write_within(ev, self.max_bytes.saturating_sub(MARKER_RESERVE))
    }

    /// Like [`write`](Self::write), for the final `truncated` lines: they may use the
    /// reserve, up to the limit itself.
    pub fn write_marker(&mut self, ev: &Event) -> io::Result<bool> {
        self.write_within(ev, self.max_bytes)
    }

    fn write_within(&mut self, ev: &Event, room: u64) -> io::Result<bool> {
        // Serialised to memory first, and taken back on an error or when it does not fit,
        // so that no half line reaches the file.
        let start = self.pending.len();
        match ev {
            Event::Flow(f) => f.write_json(&mut self.pending),
            ev => {
                if let Err(e) = serde_json::to_writer(&mut self.pending, ev) {
                    self.pending.truncate(start);
                    return Err(e.into());
                }
            }
        }
        self.pending.push(b'\n');
        let len = (self.pending.len() - start) as u64;
        if self.max_bytes != 0 && self.written + len > room {
            self.pending.truncate(start);
            return Ok(false);
        }
        self.written += len;
        if self.pending.len() >= PENDING {
            self.hand_over()?;
        }
        Ok(true)
    }

    /// Gives the pending lines to `w`. On an error they are lost (the caller hears of it
    /// once; a full disk would refuse them again).
    fn hand_over(&mut self) -> io::Result<()> {
        let res = self.w.write_all(&self.pending);
        self.pending.clear();
        res
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.hand_over()?;
        self.w.flush()
    }

    pub fn get_ref(&self) -> &W {
        &self.w
    }
}

impl<W: Write> Drop for JsonLinesWriter<W> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Why an events file could not be read back.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("reading events")]
    Io(#[from] io::Error),
    #[error("events line {line}")]
    Parse {
        /// 1-based.
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads a JSON Lines events file back. Blank lines are skipped; anything else that is not
/// an event is an error naming its line.
pub fn read_events(r: impl BufRead) -> Result<Vec<Event>, ReadError> {
    let mut events = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let ev = serde_json::from_str(&line).map_err(|source| ReadError::Parse {
            line: i + 1,
            source,
        })?;
        events.push(ev);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// 2026-11-25T21:04:05.123456789Z
    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::new(1_795_640_645, 123_456_789)
    }

    fn flow() -> FlowEvent {
        FlowEvent {
            ts: t0(),
            job: "build-42".into(),
            step: Some("npm install".into()),
            pid: 4242,
            comm: "node".into(),
            exe: None,
            parents: Default::default(),
            cgroup: 12345,
            container: None,
            proto: Proto::Tcp,
            dst: "198.51.100.66".parse().unwrap(),
            port: 443,
            domain: Some("attacker.test".into()),
            verdict: Verdict::Blocked,
            reason: Reason::NotAllowed,
            direction: Direction::Outbound,
        }
    }

    /// The flow writer against serde_json, over every field's kinds of value: strings that
    /// need escaping (quotes, backslashes, every control character, DEL, non-ASCII),
    /// absent and present optional fields, every protocol, verdict, reason and direction,
    /// addresses of each family, extreme numbers and times.
    #[test]
    fn flow_writer_matches_serde_json() {
        let strings: Vec<String> = [
            "",
            "node",
            "a\"b",
            "back\\slash",
            "tab\tnl\ncr\r",
            "\u{7f}del",
            "ünï ✓ 😀",
            "/usr/bin/x y",
            "</script>",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain((0u8..0x20).map(|c| format!("c{}c", c as char)))
        .collect();
        let addrs: Vec<IpAddr> = [
            "0.0.0.0",
            "255.255.255.255",
            "198.51.100.66",
            "::",
            "::1",
            "::ffff:1.2.3.4",
            "2001:db8::",
            "2001:db8:0:1:0:0:0:1",
            "fe80::1:0:0:1",
            "1:2:3:4:5:6:7:8",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let times = [
            SystemTime::UNIX_EPOCH,
            t0(),
            SystemTime::UNIX_EPOCH + Duration::from_micros(253_402_300_799_999_999),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40),
        ];
        let verdicts = [Verdict::Allowed, Verdict::Blocked, Verdict::Audited];
        let reasons = [
            Reason::Allowed,
            Reason::NotAllowed,
            Reason::DirectIp,
            Reason::DnsResolver,
            Reason::Metadata,
            Reason::DnsQuery,
            Reason::DnsUnjudged,
            Reason::Unparsed,
            Reason::Inbound,
        ];
        let parents: Vec<Parents> = vec![
            Parents::default(),
            vec![Ancestor { pid: 1, exe: None }].into(),
            vec![
                Ancestor {
                    pid: 7,
                    exe: Some("/bin/s\"h".into()),
                },
                Ancestor {
                    pid: u32::MAX,
                    exe: Some("ü".into()),
                },
            ]
            .into(),
        ];
        let mut n = 0;
        for i in 0..strings.len() * 12 {
            let s = |k: usize| strings[(i * 7 + k * 13) % strings.len()].clone();
            let f = FlowEvent {
                ts: times[i % times.len()],
                job: s(0),
                step: (i % 3 != 0).then(|| s(1)),
                pid: [0, 1, 4242, u32::MAX][i % 4],
                comm: s(2),
                exe: (i % 5 != 0).then(|| Arc::from(s(3))),
                parents: parents[i % parents.len()].clone(),
                cgroup: [0, 12345, u64::MAX][i % 3],
                container: (i % 4 == 1).then(|| s(4)),
                proto: Proto::from([6, 17, 1, 58, 0, 132, 255][i % 7]),
                dst: addrs[i % addrs.len()],
                port: [0, 443, u16::MAX][i % 3],
                domain: (i % 2 == 0).then(|| s(5)),
                verdict: verdicts[i % 3],
                reason: reasons[i % reasons.len()],
                direction: if i % 6 == 0 {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
            };
            let mut got = Vec::new();
            f.write_json(&mut got);
            let want = serde_json::to_vec(&Event::Flow(f.clone())).unwrap();
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap(),
                "{f:?}"
            );
            n += 1;
        }
        assert!(n > 400, "{n}");
        // Proto::Other(6) is written as tcp, as serde writes it.
        let mut f = flow();
        f.proto = Proto::Other(6);
        let mut got = Vec::new();
        f.write_json(&mut got);
        assert_eq!(got, serde_json::to_vec(&Event::Flow(f)).unwrap());
    }

    fn dns_event() -> DnsEvent {
        DnsEvent {
            ts: t0(),
            job: "build-42".into(),
            step: None,
            name: "github.com".into(),
            qtype: "A".into(),
            answers: vec!["140.82.112.3".into()],
            ttl: 60,
            server: "127.0.0.53".parse().unwrap(),
            rcode: "NOERROR".into(),
            bound: true,
        }
    }

    fn line(ev: &Event) -> String {
        let mut w = JsonLinesWriter::new(Vec::new());
        w.write(ev).unwrap();
        w.flush().unwrap();
        String::from_utf8(w.get_ref().clone()).unwrap()
    }

    #[test]
    fn flow_line_matches_design() {
        assert_eq!(
            line(&Event::Flow(flow())),
            concat!(
                r#"{"ts":"2026-11-25T21:04:05.123456Z","job":"build-42","step":"npm install","#,
                r#""pid":4242,"comm":"node","cgroup":12345,"proto":"tcp","dst":"198.51.100.66","#,
                r#""port":443,"domain":"attacker.test","verdict":"blocked","reason":"not-allowed"}"#,
                "\n"
            )
        );
    }

    /// The process's executable and parent chain follow comm; they are left out when not
    /// known, so a line written before them reads back the same.
    #[test]
    fn flow_line_with_parents() {
        let mut f = flow();
        f.exe = Some("/usr/bin/node".into());
        f.parents = vec![
            Ancestor {
                pid: 4200,
                exe: Some("/usr/bin/bash".into()),
            },
            Ancestor { pid: 2, exe: None },
        ]
        .into();
        let l = line(&Event::Flow(f.clone()));
        assert!(
            l.contains(concat!(
                r#""pid":4242,"comm":"node","exe":"/usr/bin/node","#,
                r#""parents":[{"pid":4200,"exe":"/usr/bin/bash"},{"pid":2}],"cgroup":12345,"#
            )),
            "{l}"
        );
        f.ts = micros(f.ts);
        assert_eq!(read_events(l.as_bytes()).unwrap(), vec![Event::Flow(f)]);
        // A line from before: no exe, no parents.
        let old = line(&Event::Flow(flow()));
        assert!(!old.contains("exe") && !old.contains("parents"), "{old}");
        let mut back = flow();
        back.ts = micros(back.ts);
        assert_eq!(
            read_events(old.as_bytes()).unwrap(),
            vec![Event::Flow(back)]
        );
    }

    #[test]
    fn absent_step_and_domain_are_null() {
        let mut f = flow();
        f.step = None;
        f.domain = None;
        f.dst = "2001:db8::1".parse().unwrap();
        f.proto = Proto::Other(132);
        f.verdict = Verdict::Audited;
        f.reason = Reason::DirectIp;
        let l = line(&Event::Flow(f));
        assert!(l.contains(r#""step":null,"#), "{l}");
        assert!(l.contains(r#""proto":132,"dst":"2001:db8::1","#), "{l}");
        assert!(
            l.contains(r#""domain":null,"verdict":"audited","reason":"direct-ip"}"#),
            "{l}"
        );
    }

    #[test]
    fn dns_line_matches_design() {
        assert_eq!(
            line(&Event::Dns(dns_event())),
            concat!(
                r#"{"type":"dns","ts":"2026-11-25T21:04:05.123456Z","job":"build-42","step":null,"#,
                r#""name":"github.com","qtype":"A","answers":["140.82.112.3"],"ttl":60,"#,
                r#""server":"127.0.0.53","rcode":"NOERROR","bound":true}"#,
                "\n"
            )
        );
    }

    fn finding() -> FindingEvent {
        FindingEvent {
            ts: t0(),
            job: "build-42".into(),
            step: Some("npm install".into()),
            signal: crate::trail::exfil::Signal::ManyNames,
            domain: "leak.test".into(),
            value: 51.0,
            threshold: 50.0,
            example: "0a1b2c.leak.test".into(),
            detail: Default::default(),
        }
    }

    #[test]
    fn finding_line() {
        let l = line(&Event::Finding(finding()));
        assert_eq!(
            l,
            concat!(
                r#"{"type":"finding","ts":"2026-11-25T21:04:05.123456Z","job":"build-42","#,
                r#""step":"npm install","signal":"many-names","domain":"leak.test","#,
                r#""value":51.0,"threshold":50.0,"example":"0a1b2c.leak.test"}"#,
                "\n"
            )
        );
        let mut back = finding();
        back.ts = micros(back.ts);
        assert_eq!(
            read_events(l.as_bytes()).unwrap(),
            vec![Event::Finding(back)]
        );
        let bad = l.replace("many-names", "many-domains");
        assert!(read_events(bad.as_bytes()).is_err());
    }

    #[test]
    fn every_enum_value_serialises_as_documented() {
        let names = |v: Vec<serde_json::Value>| -> Vec<String> {
            v.into_iter().map(|v| v.to_string()).collect()
        };
        let verdicts = [Verdict::Allowed, Verdict::Blocked, Verdict::Audited]
            .map(|v| serde_json::to_value(v).unwrap());
        assert_eq!(
            names(verdicts.to_vec()),
            [r#""allowed""#, r#""blocked""#, r#""audited""#]
        );
        let reasons = [
            Reason::Allowed,
            Reason::NotAllowed,
            Reason::DirectIp,
            Reason::DnsResolver,
            Reason::Metadata,
            Reason::DnsUnjudged,
            Reason::Unparsed,
            Reason::Inbound,
        ];
        assert_eq!(
            names(reasons.map(|r| serde_json::to_value(r).unwrap()).to_vec()),
            [
                r#""allowed""#,
                r#""not-allowed""#,
                r#""direct-ip""#,
                r#""dns-resolver""#,
                r#""metadata""#,
                r#""dns-unjudged""#,
                r#""unparsed""#,
                r#""inbound""#
            ]
        );
        // Display agrees with serde (the report prints through Display).
        for r in reasons {
            assert_eq!(format!("\"{r}\""), serde_json::to_string(&r).unwrap());
        }
        let protos = [
            Proto::Tcp,
            Proto::Udp,
            Proto::Icmp,
            Proto::Icmpv6,
            Proto::Other(132),
            Proto::Other(6),
        ];
        assert_eq!(
            names(protos.map(|p| serde_json::to_value(p).unwrap()).to_vec()),
            [
                r#""tcp""#,
                r#""udp""#,
                r#""icmp""#,
                r#""icmpv6""#,
                "132",
                r#""tcp""#
            ]
        );
    }

    #[test]
    fn kernel_values_convert() {
        let verdicts = [
            (rf_verdict::RF_VERDICT_ALLOWED, Verdict::Allowed),
            (rf_verdict::RF_VERDICT_BLOCKED, Verdict::Blocked),
            (rf_verdict::RF_VERDICT_AUDITED, Verdict::Audited),
        ];
        for (k, v) in verdicts {
            assert_eq!(Verdict::try_from(k.0 as u8), Ok(v));
        }
        let reasons = [
            (rf_reason::RF_REASON_ALLOWED, Reason::Allowed),
            (rf_reason::RF_REASON_NOT_ALLOWED, Reason::NotAllowed),
            (rf_reason::RF_REASON_DIRECT_IP, Reason::DirectIp),
            (rf_reason::RF_REASON_DNS_RESOLVER, Reason::DnsResolver),
            (rf_reason::RF_REASON_METADATA, Reason::Metadata),
            (rf_reason::RF_REASON_DNS_QUERY, Reason::DnsQuery),
            (rf_reason::RF_REASON_DNS_UNJUDGED, Reason::DnsUnjudged),
            (rf_reason::RF_REASON_UNPARSED, Reason::Unparsed),
            (rf_reason::RF_REASON_INBOUND, Reason::Inbound),
        ];
        for (k, r) in reasons {
            assert_eq!(Reason::try_from(k.0 as u8), Ok(r));
        }
        // Nothing else converts: every other byte is an ABI disagreement, named as such.
        assert_eq!(
            (0..=u8::MAX)
                .filter(|&b| Verdict::try_from(b).is_ok())
                .count(),
            verdicts.len()
        );
        assert_eq!(
            (0..=u8::MAX)
                .filter(|&b| Reason::try_from(b).is_ok())
                .count(),
            reasons.len()
        );
        let past = rf_reason::RF_REASON_INBOUND.0 as u8 + 1;
        assert_eq!(
            Reason::try_from(past),
            Err(UnknownValue {
                what: "reason",
                value: past
            })
        );
        assert_eq!(
            Direction::from_abi(rf_direction::RF_DIR_INBOUND.0 as u8),
            Direction::Inbound
        );
        assert_eq!(
            Direction::from_abi(rf_direction::RF_DIR_OUTBOUND.0 as u8),
            Direction::Outbound
        );
        assert_eq!(Proto::from(17), Proto::Udp);
        assert_eq!(Proto::from(58), Proto::Icmpv6);
        assert_eq!(u8::from(Proto::Other(47)), 47);
    }

    fn micros(t: SystemTime) -> SystemTime {
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        SystemTime::UNIX_EPOCH + Duration::from_micros(d.as_micros() as u64)
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut other = flow();
        other.step = None;
        other.proto = Proto::Other(132);
        other.domain = None;
        let mut named = flow();
        named.exe = Some("/usr/bin/node".into());
        named.parents = vec![
            Ancestor {
                pid: 4200,
                exe: Some("/usr/bin/bash".into()),
            },
            Ancestor { pid: 2, exe: None },
        ]
        .into();
        let events = vec![
            Event::Flow(flow()),
            Event::Flow(named),
            Event::Dns(dns_event()),
            Event::Finding(finding()),
            Event::Flow(other),
        ];
        {
            let mut w = JsonLinesWriter::create(&path).unwrap();
            for e in &events {
                w.write(e).unwrap();
            }
            // No explicit flush: dropping must not lose anything.
        }
        let back = read_events(io::BufReader::new(File::open(&path).unwrap())).unwrap();
        // The file keeps microseconds; everything else comes back unchanged.
        let expected: Vec<Event> = events
            .into_iter()
            .map(|e| match e {
                Event::Flow(mut f) => {
                    f.ts = micros(f.ts);
                    Event::Flow(f)
                }
                Event::Dns(mut d) => {
                    d.ts = micros(d.ts);
                    Event::Dns(d)
                }
                Event::Finding(mut f) => {
                    f.ts = micros(f.ts);
                    Event::Finding(f)
                }
                other => other,
            })
            .collect();
        assert_eq!(back, expected);

        // append() keeps what is there.
        {
            let mut w = JsonLinesWriter::append(&path).unwrap();
            w.write(&Event::Dns(dns_event())).unwrap();
        }
        let back = read_events(io::BufReader::new(File::open(&path).unwrap())).unwrap();
        assert_eq!(back.len(), 6);
    }

    #[test]
    fn read_errors_name_the_line() {
        let good = line(&Event::Flow(flow()));
        let input = format!("{good}\n{}\n", r#"{"type":"dns","job":"x"}"#);
        match read_events(input.as_bytes()) {
            Err(ReadError::Parse { line: 3, source }) => {
                assert!(source.to_string().contains("missing field"), "{source}")
            }
            other => panic!("{other:?}"),
        }
        let input = r#"{"type":"stepp","job":"x"}"#;
        match read_events(input.as_bytes()) {
            Err(ReadError::Parse { line: 1, source }) => {
                assert!(
                    source.to_string().contains("unknown event type"),
                    "{source}"
                )
            }
            other => panic!("{other:?}"),
        }
        let bad_ts = good.replace("2026-11-25T21:04:05.123456Z", "yesterday");
        assert!(matches!(
            read_events(bad_ts.as_bytes()),
            Err(ReadError::Parse { line: 1, .. })
        ));
    }

    #[test]
    fn context_and_cut_lines_round_trip() {
        let t = micros(t0());
        let events = vec![
            Event::Job(JobEvent {
                ts: t,
                job: "build-42".into(),
                mode: "block".into(),
                command: vec!["npm".into(), "ci".into()],
                policy: PolicySummary {
                    direct_ip: "block".into(),
                    dns_policy: "allowed-only".into(),
                    dns_resolvers: vec!["127.0.0.53".parse().unwrap()],
                    allowed_endpoints: vec!["github.com:443".into()],
                },
                limits: Limits::default(),
            }),
            Event::Step(StepEvent {
                ts: t,
                job: "build-42".into(),
                step: "npm".into(),
                command: Some(vec!["npm".into(), "ci".into()]),
            }),
            Event::Suppressed(SuppressedEvent {
                ts: t,
                job: "build-42".into(),
                flows: 10,
                blocked: 7,
                audited: 0,
                dns: 2,
                since: t,
            }),
            Event::Truncated(TruncatedEvent {
                ts: t,
                job: "build-42".into(),
                max_bytes: 1 << 20,
                events: 5,
                flows: 4,
                blocked: 4,
                audited: 0,
                dns: 1,
            }),
        ];
        let text: String = events.iter().map(line).collect();
        assert!(text.starts_with(
            r#"{"type":"job","ts":"2026-11-25T21:04:05.123456Z","job":"build-42","mode":"block","command":["npm","ci"],"policy":{"direct_ip":"block","#
        ), "{text}");
        assert!(text.contains(
            r#"{"type":"suppressed","ts":"2026-11-25T21:04:05.123456Z","job":"build-42","flows":10,"blocked":7,"audited":0,"dns":2,"since":"2026-11-25T21:04:05.123456Z"}"#
        ), "{text}");
        assert_eq!(read_events(text.as_bytes()).unwrap(), events);
        // A step line without a command (a step the daemon was told about) has no key for it.
        let bare = r#"{"type":"step","ts":"2026-11-25T21:04:05.123456Z","job":"j","step":"test"}"#;
        let back = read_events(bare.as_bytes()).unwrap();
        assert_eq!(line(&back[0]).trim_end(), bare);
    }

    #[test]
    fn writer_keeps_under_its_limit_and_reserves_room_for_markers() {
        let one = line(&Event::Flow(flow())).len() as u64;
        let max = MARKER_RESERVE + 10 * one + one / 2;
        let mut w = JsonLinesWriter::new(Vec::new()).with_max_bytes(max);
        let written = (0..100)
            .filter(|_| w.write(&Event::Flow(flow())).unwrap())
            .count();
        assert_eq!(written, 10);
        let marker = Event::Truncated(TruncatedEvent {
            ts: t0(),
            job: "build-42".into(),
            max_bytes: max,
            events: 90,
            flows: 90,
            blocked: 90,
            audited: 0,
            dns: 0,
        });
        assert!(w.write_marker(&marker).unwrap());
        assert!(w.written() <= max);
        w.flush().unwrap();
        assert_eq!(w.get_ref().len() as u64, w.written());
        // No limit: everything is written.
        let mut w = JsonLinesWriter::new(Vec::new());
        assert!((0..100).all(|_| w.write(&Event::Flow(flow())).unwrap()));
    }

    #[test]
    fn timestamps() {
        assert_eq!(format_ts(t0()), "2026-11-25T21:04:05.123456Z");
        assert_eq!(
            format_ts(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        assert_eq!(
            parse_ts("2026-11-25T21:04:05.123456Z").unwrap(),
            micros(t0())
        );
        // Clamped, not panicking.
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(format_ts(far), "9999-12-31T23:59:59.999999Z");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(format_ts(before), "1970-01-01T00:00:00.000000Z");
    }

    /// The hand-written address formatter writes what `Display` does.
    #[test]
    fn addresses_as_display_writes_them() {
        let mut z: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            z
        };
        let mut addrs: Vec<IpAddr> = [
            "::",
            "::1",
            "1::",
            "1::1",
            "::ffff:1.2.3.4",
            "::1.2.3.4",
            "0.0.0.0",
            "255.255.255.255",
            "2001:db8::",
            "2001:db8:0:1:0:0:0:1",
            "2001:0:0:1:0:0:1:1",
            "1:0:1:0:1:0:1:0",
            "0:0:1:0:0:1:0:0",
            "fe80::1:0:0:0",
            "ffff::ffff:1:2",
            "::ffff:0:0",
            "64:ff9b::1.2.3.4",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for _ in 0..50_000 {
            let r = next();
            let mut segs = [0u16; 8];
            for (i, s) in segs.iter_mut().enumerate() {
                // Mostly zeros or small values, so that runs of zeros of every length come up.
                let k = (next() >> (i * 3)) & 7;
                *s = match k {
                    0..=3 => 0,
                    4 => (next() & 0xf) as u16,
                    5 => 0xffff,
                    _ => next() as u16,
                };
            }
            addrs.push(IpAddr::from(segs));
            addrs.push(IpAddr::from(std::net::Ipv4Addr::from(r as u32)));
        }
        for a in addrs {
            assert_eq!(write_ip(a, &mut [0; 48]), a.to_string(), "{a:?}");
        }
    }

    /// The hand-written formatter writes what `time`'s does, over leap days, century
    /// years, month ends and the whole range, and its lines parse back.
    #[test]
    fn timestamps_as_time_formats_them() {
        let by_time = |t: SystemTime| {
            let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
            (time::OffsetDateTime::UNIX_EPOCH + d)
                .format(TS_FORMAT)
                .unwrap()
        };
        let mut z: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut ts: Vec<SystemTime> = [
            951_782_400,
            951_868_799,
            4_107_542_399,
            4_107_542_400,
            1_709_164_800,
            253_402_300_799,
        ]
        .iter()
        .map(|&s| SystemTime::UNIX_EPOCH + Duration::new(s, 999_999_999))
        .collect();
        for _ in 0..20_000 {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            ts.push(
                SystemTime::UNIX_EPOCH
                    + Duration::from_micros(z % 253_402_300_800_000_000)
                    + Duration::from_nanos(z >> 54),
            );
        }
        for t in ts {
            let s = format_ts(t);
            assert_eq!(s, by_time(t), "{t:?}");
            assert!(parse_ts(&s).is_ok(), "{s}");
        }
    }

    fn boottime_now_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) },
            0
        );
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    #[test]
    fn boottime_converts_to_wall_clock() {
        let before = SystemTime::now();
        let boot = boottime_now_ns();
        let t = boottime_to_system(boot);
        let after = SystemTime::now();
        let slack = Duration::from_millis(50);
        assert!(t + slack >= before && t <= after + slack, "{t:?}");

        // Ten seconds ago is ten seconds ago.
        let ago = boottime_to_system(boot - 10_000_000_000);
        let diff = t.duration_since(ago).unwrap();
        assert!(diff.abs_diff(Duration::from_secs(10)) < slack, "{diff:?}");

        // A stamp from the future or from before boot does not panic.
        let _ = boottime_to_system(u64::MAX);
        let _ = boottime_to_system(0);
    }

    #[test]
    fn dns_event_from_message() {
        use hickory_proto::op::{Message, MessageType, Query};
        use hickory_proto::rr::rdata::{A, CNAME};
        use hickory_proto::rr::{Name, RData, Record, RecordType};
        use std::str::FromStr;

        let n = |s: &str| Name::from_str(s).unwrap();
        let mut m = Message::new();
        m.set_message_type(MessageType::Response)
            .add_query(Query::query(n("WWW.Example.com."), RecordType::A))
            .add_answer(Record::from_rdata(
                n("www.example.com."),
                300,
                RData::CNAME(CNAME(n("cdn.example.net."))),
            ))
            .add_answer(Record::from_rdata(
                n("stranger.test."),
                1,
                RData::A(A(Ipv4Addr::new(203, 0, 113, 1))),
            ))
            .add_answer(Record::from_rdata(
                n("cdn.example.net."),
                30,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ));
        let msg = dns::parse(&m.to_vec().unwrap()).unwrap();
        let server: IpAddr = "127.0.0.53".parse().unwrap();
        let ev = DnsEvent::from_message(&msg, t0(), "j", Some("s"), server, false).unwrap();
        assert_eq!(ev.name, "www.example.com");
        assert_eq!(ev.qtype, "A");
        assert_eq!(ev.answers, vec!["cdn.example.net", "192.0.2.1"]);
        assert_eq!(ev.ttl, 30);
        assert_eq!(ev.rcode, "NOERROR");
        assert_eq!(ev.step.as_deref(), Some("s"));
        assert!(!ev.bound);

        let no_question = dns::parse(&[0; 12]).unwrap();
        assert!(DnsEvent::from_message(&no_question, t0(), "j", None, server, false).is_none());
    }
}
