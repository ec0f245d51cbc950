//! The runner integration in deploy/, run for real: the daemon started the way the systemd
//! unit starts it (Type=notify readiness, exactly the unit's capability bounding set, under
//! strace to hold its system calls against the unit's filter), and the GitHub Actions job
//! hooks run the way the runner runs them: `bash -e HOOK` as an unprivileged user, children
//! of a process named Runner.Worker, with the runner's GITHUB_* variables, through sudo and
//! the documented sudoers line. Traffic goes to a testbed's dnsmasq and HTTP servers, and
//! what got through is read on the server side. Needs root, sudo, strace and systemd-analyze
//! (scripts/ensure-deps installs them); never skipped.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use testbed::{link_v4, DNS_V4};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/systemd/ringfence.service"
);
const RUNNER_DROPIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/systemd/actions.runner.service.d/ringfence.conf"
);
const HOOKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/runner-hooks");
/// The unprivileged user the runner (and so the hooks and the job's steps) runs as.
const RUNNER_UID: u32 = 65534;

/// The values of the unit's `key=value` lines, in order.
fn unit_values(key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(UNIT).expect("reading the unit");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
        .collect()
}

/// The unit's CapabilityBoundingSet as setpriv's --bounding-set argument (-all,+bpf,…).
fn unit_bounding_set() -> String {
    let caps = unit_values("CapabilityBoundingSet");
    assert_eq!(caps.len(), 1, "one CapabilityBoundingSet= line: {caps:?}");
    let mut arg = String::from("-all");
    for c in caps[0].split_whitespace() {
        let c = c
            .strip_prefix("CAP_")
            .unwrap_or_else(|| panic!("capability {c} without CAP_"));
        arg.push_str(",+");
        arg.push_str(&c.to_ascii_lowercase());
    }
    arg
}

/// The daemon as the unit runs it: in the testbed's client namespace (entered with nsenter,
/// which keeps the host's /sys and so the bpffs and cgroup2), with the unit's bounding set,
/// traced by strace, readiness through NOTIFY_SOCKET.
struct Daemon {
    dir: PathBuf,
    netns: String,
    child: Option<Child>,
    runs: usize,
}

impl Daemon {
    fn new(tb: &Testbed) -> Daemon {
        let dir = tb.workdir().join("daemon");
        std::fs::create_dir_all(&dir).unwrap();
        Daemon {
            dir,
            netns: format!("/run/netns/{}", tb.client_ns()),
            child: None,
            runs: 0,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    fn bpffs(&self) -> PathBuf {
        // Unique per test process and daemon directory: other tests (and other daemons on
        // this host) pin elsewhere.
        let tag = self
            .dir
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        PathBuf::from(format!("/sys/fs/bpf/{tag}-hooks"))
    }
    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    fn strace_files(&self) -> Vec<PathBuf> {
        (0..self.runs)
            .map(|n| self.dir.join(format!("strace-{n}.txt")))
            .collect()
    }

    /// Runs the unit's ExecStartPre= commands, then starts it and returns once it has sent
    /// READY=1 (the control socket answers then).
    fn start(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        for pre in unit_values("ExecStartPre") {
            let argv: Vec<&str> = pre.split_whitespace().collect();
            let o = Command::new("nsenter")
                .arg(format!("--net={}", self.netns))
                .args(&argv)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "ExecStartPre={pre}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let notify_path = self.dir.join(format!("notify-{}.sock", self.runs));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("binding NOTIFY_SOCKET");
        notify
            .set_read_timeout(Some(Duration::from_secs(180)))
            .unwrap();
        let trace = self.dir.join(format!("strace-{}.txt", self.runs));
        let log = std::fs::File::create(self.dir.join(format!("daemon-{}.log", self.runs)))
            .expect("daemon log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns))
            .args(["setpriv", "--inh-caps=-all"])
            .arg(format!("--bounding-set={}", unit_bounding_set()))
            .args(["--", "strace", "-f", "-qq", "-o"])
            .arg(&trace)
            .args(["--", RINGFENCE, "run", "--socket"])
            .arg(self.socket())
            .arg("--bpffs")
            .arg(self.bpffs())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--data-dir")
            .arg(self.data_dir())
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .expect("starting nsenter setpriv strace ringfence run"),
        );
        self.runs += 1;
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no READY=1 from the daemon ({e})\n{}",
                self.log(self.runs - 1)
            )
        });
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_file(&notify_path);
    }

    fn log(&self, run: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("daemon-{run}.log"))).unwrap_or_default()
    }

    /// The daemon's own pid: strace's child.
    fn pid(&self) -> i32 {
        let strace = self.child.as_ref().expect("running").id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
                    .unwrap_or_default();
            if let Some(p) = children.split_whitespace().next() {
                return p.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "strace has no child");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the daemon and waits for it (and strace) to exit.
    fn stop_with(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let pid = self.pid();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit on {sig}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self, args: &[&str]) -> std::process::Output {
        Command::new(RINGFENCE)
            .args(args)
            .env("RINGFENCE_SOCKET", self.socket())
            .output()
            .unwrap()
    }

    fn status(&self) -> Value {
        let out = self.client(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn job_ids(&self) -> Vec<String> {
        self.status()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Whatever happened: nothing of this daemon stays in the kernel, no job cgroup stays.
        if self.child.is_some() {
            let _ = self.client(&["unload", "--force"]);
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = Command::new(RINGFENCE)
            .args(["unload", "--force", "--socket"])
            .arg(self.socket())
            .arg("--bpffs")
            .arg(self.bpffs())
            .arg("--state-dir")
            .arg(self.state_dir())
            .output();
    }
}

/// The documented sudoers line, for `nobody` and the hooks' test install directory; removed
/// on drop. (sudo ignores files whose names contain a '.'.)
struct Sudoers(PathBuf);

impl Sudoers {
    fn install(helper: &Path) -> Sudoers {
        assert!(
            Path::new("/usr/bin/sudo").exists(),
            "sudo is not installed (Debian package sudo; scripts/ensure-deps test installs it)"
        );
        let doc = std::fs::read_to_string(Path::new(HOOKS).join("sudoers")).unwrap();
        let line = doc
            .lines()
            .find(|l| l.starts_with("runner "))
            .expect("the sudoers line in deploy/runner-hooks/sudoers");
        let line = line.replacen("runner ", "nobody ", 1).replace(
            "/usr/local/lib/ringfence/runner-hooks/ringfence-runner-job",
            &helper.display().to_string(),
        );
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/etc/sudoers.d/ringfence-test-{}-{n}",
            std::process::id()
        ));
        std::fs::write(&path, format!("{line}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
        let s = Sudoers(path);
        let check = Command::new("visudo")
            .arg("-cf")
            .arg(&s.0)
            .output()
            .expect("visudo");
        assert!(
            check.status.success(),
            "visudo rejects {line:?}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        s
    }
}

impl Drop for Sudoers {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The hooks installed as deploy/README.md says (one root-owned directory with the settings
/// file beside them), a bash named Runner.Worker to stand in for the runner's worker, a
/// workspace, and the runner's temp directory.
struct Runner {
    root: PathBuf,
    hooks: PathBuf,
    worker: PathBuf,
    workspace: PathBuf,
    temp: PathBuf,
    sync: PathBuf,
    _sudoers: Sudoers,
}

fn chown_runner(p: &Path) {
    nix::unistd::chown(
        p,
        Some(nix::unistd::Uid::from_raw(RUNNER_UID)),
        Some(nix::unistd::Gid::from_raw(RUNNER_UID)),
    )
    .unwrap();
}

impl Runner {
    fn install(root: &Path, settings: &str) -> Runner {
        let hooks = root.join("hooks");
        std::fs::create_dir_all(&hooks).unwrap();
        for (f, mode) in [
            ("job-started.sh", 0o755),
            ("job-completed.sh", 0o755),
            ("ringfence-runner-job", 0o755),
            ("ringfence-hooks.sh", 0o644),
        ] {
            let to = hooks.join(f);
            std::fs::copy(Path::new(HOOKS).join(f), &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::write(hooks.join("runner-hooks.conf"), settings).unwrap();
        for d in [root, &hooks] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let worker = bin.join("Runner.Worker");
        std::fs::copy("/bin/bash", &worker).unwrap();
        let workspace = root.join("work/repo/repo");
        std::fs::create_dir_all(workspace.join(".github")).unwrap();
        let temp = root.join("work/_temp");
        std::fs::create_dir_all(&temp).unwrap();
        chown_runner(&temp);
        let sync = root.join("sync");
        std::fs::create_dir_all(&sync).unwrap();
        std::fs::set_permissions(&sync, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sudoers = Sudoers::install(&hooks.join("ringfence-runner-job"));
        Runner {
            root: root.to_path_buf(),
            hooks,
            worker,
            workspace,
            temp,
            sync,
            _sudoers: sudoers,
        }
    }

    fn workspace_policy(&self, text: &str) {
        std::fs::write(self.workspace.join(".github/ringfence.toml"), text).unwrap();
    }

    /// The runner's environment for a job (what Runner.Worker passes its hooks and steps).
    fn env(&self, cmd: &mut Command, run_id: &str) {
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.temp)
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_RUN_ID", run_id)
            .env("GITHUB_RUN_ATTEMPT", "2")
            .env("GITHUB_JOB", "build")
            .env("GITHUB_REPOSITORY", "octo-org/repo")
            .env("GITHUB_WORKSPACE", &self.workspace)
            .env("RUNNER_NAME", format!("rf-test-{run_id}"))
            .env("RUNNER_TEMP", &self.temp)
            .env("HOOKS", &self.hooks)
            .env("SYNC", &self.sync)
            .env("RINGFENCE", RINGFENCE);
    }

    /// The job id the hooks derive from that environment.
    fn job_id(run_id: &str) -> String {
        format!("gh-{run_id}.2-build-rf-test-{run_id}")
    }

    /// Runs `script` as Runner.Worker would run the job: `Runner.Worker script` as the
    /// runner's user, through `wrap` (e.g. `ip netns exec NS`), output to files.
    fn spawn_worker(&self, wrap: Command, script: &str, run_id: &str) -> Child {
        let path = self.root.join("worker.sh");
        std::fs::write(&path, script).unwrap();
        let out = std::fs::File::create(self.root.join("worker.out")).unwrap();
        let mut cmd = wrap;
        cmd.args([
            "setpriv",
            &format!("--reuid={RUNNER_UID}"),
            &format!("--regid={RUNNER_UID}"),
            "--clear-groups",
            "--",
        ])
        .arg(&self.worker)
        .arg(&path)
        .current_dir(&self.workspace)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
        self.env(&mut cmd, run_id);
        cmd.spawn().expect("starting the Runner.Worker stand-in")
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.root.join("worker.out")).unwrap_or_default()
    }

    fn wait_for(&self, flag: &str, worker: &mut Child) {
        let deadline = Instant::now() + JOB_TIMEOUT;
        while !self.sync.join(flag).exists() {
            if let Some(st) = worker.try_wait().unwrap() {
                panic!(
                    "Runner.Worker exited ({st}) before {flag}\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {flag} from Runner.Worker\n{}",
                self.output()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, flag: &str) {
        std::fs::write(self.sync.join(flag), "").unwrap();
    }
}

/// What Runner.Worker does for a job, reduced to what the hooks see: the job-started hook,
/// its own traffic to GitHub (here runner.test), the steps (each `bash --noprofile --norc
/// -eo pipefail FILE`, as the runner runs a `run:` step), the job-completed hook, exit.
/// It pauses where the test restarts the daemon.
const WORKER_JOB: &str = r#"
set -u
cg() { sed -n 's/^0:://p' /proc/$1/cgroup; }
wait_for() { for _ in $(seq 1200); do [ -e "$SYNC/$1" ] && return 0; sleep 0.1; done; echo "timed out waiting for $1"; exit 3; }
step() {
  local name=$1; shift
  printf '%s\n' "$@" > "$RUNNER_TEMP/$name.sh"
  bash --noprofile --norc -eo pipefail "$RUNNER_TEMP/$name.sh"
  echo "step $name: $?"
}
echo "worker cgroup before: $(cg $$)"
GITHUB_STEP_SUMMARY=$RUNNER_TEMP/step_summary_started bash -e "$HOOKS/job-started.sh"
echo "hook job-started: $?"
echo "worker cgroup in job: $(cg $$)"
curl -sS --connect-timeout 3 --max-time 5 http://runner.test/ >/dev/null
echo "worker's own request: $?"

# A step that tries to get out: start another job for its worker, end its own job, use
# ringfence as root through sudo.
step escape \
  'sudo -n "$HOOKS/ringfence-runner-job" start gh-escape && echo "ESCAPED: started" || true' \
  'sudo -n "$HOOKS/ringfence-runner-job" start gh-escape workspace </dev/null && echo "ESCAPED: started" || true' \
  '"$RINGFENCE" job end --socket "$RF_SOCKET" --id "$(sed -n "s|^0::/ringfence/jobs/||p" /proc/self/cgroup)" && echo "ESCAPED: ended" || true' \
  'sudo -n "$RINGFENCE" status && echo "ESCAPED: sudo ringfence" || true'
step allowed 'curl -sS --connect-timeout 3 --max-time 5 http://allowed.test/'
step blocked-name 'curl -sS --connect-timeout 3 --max-time 5 http://blocked.test/'
step blocked-ip "curl -sS --connect-timeout 3 --max-time 5 http://$DIRECT_IP/"
step leaves-a-daemon 'setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $! > "$RUNNER_TEMP/left.pid"'

touch "$SYNC/steps-done"; wait_for daemon-restarted
# The daemon was killed and came back: the job is still held to its policy.
step allowed-after-restart 'curl -sS --connect-timeout 3 --max-time 5 http://allowed.test/'
step blocked-after-restart 'curl -sS --connect-timeout 3 --max-time 5 http://blocked.test/'
GITHUB_STEP_SUMMARY=/proc/version bash -e "$HOOKS/job-completed.sh" >/dev/null
echo "hook job-completed, summary not writable: $?"
GITHUB_STEP_SUMMARY=$RUNNER_TEMP/step_summary_completed bash -e "$HOOKS/job-completed.sh"
echo "hook job-completed: $?"
echo "worker cgroup after job-completed: $(cg $$)"
touch "$SYNC/completed"; wait_for exit
echo "Runner.Worker exits"
"#;

fn settings(d: &Daemon, extra: &str) -> String {
    format!(
        "# written by tests/runner_hooks.rs\n\
         RINGFENCE={RINGFENCE}\n\
         SOCKET={}\n\
         DEFAULT_POLICY={}\n\
         RUNNER_ALLOW=\"runner.test:80\"\n\
         DNS_RESOLVERS={DNS_V4}\n\
         LOG={}\n{extra}",
        d.socket().display(),
        d.dir.join("default-policy.toml").display(),
        d.dir.join("runner-job.log").display(),
    )
}

fn proc_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

#[test]
fn hooks_guard_a_job_end_to_end() {
    let allowed = link_v4(21);
    let blocked = link_v4(22);
    let runner_ep = link_v4(23);
    let direct = link_v4(24);
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
    let mut daemon = Daemon::new(&tb);
    let runner = Runner::install(&tb.workdir().join("runner"), &settings(&daemon, ""));
    runner.workspace_policy(&format!(
        "mode = \"block\"\nallowed-endpoints = \"allowed.test:80\"\ndns-resolvers = [\"{DNS_V4}\"]\n"
    ));
    // The host default (not this job's: its workspace brings a policy).
    std::fs::write(daemon.dir.join("default-policy.toml"), "mode = \"block\"\n").unwrap();
    let run_id = std::process::id().to_string();
    let id = Runner::job_id(&run_id);

    daemon.start();
    // The unit's capabilities cover the process watch too (ptrace findings).
    assert_eq!(daemon.status()["process_watch"], true, "{}", daemon.log(0));
    // What a job could find out anyway: where the control socket is.
    let wrap = tb.client_cmd(
        "env",
        [
            format!("DIRECT_IP={direct}"),
            format!("RF_SOCKET={}", daemon.socket().display()),
        ],
    );
    let mut worker = runner.spawn_worker(wrap, WORKER_JOB, &run_id);
    let worker_pid = worker.id();

    // The steps ran. Now the daemon crashes (kill -9) and comes back, as Restart=on-failure
    // does: the job must go on, taken over from the pins and state.json.
    runner.wait_for("steps-done", &mut worker);
    assert_eq!(
        daemon.job_ids(),
        vec![id.clone()],
        "the job is not running\n{}\ndaemon:\n{}",
        runner.output(),
        daemon.log(0)
    );
    let st = daemon.stop_with(nix::sys::signal::Signal::SIGKILL);
    assert!(!st.success());
    daemon.start();
    assert_eq!(daemon.status()["adopted"], true);
    assert_eq!(
        daemon.job_ids(),
        vec![id.clone()],
        "the job was not taken over"
    );
    runner.signal("daemon-restarted");

    // job-completed has run; Runner.Worker is still in the job. Stop the daemon cleanly
    // (systemctl stop), let Runner.Worker exit while it is down, then start it again: the
    // watcher ends the job once the daemon answers.
    runner.wait_for("completed", &mut worker);
    let st = daemon.stop_with(nix::sys::signal::Signal::SIGTERM);
    assert!(st.success(), "SIGTERM: {st}");
    runner.signal("exit");
    let st = worker.wait().unwrap();
    let out = runner.output();
    assert!(st.success(), "Runner.Worker: {st}\n{out}");
    // Long enough for the watcher to find no daemon at least once.
    thread::sleep(Duration::from_secs(2));
    daemon.start();
    // The watcher ended the job (it logs that once the daemon has answered).
    let ended = format!("job {id} ended: its Runner.Worker (pid {worker_pid}) exited");
    let log = || std::fs::read_to_string(daemon.dir.join("runner-job.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !log().contains(&ended) {
        assert!(
            Instant::now() < deadline,
            "the job did not end after Runner.Worker exited\n{out}\nwatcher log:\n{}",
            log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(!daemon.job_ids().contains(&id));

    // What the job saw.
    let lines: Vec<&str> = out.lines().collect();
    let has = |l: &str| lines.contains(&l);
    assert!(has("hook job-started: 0"), "{out}");
    assert!(
        has(&format!("worker cgroup in job: /ringfence/jobs/{id}")),
        "{out}"
    );
    assert!(!out.contains("worker cgroup before: /ringfence"), "{out}");
    assert!(has("worker's own request: 0"), "RUNNER_ALLOW\n{out}");
    assert!(has("step escape: 0"), "{out}");
    assert!(!out.contains("ESCAPED"), "{out}");
    assert!(
        out.contains(&format!("process {worker_pid} is already in job \"{id}\"")),
        "a second start must be refused\n{out}"
    );
    assert!(out.contains("permission denied on"), "{out}");
    assert!(
        out.contains("a password is required") || out.contains("not allowed to execute"),
        "sudo must not run ringfence itself\n{out}"
    );
    assert!(has("step allowed: 0"), "{out}");
    assert!(has("step allowed-after-restart: 0"), "{out}");
    assert!(!has("step blocked-after-restart: 0"), "{out}");
    assert!(out.contains(&format!("hello from {allowed}:80")), "{out}");
    assert!(!has("step blocked-name: 0"), "{out}");
    assert!(!has("step blocked-ip: 0"), "{out}");
    assert!(has("hook job-completed: 0"), "{out}");
    assert!(
        has("hook job-completed, summary not writable: 0")
            && out.contains("ringfence: cannot write the job summary /proc/version"),
        "{out}"
    );
    // job-completed does not take Runner.Worker out of the job: it stays in until it exits.
    assert!(
        has(&format!(
            "worker cgroup after job-completed: /ringfence/jobs/{id}"
        )),
        "{out}"
    );
    // The report is in the log too, with workflow commands off around it.
    assert!(out.contains("::stop-commands::ringfence-"), "{out}");

    // What the servers saw: only the allowed requests; the blocked name never reached the
    // resolver (refused in the kernel).
    assert_eq!(tb.http_hits(sa(allowed, 80)), 2);
    assert_eq!(tb.http_hits(sa(runner_ep, 80)), 1);
    assert_eq!(tb.http_hits(sa(blocked, 80)), 0);
    assert_eq!(tb.http_hits(sa(direct, 80)), 0);
    assert_eq!(tb.dns_queries_for("blocked.test"), 0, "{}", tb.dns_log());

    // The job summary: the Markdown report, from the restarted daemon, with what happened
    // before the crash.
    let summary =
        std::fs::read_to_string(runner.temp.join("step_summary_completed")).unwrap_or_default();
    assert!(
        summary.starts_with(&format!("### ringfence: job {id} (block mode)")),
        "{summary}\n{out}"
    );
    let row = |domain: &str, verdict: &str| {
        summary.lines().any(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            cells.len() > 6 && cells[1] == domain && cells[5] == verdict
        })
    };
    assert!(row("blocked.test", "blocked"), "{summary}");
    assert!(row("allowed.test", "allowed"), "{summary}");
    assert!(row("runner.test", "allowed"), "{summary}");
    assert!(
        summary
            .lines()
            .any(|l| l.contains(&direct.to_string()) && l.contains("| blocked |")),
        "{summary}"
    );

    // The end: what the job left running is gone, so is its cgroup, and the final report
    // is kept on the host.
    let left: u32 = std::fs::read_to_string(runner.temp.join("left.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!proc_alive(left), "the job's leftover process {left} lives");
    let cgroup_root = ringfence::job::cgroup::find_cgroup2().unwrap();
    assert!(!cgroup_root.join("ringfence/jobs").join(&id).exists());
    let final_report =
        std::fs::read_to_string(daemon.data_dir().join("jobs").join(&id).join("report.md"))
            .expect("the final report in the data dir");
    assert!(final_report.contains("blocked.test"), "{final_report}");

    // The unit's system call filter holds every call the daemon made in all of this.
    let used = syscalls_in(&daemon.strace_files());
    let allowed_calls = unit_syscall_filter();
    let missing: Vec<&String> = used.difference(&allowed_calls).collect();
    assert!(
        missing.is_empty(),
        "the daemon used system calls outside the unit's SystemCallFilter: {missing:?}"
    );
}

/// System call names in strace -f output files.
fn syscalls_in(files: &[PathBuf]) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        for line in text.lines() {
            // "1234  bpf(BPF_MAP_CREATE, ...) = 3", "1234  <... epoll_wait resumed>..."
            let rest = line
                .split_once(' ')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && rest[name.len()..].starts_with('(') {
                set.insert(name);
            }
        }
    }
    assert!(set.contains("bpf"), "strace saw no bpf(2): {files:?}");
    set
}

/// The unit's SystemCallFilter, every @set expanded by systemd-analyze.
fn unit_syscall_filter() -> BTreeSet<String> {
    fn expand(item: &str, out: &mut BTreeSet<String>) {
        if !item.starts_with('@') {
            out.insert(item.to_string());
            return;
        }
        let o = Command::new("systemd-analyze")
            .args(["syscall-filter", "--no-pager", item])
            .output()
            .expect("systemd-analyze (Debian package systemd)");
        assert!(o.status.success(), "systemd-analyze syscall-filter {item}");
        for l in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
            let l = l.split('#').next().unwrap().trim();
            if !l.is_empty() {
                expand(l, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    for v in unit_values("SystemCallFilter") {
        assert!(!v.starts_with('~'), "a deny list: {v}");
        for item in v.split_whitespace() {
            expand(item, &mut out);
        }
    }
    assert!(out.contains("read") && out.contains("bpf"), "{out:?}");
    out
}

/// Without a daemon the job-started hook decides by the job's mode: a block-mode job fails
/// (the runner then fails the job before any step), an audit-mode one goes on with a
/// warning, a policy that does not parse fails in either mode, and the host's MODE=block
/// outranks a workspace policy's audit.
#[test]
fn job_started_fails_closed() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("rf-hooks-")
        .tempdir()
        .unwrap();
    // The runner's user reads the hooks below it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let gone = dir.path().join("no-daemon.sock");
    let base = format!(
        "RINGFENCE={RINGFENCE}\nSOCKET={}\nDEFAULT_POLICY={}\nLOG={}\n",
        gone.display(),
        dir.path().join("default.toml").display(),
        dir.path().join("log").display()
    );
    std::fs::write(dir.path().join("default.toml"), "mode = \"block\"\n").unwrap();

    let cases: &[(&str, &str, Option<&str>, bool, &str)] = &[
        // (name, host settings, workspace policy, hook succeeds, expected output)
        (
            "block",
            "",
            Some("mode = \"block\"\n"),
            false,
            "::error title=ringfence::could not put this job under ringfence",
        ),
        (
            "audit",
            "",
            Some("mode = 'audit' # report only\n"),
            true,
            "::warning title=ringfence::could not put this job under ringfence",
        ),
        (
            "broken",
            "",
            Some("mode = \"audit\"\nallowed-endpoints = \"github.com:99999\"\n"),
            false,
            "was refused",
        ),
        (
            "host-block",
            "MODE=block\n",
            Some("mode = \"audit\"\n"),
            false,
            "its policy is block mode",
        ),
        (
            "default-policy",
            "",
            None,
            false,
            "its policy is block mode",
        ),
        (
            "workspace-off",
            "REPO_POLICY=off\n",
            Some("mode = \"audit\"\n"),
            false,
            "default.toml (block mode)",
        ),
    ];
    for (i, (name, extra, policy, ok, expect)) in cases.iter().enumerate() {
        let runner = Runner::install(&dir.path().join(format!("r{i}")), &format!("{base}{extra}"));
        if let Some(p) = policy {
            runner.workspace_policy(p);
        }
        let script = "GITHUB_STEP_SUMMARY=$RUNNER_TEMP/s bash -e \"$HOOKS/job-started.sh\"\n\
                      echo \"hook job-started: $?\"\n";
        let worker = runner.spawn_worker(Command::new("env"), script, &format!("fc{i}"));
        let st = wait_child(worker);
        let out = runner.output();
        assert!(st.success(), "{name}: Runner.Worker {st}\n{out}");
        let code = if *ok { "0" } else { "1" };
        assert!(
            out.contains(&format!("hook job-started: {code}")),
            "{name}: the hook should exit {code}\n{out}"
        );
        assert!(out.contains(expect), "{name}: expected {expect:?}\n{out}");
        if !ok {
            assert!(out.contains("::error title=ringfence::"), "{name}\n{out}");
        }
        if *name == "broken" {
            // The error names the file as the repository knows it, not the helper's copy.
            assert!(
                out.contains(".github/ringfence.toml:2") && !out.contains("ringfence-runner-job."),
                "{out}"
            );
        }
    }
}

fn wait_child(mut c: Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + JOB_TIMEOUT;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("Runner.Worker stand-in did not finish");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `systemd-analyze verify` accepts the unit (ExecStart pointed at the built binary), and a
/// runner unit with the drop-in: no warnings either.
#[test]
fn systemd_units_verify() {
    let dir = tempfile::Builder::new()
        .prefix("rf-unit-")
        .tempdir()
        .unwrap();
    let unit = std::fs::read_to_string(UNIT)
        .unwrap()
        .replace("/usr/local/bin/ringfence", RINGFENCE);
    assert!(unit.contains(&format!("ExecStart={RINGFENCE} run --config")));
    std::fs::write(dir.path().join("ringfence.service"), unit).unwrap();
    // A runner unit as the runner's svc.sh writes it (its actions.runner.service.template),
    // with the drop-in beside it.
    let runner_unit = "actions.runner.octo-org-repo.rf-test.service";
    std::fs::write(
        dir.path().join(runner_unit),
        "[Unit]\nDescription=GitHub Actions Runner (octo-org-repo.rf-test)\n\
         After=network-online.target\n\n\
         [Service]\nExecStart=/bin/true\nUser=github-runner\nWorkingDirectory=/\n\
         KillMode=process\nKillSignal=SIGTERM\nTimeoutStopSec=5min\nRestart=always\n\
         RestartSec=5s\n\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    let dropins = dir.path().join(format!("{runner_unit}.d"));
    std::fs::create_dir(&dropins).unwrap();
    std::fs::copy(RUNNER_DROPIN, dropins.join("ringfence.conf")).unwrap();

    let o = Command::new("systemd-analyze")
        .args(["verify", "--no-pager"])
        .arg(dir.path().join("ringfence.service"))
        .arg(dir.path().join(runner_unit))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify: {stderr}");
    // Anything it says about our files is a warning we want to hear about.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ringfence") || l.contains(runner_unit))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify: {stderr}");
}
