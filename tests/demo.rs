//! `ringfence demo`, the seed tutorial, end to end: it must pass its own verdict (the leak
//! named in audit mode, stopped in block mode while the registry works) and leave nothing.

use std::process::Command;

#[test]
fn the_demo_passes_and_cleans_up() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the demo builds network namespaces: run the tests as root"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ringfence"))
        .arg("demo")
        .output()
        .expect("run ringfence demo");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Verdict: PASS"), "{text}");
    assert!(text.contains("attacker.test"), "{text}");
    // Its namespace is gone ("runner: rf-<pid>-0-c (198.51.100.1)" names it).
    let runner = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("runner: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("the demo did not say which namespace it used\n{text}"))
        .to_string();
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains(&runner),
        "the demo left {runner} behind"
    );
}
