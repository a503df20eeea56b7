//! `cargo xtask bench capture`: the kernel program's cost per packet, from the kernel's own BPF
//! statistics, and the live service's throughput and latency with and without the program, all
//! measured side by side in one run on one topology.
use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context, Result, bail};
use shadow_tests::{Agent, Netns, Nginx, VethLink};

use crate::run::{command_output, run};

/// One wrk run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Load {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The kernel program's run-time statistics over one scenario.
#[derive(Clone, Copy, Debug, Default)]
struct ProgramCost {
    runs: u64,
    ns_per_run: f64,
}

pub struct CaptureBench {
    pub seconds: u32,
    pub rounds: u32,
}

pub fn capture(bench: CaptureBench) -> Result<()> {
    let agent_bin = crate::target_dir().join("release/shadow-agent");
    run(crate::cargo().args(["build", "--release", "--package", "shadow-agent"]))?;
    let previous_stats =
        command_output(Command::new("sysctl").args(["-n", "kernel.bpf_stats_enabled"]))?;
    run(Command::new("sysctl").args(["-q", "-w", "kernel.bpf_stats_enabled=1"]))?;
    let result = measure(&bench, &agent_bin);
    let _ = Command::new("sysctl")
        .args([
            "-q",
            "-w",
            &format!("kernel.bpf_stats_enabled={}", previous_stats.trim()),
        ])
        .status();
    let report = result?;
    println!("{report}");
    let out = crate::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("capture.md"), &report)?;
    eprintln!("xtask: written to {}", out.join("capture.md").display());
    Ok(())
}

fn measure(bench: &CaptureBench, agent_bin: &std::path::Path) -> Result<String> {
    // SAFETY: no other thread of xtask runs yet, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("SHADOW_AGENT_BIN", agent_bin) };
    let client = Netns::new("bench-client");
    let server = Netns::new("bench-server");
    let link = VethLink::new(&client, "bc0", &server, "bs0");
    let addr = SocketAddr::from((link.b_addr, 80));
    let _nginx = Nginx::start(&server, addr);
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
    let mut attached = Vec::new();
    let mut unmatched = Vec::new();
    let mut unsampled = Vec::new();
    let mut copied = Vec::new();
    for round in 0..bench.rounds {
        eprintln!("xtask: round {} of {}", round + 1, bench.rounds);
        baseline.push(wrk(&client, &url, bench.seconds)?);

        let (load, cost) = with_agent(&server, &capture_args("81", "100"), || {
            wrk(&client, &url, bench.seconds)
        })?;
        unmatched.push((load, cost));

        let (load, cost) = with_agent(&server, &capture_args("80", "0"), || {
            wrk(&client, &url, bench.seconds)
        })?;
        unsampled.push((load, cost));

        let (load, cost) = with_agent(&server, &capture_args("80", "100"), || {
            wrk(&client, &url, bench.seconds)
        })?;
        copied.push((load, cost));
        attached.push(load);
    }

    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base_rps = median(baseline.iter().map(|l| l.requests_per_sec).collect());
    let base_p99 = median(baseline.iter().map(|l| l.p99_ms).collect());
    let base_p50 = median(baseline.iter().map(|l| l.p50_ms).collect());
    let att_rps = median(attached.iter().map(|l| l.requests_per_sec).collect());
    let att_p99 = median(attached.iter().map(|l| l.p99_ms).collect());
    let att_p50 = median(attached.iter().map(|l| l.p50_ms).collect());
    let cost = |v: &[(Load, ProgramCost)]| {
        (
            median(v.iter().map(|(_, c)| c.ns_per_run).collect()),
            median(v.iter().map(|(_, c)| c.runs as f64).collect()),
        )
    };
    let (unmatched_ns, unmatched_runs) = cost(&unmatched);
    let (unsampled_ns, unsampled_runs) = cost(&unsampled);
    let (copied_ns, copied_runs) = cost(&copied);

    let cpu =
        command_output(Command::new("sh").args(["-c", "lscpu | sed -n 's/^Model name: *//p'"]))
            .unwrap_or_default();
    let kernel = command_output(Command::new("uname").arg("-r")).unwrap_or_default();
    Ok(format!(
        "### cargo xtask bench capture\n\n\
         Machine: {cpu} ({cores} cores), kernel {kernel}. wrk -t2 -c32 for {s} s per scenario, \
         {r} rounds, medians; nginx in one network namespace, wrk in another, joined by veth; the \
         program on both hooks of the server's veth end.\n\n\
         | in-kernel cost per packet (bpf_stats run_time_ns / run_cnt) | ns | packets |\n\
         | --- | ---: | ---: |\n\
         | unmatched port | {unmatched_ns:.0} | {unmatched_runs:.0} |\n\
         | matched, connection not sampled (0 %) | {unsampled_ns:.0} | {unsampled_runs:.0} |\n\
         | copied (100 %, agent draining to a pcap) | {copied_ns:.0} | {copied_runs:.0} |\n\n\
         | live service | requests/s | p50 ms | p99 ms |\n\
         | --- | ---: | ---: | ---: |\n\
         | not attached | {base_rps:.0} | {base_p50:.3} | {base_p99:.3} |\n\
         | attached, 100 % copied | {att_rps:.0} | {att_p50:.3} | {att_p99:.3} |\n\
         | ratio attached / not attached | {:.3} | {:.2} | {:.2} |\n",
        att_rps / base_rps,
        att_p50 / base_p50,
        att_p99 / base_p99,
        cores = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel = kernel.trim(),
        cpu = cpu.trim(),
        s = bench.seconds,
        r = bench.rounds,
    ))
}

/// Runs `f` with the agent capturing; returns its result and the program's cost meanwhile.
fn with_agent(
    server: &Netns,
    args: &[String],
    f: impl FnOnce() -> Result<Load>,
) -> Result<(Load, ProgramCost)> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(server, &args);
    let before = program_cost()?;
    let load = f()?;
    let after = program_cost()?;
    agent.interrupt().assert_success();
    let runs = after.runs.saturating_sub(before.runs);
    let ns = after.ns_per_run * after.runs as f64 - before.ns_per_run * before.runs as f64;
    Ok((
        load,
        ProgramCost {
            runs,
            ns_per_run: if runs == 0 { 0.0 } else { ns / runs as f64 },
        },
    ))
}

/// Sums run_cnt and run_time_ns of the loaded shadow programs (`bpftool prog show`).
fn program_cost() -> Result<ProgramCost> {
    let out = command_output(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let progs: serde_json::Value = serde_json::from_str(&out).context("bpftool -j prog show")?;
    let (mut runs, mut ns) = (0u64, 0u64);
    for p in progs.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        if name == "shadow_ingress" || name == "shadow_egress" {
            runs += p["run_cnt"].as_u64().unwrap_or(0);
            ns += p["run_time_ns"].as_u64().unwrap_or(0);
        }
    }
    Ok(ProgramCost {
        runs,
        ns_per_run: if runs == 0 {
            0.0
        } else {
            ns as f64 / runs as f64
        },
    })
}

/// Runs wrk from the client namespace and parses its summary.
fn wrk(client: &Netns, url: &str, seconds: u32) -> Result<Load> {
    let out = client
        .exec(&[
            "wrk",
            "-t2",
            "-c32",
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
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
