//! `ringfence exec`: one command run as a job under a policy, start to finish.
//!
//! Order matters: everything that can be wrong with the input (policy, interfaces) is
//! checked before anything is loaded or attached; the command starts only once the
//! programs are attached and its cgroup is registered, so its first packet is judged.
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::agent::{self, Agent, JobState};
use crate::job::cgroup::JobCgroup;
use crate::job::spec::mode_name;
pub use crate::job::spec::{ModeArg, PolicyArgs, UsageError};
use crate::kernel::abi;
use crate::kernel::dataplane::{self, AttachMode, Dataplane};
use crate::trail::limits::Limits;
use crate::trail::report::Format;

/// Everything `exec` takes from the command line.
#[derive(Clone, Debug, clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub capacity: crate::kernel::capacity::CapacityArgs,
    /// Also write the report to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Report format (html needs --report: the page goes to FILE, the text report to
    /// stderr).
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Earlier runs' events files, or directories of them: destinations none of them used
    /// are marked new in the report.
    #[arg(long, value_name = "EVENTS|DIR", num_args = 1..)]
    pub baseline: Vec<PathBuf>,
    /// Write every event as JSON Lines to FILE.
    #[arg(long, value_name = "FILE")]
    pub events: Option<PathBuf>,
    /// Exit 3 when anything was blocked and the command itself succeeded (a command that
    /// failed keeps its own status). Under GitHub Actions (GITHUB_ACTIONS=true), also print
    /// an `::error` annotation line per blocked call to stdout.
    #[arg(long = "fail-on-block")]
    pub fail_on_block: bool,
    /// POST blocked calls and findings to URL (http://), batched, while the job runs.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// The webhook's body: slack ({"text": …}) or json (the events).
    #[arg(long = "webhook-format", value_enum, default_value = "slack")]
    pub webhook_format: crate::notify::WebhookFormat,
    /// Interfaces to attach to (repeatable). Default: every interface of this network
    /// namespace except lo, and every one that appears while the job runs. Either way the
    /// job's packets leaving through an interface ringfence is not attached to are dropped
    /// in block mode (reported in audit mode).
    #[arg(long = "interface", value_name = "IFNAME")]
    pub interfaces: Vec<String>,
    /// tcx (Linux 6.6+), clsact, or auto.
    #[arg(long, value_enum, default_value = "auto")]
    pub attach: AttachMode,
    /// The job's name in events and reports. Default: exec-<pid>.
    #[arg(long = "job", value_name = "ID")]
    pub job: Option<String>,
    /// The step's short label in events. Default: the program's name (the whole command
    /// line is in the events file's `job` and `step` lines, once).
    #[arg(long = "step", value_name = "NAME", value_parser = parse_step)]
    pub step: Option<String>,
    /// Pass open file descriptor FD on to the job (repeatable). The job gets stdin, stdout
    /// and stderr only unless told otherwise: a descriptor opened outside the job belongs to
    /// another cgroup, and if it is a socket its traffic is NOT the job's — ringfence does not
    /// judge or report it.
    #[arg(long = "keep-fd", value_name = "FD")]
    pub keep_fds: Vec<i32>,
    /// Flow and DNS events written per second, sustained (0: no limit). Events over it are
    /// counted in `suppressed` lines and in the report, not written.
    #[arg(long = "events-rate", value_name = "N", default_value_t = Limits::default().events_per_sec)]
    pub events_rate: u32,
    /// Events written at once above --events-rate.
    #[arg(long = "events-burst", value_name = "N", default_value_t = Limits::default().events_burst,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub events_burst: u32,
    /// The events file never grows past SIZE (bytes, or with K, M, G; 0: no limit). Lines
    /// past it are dropped and counted in a final `truncated` line and in the report.
    #[arg(long = "events-max-bytes", value_name = "SIZE", default_value = "256M",
          value_parser = crate::trail::limits::parse_size)]
    pub events_max_bytes: u64,
    /// Destinations (report rows), DNS names and answer addresses held in memory for the
    /// job; past it, flows fold into one row per verdict and reason, counted.
    #[arg(long = "max-destinations", value_name = "N", default_value_t = Limits::default().max_destinations as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_destinations: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

impl ExecArgs {
    /// What the job may cost (see [`crate::trail::limits`]).
    pub fn limits(&self) -> Limits {
        Limits {
            events_per_sec: self.events_rate,
            events_burst: self.events_burst,
            events_max_bytes: self.events_max_bytes,
            max_destinations: usize::try_from(self.max_destinations).unwrap_or(usize::MAX),
        }
    }
}

/// A step label is repeated in every event: it has to be short.
fn parse_step(s: &str) -> std::result::Result<String, String> {
    const MAX: usize = 128;
    if s.len() > MAX {
        return Err(format!(
            "a step label is at most {MAX} bytes (it is repeated in every event); \
             the command line is already in the events file's job line"
        ));
    }
    Ok(s.to_owned())
}

/// The default step label: the program's file name (`/usr/bin/npm ci` -> `npm`).
fn step_label(command: &[OsString]) -> String {
    let prog = std::path::Path::new(&command[0]);
    prog.file_name()
        .unwrap_or(prog.as_os_str())
        .to_string_lossy()
        .chars()
        .take(128)
        .collect()
}

/// Internet sockets among what the job will inherit (stdin, stdout, stderr and --keep-fd)
/// were opened outside the job: what goes through them is not judged. Said, not refused:
/// passing them was the caller's choice.
fn warn_inherited_sockets(keep: &[i32]) {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    for &fd in [0, 1, 2].iter().chain(keep) {
        let Ok(addr) = getsockname::<SockaddrStorage>(fd) else {
            continue;
        };
        if matches!(
            addr.family(),
            Some(AddressFamily::Inet) | Some(AddressFamily::Inet6)
        ) {
            tracing::warn!(
                fd,
                "the job inherits an internet socket opened outside it: its traffic is not the job's, and is neither judged nor reported"
            );
        }
    }
}

/// `--keep-fd` must name a descriptor ringfence has open above stderr.
fn check_keep_fds(fds: &[i32]) -> std::result::Result<(), UsageError> {
    for &fd in fds {
        if fd < 3 {
            return Err(UsageError::Other(format!(
                "--keep-fd {fd}: stdin, stdout and stderr are always passed on"
            )));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(UsageError::Other(format!(
                "--keep-fd {fd}: ringfence has no open file descriptor {fd} to pass on"
            )));
        }
    }
    Ok(())
}

/// Runs the command as a job. Returns the exit status ringfence should exit with.
pub fn run(args: &ExecArgs) -> Result<i32> {
    let policy = args.policy.build().map_err(anyhow::Error::new)?;
    check_keep_fds(&args.keep_fds).map_err(anyhow::Error::new)?;
    if args.format == Format::Html && args.report.is_none() {
        return Err(UsageError::Other(
            "--format html writes a page: give it a file with --report FILE".into(),
        )
        .into());
    }
    // Read before anything is loaded: a bad file is bad input (exit 2), and the job has
    // not started yet.
    let baseline = if args.baseline.is_empty() {
        None
    } else {
        Some(std::sync::Arc::new(
            crate::trail::baseline::Baseline::load(&args.baseline)
                .map_err(|e| UsageError::Other(e.to_string()))?,
        ))
    };
    let webhook = crate::notify::Webhook::from_flag(args.webhook.as_ref(), args.webhook_format)
        .map_err(UsageError::Other)?;
    warn_inherited_sockets(&args.keep_fds);
    let compiled = policy.compile()?;
    // A policy the maps cannot hold is refused here, before anything is loaded, rather than
    // half-loaded with the kernel's bare "No space left on device".
    let capacity = args.capacity.capacity();
    capacity
        .validate()
        .map_err(|e| anyhow::Error::new(UsageError::Other(e)))?;
    capacity
        .check(
            crate::kernel::capacity::Usage::of(&compiled),
            Default::default(),
        )
        .map_err(anyhow::Error::new)?;
    // Subscribed before the interfaces are listed, so none can appear unseen in between.
    let auto_interfaces = args.interfaces.is_empty();
    let links = if auto_interfaces {
        Some(
            crate::kernel::netif::LinkWatcher::open()
                .context("watching rtnetlink for new interfaces")?,
        )
    } else {
        None
    };
    let mut interfaces = if auto_interfaces {
        crate::kernel::netif::all_interfaces()
    } else {
        args.interfaces.clone()
    };
    // lo is always watched: a local stub or cache (systemd-resolved on 127.0.0.53 and
    // 127.0.0.54, dnsmasq) sends names on upstream, so DNS to any loopback address is judged
    // like any other (only configured resolvers, every message filtered), and a configured
    // stub's answers bind there. Other loopback traffic leaves the program at once.
    if !interfaces.iter().any(|i| i == "lo") {
        interfaces.push("lo".to_string());
    }
    for i in &interfaces {
        if nix::net::if_::if_nametoindex(i.as_str()).is_err() {
            return Err(dataplane::DataplaneError::NoInterface(i.clone()).into());
        }
    }

    let job_name = args
        .job
        .clone()
        .unwrap_or_else(|| format!("exec-{}", std::process::id()));
    let step = args
        .step
        .clone()
        .unwrap_or_else(|| step_label(&args.command));

    let opts = dataplane::Options {
        attach: args.attach,
        dns_min_ttl: policy.dns_min_ttl,
        dns_grace: policy.dns_grace,
        capacity,
        ..Default::default()
    };
    dataplane::preflight()?;
    // The OOM killer should take the job before ringfence (the guard, at -1000, never); the
    // job is put back to 0 before it starts. ringfence's death is survivable (the guard), so
    // not -1000: a runaway ringfence must stay killable.
    if let Err(e) = crate::job::guard::set_oom_score_adj(b"-900") {
        tracing::warn!("lowering ringfence's OOM score: {e}");
    }
    let cgroup = JobCgroup::create(&format!("{}-{}", sanitize(&job_name), std::process::id()))?;
    let mut dp = Dataplane::load(&opts)?;
    const JOB_ID: u32 = 1;
    dp.install_policy(JOB_ID, &compiled, &policy.dns_resolvers)?;
    let entry = abi::rf_job::for_policy(JOB_ID, &policy);
    dp.add_job(cgroup.id(), cgroup.level(), entry)?;
    // exec is the only job here: forwarded traffic no link of its own judged (containers
    // started before it, or in the moment before their link is claimed) is judged as its.
    dp.set_forward_job(Some(entry))?;
    // So is a socket of any cgroup made from now on that no job claims yet: a container the
    // job starts sends before its cgroup is found (job::containers claims it within a tick).
    dp.set_fwd_after_cgroup(cgroup.id());
    for i in &interfaces {
        match dp.attach(i) {
            Ok(()) => {}
            // An interface found on its own that cannot be attached stays unwatched: the
            // backstop drops the job's packets through it in block mode.
            Err(e) if auto_interfaces => {
                tracing::warn!("{e}: job traffic through it is not let out in block mode")
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Container links that appear from here on are the job's (job::containers).
    let mut containers = crate::job::containers::ContainerLinks::new(JOB_ID, entry, &dp);
    containers.refresh(&mut dp, true);
    let watch_failed = dp.attach_process_watch();
    for f in &watch_failed {
        tracing::warn!(
            "the process watch (ptrace of processes outside the job) is not attached: {f}"
        );
    }
    let ptrace_warning = crate::job::tamper::ptrace_warning();
    if let Some(w) = &ptrace_warning {
        tracing::warn!("{w}");
    }
    // From here on, ringfence's death kills the job rather than leaving it unwatched.
    dp.attach_backstop(cgroup.path())?;
    let mut guard = crate::job::guard::Guard::start(cgroup.path(), &dp.held())?;
    tracing::info!(
        job = job_name,
        mode = mode_name(policy.mode),
        attach = dp.attach_kind().name(),
        interfaces = ?interfaces,
        "job started"
    );

    let mut agent = Agent::new(args.events.as_deref(), opts.dns_min_ttl, opts.dns_grace)?;
    agent.set_events_max_bytes(args.limits().events_max_bytes);
    let mut state = JobState::new(
        &job_name,
        mode_name(policy.mode),
        Some(cgroup.path().to_path_buf()),
    )
    .with_limits(args.limits());
    state.step = Some(step);
    state.policy = Some(policy.clone());
    state.exfil = crate::trail::exfil::ExfilDetector::new(policy.dns_exfil);
    if let Some(b) = baseline {
        state.report.set_baseline(b);
    }
    let notifier = match webhook {
        Some(w) => Some(crate::notify::Sink::start(w).context("starting the webhook sender")?),
        None => None,
    };
    state.notify.extend(notifier.clone());
    let command = args
        .command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    agent.start_job(JOB_ID, state, command, &policy);

    let procs = cgroup.procs_file()?;
    let procs_fd = procs.as_raw_fd();
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    let keep = args.keep_fds.clone();
    // SAFETY: only async-signal-safe calls between fork and exec (write, open, prctl,
    // close_range, fcntl); `keep` was allocated before the fork and is only read.
    unsafe {
        cmd.pre_exec(move || {
            // Join the job's cgroup before exec: the first packet already belongs to it.
            let me = b"0";
            if libc::write(procs_fd, me.as_ptr().cast(), me.len()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The job does not inherit ringfence's low OOM score (its children inherit this).
            crate::job::guard::set_oom_score_adj(b"0")?;
            // A quick end when ringfence dies; the guard covers what this misses (a uid
            // change clears it, orphans never had it).
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // Only stdin, stdout and stderr pass on: a socket opened outside the job is in
            // another cgroup and its traffic would not be judged. --keep-fd opts in.
            crate::job::guard::close_from_3()?;
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", args.command[0].to_string_lossy()))?;
    drop(procs);

    let status = agent::run_until_exit(
        &mut dp,
        &mut agent,
        &mut child,
        links.as_ref(),
        Some(&mut guard),
        Some(&mut containers),
    )?;
    // The job's leftovers (daemons, background jobs) end with it, and so do its containers
    // (left running, they would send unjudged once the programs go).
    cgroup.kill_all();
    containers.kill_containers();
    // Then the guard may leave (it holds duplicates of the links: release before detach).
    if let Err(e) = guard.release() {
        tracing::warn!("{e:#}");
    }
    let counters = dp.counters().unwrap_or([0; abi::COUNTERS]);
    dp.detach_all();

    agent.close_report(JOB_ID, &counters);
    let job = agent.jobs.get_mut(&JOB_ID).expect("the job was registered");
    if let Some(w) = &ptrace_warning {
        job.report.warn(w.clone());
    }
    for f in &watch_failed {
        job.report.warn(format!(
            "ptrace of processes outside the job was not watched ({f})"
        ));
    }
    let mut text = job.report.render(args.format);
    if let Some(p) = &args.report {
        std::fs::write(p, &text).with_context(|| format!("writing the report {}", p.display()))?;
    }
    if args.format == Format::Html {
        // A page is for a browser: the terminal gets the text report.
        text = job.report.render(Format::Text);
    }
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    drop(err);
    let blocked = args.fail_on_block.then(|| job.report.blocked_calls());
    drop(cgroup);
    if let Some(n) = &notifier {
        // The last batch goes out before ringfence exits (the job has ended: a while, not
        // forever).
        if !n.flush(std::time::Duration::from_secs(10)) {
            tracing::warn!(
                "the webhook did not take every notice within 10 s (the events file has them)"
            );
        }
    }

    let code = match status.code() {
        Some(c) => c,
        None => 128 + status.signal().unwrap_or(0),
    };
    Ok(match blocked {
        Some(b) => fail_on_block(&job_name, &b, code),
        None => code,
    })
}

/// `--fail-on-block`: the annotations under GitHub Actions (the runner reads workflow
/// commands from stdout), and the status to exit with.
pub fn fail_on_block(job: &str, b: &crate::trail::blocked::Blocked, code: i32) -> i32 {
    use crate::trail::blocked;
    if blocked::under_github_actions() {
        let mut out = std::io::stdout().lock();
        for l in blocked::annotations(job, b) {
            let _ = writeln!(out, "{l}");
        }
        let _ = out.flush();
    }
    let c = b.exit_status(code);
    if c == blocked::BLOCKED_EXIT {
        tracing::error!(
            job,
            blocked = b.flows,
            "--fail-on-block: the job succeeded, but {} flows were blocked: exiting {c}",
            b.flows
        );
    }
    c
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}
