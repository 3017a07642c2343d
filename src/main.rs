//! The `aep-s3-rotator` binary: parse the command line, set up logging, run
//! the command, map its result to an exit code. Everything else is library code.

use std::process::ExitCode;

use aep_s3_rotator::cli::Cli;
use aep_s3_rotator::commands;
use aep_s3_rotator::exit::Exit;
use aep_s3_rotator::observe::logging;
use clap::Parser;

fn main() -> ExitCode {
    // Usage errors exit 2 here (clap's convention, and SPEC.md's).
    let cli = Cli::parse();
    if let Err(error) = logging::init(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("aep-s3-rotator: {error}");
        return ExitCode::from(Exit::Usage.code());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("aep-s3-rotator: cannot start the async runtime: {error}");
            return ExitCode::from(Exit::Failure.code());
        }
    };
    // On a worker, not on this thread: the scheduler then wakes on the
    // worker that finished a job instead of across threads (a futex wake
    // per rotation), and its own work balances over the workers.
    let app = runtime.spawn(commands::main(cli));
    let exit = runtime.block_on(app).unwrap_or_else(|error| {
        eprintln!("aep-s3-rotator: internal error: {error}");
        Exit::Failure
    });
    // Do not wait for stray blocking tasks (a hung DNS lookup) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(exit.code())
}
