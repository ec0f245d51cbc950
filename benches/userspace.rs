//! Userspace costs on the agent's path, with criterion: DNS answer parsing, policy name
//! matching against 1k patterns, and flow event decode + attribution. No root needed.
//!
//! `bench/run` runs these with a short measurement time and reads criterion's estimates
//! (target/criterion/*/new/estimates.json); `cargo bench --bench userspace` runs them in full.
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringfence::agent::{Agent, JobState};
use ringfence::kernel::abi;
use ringfence::policy::Policy;
use ringfence::testkit::testrun::{dns_answer, Rr};

const JOB: u32 = 7;

fn aaaa(i: u32) -> [u8; 16] {
    let mut o = "2001:db8:aaaa::".parse::<Ipv6Addr>().unwrap().octets();
    o[12..16].copy_from_slice(&i.to_be_bytes());
    o
}

fn dns(c: &mut Criterion) {
    let mut g = c.benchmark_group("dns_parse");
    for n in [1u32, 8, 64] {
        let rrs: Vec<Rr> = (0..n)
            .map(|k| Rr::Aaaa("registry.bench.test", 300, aaaa(k)))
            .collect();
        let msg = dns_answer(0x1234, "registry.bench.test", 28, &rrs);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(n), &msg, |b, m| {
            b.iter(|| ringfence::trail::dns::parse(black_box(m)).is_ok())
        });
    }
    g.finish();
}

/// 1k patterns in the shapes policies have: exact names, `*.suffix` and label globs.
fn thousand_patterns() -> String {
    (0..1000)
        .map(|i| match i % 3 {
            0 => format!("svc{i}.example{}.test:443", i % 17),
            1 => format!("*.cdn{i}.bench.test"),
            _ => format!("blob{i}*.store{}.bench.test:443", i % 13),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn policy(c: &mut Criterion) {
    let policy = Policy {
        endpoints: Policy::parse_endpoints(&thousand_patterns(), "bench")
            .expect("1k patterns parse"),
        ..Default::default()
    };
    let mut g = c.benchmark_group("policy_allows_1k");
    g.throughput(Throughput::Elements(1));
    // A hit deep in the list, a wildcard hit, and a miss (the worst case: every pattern).
    for (label, name, port) in [
        ("exact-hit", "svc999.example13.test", 443u16),
        ("wildcard-hit", "a.b.cdn997.bench.test", 443),
        ("miss", "attacker.evil.test", 443),
    ] {
        g.bench_function(label, |b| {
            b.iter(|| policy.allows(black_box(name), black_box(port)))
        });
    }
    g.finish();
}

fn flow_event(i: u64) -> Vec<u8> {
    let mut ev = abi::rf_flow_event::default();
    ev.hdr.r#type = abi::rf_event_type::RF_EVENT_FLOW.0;
    ev.hdr.job_id = JOB;
    ev.hdr.ts_ns = 1_000_000_000 + i;
    ev.cgroup_id = 4242;
    ev.pid = 1234;
    ev.saddr = abi::addr_to_bytes("2001:db8:ffff::1".parse().unwrap());
    let d: IpAddr = IpAddr::V6(Ipv6Addr::from(aaaa(i as u32)));
    ev.daddr = abi::addr_to_bytes(d);
    ev.sport = 40000 + (i % 20000) as u16;
    ev.dport = 443;
    ev.proto = 6;
    abi::bytes_of(&ev).to_vec()
}

fn events(c: &mut Criterion) {
    let evs: Vec<Vec<u8>> = (0..1024).map(flow_event).collect();
    let mut g = c.benchmark_group("event");
    g.throughput(Throughput::Elements(1));
    // Decode + attribution (job, step, domain) + report, no output.
    let mut agent = Agent::new(None, Duration::ZERO, Duration::from_secs(30)).unwrap();
    agent
        .jobs
        .insert(JOB, JobState::new("bench", "block", None));
    let mut i = 0usize;
    g.bench_function("decode_attribute", |b| {
        b.iter(|| {
            agent.handle(black_box(&evs[i & 1023]));
            i += 1;
        })
    });
    // The same plus JSON serialization and the (buffered) write to /dev/null.
    let mut agent = Agent::new(
        Some(std::path::Path::new("/dev/null")),
        Duration::ZERO,
        Duration::from_secs(30),
    )
    .unwrap();
    agent
        .jobs
        .insert(JOB, JobState::new("bench", "block", None));
    g.bench_function("decode_attribute_write", |b| {
        b.iter(|| {
            agent.handle(black_box(&evs[i & 1023]));
            i += 1;
        })
    });
    g.finish();
}

fn config() -> Criterion {
    // bench/run sets RFBENCH_CRITERION_SECS for a short pass; the default is criterion's.
    let c = Criterion::default();
    match std::env::var("RFBENCH_CRITERION_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        Some(s) => c
            .measurement_time(Duration::from_secs_f64(s))
            .warm_up_time(Duration::from_secs_f64((s / 4.0).max(0.05)))
            .sample_size(20),
        None => c,
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = dns, policy, events
}
criterion_main!(benches);
