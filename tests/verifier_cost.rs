//! The verifier's cost of every program, on the running kernel, against bench/verifier.json
//! (the "verifier cost tracked"). vm-tests runs it on 6.1 and 6.12 like every test
//! binary. Growth beyond the file's `warn_growth` (20 %) warns, it does not fail; a
//! program whose figure cannot be read fails.
//!
//! What it prints goes straight to stdout, past libtest's capture, so that the figures and
//! warnings are in the log of every run (vm-tests' console logs included):
//!   `@@RF-VERIFIER {json}`: this kernel's figures, which `bench/verifier-record LOG...`
//!   writes into the file; `@@RF-WARN ...`: a warning vm-tests repeats in its summary.
use std::io::Write;
use std::path::Path;

use ringfence::testkit::verifier_cost::{self, MARKER, WARN_MARKER};

mod common;

/// Past libtest's capture (which takes `print!` only), each line whole: libtest has already
/// written "test NAME ... " without a newline, so the block starts on a fresh line, and
/// vm-tests finds the markers only at the start of a line.
fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(format!("\n{text}").as_bytes()).unwrap();
    out.flush().unwrap();
}

#[test]
fn verifier_cost_per_program_against_the_file() {
    common::require_root();
    let file_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/verifier.json");
    let m = verifier_cost::measure().expect("reading every loaded program's verified_insns");
    assert!(
        m.programs.contains_key("rf_egress") && m.programs.contains_key("rf_ingress"),
        "the TC programs were not loaded: {m:?}"
    );
    let file = verifier_cost::read_file(&file_path).expect("bench/verifier.json");
    let c = verifier_cost::compare(&file, &m).expect("comparing with bench/verifier.json");
    let mut text = format!(
        "{MARKER} {}\n{}",
        serde_json::to_string(&m).unwrap(),
        c.render()
    );
    for w in &c.warnings {
        text += &format!("{WARN_MARKER} {w}\n");
    }
    say(&text);
}
