//! `rfbench policy`: what a large policy costs before its job starts. A generated policy file
//! of 1k, 10k, 100k and 1M endpoints (85 % CIDRs and addresses, IPv4 and IPv6; 10 % exact
//! names; 3 % `*.` wildcards; 2 % label globs) is parsed and compiled (`parse+compile`: the
//! TOML text to `Compiled`, as `exec` and `job start` do it), then written into a fresh
//! dataplane's maps (`load`: `Dataplane::install_policy`, one map update per entry), and the
//! maps' memlock read back (fdinfo, as bpftool prints it).
//!
//! Baseline in the same run: the 1k row. `per-entry` is each row's time per entry and
//! `x1k` its ratio to the 1k row's per-entry time: a linear compile keeps it near 1 (the
//! quadratic one this replaced was ~10x at 10k and ~100x at 100k). The run fails when the
//! 100k row's per-entry parse+compile time is more than 4x the 10k row's (quadratic
//! behaviour coming back), or 100k takes more than 5 s (the debug build `--quick` uses takes ~1.5 s).
//! `--quick` runs 1k, 10k and 100k.
use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{bail, Result};
use ringfence::kernel::capacity::{Capacity, Usage};
use ringfence::kernel::dataplane::{Dataplane, Options};
use ringfence::policy::PolicyBuilder;
use serde_json::json;

use super::{loadavg, machine, mix, my_maps, round2, write_json, Args};

/// The policy file of `n` endpoints. Deterministic, so runs compare.
pub fn policy_text(n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 24 + 128);
    s.push_str("mode = \"block\"\ndns-resolvers = [\"127.0.0.53\"]\nallowed-endpoints = \"\"\"\n");
    for i in 0..n {
        let r = mix(i) % 100;
        let h = mix(i ^ 0xabcd);
        match r {
            // IPv6 networks and hosts, scattered over 2001:db8::/32.
            0..=59 => {
                let _ = writeln!(
                    s,
                    "2001:db8:{:x}:{:x}::/64",
                    (h >> 48) as u16,
                    (i & 0xffff) as u16 ^ ((h >> 16) as u16)
                );
            }
            60..=74 => {
                let _ = writeln!(
                    s,
                    "[2001:db8:{:x}:{:x}::{:x}:{:x}]:*",
                    (h >> 48) as u16,
                    (h >> 32) as u16,
                    (i >> 16) as u16,
                    i as u16
                );
            }
            // IPv4: hosts across 198.51.100.0/24 and 203.0.113.0/24, each on its own port
            // (duplicates of a network merge their ports, as in a real policy).
            75..=84 => {
                let net = if h & 1 == 0 {
                    "198.51.100"
                } else {
                    "203.0.113"
                };
                let _ = writeln!(s, "{net}.{}:{}", (h >> 8) % 256, 1 + i % 8);
            }
            85..=94 => {
                let _ = writeln!(s, "h{i}.svc{}.bench.test:443", h % 1000);
            }
            95..=97 => {
                let _ = writeln!(s, "*.w{i}.bench.test:*");
            }
            _ => {
                let _ = writeln!(s, "pre{}*.g{i}.bench.test", h % 100);
            }
        }
    }
    s.push_str("\"\"\"\n");
    s
}

struct Row {
    entries: u64,
    parse_ms: f64,
    usage: Usage,
    load_ms: Option<f64>,
    memlock: Vec<(String, u64)>,
}

fn measure(n: u64, load: bool) -> Result<Row> {
    let text = policy_text(n);
    let t = Instant::now();
    let policy = PolicyBuilder::from_toml_str(&text, "bench.toml")?.build()?;
    let compiled = policy.compile()?;
    let parse_ms = t.elapsed().as_secs_f64() * 1e3;
    let usage = Usage::of(&compiled);
    if !load {
        return Ok(Row {
            entries: n,
            parse_ms,
            usage,
            load_ms: None,
            memlock: vec![],
        });
    }
    let d = Capacity::default();
    let mut dp = Dataplane::load(&Options {
        capacity: Capacity {
            static_addresses: (usage.static_addresses as u32).max(d.static_addresses),
            names: (usage.names as u32).max(d.names),
            ..d
        },
        ..Default::default()
    })?;
    let t = Instant::now();
    dp.install_policy(7, &compiled, &policy.dns_resolvers)?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let memlock = my_maps()
        .into_iter()
        .filter(|(_, name, _)| name == "allow" || name == "allow_cidrs" || name == "names")
        .map(|(_, name, m)| (name, m))
        .collect();
    drop(dp);
    Ok(Row {
        entries: n,
        parse_ms,
        usage,
        load_ms: Some(load_ms),
        memlock,
    })
}

pub fn policy(args: &Args) -> Result<()> {
    let sizes: &[u64] = if args.quick {
        &[1_000, 10_000, 100_000]
    } else {
        &[1_000, 10_000, 100_000, 1_000_000]
    };
    // Loading needs root and a kernel; parsing does not.
    let load = super::is_root();
    let load0 = loadavg();
    let mut rows = Vec::new();
    for &n in sizes {
        rows.push(measure(n, load)?);
    }
    let base = rows[0].parse_ms / rows[0].entries as f64;
    let base_load = rows[0].load_ms.map(|l| l / rows[0].entries as f64);
    println!("== policy: parse+compile and load, by policy size (baseline: the 1k row, per entry)");
    println!(
        "{:>9} {:>8} {:>7} {:>7} {:>13} {:>10} {:>6} {:>10} {:>10} {:>6} {:>12} {:>12}",
        "entries",
        "static",
        "names",
        "inbound",
        "parse+compile",
        "per-entry",
        "x1k",
        "load",
        "per-entry",
        "x1k",
        "allow memlock",
        "names memlock"
    );
    let mut out = Vec::new();
    for r in &rows {
        let per = r.parse_ms / r.entries as f64;
        let load_per = r.load_ms.map(|l| l / r.entries as f64);
        // "allow": both halves of the allow map, host entries and CIDRs (bpf/maps.h).
        let mem = |name: &str| -> u64 {
            r.memlock
                .iter()
                .filter(|(n, _)| n == name || (name == "allow" && n == "allow_cidrs"))
                .map(|(_, m)| *m)
                .sum()
        };
        println!(
            "{:>9} {:>8} {:>7} {:>7} {:>10.1} ms {:>7.2} us {:>6.2} {:>7} {:>10} {:>6} {:>9.1} MiB {:>9.1} MiB",
            r.entries,
            r.usage.static_addresses,
            r.usage.names,
            r.usage.inbound,
            r.parse_ms,
            per * 1e3,
            per / base,
            r.load_ms.map_or("-".into(), |l| format!("{l:.0} ms")),
            load_per.map_or("-".into(), |l| format!("{:.2} us", l * 1e3)),
            match (load_per, base_load) {
                (Some(l), Some(b)) => format!("{:.2}", l / b),
                _ => "-".into(),
            },
            mem("allow") as f64 / 1048576.0,
            mem("names") as f64 / 1048576.0,
        );
        out.push(json!({
            "entries": r.entries,
            "static": r.usage.static_addresses,
            "names": r.usage.names,
            "parse_compile_ms": round2(r.parse_ms),
            "parse_compile_us_per_entry": round2(per * 1e3),
            "ratio_to_1k": round2(per / base),
            "load_ms": r.load_ms.map(round2),
            "load_us_per_entry": load_per.map(|l| round2(l * 1e3)),
            "memlock_allow": mem("allow"),
            "memlock_names": mem("names"),
            "allow_bytes_per_static_entry": if r.usage.static_addresses > 0 { round2(mem("allow") as f64 / r.usage.static_addresses as f64) } else { 0.0 },
            "names_bytes_per_entry": if r.usage.names > 0 { round2(mem("names") as f64 / r.usage.names as f64) } else { 0.0 },
        }));
    }
    if !load {
        println!("(load: not measured, needs root)");
    }
    println!("load average: {load0} -> {}", loadavg());
    write_json(
        &args.json,
        &json!({"policy": out, "machine": machine(), "quick": args.quick}),
    )?;
    // Regression check: quadratic growth, or a 100k policy no longer ready in well under
    // the time a job start can spend.
    let row = |n: u64| rows.iter().find(|r| r.entries == n);
    if let (Some(a), Some(b)) = (row(10_000), row(100_000)) {
        let growth = (b.parse_ms / b.entries as f64) / (a.parse_ms / a.entries as f64);
        if growth > 4.0 {
            bail!(
                "policy: parse+compile per entry grew {growth:.1}x from 10k to 100k entries \
                 (more than 4x: something quadratic is back)"
            );
        }
        if b.parse_ms > 5000.0 {
            bail!(
                "policy: parse+compile of 100k entries took {:.0} ms (more than 5 s)",
                b.parse_ms
            );
        }
    }
    Ok(())
}
