//! Policies at scale (issue 16), against a real kernel in network namespaces: a 100k-entry
//! policy enforced for real, policies over the maps' capacity refused before anything is
//! attached, `allowed-cidr-files` and its errors, and the daemon refusing a job its maps
//! cannot hold while it keeps serving the others. Needs root; never skipped.

mod common;

use std::fmt::Write as _;
use std::process::Command;

use common::daemon::Daemon;
use common::*;
use testbed::{link_v4, routed_v4};

/// `n` filler networks (/80s) in 2001:db8:ffff::/48 (the testbed routes none of them), one a line.
fn filler(n: usize) -> String {
    let mut s = String::with_capacity(n * 28);
    for i in 0..n {
        let _ = writeln!(s, "2001:db8:ffff:{:x}:{:x}::/80", i >> 16, i & 0xffff);
    }
    s
}

/// `tc filter show` on the client's interfaces, egress and ingress: what a clsact attach
/// would leave (TCX links show in `attached_programs`'s `bpftool net show`).
fn tc_filters(tb: &Testbed) -> String {
    let mut out = String::new();
    for dev in ["lo", tb.client_if()] {
        for dir in ["egress", "ingress"] {
            let o = tb
                .client_cmd("tc", ["filter", "show", "dev", dev, dir])
                .output()
                .expect("running tc");
            out.push_str(&String::from_utf8_lossy(&o.stdout));
        }
    }
    out
}

fn assert_nothing_attached(tb: &Testbed, what: &str) {
    let progs = attached_programs(tb);
    assert!(progs.is_empty(), "{what}: programs attached: {progs:?}");
    let tc = tc_filters(tb);
    assert!(tc.trim().is_empty(), "{what}: tc filters left: {tc}");
}

/// 100k entries: the allowed address is the 99,990th, the unlisted one is in none. The
/// server counts what reached it.
#[test]
fn a_100k_entry_policy_is_enforced() {
    let allowed = routed_v4(12);
    let unlisted = link_v4(13);
    let tb = testbed(&[], &[sa(allowed, 80), sa(unlisted, 80)]);
    let mut list = filler(99_989);
    let _ = writeln!(list, "{allowed}:80");
    // Names and globs too, as real policies mix them (they bind nothing here).
    for i in 0..10 {
        let _ = writeln!(
            list,
            "h{i}.scale16.test *.w{i}.scale16.test ab*.g{i}.scale16.test"
        );
    }
    let policy = scratch(
        &tb,
        "big.toml",
        &format!("mode = \"block\"\nallowed-endpoints = \"\"\"\n{list}\"\"\"\n"),
    );
    let policy = policy.display().to_string();
    let script = format!(
        "{} http://{allowed}/ ; {} http://{unlisted}/ ; exit 0",
        curl(&[], "").join(" "),
        curl(&[], "").join(" ")
    );
    let t = std::time::Instant::now();
    let job = exec(&tb, &["--policy", &policy], &["sh", "-c", &script]);
    let took = t.elapsed();
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    assert_eq!(
        job.stdout,
        format!("hello from {allowed}:80\n"),
        "{}",
        job.dump()
    );
    // The receiving side: the allowed address got its request, the unlisted one nothing.
    assert_eq!(tb.http_hits(sa(allowed, 80)), 1, "{}", job.dump());
    assert_eq!(tb.http_hits(sa(unlisted, 80)), 0, "{}", job.dump());
    job.expect_flow(unlisted.into(), 80, "blocked", "direct-ip");
    // Generous (a debug build on a loaded 2-CPU VM): the point is not minutes.
    assert!(
        took.as_secs() < 30,
        "exec with a 100k-entry policy took {took:?}"
    );
    assert_nothing_attached(&tb, "after the job");
}

#[test]
fn over_capacity_is_refused_before_anything_is_attached() {
    let tb = testbed(&[], &[]);
    let policy = scratch(
        &tb,
        "over.toml",
        &format!(
            "mode = \"block\"\nallowed-endpoints = \"\"\"\n{}\"\"\"\n",
            filler(3000)
        ),
    );
    let policy = policy.display().to_string();
    let job = exec(
        &tb,
        &["--policy", &policy, "--max-static-addresses", "2048"],
        &["true"],
    );
    assert_eq!(job.code(), Some(2), "{}", job.dump());
    assert!(
        job.stderr.contains(
            "policy needs 3000 static address entries (addresses and networks); map allow \
             holds 2048: raise max-static-addresses (exec --max-static-addresses, daemon \
             config max-static-addresses)"
        ),
        "{}",
        job.dump()
    );
    assert!(job.events.is_empty(), "{}", job.dump());
    assert_nothing_attached(&tb, "static addresses over capacity");

    let job = exec(
        &tb,
        &[
            "--allow",
            "a.scale16.test b.scale16.test *.c.scale16.test",
            "--max-names",
            "2",
        ],
        &["true"],
    );
    assert_eq!(job.code(), Some(2), "{}", job.dump());
    assert!(
        job.stderr
            .contains("policy needs 3 name entries (distinct names and wildcard parents); map names holds 2: raise max-names"),
        "{}",
        job.dump()
    );
    assert_nothing_attached(&tb, "names over capacity");

    // At capacity exactly, it runs.
    let job = exec(
        &tb,
        &["--policy", &policy, "--max-static-addresses", "3000"],
        &["true"],
    );
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    assert_nothing_attached(&tb, "after the job");
}

#[test]
fn cidr_files_enforce_and_name_their_bad_lines() {
    let allowed = routed_v4(14);
    let unlisted = routed_v4(15);
    let tb = testbed(&[], &[sa(allowed, 80), sa(unlisted, 80)]);
    // Relative to the policy's directory, not the working directory.
    let dir = tb.workdir().join("cidr16");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ranges.txt"),
        format!(
            "# a provider's ranges, saved\n{}\n{allowed}/32:80   # the one we use\n",
            filler(5000)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        "mode = \"block\"\nallowed-cidr-files = [\"ranges.txt\"]\n",
    )
    .unwrap();
    let policy = dir.join("policy.toml").display().to_string();
    let script = format!(
        "{} http://{allowed}/ ; {} http://{unlisted}/ ; exit 0",
        curl(&[], "").join(" "),
        curl(&[], "").join(" ")
    );
    let job = exec(&tb, &["--policy", &policy], &["sh", "-c", &script]);
    assert_eq!(job.code(), Some(0), "{}", job.dump());
    assert_eq!(tb.http_hits(sa(allowed, 80)), 1, "{}", job.dump());
    assert_eq!(tb.http_hits(sa(unlisted, 80)), 0, "{}", job.dump());

    // A bad line: file, line, column and token; nothing attached.
    std::fs::write(
        dir.join("ranges.txt"),
        "198.51.100.0/24\n# fine\n  203.0.113.0/33\n",
    )
    .unwrap();
    let job = exec(&tb, &["--policy", &policy], &["true"]);
    assert_eq!(job.code(), Some(2), "{}", job.dump());
    let ranges = dir.join("ranges.txt").display().to_string();
    assert!(
        job.stderr.contains(&format!("{ranges}:3:3: ")) && job.stderr.contains("203.0.113.0/33"),
        "{}",
        job.dump()
    );
    assert_nothing_attached(&tb, "bad CIDR file");

    // A file that is not there: named, with the policy that names it.
    std::fs::remove_file(dir.join("ranges.txt")).unwrap();
    let job = exec(&tb, &["--policy", &policy], &["true"]);
    assert_eq!(job.code(), Some(2), "{}", job.dump());
    assert!(
        job.stderr.contains("allowed-cidr-files: cannot read") && job.stderr.contains(&ranges),
        "{}",
        job.dump()
    );
}

/// The daemon's maps hold every job's policy at once: a job that does not fit is refused
/// with the setting to raise, nothing of it stays, and the daemon goes on serving.
#[test]
fn daemon_refuses_a_job_over_capacity_and_keeps_serving() {
    let tb = testbed(&[], &[]);
    let cfg = scratch(
        &tb,
        "scale16.toml",
        "max-static-addresses = 1000\nmax-learned-addresses = 500\n",
    );
    let cfg_s = cfg.display().to_string();
    let mut d = Daemon::start(&tb, &["--config", &cfg_s]);
    let dir = tb.workdir().join("d16");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), filler(600)).unwrap();
    std::fs::write(
        dir.join("p.toml"),
        "mode = \"block\"\nallowed-cidr-files = [\"a.txt\"]\n",
    )
    .unwrap();
    let policy = dir.join("p.toml").display().to_string();

    let cg_a = d.cgroup("a");
    d.start_job("scale16-a", &cg_a, &["--policy", &policy]);
    let cg_b = d.cgroup("b");
    let cg_b_s = cg_b.display().to_string();
    let (ok, _, err) = d.cli(&[
        "job",
        "start",
        "--id",
        "scale16-b",
        "--cgroup",
        &cg_b_s,
        "--policy",
        &policy,
    ]);
    assert!(!ok, "a job over capacity started");
    assert!(
        err.contains(
            "this job's policy needs 600 static address entries (addresses and networks) and \
             the running jobs hold 600 (1200 in all); map allow holds 1000: raise \
             max-static-addresses"
        ),
        "{err}"
    );
    // Still serving: the first job runs, nothing of the second is in the maps, and a job
    // that fits starts.
    let st = d.status();
    let ids: Vec<&str> = st["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["scale16-a"], "{st}");
    let allow = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "allow")
        .cloned()
        .unwrap();
    assert_eq!(allow["capacity"], 1500, "{st}");
    assert_eq!(allow["entries"], 600, "{st}");
    let cg_c = d.cgroup("c");
    d.start_job("scale16-c", &cg_c, &["--allow", "198.51.100.0/24"]);
    d.ok(&["job", "end", "--id", "scale16-c"]);
    d.ok(&["job", "end", "--id", "scale16-a"]);

    // Pinned maps keep their sizes: a daemon configured otherwise is told to unload.
    d.stop();
    std::fs::write(
        &cfg,
        "max-static-addresses = 2000\nmax-learned-addresses = 500\n",
    )
    .unwrap();
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", tb.client_ns()))
        .arg(RINGFENCE)
        .args(["run", "--config", &cfg_s, "--socket"])
        .arg(&d.socket)
        .arg("--bpffs")
        .arg(&d.bpffs)
        .arg("--state-dir")
        .arg(d.dir.join("state"))
        .arg("--data-dir")
        .arg(d.dir.join("data"));
    let (st, _, err) = run_timeout(c, JOB_TIMEOUT);
    assert!(
        !st.success(),
        "a daemon with other map sizes adopted the pins"
    );
    assert!(
        err.contains("has map allow sized for 1500 entries; this configuration asks for 2500")
            && err.contains("ringfence unload"),
        "{err}"
    );
}

/// A job's policy travels inline to the daemon, which reads at most 4 MiB a request: a larger
/// one is refused by the client with the cause, before it connects (no daemon here at all).
#[test]
fn a_job_too_large_for_the_daemon_is_refused_by_the_client() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.txt"), filler(200_000)).unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "allowed-cidr-files = [\"big.txt\"]\n").unwrap();
    let mut c = Command::new(RINGFENCE);
    c.args([
        "job",
        "start",
        "--id",
        "scale16-big",
        "--cgroup",
        "/nonexistent",
    ])
    .arg("--policy")
    .arg(&policy)
    .arg("--socket")
    .arg(dir.path().join("no-daemon.sock"));
    let (st, _, err) = run_timeout(c, JOB_TIMEOUT);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(
        err.contains("more than the daemon takes (4194304 bytes)")
            && err.contains("allowed-cidr-files included"),
        "{err}"
    );
}
