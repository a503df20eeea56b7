//! The kernel integration tests on other kernels than the host's, booted in a VM: Debian 12's 6.1
//! by default (no TCX there, so the agent must attach with netlink clsact filters), or any image
//! given with `cargo xtask test --kernel PATH`.
//!
//! virtme-ng boots the image with the host's root filesystem shared read-only (9p) and writable
//! overlays on /etc, /var, /tmp and friends, so the guest runs the test binaries and the agent
//! just built, with nginx, curl, tcpdump and tshark from the host. Debian's kernel package is
//! downloaded and unpacked under `target/vm`, never installed; virtme-ng finds its modules next
//! to the image and makes `modprobe` use them in the guest. The guest runs each test binary in
//! turn and writes its log and verdict to a directory shared read-write with the host.
use std::{
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use shadow_tests::Program;

use crate::{
    cargo,
    run::{command_output, run},
    target_dir,
    venv::Venv,
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

/// The Debian meta package whose dependency names a release's current kernel image.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// How long the package lists fetched for a Debian release's kernel are used before they are
/// fetched again (to find a newer point release of its kernel).
const LISTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// A Debian release whose own kernel the tests boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Debian {
    /// Debian 12's 6.1: no TCX.
    Bookworm,
    /// Debian 11's 5.10: the oldest kernel tested.
    Bullseye,
}

impl Debian {
    /// Every release, each of which an unfiltered `cargo xtask test` boots.
    pub const ALL: [Debian; 2] = [Debian::Bookworm, Debian::Bullseye];

    /// The name `--kernel` takes for it.
    pub fn name(self) -> &'static str {
        match self {
            Debian::Bookworm => "debian-6.1",
            Debian::Bullseye => "debian-5.10",
        }
    }

    fn suite(self) -> &'static str {
        match self {
            Debian::Bookworm => "bookworm",
            Debian::Bullseye => "bullseye",
        }
    }

    /// How the image package's name starts.
    fn image_prefix(self) -> &'static str {
        match self {
            Debian::Bookworm => "linux-image-6.1.",
            Debian::Bullseye => "linux-image-5.10.",
        }
    }
}

/// Boot and all the tests together. Without KVM (TCG) the guest runs several times slower than
/// the host, where these tests take about half a minute.
const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The tests that exercise the kernel program and its attachments, by test binary: all of
/// capture, privileges and tc, and the mirror tests that depend on the kernel (attachment, map
/// updates in place, loop protection through the kernel path). The other mirror tests exercise
/// user space only, which the host run covers.
const KERNEL_TESTS: &[(&str, &[&str])] = &[
    ("capture", &[]),
    ("privileges", &[]),
    ("tc", &[]),
    (
        "mirror",
        &[
            "gets_arrive_tagged_and_nothing_else_does",
            "reloads_apply_in_place_and_a_bad_file_changes_nothing",
            "the_agent_never_mirrors_its_own_copies",
            "a_config_error_names_its_line_and_nothing_is_attached",
        ],
    ),
    // The kernel's pod-side rule (each request taken where it enters its server's pod).
    (
        "kubernetes",
        &["two_nodes_capture_each_request_once_where_its_server_runs"],
    ),
];

/// Runs inside the VM as root: `guest.sh OUT`, with the test runs appended by [`guest_script`].
const GUEST_PRELUDE: &str = r#"#!/bin/bash
# The kernel integration tests on the guest's kernel; written by xtask/src/kernels.rs.
set -uo pipefail
out=$1
exec >"$out/guest.log" 2>&1
echo "== kernel $(uname -r)"
# Debian builds veth, the clsact qdisc and cls_bpf as modules; a kernel with them built in has
# no modules to load, and the tests say what is missing.
modprobe -a veth sch_ingress cls_bpf || echo "modprobe failed: the tests will need them built in"
failed=
run_tests() {
    local name=$1
    shift
    echo "== $name"
    if ! "$@"; then
        failed="$failed $name"
    fi
}
"#;

/// Which kernel the VM boots.
pub enum Kernel {
    /// A Debian release's current kernel image, downloaded once.
    Debian(Debian),
    /// An image given by the user; its modules, if any, where virtme-ng looks for them.
    Image(PathBuf),
}

/// Boots `kernel` in a VM and runs the kernel integration tests inside, those whose names
/// contain `filter` when one is given.
pub fn test_in_vm(kernel: &Kernel, agent: &Path, object: &Path, filter: &[String]) -> Result<()> {
    let started = Instant::now();
    let vm = target_dir().join("vm");
    fs::create_dir_all(&vm)?;
    let virtme = Venv::ensure(vm.join("venv"), PYTHON_PACKAGES, "virtme-ng")?;
    let kernel = match kernel {
        Kernel::Debian(release) => ensure_kernel(&vm, *release)?,
        Kernel::Image(path) => fs::canonicalize(path)
            .with_context(|| format!("no kernel image at {}", path.display()))?,
    };
    let binaries = test_binaries()?;
    // The guest runs these binaries from the shared host filesystem; the eBPF object is inside
    // the agent, and beside it for the tests' own programs.
    let agent = fs::canonicalize(agent)?;
    let object = fs::canonicalize(object)?;

    let script = vm.join("guest.sh");
    fs::write(&script, guest_script(&binaries, &agent, &object, filter)?)?;
    let out = vm.join(format!("out-{}", kernel_version(&kernel)));
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let out = fs::canonicalize(&out)?;
    let script = fs::canonicalize(&script)?;

    let kvm = kvm_usable();
    // vng prints the VM's console (kernel, virtme-init) on stderr, its own messages on stdout.
    let console = out.join("console.log");
    let console_file = fs::File::create(&console)?;
    let mut cmd = virtme.command("vng");
    cmd.arg("--verbose")
        .arg("--run")
        .arg(&kernel)
        .args(["--force-9p", "--memory", "2G", "--cpus", "2"])
        .arg(format!("--rwdir={}", out.display()));
    if !kvm {
        cmd.arg("--disable-kvm");
    }
    cmd.arg("--exec").arg(format!(
        "{} {} {}",
        Program::Bash.name(),
        script.display(),
        out.display()
    ));
    // vng runs virtme-run from PATH, which runs qemu.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![virtme.bin_dir()];
    paths.extend(std::env::split_paths(&path));
    cmd.env("PATH", std::env::join_paths(paths)?)
        .current_dir(&vm)
        .stdin(Stdio::null())
        .stdout(console_file.try_clone()?)
        .stderr(console_file)
        // Its own process group, so that a timeout ends vng, virtme-run and qemu together.
        .process_group(0);
    eprintln!(
        "xtask: booting {} ({}) for the kernel integration tests; their output goes to {}",
        kernel.display(),
        if kvm {
            "KVM"
        } else {
            "TCG: no usable KVM here"
        },
        out.join("guest.log").display()
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

    let log = out.join("guest.log");
    let verdict = fs::read_to_string(out.join("result")).unwrap_or_default();
    if verdict.trim() == "pass" {
        eprintln!(
            "xtask: kernel {}: {} passed in {:.0?}",
            kernel_version(&kernel),
            summary(&log),
            started.elapsed()
        );
        return Ok(());
    }
    // A verifier log runs to thousands of lines; its end says what failed.
    eprintln!(
        "--- guest output (last lines; all of it in {})\n{}",
        log.display(),
        last_lines(&log, 150)
    );
    eprintln!("--- VM console (last lines)\n{}", last_lines(&console, 30));
    if timed_out {
        bail!("the VM did not finish within {VM_TIMEOUT:?}");
    }
    bail!(
        "the kernel integration tests failed on kernel {}: {}",
        kernel_version(&kernel),
        verdict.trim()
    )
}

/// Builds the integration test binaries and returns each one's path by its name (`capture`...).
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = command_output(cargo().args([
        "test",
        "--package",
        "shadow-tests",
        "--tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if msg["target"]["kind"][0] == "test" {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

/// The guest script: the prelude, then one run per test binary of [`KERNEL_TESTS`], each with
/// its test names (or `filter`), and the verdict.
fn guest_script(
    binaries: &[(String, PathBuf)],
    agent: &Path,
    object: &Path,
    filter: &[String],
) -> Result<String> {
    let mut script = GUEST_PRELUDE.to_owned();
    writeln!(
        script,
        "export SHADOW_AGENT_BIN={}",
        quote(&agent.to_string_lossy())
    )?;
    writeln!(
        script,
        "export SHADOW_EBPF_OBJECT={}",
        quote(&object.to_string_lossy())
    )?;
    for (name, tests) in KERNEL_TESTS {
        let (_, exe) = binaries
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("cargo built no test binary `{name}`"))?;
        let mut args: Vec<String> = if filter.is_empty() {
            tests.iter().map(|t| (*t).to_owned()).collect()
        } else {
            filter.to_vec()
        };
        // The guest is slower than the host; two at a time, as on a 2-core host.
        args.push("--test-threads=2".into());
        let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
        writeln!(
            script,
            "run_tests {name} {} {}",
            quote(&exe.to_string_lossy()),
            args.join(" ")
        )?;
    }
    script.push_str(
        "if [ -z \"$failed\" ]; then echo pass >\"$out/result\"; echo PASS; \
         else echo \"failed:$failed\" >\"$out/result\"; echo \"FAIL:$failed\"; fi\n",
    );
    Ok(script)
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The test harness's result lines, summed: "41 tests".
fn summary(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let passed: u64 = text
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    format!("{passed} integration tests")
}

/// The image of the kernel that `release`'s meta package names now, unpacked (not installed)
/// under `vm/linux-<version>` with its modules beside it; downloaded once per version. The
/// package lists come from Debian's archive into `vm/apt-<suite>`, apart from the host's, and
/// apt checks them against the Debian archive keyring as it does the host's own.
fn ensure_kernel(vm: &Path, release: Debian) -> Result<PathBuf> {
    let apt = vm.join(format!("apt-{}", release.suite()));
    let lists = apt.join("lists");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(apt.join("cache/archives/partial"))?;
    let sources = apt.join("sources.list");
    fs::write(
        &sources,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian {suite} main\n\
             deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://deb.debian.org/debian-security {suite}-security main\n",
            suite = release.suite()
        ),
    )?;
    let options = [
        format!("-oDir::Etc::SourceList={}", sources.display()),
        "-oDir::Etc::SourceParts=/nonexistent".to_owned(),
        format!("-oDir::State::Lists={}", lists.display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
        "-oDebug::NoLocking=1".to_owned(),
    ];
    // Written after each successful fetch; its time says when that was.
    let fetched = apt.join("fetched");
    let fresh = fs::metadata(&fetched)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < LISTS_MAX_AGE));
    if !fresh {
        eprintln!("xtask: fetching Debian {}'s package lists", release.suite());
        run(Program::AptGet
            .command()
            .args(&options)
            .args(["update", "-q"]))?;
        fs::write(&fetched, "")?;
    }
    let depends = command_output(
        Program::AptCache
            .command()
            .args(&options)
            .args(["depends", KERNEL_META_PACKAGE]),
    )?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with(release.image_prefix()))
        .with_context(|| {
            format!(
                "Debian {}'s {KERNEL_META_PACKAGE} names no {}* package",
                release.suite(),
                release.image_prefix()
            )
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
    run(Program::AptGet
        .command()
        .args(&options)
        .args(["download", "-q", &package])
        .current_dir(&download))?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
    let unpacking = vm.join(format!("linux-{version}.partial"));
    let _ = fs::remove_dir_all(&unpacking);
    run(Program::DpkgDeb
        .command()
        .arg("-x")
        .arg(&deb)
        .arg(&unpacking))?;
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

/// The version in a Debian image's name (`vmlinuz-VERSION`), else the file's name.
fn kernel_version(image: &Path) -> String {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_prefix("vmlinuz-").unwrap_or(&name).to_owned()
}
