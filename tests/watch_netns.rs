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

/// Scrapes a metrics endpoint (`HOST:PORT` over HTTP with urllib, or a Unix socket path)
/// and parses it with the Prometheus client library's own text parser; prints
/// `{sample name: [{labels, value, type}]}` as JSON.
const SCRAPE: &str = r#"
import json, socket, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
t = sys.argv[1]
if t.startswith("/"):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(t)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: ringfence\r\n\r\n")
    data = b""
    while True:
        c = s.recv(65536)
        if not c:
            break
        data += c
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"Content-Type: text/plain; version=0.0.4" in head, head
    body = body.decode()
else:
    r = urllib.request.urlopen("http://%s/metrics" % t, timeout=5)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers
    body = r.read().decode()
out = {}
for fam in text_string_to_metric_families(body):
    for s in fam.samples:
        out.setdefault(s.name, []).append({"labels": s.labels, "value": s.value, "type": fam.type})
print(json.dumps(out))
"#;

fn scrape(tb: &Testbed, target: &str) -> serde_json::Value {
    let (st, out, err) = run_timeout(
        // The system's python, which Debian's python3-prometheus-client installs into
        // (scripts/ensure-deps test), whatever python3 comes first in PATH.
        tb.client_cmd("/usr/bin/python3", ["-c", SCRAPE, target]),
        JOB_TIMEOUT,
    );
    assert!(st.success(), "scraping {target}: {err}");
    serde_json::from_str(&out).expect("scrape JSON")
}

/// A sample's value: the one whose labels include all of `labels`.
fn value(m: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    m[name].as_array()?.iter().find_map(|s| {
        labels
            .iter()
            .all(|(k, v)| s["labels"][*k] == *v)
            .then(|| s["value"].as_f64())
            .flatten()
    })
}

#[test]
fn metrics_scraped_during_real_traffic_match_the_events() {
    let (ok, bad) = (link_v4(24), link_v4(25));
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", ok),
            DnsRecord::a("attacker.test", bad),
        ],
        &[sa(ok, 80), sa(bad, 80)],
    );
    let dir = tb.workdir().join("metrics-13");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("metrics.sock");
    let sock_s = sock.display().to_string();
    let tcp = "127.0.0.1:19464";
    let mut d = Daemon::start(&tb, &["--metrics", tcp, "--metrics-socket", &sock_s]);
    let dns = DNS_V4.to_string();
    let cg = d.cgroup("metrics");
    let id = "metrics-13";
    d.start_job(
        id,
        &cg,
        &[
            "--mode",
            "block",
            "--allow",
            "ok.test:80",
            "--dns-resolver",
            &dns,
        ],
    );
    let job = [("job", id), ("mode", "block")];

    // Traffic in the background while the endpoint is scraped over both transports.
    let traffic = {
        let argv: Vec<String> = [
            "sh",
            "-c",
            &format!(
                "for i in 1 2 3 4 5 6; do curl -4 -sS --max-time 3 http://ok.test/ >/dev/null; \
                 curl -4 -sS --connect-timeout 1 --max-time 2 http://attacker.test/ >/dev/null 2>&1; \
                 curl -4 -sS --connect-timeout 1 --max-time 2 http://{bad}/ >/dev/null 2>&1; done; true"
            ),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        in_job(&tb, &cg, &argv).spawn().expect("traffic")
    };
    let mut traffic = traffic;
    let mut last = 0.0;
    let mut scrapes = 0;
    while traffic.try_wait().unwrap().is_none() {
        for target in [tcp, sock_s.as_str()] {
            let m = scrape(&tb, target);
            let flows = value(&m, "ringfence_job_flows_total", &job).unwrap_or(0.0);
            assert!(flows >= last, "job flows went down: {last} -> {flows}");
            last = flows;
            scrapes += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(scrapes >= 2, "the traffic ended before it was scraped");

    // Once the snapshot has caught up (a second at most), every count is the events'.
    let evs = d.events(id);
    let flows: Vec<&serde_json::Value> = evs
        .iter()
        .filter(|e| e.get("type").is_none() || e["type"] == "flow")
        .filter(|e| e.get("dst").is_some())
        .collect();
    let by = |v: &str| flows.iter().filter(|e| e["verdict"] == v).count() as f64;
    let refused = flows
        .iter()
        .filter(|e| e["verdict"] == "blocked" && e["reason"] == "dns-query")
        .count() as f64;
    let dns: Vec<&serde_json::Value> = evs.iter().filter(|e| e["type"] == "dns").collect();
    let bound = dns.iter().filter(|e| e["bound"] == true).count() as f64;
    assert!(
        by("allowed") >= 6.0 && by("blocked") >= 12.0 && refused >= 6.0,
        "{evs:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let m = loop {
        let m = scrape(&tb, tcp);
        if value(&m, "ringfence_job_flows_total", &job) == Some(flows.len() as f64) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job flows never reached the events' {}: {m}",
            flows.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let v = |n: &str| value(&m, n, &job).unwrap_or_else(|| panic!("{n} missing: {m}"));
    assert_eq!(v("ringfence_job_flows_allowed_total"), by("allowed"));
    assert_eq!(v("ringfence_job_flows_blocked_total"), by("blocked"));
    assert_eq!(v("ringfence_job_flows_audited_total"), by("audited"));
    assert_eq!(v("ringfence_job_dns_answers_total"), dns.len() as f64);
    assert_eq!(v("ringfence_job_dns_answers_bound_total"), bound);
    assert_eq!(v("ringfence_job_dns_queries_refused_total"), refused);
    assert_eq!(m["ringfence_job_flows_total"][0]["type"], "counter");
    // The kernel's totals hold at least this job's.
    let k = |n: &str| value(&m, n, &[]).unwrap_or_else(|| panic!("{n} missing: {m}"));
    eprintln!(
        "kernel: new_flows {} allowed {} blocked {} dns_refused {}; events: flows {} allowed {} blocked {}",
        k("ringfence_kernel_new_flows_total"),
        k("ringfence_kernel_allowed_total"),
        k("ringfence_kernel_blocked_total"),
        k("ringfence_kernel_dns_refused_total"),
        flows.len(),
        by("allowed"),
        by("blocked")
    );
    // The only job of this daemon: the kernel's counts are its own. A query refused in the
    // kernel is a blocked flow event but not a new flow.
    assert_eq!(
        k("ringfence_kernel_new_flows_total") + k("ringfence_kernel_dns_refused_total"),
        flows.len() as f64
    );
    assert_eq!(k("ringfence_kernel_allowed_total"), by("allowed"));
    // `blocked` counts dropped packets: a blocked flow's retransmitted SYNs count again.
    assert!(
        k("ringfence_kernel_blocked_total") + k("ringfence_kernel_dns_refused_total")
            >= by("blocked")
    );
    assert_eq!(k("ringfence_kernel_dns_refused_total"), refused);
    assert!(k("ringfence_kernel_dns_bound_total") >= bound);
    assert_eq!(k("ringfence_kernel_ringbuf_drop_total"), 0.0);
    assert_eq!(k("ringfence_jobs"), 1.0);
    assert!(value(&m, "ringfence_map_entries", &[("map", "jobs")]).unwrap() >= 1.0);
    assert!(value(&m, "ringfence_map_capacity_entries", &[("map", "allow")]).unwrap() > 0.0);
    let attach = &m["ringfence_attach_info"][0]["labels"]["attach"];
    assert!(attach == "tcx" || attach == "clsact", "{m}");
    let render = k("ringfence_metrics_render_seconds");
    eprintln!(
        "metrics: {} scrapes during traffic, snapshot rendered in {:.3} ms",
        scrapes,
        render * 1e3
    );

    d.ok(&["job", "end", "--id", id]);
    d.stop();
    assert!(!sock.exists(), "the metrics socket was left behind");
}

/// A webhook receiver on loopback in the client namespace: every POST body, parsed.
struct Receiver {
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    fn start(tb: &Testbed, addr: &str) -> Receiver {
        let addr = addr.to_string();
        let l = testbed::in_netns(tb.client_ns(), move || std::net::TcpListener::bind(addr))
            .expect("entering the client namespace")
            .expect("binding the receiver");
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = bodies.clone();
        std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Read, Write};
            for s in l.incoming().flatten() {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut len = 0usize;
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                assert!(first.starts_with("POST "), "{first}");
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                b.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).expect("a JSON body"));
                let mut s = s;
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        Receiver { bodies }
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// Notices a Slack body stood for ("… N blocked call(s) or finding(s)").
fn slack_count(b: &serde_json::Value) -> usize {
    let t = b["text"].as_str().expect("a Slack body has text");
    let head = t.lines().next().unwrap();
    head.split(": ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(
            std::time::Instant::now() < end,
            "waited {secs} s for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn webhooks_batched_retried_while_down_nothing_lost() {
    let (ok, bad) = (link_v4(22), link_v4(23));
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", ok),
            DnsRecord::a("attacker.test", bad),
        ],
        &[sa(ok, 80), sa(bad, 80)],
    );
    let (host_hook, job_hook) = ("127.0.0.1:19480", "127.0.0.1:19481");
    let cfg = scratch(
        &tb,
        "hooks-13.toml",
        &format!("[[webhook]]\nurl = \"http://{host_hook}/hook\"\nformat = \"slack\"\n"),
    );
    let cfg_s = cfg.display().to_string();
    let msock = tb
        .workdir()
        .join("hooks-metrics.sock")
        .display()
        .to_string();
    let mut d = Daemon::start(&tb, &["--config", &cfg_s, "--metrics-socket", &msock]);
    let dns = DNS_V4.to_string();
    let cg = d.cgroup("hooks");
    let id = "hooks-13";
    let url = format!("http://{job_hook}/job");
    // The job's own receiver is up from the start; the host's is down.
    let job_rx = Receiver::start(&tb, job_hook);
    d.start_job(
        id,
        &cg,
        &[
            "--mode",
            "block",
            "--allow",
            "ok.test:80",
            "--dns-resolver",
            &dns,
            "--webhook",
            &url,
            "--webhook-format",
            "json",
        ],
    );
    let script = format!(
        "for i in 1 2 3 4 5; do curl -4 -sS --max-time 3 http://ok.test/ >/dev/null; \
         curl -4 -sS --connect-timeout 1 --max-time 2 http://attacker.test/ >/dev/null 2>&1; \
         curl -4 -sS --connect-timeout 1 --max-time 2 http://{bad}/ >/dev/null 2>&1; sleep 0.3; done"
    );
    let argv: Vec<String> = ["sh", "-c", &script]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (st, _, err) = run_timeout(in_job(&tb, &cg, &argv), JOB_TIMEOUT);
    assert!(st.success(), "{err}");

    // The trail has every blocked flow, whatever the receivers do.
    let blocked = || -> Vec<serde_json::Value> {
        d.events(id)
            .into_iter()
            .filter(|e| e["verdict"] == "blocked")
            .collect()
    };
    wait_for("the blocked flows in the trail", 10, || {
        let st = d.status();
        let j = &st["jobs"][0];
        j["blocked"].as_u64() == Some(blocked().len() as u64) && blocked().len() >= 10
    });
    let trail = blocked();

    // The job's receiver gets them all, in batches, each exactly once.
    wait_for("the job's webhook", 20, || {
        job_rx
            .bodies()
            .iter()
            .map(|b| b["events"].as_array().unwrap().len())
            .sum::<usize>()
            >= trail.len()
    });
    let got: Vec<serde_json::Value> = job_rx
        .bodies()
        .iter()
        .flat_map(|b| b["events"].as_array().unwrap().clone())
        .collect();
    let key =
        |e: &serde_json::Value| format!("{} {} {} {}", e["ts"], e["dst"], e["port"], e["reason"]);
    let mut a: Vec<String> = got.iter().map(key).collect();
    let mut b: Vec<String> = trail.iter().map(key).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the job's webhook and the trail differ");
    let batches = job_rx.bodies().len();
    assert!(
        batches < trail.len(),
        "{batches} batches for {} notices: not batched",
        trail.len()
    );
    assert!(job_rx
        .bodies()
        .iter()
        .all(|b| b["source"] == "ringfence" && b["dropped"] == 0));

    // The host's receiver was down: the daemon retried, and says so.
    wait_for("a failed delivery", 10, || {
        d.log().contains("webhook not delivered")
    });
    let host_rx = Receiver::start(&tb, host_hook);
    wait_for("the host's webhook after it came back", 60, || {
        host_rx.bodies().iter().map(slack_count).sum::<usize>() >= trail.len()
    });
    let bodies = host_rx.bodies();
    assert_eq!(bodies.iter().map(slack_count).sum::<usize>(), trail.len());
    let text: String = bodies
        .iter()
        .map(|b| b["text"].as_str().unwrap().to_string())
        .collect();
    assert!(
        text.contains("job hooks-13: blocked udp to attacker.test"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "job hooks-13: blocked tcp to {bad} port 80 from curl"
        )),
        "{text}"
    );
    assert!(!text.contains("dropped"), "{text}");
    // The metrics say the same: every notice delivered, the failed POSTs, nothing dropped.
    let hook = [("webhook", "0")];
    wait_for("the webhook metrics", 5, || {
        value(
            &scrape(&tb, &msock),
            "ringfence_webhook_notices_delivered_total",
            &hook,
        ) == Some(trail.len() as f64)
    });
    let m = scrape(&tb, &msock);
    assert_eq!(
        value(&m, "ringfence_webhook_batches_delivered_total", &hook),
        Some(bodies.len() as f64)
    );
    assert!(value(&m, "ringfence_webhook_post_failures_total", &hook).unwrap() >= 1.0);
    assert_eq!(
        value(&m, "ringfence_webhook_notices_dropped_total", &hook),
        Some(0.0)
    );
    eprintln!(
        "webhooks: {} notices; job receiver {} batches; host receiver down then up: {} batches",
        trail.len(),
        batches,
        bodies.len()
    );
    d.ok(&["job", "end", "--id", id]);
}

/// Runs `argv` in a pseudo-terminal (python3's pty, 40x160) and prints everything the
/// terminal received.
const IN_PTY: &str = r#"
import fcntl, os, pty, struct, sys, termios
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
out = b""
while True:
    try:
        c = os.read(fd, 65536)
    except OSError:
        break
    if not c:
        break
    out += c
os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
"#;

#[test]
fn watch_plain_lines_and_in_a_terminal_during_a_real_job() {
    let (ok, bad) = (link_v4(20), link_v4(21));
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", ok),
            DnsRecord::a("attacker.test", bad),
        ],
        &[sa(ok, 80), sa(bad, 80)],
    );
    let mut d = Daemon::start(&tb, &[]);
    let dns = DNS_V4.to_string();
    let cg = d.cgroup("watch");
    let id = "watch-13";
    d.start_job(
        id,
        &cg,
        &[
            "--mode",
            "block",
            "--allow",
            "ok.test:80",
            "--dns-resolver",
            &dns,
        ],
    );
    let sock = d.socket.display().to_string();
    let watch = |extra: &[&str]| {
        let mut c = Command::new(RINGFENCE);
        c.args([
            "watch",
            "--interval",
            "100",
            "--for",
            "10",
            "--socket",
            &sock,
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        c
    };
    let script = format!(
        "sleep 1; for i in 1 2 3; do curl -4 -sS --max-time 3 http://ok.test/ >/dev/null; \
         curl -4 -sS --connect-timeout 1 --max-time 2 http://attacker.test/ >/dev/null 2>&1; \
         curl -4 -sS --connect-timeout 1 --max-time 2 http://{bad}/ >/dev/null 2>&1; done; true"
    );
    let traffic: Vec<String> = ["sh", "-c", &script]
        .iter()
        .map(|s| s.to_string())
        .collect();

    // Plain lines (stdout is a pipe): one per flow, as they open.
    let plain = watch(&["--job", id]).spawn().expect("watch");
    let (st, _, err) = run_timeout(in_job(&tb, &cg, &traffic), JOB_TIMEOUT);
    assert!(st.success(), "{err}");
    let out = plain.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains('\x1b'),
        "escape sequences in plain output: {text:?}"
    );
    let flows: Vec<serde_json::Value> = d
        .events(id)
        .into_iter()
        .filter(|e| e.get("dst").is_some())
        .collect();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), flows.len(), "{text}");
    for (l, e) in lines.iter().zip(&flows) {
        assert!(
            l.starts_with(&format!("{} {id} ", e["ts"].as_str().unwrap())),
            "{l} vs {e}"
        );
        let v = e["verdict"].as_str().unwrap().to_uppercase();
        assert!(l.contains(&format!(" {v} ")), "{l} vs {e}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!(" BLOCKED tcp {bad}:80 - curl("))
                && l.contains("direct-ip")),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.contains(" BLOCKED udp ")
            && l.contains(" attacker.test curl(")
            && l.contains("dns-query")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!(" ALLOWED tcp {ok}:80 ok.test curl("))),
        "{text}"
    );

    // In a terminal: redrawn in place, the job's counters, blocked flows in red.
    let before = flows.len();
    let pty = {
        let mut c = Command::new("/usr/bin/python3");
        c.args([
            "-c",
            IN_PTY,
            RINGFENCE,
            "watch",
            "--interval",
            "100",
            "--for",
            "8",
            "--socket",
            &sock,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        c.spawn().expect("python3 pty")
    };
    let (st, _, err) = run_timeout(in_job(&tb, &cg, &traffic), JOB_TIMEOUT);
    assert!(st.success(), "{err}");
    let out = pty.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let screen = String::from_utf8_lossy(&out.stdout).into_owned();
    let redraws = screen.matches("\x1b[H\x1b[2J").count();
    assert!(redraws >= 10, "{redraws} redraws: {screen:?}");
    // The last screen: the job's row with its totals, and the latest flows.
    let last = screen.rsplit("\x1b[H\x1b[2J").next().unwrap();
    assert!(
        last.contains("ringfence watch") && last.contains("flows/s"),
        "{last:?}"
    );
    let total = d
        .events(id)
        .into_iter()
        .filter(|e| e.get("dst").is_some())
        .count();
    assert!(total > before);
    let blocked = d
        .events(id)
        .into_iter()
        .filter(|e| e["verdict"] == "blocked")
        .count();
    let row = last
        .split("\r\n")
        .find(|l| l.contains(id) && !l.contains("BLOCKED"))
        .unwrap_or_else(|| panic!("no row for the job: {last:?}"));
    let nums: Vec<&str> = row.split_whitespace().collect();
    assert!(
        row.starts_with("\x1b[31;1m"),
        "a job with blocks is red: {row:?}"
    );
    assert_eq!(nums[2], total.to_string(), "{row:?}");
    assert_eq!(nums[3], blocked.to_string(), "{row:?}");
    assert!(
        last.split("\r\n")
            .any(|l| l.starts_with("\x1b[31;1m") && l.contains(&format!(" BLOCKED tcp {bad}:80 "))),
        "{last:?}"
    );
    assert!(
        last.split("\r\n")
            .any(|l| !l.starts_with('\x1b') && l.contains(" ALLOWED tcp ")),
        "{last:?}"
    );
    d.ok(&["job", "end", "--id", id]);
}

/// Bad input names its cause: a webhook URL of another scheme, a bad config entry, an
/// unknown job to watch. Nothing runs.
#[test]
fn bad_webhooks_and_watch_input_are_refused() {
    let tb = testbed(&[], &[]);
    let marker = tb.workdir().join("ran");
    let m = marker.display().to_string();
    let (st, _, err) = run_timeout(
        tb.client_cmd(
            RINGFENCE,
            [
                "exec",
                "--webhook",
                "ftp://hooks.example/x",
                "--",
                "touch",
                &m,
            ],
        ),
        JOB_TIMEOUT,
    );
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(
        err.contains("webhook \"ftp://hooks.example/x\": not an http:// or https:// URL"),
        "{err}"
    );
    assert!(!marker.exists(), "the command ran");

    let cfg = scratch(&tb, "bad-hook.toml", "[[webhook]]\nurl = \"ftp://x/y\"\n");
    let mut d = Daemon::start(&tb, &[]);
    let cfg_s = cfg.display().to_string();
    let (st, _, err) = run_timeout(
        // In the namespace, on paths of its own: were the check gone, this daemon would
        // touch nothing of the host's.
        tb.client_cmd(
            RINGFENCE,
            [
                "run",
                "--config",
                &cfg_s,
                "--socket",
                &tb.workdir().join("bad.sock").display().to_string(),
                "--bpffs",
                "/sys/fs/bpf/rf-13-bad",
                "--state-dir",
                &tb.workdir().join("bad-state").display().to_string(),
                "--data-dir",
                &tb.workdir().join("bad-data").display().to_string(),
            ],
        ),
        JOB_TIMEOUT,
    );
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("config {cfg_s}: webhook \"ftp://x/y\"")),
        "{err}"
    );

    let cg = d.cgroup("bad");
    let cgs = cg.display().to_string();
    let (ok, _, err) = d.cli(&[
        "job",
        "start",
        "--id",
        "bad-13",
        "--cgroup",
        &cgs,
        "--webhook",
        "hooks.example",
    ]);
    assert!(
        !ok && err.contains("not an http:// or https:// URL"),
        "{err}"
    );
    let (ok, _, err) = d.cli(&["watch", "--job", "nope-13", "--for", "1"]);
    assert!(
        !ok && err.contains("no job \"nope-13\" is running"),
        "{err}"
    );
}

/// `exec --webhook`: the job's blocked calls reach the receiver before ringfence exits.
#[test]
fn exec_webhook_delivers_before_exit() {
    let bad = link_v4(19);
    let tb = testbed(&[DnsRecord::a("attacker.test", bad)], &[sa(bad, 80)]);
    let rx = Receiver::start(&tb, "127.0.0.1:19482");
    let script = format!(
        "for i in 1 2 3; do curl -4 -sS --connect-timeout 1 --max-time 2 http://{bad}/ >/dev/null 2>&1; done; true"
    );
    let job = exec(
        &tb,
        &[
            "--mode",
            "block",
            "--allow",
            "ok.test:80",
            "--job",
            "hook-exec-13",
            "--webhook",
            "http://127.0.0.1:19482/x",
            "--webhook-format",
            "json",
        ],
        &["sh", "-c", &script],
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    let trail: Vec<&serde_json::Value> = job
        .flows()
        .into_iter()
        .filter(|e| e["verdict"] == "blocked")
        .collect();
    assert!(trail.len() >= 3, "{}", job.dump());
    // Read at once: exec flushed before it exited.
    let got: Vec<serde_json::Value> = rx
        .bodies()
        .iter()
        .flat_map(|b| b["events"].as_array().unwrap().clone())
        .collect();
    assert_eq!(got.len(), trail.len(), "{got:?}\n{}", job.dump());
    assert!(got
        .iter()
        .all(|e| e["job"] == "hook-exec-13" && e["dst"] == bad.to_string()));
}

/// `watch --events FILE` follows a standalone `ringfence exec` (no daemon, no socket) as it
/// writes its events file: one plain line per flow event, in order, with its verdict.
#[test]
fn watch_follows_a_running_exec_through_its_events_file() {
    let (ok, bad) = (link_v4(28), link_v4(29));
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", ok),
            DnsRecord::a("attacker.test", bad),
        ],
        &[sa(ok, 80), sa(bad, 80)],
    );
    let events = tb.workdir().join("followed.jsonl");
    let file = events.display().to_string();
    // Started before the exec: it waits for the file to appear.
    let watch = Command::new(RINGFENCE)
        .args(["watch", "--events", &file, "--interval", "100", "--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    let script = format!(
        "for i in 1 2 3; do curl -4 -sS --max-time 3 http://ok.test/ >/dev/null; \
         curl -4 -sS --connect-timeout 1 --max-time 2 http://{bad}/ >/dev/null 2>&1; \
         sleep 0.3; done; true"
    );
    let args = [
        "exec",
        "--job",
        "follow-13",
        "--mode",
        "block",
        "--allow",
        "ok.test:80",
        "--events",
        &file,
        "--",
        "sh",
        "-c",
        &script,
    ];
    let (st, _, err) = run_timeout(tb.client_cmd(RINGFENCE, args), JOB_TIMEOUT);
    assert!(st.success(), "{err}");
    // A few polls more, then stop it: it prints as it reads, nothing is buffered.
    std::thread::sleep(std::time::Duration::from_millis(800));
    // SAFETY: kill(2) on the child's own pid.
    unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let flows: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e.get("dst").is_some())
        .collect();
    let lines: Vec<&str> = text.lines().collect();
    assert!(flows.len() >= 6, "{flows:?}");
    assert_eq!(
        lines.len(),
        flows.len(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (l, e) in lines.iter().zip(&flows) {
        assert!(
            l.starts_with(&format!("{} follow-13 ", e["ts"].as_str().unwrap())),
            "{l} vs {e}"
        );
        let v = e["verdict"].as_str().unwrap().to_uppercase();
        assert!(l.contains(&format!(" {v} ")), "{l} vs {e}");
    }
    assert!(lines.iter().any(|l| l.contains(" BLOCKED ")), "{text}");
    assert!(lines.iter().any(|l| l.contains(" ALLOWED ")), "{text}");
}

/// The HTTPS receiver: Python's http.server behind TLS with a self-signed certificate for
/// 127.0.0.1, in the client namespace; every POST body appended to a file.
const TLS_RECEIVER: &str = r#"
import http.server, ssl, sys
cert, key, out, ready = sys.argv[1:5]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(out, "ab") as f:
            f.write(body + b"\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", 19483), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
open(ready, "w").close()
s.serve_forever()
"#;

/// An https webhook: delivered when the receiver's certificate is trusted (here through
/// `SSL_CERT_FILE`, as a private CA would be), never when it is not (the trail is complete
/// either way).
#[test]
fn https_webhook_is_verified_and_delivered() {
    let bad = link_v4(18);
    let tb = testbed(&[], &[sa(bad, 80)]);
    let dir = tb.workdir();
    // A private CA and the receiver's certificate for 127.0.0.1, signed by it.
    let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("hook.crt"),
        dir.join("hook.key"),
        dir.join("hook.csr"),
    );
    let ext = scratch(
        &tb,
        "hook.ext",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    );
    let openssl = |args: &[&std::ffi::OsStr]| {
        let st = Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl {args:?}");
    };
    let o = |s: &str| std::ffi::OsString::from(s);
    openssl(&[
        &o("req"),
        &o("-x509"),
        &o("-newkey"),
        &o("rsa:2048"),
        &o("-nodes"),
        &o("-days"),
        &o("1"),
        &o("-subj"),
        &o("/CN=ringfence test CA"),
        &o("-keyout"),
        ca_key.as_os_str(),
        &o("-out"),
        ca.as_os_str(),
    ]);
    openssl(&[
        &o("req"),
        &o("-newkey"),
        &o("rsa:2048"),
        &o("-nodes"),
        &o("-subj"),
        &o("/CN=127.0.0.1"),
        &o("-keyout"),
        key.as_os_str(),
        &o("-out"),
        csr.as_os_str(),
    ]);
    openssl(&[
        &o("x509"),
        &o("-req"),
        &o("-in"),
        csr.as_os_str(),
        &o("-CA"),
        ca.as_os_str(),
        &o("-CAkey"),
        ca_key.as_os_str(),
        &o("-CAcreateserial"),
        &o("-days"),
        &o("1"),
        &o("-extfile"),
        ext.as_os_str(),
        &o("-out"),
        cert.as_os_str(),
    ]);
    let out = dir.join("tls-bodies.jsonl");
    let ready = dir.join("tls-ready");
    let server = scratch(&tb, "tls_receiver.py", TLS_RECEIVER);
    let mut child = tb
        .client_cmd(
            "/usr/bin/python3",
            [&server, &cert, &key, &out, &ready].map(|p| p.as_os_str().to_owned()),
        )
        .spawn()
        .expect("the TLS receiver");
    wait_for("the TLS receiver", 20, || ready.exists());
    let script = format!(
        "for i in 1 2; do curl -4 -sS --connect-timeout 1 --max-time 2 http://{bad}/ >/dev/null 2>&1; done; true"
    );
    let run = |tag: &str, trust: bool| {
        let events = dir.join(format!("tls-{tag}.jsonl"));
        let mut cmd = tb.client_cmd(
            RINGFENCE,
            [
                "exec",
                "--mode",
                "block",
                "--job",
                tag,
                "--events",
                &events.display().to_string(),
                "--webhook",
                "https://127.0.0.1:19483/hook",
                "--webhook-format",
                "json",
                "--",
                "sh",
                "-c",
                &script,
            ],
        );
        if trust {
            cmd.env("SSL_CERT_FILE", &ca);
        } else {
            // An empty store: nothing is trusted, whatever the host's.
            cmd.env("SSL_CERT_FILE", "/dev/null");
        }
        let (st, _, err) = run_timeout(cmd, JOB_TIMEOUT);
        assert!(st.success(), "{err}");
        let blocked = std::fs::read_to_string(&events)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"verdict\":\"blocked\""))
            .count();
        (blocked, err)
    };
    let delivered = |job: &str| -> usize {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .flat_map(|b| b["events"].as_array().unwrap().clone())
            .filter(|e| e["job"] == job)
            .count()
    };
    // Untrusted certificate: nothing delivered, the trail complete.
    let (blocked, err) = run("tls-untrusted", false);
    assert!(blocked >= 2, "{err}");
    assert_eq!(
        delivered("tls-untrusted"),
        0,
        "an untrusted certificate was accepted"
    );
    // Trusted: every blocked call arrives before exec exits.
    let (blocked, err) = run("tls-trusted", true);
    assert!(blocked >= 2, "{err}");
    assert_eq!(delivered("tls-trusted"), blocked, "{err}");
    let _ = child.kill();
    let _ = child.wait();
}
