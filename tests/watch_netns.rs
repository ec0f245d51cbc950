//! Watching it work (issue 13): `--fail-on-block` and its GitHub Actions annotations, with
//! real jobs (curl against dnsmasq and HTTP responders in namespaces) under `exec` and the
//! daemon. Needs root; never skipped.

mod common;

use std::process::Command;

use common::daemon::{in_job, Daemon};
use common::*;
use testbed::{link_v4, DNS_V4};

/// `ringfence <args>` in the client namespace, as a GitHub Actions step would run it.
fn under_actions(tb: &Testbed, args: &[String]) -> (Option<i32>, String, String) {
    let mut c = tb.client_cmd(RINGFENCE, args);
    c.env("GITHUB_ACTIONS", "true");
    let (st, out, err) = run_timeout(c, JOB_TIMEOUT);
    (st.code(), out, err)
}

fn annotation_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("::error")).collect()
}

#[test]
fn exec_fail_on_block_exit_status_and_annotations() {
    let (ok, bad) = (link_v4(26), link_v4(27));
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", ok),
            DnsRecord::a("attacker.test", bad),
        ],
        &[sa(ok, 80), sa(bad, 80)],
    );
    let events = tb.workdir().join("fob.jsonl");
    let run = |script: &str, fail: bool| {
        let mut a: Vec<String> = [
            "exec",
            "--mode",
            "block",
            "--allow",
            "ok.test:80",
            "--job",
            "fob-13",
            "--events",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(events.display().to_string());
        if fail {
            a.push("--fail-on-block".into());
        }
        a.extend(["--", "sh", "-c", script].iter().map(|s| s.to_string()));
        under_actions(&tb, &a)
    };
    let fetch_ok = "curl -sS --max-time 5 http://ok.test/ >/dev/null";
    let fetch_bad = "curl -sS --connect-timeout 2 --max-time 3 http://attacker.test/ >/dev/null";

    // Blocked, the command succeeded: 3, and one annotation per blocked call: the query for
    // the unlisted name (refused in the kernel) and the direct connection to its address.
    let fetch_ip = format!("curl -sS --connect-timeout 2 --max-time 3 http://{bad}/ >/dev/null");
    let (code, out, err) = run(
        &format!("{fetch_ok}; {fetch_bad}; {fetch_ip}; exit 0"),
        true,
    );
    assert_eq!(code, Some(3), "stdout:\n{out}\nstderr:\n{err}");
    let lines = annotation_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    // The annotations agree with the trail: one per blocked destination, with its count.
    let text = std::fs::read_to_string(&events).unwrap();
    let blocked: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["verdict"] == "blocked")
        .collect();
    let count = |reason: &str| blocked.iter().filter(|e| e["reason"] == reason).count();
    let (queries, direct) = (count("dns-query"), count("direct-ip"));
    assert!(queries >= 1 && direct >= 1, "{text}");
    assert_eq!(queries + direct, blocked.len(), "{text}");
    let times = |n: usize| {
        if n > 1 {
            format!(", {n} times)")
        } else {
            ")".into()
        }
    };
    let dns = DNS_V4;
    let q = lines
        .iter()
        .find(|l| l.contains("DNS query"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        q.starts_with("::error title=ringfence blocked a DNS query for attacker.test::job fob-13: udp to resolver ")
            && q.contains(&format!("{dns} port 53 asking for attacker.test from process curl (pid "))
            && q.ends_with(&format!("was blocked (dns-query{}", times(queries))),
        "{q}\n{text}"
    );
    let d = lines
        .iter()
        .find(|l| l.contains("direct-ip"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        d.starts_with(&format!("::error title=ringfence blocked {bad}%3A80::job fob-13: tcp to {bad} port 80 from process curl (pid "))
            && d.ends_with(&format!("was blocked (direct-ip{}", times(direct))),
        "{d}\n{text}"
    );
    assert!(err.contains("--fail-on-block"), "{err}");

    // The command's own failure wins over the block.
    let (code, out, _) = run(&format!("{fetch_bad}; exit 5"), true);
    assert_eq!(code, Some(5), "{out}");
    assert_eq!(annotation_lines(&out).len(), 1, "{out}");

    // Nothing blocked: 0, no annotation.
    let (code, out, err) = run(fetch_ok, true);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(annotation_lines(&out).is_empty(), "{out}");

    // Without the flag a block does not fail the job, and nothing is annotated.
    let (code, out, _) = run(&format!("{fetch_bad}; exit 0"), false);
    assert_eq!(code, Some(0), "{out}");
    assert!(annotation_lines(&out).is_empty(), "{out}");

    // Outside Actions: the status, no annotation lines.
    let mut a: Vec<String> = [
        "exec",
        "--mode",
        "block",
        "--allow",
        "ok.test:80",
        "--fail-on-block",
        "--",
        "sh",
        "-c",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("{fetch_bad}; exit 0"));
    let mut c = tb.client_cmd(RINGFENCE, &a);
    c.env_remove("GITHUB_ACTIONS");
    let (st, out, _) = run_timeout(c, JOB_TIMEOUT);
    assert_eq!(st.code(), Some(3));
    assert!(annotation_lines(&out).is_empty(), "{out}");
}

#[test]
fn daemon_job_fail_on_block() {
    let (ok, bad) = (link_v4(28), link_v4(29));
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", ok),
            DnsRecord::a("attacker.test", bad),
        ],
        &[sa(ok, 80), sa(bad, 80)],
    );
    let mut d = Daemon::start(&tb, &[]);
    let dns = DNS_V4.to_string();
    let policy = [
        "--mode",
        "block",
        "--allow",
        "ok.test:80",
        "--dns-resolver",
        &dns,
    ];
    let (cga, cgb) = (d.cgroup("fob-a"), d.cgroup("fob-b"));
    let mut with_flag = policy.to_vec();
    with_flag.push("--fail-on-block");
    d.start_job("fob-a-13", &cga, &with_flag);
    d.start_job("fob-b-13", &cgb, &with_flag);

    let curl_in = |cg: &std::path::Path, url: &str| {
        run_timeout(in_job(&tb, cg, &curl(&["-4"], url)), JOB_TIMEOUT)
            .0
            .success()
    };
    assert!(curl_in(&cga, "http://ok.test/"));
    assert!(
        !curl_in(&cga, "http://attacker.test/"),
        "attacker.test was reached"
    );
    assert!(curl_in(&cgb, "http://ok.test/"));

    let end = |id: &str| {
        let mut c = Command::new(RINGFENCE);
        c.args(["job", "end", "--id", id, "--socket"])
            .arg(&d.socket)
            .env("GITHUB_ACTIONS", "true");
        let (st, out, err) = run_timeout(c, JOB_TIMEOUT);
        (st.code(), out, err)
    };
    let (code, out, err) = end("fob-a-13");
    assert_eq!(code, Some(3), "{out}\n{err}\n{}", d.log());
    let lines = annotation_lines(&out);
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with("::error title=ringfence blocked a DNS query for attacker.test::job fob-a-13: udp to resolver ")
            && lines[0].contains("asking for attacker.test from process curl"),
        "{}",
        lines[0]
    );
    // The report is still printed before the annotations.
    assert!(out.contains("attacker.test"), "{out}");

    let (code, out, err) = end("fob-b-13");
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(annotation_lines(&out).is_empty(), "{out}");
}
