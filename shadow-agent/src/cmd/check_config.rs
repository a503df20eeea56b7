//! `shadow-agent check-config FILE`: checks a configuration without touching the kernel.
use std::path::{Path, PathBuf};

use shadow_agent::config::{Config, ConfigError};

#[derive(clap::Args)]
pub struct Args {
    /// The TOML configuration file, as `run --config` takes it.
    pub file: PathBuf,
}

/// Prints `FILE: ok`, or every problem as `FILE:LINE: key `...`: message` on stderr.
pub fn run(args: Args) -> anyhow::Result<()> {
    load(&args.file)?;
    println!("{}: ok", args.file.display());
    Ok(())
}

/// Loads a configuration; on problems prints each, one a line, on stderr and fails with their
/// number. `run` starts from this too, so it refuses exactly what `check-config` refuses.
pub fn load(file: &Path) -> anyhow::Result<Config> {
    match Config::load(file) {
        Ok(config) => Ok(config),
        Err(ConfigError::Invalid(errors)) => {
            eprintln!("{errors}");
            let n = errors.issues.len();
            anyhow::bail!(
                "{}: {n} error{}",
                file.display(),
                if n == 1 { "" } else { "s" }
            )
        }
        Err(e) => Err(e.into()),
    }
}
