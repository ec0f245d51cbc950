use clap::Parser;

use ringfence::cli::{Cli, Cmd};

fn main() {
    ringfence::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Exec(args) => ringfence::exec::run(&args),
        #[cfg(feature = "testkit")]
        Cmd::Demo(o) => ringfence::testkit::demo::run(&o).map(|()| 0),
        Cmd::Probe => ringfence::kernel::probe::print().map(|()| 0),
        Cmd::Guard(args) => ringfence::job::guard::run(&args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ringfence: {e:#}");
            std::process::exit(ringfence::exit_status(&e));
        }
    }
}
