//! The commands of the binary, one module each (`run`, `once`, `check`,
//! `status`, `create`, `demo`, `rotate`), and [`main`], which picks one. Each wires
//! what it needs from [`crate::app`] and the layers below; nothing below
//! imports a command.

use crate::cli::{Cli, Command, RunArgs};
use crate::config::Config;
use crate::exit::Exit;

pub mod check;
pub mod create;
#[cfg(feature = "demo")]
pub mod demo;
pub mod once;
pub mod rotate;
pub mod run;
pub mod status;

/// Runs the command the command line names.
pub async fn main(cli: Cli) -> Exit {
    let command = cli.command.unwrap_or(Command::Run(RunArgs::default()));
    if let Command::Demo(args) = command {
        return demo(args).await;
    }
    // `status` needs only [admin] listen, nothing else of the config.
    if let Command::Status = command {
        return status::status(&cli.config).await;
    }
    // `rotate` needs only [admin] control_socket (it runs outside the service).
    if let Command::Rotate(args) = command {
        return rotate::rotate(&cli.config, &args).await;
    }
    let loaded = match command {
        Command::Check => crate::app::load_config(&cli.config, Config::load_for_check),
        _ => crate::app::load_config(&cli.config, Config::load),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(exit) => return exit,
    };
    if matches!(
        command,
        Command::Run(_) | Command::Once(_) | Command::Create(_) | Command::Coordination(_)
    ) && let Err(exit) = crate::app::ca_roots()
    {
        return exit;
    }
    match command {
        Command::Run(args) => run::run(config, &cli.config, args.dry_run).await,
        Command::Once(args) => once::once(config, args).await,
        Command::Check => check::check(config, &cli.config).await,
        Command::Status | Command::Rotate(_) => Exit::Usage,
        Command::Demo(_) => Exit::Usage,
        Command::Create(args) => crate::commands::create::run(&config, &args).await,
        Command::Coordination(crate::cli::CoordinationCommand::Init) => {
            crate::coordination::table::init_command(&config).await
        }
    }
}

#[cfg(feature = "demo")]
async fn demo(args: crate::cli::DemoArgs) -> Exit {
    crate::commands::demo::run(args).await
}

/// A build without the `demo` feature carries no simulator: say so plainly.
#[cfg(not(feature = "demo"))]
async fn demo(_args: crate::cli::DemoArgs) -> Exit {
    eprintln!(
        "aep-s3-rotator: this build has no demo (it was built without the `demo` feature); \
         build with default features to run it"
    );
    Exit::Usage
}
