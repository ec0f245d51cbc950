//! The daemon's clients: `ringfence job start|step|end`, `report`, `status`, `unload`.
//! Each sends one request line to the control socket and prints the answer.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::daemon::config::DEFAULT_SOCKET;
use crate::daemon::protocol::{Request, Response, Target};
use crate::job::spec::{PolicyArgs, UsageError};
use crate::trail::report::Format;

/// The control socket (also $RINGFENCE_SOCKET).
#[derive(Clone, Debug, clap::Args)]
pub struct SocketArg {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", env = "RINGFENCE_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum JobCmd {
    /// Start a job: a cgroup, a process (moved into a cgroup of its own), or an interface.
    Start(Box<StartArgs>),
    /// Mark the start of a step: later events carry its name.
    Step {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Add a host-side interface (a pod's veth, a tap) to a running job: what comes in
    /// there is judged as the job's, until the job ends.
    Link {
        #[arg(long)]
        id: String,
        #[arg(long, value_name = "IFNAME")]
        interface: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// End a job: its report is printed, its state purged.
    End {
        #[arg(long)]
        id: String,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Also write the report to FILE.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// A --cgroup job: leave the processes still in the cgroup running (they belong to
        /// no job from then on). By default they are killed with the job.
        #[arg(long = "keep-processes")]
        keep_processes: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, clap::Args)]
#[group(id = "target", required = true, multiple = false, args = ["cgroup", "pid", "interface"])]
pub struct StartArgs {
    /// The job's id (letters, digits, '.', '_', '-').
    #[arg(long)]
    pub id: String,
    /// An existing cgroup (absolute, or relative to the cgroup2 mount): it and its
    /// descendants are the job.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// A process to move into a new cgroup for the job (its later children are the job).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// The host side of a veth or tap: what the job sends through it.
    #[arg(long, value_name = "IFNAME")]
    pub interface: Option<String>,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// `job end` exits 3 when anything was blocked (and, under GitHub Actions, prints an
    /// `::error` annotation line per blocked call).
    #[arg(long = "fail-on-block")]
    pub fail_on_block: bool,
    /// Containers already running (links and cgroups) are the job's too, if it is the only
    /// job: the service containers a runner starts before the first step.
    #[arg(long = "claim-running-containers")]
    pub claim_running_containers: bool,
    /// Also POST the job's blocked calls and findings to URL (http://; the daemon's
    /// configured webhooks get them anyway).
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// The job's webhook body: slack ({"text": …}) or json (the events).
    #[arg(long = "webhook-format", value_enum, default_value = "slack")]
    pub webhook_format: crate::notify::WebhookFormat,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Sends one request, returns the answer (a daemon error is an error here).
pub fn call(socket: &std::path::Path, req: &Request) -> Result<Response> {
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    // Said here, with the cause: the daemon would refuse it after reading the first 4 MiB.
    if line.len() > crate::daemon::protocol::MAX_REQUEST {
        return Err(crate::job::spec::UsageError::Other(format!(
            "the request is {} bytes, more than the daemon takes ({} bytes): a job's policy \
             travels inline, its allowed-cidr-files included. Use fewer or wider networks, or \
             `ringfence exec`, which has no such limit",
            line.len(),
            crate::daemon::protocol::MAX_REQUEST
        ))
        .into());
    }
    let mut s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no ringfence daemon at {} (is `ringfence run` running? --socket or RINGFENCE_SOCKET name another)",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "permission denied on {}: the control socket is for root (and the group the daemon's config names)",
            socket.display()
        ),
        _ => anyhow::anyhow!("connecting to {}: {e}", socket.display()),
    })?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    // A refused peer is answered at once and closed before it has written: its answer
    // is read even if writing failed.
    let wrote = s.write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&s).read_line(&mut answer);
    if answer.is_empty() {
        if let Err(e) = wrote {
            return Err(e).with_context(|| format!("writing to {}", socket.display()));
        }
        read.with_context(|| format!("reading from {}", socket.display()))?;
        anyhow::bail!("the daemon closed {} without answering", socket.display());
    }
    match serde_json::from_str::<Response>(&answer)
        .with_context(|| format!("the daemon's answer does not parse: {answer:?}"))?
    {
        Response::Error { error } => Err(anyhow::anyhow!("{error}")),
        r => Ok(r),
    }
}

/// Prints a report answer; returns what a `--fail-on-block` job's end says was blocked.
fn print_report(
    r: Response,
    file: Option<&PathBuf>,
) -> Result<Option<crate::trail::blocked::Blocked>> {
    let Response::Report { text, blocked } = r else {
        anyhow::bail!("unexpected answer: {r:?}");
    };
    if let Some(p) = file {
        std::fs::write(p, &text).with_context(|| format!("writing the report {}", p.display()))?;
    }
    print!("{text}");
    Ok(blocked)
}

fn format_name(f: Format) -> String {
    match f {
        Format::Text => "text",
        Format::Json => "json",
        Format::Markdown => "markdown",
        Format::Html => "html",
    }
    .into()
}

pub fn job(cmd: &JobCmd) -> Result<i32> {
    match cmd {
        JobCmd::Start(a) => {
            let target = match (&a.cgroup, a.pid, &a.interface) {
                (Some(c), _, _) => Target::Cgroup(c.clone()),
                (_, Some(p), _) => Target::Pid(p),
                (_, _, Some(i)) => Target::Interface(i.clone()),
                _ => unreachable!("clap requires one target"),
            };
            // Checked here first: a policy error names its file, line and token.
            let policy = a.policy.to_spec().map_err(anyhow::Error::new)?;
            policy.build()?.compile()?;
            let webhook = crate::notify::Webhook::from_flag(a.webhook.as_ref(), a.webhook_format)
                .map_err(UsageError::Other)?;
            let r = call(
                &a.socket.socket,
                &Request::JobStart {
                    id: a.id.clone(),
                    target,
                    policy,
                    fail_on_block: a.fail_on_block,
                    webhook,
                    claim_running_containers: a.claim_running_containers,
                },
            )?;
            if let Response::JobStarted {
                id,
                slot,
                cgroup,
                interface,
                events,
            } = r
            {
                let at = cgroup.or(interface).unwrap_or_default();
                println!("job {id} started (slot {slot}) on {at}; events: {events}");
            }
            Ok(0)
        }
        JobCmd::Step { id, name, socket } => {
            call(
                &socket.socket,
                &Request::JobStep {
                    id: id.clone(),
                    name: name.clone(),
                },
            )?;
            Ok(0)
        }
        JobCmd::Link {
            id,
            interface,
            socket,
        } => {
            let r = call(
                &socket.socket,
                &Request::JobLink {
                    id: id.clone(),
                    interface: interface.clone(),
                },
            )?;
            if let Response::Ok { message: Some(m) } = r {
                println!("{m}");
            }
            Ok(0)
        }
        JobCmd::End {
            id,
            format,
            report,
            keep_processes,
            socket,
        } => {
            let r = call(
                &socket.socket,
                &Request::JobEnd {
                    id: id.clone(),
                    format: Some(format_name(*format)),
                    keep_processes: *keep_processes,
                },
            )?;
            // The report went to stdout; the annotations follow it there.
            Ok(match print_report(r, report.as_ref())? {
                Some(b) => crate::exec::fail_on_block(id, &b, 0),
                None => 0,
            })
        }
    }
}

/// `ringfence report`: the baseline's files are read here, as the caller, and only the
/// destinations they name travel to the daemon.
pub fn report(id: &str, format: Format, baseline: &[PathBuf], socket: &SocketArg) -> Result<i32> {
    let baseline = if baseline.is_empty() {
        None
    } else {
        Some(
            crate::trail::baseline::Baseline::load(baseline)
                .map_err(|e| UsageError::Other(e.to_string()))?,
        )
    };
    let r = call(
        &socket.socket,
        &Request::Report {
            id: id.to_string(),
            format: Some(format_name(format)),
            baseline,
        },
    )?;
    print_report(r, None)?;
    Ok(0)
}

pub fn status(json: bool, socket: &SocketArg) -> Result<i32> {
    let Response::Status(v) = call(&socket.socket, &Request::Status)? else {
        anyhow::bail!("unexpected answer to status");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "ringfence daemon: kernel {}, attach {}, pinned at {}{}, up {} s",
        v["kernel"].as_str().unwrap_or("?"),
        v["attach"].as_str().unwrap_or("?"),
        v["bpffs"].as_str().unwrap_or("?"),
        if v["adopted"].as_bool() == Some(true) {
            " (taken over)"
        } else {
            ""
        },
        v["uptime_s"]
    );
    let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
    println!("{} jobs", jobs.len());
    for j in &jobs {
        println!(
            "  {:<24} {:<6} flows {:>6}  blocked {:>6}  audited {:>6}  step {}",
            j["id"].as_str().unwrap_or("?"),
            j["mode"].as_str().unwrap_or("?"),
            j["flows"],
            j["blocked"],
            j["audited"],
            j["step"].as_str().unwrap_or("-"),
        );
    }
    println!("maps:");
    for m in v["maps"].as_array().cloned().unwrap_or_default() {
        let (e, c) = (
            m["entries"].as_u64().unwrap_or(0),
            m["capacity"].as_u64().unwrap_or(0),
        );
        println!(
            "  {:<12} {:>8} / {:<8} {:>5.1}%",
            m["map"].as_str().unwrap_or("?"),
            e,
            c,
            if c == 0 {
                0.0
            } else {
                e as f64 * 100.0 / c as f64
            }
        );
    }
    let c = &v["counters"];
    println!(
        "counters: new flows {}, blocked {}, audited {}, dns bound {}, dns refused {}, ring buffer drops {}",
        c["new_flows"], c["blocked"], c["audited"], c["dns_bound"], c["dns_refused"], c["ringbuf_drop"]
    );
    Ok(0)
}

/// `ringfence unload`: through the daemon if one serves; otherwise the pins are removed
/// directly (a dead daemon's programs go with them).
pub fn unload(
    force: bool,
    socket: &SocketArg,
    bpffs: &std::path::Path,
    state_dir: &std::path::Path,
) -> Result<i32> {
    match call(&socket.socket, &Request::Unload { force }) {
        Ok(Response::Ok { message }) => {
            if let Some(m) = message {
                eprintln!("ringfence: {m}");
            }
            // The daemon takes everything down after answering: wait for its socket to go.
            for _ in 0..300 {
                if !socket.socket.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            return Ok(0);
        }
        Ok(r) => anyhow::bail!("unexpected answer to unload: {r:?}"),
        Err(e) if e.to_string().starts_with("no ringfence daemon") => {}
        Err(e) => return Err(e),
    }
    let state_file = state_dir.join("state.json");
    let state = crate::daemon::state::State::load(&state_file).unwrap_or_default();
    if !state.jobs.is_empty() && !force {
        return Err(UsageError::Other(format!(
            "no daemon runs, but {} jobs were left enforced ({}): unload --force stops enforcing them",
            state.jobs.len(),
            state.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>().join(", ")
        ))
        .into());
    }
    for f in &state.filters {
        if let Ok(f) = crate::kernel::dataplane::TcFilter::parse_arg(f) {
            let _ = f.remove_if_ours();
        }
    }
    crate::kernel::pins::Pins::new(bpffs).remove_all()?;
    let _ = std::fs::remove_file(&state_file);
    eprintln!(
        "ringfence: no daemon was running; removed the pins under {}",
        bpffs.display()
    );
    Ok(0)
}
