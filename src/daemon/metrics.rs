//! The Prometheus endpoint (`metrics` / `metrics-socket` in the daemon's config): the text
//! exposition format (version 0.0.4) over HTTP, on TCP and/or a Unix socket.
//!
//! The event loop renders a snapshot once a second ([`Exporter::due`]) and hands it over; a
//! thread per listener answers scrapers from the last snapshot. The loop never waits on a
//! scraper (a slow or stuck one holds only its listener's thread, and only until its 2 s
//! timeout), and a scrape never waits on the loop. Counting map entries walks every map's
//! keys, which is too slow to do per scrape but fine once a second.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How often the loop renders a snapshot.
pub const REFRESH: Duration = Duration::from_secs(1);
/// A scraper that has not sent its request, or read the answer, by then is dropped.
const CONN_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head read.
const MAX_HEAD: usize = 8192;

pub struct Exporter {
    text: Arc<Mutex<String>>,
    next: Instant,
    socket: Option<PathBuf>,
}

impl Exporter {
    /// Binds the listeners (errors name the address) and starts their threads; None when
    /// neither is configured.
    pub fn start(tcp: Option<&str>, unix: Option<&Path>) -> Result<Option<Exporter>> {
        if tcp.is_none() && unix.is_none() {
            return Ok(None);
        }
        let text = Arc::new(Mutex::new(String::new()));
        if let Some(a) = tcp {
            let l = std::net::TcpListener::bind(a)
                .with_context(|| format!("binding the metrics address {a} (config `metrics`)"))?;
            let t = text.clone();
            std::thread::Builder::new()
                .name("metrics-tcp".into())
                .spawn(move || {
                    for s in l.incoming().flatten() {
                        let _ = s.set_read_timeout(Some(CONN_TIMEOUT));
                        let _ = s.set_write_timeout(Some(CONN_TIMEOUT));
                        answer(s, &t);
                    }
                })?;
        }
        if let Some(p) = unix {
            let _ = std::fs::remove_file(p);
            // Created 0600, like the control socket: job ids and counts are for root.
            let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            let l = std::os::unix::net::UnixListener::bind(p);
            nix::sys::stat::umask(old);
            let l = l.with_context(|| {
                format!(
                    "binding the metrics socket {} (config `metrics-socket`)",
                    p.display()
                )
            })?;
            let t = text.clone();
            std::thread::Builder::new()
                .name("metrics-unix".into())
                .spawn(move || {
                    for s in l.incoming().flatten() {
                        let _ = s.set_read_timeout(Some(CONN_TIMEOUT));
                        let _ = s.set_write_timeout(Some(CONN_TIMEOUT));
                        answer(s, &t);
                    }
                })?;
        }
        Ok(Some(Exporter {
            text,
            next: Instant::now(),
            socket: unix.map(Path::to_path_buf),
        }))
    }

    /// Whether a new snapshot is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    pub fn publish(&mut self, text: String) {
        *self.text.lock().unwrap_or_else(|e| e.into_inner()) = text;
        self.next = Instant::now() + REFRESH;
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One HTTP/1.x exchange: `GET /metrics` (or `/`) gets the snapshot, anything else 404 or
/// 405; then the connection closes.
fn answer<S: Read + Write>(mut s: S, text: &Mutex<String>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            break;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics" | "/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            text.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    let _ = s.write_all(out.as_bytes());
}

/// The exposition text, one family at a time.
#[derive(Default)]
pub struct Text(pub String);

impl Text {
    /// `# HELP` and `# TYPE` of a family (`kind`: counter, gauge).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        use std::fmt::Write as _;
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        use std::fmt::Write as _;
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
pub fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A HELP text: backslash and newline escaped.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        let mut t = Text::default();
        t.family("x_total", "counter", "a\\b\nc");
        t.sample("x_total", &[("job", "a\"b\\c\nd"), ("m", "z")], 3);
        assert_eq!(
            t.0,
            "# HELP x_total a\\\\b\\nc\n# TYPE x_total counter\nx_total{job=\"a\\\"b\\\\c\\nd\",m=\"z\"} 3\n"
        );
    }

    #[test]
    fn http_answers() {
        let text = Mutex::new("a 1\n".to_string());
        let mut c = std::io::Cursor::new(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec());
        struct Rw<'a>(&'a mut std::io::Cursor<Vec<u8>>, Vec<u8>);
        impl Read for Rw<'_> {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                self.0.read(b)
            }
        }
        impl Write for Rw<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut rw = Rw(&mut c, Vec::new());
        answer(&mut rw, &text);
        let out = String::from_utf8(rw.1).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\na 1\n"), "{out}");
    }
}
