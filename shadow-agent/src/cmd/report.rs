//! `shadow-agent report --out FILE.html`: the comparison report of a running agent, as one
//! self-contained page (no external assets, so it opens offline) or as JSON; with
//! `--export DIR`, the sample exchanges of its flagged endpoints as `.http` files. `--from
//! FILE` reads a report saved with `--json` instead of asking the agent.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use shadow_agent::compare::{Report, http_file, render_html};

use super::status::AdminArgs;

/// The largest saved report read (a report is bounded by the comparator's limits: a few MB).
const MAX_REPORT_FILE: u64 = 256 * 1024 * 1024;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    endpoint: AdminArgs,
    /// Where to write the page (`.html`) or, with `--json`, the report as JSON.
    #[arg(long, value_name = "FILE", required_unless_present = "export")]
    out: Option<PathBuf>,
    /// Write JSON instead of HTML.
    #[arg(long, requires = "out")]
    json: bool,
    /// Write each flagged endpoint's sample exchanges as a `.http` file into this directory
    /// (created if needed), credentials redacted.
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
    /// Read a report saved with `--json` instead of asking the running agent.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let value = match &args.from {
        Some(path) => read_saved(path)?,
        None => {
            let client = args.endpoint.client()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(client.fetch("/report"))?
        }
    };
    let report = || -> Result<Report> {
        serde_json::from_value(value.clone()).context("a report this build cannot read")
    };
    if let Some(out) = &args.out {
        let text = if args.json {
            serde_json::to_string_pretty(&value)?
        } else {
            render_html(&report()?)
        };
        std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("shadow-agent: report written to {}", out.display());
    }
    if let Some(dir) = &args.export {
        let report = report()?;
        let written = write_export(&report, dir)?;
        let flagged = report.endpoints.iter().filter(|e| e.flagged).count();
        eprintln!(
            "shadow-agent: {written} .http files written to {} ({flagged} endpoints flagged; \
             those without samples have none)",
            dir.display()
        );
        let grpc = http_file::grpc_samples(&report);
        if grpc > 0 {
            eprintln!(
                "shadow-agent: {grpc} samples of gRPC calls left out: a .http file cannot send \
                 them (the report shows their messages decoded)"
            );
        }
    }
    Ok(())
}

fn read_saved(path: &Path) -> Result<serde_json::Value> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if len > MAX_REPORT_FILE {
        bail!(
            "{} is {len} bytes: more than a report can be ({MAX_REPORT_FILE})",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a report saved with --json", path.display()))
}

/// Writes the files of [`http_file::export`] into `dir`; returns how many.
fn write_export(report: &Report, dir: &Path) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = http_file::export(report);
    for f in &files {
        let path = dir.join(&f.name);
        std::fs::write(&path, &f.text)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(files.len())
}
