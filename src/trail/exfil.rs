//! DNS exfiltration signals: a job that leaks a secret through DNS sends it as query names
//! (`<encoded secret>.attacker.test`) to the resolver it is allowed to use, and the
//! attacker's authoritative server reads them. The verdicts cannot see that (the resolver is
//! allowed), so the agent watches every query name of a job for three signals:
//!
//! - `long-label`: a label longer than `max_label` characters. Encoders fill labels to the
//!   63-byte limit to move data fast; ordinary names rarely exceed ~40 (generated bucket names
//!   such as `github-production-repository-file-5c1aeb` are the longest seen in CI traffic).
//! - `high-entropy`: a run of at least `entropy_min_length` characters whose Shannon entropy
//!   exceeds `entropy` bits per character. Runs are the parts of a label between hyphens:
//!   hostnames join words with hyphens, and a whole hyphenated label mixes the letters of
//!   several words, which measures as random as base32. Names are lowercased before they get
//!   here, so base64 is measured over its lowercased alphabet. Hex tops out at 4 bits per
//!   character and measures ~3.6 over 32 characters, below any threshold that spares English
//!   words: hex is left to the other two signals.
//! - `many-names`: more than `max_names` distinct names under one domain within the job.
//!   Each query can only carry ~150 bytes, so leaking anything sizeable takes many names.
//!
//! "Domain" is the registrable part approximated as the last two labels (`a.b.leak.test` ->
//! `leak.test`). That is wrong for public suffixes with two labels (`co.uk`, `github.io`):
//! their names are pooled under the suffix, which can only make `many-names` fire earlier,
//! never hide a leak.
//!
//! Memory is bounded per job: a domain's distinct names are kept as 64-bit keyed hashes in a
//! set capped at `max_names + 1` entries (it is dropped once the signal fires), at most
//! [`MAX_DOMAINS`] domains are tracked (when full, the domain with the fewest names makes
//! room, so junk domains cannot push a growing one out), and at most [`MAX_FINDINGS`]
//! findings are kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, RandomState};

use serde::{Deserialize, Serialize};

/// Domains whose distinct names are tracked at once, per job.
pub const MAX_DOMAINS: usize = 1024;
/// Findings kept per job; more are counted in [`ExfilDetector::dropped_findings`].
pub const MAX_FINDINGS: usize = 256;
/// A lookup is often seen twice (the query copy of a name the policy does not allow, then
/// its answer; or an A and an AAAA answer): a name seen within this many observations is
/// the same lookup and is not counted again.
const RECENT: usize = 64;

/// The longest label DNS allows (RFC 1035 §2.3.4).
pub const MAX_LABEL_LIMIT: u32 = 63;
/// Upper bound on `max_names`: the per-domain set holds that many hashes, times
/// [`MAX_DOMAINS`].
pub const MAX_NAMES_LIMIT: u32 = 10_000;
/// Entropy in bits per character cannot exceed log2(256).
pub const ENTROPY_LIMIT: f64 = 8.0;

/// The thresholds, from the policy (`dns-exfil-*` keys). Each signal fires when the measured
/// value is strictly above its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `dns-exfil-max-label`: longest label allowed, 1-63 characters.
    pub max_label: u32,
    /// `dns-exfil-entropy`: bits per character, above 0 and at most 8.
    pub entropy: f64,
    /// `dns-exfil-entropy-min-length`: runs shorter than this are not measured (a short
    /// string cannot show its entropy: 8 distinct characters measure 3 bits at most), 1-63.
    pub entropy_min_length: u32,
    /// `dns-exfil-max-names`: distinct names per domain, 1-10000.
    pub max_names: u32,
}

// Policies are compared with `==` and `entropy` is never NaN: the policy parser only
// accepts finite values in (0, 8].
impl Eq for Thresholds {}

impl Default for Thresholds {
    /// Chosen against names CI jobs really resolve (GitHub, npm, PyPI, crates.io, Docker,
    /// Azure blob, S3 buckets): none of those fires, while base32 secrets over 32 characters
    /// measure above 4.0 bits nine times out of ten and labels at the 63-byte limit always
    /// exceed 50. See the tests.
    fn default() -> Thresholds {
        Thresholds {
            max_label: 50,
            entropy: 4.0,
            entropy_min_length: 20,
            max_names: 50,
        }
    }
}

/// Which signal a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Signal {
    LongLabel,
    HighEntropy,
    ManyNames,
    /// Not DNS: a job process ptraced (or wrote the memory of, or took a descriptor from) a
    /// process outside the job, which could then send for it unjudged (src/job/guard.rs).
    PtraceOutsideJob,
    /// Not DNS: one of ringfence's programs is no longer attached where it was attached.
    DataplaneDetached,
    /// An answer named special addresses (loopback, link-local, metadata, multicast…),
    /// which are never bound from DNS: a name pointed at 169.254.169.254 is DNS rebinding.
    DnsRebinding,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::LongLabel => "long-label",
            Signal::HighEntropy => "high-entropy",
            Signal::ManyNames => "many-names",
            Signal::PtraceOutsideJob => "ptrace-outside-job",
            Signal::DataplaneDetached => "dataplane-detached",
            Signal::DnsRebinding => "dns-rebinding",
        }
    }

    /// A DNS exfiltration signal (a measured value over a threshold, per domain)?
    pub fn is_dns(self) -> bool {
        matches!(
            self,
            Signal::LongLabel | Signal::HighEntropy | Signal::ManyNames
        )
    }

    /// What `value` measures, for reports.
    pub fn unit(self) -> &'static str {
        match self {
            Signal::LongLabel => "characters in a label",
            Signal::HighEntropy => "bits per character",
            Signal::ManyNames => "distinct names",
            Signal::PtraceOutsideJob | Signal::DataplaneDetached => "events",
            Signal::DnsRebinding => "special addresses in an answer",
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One (signal, domain) that crossed its threshold in a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub signal: Signal,
    pub domain: String,
    /// For long-label and high-entropy the largest value seen so far; for many-names the
    /// distinct names counted when the threshold was crossed (the set stops growing there).
    /// Entropy is rounded to two decimals.
    pub value: f64,
    pub threshold: f64,
    /// Lookups that showed the signal (many-names: every lookup under the domain, before and
    /// after the crossing).
    pub count: u64,
    /// The name that crossed the threshold first.
    pub example: String,
}

#[derive(Debug, Default)]
struct DomainNames {
    /// Keyed hashes of the distinct names, at most `max_names + 1`; emptied once the
    /// many-names signal fires.
    names: HashSet<u64>,
    /// Lookups under the domain.
    lookups: u64,
    fired: bool,
}

/// Watches one job's query names. Feed it every name with [`observe`](Self::observe); it
/// returns the findings that crossed a threshold for the first time with that name.
#[derive(Debug)]
pub struct ExfilDetector {
    thresholds: Thresholds,
    /// Keyed (SipHash, random key per job), so a name cannot be crafted to collide with
    /// another and hide from the distinct count.
    hasher: RandomState,
    domains: HashMap<String, DomainNames>,
    findings: HashMap<(Signal, String), Finding>,
    recent: VecDeque<u64>,
    /// Findings not kept because [`MAX_FINDINGS`] were already kept.
    pub dropped_findings: u64,
    /// Domains dropped from tracking to make room (see the module documentation).
    pub evicted_domains: u64,
}

impl ExfilDetector {
    pub fn new(thresholds: Thresholds) -> ExfilDetector {
        ExfilDetector {
            thresholds,
            hasher: RandomState::new(),
            domains: HashMap::new(),
            findings: HashMap::new(),
            recent: VecDeque::with_capacity(RECENT),
            dropped_findings: 0,
            evicted_domains: 0,
        }
    }

    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    /// One query name as the DNS parser gives it (lowercase, no trailing dot). Returns the
    /// findings this name created, in signal order; later lookups only update the kept
    /// findings' values and counts.
    pub fn observe(&mut self, name: &str) -> Vec<Finding> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() || name.split('.').any(str::is_empty) {
            return Vec::new();
        }
        let hash = self.hasher.hash_one(name);
        if self.recent.contains(&hash) {
            return Vec::new();
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(hash);

        let t = self.thresholds;
        let domain = registrable(name);
        let mut new = Vec::new();

        let longest = name.split('.').map(|l| l.chars().count()).max();
        if let Some(len) = longest.filter(|&l| l as u64 > u64::from(t.max_label)) {
            new.extend(self.record(
                Signal::LongLabel,
                domain,
                len as f64,
                f64::from(t.max_label),
                name,
            ));
        }
        if let Some(h) = max_run_entropy(name, t.entropy_min_length as usize) {
            let h = (h * 100.0).round() / 100.0;
            if h > t.entropy {
                new.extend(self.record(Signal::HighEntropy, domain, h, t.entropy, name));
            }
        }
        if let Some(distinct) = self.count_name(domain, hash) {
            new.extend(self.record(
                Signal::ManyNames,
                domain,
                distinct as f64,
                f64::from(t.max_names),
                name,
            ));
        }
        new
    }

    /// Counts `hash` under `domain`; returns the distinct count when it just crossed
    /// `max_names`.
    fn count_name(&mut self, domain: &str, hash: u64) -> Option<usize> {
        if !self.domains.contains_key(domain) && self.domains.len() >= MAX_DOMAINS {
            // Make room by dropping the domain with the fewest names that has not fired:
            // a leak grows its domain, so it is never the smallest for long.
            let victim = self
                .domains
                .iter()
                .filter(|(_, d)| !d.fired)
                .min_by_key(|(_, d)| d.names.len())
                .map(|(k, _)| k.clone());
            match victim {
                Some(v) => {
                    self.domains.remove(&v);
                    self.evicted_domains += 1;
                }
                // Every tracked domain has fired: the job is already flagged many times over.
                None => return None,
            }
        }
        let max = self.thresholds.max_names as usize;
        let d = self.domains.entry(domain.to_owned()).or_default();
        d.lookups += 1;
        if let Some(f) = self
            .findings
            .get_mut(&(Signal::ManyNames, domain.to_owned()))
        {
            f.count = d.lookups;
        }
        if d.fired {
            return None;
        }
        d.names.insert(hash);
        if d.names.len() > max {
            d.fired = true;
            let n = d.names.len();
            d.names = HashSet::new();
            return Some(n);
        }
        None
    }

    /// Updates or creates the finding; returns it when it is new.
    fn record(
        &mut self,
        signal: Signal,
        domain: &str,
        value: f64,
        threshold: f64,
        name: &str,
    ) -> Option<Finding> {
        let key = (signal, domain.to_owned());
        if let Some(f) = self.findings.get_mut(&key) {
            f.count += 1;
            if signal != Signal::ManyNames && value > f.value {
                f.value = value;
            }
            return None;
        }
        if self.findings.len() >= MAX_FINDINGS {
            self.dropped_findings += 1;
            return None;
        }
        let count = match signal {
            Signal::ManyNames => self.domains.get(domain).map_or(1, |d| d.lookups),
            _ => 1,
        };
        let f = Finding {
            signal,
            domain: domain.to_owned(),
            value,
            threshold,
            count,
            example: name.to_owned(),
        };
        self.findings.insert(key, f.clone());
        Some(f)
    }

    /// An answer for `name` named special addresses (see [`crate::policy::is_special`]):
    /// a `dns-rebinding` finding, once per domain, its example the name and the addresses.
    pub fn rebinding(&mut self, name: &str, special: &[std::net::IpAddr]) -> Option<Finding> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let addrs: Vec<String> = special.iter().map(ToString::to_string).collect();
        let example = format!("{name} -> {}", addrs.join(" "));
        self.record(
            Signal::DnsRebinding,
            registrable(&name),
            special.len() as f64,
            0.0,
            &example,
        )
    }

    /// Every finding so far, by domain then signal.
    pub fn findings(&self) -> Vec<Finding> {
        let mut v: Vec<Finding> = self.findings.values().cloned().collect();
        v.sort_by(|a, b| (&a.domain, a.signal).cmp(&(&b.domain, b.signal)));
        v
    }
}

/// The last two labels of `name` (the whole name when it has fewer).
pub fn registrable(name: &str) -> &str {
    match name.rmatch_indices('.').nth(1) {
        Some((i, _)) => &name[i + 1..],
        None => name,
    }
}

/// Shannon entropy of `s`'s characters, in bits per character.
pub fn entropy(s: &str) -> f64 {
    let mut counts: HashMap<char, u32> = HashMap::new();
    let mut n = 0u32;
    for c in s.chars() {
        *counts.entry(c).or_default() += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n = f64::from(n);
    counts
        .values()
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// The highest entropy among the hyphen-separated runs of `name`'s labels that have at
/// least `min_len` characters; `None` when no run is that long.
fn max_run_entropy(name: &str, min_len: usize) -> Option<f64> {
    name.split(['.', '-'])
        .filter(|r| r.chars().count() >= min_len)
        .map(entropy)
        .reduce(f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names CI jobs resolve every day: none may fire, alone or all in one job.
    const ORDINARY: &[&str] = &[
        "registry.npmjs.org",
        "productionresultssa12.blob.core.windows.net",
        "productionresultssa0.blob.core.windows.net",
        "acccache-prod-ghproductionresultssa1.blob.core.windows.net",
        "objects.githubusercontent.com",
        "objects-origin.githubusercontent.com",
        "pipelinesghubeus7.actions.githubusercontent.com",
        "results-receiver.actions.githubusercontent.com",
        "pkg-containers.githubusercontent.com",
        "github-production-release-asset-2e65be.s3.amazonaws.com",
        "github-production-repository-file-5c1aeb.s3.amazonaws.com",
        "ec2-54-123-45-67.compute-1.amazonaws.com",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com",
        "d36jcksde1wxzq.cloudfront.net",
        "westus2-1.in.applicationinsights.azure.com",
        "files.pythonhosted.org",
        "index.crates.io",
        "static.crates.io",
        "registry-1.docker.io",
        "production.cloudflare.docker.com",
        "deb.debian.org",
        "dl-cdn.alpinelinux.org",
        "login.microsoftonline.com",
        "o123456.ingest.sentry.io",
        "_http._tcp.deb.debian.org",
        "1.0.0.127.in-addr.arpa",
        "github.com",
        "localhost",
    ];

    /// Deterministic bytes, so the encoded secrets (and the test) never change.
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as u8
            })
            .collect()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// RFC 4648 base32, lowercase, unpadded.
    fn base32(b: &[u8]) -> String {
        const A: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
        let mut out = String::new();
        let (mut acc, mut bits) = (0u32, 0);
        for &x in b {
            acc = (acc << 8) | u32::from(x);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(A[((acc >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            out.push(A[((acc << (5 - bits)) & 31) as usize] as char);
        }
        out
    }

    /// base64url, lowercased as the DNS parser delivers names.
    fn base64_lower(b: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for c in b.chunks(3) {
            let v = c
                .iter()
                .enumerate()
                .fold(0u32, |a, (i, &x)| a | u32::from(x) << (16 - 8 * i));
            for i in 0..=c.len() {
                out.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out.to_ascii_lowercase()
    }

    fn signals(found: &[Finding]) -> Vec<(Signal, &str)> {
        found
            .iter()
            .map(|f| (f.signal, f.domain.as_str()))
            .collect()
    }

    #[test]
    fn ordinary_names_raise_nothing() {
        let mut d = ExfilDetector::new(Thresholds::default());
        for name in ORDINARY {
            assert_eq!(d.observe(name), vec![], "{name}");
        }
        assert!(d.findings().is_empty());
    }

    #[test]
    fn registrable_is_the_last_two_labels() {
        assert_eq!(registrable("a.b.leak.test"), "leak.test");
        assert_eq!(registrable("leak.test"), "leak.test");
        assert_eq!(registrable("localhost"), "localhost");
        assert_eq!(
            registrable("productionresultssa12.blob.core.windows.net"),
            "windows.net"
        );
    }

    #[test]
    fn entropy_values() {
        assert_eq!(entropy(""), 0.0);
        assert_eq!(entropy("aaaa"), 0.0);
        assert_eq!(entropy("abcd"), 2.0);
        assert!((entropy("0123456789abcdef") - 4.0).abs() < 1e-12);
    }

    #[test]
    fn long_label_fires_once_per_domain() {
        let mut d = ExfilDetector::new(Thresholds::default());
        let secret = hex(&bytes(1, 30)); // 60 characters
        let name = format!("{secret}.leak.test");
        let found = d.observe(&name);
        assert_eq!(signals(&found), [(Signal::LongLabel, "leak.test")]);
        assert_eq!(found[0].value, 60.0);
        assert_eq!(found[0].threshold, 50.0);
        assert_eq!(found[0].example, name);
        // A longer label under the same domain raises the value, not a new finding.
        let longer = format!("{}.x.leak.test", hex(&bytes(2, 31)));
        assert_eq!(d.observe(&longer), vec![]);
        let all = d.findings();
        assert_eq!((all.len(), all[0].value, all[0].count), (1, 62.0, 2));
        assert_eq!(all[0].example, name);
        // 50 characters is at the threshold, not over it.
        let mut d = ExfilDetector::new(Thresholds::default());
        assert_eq!(d.observe(&format!("{}.leak.test", "a".repeat(50))), vec![]);
    }

    #[test]
    fn encoded_secrets_have_high_entropy() {
        // An AWS-style secret key, as an attacker's script would send it.
        for (seed, encode) in [
            (3, base32 as fn(&[u8]) -> String),
            (4, base32),
            (5, base64_lower),
        ] {
            let mut d = ExfilDetector::new(Thresholds::default());
            let label = encode(&bytes(seed, 25)); // 40 (base32) or 34 (base64) characters
            let name = format!("{label}.0.exfil.attacker.test");
            let found = d.observe(&name);
            assert_eq!(
                signals(&found),
                [(Signal::HighEntropy, "attacker.test")],
                "{name}: {:.2} bits",
                entropy(&label)
            );
            assert!(found[0].value > 4.0 && found[0].value <= 6.0, "{found:?}");
            assert_eq!(found[0].threshold, 4.0);
        }
        // Hex stays below: at most 4 bits per character (see the module documentation).
        let mut d = ExfilDetector::new(Thresholds::default());
        assert_eq!(d.observe(&format!("{}.leak.test", hex(&bytes(6, 20)))), []);
    }

    #[test]
    fn short_runs_are_not_measured() {
        let t = Thresholds::default();
        let mut d = ExfilDetector::new(t);
        // 19 distinct characters measure log2(19) = 4.25 bits but are too short to judge.
        assert_eq!(d.observe("abcdefghijklmnopqrs.leak.test"), []);
        // The same characters as one 20-character run fire; split by a hyphen they do not.
        assert_eq!(
            signals(&d.observe("abcdefghijklmnopqrst.leak.test")),
            [(Signal::HighEntropy, "leak.test")]
        );
        assert_eq!(d.observe("abcdefghij-klmnopqrst.other.test"), []);
    }

    #[test]
    fn many_names_under_one_domain() {
        let mut d = ExfilDetector::new(Thresholds::default());
        let mut fired = Vec::new();
        for i in 0..80 {
            // 32 hex characters per name: no other signal fires.
            let name = format!("{}.leak.test", hex(&bytes(100 + i, 16)));
            for f in d.observe(&name) {
                fired.push((i, f));
            }
        }
        assert_eq!(fired.len(), 1, "{fired:?}");
        let (i, f) = &fired[0];
        assert_eq!(
            (*i, f.signal, f.domain.as_str()),
            (50, Signal::ManyNames, "leak.test")
        );
        assert_eq!((f.value, f.threshold, f.count), (51.0, 50.0, 51));
        assert!(f.example.ends_with(".leak.test"));
        // Later lookups are counted in the kept finding.
        assert_eq!(d.findings()[0].count, 80);
        // The set was released once the signal fired.
        assert!(d.domains["leak.test"].names.is_empty());
    }

    #[test]
    fn repeated_names_are_not_distinct() {
        let mut d = ExfilDetector::new(Thresholds::default());
        // A job resolving the same few names over and over is ordinary.
        for round in 0..200 {
            for name in ORDINARY {
                assert_eq!(d.observe(name), [], "{name} in round {round}");
            }
        }
        // ...and so is one with a few dozen hosts under one domain.
        for i in 0..50 {
            assert_eq!(d.observe(&format!("host{i}.corp.test")), []);
        }
        assert_eq!(
            signals(&d.observe("host50.corp.test")),
            [(Signal::ManyNames, "corp.test")]
        );
    }

    #[test]
    fn query_then_answer_is_one_lookup() {
        let mut d = ExfilDetector::new(Thresholds::default());
        let name = format!("{}.leak.test", "x".repeat(60));
        assert_eq!(d.observe(&name).len(), 1);
        assert_eq!(d.observe(&name), []);
        assert_eq!(d.findings()[0].count, 1);
    }

    #[test]
    fn memory_stays_bounded() {
        let t = Thresholds {
            max_names: 5,
            ..Thresholds::default()
        };
        let mut d = ExfilDetector::new(t);
        // The leak starts, then many junk domains with one name each try to push it out.
        for i in 0..3 {
            d.observe(&format!("n{i}.leak.test"));
        }
        for i in 0..3 * MAX_DOMAINS {
            d.observe(&format!("x.junk{i}.test"));
            assert!(d.domains.len() <= MAX_DOMAINS);
            for set in d.domains.values() {
                assert!(set.names.len() <= 6);
            }
        }
        assert!(d.evicted_domains > 0);
        let found: Vec<Finding> = (3..10)
            .flat_map(|i| d.observe(&format!("n{i}.leak.test")))
            .collect();
        assert_eq!(signals(&found), [(Signal::ManyNames, "leak.test")]);

        // Findings are capped too.
        let mut d = ExfilDetector::new(Thresholds::default());
        for i in 0..MAX_FINDINGS + 10 {
            d.observe(&format!("{}.d{i}.test", "y".repeat(60)));
        }
        assert_eq!(d.findings().len(), MAX_FINDINGS);
        assert_eq!(d.dropped_findings, 10);
    }

    #[test]
    fn odd_names_are_ignored() {
        let mut d = ExfilDetector::new(Thresholds::default());
        for name in ["", ".", "a..b", ".leak.test"] {
            assert_eq!(d.observe(name), [], "{name:?}");
        }
        // A trailing dot is the same name.
        let long = format!("{}.leak.test.", "z".repeat(60));
        assert_eq!(d.observe(&long)[0].domain, "leak.test");
    }
}
