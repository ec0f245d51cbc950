//! The GitHub Action (action.yml, action/dist/), run for real the way the runner runs it:
//! `node action/dist/main.js`, later `run:` steps, then `node action/dist/post.js`, each a
//! child of a process named Runner.Worker (a copy of bash), as an unprivileged runner user
//! (`rf15run`, made for the test) who has passwordless sudo as on GitHub's hosted runners,
//! with the runner's INPUT_* variables and GITHUB_STATE / GITHUB_STEP_SUMMARY / RUNNER_TEMP
//! files (the test plays the runner's part of turning GITHUB_STATE into STATE_* for post).
//! Everything runs in a testbed's client namespace (dnsmasq and HTTP servers in the server
//! namespace); what got through is read on the server side. main starts the daemon itself
//! (the first run) or finds it running (the second). Needs root, node, sudo, curl; never
//! skipped.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use testbed::link_v4;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const USER: &str = "rf15run";

/// The runner's user, made for the test and removed after it, with the hosted runners'
/// sudoers line (`runner ALL=(ALL) NOPASSWD:ALL`, there in /etc/sudoers.d/runner).
struct RunnerUser {
    uid: u32,
    sudoers: PathBuf,
}

impl RunnerUser {
    fn create() -> RunnerUser {
        for tool in ["/usr/bin/sudo", "/usr/sbin/useradd", "/usr/sbin/visudo"] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing (scripts/ensure-deps test installs sudo and passwd)"
            );
        }
        let _ = Command::new("userdel").arg(USER).output();
        let o = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/bin/sh", USER])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "useradd {USER}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let uid = nix::unistd::User::from_name(USER)
            .unwrap()
            .expect("the user just made")
            .uid
            .as_raw();
        // sudo ignores files whose names contain a '.'.
        let sudoers = PathBuf::from(format!("/etc/sudoers.d/rf15-action-{}", std::process::id()));
        std::fs::write(&sudoers, format!("{USER} ALL=(ALL) NOPASSWD:ALL\n")).unwrap();
        std::fs::set_permissions(&sudoers, std::fs::Permissions::from_mode(0o440)).unwrap();
        RunnerUser { uid, sudoers }
    }

    fn chown(&self, p: &Path) {
        nix::unistd::chown(
            p,
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.uid)),
        )
        .unwrap();
    }
}

impl Drop for RunnerUser {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sudoers);
        let _ = Command::new("userdel").arg(USER).output();
    }
}

/// Where the daemon main starts keeps its things; on drop, what main and the watchers left
/// is taken down (the daemon unloads and exits, the watchers are killed by their pid).
struct Host {
    dir: PathBuf,
    socket: PathBuf,
    bpffs: PathBuf,
    root_dir: PathBuf,
}

impl Host {
    fn new(tb: &Testbed) -> Host {
        let dir = tb.workdir().join("rf15-host");
        std::fs::create_dir_all(&dir).unwrap();
        Host {
            socket: dir.join("control.sock"),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/rf15-action-{}", std::process::id())),
            root_dir: dir.join("action-root"),
            dir,
        }
    }

    fn run_args(&self) -> String {
        format!(
            "--bpffs {} --state-dir {} --data-dir {}",
            self.bpffs.display(),
            self.dir.join("state").display(),
            self.dir.join("data").display()
        )
    }

    fn status(&self) -> serde_json::Value {
        let o = Command::new(RINGFENCE)
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "status: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.root_dir.join("daemon.log")).unwrap_or_default()
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.root_dir.join("jobs").join(id)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Ok(jobs) = std::fs::read_dir(self.root_dir.join("jobs")) {
            for j in jobs.flatten() {
                if let Ok(p) = std::fs::read_to_string(j.path().join("watcher.pid")) {
                    if let Ok(pid) = p.trim().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        let _ = Command::new(RINGFENCE)
            .args(["unload", "--force", "--socket"])
            .arg(&self.socket)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .output();
        // The client returns once the socket is gone; the daemon unpins right after.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.bpffs.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What Runner.Worker does for the job, reduced to what the action sees: the action's main
/// (a JavaScript action: node, with only its own INPUT_*), its own request to GitHub (here
/// runner.test), `run:` steps (`bash --noprofile --norc -eo pipefail FILE`), the action's
/// post with STATE_* from GITHUB_STATE, exit.
const WORKER_JOB: &str = r#"
set -u
cg() { sed -n 's/^0:://p' /proc/$1/cgroup; }
inputs=(
  "INPUT_EGRESS-POLICY=$MODE" "INPUT_ALLOWED-ENDPOINTS=allowed.test:80
    198.51.100.99:80${EXTRA_ENDPOINT:-}" "INPUT_DISABLE-SUDO=$DISABLE_SUDO" "INPUT_DISABLE-TELEMETRY=true"
  "INPUT_DIRECT-IP=" "INPUT_POLICY-FILE=$POLICY_FILE" "INPUT_FAIL-ON-BLOCK=$FAIL_ON_BLOCK"
  "INPUT_BINARY=$RF_BINARY"
)
action() {
  local file=$1
  env "${inputs[@]}" "${STATE[@]}" node "$ACTION/action/dist/$file"
  echo "action $file: $?"
}
step() {
  local name=$1; shift
  printf '%s\n' "$@" > "$RUNNER_TEMP/$name.sh"
  bash --noprofile --norc -eo pipefail "$RUNNER_TEMP/$name.sh"
  echo "step $name: $?"
}
# The runner's part: GITHUB_STATE's name<<delimiter entries become STATE_<name> for post.
load_state() {
  STATE=()
  local line name= delim= value=
  while IFS= read -r line; do
    if [ -z "$name" ]; then name=${line%%<<*}; delim=${line#*<<}; value=; continue; fi
    if [ "$line" = "$delim" ]; then STATE+=("STATE_$name=$value"); name=; continue; fi
    value=${value:+$value$'\n'}$line
  done < "$GITHUB_STATE"
}
STATE=()
echo "worker cgroup before: $(cg $$)"
action main.js
echo "worker cgroup after main: $(cg $$)"
curl -sS --connect-timeout 3 --max-time 5 http://runner.test/ >/dev/null
echo "worker's own request: $?"
step allowed 'curl -sS --connect-timeout 3 --max-time 5 http://allowed.test/'
step blocked-name 'curl -sS --connect-timeout 3 --max-time 5 http://blocked.test/'
step blocked-ip "curl -sS --connect-timeout 3 --max-time 5 http://$DIRECT_IP/"
step sudo 'if sudo -n true 2>/dev/null; then echo "sudo: yes"; else echo "sudo: no"; fi'
load_state
action post.js
echo "Runner.Worker exits"
"#;

struct Run {
    out: String,
    summary: String,
    temp: PathBuf,
    id: String,
}

/// What a run of the job gives the action (besides allowed-endpoints' fixed part).
#[derive(Clone, Copy, Default)]
struct Inputs<'a> {
    mode: &'a str,
    disable_sudo: bool,
    fail_on_block: bool,
    /// The text of the workspace's .github/ringfence.toml, named by policy-file.
    policy_file: Option<&'a str>,
    /// Appended to allowed-endpoints.
    extra_endpoint: &'a str,
}

/// One job through the action, its `n`th on this host.
fn run_job(
    tb: &Testbed,
    host: &Host,
    user: &RunnerUser,
    n: usize,
    inputs: &Inputs,
    direct: std::net::Ipv4Addr,
) -> Run {
    let Inputs {
        mode,
        disable_sudo,
        fail_on_block,
        policy_file,
        extra_endpoint,
    } = *inputs;
    let root = tb.workdir().join(format!("rf15-runner-{n}"));
    // The action as the runner downloads it (_actions/OWNER/REPO/REF), readable by its user.
    let action = root.join("_actions/ringfence/v1");
    std::fs::create_dir_all(action.join("action/dist")).unwrap();
    std::fs::copy(
        Path::new(REPO).join("action.yml"),
        action.join("action.yml"),
    )
    .unwrap();
    for f in std::fs::read_dir(Path::new(REPO).join("action/dist")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), action.join("action/dist").join(f.file_name())).unwrap();
    }
    let worker = root.join("bin/Runner.Worker");
    std::fs::create_dir_all(worker.parent().unwrap()).unwrap();
    std::fs::copy("/bin/bash", &worker).unwrap();
    let workspace = root.join("work/repo/repo");
    let temp = root.join("work/_temp");
    let files = temp.join("_runner_file_commands");
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::create_dir_all(&files).unwrap();
    for d in [&temp, &files, &workspace] {
        user.chown(d);
    }
    // The repository's policy, as a checkout would leave it (relative to the workspace).
    if let Some(text) = policy_file {
        std::fs::create_dir_all(workspace.join(".github")).unwrap();
        std::fs::write(workspace.join(".github/ringfence.toml"), text).unwrap();
    }
    for f in ["state", "env", "step_summary"] {
        std::fs::write(files.join(f), "").unwrap();
        user.chown(&files.join(f));
    }
    let script = root.join("worker.sh");
    std::fs::write(&script, WORKER_JOB).unwrap();
    let resolv = Path::new("/etc/netns")
        .join(tb.client_ns())
        .join("resolv.conf");
    let run_id = format!("{}{n}", std::process::id());

    // The client namespace, entered with nsenter (the host's /sys, so the daemon main
    // starts pins on the host's bpffs), and a mount namespace of its own whose
    // /etc/resolv.conf names the testbed's resolver, as `ip netns exec` would.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", tb.client_ns()))
        .args(["unshare", "--mount", "--propagation", "slave", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
        .arg(&resolv)
        .args([
            "setpriv",
            &format!("--reuid={}", user.uid),
            &format!("--regid={}", user.uid),
            "--init-groups",
            "--",
        ])
        .arg(&worker)
        .arg(&script)
        .current_dir(&workspace)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", &temp)
        .env("GITHUB_ACTIONS", "true")
        .env("CI", "true")
        .env("GITHUB_RUN_ID", &run_id)
        .env("GITHUB_RUN_ATTEMPT", "1")
        .env("GITHUB_JOB", "build")
        .env("GITHUB_REPOSITORY", "octo-org/repo")
        .env("GITHUB_WORKSPACE", &workspace)
        .env("GITHUB_STATE", files.join("state"))
        .env("GITHUB_ENV", files.join("env"))
        .env("GITHUB_STEP_SUMMARY", files.join("step_summary"))
        .env("RUNNER_NAME", "rf15-runner")
        .env("RUNNER_TEMP", &temp)
        .env("ACTION", &action)
        .env("MODE", mode)
        .env(
            "POLICY_FILE",
            if policy_file.is_some() {
                ".github/ringfence.toml"
            } else {
                ""
            },
        )
        .env("DISABLE_SUDO", disable_sudo.to_string())
        .env("FAIL_ON_BLOCK", fail_on_block.to_string())
        .env("RF_BINARY", RINGFENCE)
        .env("DIRECT_IP", direct.to_string())
        .env("EXTRA_ENDPOINT", extra_endpoint)
        // Test-only placement: the daemon's socket, pins and directories, and the runner's
        // own endpoints (GitHub's names do not resolve here).
        .env("RINGFENCE_SOCKET", &host.socket)
        .env("RINGFENCE_ACTION_RUN_ARGS", host.run_args())
        .env("RINGFENCE_ACTION_DIR", &host.root_dir)
        .env("RINGFENCE_ACTION_RUNNER_ENDPOINTS", "runner.test:80")
        .stdin(Stdio::null());
    let (st, stdout, stderr) = run_timeout(cmd, JOB_TIMEOUT);
    let out = format!("{stdout}{stderr}");
    assert!(
        st.success(),
        "Runner.Worker: {st}\n{out}\ndaemon:\n{}",
        host.daemon_log()
    );
    Run {
        summary: std::fs::read_to_string(files.join("step_summary")).unwrap(),
        out,
        temp,
        id: format!("gh-{run_id}.1-build-rf15-runner"),
    }
}

/// The watcher ends the job once Runner.Worker has exited: waits for that.
fn wait_job_end(host: &Host, run: &Run) -> String {
    let fin = host.job_dir(&run.id).join("final-report.md");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fin.exists() {
        assert!(
            Instant::now() < deadline,
            "the watcher did not end job {} after Runner.Worker exited\n{}\nwatcher log:\n{}",
            run.id,
            run.out,
            std::fs::read_to_string(host.root_dir.join(format!("watcher-{}.log", run.id)))
                .unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let ids: Vec<String> = host.status()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.contains(&run.id), "job {} still runs: {ids:?}", run.id);
    std::fs::read_to_string(fin).unwrap()
}

fn has_line(out: &str, line: &str) -> bool {
    out.lines().any(|l| l == line)
}

/// A summary row: | domain | address | port | proto | verdict | …
fn row(summary: &str, domain: &str, verdict: &str) -> bool {
    summary.lines().any(|l| {
        let cells: Vec<&str> = l.split('|').map(str::trim).collect();
        cells.len() > 6 && cells[1] == domain && cells[5] == verdict
    })
}

#[test]
fn action_main_and_post_audit_then_block() {
    let allowed = link_v4(25);
    let blocked = link_v4(26);
    let runner_ep = link_v4(27);
    let direct = link_v4(28);
    let tb = testbed(
        &[
            DnsRecord::a("allowed.test", allowed),
            DnsRecord::a("blocked.test", blocked),
            DnsRecord::a("runner.test", runner_ep),
        ],
        &[
            sa(allowed, 80),
            sa(blocked, 80),
            sa(runner_ep, 80),
            sa(direct, 80),
        ],
    );
    let user = RunnerUser::create();
    let host = Host::new(&tb);

    // --- audit, from the repository's policy file (egress-policy left empty: the file's
    // mode): everything passes and is reported, but a direct IP (blocked in both modes).
    let a = run_job(
        &tb,
        &host,
        &user,
        0,
        &Inputs {
            policy_file: Some("mode = \"audit\"\nallowed-endpoints = \"allowed.test:80\"\n"),
            ..Default::default()
        },
        direct,
    );
    let out = &a.out;
    assert!(has_line(out, "action main.js: 0"), "{out}");
    assert!(
        out.contains("ringfence: daemon started"),
        "main starts the daemon when none runs\n{out}"
    );
    assert!(
        out.contains("::notice::disable-telemetry: ringfence sends no telemetry"),
        "{out}"
    );
    assert!(
        has_line(
            out,
            &format!("worker cgroup after main: /ringfence/jobs/{}", a.id)
        ),
        "Runner.Worker is the job from main on\n{out}"
    );
    assert!(!out.contains("worker cgroup before: /ringfence"), "{out}");
    assert!(has_line(out, "worker's own request: 0"), "{out}");
    assert!(has_line(out, "step allowed: 0"), "{out}");
    assert!(has_line(out, "step blocked-name: 0"), "audit mode\n{out}");
    assert!(!has_line(out, "step blocked-ip: 0"), "{out}");
    assert!(has_line(out, "sudo: yes"), "{out}");
    assert!(has_line(out, "action post.js: 0"), "{out}");
    assert!(
        a.summary
            .starts_with(&format!("### ringfence: job {} (audit mode)", a.id)),
        "{}\n{out}",
        a.summary
    );
    assert!(row(&a.summary, "allowed.test", "allowed"), "{}", a.summary);
    assert!(row(&a.summary, "blocked.test", "audited"), "{}", a.summary);
    assert!(row(&a.summary, "runner.test", "allowed"), "{}", a.summary);
    assert!(
        out.contains(&format!(
            "::error title=ringfence blocked {direct}%3A80::job {}: tcp to {direct} port 80 from process curl",
            a.id
        )),
        "the direct IP is annotated\n{out}"
    );
    // The artifact directory: report, insights page, events.
    let art = a.temp.join("ringfence");
    let html = std::fs::read_to_string(art.join("report.html")).expect("report.html");
    assert!(
        html.contains("<html") && html.contains("blocked.test"),
        "{html:.300}"
    );
    let events = std::fs::read_to_string(art.join("events.jsonl")).expect("events.jsonl");
    assert!(
        events.contains("\"domain\":\"allowed.test\""),
        "{events:.2000}"
    );
    let fin = wait_job_end(&host, &a);
    assert!(fin.contains("allowed.test"), "{fin}");
    assert_eq!(tb.http_hits(sa(allowed, 80)), 1);
    assert_eq!(
        tb.http_hits(sa(blocked, 80)),
        1,
        "audit mode lets it through"
    );
    assert_eq!(tb.http_hits(sa(runner_ep, 80)), 1);
    assert_eq!(
        tb.http_hits(sa(direct, 80)),
        0,
        "direct IPs are blocked in audit mode"
    );

    let audit_queries = tb.dns_queries_for("blocked.test");
    assert!(audit_queries > 0, "{}", tb.dns_log());

    // --- block, disable-sudo, fail-on-block; the daemon is already running.
    let b = run_job(
        &tb,
        &host,
        &user,
        1,
        &Inputs {
            mode: "block",
            disable_sudo: true,
            fail_on_block: true,
            ..Default::default()
        },
        direct,
    );
    let out = &b.out;
    assert!(has_line(out, "action main.js: 0"), "{out}");
    assert!(out.contains("ringfence: a daemon already serves"), "{out}");
    assert!(
        out.contains(&format!("ringfence: sudo removed for {USER}")),
        "{out}"
    );
    assert!(
        !user.sudoers.exists(),
        "disable-sudo removes the runner user's sudoers file"
    );
    assert!(has_line(out, "sudo: no"), "later steps have no sudo\n{out}");
    assert!(has_line(out, "worker's own request: 0"), "{out}");
    assert!(has_line(out, "step allowed: 0"), "{out}");
    assert!(!has_line(out, "step blocked-name: 0"), "{out}");
    assert!(!has_line(out, "step blocked-ip: 0"), "{out}");
    assert!(
        has_line(out, "action post.js: 1"),
        "fail-on-block fails the post step\n{out}"
    );
    assert!(
        out.contains("::error::ringfence: fail-on-block: ")
            && out.contains(&format!("were blocked in job {}", b.id)),
        "{out}"
    );
    assert!(
        out.contains("::error title=ringfence blocked a DNS query for blocked.test::"),
        "{out}"
    );
    assert!(
        out.contains(&format!("::error title=ringfence blocked {direct}%3A80::")),
        "{out}"
    );
    assert!(
        b.summary
            .starts_with(&format!("### ringfence: job {} (block mode)", b.id)),
        "{}\n{out}",
        b.summary
    );
    assert!(row(&b.summary, "allowed.test", "allowed"), "{}", b.summary);
    assert!(row(&b.summary, "blocked.test", "blocked"), "{}", b.summary);
    let fin = wait_job_end(&host, &b);
    assert!(fin.contains("blocked.test"), "{fin}");
    // What the servers saw: one more allowed request, nothing blocked; the refused name never
    // reached the resolver in block mode (only the audit run's query did).
    assert_eq!(tb.http_hits(sa(allowed, 80)), 2);
    assert_eq!(
        tb.http_hits(sa(blocked, 80)),
        1,
        "nothing more in block mode"
    );
    assert_eq!(tb.http_hits(sa(runner_ep, 80)), 2);
    assert_eq!(tb.http_hits(sa(direct, 80)), 0);
    assert_eq!(
        tb.dns_queries_for("blocked.test"),
        audit_queries,
        "{}",
        tb.dns_log()
    );

    // --- an endpoint ringfence refuses: main fails naming the input and the token, no job
    // starts, post says there is nothing to report. (sudo was removed by the block run:
    // the runner's sudoers line again, as a fresh runner would have it.)
    std::fs::write(&user.sudoers, format!("{USER} ALL=(ALL) NOPASSWD:ALL\n")).unwrap();
    std::fs::set_permissions(&user.sudoers, std::fs::Permissions::from_mode(0o440)).unwrap();
    let c = run_job(
        &tb,
        &host,
        &user,
        2,
        &Inputs {
            mode: "block",
            extra_endpoint: " allowed.test:99999",
            ..Default::default()
        },
        direct,
    );
    let out = &c.out;
    assert!(has_line(out, "action main.js: 1"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("::error::allowed-endpoints: ") && l.contains("99999")),
        "{out}"
    );
    assert!(has_line(out, "action post.js: 0"), "{out}");
    assert!(
        out.contains("::warning::ringfence: no state from the main step"),
        "{out}"
    );
    assert!(host.status()["jobs"].as_array().unwrap().is_empty());
}

/// Inputs that do not parse fail main with a message naming the input, before anything
/// runs.
#[test]
fn action_refuses_bad_inputs() {
    require_root();
    for (input, value, says) in [
        (
            "EGRESS-POLICY",
            "blocky",
            "input egress-policy: \"blocky\" is not one of audit, block",
        ),
        (
            "DIRECT-IP",
            "allow",
            "input direct-ip: \"allow\" is not one of audit, block",
        ),
        (
            "FAIL-ON-BLOCK",
            "yes",
            "input fail-on-block: \"yes\" is not true or false",
        ),
        (
            "DISABLE-SUDO",
            "1",
            "input disable-sudo: \"1\" is not true or false",
        ),
        (
            "POLICY-FILE",
            "/nonexistent/rf15.toml",
            "input policy-file: /nonexistent/rf15.toml does not exist",
        ),
        (
            "BINARY",
            "/nonexistent/ringfence",
            "input binary: /nonexistent/ringfence is not an executable file",
        ),
        (
            "ALLOWED-ENDPOINTS",
            "github.com:443 $(id)",
            "input allowed-endpoints: \"$(id)\" is not an endpoint",
        ),
    ] {
        let o = Command::new("node")
            .arg(Path::new(REPO).join("action/dist/main.js"))
            .env(format!("INPUT_{input}"), value)
            .output()
            .expect("node");
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{input}={value}: {out}");
        assert!(
            out.contains(&format!("::error::{says}")),
            "{input}={value}: {out}"
        );
    }
}

/// Every input action.yml declares is one main.js reads, and the other way round.
#[test]
fn action_yml_inputs_are_read() {
    let yml = std::fs::read_to_string(Path::new(REPO).join("action.yml")).unwrap();
    let main = std::fs::read_to_string(Path::new(REPO).join("action/dist/main.js")).unwrap();
    let section = yml
        .split("\ninputs:\n")
        .nth(1)
        .unwrap()
        .split("\nruns:")
        .next()
        .unwrap();
    let declared: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("  ")?.strip_suffix(':'))
        .filter(|k| !k.starts_with(' '))
        .collect();
    assert_eq!(
        declared,
        [
            "egress-policy",
            "allowed-endpoints",
            "disable-sudo",
            "disable-telemetry",
            "direct-ip",
            "policy-file",
            "fail-on-block",
            "binary"
        ]
    );
    for d in &declared {
        assert!(
            main.contains(&format!("Input('{d}'")),
            "main.js does not read {d}"
        );
    }
    let read = main.matches("Input('").count();
    assert_eq!(
        read,
        declared.len(),
        "main.js reads an input action.yml does not declare"
    );
    assert!(
        yml.contains("  using: node24\n  main: action/dist/main.js\n  post: action/dist/post.js\n")
    );
}
