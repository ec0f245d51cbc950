use clap::Parser;

use ringfence::cli::{Cli, Cmd};

fn main() {
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Cmd::Run(_) | Cmd::Kubernetes(_));
    ringfence::logging::init(if daemon { "info" } else { "warn" });
    let result = match cli.command {
        Cmd::Exec(args) => ringfence::exec::run(&args),
        #[cfg(feature = "testkit")]
        Cmd::Demo(o) => ringfence::testkit::demo::run(&o).map(|()| 0),
        Cmd::Probe => ringfence::kernel::probe::print().map(|()| 0),
        Cmd::Guard(args) => ringfence::job::guard::run(&args),
        Cmd::Run(args) => ringfence::daemon::server::run(&args),
        Cmd::Job(cmd) => ringfence::daemon::client::job(&cmd),
        Cmd::Report {
            id,
            format,
            baseline,
            socket,
        } => ringfence::daemon::client::report(&id, format, &baseline, &socket),
        Cmd::Policy(cmd) => ringfence::insights::run(&cmd),
        Cmd::Status { json, socket } => ringfence::daemon::client::status(json, &socket),
        Cmd::Watch(a) => ringfence::daemon::watch::run(&a),
        Cmd::Kubernetes(a) => ringfence::kubernetes::run(&a),
        Cmd::Unload {
            force,
            bpffs,
            state_dir,
            socket,
        } => ringfence::daemon::client::unload(force, &socket, &bpffs, &state_dir),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ringfence: {e:#}");
            std::process::exit(ringfence::exit_status(&e));
        }
    }
}
