//! ringfence's own failures: bad policy → exit 2 naming line:column and the token, with
//! nothing attached; runtime problems (not root, missing interface) → exit 1 naming the
//! cause, and the job's command never runs. Each test runs in a fresh client namespace so
//! "nothing attached" can be checked exactly.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

/// True if `text` contains `LINE:COL` (COL any number) for the given line.
fn names_line_col(text: &str, line: usize) -> bool {
    let needle = format!("{line}:");
    text.match_indices(&needle).any(|(i, _)| {
        let before_ok = i == 0 || !text.as_bytes()[i - 1].is_ascii_digit();
        let after = &text[i + needle.len()..];
        before_ok && after.starts_with(|c: char| c.is_ascii_digit())
    })
}

/// Runs `exec --policy FILE -- touch MARKER` with `policy` as the file; asserts exit 2, that
/// stderr names `line`:column and `token`, that the command never ran, and nothing is attached.
fn rejects_policy(policy: &str, line: usize, token: &str) {
    let tb = testbed(&[], &[]);
    let file = scratch(&tb, "policy.toml", policy);
    let marker = tb.workdir().join("ran");
    let (st, out, err) = run_timeout(
        tb.client_cmd(
            RINGFENCE,
            [
                "exec",
                "--policy",
                file.to_str().unwrap(),
                "--",
                "touch",
                marker.to_str().unwrap(),
            ],
        ),
        JOB_TIMEOUT,
    );
    let shown = format!("status {st:?}\nstdout:\n{out}\nstderr:\n{err}\npolicy:\n{policy}");
    assert_eq!(st.code(), Some(2), "{shown}");
    assert!(
        names_line_col(&err, line),
        "stderr does not name {line}:<column>\n{shown}"
    );
    assert!(
        err.contains(token),
        "stderr does not name {token:?}\n{shown}"
    );
    assert!(
        !marker.exists(),
        "the job ran despite a bad policy\n{shown}"
    );
    let attached = attached_programs(&tb);
    assert!(attached.is_empty(), "left attached: {attached:?}\n{shown}");
}

#[test]
fn bad_port_is_rejected_with_position() {
    rejects_policy(
        "mode = \"block\"\nallowed-endpoints = \"\"\"\ngithub.test:443\ngithub.test:99999\n\"\"\"\n",
        4,
        "99999",
    );
}

#[test]
fn bad_cidr_is_rejected_with_position() {
    rejects_policy(
        "mode = \"block\"\nallowed-endpoints = \"\"\"\n198.51.100.0/24\n  203.0.113.0/33:443\n\"\"\"\n",
        4,
        "203.0.113.0/33",
    );
}

#[test]
fn unknown_key_is_rejected_with_position() {
    rejects_policy(
        "mode = \"block\"\ncolour = \"blue\"\nallowed-endpoints = \"github.test\"\n",
        2,
        "colour",
    );
}

#[test]
fn bad_usage_exits_2() {
    let tb = testbed(&[], &[]);
    for args in [
        vec!["exec", "--mode", "sideways", "--", "true"],
        vec!["exec", "--allow", "github.test:http", "--", "true"],
        vec!["exec", "--direct-ip", "maybe", "--", "true"],
    ] {
        let (st, out, err) = run_timeout(tb.client_cmd(RINGFENCE, &args), JOB_TIMEOUT);
        assert_eq!(
            st.code(),
            Some(2),
            "{args:?}\nstdout:\n{out}\nstderr:\n{err}"
        );
        assert!(!err.trim().is_empty(), "{args:?}: exit 2 without a message");
    }
    assert!(attached_programs(&tb).is_empty());
}

/// Insights' bad input: exit 2 naming the cause, before anything runs or is attached.
#[test]
fn bad_insights_input_exits_2_naming_it() {
    let tb = testbed(&[], &[]);
    let marker = tb.workdir().join("ran");
    let marker = marker.to_str().unwrap();
    let bad = scratch(&tb, "bad.jsonl", "{\"type\":\"flow\"}\n");
    let bad = bad.to_str().unwrap();
    let policy = scratch(&tb, "p.toml", "allowed-endpoints = \"github.test\"\n");
    let policy = policy.to_str().unwrap();
    for (args, cause) in [
        (
            vec!["exec", "--format", "html", "--", "touch", marker],
            "--format html writes a page: give it a file with --report FILE",
        ),
        (
            vec![
                "exec",
                "--baseline",
                "/nonexistent/run.jsonl",
                "--",
                "touch",
                marker,
            ],
            "baseline /nonexistent/run.jsonl: No such file",
        ),
        (
            vec!["exec", "--baseline", bad, "--", "touch", marker],
            &*format!("baseline {bad}:1: not an event"),
        ),
        (
            vec!["policy", "suggest", "--from", bad],
            &*format!("{bad}: events line 1"),
        ),
        (
            vec!["policy", "check", "--policy", policy, "github.test", "x:0"],
            "\"x:0\": bad port \"0\"",
        ),
        (
            vec![
                "policy",
                "check",
                "--policy",
                "/nonexistent.toml",
                "github.test",
            ],
            "/nonexistent.toml: cannot read the policy file",
        ),
    ] {
        let (st, out, err) = run_timeout(tb.client_cmd(RINGFENCE, &args), JOB_TIMEOUT);
        let shown = format!("{args:?}\nstdout:\n{out}\nstderr:\n{err}");
        assert_eq!(st.code(), Some(2), "{shown}");
        assert!(err.contains(cause), "not naming {cause:?}: {shown}");
        assert!(out.is_empty(), "{shown}");
    }
    assert!(!std::path::Path::new(marker).exists(), "a job ran");
    assert!(attached_programs(&tb).is_empty());
}

#[test]
fn not_root_exits_1_naming_the_privilege() {
    let tb = testbed(&[], &[]);
    // The build tree may not be readable by nobody; give it a world-executable copy.
    let bin = tb.workdir().join("ringfence");
    std::fs::copy(RINGFENCE, &bin).expect("copying binary");
    for dir in [tb.workdir(), bin.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let marker = Path::new("/tmp").join(format!("rf-notroot-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let (st, out, err) = run_timeout(
        tb.client_cmd(
            "setpriv",
            [
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                bin.to_str().unwrap(),
                "exec",
                "--allow",
                "github.test",
                "--",
                "touch",
                marker.to_str().unwrap(),
            ],
        ),
        JOB_TIMEOUT,
    );
    let ran = marker.exists();
    let _ = std::fs::remove_file(&marker);
    let shown = format!("status {st:?}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(st.code(), Some(1), "{shown}");
    assert!(
        err.contains("root") || err.contains("CAP_BPF"),
        "stderr names neither root nor CAP_BPF\n{shown}"
    );
    assert!(!ran, "the job ran without enforcement\n{shown}");
}

#[test]
fn missing_interface_exits_1_naming_it() {
    let tb = testbed(&[], &[]);
    let marker = tb.workdir().join("ran");
    let (st, out, err) = run_timeout(
        tb.client_cmd(
            RINGFENCE,
            [
                "exec",
                "--mode",
                "block",
                "--allow",
                "github.test",
                "--interface",
                "nosuchif",
                "--",
                "touch",
                marker.to_str().unwrap(),
            ],
        ),
        JOB_TIMEOUT,
    );
    let shown = format!("status {st:?}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(st.code(), Some(1), "{shown}");
    assert!(
        err.contains("nosuchif"),
        "stderr does not name the interface\n{shown}"
    );
    assert!(!marker.exists(), "the job ran without enforcement\n{shown}");
    let attached = attached_programs(&tb);
    assert!(attached.is_empty(), "left attached: {attached:?}\n{shown}");
}

/// Runs `exec` inside the client namespace after `setup` (shell commands run first, in a
/// private mount namespace, to take something away from the machine); asserts exit 1 with
/// stderr containing `cause`, the job never ran and nothing stayed attached.
fn fails_at_runtime_naming(setup: &str, cause: &str) {
    let tb = testbed(&[], &[]);
    let marker = tb.workdir().join("ran");
    let script = format!(
        "{setup} && exec {RINGFENCE} exec --mode block --allow github.test -- touch {}",
        marker.display()
    );
    // unshare -m: the mounts below vanish with this process; the host keeps its own.
    let (st, out, err) = run_timeout(
        tb.client_cmd(
            "unshare",
            ["-m", "--propagation", "private", "sh", "-c", &script],
        ),
        JOB_TIMEOUT,
    );
    let shown = format!("status {st:?}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(st.code(), Some(1), "{shown}");
    assert!(
        err.contains(cause),
        "stderr does not name {cause:?}\n{shown}"
    );
    assert!(!marker.exists(), "the job ran without enforcement\n{shown}");
    let attached = attached_programs(&tb);
    assert!(attached.is_empty(), "left attached: {attached:?}\n{shown}");
}

#[test]
fn no_btf_exits_1_naming_it() {
    // Hide the kernel's BTF the way a kernel without CONFIG_DEBUG_INFO_BTF looks.
    fails_at_runtime_naming("mount -t tmpfs none /sys/kernel/btf", "BTF");
}

#[test]
fn no_cgroup_v2_exits_1_naming_it() {
    // No cgroup2 mount anywhere, and no way to mount one privately under /run.
    fails_at_runtime_naming(
        "for m in $(awk '$9 == \"cgroup2\" {print $5}' /proc/self/mountinfo); do umount -l \"$m\"; done \
         && mount -t tmpfs -o ro none /run",
        "cgroup v2",
    );
}
