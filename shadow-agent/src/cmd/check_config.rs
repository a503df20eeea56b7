//! `shadow-agent check-config FILE`: checks a configuration without touching the kernel.
use std::path::PathBuf;

use shadow_agent::config::{Config, ConfigError};

#[derive(clap::Args)]
pub struct Args {
    /// The TOML configuration file, as `run --config` takes it.
    pub file: PathBuf,
}

/// Prints `FILE: ok`, or every problem as `FILE:LINE: key `...`: message` on stderr.
pub fn run(args: Args) -> anyhow::Result<()> {
    match Config::load(&args.file) {
        Ok(_) => {
            println!("{}: ok", args.file.display());
            Ok(())
        }
        Err(ConfigError::Invalid(errors)) => {
            eprintln!("{errors}");
            let n = errors.issues.len();
            anyhow::bail!(
                "{}: {n} error{}",
                args.file.display(),
                if n == 1 { "" } else { "s" }
            )
        }
        Err(e) => Err(e.into()),
    }
}
