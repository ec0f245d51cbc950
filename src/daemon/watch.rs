//! `ringfence watch`: a live view of the daemon's jobs and their flows as they open. It
//! polls the control socket (`watch` requests: the status and the flow events numbered after
//! the last it saw), so it needs nothing but the socket, and a slow terminal never holds up
//! the daemon. On a terminal the view is redrawn in place (counters, jobs, the latest flows,
//! blocked ones in red, audited ones in yellow); otherwise each flow is one plain line.
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
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Flows kept for the terminal view.
const KEPT: usize = 500;

pub fn run(a: &WatchArgs) -> Result<i32> {
    let live = !a.plain && std::io::stdout().is_terminal();
    let end = a.duration.map(|s| Instant::now() + Duration::from_secs(s));
    let mut after = 0;
    let mut flows: VecDeque<Value> = VecDeque::new();
    let mut last: Option<(Instant, u64)> = None;
    let mut rate = 0.0;
    let mut missed_total = 0;
    let mut out = std::io::stdout().lock();
    loop {
        let r = call(
            &a.socket.socket,
            &Request::Watch {
                job: a.job.clone(),
                after,
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
        after = cursor;
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
                st["uptime_s"]
            ),
            cols
        )
    ));
    lines.push(cut(
        &format!(
            "flows/s {rate:.1}  new flows {}  blocked {}  audited {}  dns bound {}  dns refused {}  ring-buffer drops {}",
            c["new_flows"], c["blocked"], c["audited"], c["dns_bound"], c["dns_refused"], c["ringbuf_drop"]
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
    lines.push(cut(&format!("maps: {}", maps.join("  ")), cols));
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
