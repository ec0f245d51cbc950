//! What one job may cost the agent, whatever it does: events per second, bytes of events
//! file, and memory for per-destination state.
//!
//! A job that opens connections to hundreds of thousands of destinations must not fill the
//! disk or the agent's memory. Each limit cuts something, and every cut is counted and
//! shown in the report and the trail (`suppressed` and `truncated` lines): nothing is lost
//! silently. Verdicts are never affected: the kernel judges every flow whatever the agent
//! writes down.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::trail::events::{Event, SuppressedEvent, Verdict};

/// The user's limits (`exec --events-rate`, `--events-burst`, `--events-max-bytes`,
/// `--max-destinations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Flow and DNS events a job may write per second, sustained; 0: no limit.
    pub events_per_sec: u32,
    /// Events a job may write at once above the sustained rate.
    pub events_burst: u32,
    /// Size the events file never exceeds; 0: no limit.
    pub events_max_bytes: u64,
    /// Distinct report rows (destinations), DNS names and remembered answer addresses a job
    /// may hold in memory; what comes after is folded or counted.
    pub max_destinations: usize,
}

/// 500 events/s with a burst of 5,000 never bites a normal CI job (an `npm ci` opens a few
/// hundred flows in total); 256 MiB of events is about a million lines; 10,000 destinations
/// keep the agent's per-job state to a few MiB.
impl Default for Limits {
    fn default() -> Limits {
        Limits {
            events_per_sec: 500,
            events_burst: 5_000,
            events_max_bytes: 256 << 20,
            max_destinations: 10_000,
        }
    }
}

impl Limits {
    /// No limit at all: what the library's types start with (benchmarks measure the agent
    /// itself); `exec` always sets the user's limits, which default to [`Limits::default`].
    pub fn unlimited() -> Limits {
        Limits {
            events_per_sec: 0,
            events_burst: 0,
            events_max_bytes: 0,
            max_destinations: usize::MAX,
        }
    }
}

/// A token bucket over CLOCK_BOOTTIME nanoseconds, in integers: the bucket holds time
/// credit, each event costs `1 s / rate`, and the credit never exceeds `burst` events' worth.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// ns of credit one event costs; 0: unlimited.
    cost_ns: u64,
    cap_ns: u64,
    credit_ns: u64,
    last_ns: u64,
}

impl TokenBucket {
    /// Starts full: a job's first `burst` events are always written.
    pub fn new(per_sec: u32, burst: u32, now_ns: u64) -> TokenBucket {
        let cost_ns = if per_sec == 0 {
            0
        } else {
            1_000_000_000 / u64::from(per_sec)
        };
        let cap_ns = cost_ns.saturating_mul(u64::from(burst.max(1)));
        TokenBucket {
            cost_ns,
            cap_ns,
            credit_ns: cap_ns,
            last_ns: now_ns,
        }
    }

    /// Takes one event's worth of credit if there is enough. A clock that goes backwards
    /// (stamps from two CPUs) earns nothing, and costs nothing either.
    pub fn take(&mut self, now_ns: u64) -> bool {
        if self.cost_ns == 0 {
            return true;
        }
        let earned = now_ns.saturating_sub(self.last_ns);
        self.last_ns = self.last_ns.max(now_ns);
        self.credit_ns = self.credit_ns.saturating_add(earned).min(self.cap_ns);
        if self.credit_ns >= self.cost_ns {
            self.credit_ns -= self.cost_ns;
            true
        } else {
            false
        }
    }
}

/// Events not written, by kind: what a `suppressed` or `truncated` line reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutCounts {
    /// Flow events (every verdict).
    pub flows: u64,
    /// Of which blocked.
    pub blocked: u64,
    /// Of which audited (would have been blocked).
    pub audited: u64,
    /// DNS answer events.
    pub dns: u64,
    /// Anything else (findings, step lines). A `suppressed` line that is dropped counts as
    /// the events it stood for.
    pub other: u64,
}

impl CutCounts {
    pub fn count(&mut self, ev: &Event) {
        match ev {
            Event::Flow(f) => {
                self.flows += 1;
                match f.verdict {
                    Verdict::Blocked => self.blocked += 1,
                    Verdict::Audited => self.audited += 1,
                    Verdict::Allowed => {}
                }
            }
            Event::Dns(_) => self.dns += 1,
            _ => self.other += 1,
        }
    }

    pub fn events(&self) -> u64 {
        self.flows + self.dns + self.other
    }

    pub fn is_empty(&self) -> bool {
        self.events() == 0
    }

    pub fn sub(&mut self, o: &CutCounts) {
        self.flows = self.flows.saturating_sub(o.flows);
        self.blocked = self.blocked.saturating_sub(o.blocked);
        self.audited = self.audited.saturating_sub(o.audited);
        self.dns = self.dns.saturating_sub(o.dns);
        self.other = self.other.saturating_sub(o.other);
    }

    pub fn add(&mut self, o: &CutCounts) {
        self.flows += o.flows;
        self.blocked += o.blocked;
        self.audited += o.audited;
        self.dns += o.dns;
        self.other += o.other;
    }
}

impl From<&SuppressedEvent> for CutCounts {
    fn from(s: &SuppressedEvent) -> CutCounts {
        CutCounts {
            flows: s.flows,
            blocked: s.blocked,
            audited: s.audited,
            dns: s.dns,
            other: 0,
        }
    }
}

/// One job's rate limit on flow and DNS events, and what it held back.
#[derive(Debug, Clone)]
pub struct FloodGuard {
    bucket: TokenBucket,
    /// Held back since the last `suppressed` line, and when the first of them was.
    pending: CutCounts,
    pending_since_ns: Option<u64>,
    last_summary_ns: u64,
    /// Held back over the whole job.
    pub suppressed: CutCounts,
}

/// How often a `suppressed` line is written while events are held back.
pub const SUMMARY_EVERY_NS: u64 = 1_000_000_000;

impl FloodGuard {
    pub fn new(limits: &Limits, now_ns: u64) -> FloodGuard {
        FloodGuard {
            bucket: TokenBucket::new(limits.events_per_sec, limits.events_burst, now_ns),
            pending: CutCounts::default(),
            pending_since_ns: None,
            last_summary_ns: now_ns,
            suppressed: CutCounts::default(),
        }
    }

    /// Whether `ev` may be written. Flow and DNS events (one per new flow or answer: what a
    /// job can multiply) take from the bucket; the rest (findings, job and step lines) are
    /// rare and always written.
    pub fn admit(&mut self, ev: &Event, now_ns: u64) -> bool {
        if !matches!(ev, Event::Flow(_) | Event::Dns(_)) || self.bucket.take(now_ns) {
            return true;
        }
        self.pending.count(ev);
        self.suppressed.count(ev);
        self.pending_since_ns.get_or_insert(now_ns);
        false
    }

    /// The counts for a `suppressed` line, if one is due: something was held back and a
    /// second has passed since the last line (or `now` is the end of the job). Resets them.
    pub fn summary_due(&mut self, now_ns: u64, at_end: bool) -> Option<(CutCounts, u64)> {
        let since = self.pending_since_ns?;
        if !at_end && now_ns.saturating_sub(self.last_summary_ns) < SUMMARY_EVERY_NS {
            return None;
        }
        self.last_summary_ns = now_ns;
        self.pending_since_ns = None;
        Some((std::mem::take(&mut self.pending), since))
    }
}

impl FloodGuard {
    /// Puts back the counts of a `suppressed` line that could not be written, to go out
    /// with the next one. `since` is when the first of them happened.
    pub fn hold_over(&mut self, c: &CutCounts, since_ns: u64) {
        self.pending.add(c);
        self.pending_since_ns = Some(self.pending_since_ns.map_or(since_ns, |s| s.min(since_ns)));
    }
}

/// A size in bytes, as given on the command line: a number with an optional binary suffix
/// K, M or G (`64M` = 64 MiB). Hand-written: three suffixes do not need a dependency.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (a number of bytes, or with K, M or G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A byte count for people: `1048576` -> `1 MiB`, `1500` -> `1500 bytes`.
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n >= 1 << shift && n % (1 << shift) == 0 {
                return write!(f, "{} {unit}", n >> shift);
            }
        }
        write!(f, "{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::events::{Direction, FlowEvent, Proto, Reason};
    use std::time::SystemTime;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let t0 = 1_000 * SEC;
        let mut b = TokenBucket::new(100, 1_000, t0);
        // A flood in one instant: exactly the burst passes.
        let passed = (0..5_000).filter(|_| b.take(t0)).count();
        assert_eq!(passed, 1_000);
        // Then 100/s: ten seconds of a flood at 10,000/s lets 1,000 through.
        let mut passed = 0;
        for i in 1..=100_000u64 {
            if b.take(t0 + i * SEC / 10_000) {
                passed += 1;
            }
        }
        assert_eq!(passed, 1_000);
        // An idle pause refills up to the burst, never beyond.
        let later = t0 + 11 * SEC + 3_600 * SEC;
        let passed = (0..5_000).filter(|_| b.take(later)).count();
        assert_eq!(passed, 1_000);
    }

    #[test]
    fn bucket_never_bites_a_normal_job() {
        // 300 flows in 2 s, far under the defaults.
        let l = Limits::default();
        let mut b = TokenBucket::new(l.events_per_sec, l.events_burst, 0);
        assert!((0..300u64).all(|i| b.take(i * 2 * SEC / 300)));
    }

    #[test]
    fn bucket_edges() {
        // 0: no limit.
        let mut b = TokenBucket::new(0, 0, 0);
        assert!((0..1_000_000).all(|_| b.take(0)));
        // A stamp from the past neither refills nor panics.
        let mut b = TokenBucket::new(1, 1, 10 * SEC);
        assert!(b.take(10 * SEC));
        assert!(!b.take(5 * SEC));
        assert!(!b.take(10 * SEC + SEC / 2));
        assert!(b.take(11 * SEC));
    }

    fn flow(verdict: Verdict) -> Event {
        Event::Flow(FlowEvent {
            ts: SystemTime::UNIX_EPOCH,
            job: "j".into(),
            step: None,
            pid: 1,
            comm: "x".into(),
            exe: None,
            parents: Default::default(),
            cgroup: 1,
            container: None,
            proto: Proto::Udp,
            dst: "203.0.113.1".parse().unwrap(),
            port: 1,
            domain: None,
            verdict,
            reason: Reason::DirectIp,
            direction: Direction::Outbound,
        })
    }

    #[test]
    fn guard_counts_what_it_holds_back_and_reports_once_a_second() {
        let limits = Limits {
            events_per_sec: 10,
            events_burst: 5,
            ..Limits::default()
        };
        let mut g = FloodGuard::new(&limits, 0);
        let admitted = (0..20)
            .filter(|i| {
                let v = if i % 2 == 0 {
                    Verdict::Blocked
                } else {
                    Verdict::Allowed
                };
                g.admit(&flow(v), 100)
            })
            .count();
        assert_eq!(admitted, 5);
        // Not yet a second since the start: no line.
        assert_eq!(g.summary_due(SEC / 2, false), None);
        let (c, since) = g.summary_due(SEC, false).unwrap();
        assert_eq!(since, 100);
        // Events 5..20 were held back: 15, of which the even ones (6, 8, …, 18) blocked.
        assert_eq!((c.flows, c.blocked, c.audited), (15, 7, 0));
        // Nothing new: nothing due, even at the end.
        assert_eq!(g.summary_due(3 * SEC, true), None);
        // Findings are never held back, even with an empty bucket.
        let finding = Event::Finding(crate::trail::events::FindingEvent {
            ts: SystemTime::UNIX_EPOCH,
            job: "j".into(),
            step: None,
            signal: crate::trail::exfil::Signal::ManyNames,
            domain: "x.test".into(),
            value: 1.0,
            threshold: 1.0,
            example: "a.x.test".into(),
            detail: Default::default(),
        });
        assert!((0..100).all(|_| g.admit(&finding, SEC)));
        // The end of the job flushes what is pending, however recent.
        // A second refilled the bucket to its burst (5), not to the rate (10).
        let admitted = (0..100)
            .filter(|_| g.admit(&flow(Verdict::Audited), SEC))
            .count();
        assert_eq!(admitted, 5);
        let (c, _) = g.summary_due(SEC + 1, true).unwrap();
        assert_eq!((c.flows, c.audited), (95, 95));
        assert_eq!(g.suppressed.flows, 110);
        assert_eq!(g.suppressed.blocked, 7);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999G")
            .unwrap_err()
            .contains("too large"));
        assert_eq!(Bytes(256 << 20).to_string(), "256 MiB");
        assert_eq!(Bytes(1_000_000).to_string(), "1000000 bytes");
    }
}
