//! `shadow-agent report --out FILE.html`: the comparison report of a running agent, as one
//! self-contained page (no external assets, so it opens offline) or as JSON.
use std::path::PathBuf;

use anyhow::{Context, Result};
use shadow_agent::compare::{Report, render_html};

use super::status::AdminArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    endpoint: AdminArgs,
    /// Where to write the page (`.html`) or, with `--json`, the report as JSON.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Write JSON instead of HTML.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let client = args.endpoint.client()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let value = runtime.block_on(client.fetch("/report"))?;
    let text = if args.json {
        serde_json::to_string_pretty(&value)?
    } else {
        let report: Report = serde_json::from_value(value)
            .context("the agent sent a report this build cannot read")?;
        render_html(&report)
    };
    std::fs::write(&args.out, text)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("shadow-agent: report written to {}", args.out.display());
    Ok(())
}
