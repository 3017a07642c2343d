//! Renders the man pages and the bash, zsh and fish completions from the
//! clap definitions in `src/cli.rs`, so they always describe the binary they
//! ship with and are never kept by hand.
//!
//! They go to `$OUT_DIR/share/`, and are copied to `share/` beside the
//! built binary (`target/release/share/` for `cargo build --release`),
//! because that is the one place cargo-deb can name in `[package.metadata.deb]
//! assets` (it rewrites `target/release/` to the real target directory).

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;

// `src/cli.rs` depends on nothing but clap, humantime and std, for this.
#[allow(dead_code, missing_docs)]
#[path = "src/cli.rs"]
mod cli;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo::rerun-if-changed=src/cli.rs");
    println!("cargo::rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let share = out_dir.join("share");
    let man = share.join("man");
    let completions = share.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;

    let mut command = cli::Cli::command();
    // The production build (`--no-default-features`) has no `demo`; its man
    // pages and completions must not offer it.
    if std::env::var_os("CARGO_FEATURE_DEMO").is_none() {
        command = command.mut_subcommand("demo", |demo| demo.hide(true));
    }
    // One page per command: aep-s3-rotator.1, aep-s3-rotator-run.1, ...
    clap_mangen::generate_to(command.clone(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, "aep-s3-rotator", &completions)?;
    }

    // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        copy_tree(&share, &profile_dir.join("share"))?;
    }
    Ok(())
}

/// Copies `from` into `to`, file by file, replacing what is there.
fn copy_tree(from: &Path, to: &Path) -> Result<(), Box<dyn Error>> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
