//! `rfbench resolve SERVER:PORT NAMES_FILE [--expect-allow N]`: looks up every name of
//! NAMES_FILE (lines `NAME A` or `NAME AAAA`) over UDP, many queries in flight, so that a
//! ringfence job this runs in learns every answer's address through the kernel's DNS
//! binding, as a job that resolved them would (bench/harness.py's veth part: ringfence
//! holding 1k / 100k learned addresses). `dig -f` asks one name at a time: 100k names took
//! tens of seconds per run, which every paired run would pay.
//!
//! With `--expect-allow N` it then counts the entries of the `allow` trie of the ringfence
//! process it runs under (its nearest ancestor whose executable is named `ringfence`, found
//! by the map ids in that process's fdinfo) and fails below N: the measured traffic must
//! meet a trie that really holds what the bench says. Prints one JSON line.
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use libbpf_rs::MapCore;
use serde_json::json;

/// Queries in flight at once: well under the kernel's 65536-entry `queries` LRU map, and
/// enough to keep dnsmasq (single-threaded) busy.
const WINDOW: usize = 256;
// A lost query is asked again after this. 250 ms multiplied the resends (5 % of 100k in a
// debug build) and more runs ended with a name unanswered after 20 tries; at 1 s, 27 runs
// of 100k names in a row passed (release). See bench/README.md, "Learned addresses".
const RETRY_AFTER: Duration = Duration::from_millis(1000);
const TRIES: u32 = 8;

pub fn resolve(rest: &[String]) -> Result<()> {
    let usage = "usage: rfbench resolve SERVER:PORT NAMES_FILE [--expect-allow N]";
    let server: SocketAddr = rest
        .first()
        .context(usage)?
        .parse()
        .context("SERVER:PORT")?;
    let file = rest.get(1).context(usage)?;
    let expect: Option<u64> = match rest.get(2).map(String::as_str) {
        Some("--expect-allow") => Some(rest.get(3).context(usage)?.parse().context("N")?),
        Some(other) => bail!("unknown argument {other:?}\n{usage}"),
        None => None,
    };
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let mut names = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut w = line.split_whitespace();
        let (Some(n), Some(t), None) = (w.next(), w.next(), w.next()) else {
            bail!("{file}:{}: expected `NAME A|AAAA`, got {line:?}", i + 1);
        };
        let t = match t {
            "A" => RecordType::A,
            "AAAA" => RecordType::AAAA,
            other => bail!("{file}:{}: record type {other:?}: A or AAAA", i + 1),
        };
        let name = Name::from_str(n).with_context(|| format!("{file}:{}: name {n:?}", i + 1))?;
        names.push((name, t));
    }
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut sock = open_socket(bind, server)?;

    let t0 = Instant::now();
    let mut next = 0usize;
    // Queries are numbered 1, 2, ...: the DNS id is the low 16 bits, and every 65536 a new
    // socket (a new source port) takes over, so no (port, id) is ever asked twice: an
    // answer meant for an earlier query with the same id must not bind or be taken for
    // this one. Answers still due on the old socket are lost and asked again.
    let mut seq: u32 = 0;
    // seq -> (name index, sent at, tries so far)
    let mut pending: HashMap<u32, (usize, Instant, u32)> = HashMap::new();
    let mut answered = vec![false; names.len()];
    let (mut done, mut addresses, mut resent) = (0usize, 0u64, 0u64);
    let mut buf = vec![0u8; 4096];
    let send = |sock: &UdpSocket, seq: u32, (name, t): &(Name, RecordType)| -> Result<()> {
        let mut m = Message::new();
        m.set_id(seq as u16)
            .set_message_type(MessageType::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(name.clone(), *t));
        sock.send(&m.to_vec()?)?;
        Ok(())
    };
    while done < names.len() {
        while pending.len() < WINDOW && next < names.len() {
            let q = next_seq(&mut seq, &mut sock, bind, server)?;
            send(&sock, q, &names[next])?;
            pending.insert(q, (next, Instant::now(), 1));
            next += 1;
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                let Ok(m) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let key = (seq & !0xffff) | u32::from(m.id());
                let Some(&(idx, _, _)) = pending.get(&key) else {
                    continue; // an answer to a query already retried and answered
                };
                // A late answer to an id since reused names another question.
                if m.queries().first().map(|q| q.name()) != Some(&names[idx].0) {
                    continue;
                }
                pending.remove(&key);
                let got = m
                    .answers()
                    .iter()
                    .filter(|r| matches!(r.data(), Some(RData::A(_)) | Some(RData::AAAA(_))))
                    .count();
                if got == 0 {
                    bail!(
                        "{} {:?}: no address in the answer ({:?})",
                        names[idx].0,
                        names[idx].1,
                        m.response_code()
                    );
                }
                if !answered[idx] {
                    answered[idx] = true;
                    done += 1;
                    addresses += got as u64;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving answers"),
        }
        let now = Instant::now();
        let late: Vec<u32> = pending
            .iter()
            .filter(|(_, (_, at, _))| now - *at > RETRY_AFTER)
            .map(|(k, _)| *k)
            .collect();
        for old in late {
            let (idx, _, tries) = pending.remove(&old).unwrap();
            if tries >= TRIES {
                bail!(
                    "{}: no answer from {server} after {TRIES} tries",
                    names[idx].0
                );
            }
            let q = next_seq(&mut seq, &mut sock, bind, server)?;
            send(&sock, q, &names[idx])?;
            pending.insert(q, (idx, now, tries + 1));
            resent += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut out = json!({
        "names": names.len(), "addresses": addresses, "resent": resent,
        "queries_sent": names.len() as u64 + resent,
        "seconds": secs, "names_per_s": names.len() as f64 / secs,
    });
    if let Some(want) = expect {
        let (pid, n) = allow_entries_of_ancestor()?;
        out["ringfence_pid"] = pid.into();
        out["allow_entries"] = n.into();
        if n < want {
            println!("{out}");
            bail!("the allow trie of ringfence (pid {pid}) holds {n} entries, fewer than the {want} expected");
        }
    }
    println!("{out}");
    Ok(())
}

fn open_socket(bind: SocketAddr, server: SocketAddr) -> Result<UdpSocket> {
    let sock = UdpSocket::bind(bind)?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    Ok(sock)
}

/// The next query number; at every 65536th a fresh socket takes over (see `resolve`).
fn next_seq(
    seq: &mut u32,
    sock: &mut UdpSocket,
    bind: SocketAddr,
    server: SocketAddr,
) -> Result<u32> {
    *seq += 1;
    if *seq & 0xffff == 0 {
        *sock = open_socket(bind, server)?;
        *seq += 1;
    }
    Ok(*seq)
}

/// (pid, entries of its `allow` map) of the nearest ancestor process running `ringfence`.
fn allow_entries_of_ancestor() -> Result<(u32, u64)> {
    let mut pid = std::os::unix::process::parent_id();
    while pid > 1 {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == "ringfence") {
            return Ok((pid, allow_entries_of(pid)?));
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        let after = &stat[stat.rfind(')').context("/proc/PID/stat")? + 2..];
        pid = after
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .context("/proc/PID/stat: ppid")?;
    }
    bail!("not running under ringfence: no ancestor process runs a binary named ringfence")
}

fn allow_entries_of(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut seen = std::collections::HashSet::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(info) = std::fs::read_to_string(e?.path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let m = libbpf_rs::MapHandle::from_map_id(id)
            .with_context(|| format!("opening map id {id} of pid {pid}"))?;
        if m.name() == "allow" {
            return Ok(m.keys().count() as u64);
        }
    }
    bail!("ringfence (pid {pid}) holds no map named allow")
}
