//! `cargo xtask bench capture`: the kernel program's cost per packet, from the kernel's own BPF
//! statistics, and the live service's throughput and latency with and without the program, all
//! measured side by side in one run on one topology.
//!
//! The BPF statistics read the clock around every run, and that cost lands in `run_time_ns`. So
//! the cost scenarios also attach `shadow_calibrate`, a classifier that returns at once, beside
//! the real programs: its cost per run is what the statistics themselves add, reported next to
//! the raw figures with the net cost (raw minus that).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType},
};
use shadow_tests::{AccessLog, Agent, Netns, Nginx, Program, VethLink};

use crate::run::{command_output, run};

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Load {
    pub(crate) requests_per_sec: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// The kernel program's run-time statistics over one scenario.
#[derive(Clone, Copy, Debug, Default)]
struct ProgramCost {
    runs: u64,
    ns_per_run: f64,
    /// CPU time the agent process used over the same time (all its threads, user and kernel).
    agent_cpu_ns: u64,
}

pub struct CaptureBench {
    pub seconds: u32,
    pub rounds: u32,
    /// Measure this agent binary instead of the one just built (e.g. an older build, to compare).
    pub agent_bin: Option<PathBuf>,
    /// Whether nginx writes its access log (to the machine's disk).
    pub access_log: AccessLog,
}

/// Name of the do-nothing classifier in the eBPF object.
const CALIBRATION_PROGRAM: &str = "shadow_calibrate";

pub fn capture(bench: CaptureBench) -> Result<()> {
    let out = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    let (built_agent, object) = crate::build_agent(crate::Profile::Release)?;
    // Copies, so that a concurrent build cannot swap the binary under a running benchmark.
    let agent_bin = out.join("shadow-agent");
    std::fs::copy(bench.agent_bin.as_ref().unwrap_or(&built_agent), &agent_bin)
        .context("cannot copy the agent binary")?;
    let object_copy = out.join("shadow-ebpf.o");
    std::fs::copy(&object, &object_copy).context("cannot copy the eBPF object")?;

    let previous_stats = command_output(
        Program::Sysctl
            .command()
            .args(["-n", "kernel.bpf_stats_enabled"]),
    )?;
    run(Program::Sysctl
        .command()
        .args(["-q", "-w", "kernel.bpf_stats_enabled=1"]))?;
    // Catch a panic of the test helpers so the statistics are switched back off in any case.
    let result = std::panic::catch_unwind(|| measure(&bench, &agent_bin, &object_copy));
    let _ = Program::Sysctl
        .command()
        .args([
            "-q",
            "-w",
            &format!("kernel.bpf_stats_enabled={}", previous_stats.trim()),
        ])
        .status();
    let report = match result {
        Ok(report) => report?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    println!("{report}");
    std::fs::write(out.join("capture.md"), &report)?;
    eprintln!("xtask: written to {}", out.join("capture.md").display());
    Ok(())
}

/// `shadow_calibrate` attached to both hooks of `iface` in `ns`, for as long as this lives.
struct Calibration {
    _ebpf: Ebpf,
    /// Its program id, to find it in `bpftool prog show`.
    ids: Vec<u64>,
}

impl Calibration {
    fn attach(ns: &Netns, iface: &str, object: &Path) -> Result<Self> {
        let bytes = std::fs::read(object)?;
        let ebpf = ns.run_in(|| -> Result<(Ebpf, u64)> {
            let mut ebpf = EbpfLoader::new()
                // Only the program is used; keep the unused ring buffer small.
                .map_max_entries("EVENTS", 4096)
                .load(&bytes)?;
            let program: &mut SchedClassifier = ebpf
                .program_mut(CALIBRATION_PROGRAM)
                .with_context(|| format!("the eBPF object has no {CALIBRATION_PROGRAM}"))?
                .try_into()?;
            program.load()?;
            let id = program.info()?.id() as u64;
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                program
                    .attach(iface, hook)
                    .with_context(|| format!("cannot attach {CALIBRATION_PROGRAM} to {iface}"))?;
            }
            Ok((ebpf, id))
        })?;
        Ok(Self {
            _ebpf: ebpf.0,
            ids: vec![ebpf.1],
        })
    }
}

fn measure(bench: &CaptureBench, agent_bin: &Path, object: &Path) -> Result<String> {
    // SAFETY: no other thread of xtask runs yet, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("SHADOW_AGENT_BIN", agent_bin) };
    let client = Netns::new("bench-client");
    let server = Netns::new("bench-server");
    let link = VethLink::new(&client, "bc0", &server, "bs0");
    let addr = SocketAddr::from((link.b_addr, 80));
    let _nginx = Nginx::serve(&server, addr, bench.access_log);
    let url = format!("http://{addr}/");
    // `Agent` adds `capture --write FILE --stats-json FILE` in a directory of its own.
    let capture_args = |port: &str, percent: &str| -> Vec<String> {
        [
            "--interface",
            "bs0",
            "--port",
            port,
            "--sample-percent",
            percent,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // Warm nginx and the veth up.
    wrk(&client, &url, 2)?;

    let mut baseline = Vec::new();
    let mut unmatched = Vec::new();
    let mut unsampled = Vec::new();
    let mut copied = Vec::new();
    let mut throughput = [
        Throughput::new(
            "control: not attached, measured as the attached runs are",
            None,
        ),
        Throughput::new(
            "attached, 0 % sampled (filter only)",
            Some(("0", Pcap::Discarded)),
        ),
        Throughput::new(
            "attached, 100 % copied, pcap to /dev/null",
            Some(("100", Pcap::Discarded)),
        ),
        Throughput::new(
            "attached, 100 % copied, pcap to disk",
            Some(("100", Pcap::File)),
        ),
    ];
    // Cost per run of the do-nothing program, measured beside the real ones.
    let mut calibration = Vec::new();
    for round in 0..bench.rounds {
        eprintln!("xtask: round {} of {}", round + 1, bench.rounds);

        // The cost scenarios carry the calibration program too. The throughput scenario does
        // not: its figure is the agent's alone.
        for (port, percent, costs) in [("81", "100", &mut unmatched), ("80", "0", &mut unsampled)] {
            let calibrate = Calibration::attach(&server, "bs0", object)?;
            let (load, cost, calibrated) = with_agent(
                &server,
                &capture_args(port, percent),
                Some(&calibrate),
                Pcap::File,
                || wrk(&client, &url, bench.seconds),
            )?;
            drop(calibrate);
            costs.push((load, cost));
            calibration.extend(calibrated);
        }

        let (load, cost, _) = with_agent(
            &server,
            &capture_args("80", "100"),
            None,
            Pcap::File,
            || wrk(&client, &url, bench.seconds),
        )?;
        copied.push((load, cost));

        // The throughput that counts: BPF statistics off, as in production, so that their clock
        // reads are not charged to the program; the pcap discarded, as the mirroring agent
        // (which writes nothing) would, and written to disk as a user's capture does. Each
        // between two runs without the program.
        bpf_stats(false)?;
        let measured = (|| -> Result<()> {
            // Dirty pages of earlier scenarios (the pcap files, and nginx's log if it writes
            // one) are written back before each run rather than by kernel threads during it.
            let load = || -> Result<Load> {
                run(&mut Program::Sync.command())?;
                wrk(&client, &url, bench.seconds)
            };
            let mut before = load()?;
            baseline.push(before);
            // Each goes first in turn: none gains from its place.
            let count = throughput.len();
            for i in 0..count {
                let scenario = &mut throughput[(i + round as usize) % count];
                let measured = match scenario.agent {
                    Some((percent, pcap)) => {
                        with_agent(&server, &capture_args("80", percent), None, pcap, load)?.0
                    }
                    None => load()?,
                };
                let after = load()?;
                baseline.push(after);
                scenario.ratios.push(
                    measured.requests_per_sec
                        / ((before.requests_per_sec + after.requests_per_sec) / 2.0),
                );
                scenario.loads.push(measured);
                before = after;
            }
            Ok(())
        })();
        bpf_stats(true)?;
        measured?;
    }

    let base_rps = median(baseline.iter().map(|l| l.requests_per_sec).collect());
    let base_p99 = median(baseline.iter().map(|l| l.p99_ms).collect());
    let base_p50 = median(baseline.iter().map(|l| l.p50_ms).collect());
    let on_rps = median(copied.iter().map(|(l, _)| l.requests_per_sec).collect());
    let on_p99 = median(copied.iter().map(|(l, _)| l.p99_ms).collect());
    let on_p50 = median(copied.iter().map(|(l, _)| l.p50_ms).collect());
    // The agent's CPU per packet the program ran on (at 100 % nearly all of them reach the
    // agent: only bare ACKs do not, and keep-alive traffic has few) and per second of load.
    let agent_ns_per_run = median(
        copied
            .iter()
            .map(|(_, c)| c.agent_cpu_ns as f64 / c.runs.max(1) as f64)
            .collect(),
    );
    let agent_ms_per_s = median(
        copied
            .iter()
            .map(|(_, c)| c.agent_cpu_ns as f64 / 1e6 / bench.seconds as f64)
            .collect(),
    );
    let stats_ns = median(calibration.iter().map(|c| c.ns_per_run).collect());
    let stats_runs = median(calibration.iter().map(|c| c.runs as f64).collect());
    let row = |what: &str, v: &[(Load, ProgramCost)]| {
        let ns = median(v.iter().map(|(_, c)| c.ns_per_run).collect());
        let runs = median(v.iter().map(|(_, c)| c.runs as f64).collect());
        format!(
            "| {what} | {ns:.0} | {:.0} | {runs:.0} |\n",
            (ns - stats_ns).max(0.0)
        )
    };

    let cpu = command_output(
        Program::Sh
            .command()
            .args(["-c", "lscpu | sed -n 's/^Model name: *//p'"]),
    )
    .unwrap_or_default();
    let kernel = command_output(Program::Uname.command().arg("-r")).unwrap_or_default();
    Ok(format!(
        "### cargo xtask bench capture\n\n\
         Machine: {cpu} ({cores} cores), kernel {kernel}. wrk -t2 -c32 for {s} s per scenario, \
         {r} rounds, medians; nginx (1 worker, access log {log}) in one network namespace, wrk \
         in another, joined \
         by veth; the program on both hooks of the server's veth end. BPF statistics are on in \
         every scenario but the throughput ones (the live service's rows but the last).\n\n\
         Raw: bpf_stats run_time_ns / run_cnt. The statistics read the clock around every run; \
         what that adds is measured by a do-nothing classifier (`{CALIBRATION_PROGRAM}`) \
         attached beside the program in the unmatched and unsampled scenarios, and net is raw \
         minus it.\n\n\
         | in-kernel cost per packet | raw ns | net ns | packets |\n\
         | --- | ---: | ---: | ---: |\n\
         {}{}{}\
         | do-nothing classifier (statistics overhead) | {stats_ns:.0} | 0 | {stats_runs:.0} |\n\n\
         The agent draining at 100 %: {agent_ms_per_s:.0} ms of CPU per second of load, \
         {agent_ns_per_run:.0} ns per packet the program ran on.\n\n\
         | live service | requests/s | ratio to not attached | mean ± standard error | \
         p50 ms | p99 ms |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n\
         | not attached | {base_rps:.0} | 1 | | {base_p50:.3} | {base_p99:.3} |\n\
         {}\
         | attached, 100 % copied, BPF statistics on | {on_rps:.0} | {:.3} | | {on_p50:.3} | \
         {on_p99:.3} |\n\n\
         Every row but the first and the last is the median of its runs' ratios to the mean of \
         the runs without the program just before and after each; the control is such a run \
         without the program, so its distance from 1 is the method's own error. The last row's \
         ratio is to the median of all runs without the program. Ratios per round:\n\n{}",
        row("unmatched port", &unmatched),
        row("matched, connection not sampled (0 %)", &unsampled),
        row("copied (100 %, agent draining to a pcap)", &copied),
        throughput.iter().map(Throughput::row).collect::<String>(),
        on_rps / base_rps,
        throughput
            .iter()
            .map(|t| format!("- {}: {}\n", t.name, spread(&t.ratios)))
            .collect::<String>(),
        cores = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel = kernel.trim(),
        cpu = cpu.trim(),
        s = bench.seconds,
        log = match bench.access_log {
            AccessLog::On => "on",
            AccessLog::Off => "off",
        },
        r = bench.rounds,
    ))
}

/// The median: for an even count, the mean of the two middle values (taking the upper one
/// would favour the higher figures); 0 for none.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `0.934 ± 0.012`: the mean and its standard error (sample standard deviation over the square
/// root of the count), so that a reader sees how far the rounds pin the ratio down; `-` below
/// two values.
fn mean_and_error(v: &[f64]) -> String {
    let n = v.len() as f64;
    if v.len() < 2 {
        return "-".into();
    }
    let mean = v.iter().sum::<f64>() / n;
    let variance = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    format!("{mean:.3} ± {:.3}", (variance / n).sqrt())
}

/// Ratios as `0.93, 0.95, ...`.
fn spread(ratios: &[f64]) -> String {
    ratios
        .iter()
        .map(|r| format!("{r:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One throughput scenario: its runs, each between two runs without the program.
struct Throughput {
    name: &'static str,
    /// The agent's `--sample-percent` and where its pcap goes; `None`: no agent (the control).
    agent: Option<(&'static str, Pcap)>,
    loads: Vec<Load>,
    /// Each run's ratio to the mean of the runs either side of it: the machine's speed drifts
    /// between runs, and a ratio of neighbours cancels most of that.
    ratios: Vec<f64>,
}

impl Throughput {
    fn new(name: &'static str, agent: Option<(&'static str, Pcap)>) -> Self {
        Self {
            name,
            agent,
            loads: Vec::new(),
            ratios: Vec::new(),
        }
    }

    /// Its line in the report's table.
    fn row(&self) -> String {
        let of = |f: fn(&Load) -> f64| median(self.loads.iter().map(f).collect());
        format!(
            "| {} | {:.0} | {:.3} | {} | {:.3} | {:.3} |\n",
            self.name,
            of(|l| l.requests_per_sec),
            median(self.ratios.clone()),
            mean_and_error(&self.ratios),
            of(|l| l.p50_ms),
            of(|l| l.p99_ms),
        )
    }
}

/// Where the draining agent writes its pcap.
#[derive(Clone, Copy)]
enum Pcap {
    /// A file on the disk of the machine, as a user's capture would.
    File,
    /// /dev/null: the agent drains and formats everything, and the disk's write-back (kernel
    /// threads' CPU, which is not the agent's) stays out of the figure.
    Discarded,
}

/// Runs `f` with the agent capturing; returns its result, the cost of the agent's programs
/// meanwhile and, when `calibration` is attached, that program's cost over the same time.
fn with_agent(
    server: &Netns,
    args: &[String],
    calibration: Option<&Calibration>,
    pcap: Pcap,
    f: impl FnOnce() -> Result<Load>,
) -> Result<(Load, ProgramCost, Option<ProgramCost>)> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let loaded_before = programs()?;
    let agent = match pcap {
        Pcap::File => Agent::start(server, &args),
        Pcap::Discarded => Agent::start_discarding(server, &args),
    };
    // The agent's programs are the shadow programs that appeared meanwhile: other shadow runs
    // on the machine (tests) are not counted.
    let agent_ids: Vec<u64> = programs()?
        .into_iter()
        .filter(|p| {
            (p.name == "shadow_ingress" || p.name == "shadow_egress")
                && !loaded_before.iter().any(|b| b.id == p.id)
        })
        .map(|p| p.id)
        .collect();
    if agent_ids.is_empty() {
        bail!("cannot find the agent's programs in `bpftool prog show`");
    }
    let calibration_ids = calibration.map(|c| c.ids.clone()).unwrap_or_default();
    let before = programs()?;
    let cpu_before = cpu_ns(agent.pid());
    let load = f()?;
    let cpu_after = cpu_ns(agent.pid());
    let after = programs()?;
    agent.interrupt().assert_success();
    let calibrated = calibration.map(|_| cost_between(&before, &after, &calibration_ids));
    let mut cost = cost_between(&before, &after, &agent_ids);
    cost.agent_cpu_ns = cpu_after.saturating_sub(cpu_before);
    Ok((load, cost, calibrated))
}

/// A loaded BPF program and its statistics, from `bpftool prog show`.
#[derive(Clone, Debug)]
struct BpfProgram {
    id: u64,
    name: String,
    runs: u64,
    ns: u64,
}

fn programs() -> Result<Vec<BpfProgram>> {
    let out = command_output(Program::Bpftool.command().args(["-j", "prog", "show"]))?;
    let progs: serde_json::Value = serde_json::from_str(&out).context("bpftool -j prog show")?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| BpfProgram {
            id: p["id"].as_u64().unwrap_or(0),
            name: p["name"].as_str().unwrap_or_default().to_owned(),
            runs: p["run_cnt"].as_u64().unwrap_or(0),
            ns: p["run_time_ns"].as_u64().unwrap_or(0),
        })
        .collect())
}

/// Switches the kernel's BPF run-time statistics on or off.
fn bpf_stats(on: bool) -> Result<()> {
    let value = format!("kernel.bpf_stats_enabled={}", u8::from(on));
    run(Program::Sysctl.command().args(["-q", "-w", &value]))
}

/// CPU time of a process so far, in nanoseconds: the sum over its threads of
/// `/proc/PID/task/TID/schedstat`'s first field.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs and nanoseconds of the programs `ids` between two snapshots.
fn cost_between(before: &[BpfProgram], after: &[BpfProgram], ids: &[u64]) -> ProgramCost {
    let sum = |snapshot: &[BpfProgram]| {
        snapshot
            .iter()
            .filter(|p| ids.contains(&p.id))
            .fold((0u64, 0u64), |(r, n), p| (r + p.runs, n + p.ns))
    };
    let (runs0, ns0) = sum(before);
    let (runs1, ns1) = sum(after);
    let runs = runs1.saturating_sub(runs0);
    ProgramCost {
        runs,
        ns_per_run: if runs == 0 {
            0.0
        } else {
            ns1.saturating_sub(ns0) as f64 / runs as f64
        },
        agent_cpu_ns: 0,
    }
}

/// Runs wrk from the client namespace and parses its summary.
pub(crate) fn wrk(client: &Netns, url: &str, seconds: u32) -> Result<Load> {
    let out = client
        .exec(
            Program::Wrk,
            &["-t2", "-c32", &format!("-d{seconds}s"), "--latency", url],
        )
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run wrk")?;
    if !out.status.success() {
        bail!("wrk failed: {}", out.status);
    }
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

fn parse_wrk(text: &str) -> Result<Load> {
    let mut load = Load::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => load.requests_per_sec = v.parse()?,
            ["50%", v] => load.p50_ms = millis(v)?,
            ["99%", v] => load.p99_ms = millis(v)?,
            _ => {}
        }
    }
    if load.requests_per_sec == 0.0 || load.p99_ms == 0.0 {
        bail!("cannot read wrk's output:\n{text}");
    }
    Ok(load)
}

/// wrk prints latencies as `812.00us`, `1.23ms` or `1.50s`.
fn millis(v: &str) -> Result<f64> {
    let (number, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown latency unit in `{v}`")
    };
    Ok(number.parse::<f64>()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert!((median(vec![0.97, 0.93, 0.98, 0.94]) - 0.955).abs() < 1e-12);
    }

    #[test]
    fn mean_with_its_standard_error() {
        assert_eq!(mean_and_error(&[0.9]), "-");
        // Mean 0.95; sample variance 0.0004 (0.0016 / 4); error sqrt(0.0004 / 5) = 0.0089.
        assert_eq!(
            mean_and_error(&[0.93, 0.93, 0.95, 0.97, 0.97]),
            "0.950 ± 0.009"
        );
    }

    #[test]
    fn reads_wrk_output() {
        let text = "Running 2s test @ http://198.18.0.2:80/\n  2 threads and 32 connections\n  \
            Latency Distribution\n     50%  810.00us\n     75%    1.02ms\n     90%    1.50ms\n     \
            99%    3.10ms\n  60000 requests in 2.00s, 9.50MB read\nRequests/sec:  29990.12\n";
        let load = parse_wrk(text).expect("parses");
        assert_eq!(load.requests_per_sec, 29990.12);
        assert!((load.p50_ms - 0.81).abs() < 1e-9);
        assert!((load.p99_ms - 3.1).abs() < 1e-9);
        assert!(parse_wrk("garbage").is_err());
    }
}
