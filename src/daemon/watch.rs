//! `ringfence watch`: a live view of the daemon's jobs and their flows as they open. It
//! polls the control socket (`watch` requests: the status and the flow events numbered after
//! the last it saw), so it needs nothing but the socket, and a slow terminal never holds up
//! the daemon. On a terminal the view is redrawn in place (counters, jobs, the latest flows,
//! blocked ones in red, audited ones in yellow); otherwise each flow is one plain line.
//! A standalone `ringfence exec` has no socket: `watch --events FILE` follows the events
//! file it writes (`exec --events FILE`) and counts from its lines what it can (flows,
//! verdicts, DNS answers bound, steps); the kernel's counters and map fill stay unknown.
use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::daemon::client::{call, SocketArg};
use crate::daemon::protocol::{Request, Response};

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Only this job's flows.
    #[arg(long, value_name = "ID")]
    pub job: Option<String>,
    /// Milliseconds between polls.
    #[arg(long, value_name = "MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(50..))]
    pub interval: u64,
    /// Plain lines even on a terminal.
    #[arg(long)]
    pub plain: bool,
    /// Stop after SECONDS (default: until interrupted).
    #[arg(long = "for", value_name = "SECONDS")]
    pub duration: Option<u64>,
    /// Follow the events file of a running `ringfence exec --events FILE` instead of the
    /// daemon (exec has no control socket).
    #[arg(long, value_name = "FILE")]
    pub events: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Where the view's numbers and flows come from.
enum Source {
    Daemon { after: u64 },
    File(FileFollow),
}

impl Source {
    /// The status (the daemon's `status` shape) and the flow events since the last poll,
    /// with how many the daemon no longer kept.
    fn poll(&mut self, a: &WatchArgs) -> Result<(Value, Vec<Value>, u64)> {
        match self {
            Source::Daemon { after } => {
                let r = call(
                    &a.socket.socket,
                    &Request::Watch {
                        job: a.job.clone(),
                        after: *after,
                    },
                )?;
                let Response::Watch {
                    status,
                    cursor,
                    events,
                    missed,
                } = r
                else {
                    anyhow::bail!("unexpected answer to watch: {r:?}");
                };
                *after = cursor;
                Ok((status, events, missed))
            }
            Source::File(f) => {
                let events = f.read_new()?;
                Ok((f.status(), events, 0))
            }
        }
    }
}

/// An exec's events file, read as it grows: complete lines only (a line being written is
/// kept until its newline comes), counted per job.
struct FileFollow {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    partial: Vec<u8>,
    started: Instant,
    jobs: Vec<(String, Value)>,
    counters: [u64; 4],
}

impl FileFollow {
    fn new(path: &std::path::Path) -> FileFollow {
        FileFollow {
            path: path.to_owned(),
            file: None,
            partial: Vec::new(),
            started: Instant::now(),
            jobs: Vec::new(),
            counters: [0; 4],
        }
    }

    fn read_new(&mut self) -> Result<Vec<Value>> {
        use std::io::Read;
        if self.file.is_none() {
            match std::fs::File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                // exec creates it when the job starts: wait for it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => anyhow::bail!("{}: {e}", self.path.display()),
            }
        }
        let f = self.file.as_mut().expect("opened above");
        f.read_to_end(&mut self.partial)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        let mut flows = Vec::new();
        for line in done.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            // A line that is not JSON (not an events file?) is skipped, not fatal: the view
            // is best effort, the file itself is the record.
            let Ok(e) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            if let Some(f) = self.count(e) {
                flows.push(f);
            }
        }
        Ok(flows)
    }

    /// Counts one event; a flow of the watched jobs is returned for the view.
    fn count(&mut self, e: Value) -> Option<Value> {
        let id = e["job"].as_str().unwrap_or("-").to_owned();
        let at = match self.jobs.iter().position(|(j, _)| *j == id) {
            Some(i) => i,
            None => {
                let row = serde_json::json!({"id": id, "mode": null, "flows": 0, "blocked": 0,
                                             "audited": 0, "step": null});
                self.jobs.push((id, row));
                self.jobs.len() - 1
            }
        };
        let row = &mut self.jobs[at].1;
        let bump = |row: &mut Value, k: &str| row[k] = (row[k].as_u64().unwrap_or(0) + 1).into();
        match e.get("type").and_then(Value::as_str) {
            None | Some("flow") => {
                self.counters[0] += 1;
                bump(row, "flows");
                match e["verdict"].as_str() {
                    Some("blocked") => {
                        self.counters[1] += 1;
                        bump(row, "blocked");
                    }
                    Some("audited") => {
                        self.counters[2] += 1;
                        bump(row, "audited");
                    }
                    _ => {}
                }
                return Some(e);
            }
            Some("job") => row["mode"] = e["mode"].clone(),
            Some("step") => row["step"] = e["step"].clone(),
            Some("dns") if e["bound"] == true => self.counters[3] += 1,
            _ => {}
        }
        None
    }

    fn status(&self) -> Value {
        let [flows, blocked, audited, bound] = self.counters;
        serde_json::json!({
            "kernel": format!("exec, following {}", self.path.display()),
            "attach": null,
            "uptime_s": self.started.elapsed().as_secs(),
            "counters": {"new_flows": flows, "blocked": blocked, "audited": audited,
                         "dns_bound": bound, "dns_refused": null, "ringbuf_drop": null},
            "jobs": self.jobs.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        })
    }
}

/// Flows kept for the terminal view.
const KEPT: usize = 500;

pub fn run(a: &WatchArgs) -> Result<i32> {
    let live = !a.plain && std::io::stdout().is_terminal();
    let end = a.duration.map(|s| Instant::now() + Duration::from_secs(s));
    let mut source = match &a.events {
        Some(p) => Source::File(FileFollow::new(p)),
        None => Source::Daemon { after: 0 },
    };
    let mut flows: VecDeque<Value> = VecDeque::new();
    let mut last: Option<(Instant, u64)> = None;
    let mut rate = 0.0;
    let mut missed_total = 0;
    let mut out = std::io::stdout().lock();
    loop {
        let (status, mut events, missed) = source.poll(a)?;
        if let Some(j) = &a.job {
            events.retain(|e| e["job"] == j.as_str());
        }
        missed_total += missed;
        let now = Instant::now();
        let new_flows = status["counters"]["new_flows"].as_u64().unwrap_or(0);
        if let Some((t, n)) = last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 {
                rate = new_flows.saturating_sub(n) as f64 / dt;
            }
        }
        last = Some((now, new_flows));
        if live {
            for e in events {
                if flows.len() >= KEPT {
                    flows.pop_front();
                }
                flows.push_back(e);
            }
            let (rows, cols) = term_size();
            let screen = render(
                &status,
                &flows,
                rate,
                missed_total,
                a.job.as_deref(),
                rows,
                cols,
            );
            out.write_all(screen.as_bytes())?;
        } else {
            if missed > 0 {
                writeln!(
                    out,
                    "# {missed} flows not shown (the daemon keeps the latest {})",
                    crate::agent::RECENT
                )?;
            }
            for e in &events {
                writeln!(out, "{}", flow_line(e))?;
            }
        }
        out.flush()?;
        if end.is_some_and(|e| Instant::now() >= e) {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(a.interval));
    }
}

/// Text from the network or a process, made safe for a terminal: a control character (an
/// escape sequence in a process name, a newline in a step label) becomes `?`.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A number of the status, `-` where it is not known.
fn num(v: &Value) -> String {
    if v.is_null() {
        "-".into()
    } else {
        v.to_string()
    }
}

fn field(e: &Value, k: &str) -> String {
    match &e[k] {
        Value::String(s) => clean(s),
        Value::Null => "-".into(),
        v => clean(&v.to_string()),
    }
}

/// One flow as a plain line: time, job, verdict, protocol, address:port, name, process,
/// reason, step.
pub fn flow_line(e: &Value) -> String {
    let dst = field(e, "dst");
    let dst = if dst.contains(':') {
        format!("[{dst}]")
    } else {
        dst
    };
    format!(
        "{} {} {} {} {}:{} {} {}({}) {} step={}",
        field(e, "ts"),
        field(e, "job"),
        field(e, "verdict").to_uppercase(),
        field(e, "proto"),
        dst,
        field(e, "port"),
        field(e, "domain"),
        field(e, "comm"),
        field(e, "pid"),
        field(e, "reason"),
        field(e, "step"),
    )
}

/// Rows and columns of the terminal on stdout (24x80 if it will not say).
fn term_size() -> (usize, usize) {
    // SAFETY: TIOCGWINSZ only writes the winsize it is given.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        (ws.ws_row as usize, ws.ws_col as usize)
    } else {
        (24, 80)
    }
}

const RED: &str = "\x1b[31;1m";
const YELLOW: &str = "\x1b[33m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

fn cut(s: &str, cols: usize) -> String {
    s.chars().take(cols).collect()
}

/// The whole screen: cursor home, cleared, then the view.
fn render(
    st: &Value,
    flows: &VecDeque<Value>,
    rate: f64,
    missed: u64,
    job: Option<&str>,
    rows: usize,
    cols: usize,
) -> String {
    let mut lines: Vec<String> = Vec::new();
    let c = &st["counters"];
    lines.push(format!(
        "{BOLD}{}{RESET}",
        cut(
            &format!(
                "ringfence watch{} — kernel {}, attach {}, up {} s   (Ctrl-C quits)",
                job.map(|j| format!(" --job {}", clean(j)))
                    .unwrap_or_default(),
                field(st, "kernel"),
                field(st, "attach"),
                num(&st["uptime_s"])
            ),
            cols
        )
    ));
    lines.push(cut(
        &format!(
            "flows/s {rate:.1}  new flows {}  blocked {}  audited {}  dns bound {}  dns refused {}  ring-buffer drops {}",
            num(&c["new_flows"]), num(&c["blocked"]), num(&c["audited"]), num(&c["dns_bound"]),
            num(&c["dns_refused"]), num(&c["ringbuf_drop"])
        ),
        cols,
    ));
    let maps: Vec<String> = st["maps"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| format!("{} {}/{}", field(m, "map"), m["entries"], m["capacity"]))
                .collect()
        })
        .unwrap_or_default();
    if st.get("maps").is_some() {
        lines.push(cut(&format!("maps: {}", maps.join("  ")), cols));
    } else {
        lines.push("maps: not known from an events file".to_string());
    }
    lines.push(String::new());
    lines.push(format!(
        "{BOLD}{}{RESET}",
        cut(
            &format!(
                "{:<24} {:<6} {:>7} {:>8} {:>8}  STEP",
                "JOB", "MODE", "FLOWS", "BLOCKED", "AUDITED"
            ),
            cols
        )
    ));
    for j in st["jobs"].as_array().cloned().unwrap_or_default() {
        if job.is_some_and(|id| j["id"] != id) {
            continue;
        }
        let l = cut(
            &format!(
                "{:<24} {:<6} {:>7} {:>8} {:>8}  {}",
                field(&j, "id"),
                field(&j, "mode"),
                j["flows"],
                j["blocked"],
                j["audited"],
                field(&j, "step")
            ),
            cols,
        );
        if j["blocked"].as_u64().unwrap_or(0) > 0 {
            lines.push(format!("{RED}{l}{RESET}"));
        } else {
            lines.push(l);
        }
    }
    lines.push(String::new());
    lines.push(format!(
        "{BOLD}{}{RESET}",
        cut(
            &if missed > 0 {
                format!("latest flows ({missed} came too fast to show)")
            } else {
                "latest flows".to_string()
            },
            cols
        )
    ));
    let room = rows.saturating_sub(lines.len() + 1).max(1);
    let start = flows.len().saturating_sub(room);
    for e in flows.iter().skip(start) {
        let l = cut(&flow_line(e), cols);
        match e["verdict"].as_str() {
            Some("blocked") => lines.push(format!("{RED}{l}{RESET}")),
            Some("audited") => lines.push(format!("{YELLOW}{l}{RESET}")),
            _ => lines.push(l),
        }
    }
    let mut s = String::from("\x1b[H\x1b[2J");
    s.push_str(&lines.join("\r\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_cannot_drive_the_terminal() {
        let e = serde_json::json!({"ts":"t","job":"j","verdict":"blocked","proto":"tcp",
            "dst":"2001:db8::1","port":443,"domain":"a\u{1b}[2Jb","comm":"x\ny","pid":3,
            "reason":"not-allowed","step":null});
        let l = flow_line(&e);
        assert_eq!(
            l,
            "t j BLOCKED tcp [2001:db8::1]:443 a?[2Jb x?y(3) not-allowed step=-"
        );
    }
}

#[cfg(test)]
mod follow_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_events_file_is_read_by_whole_lines_and_counted() {
        let dir = std::env::temp_dir().join(format!("rf-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ev.jsonl");
        let mut f = FileFollow::new(&path);
        assert!(f.read_new().unwrap().is_empty(), "no file yet: nothing");
        let mut w = std::fs::File::create(&path).unwrap();
        let flow = |v: &str| {
            format!(
                "{{\"ts\":\"t\",\"job\":\"j\",\"dst\":\"198.51.100.9\",\"port\":443,\"verdict\":\"{v}\"}}\n"
            )
        };
        write!(
            w,
            "{{\"type\":\"job\",\"job\":\"j\",\"mode\":\"block\"}}\n{}",
            flow("allowed")
        )
        .unwrap();
        // Half a line: not read until its newline comes.
        let half = flow("blocked");
        let (a, b) = half.split_at(20);
        w.write_all(a.as_bytes()).unwrap();
        assert_eq!(f.read_new().unwrap().len(), 1);
        w.write_all(b.as_bytes()).unwrap();
        write!(
            w,
            "{{\"type\":\"step\",\"job\":\"j\",\"step\":\"npm ci\"}}\nnot json\n"
        )
        .unwrap();
        let got = f.read_new().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["verdict"], "blocked");
        let st = f.status();
        assert_eq!(st["counters"]["new_flows"], 2);
        assert_eq!(st["counters"]["blocked"], 1);
        assert_eq!(st["jobs"][0]["mode"], "block");
        assert_eq!(st["jobs"][0]["step"], "npm ci");
        assert_eq!(st["jobs"][0]["blocked"], 1);
        let screen = render(&st, &got.into_iter().collect(), 0.0, 0, None, 24, 120);
        assert!(screen.contains("ring-buffer drops -"), "{screen}");
        assert!(screen.contains("maps: not known"), "{screen}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
