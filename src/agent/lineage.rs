//! The process behind a flow: its executable and its parent chain, read from `/proc`.
//!
//! The kernel names a flow's process by pid and comm only (bpf/sockowner.h, emit_flow). The
//! agent adds where it came from: `/proc/PID/exe`, and the same for its parent, grandparent…
//! up to [`MAX_PARENTS`], following `/proc/PID/stat`'s ppid. Each process is read once and
//! kept in a bounded cache (a build's compiler runs reach the same shell again and again),
//! so a flow costs hash lookups, not file reads. The chain a process's flows get is put
//! together once and shared (`Arc`) by every flow of the process until its entry is read
//! again: at a million events a second, one lookup and two reference counts per event.
//!
//! A process may have exited by the time its event is read (events wait in the ring buffer
//! for up to the agent's tick): the event then says so with no `exe` and no parents; an
//! ancestor that exited ends the chain there. Nothing here fails.
//!
//! Pids are the init namespace's (what BPF reports): the agent must see the host's `/proc`.
//! A pid is reused once its process is gone; a cached entry is read again when the kernel's
//! comm for the pid no longer matches it (an exec, or most reuses), and after [`TTL`]
//! whatever happens, so a stale entry can name at worst a process gone within that time.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
#[cfg(test)]
use std::time::Instant;

pub use crate::trail::events::{Ancestor, Parents, MAX_PARENTS};

/// Processes remembered at once. Past it the oldest entry goes (read again if needed).
pub const CACHE_ENTRIES: usize = 4096;

/// Thread names remembered per process (each costs one more read to learn).
const COMMS: usize = 8;

/// How long an entry is trusted without being read again.
pub const TTL: Duration = Duration::from_secs(60);

/// What one read of `/proc/PID` gave.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Proc {
    ppid: u32,
    /// comm as `/proc/PID/stat` had it, and the comms the kernel reported for the pid since
    /// (a named thread's differs from its process's): to tell the process from a later one
    /// with its pid. At most [`COMMS`].
    comms: Vec<String>,
    exe: Option<Arc<str>>,
    /// CLOCK_BOOTTIME ns.
    read_at: u64,
    /// The parent chain as the last flow of this process got it, shared by its next flows
    /// (put together again when this entry is read again: at most [`TTL`] old).
    parents: Option<Parents>,
}

/// A process's executable and its ancestors, nearest first. Cheap to clone: both are
/// shared with the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    pub exe: Option<Arc<str>>,
    pub parents: Parents,
}

/// The bounded cache of processes read from `/proc`.
#[derive(Debug)]
pub struct ProcCache {
    procs: HashMap<u32, Proc, crate::agent::FastHash>,
    /// Pids in the order they were read, oldest first, for eviction; an entry read again is
    /// pushed again, and its older place is skipped when reached.
    order: VecDeque<(u32, u64)>,
    capacity: usize,
    proc_root: PathBuf,
    /// `/proc` reads, for tests and the curious.
    pub reads: u64,
}

impl Default for ProcCache {
    fn default() -> Self {
        ProcCache::new(CACHE_ENTRIES)
    }
}

impl ProcCache {
    pub fn new(capacity: usize) -> ProcCache {
        ProcCache {
            procs: HashMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            proc_root: PathBuf::from("/proc"),
            reads: 0,
        }
    }

    /// A cache reading another `/proc` (a fake one, in tests).
    #[cfg(test)]
    pub fn with_root(capacity: usize, proc_root: PathBuf) -> ProcCache {
        ProcCache {
            proc_root,
            ..ProcCache::new(capacity)
        }
    }

    /// Processes cached now.
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// The lineage of `pid`, whose comm the kernel reported as `comm` (empty: unknown).
    /// Empty when pid is 0 or the process is gone.
    pub fn lineage(&mut self, pid: u32, comm: &str) -> Lineage {
        self.lineage_at(pid, comm, crate::agent::boottime_ns())
    }

    /// [`Self::lineage`] at `now` (CLOCK_BOOTTIME ns): the agent has read the clock for the
    /// event already.
    pub fn lineage_at(&mut self, pid: u32, comm: &str, now: u64) -> Lineage {
        if pid == 0 {
            return Lineage::default();
        }
        // The common case: a process whose chain is already put together.
        if let Some(p) = self.fresh(pid, Some(comm), now) {
            if let Some(parents) = &p.parents {
                return Lineage {
                    exe: p.exe.clone(),
                    parents: parents.clone(),
                };
            }
        }
        // The chain as the entry had it, before it is read again.
        let before = self.procs.get(&pid).and_then(|p| p.parents.clone());
        let Some((exe, ppid)) = self.get(pid, Some(comm), now) else {
            return Lineage::default();
        };
        let mut parents = Vec::new();
        let mut next = ppid;
        while next != 0 && parents.len() < MAX_PARENTS {
            let Some((exe, ppid)) = self.get(next, None, now) else {
                break; // exited meanwhile: the chain ends here
            };
            parents.push(Ancestor {
                pid: next,
                exe: exe.map(|e| e.to_string()),
            });
            next = ppid;
        }
        // Unchanged since the last read: the same `Arc` again. The events writer keeps the
        // JSON of a chain by its `Arc` (trail/events.rs, `EXES`/`PARENTS`): a new `Arc`
        // for the same chain at every re-read (each [`TTL`]) filled that cache with copies,
        // 1.6 MiB over `rfbench churn`'s 20 hours, the most of its RSS rise.
        let parents: Parents = match before {
            Some(b) if *b == *parents => b,
            _ => parents.into(),
        };
        if let Some(p) = self.procs.get_mut(&pid) {
            p.parents = Some(parents.clone());
        }
        Lineage { exe, parents }
    }

    /// The cached entry of `pid` if it may be used as is: read less than [`TTL`] ago and
    /// (when the kernel's comm is known) naming that comm.
    fn fresh(&self, pid: u32, comm: Option<&str>, now: u64) -> Option<&Proc> {
        let comm = comm.filter(|c| !c.is_empty());
        let p = self.procs.get(&pid)?;
        let fresh = now.saturating_sub(p.read_at) < TTL.as_nanos() as u64;
        let same = comm.is_none_or(|c| p.comms.iter().any(|k| k == c));
        (fresh && same).then_some(p)
    }

    /// (exe, ppid) of `pid`, read from `/proc` if it is not cached, too old, or (when the
    /// kernel's comm is known) names another comm.
    fn get(&mut self, pid: u32, comm: Option<&str>, now: u64) -> Option<(Option<Arc<str>>, u32)> {
        if let Some(p) = self.fresh(pid, comm, now) {
            return Some((p.exe.clone(), p.ppid));
        }
        let comm = comm.filter(|c| !c.is_empty());
        self.reads += 1;
        let Some(mut p) = self.read(pid, now) else {
            // Gone: nothing to remember (the pid may be someone else's next time).
            self.procs.remove(&pid);
            return None;
        };
        // The same executable as last read: the same `Arc` (see the chain's in lineage_at).
        if let Some(old) = self.procs.get(&pid).and_then(|o| o.exe.as_ref()) {
            if p.exe.as_deref() == Some(&**old) {
                p.exe = Some(old.clone());
            }
        }
        // Still another comm than the kernel's: a thread named apart from its process (or
        // an exec since the event, which no later read can undo). Remembered, so the
        // thread's next flow is not a read again.
        if let Some(c) = comm {
            if !p.comms.iter().any(|k| k == c) && p.comms.len() < COMMS {
                p.comms.push(c.to_string());
            }
        }
        let out = (p.exe.clone(), p.ppid);
        self.insert(pid, p);
        Some(out)
    }

    fn insert(&mut self, pid: u32, p: Proc) {
        while self.procs.len() >= self.capacity && !self.procs.contains_key(&pid) {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            // Only the latest read of a pid evicts it.
            if self.procs.get(&old).is_some_and(|e| e.read_at == at) {
                self.procs.remove(&old);
            }
        }
        self.order.push_back((pid, p.read_at));
        self.procs.insert(pid, p);
        // Entries read again leave their older places behind: drop them when they pile up.
        if self.order.len() > 2 * self.capacity {
            let procs = &self.procs;
            self.order
                .retain(|(pid, at)| procs.get(pid).is_some_and(|e| e.read_at == *at));
        }
    }

    /// Reads `/proc/PID/stat` (ppid, comm) and `/proc/PID/exe`. None when the process is gone.
    fn read(&self, pid: u32, now: u64) -> Option<Proc> {
        let dir = self.proc_root.join(pid.to_string());
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let (comm, ppid) = parse_stat(&stat)?;
        // A kernel thread has no executable; a process that exited between the two reads
        // neither (it is still named, by its stat).
        let exe = std::fs::read_link(dir.join("exe"))
            .ok()
            .map(|p| Arc::from(p.to_string_lossy()));
        Some(Proc {
            ppid,
            comms: vec![comm],
            exe,
            read_at: now,
            parents: None,
        })
    }
}

/// (comm, ppid) from the text of `/proc/PID/stat`: `pid (comm) state ppid …`. The comm is
/// whatever the process named itself — spaces and parentheses included — so it runs to the
/// last `)`.
fn parse_stat(s: &str) -> Option<(String, u32)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    if close < open {
        return None;
    }
    let comm = s[open + 1..close].to_string();
    let mut rest = s[close + 1..].split_ascii_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn stat_with_odd_comm() {
        assert_eq!(
            parse_stat("42 (a) b (c)) S 7 42 42 0 -1"),
            Some(("a) b (c)".into(), 7))
        );
        assert_eq!(parse_stat("1 (init) S 0 1 1"), Some(("init".into(), 0)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("5 (x) S notanumber"), None);
    }

    /// A real child of a real shell: its exe, then the shell, then this test process.
    #[test]
    fn reads_a_live_chain_once() {
        let mut sh = Command::new("/bin/sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(sh.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let sleep: u32 = line.trim().parse().unwrap();
        // Until the fork has exec'd, the child is a copy of the shell.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{sleep}/comm")).unwrap() != "sleep\n" {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut cache = ProcCache::new(16);
        let l = cache.lineage(sleep, "sleep");
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        let sh_exe = std::fs::read_link(format!("/proc/{}/exe", sh.id())).unwrap();
        let sleep_exe = std::fs::canonicalize("/bin/sleep").unwrap();
        assert_eq!(l.exe.as_deref(), Some(sleep_exe.to_str().unwrap()));
        assert_eq!(l.parents[0].pid, sh.id());
        assert_eq!(l.parents[0].exe.as_deref(), Some(sh_exe.to_str().unwrap()));
        assert_eq!(l.parents[1].pid, std::process::id());
        assert_eq!(l.parents[1].exe.as_deref(), Some(me.to_str().unwrap()));
        assert!(l.parents.len() <= MAX_PARENTS);
        // Once per process: asking again reads nothing.
        let reads = cache.reads;
        assert_eq!(cache.lineage(sleep, "sleep"), l);
        assert_eq!(cache.reads, reads);
        // Another comm for the pid (an exec, a reused pid, a named thread): read again,
        // once.
        let _ = cache.lineage(sleep, "worker");
        assert_eq!(cache.reads, reads + 1);
        assert_eq!(cache.lineage(sleep, "worker"), l);
        assert_eq!(cache.reads, reads + 1);
        let _ = Command::new("kill").arg(sleep.to_string()).status();
        let _ = sh.wait();
        // Gone: an empty lineage, not an error, and nothing cached for the pid.
        let gone = cache.lineage(sleep, "other");
        assert_eq!(gone, Lineage::default());
        assert!(!cache.procs.contains_key(&sleep));
        assert_eq!(cache.lineage(0, ""), Lineage::default());
    }

    /// An entry read again (its TTL ran out) with nothing changed gives the same `Arc`s:
    /// the events writer's JSON cache, keyed by them, does not fill with copies.
    #[test]
    fn a_reread_keeps_the_same_arcs() {
        let mut cache = ProcCache::new(16);
        let me = std::process::id();
        let t0 = 1_000_000_000;
        let a = cache.lineage_at(me, "", t0);
        assert!(a.exe.is_some() && !a.parents.is_empty());
        let reads = cache.reads;
        let b = cache.lineage_at(me, "", t0 + TTL.as_nanos() as u64 + 1);
        assert!(cache.reads > reads, "read again after its TTL");
        assert!(Arc::ptr_eq(
            a.exe.as_ref().unwrap(),
            b.exe.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(&a.parents, &b.parents));
        // A changed chain is a new one.
        cache.procs.get_mut(&me).unwrap().parents = Some(Arc::from(vec![]));
        cache.procs.get_mut(&me).unwrap().read_at = 0;
        let c = cache.lineage_at(me, "", t0 + 3 * TTL.as_nanos() as u64);
        assert_eq!(c.parents, a.parents);
        assert!(!Arc::ptr_eq(&a.parents, &c.parents));
    }

    #[test]
    fn stays_within_capacity() {
        let mut cache = ProcCache::new(3);
        // This process and its ancestors, asked for many times over, in turn.
        let me = std::process::id();
        for _ in 0..10 {
            let _ = cache.lineage(me, "");
            let _ = cache.lineage(1, "");
        }
        assert!(cache.len() <= 3, "{}", cache.len());
        assert!(cache.order.len() <= 2 * 3 + 1);
    }
}
