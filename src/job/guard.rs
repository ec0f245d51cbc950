//! The guard: a small process that outlives `ringfence exec` if it dies (kill -9, the OOM
//! killer) and makes sure its death never leaves the job running unwatched.
//!
//! ringfence's TCX links detach when the last fd to them closes, i.e. when ringfence dies;
//! the parent-death signal it sets on the job is cleared by anything that changes uid
//! (setpriv, sudo -u) and never reached orphans. So once the programs are attached and
//! before the job starts, `exec` re-executes itself as `ringfence guard` (a fresh exec, not a
//! fork: nothing of the multi-threaded parent's state is shared) with one end of a
//! SOCK_SEQPACKET socket pair as its stdin. Over it ringfence hands the guard duplicates of
//! the link fds (SCM_RIGHTS) — enforcement stays attached as long as the guard lives — and
//! the clsact filters it added; it can hand over more later (an interface attached
//! mid-job). The other end is only ringfence's:
//!
//! - ringfence ends normally: it kills the job, tells the guard to leave and waits for it,
//!   then detaches and cleans up as before;
//! - ringfence dies: the socket reads end-of-file, and the guard kills the job's cgroup
//!   (`cgroup.kill`), waits until it is empty, removes it, removes the clsact filters and
//!   qdiscs ringfence added (netlink state outlives every process) and exits — only then do
//!   the links go, so there is no moment when the job runs and nothing judges it.
//!
//! The guard runs as root in its own session with oom_score_adj -1000: an unprivileged job
//! cannot signal it (signals to another uid need CAP_KILL), the terminal's ^C does not reach
//! it, and the OOM killer passes it over.
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::job::cgroup::JobCgroup;
use crate::kernel::dataplane::{self, Held, TcFilter};

/// ringfence -> guard: take these (link fds as SCM_RIGHTS, filters and qdiscs as lines).
const HOLD: &str = "hold";
/// ringfence -> guard: ringfence is ending normally, leave without touching anything.
const LEAVE: &str = "leave";
/// guard -> ringfence: holding.
const OK: &str = "ok";
/// Descriptors one message can carry (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;

/// What the guard takes on its command line (a hidden subcommand: only `exec` starts it).
/// What to hold arrives over its stdin, a SOCK_SEQPACKET socket whose other end only
/// ringfence has: messages carry descriptors, and end-of-file is ringfence's death.
#[derive(Clone, Debug, clap::Args)]
pub struct GuardArgs {
    /// The job's cgroup directory.
    #[arg(long, value_name = "DIR")]
    pub cgroup: PathBuf,
    /// The pid of the ringfence that started this guard (for messages).
    #[arg(long, value_name = "PID")]
    pub ringfence_pid: u32,
}

/// The guard as ringfence holds it.
pub struct Guard {
    child: Child,
    /// Closing it without sending [`LEAVE`] first is what ringfence's death looks like.
    channel: Option<OwnedFd>,
}

impl Guard {
    /// Starts the guard for a job in `cgroup` and hands it `held`. Returns once the guard
    /// holds them.
    pub fn start(cgroup: &std::path::Path, held: &Held) -> Result<Guard> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .context("creating the guard's socket")?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0("ringfence-guard")
            .arg("guard")
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--ringfence-pid")
            .arg(std::process::id().to_string());
        // Its end becomes its stdin; stderr stays ringfence's, for its last words.
        cmd.stdin(Stdio::from(theirs)).stdout(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec (setsid, close_range).
        unsafe {
            cmd.pre_exec(|| {
                // Its own session: the terminal's signals (^C, hangup) are for the job and
                // ringfence, not for what must outlive them.
                libc::setsid();
                close_from_3()
            });
        }
        let child = cmd.spawn().context("starting the guard process")?;
        let mut g = Guard {
            child,
            channel: Some(ours),
        };
        g.hold(held)?;
        Ok(g)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Hands the guard more to hold (programs attached after it started, e.g. to an
    /// interface that appeared). Returns once it has them.
    pub fn hold(&mut self, held: &Held) -> Result<()> {
        let Some(ch) = self.channel.as_ref() else {
            anyhow::bail!("the guard was released");
        };
        let mut text = format!("{HOLD}\n");
        for f in &held.filters {
            text.push_str(&format!("filter {}\n", f.to_arg()));
        }
        for q in &held.qdiscs {
            text.push_str(&format!("qdisc {q}\n"));
        }
        for c in &held.cgroups {
            text.push_str(&format!("cgroup {}\n", c.display()));
        }
        let chunks: Vec<&[RawFd]> = if held.link_fds.is_empty() {
            vec![&[]]
        } else {
            held.link_fds.chunks(MAX_FDS).collect()
        };
        for (i, fds) in chunks.into_iter().enumerate() {
            // The filters and qdiscs go with the first message; the rest carry fds only.
            let body = if i == 0 { text.as_str() } else { "hold\n" };
            let cmsg = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
            sendmsg::<()>(
                ch.as_raw_fd(),
                &[IoSlice::new(body.as_bytes())],
                cmsgs,
                MsgFlags::empty(),
                None,
            )
            .context("handing the guard what to hold")?;
            let mut poll = [nix::poll::PollFd::new(
                ch.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ready = nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(20_000u16))
                .context("waiting for the guard")?;
            let mut buf = [0u8; 16];
            let n = if ready > 0 {
                nix::unistd::read(ch.as_raw_fd(), &mut buf).context("reading the guard")?
            } else {
                0
            };
            if &buf[..n] != OK.as_bytes() {
                anyhow::bail!("the guard process {} did not take what to hold", self.pid());
            }
        }
        Ok(())
    }

    /// ringfence is ending normally (the job is already killed): the guard leaves, closing
    /// its link fds. Waits for it, so that detaching afterwards really detaches.
    pub fn release(mut self) -> Result<()> {
        if let Some(ch) = self.channel.take() {
            nix::unistd::write(&ch, LEAVE.as_bytes()).context("telling the guard to leave")?;
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

/// What the guard holds and will clean up.
#[derive(Default)]
struct Holding {
    /// Kept open: closing them (at exit) is what detaches.
    links: Vec<OwnedFd>,
    filters: Vec<TcFilter>,
    qdiscs: Vec<i32>,
    /// The job's containers' cgroups: killed with the job.
    cgroups: Vec<PathBuf>,
}

/// One message from ringfence: Some(true) to leave, Some(false) after taking what it
/// handed over, None at end-of-file (ringfence is gone).
fn receive(h: &mut Holding) -> Option<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(0, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(f) = c {
                            fds.extend(f);
                        }
                    }
                }
                break (msg.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            // Anything else: the channel is broken, which is as good as ringfence gone.
            Err(_) => break (0, Vec::new()),
        }
    };
    // SAFETY: descriptors just received are this process's, owned by nobody else.
    h.links.extend(
        fds.into_iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
    );
    if n == 0 {
        return None;
    }
    let text = String::from_utf8_lossy(&buf[..n]);
    let mut lines = text.lines();
    if lines.next() == Some(LEAVE) {
        return Some(true);
    }
    for l in lines {
        if let Some(f) = l.strip_prefix("filter ") {
            match TcFilter::parse_arg(f) {
                Ok(f) => h.filters.push(f),
                Err(e) => eprintln!("ringfence guard: {e}"),
            }
        } else if let Some(c) = l.strip_prefix("cgroup ") {
            h.cgroups.push(PathBuf::from(c));
        } else if let Some(q) = l.strip_prefix("qdisc ").and_then(|q| q.parse().ok()) {
            if !h.qdiscs.contains(&q) {
                h.qdiscs.push(q);
            }
        }
    }
    let _ = nix::unistd::write(std::io::stdin(), OK.as_bytes());
    Some(false)
}

/// The guard process: holds what ringfence hands it, and cleans up after ringfence if it
/// dies.
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
    let mut h = Holding::default();
    loop {
        match receive(&mut h) {
            Some(true) => return Ok(0),
            Some(false) => continue,
            None => break,
        }
    }
    eprintln!(
        "ringfence guard: ringfence (pid {}) ended without ending its job: killing the job ({})",
        args.ringfence_pid,
        args.cgroup.display()
    );
    take_down(args, &h);
    // The links go now, with this process: the job is gone.
    drop(h);
    Ok(0)
}

/// Kills the job, removes its cgroup, and removes the netlink state ringfence left; the
/// links go when this process exits, after the job is gone.
fn take_down(args: &GuardArgs, h: &Holding) {
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
    // The containers it started, which live in their engine's cgroups: left running they
    // would send unjudged once the links go.
    for c in &h.cgroups {
        crate::job::containers::kill_cgroup(c);
    }
    for f in &h.filters {
        if let Err(e) = f.remove_if_ours() {
            eprintln!(
                "ringfence guard: removing clsact filter {}: {e}",
                f.to_arg()
            );
        }
    }
    for &q in &h.qdiscs {
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
