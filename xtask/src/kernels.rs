//! `cargo xtask test-kernels`: a real capture on an older kernel, where TCX does not exist
//! (Linux < 6.6) and the agent must attach with netlink clsact filters.
//!
//! Debian 12's own 6.1 kernel is booted with virtme-ng, which shares the host's root filesystem
//! read-only (9p) with writable overlays on /etc, /var, /tmp and friends, so the guest runs the
//! agent just built, nginx, curl and tcpdump from the host. The kernel package is downloaded and
//! unpacked under `target/vm`, never installed; virtme-ng finds its modules next to the image
//! and makes `modprobe` use them in the guest. The guest script builds its own namespaces and
//! veth, captures one request with `--attach auto`, checks the pcap and that no filter is left,
//! and writes its log and verdict to a directory shared read-write with the host.
use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::{
    run::{command_output, run},
    target_dir,
};

/// virtme-ng and its dependencies, pinned, transitive ones included.
const PYTHON_PACKAGES: &[&str] = &[
    "virtme-ng==1.42",
    "argcomplete==3.7.2",
    "requests==2.34.2",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "idna==3.20",
    "urllib3==2.8.0",
];

/// The Debian meta package whose dependency names the current bookworm 6.1 kernel.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// Boot, capture and checks together; TCG needs about half a minute of it.
const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs inside the VM as root: `guest.sh AGENT OUT`.
const GUEST_SCRIPT: &str = r#"#!/bin/bash
# One real capture on the guest's kernel with `--attach auto`; written by xtask/src/kernels.rs.
set -euo pipefail
agent=$1
out=$2
exec >"$out/guest.log" 2>&1
work=$(mktemp -d)
srv=shadowvm-srv
cli=shadowvm-cli
path=/shadow-older-kernel
nginx_pid=
agent_pid=
cleanup() {
    set +e
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null
    [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null
    ip netns del "$srv" 2>/dev/null
    ip netns del "$cli" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
step() { echo "== $*"; }
fail() {
    if [ -f "$work/agent.log" ]; then
        echo "-- agent log"
        cat "$work/agent.log"
    fi
    echo "FAIL: $*"
    exit 1
}

step "kernel $(uname -r)"
# Debian builds veth, the clsact qdisc and cls_bpf as modules.
modprobe -a veth sch_ingress cls_bpf
[ -e /sys/kernel/btf/vmlinux ] || fail "no BTF in this kernel"

step "hosts: $cli 198.18.0.1 <-> $srv 198.18.0.2"
ip netns add "$srv"
ip netns add "$cli"
ip link add shadowvm-c netns "$cli" type veth peer name shadowvm-s netns "$srv"
ip -n "$srv" addr add 198.18.0.2/30 dev shadowvm-s
ip -n "$cli" addr add 198.18.0.1/30 dev shadowvm-c
for ns in "$srv" "$cli"; do
    ip -n "$ns" link set lo up
done
ip -n "$srv" link set shadowvm-s up
ip -n "$cli" link set shadowvm-c up

step "nginx"
cat >"$work/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events {}
http {
    access_log off;
    server {
        listen 198.18.0.2:80;
        location / { return 200 "shadow\n"; }
    }
}
EOF
ip netns exec "$srv" nginx -c "$work/nginx.conf" -p "$work" &
nginx_pid=$!
for _ in $(seq 100); do
    ip netns exec "$cli" curl -s -o /dev/null --max-time 2 http://198.18.0.2/ready && break
    sleep 0.2
done
ip netns exec "$cli" curl -sS -o /dev/null --max-time 5 http://198.18.0.2/ready \
    || fail "nginx does not answer"

step "capture with --attach auto"
ip netns exec "$srv" "$agent" capture --interface shadowvm-s --port 80 \
    --write "$work/x.pcap" --duration 20s --attach auto --stats-json "$work/stats.json" \
    >"$work/agent.log" 2>&1 &
agent_pid=$!
for _ in $(seq 300); do
    grep -q "capturing on" "$work/agent.log" 2>/dev/null && break
    kill -0 "$agent_pid" 2>/dev/null || fail "the agent exited before capturing"
    sleep 0.2
done
grep -q "capturing on" "$work/agent.log" || fail "the agent did not start capturing"
grep "capturing on" "$work/agent.log"
grep -q "via netlink" "$work/agent.log" || fail "--attach auto did not choose netlink"
filters=$(ip netns exec "$srv" tc filter show dev shadowvm-s ingress)
echo "$filters"
[ -n "$filters" ] || fail "no netlink filter on ingress while capturing"

step "request"
code=$(ip netns exec "$cli" curl -sS -o /dev/null -w '%{http_code}' --max-time 10 \
    "http://198.18.0.2$path")
[ "$code" = 200 ] || fail "curl got $code"

step "agent exit"
status=0
wait "$agent_pid" || status=$?
agent_pid=
cat "$work/agent.log"
[ "$status" = 0 ] || fail "the agent exited with $status"
cat "$work/stats.json"; echo

step "pcap"
tcpdump -nr "$work/x.pcap" 2>&1 | tail -n 20
# grep without -q reads to the end, so that pipefail never sees tcpdump's SIGPIPE.
tcpdump -nr "$work/x.pcap" -A 2>/dev/null | grep "GET $path HTTP/1.1" >/dev/null \
    || fail "the request is not in the pcap"
"$agent" inspect --pcap "$work/x.pcap" --port 80 >"$work/inspect.json"
cat "$work/inspect.json"
grep "\"target\":\"$path\"" "$work/inspect.json" | grep '"status":200' >/dev/null \
    || fail "inspect did not rebuild the request and its response"

step "nothing left attached"
for hook in ingress egress; do
    left=$(ip netns exec "$srv" tc filter show dev shadowvm-s "$hook")
    [ -z "$left" ] || fail "a filter stayed on $hook: $left"
done

echo pass >"$out/result"
echo PASS
"#;

/// Boots Debian 12's 6.1 kernel in a VM and runs a real netlink-attached capture inside.
pub fn test_older_kernels() -> Result<()> {
    let started = Instant::now();
    let vm = target_dir().join("vm");
    fs::create_dir_all(&vm)?;
    let vng = ensure_virtme(&vm)?;
    let kernel = ensure_kernel(&vm)?;
    // The guest runs this binary from the shared host filesystem; the eBPF object is inside.
    let agent = fs::canonicalize(crate::build_agent()?)?;

    let script = vm.join("guest.sh");
    fs::write(&script, GUEST_SCRIPT)?;
    let out = vm.join("out");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let out = fs::canonicalize(&out)?;
    let script = fs::canonicalize(&script)?;

    let kvm = kvm_usable();
    // vng prints the VM's console (kernel, virtme-init) on stderr, its own messages on stdout.
    let console = out.join("console.log");
    let console_file = fs::File::create(&console)?;
    let mut cmd = Command::new(&vng);
    cmd.arg("--verbose")
        .arg("--run")
        .arg(&kernel)
        .args(["--force-9p", "--memory", "1G", "--cpus", "2"])
        .arg(format!("--rwdir={}", out.display()));
    if !kvm {
        cmd.arg("--disable-kvm");
    }
    cmd.arg("--exec").arg(format!(
        "bash {} {} {}",
        script.display(),
        agent.display(),
        out.display()
    ));
    // vng runs virtme-run from PATH, which runs qemu.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![vng.parent().context("venv bin")?.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(paths)?)
        .current_dir(&vm)
        .stdin(Stdio::null())
        .stdout(console_file.try_clone()?)
        .stderr(console_file)
        // Its own process group, so that a timeout ends vng, virtme-run and qemu together.
        .process_group(0);
    eprintln!(
        "xtask: booting {} ({}), log in {}",
        kernel.display(),
        if kvm {
            "KVM"
        } else {
            "TCG: no usable KVM here"
        },
        console.display()
    );
    let mut child = cmd.spawn().context("cannot start vng")?;
    let deadline = Instant::now() + VM_TIMEOUT;
    let timed_out = loop {
        if child.try_wait()?.is_some() {
            break false;
        }
        if Instant::now() > deadline {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            break true;
        }
        thread::sleep(Duration::from_millis(200));
    };

    let verdict = fs::read_to_string(out.join("result")).unwrap_or_default();
    if verdict.trim() == "pass" {
        eprintln!(
            "xtask: older kernel ({}): capture with netlink attachments passed in {:.0?}",
            kernel_version(&kernel),
            started.elapsed()
        );
        return Ok(());
    }
    // A verifier log runs to thousands of lines; its end says what failed.
    eprintln!(
        "--- guest script output (last lines; all of it in {})\n{}",
        out.join("guest.log").display(),
        last_lines(&out.join("guest.log"), 120)
    );
    eprintln!("--- VM console (last lines)\n{}", last_lines(&console, 30));
    if timed_out {
        bail!("the VM did not finish within {VM_TIMEOUT:?}");
    }
    bail!("the capture on the older kernel failed (see the guest output above)")
}

/// The venv with virtme-ng.
fn ensure_virtme(vm: &Path) -> Result<PathBuf> {
    let venv = vm.join("venv");
    crate::setup::python_venv(&venv, PYTHON_PACKAGES, "virtme-ng")?;
    Ok(venv.join("bin/vng"))
}

/// The image of the kernel that Debian 12's meta package names now, unpacked (not installed)
/// under `vm/linux-<version>` with its modules beside it; downloaded once per version.
fn ensure_kernel(vm: &Path) -> Result<PathBuf> {
    let depends = command_output(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]))?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-6.1."))
        .with_context(|| {
            format!("{KERNEL_META_PACKAGE} names no 6.1 kernel image (is this Debian 12?)")
        })?
        .to_owned();
    let version = package.trim_start_matches("linux-image-").to_owned();
    let dir = vm.join(format!("linux-{version}"));
    let image = dir.join(format!("boot/vmlinuz-{version}"));
    if image.exists() && dir.join(format!("lib/modules/{version}")).is_dir() {
        return Ok(fs::canonicalize(image)?);
    }
    let download = vm.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    eprintln!("xtask: downloading {package} (unpacked under target/vm, not installed)");
    run(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(&download))?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
    let unpacking = vm.join(format!("linux-{version}.partial"));
    let _ = fs::remove_dir_all(&unpacking);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacking))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&unpacking, &dir)?;
    fs::remove_dir_all(&download)?;
    Ok(fs::canonicalize(image)?)
}

/// KVM works only where the CPU offers virtualisation to this system; in a nested VM without
/// it, /dev/kvm may exist yet a guest kernel stalls at boot, so TCG is used there.
fn kvm_usable() -> bool {
    Path::new("/dev/kvm").exists()
        && fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
}

fn last_lines(file: &Path, n: usize) -> String {
    let text = fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn kernel_version(image: &Path) -> String {
    image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or("?")
        .to_owned()
}
