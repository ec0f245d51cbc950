//! `ringfence policy suggest|check`: from audit runs to a block-mode policy, offline. They
//! read files the user owns (events, policies) and load nothing; any user may run them.
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::job::spec::UsageError;
use crate::policy::check::{check, parse_target};
use crate::policy::suggest::{parse_check, Usage};
use crate::policy::{Policy, PolicyBuilder};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Print a block-mode policy from the events of audit runs: the endpoints they used,
    /// numbered siblings collapsed where safe, direct-IP and metadata calls as comments.
    Suggest {
        /// An events file (JSON Lines) of an earlier run (repeatable).
        #[arg(long = "from", value_name = "EVENTS", required = true)]
        from: Vec<PathBuf>,
        /// Instead: what the runs used that POLICY would block, and what POLICY allows
        /// that no run used.
        #[arg(long, value_name = "POLICY")]
        diff: Option<PathBuf>,
    },
    /// Whether a policy allows each endpoint, and by which entry. Exit status 0: all
    /// allowed; 1: something is not; 2: bad input.
    Check {
        /// The policy file.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// NAME[:PORT], ADDRESS[:PORT] or [IPV6]:PORT (port 443 when none is given).
        #[arg(required = true, value_name = "ENDPOINT")]
        endpoints: Vec<String>,
    },
}

pub fn run(cmd: &PolicyCmd) -> Result<i32> {
    match cmd {
        PolicyCmd::Suggest { from, diff } => suggest(from, diff.as_ref()),
        PolicyCmd::Check { policy, endpoints } => check_endpoints(policy, endpoints),
    }
}

fn suggest(from: &[PathBuf], diff: Option<&PathBuf>) -> Result<i32> {
    let mut usage = Usage::default();
    for p in from {
        let f = std::fs::File::open(p)
            .map_err(|e| UsageError::Other(format!("{}: {e}", p.display())))?;
        let events =
            crate::trail::events::read_events(std::io::BufReader::new(f)).map_err(|e| {
                UsageError::Other(format!("{}: {:#}", p.display(), anyhow::Error::new(e)))
            })?;
        usage.add_run(&p.display().to_string(), &events);
    }
    if let Some(policy) = diff {
        // Resolvers do not matter to a diff: /etc/resolv.conf is not required.
        let p = PolicyBuilder::from_file(policy)?
            .build_with_resolv_conf(std::path::Path::new("/dev/null"))?;
        print!("{}", usage.diff(&p));
        return Ok(0);
    }
    let text = usage.render();
    // What is printed must be usable as it is: a name that slipped through would show here.
    parse_check(&text).context("the suggested policy does not parse (a bug)")?;
    print!("{text}");
    Ok(0)
}

fn check_endpoints(policy: &std::path::Path, endpoints: &[String]) -> Result<i32> {
    let p: Policy = PolicyBuilder::from_file(policy)?
        .build_with_resolv_conf(std::path::Path::new("/dev/null"))?;
    // Every argument is parsed before anything is answered: bad input answers nothing.
    let targets = endpoints
        .iter()
        .map(|s| parse_target(s).map_err(UsageError::Other))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut all = true;
    for (arg, (t, port)) in endpoints.iter().zip(&targets) {
        let a = check(&p, t, *port);
        all &= a.allowed;
        // "x: allowed by entry …" / "x: blocked: why".
        let sep = if a.allowed { " " } else { ": " };
        println!("{arg}: {}{sep}{}", a.verdict, a.why);
    }
    Ok(if all { 0 } else { 1 })
}
