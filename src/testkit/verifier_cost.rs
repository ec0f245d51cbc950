//! The verifier's cost per program, tracked per kernel in bench/verifier.json, as cilium's
//! complexity tests track theirs: `rfbench verifier` (bench/run's `verifier` part) and
//! tests/verifier_cost.rs (which vm-tests runs on 6.1 and 6.12) measure it and compare.
//!
//! The file: `{"warn_growth": 0.2, "kernels": {"6.18": {"release", "git", "recorded",
//! "programs": {"rf_egress": N, ...}, "not_loaded": [...]}}}`, keyed by the kernel's
//! major.minor. Growth beyond `warn_growth` is a warning, never a failure: the limit that
//! matters is the verifier's own (a load that fails fails every test).
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::kernel::dataplane::{Dataplane, KernelInfo, Options};
use crate::kernel::verifier;

/// A growth above this (0.2 = 20 %) warns when the file does not say otherwise.
pub const WARN_GROWTH: f64 = 0.20;

/// Lines starting with this carry one kernel's figures as JSON (a [`Measured`]): vm-tests
/// keeps them in its console logs, `bench/verifier-record` reads them back into the file.
pub const MARKER: &str = "@@RF-VERIFIER";
/// Lines starting with this are warnings vm-tests repeats in its summary.
pub const WARN_MARKER: &str = "@@RF-WARN";

/// One kernel's figures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Measured {
    /// major.minor, the key in the file.
    pub kernel: String,
    pub release: String,
    /// Instructions processed, per loaded program.
    pub programs: BTreeMap<String, u32>,
    /// Programs of the object this kernel did not load (hooks it lacks).
    #[serde(default)]
    pub not_loaded: Vec<String>,
}

/// Loads the dataplane with the options the daemon uses (`ringfence run`'s defaults: map
/// sizes, DNS TTL settings, events on), so the figures are those of a real load: the
/// settings are read-only data the verifier prunes on. Nothing is attached.
pub fn measure() -> Result<Measured> {
    let opts = Options {
        dns_min_ttl: crate::policy::DEFAULT_DNS_MIN_TTL,
        dns_grace: crate::policy::DEFAULT_DNS_GRACE,
        ..Default::default()
    };
    let dp = Dataplane::load(&opts).context("loading the dataplane as the daemon does")?;
    let kernel = KernelInfo::probe();
    let mut m = Measured {
        kernel: format!("{}.{}", kernel.version.0, kernel.version.1),
        release: kernel.release,
        programs: BTreeMap::new(),
        not_loaded: vec![],
    };
    for c in verifier::costs(&dp)? {
        match c.verified_insns {
            Some(n) => {
                m.programs.insert(c.name, n);
            }
            None => m.not_loaded.push(c.name),
        }
    }
    if m.programs.is_empty() {
        bail!("the object loaded no program at all");
    }
    Ok(m)
}

/// One program's figure beside the file's.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    pub program: String,
    pub now: Option<u32>,
    pub baseline: Option<u32>,
    /// (now - baseline) / baseline, when both are there.
    pub growth: Option<f64>,
}

/// The comparison of a measurement with the file's entry for its kernel.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Comparison {
    pub kernel: String,
    pub warn_growth: f64,
    pub rows: Vec<Row>,
    /// Growth beyond `warn_growth`, one line each.
    pub warnings: Vec<String>,
    /// Not warnings: a kernel or program the file does not know, a program gone.
    pub notes: Vec<String>,
}

/// Reads the file; a missing file is an empty one (every kernel gets a note).
pub fn read_file(path: &Path) -> Result<serde_json::Value> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::json!({})),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn compare(file: &serde_json::Value, m: &Measured) -> Result<Comparison> {
    let warn_growth = file["warn_growth"].as_f64().unwrap_or(WARN_GROWTH);
    let entry = &file["kernels"][&m.kernel];
    let mut base: BTreeMap<String, u32> = BTreeMap::new();
    if let Some(progs) = entry["programs"].as_object() {
        for (k, v) in progs {
            let n = v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| {
                    format!("kernels.{}.programs.{k}: {v} is not a count", m.kernel)
                })?;
            base.insert(k.clone(), n);
        }
    }
    let mut c = Comparison {
        kernel: m.kernel.clone(),
        warn_growth,
        rows: vec![],
        warnings: vec![],
        notes: vec![],
    };
    if base.is_empty() {
        c.notes.push(format!(
            "no figures for kernel {} in the file: nothing to compare (record them, see bench/README.md)",
            m.kernel
        ));
    }
    let names: std::collections::BTreeSet<&String> = m.programs.keys().chain(base.keys()).collect();
    for name in names {
        let now = m.programs.get(name).copied();
        let b = base.get(name).copied();
        let growth = match (now, b) {
            (Some(n), Some(b)) if b > 0 => Some((f64::from(n) - f64::from(b)) / f64::from(b)),
            _ => None,
        };
        match (now, b, growth) {
            (Some(n), Some(b), Some(g)) if g > warn_growth => c.warnings.push(format!(
                "verifier cost of {name} on {} grew {:.0}%: {b} -> {n} instructions processed (warns above {:.0}%)",
                m.kernel,
                g * 100.0,
                warn_growth * 100.0
            )),
            (Some(n), None, _) if !base.is_empty() => c
                .notes
                .push(format!("{name}: {n} instructions processed, new (not in the file for {})", m.kernel)),
            (None, Some(b), _) => c.notes.push(format!(
                "{name}: in the file for {} ({b}) but {} on this kernel",
                m.kernel,
                if m.not_loaded.contains(name) { "not loaded" } else { "not in the object" }
            )),
            _ => {}
        }
        c.rows.push(Row {
            program: name.clone(),
            now,
            baseline: b,
            growth,
        });
    }
    Ok(c)
}

impl Comparison {
    /// The table, a line per program, then warnings and notes.
    pub fn render(&self) -> String {
        let mut s = format!(
            "verifier cost on {} (instructions processed; warns above +{:.0}%)\n  {:<24}{:>10}{:>10}{:>9}\n",
            self.kernel,
            self.warn_growth * 100.0,
            "program",
            "now",
            "baseline",
            "change"
        );
        let opt = |v: Option<u32>| v.map_or("-".to_string(), |n| n.to_string());
        for r in &self.rows {
            let g = r
                .growth
                .map_or("-".to_string(), |g| format!("{:+.1}%", g * 100.0));
            s += &format!(
                "  {:<24}{:>10}{:>10}{:>9}\n",
                r.program,
                opt(r.now),
                opt(r.baseline),
                g
            );
        }
        for w in &self.warnings {
            s += &format!("  WARNING: {w}\n");
        }
        for n in &self.notes {
            s += &format!("  note: {n}\n");
        }
        s
    }
}

/// Writes `m` as its kernel's entry in the file at `path`, keeping every other kernel's.
pub fn record(path: &Path, m: &Measured, git: &str) -> Result<()> {
    let mut file = read_file(path)?;
    if !file.is_object() {
        bail!("{}: not a JSON object", path.display());
    }
    if file.get("warn_growth").is_none() {
        file["warn_growth"] = WARN_GROWTH.into();
    }
    if !file["kernels"].is_object() {
        file["kernels"] = serde_json::json!({});
    }
    file["kernels"][&m.kernel] = serde_json::json!({
        "release": m.release,
        "git": git,
        "programs": m.programs,
        "not_loaded": m.not_loaded,
    });
    let text = serde_json::to_string_pretty(&file)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(progs: &[(&str, u32)]) -> Measured {
        Measured {
            kernel: "6.1".into(),
            release: "6.1.0-57-amd64".into(),
            programs: progs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            not_loaded: vec!["rf_own_create".into()],
        }
    }

    #[test]
    fn growth_past_the_threshold_warns_and_only_that() {
        let file = serde_json::json!({"kernels": {"6.1": {"programs": {
            "rf_egress": 1000, "rf_ingress": 1000, "rf_own_create": 10, "rf_old": 5}}}});
        let c = compare(
            &file,
            &m(&[("rf_egress", 1201), ("rf_ingress", 1200), ("rf_new", 3)]),
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 1, "{c:?}");
        assert!(c.warnings[0].contains("rf_egress") && c.warnings[0].contains("1000 -> 1201"));
        assert_eq!(c.notes.len(), 3, "{c:?}");
        assert!(c
            .notes
            .iter()
            .any(|n| n.contains("rf_own_create") && n.contains("not loaded")));
        assert!(c
            .notes
            .iter()
            .any(|n| n.contains("rf_old") && n.contains("not in the object")));
        assert!(c
            .notes
            .iter()
            .any(|n| n.contains("rf_new") && n.contains("new")));
    }

    #[test]
    fn an_unknown_kernel_is_a_note_and_a_bad_count_an_error() {
        let c = compare(&serde_json::json!({}), &m(&[("rf_egress", 1)])).unwrap();
        assert!(c.warnings.is_empty() && c.notes.len() == 1 && c.notes[0].contains("no figures"));
        let bad = serde_json::json!({"kernels": {"6.1": {"programs": {"rf_egress": "x"}}}});
        let e = compare(&bad, &m(&[("rf_egress", 1)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernels.6.1.programs.rf_egress"), "{e}");
    }

    #[test]
    fn record_keeps_other_kernels() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.json");
        std::fs::write(
            &p,
            r#"{"warn_growth": 0.3, "kernels": {"6.12": {"programs": {"a": 1}}}}"#,
        )
        .unwrap();
        record(&p, &m(&[("rf_egress", 7)]), "abc").unwrap();
        let f = read_file(&p).unwrap();
        assert_eq!(f["warn_growth"], 0.3);
        assert_eq!(f["kernels"]["6.12"]["programs"]["a"], 1);
        assert_eq!(f["kernels"]["6.1"]["programs"]["rf_egress"], 7);
        assert_eq!(f["kernels"]["6.1"]["git"], "abc");
    }
}
