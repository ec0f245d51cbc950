//! The guard: a small process that outlives `ringfence exec` if it dies (kill -9, the OOM
//! killer) and makes sure its death never leaves the job running unwatched.
//!
//! ringfence's TCX links detach when the last fd to them closes, i.e. when ringfence dies;
//! the parent-death signal it sets on the job is cleared by anything that changes uid
//! (setpriv, sudo -u) and never reached orphans. So once the programs are attached and
//! before the job starts, `exec` re-executes itself as `ringfence guard` (a fresh exec, not a
//! fork: nothing of the multi-threaded parent's state is shared), handing it duplicates of
//! the link fds — enforcement stays attached as long as the guard lives — and the read end
//! of a pipe whose write end only ringfence holds:
//!
//! - ringfence ends normally: it kills the job, writes one byte and waits for the guard to
//!   leave, then detaches and cleans up as before;
//! - ringfence dies: the pipe reads end-of-file, and the guard kills the job's cgroup
//!   (`cgroup.kill`), waits until it is empty, removes it, removes the clsact filters and
//!   qdiscs ringfence added (netlink state outlives every process) and exits — only then do
//!   the links go, so there is no moment when the job runs and nothing judges it.
//!
//! The guard runs as root in its own session with oom_score_adj -1000: an unprivileged job
//! cannot signal it (signals to another uid need CAP_KILL), the terminal's ^C does not reach
//! it, and the OOM killer passes it over.
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cgroup::JobCgroup;
use crate::dataplane::{self, Held, TcFilter};

/// The byte that tells the guard ringfence ended normally and it may leave.
const RELEASE: u8 = b'q';

/// What the guard takes on its command line (a hidden subcommand: only `exec` starts it).
#[derive(Clone, Debug, clap::Args)]
pub struct GuardArgs {
    /// The job's cgroup directory.
    #[arg(long, value_name = "DIR")]
    pub cgroup: PathBuf,
    /// The pid of the ringfence that started this guard (for messages).
    #[arg(long, value_name = "PID")]
    pub ringfence_pid: u32,
    /// An inherited TCX link fd to hold (repeatable).
    #[arg(long = "link-fd", value_name = "FD")]
    pub link_fds: Vec<RawFd>,
    /// A clsact filter to remove (IFINDEX:egress|ingress:HANDLE:PRIORITY:PROG_ID).
    #[arg(long = "tc-filter", value_name = "FILTER", value_parser = TcFilter::parse_arg)]
    pub filters: Vec<TcFilter>,
    /// An interface whose clsact qdisc to remove.
    #[arg(long = "tc-qdisc", value_name = "IFINDEX")]
    pub qdiscs: Vec<i32>,
}

/// The guard as ringfence holds it.
pub struct Guard {
    child: Child,
    /// Closing it without writing [`RELEASE`] first is what ringfence's death looks like.
    release: Option<std::fs::File>,
}

impl Guard {
    /// Starts the guard for a job in `cgroup` whose programs are `held`. Returns once the
    /// guard runs (it holds the links from then on).
    pub fn start(cgroup: &std::path::Path, held: &Held) -> Result<Guard> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context("creating the guard's pipe")?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("ringfence-guard")
            .arg("guard")
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--ringfence-pid")
            .arg(std::process::id().to_string());
        for fd in &held.link_fds {
            cmd.arg("--link-fd").arg(fd.to_string());
        }
        for f in &held.filters {
            cmd.arg("--tc-filter").arg(f.to_arg());
        }
        for q in &held.qdiscs {
            cmd.arg("--tc-qdisc").arg(q.to_string());
        }
        // The read end becomes its stdin; stderr stays ringfence's, for its last words.
        cmd.stdin(Stdio::from(r)).stdout(Stdio::null());
        let keep = held.link_fds.clone();
        // SAFETY: only async-signal-safe calls between fork and exec (setsid, close_range,
        // fcntl); `keep` was allocated before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || {
                // Its own session: the terminal's signals (^C, hangup) are for the job and
                // ringfence, not for what must outlive them.
                libc::setsid();
                close_from_3()?;
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting the guard process")?;
        Ok(Guard {
            child,
            release: Some(std::fs::File::from(w)),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// ringfence is ending normally (the job is already killed): the guard leaves, closing
    /// its link fds. Waits for it, so that detaching afterwards really detaches.
    pub fn release(mut self) -> Result<()> {
        if let Some(mut w) = self.release.take() {
            w.write_all(&[RELEASE])
                .context("telling the guard to leave")?;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("the guard process {} did not leave", self.child.id());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Marks every fd from 3 up close-on-exec. Not closed at once: Rust's `Command` reports a
/// failed exec through a close-on-exec pipe it still needs until the exec.
pub(crate) fn close_from_3() -> std::io::Result<()> {
    // SAFETY: a plain syscall (Linux 5.11+; ringfence needs 5.17).
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `value` to /proc/self/oom_score_adj (async-signal-safe: usable in pre_exec).
pub(crate) fn set_oom_score_adj(value: &[u8]) -> std::io::Result<()> {
    const PATH: &std::ffi::CStr = c"/proc/self/oom_score_adj";
    // SAFETY: a NUL-terminated path; the fd is closed before returning.
    unsafe {
        let fd = libc::open(PATH.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = libc::write(fd, value.as_ptr().cast(), value.len());
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// The guard process: waits for ringfence, and cleans up after it if it died.
pub fn run(args: &GuardArgs) -> Result<i32> {
    // Started as /proc/self/exe, it would show as "exe" in ps and top.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"ringfence-guard".as_ptr()) };
    // Without CAP_SYS_RESOURCE ringfence failed the same way and has said so already.
    if let Err(e) = set_oom_score_adj(b"-1000") {
        if e.raw_os_error() != Some(libc::EACCES) {
            eprintln!("ringfence guard: lowering its own OOM score: {e}");
        }
    }
    // Hold the links: the fds were inherited, and closing them at exit is what detaches.
    // SAFETY: ringfence passed these fds to this process for it to own.
    let _links: Vec<OwnedFd> = args
        .link_fds
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let mut stdin = std::io::stdin().lock();
    let mut b = [0u8; 1];
    let released = loop {
        match stdin.read(&mut b) {
            Ok(1) => break b[0] == RELEASE,
            Ok(_) => break false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break false,
        }
    };
    if released {
        return Ok(0);
    }
    eprintln!(
        "ringfence guard: ringfence (pid {}) ended without ending its job: killing the job ({})",
        args.ringfence_pid,
        args.cgroup.display()
    );
    take_down(args);
    Ok(0)
}

/// Kills the job, removes its cgroup, and removes the netlink state ringfence left; the
/// links go when this process exits, after the job is gone.
fn take_down(args: &GuardArgs) {
    if args.cgroup.exists() {
        // Dropping the handle kills what is in it, waits for it to empty, and removes it.
        let cg = JobCgroup::adopt(&args.cgroup);
        if !cg.pids().is_empty() || populated(&args.cgroup) {
            cg.kill_all();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while populated(&args.cgroup) && Instant::now() < deadline {
            cg.kill_all();
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(cg);
    }
    for f in &args.filters {
        if let Err(e) = f.remove_if_ours() {
            eprintln!(
                "ringfence guard: removing clsact filter {}: {e}",
                f.to_arg()
            );
        }
    }
    for &q in &args.qdiscs {
        if let Err(e) = dataplane::remove_clsact(q) {
            eprintln!("ringfence guard: removing the clsact qdisc of ifindex {q}: {e}");
        }
    }
}

/// `populated 1` in the cgroup's `cgroup.events`: a process is still in it or below it.
fn populated(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}
