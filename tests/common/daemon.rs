//! The host daemon under test: `ringfence run` in a testbed's client namespace (entered
//! with nsenter, which keeps the host's /sys and so its bpffs: `ip netns exec` would mount a
//! fresh sysfs and a fresh bpffs with it, and nothing pinned would outlive the process),
//! with its own bpffs base, socket, state and data directories. Jobs are cgroups the tests
//! make; their processes join before exec, so their first packet is the job's.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{run_timeout, Testbed, JOB_TIMEOUT, RINGFENCE};

pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    netns: String,
    child: Option<Child>,
    extra: Vec<String>,
    cgroups: Vec<PathBuf>,
}

fn seq() -> usize {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Daemon {
    /// Starts a daemon in `tb`'s client namespace; returns once its socket answers.
    pub fn start(tb: &Testbed, extra: &[&str]) -> Daemon {
        let n = seq();
        let dir = tb.workdir().join(format!("daemon-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = Daemon {
            socket: dir.join("control.sock"),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/rf-test-{}-{n}", std::process::id())),
            dir,
            netns: format!("/run/netns/{}", tb.client_ns()),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            cgroups: Vec::new(),
        };
        d.spawn();
        d
    }

    fn command(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns))
            .arg(RINGFENCE)
            .arg("run")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(&self.extra);
        c
    }

    /// (Re)starts the process and waits for its socket.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = self
            .command()
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting ringfence run");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({st}) before serving:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not serve within 120 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `ringfence run` expecting it to fail at start; returns its stderr.
    pub fn start_fails(&self) -> String {
        let (st, _, err) = run_timeout(self.command(), JOB_TIMEOUT);
        assert!(
            !st.success(),
            "the daemon started where it should have refused"
        );
        err
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// kill -9: nothing of the daemon's own runs any more.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the exit (60 s at most: a daemon that does not stop fails the
    /// test, with its log, rather than hanging it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() >= deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!(
                        "the daemon did not stop within 60 s of SIGTERM:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `ringfence <args> --socket S`: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut c = Command::new(RINGFENCE);
        c.args(args).arg("--socket").arg(&self.socket);
        let (st, out, err) = run_timeout(c, JOB_TIMEOUT);
        (st.success(), out, err)
    }

    /// As [`cli`](Self::cli), panicking on failure; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(
            ok,
            "ringfence {args:?} failed: {err}\n--- daemon log:\n{}",
            self.log()
        );
        out
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }

    /// A fresh cgroup for a job (removed when the daemon is dropped).
    pub fn cgroup(&mut self, name: &str) -> PathBuf {
        let root = ringfence::job::cgroup::find_cgroup2().expect("cgroup2");
        let p = root.join(format!("rf-test-{}-{}-{name}", std::process::id(), seq()));
        std::fs::create_dir_all(&p).unwrap();
        self.cgroups.push(p.clone());
        p
    }

    /// Starts a cgroup job: `job start --id ID --cgroup CG <policy flags>`.
    pub fn start_job(&self, id: &str, cg: &Path, policy: &[&str]) {
        let cg = cg.display().to_string();
        let mut args = vec!["job", "start", "--id", id, "--cgroup", cg.as_str()];
        args.extend_from_slice(policy);
        self.ok(&args);
    }

    /// The events a job's file holds so far.
    pub fn events(&self, id: &str) -> Vec<Value> {
        let p = self
            .dir
            .join("data")
            .join("jobs")
            .join(id)
            .join("events.jsonl");
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("events line is JSON"))
            .collect()
    }
}

/// `argv` in the testbed's client namespace, inside cgroup `cg` from before its exec.
pub fn in_job(tb: &Testbed, cg: &Path, argv: &[String]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec ip netns exec \"$@\"")
        .arg(cg)
        .arg(tb.client_ns())
        .args(argv);
    c
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Everything pinned goes, whatever state it was left in.
        let _ = Command::new(RINGFENCE)
            .args(["unload", "--force", "--bpffs"])
            .arg(&self.bpffs)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(&self.socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        for cg in &self.cgroups {
            let k = cg.join("cgroup.kill");
            let _ = std::fs::write(&k, "1");
            for _ in 0..100 {
                if std::fs::remove_dir(cg).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let jobs = ringfence::job::cgroup::find_cgroup2()
            .map(|r| r.join("ringfence").join("jobs"))
            .ok();
        if let Some(j) = jobs {
            let _ = std::fs::remove_dir(j);
        }
    }
}
