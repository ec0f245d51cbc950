//! DNS over TCP with a real server (dnsmasq) and a real client (dig +tcp): answers bind in
//! the kernel before the client reads them, and in block mode a query for an unlisted
//! name is answered REFUSED on the spot — over TCP too — and never reaches the server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ringfence::testbed::{link_v4, DnsRecord};

#[test]
fn tcp_answer_binds_before_the_connection() {
    let ip = link_v4(25);
    let tb = testbed(&[DnsRecord::a("tcp.test", ip)], &[sa(ip, 80)]);
    // Resolve over TCP only, then connect to what it returned: the connection passes only
    // if the TCP answer was bound in the kernel.
    let script = "set -e; a=$(dig +tcp +short +tries=1 +time=3 tcp.test | tail -n 1); \
                  curl -sS --connect-timeout 3 --max-time 5 http://$a/";
    let job = exec(
        &tb,
        &["--mode", "block", "--allow", "tcp.test:80"],
        &["sh", "-c", script],
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    assert_eq!(job.stdout, format!("hello from {ip}:80\n"));
    let flow = job.expect_flow(ip.into(), 80, "allowed", "allowed");
    assert_eq!(flow["domain"], "tcp.test", "{}", job.dump());
    assert_eq!(tb.http_hits(sa(ip, 80)), 1);
}

#[test]
fn unlisted_tcp_query_is_refused_at_once_and_never_sent() {
    let ip = link_v4(26);
    let tb = testbed(&[DnsRecord::a("leak.test", ip)], &[]);
    let started = Instant::now();
    let job = exec(
        &tb,
        &["--mode", "block", "--allow", "ok.test:80"],
        &["dig", "+tcp", "+tries=1", "+time=5", "c2VjcmV0.leak.test"],
    );
    let took = started.elapsed();
    assert!(
        job.stdout.contains("status: REFUSED"),
        "dig did not get REFUSED\n{}",
        job.dump()
    );
    assert!(
        took < Duration::from_secs(3),
        "REFUSED took {took:?}: the client waited\n{}",
        job.dump()
    );
    assert_eq!(
        tb.dns_queries_for("c2VjcmV0.leak.test"),
        0,
        "the name reached the server"
    );
    assert!(
        job.events
            .iter()
            .any(|e| e["reason"] == "dns-query" && e["domain"] == "c2vjcmv0.leak.test"),
        "no dns-query finding\n{}",
        job.dump()
    );
}

#[test]
fn unlisted_udp_query_is_refused_within_50ms() {
    let tb = testbed(&[DnsRecord::a("leak.test", link_v4(27))], &[]);
    // dig prints its own measurement of the round trip.
    let job = exec(
        &tb,
        &["--mode", "block", "--allow", "ok.test:80"],
        &["dig", "+tries=1", "+time=5", "x1y2z3.leak.test"],
    );
    assert!(job.stdout.contains("status: REFUSED"), "{}", job.dump());
    let ms: u64 = job
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix(";; Query time: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no query time\n{}", job.dump()));
    assert!(ms < 50, "REFUSED took {ms} ms\n{}", job.dump());
    assert_eq!(
        tb.dns_queries_for("x1y2z3.leak.test"),
        0,
        "the name reached the server"
    );
}
