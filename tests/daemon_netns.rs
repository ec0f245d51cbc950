//! The host daemon against real traffic: `ringfence run` in a testbed's client namespace,
//! jobs as cgroups with different policies, real dnsmasq, curl and python senders; every
//! verdict proven on the server side. Needs root; never skipped.

mod common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use common::daemon::{in_job, Daemon};
use common::vethjob::VethJob;
use common::*;
use testbed::{link_v4, DNS_V4};

fn dns_flag() -> String {
    DNS_V4.to_string()
}

/// curl inside job cgroup `cg`: true when it got the page.
fn curl_in(tb: &Testbed, cg: &std::path::Path, url: &str) -> bool {
    let (st, out, _) = run_timeout(in_job(tb, cg, &curl(&["-4"], url)), JOB_TIMEOUT);
    st.success() && out.starts_with("hello from ")
}

/// Two jobs with different policies at once: each reaches only what its own policy allows,
/// and each trail and report holds only its own flows, under its own steps.
#[test]
fn two_jobs_each_see_only_their_own_verdicts() {
    let (a, b) = (link_v4(10), link_v4(11));
    let tb = testbed(
        &[DnsRecord::a("a.test", a), DnsRecord::a("b.test", b)],
        &[sa(a, 80), sa(b, 80)],
    );
    let mut d = Daemon::start(&tb, &[]);
    let (cga, cgb) = (d.cgroup("a"), d.cgroup("b"));
    let dns = dns_flag();
    d.start_job(
        "job-a",
        &cga,
        &[
            "--mode",
            "block",
            "--allow",
            "a.test:80",
            "--dns-resolver",
            &dns,
        ],
    );
    d.start_job(
        "job-b",
        &cgb,
        &[
            "--mode",
            "block",
            "--allow",
            "b.test:80",
            "--dns-resolver",
            &dns,
        ],
    );
    d.ok(&["job", "step", "--id", "job-a", "--name", "fetch"]);

    assert!(curl_in(&tb, &cga, "http://a.test/"), "job-a's allowed name");
    assert!(
        !curl_in(&tb, &cga, "http://b.test/"),
        "job-a reached b.test"
    );
    assert!(
        !curl_in(&tb, &cgb, "http://a.test/"),
        "job-b reached a.test"
    );
    assert!(curl_in(&tb, &cgb, "http://b.test/"), "job-b's allowed name");
    // Direct IP: blocked for both.
    assert!(!curl_in(&tb, &cga, &format!("http://{b}/")));
    // The server saw exactly the two allowed fetches.
    assert_eq!(tb.http_hits(sa(a, 80)), 1, "{}", d.log());
    assert_eq!(tb.http_hits(sa(b, 80)), 1, "{}", d.log());

    let st = d.status();
    assert_eq!(st["jobs"].as_array().unwrap().len(), 2, "{st}");
    let live = d.ok(&["report", "job-a", "--format", "json"]);
    let live: serde_json::Value = serde_json::from_str(&live).expect("report JSON");
    assert!(live.to_string().contains("a.test"), "{live}");

    let ra = d.ok(&["job", "end", "--id", "job-a", "--format", "markdown"]);
    let ev_a = d.events("job-a");
    assert!(
        ev_a.iter().all(|e| e["job"] == "job-a"),
        "another job's event in job-a's file"
    );
    // The step marker is in the file, and the flow after it carries the step.
    assert!(
        ev_a.iter()
            .any(|e| e["type"] == "step" && e["step"] == "fetch"),
        "{ev_a:?}"
    );
    let to_a: Vec<_> = ev_a
        .iter()
        .filter(|e| e.get("verdict").is_some() && e["dst"] == a.to_string())
        .collect();
    assert!(
        !to_a.is_empty()
            && to_a
                .iter()
                .all(|e| e["step"] == "fetch" && e["verdict"] == "allowed"),
        "{ev_a:?}"
    );
    // b.test: the query itself was refused.
    assert!(
        ev_a.iter().any(|e| e.get("verdict").is_some()
            && e["domain"] == "b.test"
            && e["reason"] == "dns-query"
            && e["verdict"] == "blocked"),
        "{ev_a:?}"
    );
    assert!(
        ev_a.iter().any(|e| e.get("verdict").is_some()
            && e["dst"] == b.to_string()
            && e["reason"] == "direct-ip"
            && e["verdict"] == "blocked"),
        "{ev_a:?}"
    );
    assert!(ra.contains("a.test"), "{ra}");
    assert!(ra.contains("blocked"), "{ra}");
    // job-b goes on unaffected by job-a's end.
    assert!(curl_in(&tb, &cgb, "http://b.test/"));
    assert_eq!(tb.http_hits(sa(b, 80)), 2);
    let rb = d.ok(&["job", "end", "--id", "job-b"]);
    assert!(rb.contains("b.test"), "{rb}");
    assert!(d.events("job-b").iter().all(|e| e["job"] == "job-b"));
    // Nothing of either job is left in the maps.
    let st = d.status();
    assert_eq!(st["jobs"].as_array().unwrap().len(), 0);
    for m in st["maps"].as_array().unwrap() {
        if ["jobs", "allow", "names", "resolvers", "flows", "queries"]
            .contains(&m["map"].as_str().unwrap())
        {
            assert_eq!(m["entries"], 0, "{m} after both jobs ended");
        }
    }
}

/// Where a job in the 32-job test lives: a cgroup in the daemon's namespace, or a namespace
/// of its own behind a veth whose host side is the job (`--interface`).
enum JobHome {
    Cgroup(std::path::PathBuf),
    Veth(VethJob),
}

impl JobHome {
    fn command(&self, tb: &Testbed, argv: &[String]) -> std::process::Command {
        match self {
            JobHome::Cgroup(cg) => in_job(tb, cg, argv),
            JobHome::Veth(v) => v.command(argv),
        }
    }
}

/// 32 jobs at once, half of them cgroups and half veth-bound namespaces, in block and in
/// audit mode, each allowed only its own name and port: each reaches its own server port,
/// none in block mode reaches the next job's, and each trail holds only its own flows.
#[test]
fn thirty_two_jobs_at_once() {
    // Under qemu's emulation (vm-tests sets RF_UNDER_EMULATION) 8 jobs, still both kinds in
    // both modes: what differs between kernels is the attach paths and hooks, and 32 there
    // cost minutes of CI; the 32 run on the host kernel.
    let n: u16 = if std::env::var_os("RF_UNDER_EMULATION").is_some() {
        8
    } else {
        32
    };
    let web = link_v4(12);
    let records: Vec<DnsRecord> = (0..n)
        .map(|i| DnsRecord::a(&format!("j{i}.test"), web))
        .collect();
    let http: Vec<_> = (0..n).map(|i| sa(web, 8000 + i)).collect();
    let tb = testbed(&records, &http);
    let mut d = Daemon::start(&tb, &[]);
    let dns = dns_flag();
    // Odd jobs are veth-bound; two of every eight audit (one of each kind).
    let veth = |i: u16| i % 2 == 1;
    let audit = |i: u16| i % 8 == 3 || i % 8 == 6;
    let homes: Vec<JobHome> = (0..n)
        .map(|i| {
            if veth(i) {
                JobHome::Veth(VethJob::new(&tb, (i / 2) as u8))
            } else {
                JobHome::Cgroup(d.cgroup(&format!("j{i}")))
            }
        })
        .collect();
    for i in 0..n {
        let allow = format!("j{i}.test:{}", 8000 + i);
        let mode = if audit(i) { "audit" } else { "block" };
        let id = format!("j{i}");
        let target = match &homes[i as usize] {
            JobHome::Cgroup(cg) => ["--cgroup".to_string(), cg.display().to_string()],
            JobHome::Veth(v) => ["--interface".to_string(), v.host_if.clone()],
        };
        d.ok(&[
            "job",
            "start",
            "--id",
            &id,
            &target[0],
            &target[1],
            "--mode",
            mode,
            "--allow",
            &allow,
            "--dns-resolver",
            &dns,
        ]);
    }
    assert_eq!(d.status()["jobs"].as_array().unwrap().len(), n as usize);
    // Eight jobs at a time (emulated kernels are slow): its own name and port, then the
    // next job's address and port. What must succeed gets time enough; a blocked attempt
    // gives up sooner.
    let slow = ["-4", "--connect-timeout", "20", "--max-time", "30"];
    let mut cmds: Vec<_> = (0..n)
        .map(|i| {
            let next = (i + 1) % n;
            let home = &homes[i as usize];
            let own = home.command(
                &tb,
                &curl(&slow, &format!("http://j{i}.test:{}/", 8000 + i)),
            );
            let other_opts: &[&str] = if audit(i) { &slow } else { &["-4"] };
            let other = home.command(
                &tb,
                &curl(other_opts, &format!("http://{web}:{}/", 8000 + next)),
            );
            Some((own, other))
        })
        .collect();
    let mut results = Vec::new();
    for batch in cmds.chunks_mut(8) {
        let hs: Vec<_> = batch
            .iter_mut()
            .map(|c| {
                let (own, other) = c.take().unwrap();
                std::thread::spawn(move || {
                    let (a, _, _) = run_timeout(own, JOB_TIMEOUT);
                    let (b, _, _) = run_timeout(other, JOB_TIMEOUT);
                    (a.success(), b.success())
                })
            })
            .collect();
        results.extend(hs.into_iter().map(|h| h.join().unwrap()));
    }
    for (i, (own, other)) in results.iter().enumerate() {
        let i = i as u16;
        let kind = if veth(i) { "veth" } else { "cgroup" };
        assert!(
            own,
            "{kind} job j{i} could not reach its own name\n{}",
            d.log()
        );
        assert_eq!(
            *other,
            audit(i),
            "{kind} job j{i} reaching the next job's port (audit mode: {})",
            audit(i)
        );
    }
    // The servers' own counts: each port had its own job's fetch, plus the previous job's
    // direct-IP attempt when that job audits; nothing else.
    for i in 0..n {
        let prev = (i + n - 1) % n;
        assert_eq!(
            tb.http_hits(sa(web, 8000 + i)),
            1 + usize::from(audit(prev)),
            "port {}",
            8000 + i
        );
    }
    for i in 0..n {
        let id = format!("j{i}");
        let r = d.ok(&["job", "end", "--id", &id, "--format", "json"]);
        let r: serde_json::Value = serde_json::from_str(&r).unwrap();
        let ev = d.events(&id);
        assert!(
            ev.iter().all(|e| e["job"] == id.as_str()),
            "{id}: another job's event"
        );
        let flows: Vec<_> = ev.iter().filter(|e| e.get("verdict").is_some()).collect();
        let next = (i + 1) % n;
        let want = if audit(i) { "audited" } else { "blocked" };
        assert!(
            flows
                .iter()
                .any(|e| e["port"] == 8000 + next && e["verdict"] == want),
            "{id}: no {want} event for the direct-IP attempt\n{r}\n{ev:?}"
        );
        assert!(
            flows
                .iter()
                .any(|e| e["port"] == 8000 + i && e["verdict"] == "allowed"),
            "{id}: no allowed event for its own fetch\n{ev:?}"
        );
        // Only its own connections and lookups: no other job's flow leaked into this trail.
        // (A veth job's trail also holds what its namespace's kernel sends on the link, such
        // as IPv6 multicast listener reports: they came from the job's device.)
        assert!(
            flows.iter().all(
                |e| !["tcp", "udp"].contains(&e["proto"].as_str().unwrap_or(""))
                    || e["port"] == 8000 + i
                    || e["port"] == 8000 + next
                    || e["port"] == 53
            ),
            "{id}: a flow that is not this job's\n{ev:?}"
        );
        // Named after the process that sent it, or not named: never after a kernel thread
        // that happened to be running (a veth job's packets cross into the host there).
        assert!(
            flows.iter().all(|e| e["pid"] == 0 || e["comm"] == "curl"),
            "{id}: a flow named after a process that did not send it\n{ev:?}"
        );
    }
    let st = d.status();
    assert_eq!(st["jobs"].as_array().unwrap().len(), 0, "{st}");
    for m in st["maps"].as_array().unwrap() {
        if [
            "jobs",
            "allow",
            "names",
            "resolvers",
            "flows",
            "queries",
            "ifjobs",
        ]
        .contains(&m["map"].as_str().unwrap())
        {
            assert_eq!(m["entries"], 0, "{m} after every job ended");
        }
    }
}

/// kill -9 of the daemon under traffic: nothing disallowed gets out while it is dead, allowed
/// names still resolve and bind (in the kernel), an established connection keeps working;
/// the restarted daemon takes the job over and the events of the dead time are in its trail.
#[test]
fn kill9_and_restart_under_traffic() {
    let (ok_addr, bad) = (link_v4(13), link_v4(14));
    let tb = testbed(
        &[
            DnsRecord::a("ok.test", ok_addr),
            DnsRecord::a("late.test", ok_addr),
        ],
        &[sa(ok_addr, 80)],
    );
    tb.start_udp_echo(&[sa(bad, 9999)]).unwrap();
    let mut d = Daemon::start(&tb, &[]);
    let cg = d.cgroup("k");
    let dns = dns_flag();
    d.start_job(
        "k",
        &cg,
        &[
            "--mode",
            "block",
            "--allow",
            "ok.test:80 late.test:80",
            "--dns-resolver",
            &dns,
        ],
    );

    // An established connection, opened before the kill, used after it. The answer is read
    // to its end (the server closes): it may come in more than one segment.
    let script = String::from(
        "import socket,sys,time\n\
         s=socket.create_connection(('ok.test',80),timeout=5)\n\
         sys.stdout.write('connected\\n'); sys.stdout.flush()\n\
         sys.stdin.readline()\n\
         s.sendall(b'GET / HTTP/1.0\\r\\nHost: ok.test\\r\\n\\r\\n')\n\
         b=b''\n\
         while True:\n\
         \x20 d=s.recv(4096)\n\
         \x20 if not d: break\n\
         \x20 b+=d\n\
         print(b.decode(errors='replace'))\n",
    );
    let mut held = in_job(&tb, &cg, &["python3".into(), "-c".into(), script]);
    held.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut held = held.spawn().unwrap();
    let mut line = [0u8; 10];
    held.stdout.as_mut().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"connected\n");

    // A sender that never stops trying the disallowed address.
    let flood = "import socket,time\nend=time.time()+20\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 while time.time()<end:\n  try: s.sendto(b'x', ('BAD',9999))\n  except OSError: pass\n  time.sleep(0.01)\n"
        .replace("BAD", &bad.to_string());
    let mut flood = in_job(&tb, &cg, &["python3".into(), "-c".into(), flood])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    d.kill9();
    // Dead: the held flow works (the test server waits 5 s for a request: use it now).
    held.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut out = String::new();
    held.stdout
        .as_mut()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        out.contains("hello from"),
        "the established connection broke: {out:?}"
    );
    let _ = held.wait();
    // A name never looked up before resolves, binds and connects.
    assert!(
        curl_in(&tb, &cg, "http://late.test/"),
        "an allowed name did not work with the daemon dead"
    );
    // A direct-IP connection is still refused.
    assert!(!curl_in(&tb, &cg, &format!("http://{bad}:9999/")));
    std::thread::sleep(Duration::from_secs(1));

    d.spawn();
    let st = d.status();
    assert_eq!(st["adopted"], true, "{st}");
    assert_eq!(st["jobs"][0]["id"], "k", "{st}");
    // Enforcement never stopped, before, during or after: nothing reached the address.
    let _ = flood.wait();
    assert_eq!(
        tb.udp_hits(sa(bad, 9999)),
        0,
        "a disallowed datagram arrived\n{}",
        d.log()
    );
    assert_eq!(tb.http_hits(sa(ok_addr, 80)), 2);
    // The dead time's events were read from the pinned ring buffer, or counted lost.
    let r = d.ok(&["job", "end", "--id", "k", "--format", "json"]);
    let ev = d.events("k");
    let late = ev
        .iter()
        .any(|e| e["type"] == "dns" && e["name"] == "late.test");
    let lost = r.contains("lost while no daemon ran");
    assert!(
        late || lost,
        "the answer bound while the daemon was dead is neither in the trail nor counted lost\n{r}"
    );
    assert!(ev.iter().any(|e| e.get("verdict").is_some()
        && e["dst"] == bad.to_string()
        && e["verdict"] == "blocked"));
}

/// A daemon of another build (another ABI) refuses the pinned maps with a clear error; the
/// pins stay for the build that made them.
#[test]
fn abi_mismatch_is_refused() {
    let tb = testbed(&[], &[]);
    let mut d = Daemon::start(&tb, &[]);
    d.stop();
    let pins = ringfence::kernel::pins::Pins::new(&d.bpffs);
    pins.overwrite_abi(0xdead_beef)
        .expect("rewriting the ABI record");
    let err = d.start_fails();
    assert!(err.contains("ABI version 0x00000000deadbeef"), "{err}");
    assert!(err.contains("ringfence unload"), "{err}");
    assert!(
        d.bpffs.join("maps").join("allow").exists(),
        "the pins were touched"
    );
}

/// The socket: only root (and a configured group) reach it; a job's process in that group
/// is still refused; malformed, oversized and wrong requests get an error and change nothing.
#[test]
fn control_socket_refuses_jobs_and_bad_input() {
    let web = link_v4(15);
    let tb = testbed(&[DnsRecord::a("s.test", web)], &[sa(web, 80)]);
    // The socket's group: `daemon` (gid 1 on Debian), which `nobody` is not in.
    let cfg = scratch(&tb, "daemon.toml", "group = \"daemon\"\n");
    let cfg = cfg.display().to_string();
    let mut d = Daemon::start(&tb, &["--config", &cfg]);
    let cg = d.cgroup("s");
    let dns = dns_flag();
    d.start_job(
        "s",
        &cg,
        &[
            "--mode",
            "block",
            "--allow",
            "s.test:80",
            "--dns-resolver",
            &dns,
        ],
    );
    let sock = d.socket.display().to_string();
    let rf = RINGFENCE.to_string();

    // A stranger (nobody, no groups): the socket's mode keeps it out.
    let argv = as_nobody(&[&rf, "status", "--socket", &sock]);
    let (st, _, err) = run_timeout(client(&tb, &argv), JOB_TIMEOUT);
    assert!(!st.success() && err.contains("permission denied"), "{err}");
    // The job's own process, in the socket's group: refused by the daemon.
    let argv: Vec<String> = [
        "setpriv",
        "--reuid=65534",
        "--regid=1",
        "--clear-groups",
        "--",
        &rf,
        "job",
        "end",
        "--id",
        "s",
        "--socket",
        &sock,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (st, _, err) = run_timeout(in_job(&tb, &cg, &argv), JOB_TIMEOUT);
    assert!(
        !st.success() && err.contains("inside job"),
        "the job reached its own control: {err}"
    );
    // The same user outside any job may (it is in the group).
    let argv: Vec<String> = [
        "setpriv",
        "--reuid=65534",
        "--regid=1",
        "--clear-groups",
        "--",
        &rf,
        "status",
        "--socket",
        &sock,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (st, out, err) = run_timeout(client(&tb, &argv), JOB_TIMEOUT);
    assert!(st.success() && out.contains("1 jobs"), "{out}{err}");

    // Bad requests, sent raw.
    let raw = |bytes: &[u8]| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(raw(b"{not json\n").contains("malformed request"));
    assert!(raw(b"{\"op\":\"launch_missiles\"}\n").contains("malformed request"));
    let big = vec![b'x'; 5 << 20];
    assert!(raw(&big).contains("larger than"));
    for (args, want) in [
        (vec!["job", "end", "--id", "nope"], "no job \"nope\""),
        (
            vec![
                "job", "start", "--id", "s", "--pid", "1", "--allow", "x.test",
            ],
            "already running",
        ),
        (
            vec!["job", "start", "--id", "t", "--cgroup", "/no/such/cgroup"],
            "does not exist",
        ),
        (
            vec!["job", "start", "--id", "t", "--interface", "nosuchif0"],
            "does not exist",
        ),
        (
            vec!["job", "start", "--id", "a/b", "--pid", "1"],
            "only letters",
        ),
    ] {
        let (ok, _, err) = d.cli(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    let bad_policy = scratch(
        &tb,
        "bad.toml",
        "mode = \"block\"\nallowed-endpoints = \"good.test:443 bad..name\"\n",
    );
    let (ok, _, err) = d.cli(&[
        "job",
        "start",
        "--id",
        "t",
        "--cgroup",
        &cg.display().to_string(),
        "--policy",
        &bad_policy.display().to_string(),
    ]);
    assert!(!ok && err.contains("bad.toml:2:"), "{err}");
    // Still serving, still one job, still enforcing.
    assert_eq!(d.status()["jobs"].as_array().unwrap().len(), 1);
    assert!(curl_in(&tb, &cg, "http://s.test/"));
    assert!(!curl_in(
        &tb,
        &cg,
        &format!("http://{}/", IpAddr::from(link_v4(16)))
    ));
}
