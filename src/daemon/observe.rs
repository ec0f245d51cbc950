//! What the daemon shows of itself while it runs: the Prometheus exposition text (see
//! [`crate::daemon::metrics`]) and the answer to `ringfence watch`'s polls.
use std::time::Instant;

use anyhow::Result;

use super::{unknown_job, Daemon, COUNTER_NAMES};
use crate::daemon::protocol::Response;
use crate::job::spec::mode_name;

impl Daemon {
    /// `ringfence watch`'s poll: what the ring buffer holds is read first.
    pub(super) fn watch(
        &mut self,
        job: Option<&str>,
        after: u64,
        rb: &libbpf_rs::RingBuffer,
    ) -> Result<Response> {
        if let Some(id) = job {
            if !self.jobs.contains_key(id) {
                return Err(unknown_job(id));
            }
        }
        let _ = rb.consume();
        self.agent.borrow_mut().apply(&self.dp);
        let status = self.status();
        let a = self.agent.borrow();
        let r = a.recent.as_ref().expect("the daemon keeps recent events");
        let oldest = r.events.front().map_or(r.seq + 1, |(s, _)| *s);
        // A first poll gets the latest few, not the whole backlog.
        let after = if after == 0 {
            r.seq.saturating_sub(50)
        } else {
            after
        };
        let missed = oldest.saturating_sub(after + 1);
        let events = r
            .events
            .iter()
            .filter(|(s, _)| *s > after)
            .filter(|(_, e)| job.is_none_or(|j| e.job() == j))
            .filter_map(|(_, e)| serde_json::to_value(e).ok())
            .collect();
        Ok(Response::Watch {
            status,
            cursor: r.seq,
            events,
            missed,
        })
    }

    /// The Prometheus exposition text (see [`crate::daemon::metrics`]).
    pub(super) fn metrics_text(&self) -> String {
        let t0 = Instant::now();
        let mut t = crate::daemon::metrics::Text::default();
        let values = self.counters();
        for (c, n) in COUNTER_NAMES {
            let name = format!("ringfence_kernel_{n}_total");
            t.family(
                &name,
                "counter",
                &format!("The dataplane's counter {n} (enum rf_counter in bpf/abi.h), all jobs and the host policy together"),
            );
            t.sample(&name, &[], values[c.0 as usize]);
        }
        let a = self.agent.borrow();
        let jobs: Vec<(&str, &str, crate::trail::report::JobMetrics)> = self
            .state
            .jobs
            .iter()
            .map(|r| {
                let m = a
                    .jobs
                    .get(&r.slot)
                    .map(|j| j.report.metrics())
                    .unwrap_or_default();
                (r.id.as_str(), mode_name(self.jobs[&r.id].policy.mode), m)
            })
            .collect();
        type Field = fn(&crate::trail::report::JobMetrics) -> usize;
        let per_job: [(&str, &str, Field); 8] = [
            ("flows", "New flows of the job (every verdict)", |m| m.flows),
            ("flows_allowed", "The job's flows its policy allowed", |m| {
                m.allowed
            }),
            ("flows_blocked", "The job's flows that were blocked", |m| {
                m.blocked
            }),
            (
                "flows_audited",
                "The job's flows that would have been blocked (audit mode let them pass)",
                |m| m.audited,
            ),
            ("dns_answers", "DNS answers the job received", |m| {
                m.dns_answers
            }),
            (
                "dns_answers_bound",
                "DNS answers whose addresses the kernel bound to the job's policy",
                |m| m.dns_answers_bound,
            ),
            (
                "dns_queries_refused",
                "DNS queries of the job refused in the kernel (name not allowed)",
                |m| m.dns_queries_refused,
            ),
            (
                "findings",
                "Distinct findings of the job (DNS exfiltration, process and dataplane alerts)",
                |m| m.findings,
            ),
        ];
        for (n, help, f) in per_job {
            let name = format!("ringfence_job_{n}_total");
            t.family(&name, "counter", help);
            for (id, mode, m) in &jobs {
                t.sample(&name, &[("job", id), ("mode", mode)], f(m));
            }
        }
        t.family("ringfence_jobs", "gauge", "Jobs running");
        t.sample("ringfence_jobs", &[], jobs.len());
        t.family(
            "ringfence_decode_errors_total",
            "counter",
            "Ring buffer records the daemon could not decode",
        );
        t.sample("ringfence_decode_errors_total", &[], a.decode_errors);
        drop(a);
        t.family("ringfence_map_entries", "gauge", "Entries in each BPF map");
        let fill = self.dp.map_fill();
        for (m, e, _) in &fill {
            t.sample("ringfence_map_entries", &[("map", m)], e);
        }
        t.family(
            "ringfence_map_capacity_entries",
            "gauge",
            "Each BPF map's capacity (max_entries)",
        );
        for (m, _, c) in &fill {
            t.sample("ringfence_map_capacity_entries", &[("map", m)], c);
        }
        t.family(
            "ringfence_attach_info",
            "gauge",
            "How the programs are attached (tcx or clsact), on which kernel; 1",
        );
        t.sample(
            "ringfence_attach_info",
            &[
                ("attach", self.dp.attach_kind().name()),
                ("kernel", &self.dp.kernel().release),
                ("adopted", if self.dp.adopted() { "true" } else { "false" }),
            ],
            1,
        );
        t.family(
            "ringfence_process_watch_attached",
            "gauge",
            "1 when the process watch (ptrace of processes outside jobs) is attached",
        );
        t.sample(
            "ringfence_process_watch_attached",
            &[],
            u8::from(self.watch_failed.is_empty()),
        );
        // The host's webhooks, by their place in the config (a URL may hold a secret).
        let hooks: Vec<(String, (u64, u64, u64, u64))> = self
            .webhooks
            .iter()
            .enumerate()
            .map(|(i, w)| (i.to_string(), w.stats()))
            .collect();
        type Stat = fn(&(u64, u64, u64, u64)) -> u64;
        let stats: [(&str, &str, Stat); 4] = [
            (
                "notices_delivered",
                "Notices the host's webhook took",
                |s| s.0,
            ),
            ("batches_delivered", "POSTs the host's webhook took", |s| {
                s.1
            }),
            (
                "post_failures",
                "POSTs to the host's webhook that failed (each retried)",
                |s| s.2,
            ),
            (
                "notices_dropped",
                "Notices dropped with the queue full, not yet said in a delivered batch",
                |s| s.3,
            ),
        ];
        for (n, help, f) in stats {
            let name = format!("ringfence_webhook_{n}_total");
            t.family(&name, "counter", help);
            for (i, s) in &hooks {
                t.sample(&name, &[("webhook", i)], f(s));
            }
        }
        t.family(
            "ringfence_uptime_seconds",
            "gauge",
            "Seconds since the daemon started",
        );
        t.sample(
            "ringfence_uptime_seconds",
            &[],
            self.started.elapsed().as_secs(),
        );
        t.family(
            "ringfence_metrics_render_seconds",
            "gauge",
            "Time the event loop took to render this snapshot",
        );
        t.sample(
            "ringfence_metrics_render_seconds",
            &[],
            t0.elapsed().as_secs_f64(),
        );
        t.0
    }
}
