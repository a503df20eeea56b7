//! `shadow-agent capture` (being written).
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("capture is not built yet")
}
