//! `rfbench verifier [--baseline FILE] [--record] [--json FILE]`: the instructions the
//! verifier processed per program on this kernel, loaded as the daemon loads it, beside
//! bench/verifier.json's figures for the same kernel (src/testkit/verifier_cost.rs).
//! Growth beyond the file's `warn_growth` is printed as a warning; the exit status stays 0
//! (bench/run --check repeats the warnings). `--record` writes this kernel's entry.
use std::path::PathBuf;

use anyhow::{Context, Result};
use ringfence::testkit::verifier_cost;
use serde_json::json;

use super::{write_json, Args};

pub fn verifier(args: &Args) -> Result<()> {
    let mut file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/verifier.json");
    let mut record = false;
    let mut it = args.rest.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--baseline" => file = it.next().context("--baseline needs a FILE")?.into(),
            "--record" => record = true,
            other => anyhow::bail!("rfbench verifier: unknown argument {other:?}"),
        }
    }
    let m = verifier_cost::measure()?;
    let c = verifier_cost::compare(&verifier_cost::read_file(&file)?, &m)?;
    print!("{}", c.render());
    if record {
        let git = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        verifier_cost::record(&file, &m, &git)?;
        println!("recorded kernel {} in {}", m.kernel, file.display());
    }
    write_json(
        &args.json,
        &json!({"measured": m, "comparison": c, "file": file}),
    )
}
