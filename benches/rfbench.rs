//! The kernel-side benchmarks of bench/run: one binary, one subcommand per measurement.
//! It needs root and a real kernel, so it is not a criterion bench; `cargo bench` runs its
//! quick per-packet pass (and says so when it cannot).
//!
//!   rfbench dataplane [--quick] [--json FILE]   per-packet cost, BPF_PROG_TEST_RUN
//!   rfbench pipeline  [--quick] [--json FILE]   ring buffer -> agent -> JSON Lines, drop point
//!   rfbench memory    [--quick] [--json FILE]   agent RSS and BPF map memory at 1M addresses
//!   rfbench churn     [--quick] [--json FILE]   agent RSS over 200k names that come and go
//!   rfbench policy    [--quick] [--json FILE]   parse+compile and load of 1k..1M-entry
//!                     policies (benches/rfbench/policy.rs)
//!   rfbench daemon --ringfence PATH [--quick] [--json FILE]   `ringfence run` from outside:
//!                     job start/end latency and leaks, memory at 0/32/256 jobs, events
//!                     under load (benches/rfbench/daemon.rs)
//!   rfbench verifier [--baseline FILE] [--record] [--json FILE]   instructions the
//!                     verifier processed per program, against bench/verifier.json
//!                     (benches/rfbench/verifier.rs)
//!   rfbench xdp [--quick] [--secs S] [--rounds N] [--json FILE]   an interface job's
//!                     64-byte UDP packets/s on a veth: XDP pre-judge against TC alone
//!                     (benches/rfbench/xdp.rs)
//!   rfbench resolve SERVER:PORT NAMES_FILE [--expect-allow N]   look every name up, many
//!                     at once (a ringfence job learns the answers); check its allow trie
//!                     (benches/rfbench/resolve.rs)
//!   rfbench connect-server ADDR:PORT SECONDS    accept and close, until SECONDS pass
//!   rfbench connect-client ADDR:PORT SECONDS MAX   connect/close loop; prints conns/s
//!
//! Every cost is printed beside the empty TC program measured in the same run, on the same
//! frames with the same repeat count, as a difference (ns) and a ratio.
//!
//! Addresses: every frame and trie entry is in 2001:db8::/32 (documentation space), so the
//! 1M-entry tries are spread over random-looking addresses, not a dense block.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ringfence::agent::{Agent, JobState};
use ringfence::kernel::abi;
use ringfence::kernel::capacity::Capacity;
use ringfence::kernel::dataplane::{Dataplane, Options};
use ringfence::policy::{Compiled, Mode, Policy, PortSet};
use ringfence::testkit::testrun::{
    self, dns_answer, dns_query, frame, run_tc, Rr, TCP_ACK, TCP_SYN,
};
use serde_json::{json, Value};

#[path = "rfbench/daemon.rs"]
mod daemon;
#[path = "rfbench/policy.rs"]
mod policy;
#[path = "rfbench/resolve.rs"]
mod resolve;
#[path = "rfbench/verifier.rs"]
mod verifier;
#[path = "rfbench/xdp.rs"]
mod xdp;

const USAGE: &str =
    "usage: rfbench dataplane|pipeline|memory|churn|policy [--quick] [--json FILE] \
     | daemon --ringfence PATH [--quick] [--json FILE] \
     | verifier [--baseline FILE] [--record] [--json FILE] \
     | xdp [--quick] [--secs S] [--rounds N] [--json FILE] \
     | resolve SERVER:PORT NAMES_FILE [--expect-allow N] \
     | connect-server ADDR:PORT SECS | connect-client ADDR:PORT SECS MAX";

const LO: u32 = 1;
const JOB: u32 = 7;
const DNS_NAME: &str = "bench.test";

fn client() -> IpAddr {
    "2001:db8:ffff::1".parse().unwrap()
}

fn resolver() -> IpAddr {
    "2001:db8:ffff::53".parse().unwrap()
}

/// splitmix64: a fixed, well-spread sequence, so runs are comparable.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The i-th allowed destination: 2001:db8: followed by 96 scattered bits. Never collides
/// with client(), resolver() or the DNS answer addresses (those have 0xffff / 0xaaaa next).
fn dest(i: u64) -> IpAddr {
    let a = mix(i);
    let b = mix(i ^ 0x5555_5555);
    let mut o = [0u8; 16];
    o[0..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    o[4..12].copy_from_slice(&a.to_be_bytes());
    o[12..16].copy_from_slice(&(b as u32).to_be_bytes());
    if o[4] == 0xff || o[4] == 0xaa {
        o[4] = 0x11;
    }
    IpAddr::V6(Ipv6Addr::from(o))
}

/// A destination that is in no trie: the blocked case.
fn stranger(i: u64) -> IpAddr {
    let mut o = abi::addr_to_bytes(dest(i));
    o[4] = 0xee;
    IpAddr::V6(Ipv6Addr::from(o))
}

fn answer_addr(i: u32) -> [u8; 16] {
    let mut o: [u8; 16] = "2001:db8:aaaa::".parse::<Ipv6Addr>().unwrap().octets();
    o[12..16].copy_from_slice(&i.to_be_bytes());
    o
}

struct Args {
    quick: bool,
    json: Option<String>,
    rest: Vec<String>,
}

fn parse_args(v: &[String]) -> Args {
    let mut a = Args {
        quick: false,
        json: None,
        rest: vec![],
    };
    let mut it = v.iter();
    while let Some(s) = it.next() {
        match s.as_str() {
            "--quick" => a.quick = true,
            "--json" => a.json = it.next().cloned(),
            "--bench" => {}
            _ => a.rest.push(s.clone()),
        }
    }
    a
}

fn write_json(path: &Option<String>, v: &Value) -> Result<()> {
    if let Some(p) = path {
        let mut f = std::fs::File::create(p).with_context(|| format!("creating {p}"))?;
        serde_json::to_writer_pretty(&mut f, v)?;
        f.write_all(b"\n")?;
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = parse_args(&argv);
    // Flags cargo may pass (`--test-threads=2`, `--nocapture`…) are not subcommands.
    let cmd = args.rest.first().filter(|c| !c.starts_with('-')).cloned();
    match cmd.as_deref() {
        Some("dataplane") => dataplane(&args),
        Some("pipeline") => pipeline(&args),
        Some("memory") => memory(&args),
        Some("churn") => churn(&args),
        Some("policy") => policy::policy(&args),
        Some("daemon") => daemon::daemon(&args),
        Some("verifier") => verifier::verifier(&args),
        Some("xdp") => xdp::xdp(&args),
        Some("resolve") => resolve::resolve(&args.rest[1..]),
        Some("daemon-sender") => daemon::sender_main(&args.rest[1..]),
        Some("connect-server") => connect_server(&args.rest[1..]),
        Some("connect-client") => connect_client(&args.rest[1..]),
        // `cargo bench`: the quick per-packet pass, when it can run at all.
        None if argv.iter().any(|a| a == "--bench") => {
            if !is_root() {
                eprintln!("rfbench: skipped under `cargo bench`: needs root (bench/run runs it)");
                return Ok(());
            }
            dataplane(&Args {
                quick: true,
                json: None,
                rest: vec![],
            })
        }
        // `cargo test --benches` and friends: nothing to do, and not an error.
        None => {
            eprintln!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown subcommand {other:?}\n{USAGE}"),
    }
}

// ---------------------------------------------------------------------------------------
// Per-packet cost
// ---------------------------------------------------------------------------------------

/// Loads a dataplane whose trie holds `entries` host entries for JOB (plus `extra` free
/// slots for DNS answers), the job keyed on loopback in block mode.
/// A block-mode job that sends every DNS query on (no in-kernel REFUSED), as the
/// benchmarks measure verdicts and binding, not query filtering.
fn block_job(job_id: u32) -> abi::rf_job {
    abi::rf_job::for_policy(
        job_id,
        &Policy {
            mode: Mode::Block,
            direct_ip: Mode::Block,
            dns_filter: false,
            ..Default::default()
        },
    )
}

fn rig(entries: u64, always_judge: bool, emit_events: bool) -> Result<Dataplane> {
    let mut dp = Dataplane::load(&Options {
        emit_events,
        always_judge,
        capacity: Capacity {
            static_addresses: (entries as u32).max(1024),
            learned_addresses: 1024,
            ..Default::default()
        },
        ..Default::default()
    })?;
    let endpoints = Policy::parse_endpoints(&format!("{DNS_NAME}:*"), "bench")?;
    let policy = Policy {
        endpoints,
        ..Default::default()
    };
    let mut compiled: Compiled = policy.compile()?;
    compiled.prefixes = (0..entries)
        .map(|i| {
            let IpAddr::V6(a) = dest(i) else {
                unreachable!()
            };
            (
                ipnet::IpNet::V6(ipnet::Ipv6Net::new(a, 128).unwrap()),
                PortSet::Any,
            )
        })
        .collect();
    dp.install_policy(JOB, &compiled, &[resolver()])?;
    dp.add_interface_job(LO, block_job(JOB))?;
    Ok(dp)
}

#[derive(Clone, Copy)]
enum Prog {
    Egress,
    Ingress,
}

/// Runs every frame `repeat` times through `prog` and through the empty program, frame by
/// frame interleaved (so a noisy neighbour hits both alike), `rounds` times over.
/// Returns (mean ns prog, mean ns empty, return value of the first frame).
fn measure(
    dp: &Dataplane,
    prog: Prog,
    frames: &[Vec<u8>],
    repeat: u32,
    rounds: u32,
) -> Result<(f64, f64, i32)> {
    let p = match prog {
        Prog::Egress => dp.egress_prog(),
        Prog::Ingress => dp.ingress_prog(),
    };
    let (mut sum_p, mut sum_e, mut n) = (0f64, 0f64, 0f64);
    let mut ret = None;
    for _ in 0..rounds {
        for f in frames {
            let (r, d) = run_tc(p, f, LO, repeat)?;
            ret.get_or_insert(r);
            let (_, de) = run_tc(dp.empty_prog(), f, LO, repeat)?;
            sum_p += d.as_nanos() as f64;
            sum_e += de.as_nanos() as f64;
            n += 1.0;
        }
    }
    Ok((sum_p / n, sum_e / n, ret.unwrap_or(0)))
}

struct Row {
    case: String,
    entries: u64,
    ns: f64,
    empty: f64,
    frames: usize,
    repeat: u32,
    rounds: u32,
    ret: i32,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "case": self.case, "entries": self.entries,
            "ns": round2(self.ns), "empty_ns": round2(self.empty),
            "diff_ns": round2(self.ns - self.empty), "ratio": round2(self.ns / self.empty.max(0.01)),
            "frames": self.frames, "repeat": self.repeat, "rounds": self.rounds,
            "packets": self.frames as u64 * self.repeat as u64 * self.rounds as u64,
            "retval": self.ret,
        })
    }

    fn print(&self) {
        println!(
            "{:<22} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>7.2} {:>12}  ret={}",
            self.case,
            self.entries,
            self.ns,
            self.empty,
            self.ns - self.empty,
            self.ns / self.empty.max(0.01),
            format!("{}x{}x{}", self.frames, self.repeat, self.rounds),
            self.ret
        );
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A thread that empties the ring buffer while it lives, like the agent's loop (a 10 ms
/// tick; the kernel wakes it early when a quarter of the buffer is full). It fails the bench
/// when records were dropped: a full buffer makes the event cheaper than a real one.
struct Drain {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    drops0: u64,
}

fn ringbuf_drops(dp: &Dataplane) -> Result<u64> {
    Ok(dp.counters()?[abi::rf_counter::RF_CNT_RINGBUF_DROP.0 as usize])
}

impl Drain {
    fn start(dp: &Dataplane) -> Result<Drain> {
        let map = dp.events_map()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || -> Result<()> {
            let mut b = libbpf_rs::RingBufferBuilder::new();
            b.add(&map, |_: &[u8]| 0)?;
            let rb = b.build()?;
            while !s.load(Ordering::Acquire) {
                rb.poll(Duration::from_millis(10))?;
                rb.consume()?;
            }
            Ok(())
        });
        let drops0 = ringbuf_drops(dp)?;
        Ok(Drain {
            stop,
            thread: Some(thread),
            drops0,
        })
    }

    /// Stops the thread; an error if it failed or records were dropped meanwhile.
    fn finish(mut self, dp: &Dataplane) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("drain thread panicked"))??;
        }
        let dropped = ringbuf_drops(dp)? - self.drops0;
        if dropped > 0 {
            bail!(
                "{dropped} flow events dropped: the ring buffer was not drained, the row is wrong"
            );
        }
        Ok(())
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn dataplane(args: &Args) -> Result<()> {
    let sizes: Vec<u64> = if args.quick {
        vec![10, 1000]
    } else {
        vec![10, 1_000, 10_000, 100_000, 1_000_000]
    };
    // Packets per row: >= 1e6 in a full run, spread over up to `max_frames` destinations
    // (each BPF_PROG_TEST_RUN call repeats one frame, so one call = one destination).
    let total: u64 = if args.quick { 20_000 } else { 1_000_000 };
    let max_frames: u64 = if args.quick { 100 } else { 1000 };
    let mut rows: Vec<Row> = Vec::new();
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>7} {:>12}",
        "case", "entries", "ns/pkt", "empty", "diff", "ratio", "frames*rep*rnd"
    );
    let t0 = Instant::now();
    let load_before = loadavg();
    for &n in &sizes {
        let nf = n.min(max_frames) as usize;
        let repeat = (total / nf as u64).max(1) as u32;
        // Destinations spread over the whole trie: every (n/nf)-th entry.
        let step = (n / nf as u64).max(1);
        let dests: Vec<IpAddr> = (0..nf as u64).map(|k| dest(k * step)).collect();

        // --- new flows: every packet judged (always_judge): the flow looked up, judged,
        // its entry written and its event sent into the ring buffer, which a thread drains
        // as the agent's loop does (a new flow always sends its event).
        {
            let t = Instant::now();
            let dp = rig(n, true, true)?;
            let drain = Drain::start(&dp)?;
            eprintln!(
                "  [{n} entries loaded in {:.1}s]",
                t.elapsed().as_secs_f64()
            );
            let syns: Vec<Vec<u8>> = dests
                .iter()
                .enumerate()
                .map(|(k, d)| frame(client(), *d, 6, 40000 + k as u16, 443, TCP_SYN, &[]))
                .collect();
            let (ns, empty, ret) = measure(&dp, Prog::Egress, &syns, repeat, 1)?;
            push(
                &mut rows,
                "new-flow-allowed",
                n,
                ns,
                empty,
                nf,
                repeat,
                1,
                ret,
            );
            let blocked: Vec<Vec<u8>> = (0..nf as u64)
                .map(|k| {
                    frame(
                        client(),
                        stranger(k * step),
                        6,
                        40000 + k as u16,
                        443,
                        TCP_SYN,
                        &[],
                    )
                })
                .collect();
            let (ns, empty, ret) = measure(&dp, Prog::Egress, &blocked, repeat, 1)?;
            push(&mut rows, "blocked", n, ns, empty, nf, repeat, 1, ret);
            // Cold: one packet per call over many destinations, nothing repeated back to
            // back. Each call also pays the kernel's timer read, so only the difference
            // to the empty program (same calls) means anything here.
            let ncold = if args.quick { 2_000 } else { 20_000 }.min(n.max(1)) as usize;
            let cstep = (n / ncold as u64).max(1);
            let cold: Vec<Vec<u8>> = (0..ncold as u64)
                .map(|k| {
                    frame(
                        client(),
                        dest(k * cstep),
                        6,
                        40000 + (k % 20000) as u16,
                        443,
                        TCP_SYN,
                        &[],
                    )
                })
                .collect();
            let rounds = (if args.quick { 2_000 } else { 40_000 } / ncold).max(1) as u32;
            let (ns, empty, ret) = measure(&dp, Prog::Egress, &cold, 1, rounds)?;
            push(
                &mut rows,
                "new-flow-allowed-cold",
                n,
                ns,
                empty,
                ncold,
                1,
                rounds,
                ret,
            );
            drain.finish(&dp)?;
        }

        // --- established flows (flow cache hit) and DNS answers, normal program.
        {
            let dp = rig(n, false, false)?;
            let mut acks = Vec::with_capacity(nf);
            for (k, d) in dests.iter().enumerate() {
                let sport = 40000 + k as u16;
                let syn = frame(client(), *d, 6, sport, 443, TCP_SYN, &[]);
                let (r, _) = run_tc(dp.egress_prog(), &syn, LO, 1)?;
                if r != testrun::PASS {
                    bail!("SYN to allowed {d} returned {r}, expected pass");
                }
                acks.push(frame(client(), *d, 6, sport, 443, TCP_ACK, &[0u8; 64]));
            }
            let (ns, empty, ret) = measure(&dp, Prog::Egress, &acks, repeat, 1)?;
            push(&mut rows, "established", n, ns, empty, nf, repeat, 1, ret);

            for (i, &records) in [1u32, 8, 64].iter().enumerate() {
                let txid = 0x1000 + i as u16;
                let cport = 53000 + i as u16;
                let q = frame(
                    client(),
                    resolver(),
                    17,
                    cport,
                    53,
                    0,
                    &dns_query(txid, DNS_NAME, 28),
                );
                let (r, _) = run_tc(dp.egress_prog(), &q, LO, 1)?;
                if r != testrun::PASS {
                    bail!("DNS query returned {r}, expected pass");
                }
                let rrs: Vec<Rr> = (0..records)
                    .map(|k| Rr::Aaaa(DNS_NAME, 300, answer_addr(i as u32 * 1000 + k)))
                    .collect();
                let a = frame(
                    resolver(),
                    client(),
                    17,
                    53,
                    cport,
                    0,
                    &dns_answer(txid, DNS_NAME, 28, &rrs),
                );
                // One frame: the answer must match the one outstanding query.
                let drep = if args.quick { 2_000 } else { 1_000_000 };
                let (ns, empty, ret) = measure(&dp, Prog::Ingress, &[a], drep, 1)?;
                // The answer must really have bound its records, or we timed a no-op.
                let last = IpAddr::V6(Ipv6Addr::from(answer_addr(i as u32 * 1000 + records - 1)));
                if dp.host_entry(JOB, last)?.is_none() {
                    bail!("DNS answer with {records} records bound nothing: the bench is broken");
                }
                push(
                    &mut rows,
                    &format!("dns-answer-{records}"),
                    n,
                    ns,
                    empty,
                    1,
                    drep,
                    1,
                    ret,
                );
            }
        }
    }
    let out = json!({
        "kind": "dataplane",
        "machine": machine(),
        "quick": args.quick,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "seconds": round2(t0.elapsed().as_secs_f64()),
        "addresses": "2001:db8::/32, scattered (splitmix64)",
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
    });
    write_json(&args.json, &out)
}

#[allow(clippy::too_many_arguments)]
fn push(
    rows: &mut Vec<Row>,
    case: &str,
    n: u64,
    ns: f64,
    empty: f64,
    frames: usize,
    repeat: u32,
    rounds: u32,
    ret: i32,
) {
    let r = Row {
        case: case.to_string(),
        entries: n,
        ns,
        empty,
        frames,
        repeat,
        rounds,
        ret,
    };
    r.print();
    rows.push(r);
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel,
    })
}

// ---------------------------------------------------------------------------------------
// Event pipeline: real ring buffer -> Agent::handle -> JSON Lines writer
// ---------------------------------------------------------------------------------------

/// Jobs the pipeline's events are spread over (the target: 32 jobs busy).
const BUSY_JOBS: u32 = 32;

/// The ids of `n` jobs as [`new_agent_in`] registers them.
fn job_ids(n: u32) -> Vec<u32> {
    (0..n)
        .map(|j| if j == 0 { JOB } else { 1000 + j })
        .collect()
}

/// A flow event as the kernel writes it, for the decode-only pass; event `i` is job
/// `i % BUSY_JOBS`'s.
fn synthetic_flow_event(i: u64) -> Vec<u8> {
    let mut ev = abi::rf_flow_event::default();
    ev.hdr.r#type = abi::rf_event_type::RF_EVENT_FLOW.0;
    ev.hdr.job_id = job_ids(BUSY_JOBS)[(i % BUSY_JOBS as u64) as usize];
    ev.hdr.ts_ns = 1_000_000_000 + i;
    ev.cgroup_id = 4242;
    ev.pid = std::process::id();
    for (d, s) in ev.comm.iter_mut().zip(b"node\0") {
        *d = *s as _;
    }
    ev.saddr = abi::addr_to_bytes(client());
    ev.daddr = abi::addr_to_bytes(dest(i % 1024));
    ev.sport = 40000 + (i % 20000) as u16;
    ev.dport = 443;
    ev.proto = 6;
    abi::bytes_of(&ev).to_vec()
}

/// This process's own cgroup: the job's cgroup in the pipeline bench, so the agent checks
/// every event against it as it does for a real job.
fn own_cgroup() -> Option<std::path::PathBuf> {
    let root = ringfence::job::cgroup::find_cgroup2().ok()?;
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim_start_matches('/')))
}

fn new_agent(sink: &str, jobs: u32) -> Result<Agent> {
    new_agent_in(sink, jobs, None)
}

fn new_agent_in(sink: &str, jobs: u32, cgroup: Option<std::path::PathBuf>) -> Result<Agent> {
    let mut agent = Agent::new(
        Some(std::path::Path::new(sink)),
        Duration::from_secs(0),
        Duration::from_secs(30),
    )?;
    for id in job_ids(jobs) {
        agent.jobs.insert(
            id,
            JobState::new(&format!("bench-{id}"), "block", cgroup.clone()),
        );
    }
    Ok(agent)
}

fn pipeline(args: &Args) -> Result<()> {
    let sink = std::env::var("RFBENCH_EVENTS").unwrap_or_else(|_| "/dev/null".into());
    // 1. Userspace alone: decode, attribute, serialize, write. The ceiling of the agent.
    let n_syn: u64 = if args.quick { 50_000 } else { 1_000_000 };
    let evs: Vec<Vec<u8>> = (0..1024).map(synthetic_flow_event).collect();
    let cg = own_cgroup();
    let mut agent = new_agent_in(&sink, BUSY_JOBS, cg.clone())?;
    let t = Instant::now();
    let cpu0 = thread_cpu_ns();
    for i in 0..n_syn {
        agent.handle(&evs[(i % 1024) as usize]);
    }
    agent.flush();
    let handle_rate = n_syn as f64 / t.elapsed().as_secs_f64();
    // CPU time of this thread per event: what the agent costs, whatever else the machine
    // runs (wall time on 2 shared CPUs counts the other processes' turns too).
    let handle_cpu_ns = (thread_cpu_ns() - cpu0) as f64 / n_syn as f64;
    drop(agent);
    // The same without a job cgroup (no pid check): what the rest of the path costs.
    let mut agent = new_agent_in(&sink, BUSY_JOBS, None)?;
    let t = Instant::now();
    for i in 0..n_syn {
        agent.handle(&evs[(i % 1024) as usize]);
    }
    agent.flush();
    let nocheck_rate = n_syn as f64 / t.elapsed().as_secs_f64();
    drop(agent);
    println!(
        "agent.handle without the pid check: {:.0} events/s, {:.0} ns/event",
        nocheck_rate,
        1e9 / nocheck_rate
    );
    println!(
        "agent.handle (synthetic flow events of {BUSY_JOBS} jobs, sink {sink}, pid checked against {}): {:.0} events/s, {:.0} ns/event, {:.0} ns CPU/event",
        cg.as_ref().map_or("nothing".into(), |p| p.display().to_string()),
        handle_rate,
        1e9 / handle_rate,
        handle_cpu_ns
    );
    if std::env::var_os("RFBENCH_HANDLE_ONLY").is_some() {
        return Ok(());
    }

    // 2. Through the kernel: the egress program (always_judge, events on) turns every
    // BPF_PROG_TEST_RUN repetition into one ring-buffer flow event; a consumer thread polls
    // the ring buffer like the agent's loop does and hands every record to Agent::handle.
    // The job of a packet is its interface's: BUSY_JOBS interfaces (veth ends in a network
    // namespace of this thread's own, gone with the process), one job each, the producer
    // going round them.
    let links = private_links(BUSY_JOBS)?;
    let mut dp = Dataplane::load(&Options {
        emit_events: true,
        always_judge: true,
        capacity: Capacity {
            static_addresses: 2048,
            learned_addresses: 2048,
            ..Default::default()
        },
        ..Default::default()
    })?;
    let compiled = Compiled {
        names: vec![],
        prefixes: vec![(
            ipnet::IpNet::V6(ipnet::Ipv6Net::new(
                match dest(0) {
                    IpAddr::V6(a) => a,
                    _ => unreachable!(),
                },
                128,
            )?),
            PortSet::Any,
        )],
        inbound: vec![],
    };
    for (id, ifindex) in job_ids(BUSY_JOBS).into_iter().zip(&links) {
        dp.install_policy(id, &compiled, &[resolver()])?;
        dp.add_interface_job(*ifindex, block_job(id))?;
    }
    let map = dp.events_map()?;
    // The held step's lines go to a real file (RFBENCH_PIPELINE_FILE, else a temporary one,
    // removed at the end): what the agent's write(2)s and the page cache cost is part of it.
    let file_sink = std::env::var("RFBENCH_PIPELINE_FILE").unwrap_or_else(|_| {
        std::env::temp_dir()
            .join(format!("rfbench-pipeline-{}.jsonl", std::process::id()))
            .display()
            .to_string()
    });
    // The producer (this thread) on the first CPU and the consumer on the last: neither
    // waits for the other's turn on a CPU (others' processes still may take them).
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let old_affinity = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
    if ncpu >= 2 {
        pin_to(0);
    }
    // The producer at the consumer's priority too: it stands for the jobs' packets, which
    // the kernel handles whatever else runs; at nice 0 the other processes of a shared
    // machine (and the load balancer, which moves them off the consumer's CPU) made it
    // the limit.
    let old_nice = set_thread_nice(CONSUMER_NICE);
    let consumed = Arc::new(AtomicU64::new(0));
    // The consumer's CPU time so far (ns), updated after every drain.
    let consumer_cpu = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    // What the consumer does with a record: COUNT_ONLY (what the producer can do on its
    // own), TO_FILE (the agent, its lines to a file), TO_SINK (the agent, lines to `sink`).
    let mode = Arc::new(std::sync::atomic::AtomicU8::new(COUNT_ONLY));
    let consumer = {
        let (consumed, consumer_cpu, stop, ready, mode, file_sink, sink, cg) = (
            consumed.clone(),
            consumer_cpu.clone(),
            stop.clone(),
            ready.clone(),
            mode.clone(),
            file_sink.clone(),
            sink.clone(),
            cg.clone(),
        );
        std::thread::spawn(move || -> Result<AgentCounts> {
            if ncpu >= 2 {
                pin_to(ncpu - 1);
            }
            // At the daemon's priority (deploy/systemd/ringfence.service: Nice=-10): the
            // other processes of a shared machine must not make the consumer miss its turn
            // for longer than the ring buffer holds (8 MiB: ~75 ms at 1M events/s).
            set_thread_nice(CONSUMER_NICE);
            let agents = std::cell::RefCell::new([
                new_agent_in(&file_sink, BUSY_JOBS, cg.clone())?,
                new_agent_in(&sink, BUSY_JOBS, cg)?,
            ]);
            let mut b = libbpf_rs::RingBufferBuilder::new();
            b.add(&map, |data: &[u8]| {
                match mode.load(Ordering::Relaxed) {
                    TO_FILE => agents.borrow_mut()[0].handle(data),
                    TO_SINK => agents.borrow_mut()[1].handle(data),
                    _ => {}
                }
                consumed.fetch_add(1, Ordering::Relaxed);
                0
            })?;
            let rb = b.build()?;
            ready.store(true, Ordering::Release);
            while !stop.load(Ordering::Acquire) {
                // Like the agent's loop: the kernel wakes only when the ring fills up, so
                // drain on every tick as well (10 ms, 1 ms while busy: Agent::poll_timeout);
                // one flush (write) per drain.
                let tick = Duration::from_millis(10);
                let tick = agents
                    .borrow()
                    .iter()
                    .map(|a| a.poll_timeout(tick))
                    .min()
                    .unwrap_or(tick);
                rb.poll(tick)?;
                rb.consume()?;
                agents.borrow_mut().iter_mut().for_each(Agent::flush);
                consumer_cpu.store(thread_cpu_ns(), Ordering::Relaxed);
            }
            rb.consume()?;
            drop(rb);
            let mut counts = AgentCounts::default();
            for mut agent in agents.into_inner() {
                agent.flush();
                counts.decode_errors += agent.decode_errors;
                for j in agent.jobs.values() {
                    let c = j.cuts();
                    counts.suppressed += c.suppressed.events();
                    counts.dropped += c.dropped.events();
                }
            }
            Ok(counts)
        })
    };
    while !ready.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let f = frame(client(), dest(0), 6, 40000, 443, TCP_SYN, &[]);
    let drops = |dp: &Dataplane| -> Result<u64> {
        Ok(dp.counters()?[abi::rf_counter::RF_CNT_RINGBUF_DROP.0 as usize])
    };
    let mut batch: u64 = 0;
    // One step: `rate` events/s offered (0: as fast as the producer goes) for `secs`, then
    // the backlog drained (at most `drain_secs` more).
    let mut step = |rate: u64, secs: f64, drain_secs: f64| -> Result<Value> {
        let d0 = drops(&dp)?;
        let c0 = consumed.load(Ordering::Relaxed);
        let cpu0 = consumer_cpu.load(Ordering::Relaxed);
        let t = Instant::now();
        let mut produced: u64 = 0;
        let dur = Duration::from_secs_f64(secs);
        while t.elapsed() < dur {
            let want = if rate == 0 {
                produced + 4096
            } else {
                (rate as f64 * t.elapsed().as_secs_f64()) as u64
            };
            if want <= produced {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            // Batches of at most 4096 (a few ms): every job has had several turns within
            // each step, and the producer's per-call cost stays small.
            let n = (want - produced).min(4096) as u32;
            run_tc(
                dp.egress_prog(),
                &f,
                links[(batch % links.len() as u64) as usize],
                n,
            )?;
            batch += 1;
            produced += n as u64;
        }
        let elapsed = t.elapsed().as_secs_f64();
        let dropped = drops(&dp)? - d0;
        // Let the consumer drain what is left in the ring, then count.
        let deadline = Instant::now() + Duration::from_secs_f64(drain_secs);
        while consumed.load(Ordering::Relaxed) - c0 + dropped < produced
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let drain = t.elapsed().as_secs_f64();
        // The consumer's last drain of this step is over when its CPU figure moves on.
        std::thread::sleep(Duration::from_millis(25));
        let got = consumed.load(Ordering::Relaxed) - c0;
        let cpu = consumer_cpu.load(Ordering::Relaxed) - cpu0;
        // Kept up: nothing dropped, everything consumed, and the backlog drained within
        // 10% of the step's length (else the ring buffer only hid a slow consumer).
        let kept_up = dropped == 0 && got >= produced && drain <= elapsed * 1.1;
        Ok(json!({
            "offered": rate, "produced_per_s": (produced as f64 / elapsed).round(),
            "consumed_per_s": (got as f64 / drain).round(), "produced": produced,
            "consumed": got, "drops": dropped, "seconds": round2(elapsed), "kept_up": kept_up,
            "consumer_cpu_ns_per_event": round2(cpu as f64 / got.max(1) as f64),
        }))
    };
    let print_step = |label: &str, s: &Value| {
        println!(
            "{:>14} {:>12.0} {:>12.0} {:>10} {:>8} {:>10.0}",
            label,
            s["produced_per_s"].as_f64().unwrap_or(0.0),
            s["consumed_per_s"].as_f64().unwrap_or(0.0),
            s["drops"].as_u64().unwrap_or(0),
            s["kept_up"].as_bool().unwrap_or(false),
            s["consumer_cpu_ns_per_event"].as_f64().unwrap_or(0.0),
        );
    };
    let step_secs = if args.quick { 0.2 } else { 2.0 };
    let drain_secs = if args.quick { 1.0 } else { 5.0 };
    println!(
        "{:>14} {:>12} {:>12} {:>10} {:>8} {:>10}",
        "offered/s", "produced/s", "consumed/s", "drops", "kept up", "cpu ns/ev"
    );
    // The producer alone (the consumer only counts): the most this producer can offer.
    let producer_alone = step(0, step_secs, drain_secs)?;
    print_step("max, no agent", &producer_alone);
    // The target held for 10 s (quick: 1 s), the lines to a file (page cache
    // written back to disk by the kernel as it goes: ~2 GB). Dirty pages of earlier work
    // are written back first, so that their writeback does not compete with this step.
    nix::unistd::sync();
    mode.store(TO_FILE, Ordering::Relaxed);
    let target: u64 = 1_000_000;
    let held = step(target, if args.quick { 1.0 } else { 10.0 }, drain_secs)?;
    print_step(&format!("{target} x {}s", held["seconds"]), &held);
    // The ramp: to `sink` (/dev/null unless RFBENCH_EVENTS names a file), as before.
    mode.store(TO_SINK, Ordering::Relaxed);
    // Offered rates in events/s; 0 = as fast as the producer can go.
    let rates: Vec<u64> = if args.quick {
        vec![5_000, 200_000, 0]
    } else {
        vec![
            2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 750_000, 1_000_000,
            1_250_000, 1_500_000, 2_000_000, 3_000_000, 0,
        ]
    };
    let mut steps = Vec::new();
    for &rate in &rates {
        let row = step(rate, step_secs, drain_secs)?;
        print_step(
            &if rate == 0 {
                "max".to_string()
            } else {
                rate.to_string()
            },
            &row,
        );
        steps.push(row);
    }
    stop.store(true, Ordering::Release);
    let agent_counts = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("consumer thread panicked"))??;
    set_thread_nice(old_nice);
    if let Some(old) = old_affinity {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &old);
    }
    let lines = count_lines(&file_sink)?;
    let held_consumed = held["consumed"].as_u64().unwrap_or(0);
    if std::env::var_os("RFBENCH_PIPELINE_FILE").is_none() {
        let _ = std::fs::remove_file(&file_sink);
    }
    // Every record of the held step was a flow of a registered job with no limits: one
    // line each in the file, or the agent lost some.
    let handled = held_consumed;
    // Sustained = the produced rate of the last step before the first one that did not
    // keep up (every slower step kept up too); drop point = the first step that dropped.
    // A clean step above them (noise: the consumer shares 2 CPUs) does not count.
    let sustained = steps
        .iter()
        .take_while(|s| s["kept_up"].as_bool() == Some(true))
        .filter_map(|s| s["produced_per_s"].as_f64())
        .fold(0f64, f64::max);
    let drop_point = steps
        .iter()
        .find(|s| s["drops"].as_u64().unwrap_or(0) > 0)
        .and_then(|s| s["produced_per_s"].as_f64());
    let behind = steps
        .iter()
        .find(|s| s["kept_up"].as_bool() != Some(true))
        .and_then(|s| s["produced_per_s"].as_f64());
    println!(
        "sustained (kept up, zero drops): {:.0} events/s; falls behind at: {}; drop point: {}",
        sustained,
        behind.map_or("not reached".into(), |d| format!("{d:.0} events/s")),
        drop_point.map_or("not reached".into(), |d| format!("{d:.0} events/s"))
    );
    // Met: the producer offered the target (within 1 %: the rate loop's batches), all of it
    // was written, nothing dropped on either side.
    let held_ok = held["kept_up"].as_bool() == Some(true)
        && held["produced_per_s"].as_f64().unwrap_or(0.0) >= 0.99 * target as f64
        && agent_counts.is_clean()
        && lines == handled;
    println!(
        "held {target}/s for {}s to {file_sink}: {:.0} events/s produced, {:.0}/s written, ring buffer drops {}, agent: {} decode errors, {} suppressed, {} dropped; {lines} lines for {handled} records; consumer {:.0} ns CPU/event: {}",
        held["seconds"],
        held["produced_per_s"].as_f64().unwrap_or(0.0),
        held["consumed_per_s"].as_f64().unwrap_or(0.0),
        held["drops"],
        agent_counts.decode_errors,
        agent_counts.suppressed,
        agent_counts.dropped,
        held["consumer_cpu_ns_per_event"].as_f64().unwrap_or(0.0),
        if held_ok { "met" } else { "MISSED" },
    );
    if producer_alone["produced_per_s"].as_f64().unwrap_or(0.0) < target as f64 {
        println!(
            "note: the producer alone reaches {:.0} events/s, below {target}: the held step measures it, not the agent",
            producer_alone["produced_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    let out = json!({
        "kind": "pipeline",
        "machine": machine(),
        "quick": args.quick,
        "sink": sink,
        "file_sink": file_sink,
        "loadavg": loadavg(),
        "job_cgroup": cg.map(|p| p.display().to_string()),
        "jobs": BUSY_JOBS,
        "handle_events_per_s": handle_rate.round(),
        "handle_ns_per_event": round2(1e9 / handle_rate),
        "handle_cpu_ns_per_event": round2(handle_cpu_ns),
        "handle_nocheck_events_per_s": nocheck_rate.round(),
        "producer_alone": producer_alone,
        "sustained_events_per_s": sustained.round(),
        "drop_point_events_per_s": drop_point.map(f64::round),
        "falls_behind_events_per_s": behind.map(f64::round),
        "steps": steps,
        "held": held,
        "held_target_events_per_s": target,
        "held_met": held_ok,
        "file_lines": lines,
        "agent_decode_errors": agent_counts.decode_errors,
        "agent_suppressed": agent_counts.suppressed,
        "agent_dropped": agent_counts.dropped,
    });
    write_json(&args.json, &out)
}

const COUNT_ONLY: u8 = 0;
const TO_FILE: u8 = 1;
const TO_SINK: u8 = 2;

/// The consumer thread's nice value: the systemd unit's.
const CONSUMER_NICE: libc::c_int = -10;

/// What the pipeline's agent lost on its side: all 0 for a clean run.
#[derive(Default)]
struct AgentCounts {
    decode_errors: u64,
    /// Events the jobs' rate limits held back (none are set) and lines the file refused.
    suppressed: u64,
    dropped: u64,
}

impl AgentCounts {
    fn is_clean(&self) -> bool {
        self.decode_errors == 0 && self.suppressed == 0 && self.dropped == 0
    }
}

/// Lines in a file (a JSON Lines file of a few GB: read in large pieces).
fn count_lines(path: &str) -> Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

/// Sets the calling thread's nice value; returns the one it had.
fn set_thread_nice(nice: libc::c_int) -> libc::c_int {
    // SAFETY: plain syscalls on this thread (Linux keeps a nice value per thread).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let old = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
        old
    }
}

/// Pins the calling thread to one CPU.
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID), ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid, writable timespec; the clock exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `n` interfaces for BPF_PROG_TEST_RUN to name as a packet's device: veth pairs in a new
/// network namespace of the calling thread (a test run looks the ifindex up in the
/// caller's namespace). Nothing outside the process sees them; they go when it exits.
fn private_links(n: u32) -> Result<Vec<u32>> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) for the pipeline's interfaces")?;
    let mut out = Vec::new();
    for p in 0..n.div_ceil(2) {
        let (a, b) = (format!("rfb11a{p}"), format!("rfb11b{p}"));
        // `ip` is forked from this thread, so it runs in the new namespace too.
        let st = std::process::Command::new("ip")
            .args(["link", "add", &a, "type", "veth", "peer", "name", &b])
            .status()
            .context("running ip")?;
        if !st.success() {
            bail!("ip link add {a} type veth peer name {b}: {st}");
        }
        for name in [a, b] {
            out.push(
                nix::net::if_::if_nametoindex(name.as_str())
                    .with_context(|| format!("ifindex of {name}"))?,
            );
        }
    }
    out.truncate(n as usize);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Every BPF map this process holds an fd for: (id, memlock bytes) from fdinfo, named by
/// `bpftool map show` (the same number bpftool prints as memlock).
fn my_maps() -> Vec<(u32, String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return vec![];
    };
    for e in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let get = |k: &str| {
            s.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let (Some(id), Some(mem)) = (get("map_id:"), get("memlock:")) {
            out.insert(id as u32, mem);
        }
    }
    out.into_iter()
        .map(|(id, mem)| {
            let name = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "id", &id.to_string()])
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                .and_then(|v| v["name"].as_str().map(String::from))
                .unwrap_or_else(|| "?".into());
            (id, name, mem)
        })
        .collect()
}

/// glibc's view of the heap (mallinfo2): bytes handed out and not freed, and bytes freed
/// but kept by the allocator (in its arenas, not returned to the kernel), in MiB. RSS is
/// roughly the first plus the part of the second that was touched.
fn heap_mib() -> (f64, f64) {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let m = unsafe { libc::mallinfo2() };
    (
        (m.uordblks + m.hblkhd) as f64 / 1048576.0,
        m.fordblks as f64 / 1048576.0,
    )
}

fn memory(args: &Args) -> Result<()> {
    let total: u64 = if args.quick { 20_000 } else { 1_000_000 };
    let jobs: u32 = 256;
    let rss0 = status_kib("VmRSS:");
    // 1. The agent's state: 256 jobs, `total` learned addresses, fed as the kernel would
    // (DNS answers of 64 AAAA records, each bound), so the name map and expiry heap grow.
    let mut agent = new_agent("/dev/null", jobs)?;
    let ids: Vec<u32> = (0..jobs)
        .map(|j| if j == 0 { JOB } else { 1000 + j })
        .collect();
    let per = 64u32;
    let answers = total.div_ceil(per as u64);
    for a in 0..answers {
        let job = ids[(a % jobs as u64) as usize];
        // One name per answer: the agent keeps a name per address, and the report a row
        // per name with its answers.
        let name = format!("h{a}.registry.bench.test");
        let rrs: Vec<Rr> = (0..per)
            .map(|k| {
                let IpAddr::V6(ip) = dest(a * per as u64 + k as u64) else {
                    unreachable!()
                };
                Rr::Aaaa(&name, 300, ip.octets())
            })
            .collect();
        let msg = dns_answer(a as u16, &name, 28, &rrs);
        let mut ev = abi::rf_dns_event::default();
        ev.hdr.r#type = abi::rf_event_type::RF_EVENT_DNS.0;
        ev.hdr.job_id = job;
        ev.hdr.ts_ns = 1_000_000_000 + a;
        ev.server = abi::addr_to_bytes(resolver());
        ev.len = msg.len() as u16;
        ev.bound = per as u16;
        ev.flags = abi::DNS_ALLOWED;
        let mut rec = abi::bytes_of(&ev).to_vec();
        rec.extend_from_slice(&msg);
        agent.handle(&rec);
    }
    agent.flush();
    let rss_agent = status_kib("VmRSS:");
    println!(
        "agent: {jobs} jobs, {} learned addresses: RSS {:.1} MiB (state {:+.1} MiB over an idle process of {:.1} MiB)",
        answers * per as u64,
        rss_agent as f64 / 1024.0,
        (rss_agent as f64 - rss0 as f64) / 1024.0,
        rss0 as f64 / 1024.0
    );

    // 2. The kernel's state for the same load: one trie holding `total` host entries over
    // 256 jobs, 256 cgroup jobs.
    let mut dp = Dataplane::load(&Options {
        emit_events: true,
        capacity: Capacity {
            static_addresses: total as u32,
            learned_addresses: 1024,
            ..Default::default()
        },
        ..Default::default()
    })?;
    let per_job = total.div_ceil(jobs as u64);
    for (j, id) in ids.iter().enumerate() {
        let prefixes = (0..per_job)
            .map(|k| {
                let IpAddr::V6(a) = dest(j as u64 * per_job + k) else {
                    unreachable!()
                };
                (
                    ipnet::IpNet::V6(ipnet::Ipv6Net::new(a, 128).unwrap()),
                    PortSet::Any,
                )
            })
            .collect();
        dp.install_policy(
            *id,
            &Compiled {
                names: vec![],
                prefixes,
                inbound: vec![],
            },
            &[resolver()],
        )?;
        dp.add_job(0x00be_0000_0000 + j as u64, 2, block_job(*id))?;
    }
    let rss_all = status_kib("VmRSS:");
    let maps = my_maps();
    let map_total: u64 = maps.iter().map(|m| m.2).sum();
    println!("BPF maps (memlock):");
    for (id, name, mem) in &maps {
        println!("  {id:>6} {name:<16} {:>10.1} MiB", *mem as f64 / 1048576.0);
    }
    println!(
        "  total {:.1} MiB; agent process RSS with the dataplane loaded: {:.1} MiB (peak {:.1} MiB)",
        map_total as f64 / 1048576.0,
        rss_all as f64 / 1024.0,
        status_kib("VmHWM:") as f64 / 1024.0
    );
    let out = json!({
        "kind": "memory",
        "machine": machine(),
        "quick": args.quick,
        "jobs": jobs,
        "learned_addresses": answers * per as u64,
        "rss_idle_mib": round2(rss0 as f64 / 1024.0),
        "rss_agent_state_mib": round2(rss_agent as f64 / 1024.0),
        "rss_with_dataplane_mib": round2(rss_all as f64 / 1024.0),
        "rss_peak_mib": round2(status_kib("VmHWM:") as f64 / 1024.0),
        "trie_entries": per_job * jobs as u64,
        "maps": maps.iter().map(|(id, n, m)| json!({"id": id, "name": n, "memlock": m})).collect::<Vec<_>>(),
        "maps_memlock_mib": round2(map_total as f64 / 1048576.0),
    });
    drop(dp);
    write_json(&args.json, &out)
}

/// A daemon-like agent over a long life: `total` distinct names (200k) come at 10k an hour
/// of simulated time, each answered with 4 addresses for a TTL of 1–10 minutes and used by
/// one flow, over 4 jobs at a time with the default limits, each job an hour long (every 15
/// minutes the oldest ends, as `job end` ends it, and a new one starts; the first four end
/// sooner), the expiry run
/// every simulated second against a loaded dataplane as the daemon's loop runs it. Its RSS
/// after the first 10k names against its RSS at the end: flat means within 10%.
fn churn(args: &Args) -> Result<()> {
    use ringfence::testkit::testrun::{dns_answer, Rr};
    let total: u64 = if args.quick { 20_000 } else { 200_000 };
    // Profiling (heaptrack): a shorter life, and an exit with the agent still alive, so its
    // live allocations show as "leaked" by site.
    let total: u64 = std::env::var("RFBENCH_CHURN_NAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(total);
    let first: u64 = if args.quick { 2_000 } else { 10_000 };
    let jobs: u32 = 4;
    let per: u64 = 4;
    // 10k names an hour (the rate of cilium/cilium#47128's report).
    let every_ns: u64 = 3_600_000_000_000 / 10_000;
    let sink = std::env::var("RFBENCH_EVENTS").unwrap_or_else(|_| "/dev/null".into());
    let dp = Dataplane::load(&Options {
        emit_events: true,
        capacity: Capacity {
            static_addresses: 1024,
            learned_addresses: 1024,
            ..Default::default()
        },
        ..Default::default()
    })?;
    let mut agent = Agent::new(
        Some(std::path::Path::new(&sink)),
        Duration::from_secs(0),
        Duration::from_secs(30),
    )?;
    let mut ids = job_ids(jobs);
    let new_job = |id: u32| {
        JobState::new(&format!("churn-{id}"), "block", None)
            .with_limits(ringfence::trail::limits::Limits::default())
    };
    for &id in &ids {
        agent.jobs.insert(id, new_job(id));
    }
    let mut next_id = 5000;
    let turn_ns: u64 = 15 * 60 * 1_000_000_000;
    let mut next_turn = turn_ns;
    let t0 = ringfence::agent::boottime_ns();
    let mut now = t0;
    let mut next_tick = t0;
    let rss0 = status_kib("VmRSS:");
    let mut rss_first = 0;
    let mut curve = Vec::new();
    let t = Instant::now();
    for i in 0..total {
        let ts = t0 + i * every_ns;
        // The daemon's loop: expiry every tick (here every simulated second).
        while next_tick <= ts {
            now = next_tick;
            agent.expire(&dp, now);
            next_tick += 1_000_000_000;
        }
        // A job ends and another starts, every 15 simulated minutes.
        if ts - t0 >= next_turn {
            next_turn += turn_ns;
            let old = ids.remove(0);
            agent.finish_job(old);
            agent.remove_job(old);
            next_id += 1;
            agent.jobs.insert(next_id, new_job(next_id));
            ids.push(next_id);
        }
        let job = ids[(i % jobs as u64) as usize];
        let name = format!("n{i}.svc{}.churn.test", i % 64);
        let ttl = 60 + (mix(i) % 541) as u32;
        let rrs: Vec<Rr> = (0..per)
            .map(|k| {
                let IpAddr::V6(ip) = dest(i * per + k) else {
                    unreachable!()
                };
                Rr::Aaaa(&name, ttl, ip.octets())
            })
            .collect();
        let msg = dns_answer(i as u16, &name, 28, &rrs);
        let mut ev = abi::rf_dns_event::default();
        ev.hdr.r#type = abi::rf_event_type::RF_EVENT_DNS.0;
        ev.hdr.job_id = job;
        ev.hdr.ts_ns = ts;
        ev.server = abi::addr_to_bytes(resolver());
        ev.len = msg.len() as u16;
        ev.bound = per as u16;
        ev.flags = abi::DNS_ALLOWED;
        let mut rec = abi::bytes_of(&ev).to_vec();
        rec.extend_from_slice(&msg);
        agent.handle(&rec);
        // One flow to the first address.
        let mut fl = abi::rf_flow_event::default();
        fl.hdr.r#type = abi::rf_event_type::RF_EVENT_FLOW.0;
        fl.hdr.job_id = job;
        fl.hdr.ts_ns = ts + 1_000_000;
        fl.pid = std::process::id();
        fl.saddr = abi::addr_to_bytes(client());
        fl.daddr = abi::addr_to_bytes(dest(i * per));
        fl.sport = 40000 + (i % 20000) as u16;
        fl.dport = 443;
        fl.proto = 6;
        agent.handle(abi::bytes_of(&fl));
        if (i + 1) % 1000 == 0 {
            agent.flush();
        }
        if i + 1 == first {
            rss_first = status_kib("VmRSS:");
        }
        if (i + 1) % (total / 20) == 0 {
            let rss = status_kib("VmRSS:");
            let names: usize = agent.jobs.values().map(|j| j.names_kept()).sum();
            let (used, free) = heap_mib();
            println!(
                "  {:>7} names, {:>6.1} h: RSS {:>6.1} MiB (malloc: {used:.1} MiB in use, {free:.1} MiB free and kept), addresses named {names}",
                i + 1,
                (ts - t0) as f64 / 3.6e12,
                rss as f64 / 1024.0
            );
            curve.push(json!({"names": i + 1, "hours": round2((ts - t0) as f64 / 3.6e12), "rss_mib": round2(rss as f64 / 1024.0), "heap_in_use_mib": round2(used), "heap_free_kept_mib": round2(free), "addresses_named": names}));
        }
    }
    let _ = now;
    if std::env::var_os("RFBENCH_CHURN_EXIT").is_some() {
        std::process::exit(0);
    }
    agent.finish();
    let rss_end = status_kib("VmRSS:");
    let ratio = rss_end as f64 / rss_first.max(1) as f64;
    println!(
        "churn: {total} names over {:.1} simulated hours ({:.1} s): RSS after {first} names {:.1} MiB, at the end {:.1} MiB: {ratio:.3}x ({}; idle {:.1} MiB, peak {:.1} MiB)",
        (total * every_ns) as f64 / 3.6e12,
        t.elapsed().as_secs_f64(),
        rss_first as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        if ratio <= 1.10 { "flat: within 10%" } else { "NOT flat: more than 10% over" },
        rss0 as f64 / 1024.0,
        status_kib("VmHWM:") as f64 / 1024.0,
    );
    let out = json!({
        "kind": "churn",
        "machine": machine(),
        "quick": args.quick,
        "names": total,
        "first": first,
        "jobs": jobs,
        "addresses_per_name": per,
        "rss_idle_mib": round2(rss0 as f64 / 1024.0),
        "rss_first_mib": round2(rss_first as f64 / 1024.0),
        "rss_end_mib": round2(rss_end as f64 / 1024.0),
        "rss_peak_mib": round2(status_kib("VmHWM:") as f64 / 1024.0),
        "end_over_first": (ratio * 1000.0).round() / 1000.0,
        "flat": ratio <= 1.10,
        "curve": curve,
    });
    drop(dp);
    write_json(&args.json, &out)
}

// ---------------------------------------------------------------------------------------
// New connections per second (bench/veth runs these in the two namespaces)
// ---------------------------------------------------------------------------------------

fn connect_server(rest: &[String]) -> Result<()> {
    let addr: SocketAddr = rest.first().context("ADDR:PORT")?.parse()?;
    let secs: f64 = rest.get(1).map_or(Ok(30.0), |s| s.parse())?;
    let l = TcpListener::bind(addr)?;
    // Blocking accept that gives up every 100 ms to look at the clock (accept honours
    // SO_RCVTIMEO on Linux): no polling delay on the measured path.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a valid socket fd and a properly sized option value.
    unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while Instant::now() < deadline {
        if let Ok((s, _)) = l.accept() {
            n += 1;
            drop(s);
        }
    }
    eprintln!("connect-server: accepted {n}");
    Ok(())
}

/// Closes with RST (SO_LINGER 0): no TIME_WAIT, so a long loop never runs out of ports.
fn set_linger0(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a properly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

fn connect_client(rest: &[String]) -> Result<()> {
    let addr: SocketAddr = rest.first().context("ADDR:PORT")?.parse()?;
    let secs: f64 = rest.get(1).map_or(Ok(2.0), |s| s.parse())?;
    let max: u64 = rest.get(2).map_or(Ok(1_000_000), |s| s.parse())?;
    // Wait (bounded) for the server to listen.
    let ready = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                set_linger0(&s);
                break;
            }
            Err(e) if Instant::now() > ready => return Err(e).context("server not reachable"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let t = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut buf = [0u8; 1];
    while t.elapsed() < deadline && ok + failed < max {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                set_linger0(&s);
                // Wait for the server's close: a connection counts once it was accepted.
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = s.read(&mut buf);
                ok += 1;
            }
            Err(_) => failed += 1,
        }
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"conns": ok, "failed": failed, "seconds": round2(el), "conns_per_s": (ok as f64 / el).round()})
    );
    Ok(())
}
