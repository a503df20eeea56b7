//! `shadow-agent inspect --pcap FILE` (placeholder until the HTTP pipeline lands).
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A pcap or pcapng file, as written by tcpdump or `shadow-agent capture`.
    #[arg(long)]
    pub pcap: PathBuf,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("inspect is not built yet")
}
