//! Python venvs with pinned packages, under the workspace's target directory: the programs they
//! install (virtme-ng's `vng`, `kubernetes-validate`) are the only ones started outside the
//! table of `shadow_tests::program`. Each venv belongs to the command that uses it and is made
//! on first use, from Debian's python3 and python3-venv, which the table has `setup` install.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use shadow_tests::Program;

use crate::run::run;

/// A venv with exactly its pinned packages.
pub struct Venv {
    dir: PathBuf,
}

impl Venv {
    /// The venv at `dir` with exactly `packages` (pinned `name==version`), made on first use and
    /// made anew when the pin list changes; `purpose` names it in messages.
    pub fn ensure(dir: PathBuf, packages: &[&str], purpose: &str) -> Result<Self> {
        let venv = Venv { dir };
        let stamp = venv.dir.join("shadow-pins.txt");
        let pins = packages.join("\n");
        if venv.bin("python").exists()
            && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&pins)
        {
            return Ok(venv);
        }
        eprintln!("xtask: creating {} for {purpose}", venv.dir.display());
        run(Program::Python3
            .command()
            .args(["-m", "venv", "--clear"])
            .arg(&venv.dir))
        .context("python3 -m venv (Debian: python3-venv, which `cargo xtask setup` installs)")?;
        run(venv
            .command("pip")
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages))?;
        std::fs::write(&stamp, pins)?;
        Ok(venv)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where its programs are: its `python` and `pip`, and those its pinned packages installed.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// A program of the venv, in [`Venv::bin_dir`].
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }

    /// A command that starts [`Venv::bin`] `name`.
    pub fn command(&self, name: &str) -> Command {
        Command::new(self.bin(name))
    }
}
