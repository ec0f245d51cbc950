//! Webhook notifications of blocked traffic and findings: Slack-compatible (`{"text": …}`)
//! or a generic JSON body, batched, rate-limited and retried with backoff from a thread of
//! their own.
//!
//! The event loop only `try_send`s into a bounded queue: a receiver that is down or slow
//! never holds up enforcement (the kernel's) or the events file (written before the notice
//! is queued). A full queue drops the notice and counts it; the count goes out with the next
//! batch that is delivered. A batch is retried until it is delivered (backoff doubling from
//! 0.5 s to 30 s), so nothing queued is lost while the receiver is down.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Notices waiting in the queue at most; more are dropped and counted.
pub const QUEUE: usize = 1024;
/// Notices in one POST at most.
pub const MAX_BATCH: usize = 200;
/// How long the first notice of a batch waits for others.
pub const BATCH_WINDOW: Duration = Duration::from_millis(500);
/// POSTs to one receiver at most once per this.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Lines of a Slack message listed one by one.
const SLACK_LINES: usize = 20;

/// The body a webhook is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// `{"text": "…"}`: Slack incoming webhooks, Mattermost, Rocket.Chat, Teams workflows.
    #[default]
    Slack,
    /// `{"source":"ringfence","host":…,"dropped":N,"events":[…]}`, events as in the events
    /// file.
    Json,
}

/// A webhook: where and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
}

impl Webhook {
    /// A webhook from the command line (`--webhook URL --webhook-format F`), its URL checked.
    pub fn from_flag(
        url: Option<&String>,
        format: WebhookFormat,
    ) -> Result<Option<Webhook>, String> {
        url.map(|url| {
            let w = Webhook {
                url: url.clone(),
                format,
            };
            w.check().map(|()| w)
        })
        .transpose()
    }

    /// The URL as logs show it: scheme, host and port. A chat webhook's path is its secret
    /// (whoever has a Slack hook URL may post to the channel).
    pub fn shown(&self) -> String {
        let (scheme, rest) = match self.url.split_once("://") {
            Some((s, r)) => (s, r),
            None => ("http", self.url.as_str()),
        };
        let host = rest.split('/').next().unwrap_or("");
        format!("{scheme}://{host}/…")
    }

    /// http:// or https:// (rustls; the host's certificate store, which `SSL_CERT_FILE` or
    /// `SSL_CERT_DIR` may point elsewhere, e.g. at a private CA).
    pub fn check(&self) -> Result<(), String> {
        let u = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"))
            .ok_or_else(|| format!("webhook {:?}: not an http:// or https:// URL", self.url))?;
        if u.is_empty() || u.starts_with('/') {
            return Err(format!("webhook {:?}: no host", self.url));
        }
        Ok(())
    }
}

/// The loop's end of a webhook: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<Value>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Notices queued or in a batch not yet delivered.
    pending: AtomicU64,
    /// Notices dropped (queue full) and not yet said in a delivered batch.
    dropped: AtomicU64,
    delivered: AtomicU64,
    batches: AtomicU64,
    failures: AtomicU64,
}

impl Sink {
    /// Starts the sender thread for `hook`.
    pub fn start(hook: Webhook) -> std::io::Result<Sink> {
        let (tx, rx) = sync_channel(QUEUE);
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || sender(hook, rx, s))?;
        Ok(Sink { tx, shared })
    }

    /// Queues a notice (an event as the events file has it); a full queue counts it.
    pub fn send(&self, ev: Value) {
        self.shared.pending.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.pending.fetch_sub(1, Ordering::Relaxed);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits up to `timeout` for everything queued to be delivered (`exec` before it exits);
    /// false if some was not.
    pub fn flush(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.shared.pending.load(Ordering::Relaxed) > 0 {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// (delivered notices, delivered batches, failed POSTs, dropped notices not yet said).
    pub fn stats(&self) -> (u64, u64, u64, u64) {
        let s = &self.shared;
        (
            s.delivered.load(Ordering::Relaxed),
            s.batches.load(Ordering::Relaxed),
            s.failures.load(Ordering::Relaxed),
            s.dropped.load(Ordering::Relaxed),
        )
    }
}

/// Whether an event is notified: a blocked flow, or a finding.
pub fn wanted(ev: &crate::trail::events::Event) -> bool {
    use crate::trail::events::{Event, Verdict};
    match ev {
        Event::Flow(f) => f.verdict == Verdict::Blocked,
        Event::Finding(_) => true,
        _ => false,
    }
}

fn sender(hook: Webhook, rx: Receiver<Value>, s: Arc<Shared>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut batch: Vec<Value> = Vec::new();
    let mut last_post: Option<Instant> = None;
    let mut backoff = BACKOFF_FIRST;
    let mut retry_at: Option<Instant> = None;
    // Every Sink is gone (the job ended) while a batch waits: it is tried a while longer.
    let mut orphan = false;
    loop {
        // Gather: block while idle, else until the batch is due.
        if batch.is_empty() {
            match rx.recv() {
                Ok(v) => batch.push(v),
                Err(_) => return, // every Sink is gone
            }
        }
        let mut due = Instant::now() + BATCH_WINDOW;
        if let Some(t) = last_post {
            due = due.max(t + MIN_INTERVAL);
        }
        if let Some(t) = retry_at {
            due = due.max(t);
        }
        while batch.len() < MAX_BATCH {
            let now = Instant::now();
            if now >= due {
                break;
            }
            match rx.recv_timeout(due - now) {
                Ok(v) => batch.push(v),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    orphan = true;
                    break;
                }
            }
        }
        let dropped = s.dropped.load(Ordering::Relaxed);
        let body = render(hook.format, &host, &batch, dropped);
        last_post = Some(Instant::now());
        let r = agent
            .post(&hook.url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        match r {
            Ok(_) => {
                let n = batch.len() as u64;
                s.dropped.fetch_sub(dropped, Ordering::Relaxed);
                s.delivered.fetch_add(n, Ordering::Relaxed);
                s.batches.fetch_add(1, Ordering::Relaxed);
                s.pending.fetch_sub(n, Ordering::Relaxed);
                batch.clear();
                backoff = BACKOFF_FIRST;
                retry_at = None;
            }
            Err(e) => {
                s.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    url = hook.shown(),
                    notices = batch.len(),
                    "webhook not delivered ({e}); retrying in {backoff:?}"
                );
                if orphan && backoff == BACKOFF_MAX {
                    tracing::warn!(
                        url = hook.shown(),
                        notices = batch.len(),
                        "webhook: giving up on a batch of an ended job (its events file has them)"
                    );
                    return;
                }
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Slack's mrkdwn reads `<…>` as links and mentions: escaped as its docs say.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn line_of(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let job = s("job");
    let step = v["step"]
        .as_str()
        .map(|x| format!(" (step {x})"))
        .unwrap_or_default();
    if v.get("signal").is_some() {
        format!(
            "job {job}{step}: finding {} {}: {}",
            s("signal"),
            s("domain"),
            s("example")
        )
    } else {
        let to = match v["domain"].as_str() {
            Some(d) => format!("{d} ({})", s("dst")),
            None => s("dst"),
        };
        format!(
            "job {job}{step}: blocked {} to {to} port {} from {} (pid {}): {}",
            s("proto"),
            v["port"],
            s("comm"),
            v["pid"],
            s("reason")
        )
    }
}

/// The POST body of a batch.
pub fn render(format: WebhookFormat, host: &str, batch: &[Value], dropped: u64) -> Value {
    match format {
        WebhookFormat::Json => json!({
            "source": "ringfence",
            "host": host,
            "dropped": dropped,
            "events": batch,
        }),
        WebhookFormat::Slack => {
            let mut text = format!(
                "ringfence on {}: {} blocked call(s) or finding(s)",
                slack_escape(host),
                batch.len()
            );
            for v in batch.iter().take(SLACK_LINES) {
                text.push_str("\n• ");
                text.push_str(&slack_escape(&line_of(v)));
            }
            if batch.len() > SLACK_LINES {
                text.push_str(&format!("\n… and {} more", batch.len() - SLACK_LINES));
            }
            if dropped > 0 {
                text.push_str(&format!(
                    "\n({dropped} notices were dropped: the queue was full; the events files have them)"
                ));
            }
            json!({ "text": text })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_text_is_escaped_and_bounded() {
        let ev = json!({"job":"j","step":null,"proto":"tcp","dst":"198.51.100.9","port":443,
            "domain":"<!channel>.evil","comm":"curl","pid":7,"reason":"not-allowed"});
        let batch: Vec<Value> = (0..25).map(|_| ev.clone()).collect();
        let b = render(WebhookFormat::Slack, "h", &batch, 3);
        let t = b["text"].as_str().unwrap();
        assert!(t.contains("blocked tcp to &lt;!channel&gt;.evil (198.51.100.9) port 443 from curl (pid 7): not-allowed"), "{t}");
        assert!(!t.contains('<'), "{t}");
        assert!(
            t.contains("… and 5 more") && t.contains("3 notices were dropped"),
            "{t}"
        );
        let j = render(WebhookFormat::Json, "h", &batch, 0);
        assert_eq!(j["events"].as_array().unwrap().len(), 25);
    }

    #[test]
    fn http_and_https_urls_only() {
        let w = |u: &str| Webhook {
            url: u.into(),
            format: WebhookFormat::Slack,
        };
        assert!(w("http://127.0.0.1:9/x").check().is_ok());
        assert!(w("https://hooks.example/x").check().is_ok());
        assert!(w("ftp://hooks.example/x").check().is_err());
        assert!(w("https:///x").check().is_err());
        assert!(w("http:///x").check().is_err());
        assert_eq!(
            w("http://hooks.example:8080/services/T0/B0/secret").shown(),
            "http://hooks.example:8080/…"
        );
        assert_eq!(
            w("https://hooks.slack.com/services/T0/B0/secret").shown(),
            "https://hooks.slack.com/…"
        );
    }
}
