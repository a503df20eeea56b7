//! Every external program the integration tests, the benchmarks and the demo start, and where
//! each comes from: the one table `cargo xtask setup` installs, so that a fresh Debian machine
//! has everything the first `cargo xtask test` needs.
//!
//! Programs are started only through this table: [`Program::command`] here, and
//! [`crate::Netns::exec`] inside a namespace. The two other ways to start something are named
//! for what they start: [`built`] for this workspace's own binaries (cargo builds them), and
//! xtask's `Venv` for the programs of a pinned Python venv. A unit test of xtask
//! (`xtask/src/program_starts.rs`) reads the sources of `tests/` and `xtask/` and fails on any
//! other start, and on any program name (in a shell snippet or a script, say) the table lacks.
use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// Where a program comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Debian package, which `cargo xtask setup` installs.
    Debian(&'static str),
    /// A crate from crates.io, which `cargo xtask setup` installs with
    /// `cargo install NAME --version VERSION --locked` into `$CARGO_HOME/bin`.
    Crate {
        name: &'static str,
        version: &'static str,
    },
    /// The Rust toolchain, for the reason given: never installed by the Debian or crate steps.
    Toolchain(&'static str),
    /// Always there on Debian, from this package, for the reason given (an `Essential: yes`
    /// package, which every Debian system has and dpkg refuses to remove, or apt itself): never
    /// installed.
    Base {
        package: &'static str,
        why: &'static str,
    },
}

/// Declares [`Program`], its binary names and sources, and [`Program::ALL`], each program once.
macro_rules! programs {
    ($( $(#[doc = $doc:literal])* $variant:ident = $name:literal, $source:expr; )*) => {
        /// An external program the tests, the benchmarks or the demo start.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Program {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Program {
            /// Every program of the table, in declaration order.
            pub const ALL: &[Program] = &[$( Program::$variant, )*];

            /// The binary's file name, as `PATH` finds it.
            pub fn name(self) -> &'static str {
                match self {
                    $( Program::$variant => $name, )*
                }
            }

            /// Where it comes from: what `cargo xtask setup` installs for it, if anything.
            pub fn source(self) -> Source {
                match self {
                    $( Program::$variant => $source, )*
                }
            }
        }
    };
}

/// Where Debian packages put programs (usr-merged or not), searched in this order.
const DEBIAN_BIN_DIRS: &[&str] = &["/usr/bin", "/usr/sbin", "/bin", "/sbin"];

/// Why an `Essential: yes` package is always there.
const ESSENTIAL: &str = "Essential: every Debian system has it";
/// Why apt is always there.
const APT: &str = "Priority required: it installs everything else";

programs! {
    /// ApacheBench: bursts of keep-alive requests from many connections at once.
    Ab = "ab", Source::Debian("apache2-utils");
    /// Shows BPF attachments and the programs' run-time statistics.
    Bpftool = "bpftool", Source::Debian("bpftool");
    /// Runs the agent as an ordinary user with chosen capabilities (least-privilege tests).
    Capsh = "capsh", Source::Debian("libcap2-bin");
    /// Headless, it looks at the comparison report page.
    Chromium = "chromium", Source::Debian("chromium");
    /// A real HTTP client.
    Curl = "curl", Source::Debian("curl");
    /// Network namespaces, veth pairs, addresses (`ip netns exec` runs every program inside a
    /// namespace).
    Ip = "ip", Source::Debian("iproute2");
    /// Sends a signal by name to a process.
    Kill = "kill", Source::Debian("procps");
    /// Loads veth, sch_ingress and cls_bpf in the VM of `cargo xtask test --kernel` (kmod also
    /// has the depmod virtme-ng runs on the unpacked kernel's modules).
    Modprobe = "modprobe", Source::Debian("kmod");
    /// HTTP/2 load at a fixed rate (`--rps`), with a per-request log of latencies: the h2c and
    /// gRPC rows of the mirror benchmark.
    H2load = "h2load", Source::Debian("nghttp2-client");
    /// An HTTP/2 client that multiplexes several requests on one h2c connection (curl 7.88
    /// fails to reuse a prior-knowledge connection).
    Nghttp = "nghttp", Source::Debian("nghttp2-client");
    /// The live service (nginx-light has the `mirror` module the mirror benchmark compares with).
    Nginx = "nginx", Source::Debian("nginx-light");
    /// A load generator with a fixed-rate mode (`-q`), which wrk lacks, and JSON output.
    Oha = "oha", Source::Crate { name: "oha", version: "1.16.0" };
    /// A second real HTTP client, the JSON app of the comparison tests (`app.py`), and the gRPC
    /// service and client of the gRPC tests (`grpc_app.py`, with python3-grpcio).
    Python3 = "python3", Source::Debian("python3");
    /// Switches the kernel's BPF run-time statistics on and off (capture benchmark).
    Sysctl = "sysctl", Source::Debian("procps");
    /// Reads and writes pcaps.
    Tcpdump = "tcpdump", Source::Debian("tcpdump");
    /// A second, independent pcap reader.
    Tshark = "tshark", Source::Debian("tshark");
    /// Load at the highest rate the service carries.
    Wrk = "wrk", Source::Debian("wrk");

    /// The guest script of the kernel VM.
    Bash = "bash", Source::Base { package: "bash", why: ESSENTIAL };
    /// The machine's CPU model, for benchmark reports.
    Lscpu = "lscpu", Source::Base { package: "util-linux", why: ESSENTIAL };
    /// Picks lscpu's model line.
    Sed = "sed", Source::Base { package: "sed", why: ESSENTIAL };
    /// Shell snippets (`sh -c`).
    Sh = "sh", Source::Base { package: "dash", why: ESSENTIAL };
    /// A process that does nothing for a while (harness tests).
    Sleep = "sleep", Source::Base { package: "coreutils", why: ESSENTIAL };
    /// Writes dirty pages back between benchmark runs.
    Sync = "sync", Source::Base { package: "coreutils", why: ESSENTIAL };
    /// The kernel's release, for reports and the VM guest.
    Uname = "uname", Source::Base { package: "coreutils", why: ESSENTIAL };
    /// Unpacks a downloaded kernel package without installing it.
    DpkgDeb = "dpkg-deb", Source::Base { package: "dpkg", why: ESSENTIAL };
    /// Which of the table's packages are installed.
    DpkgQuery = "dpkg-query", Source::Base { package: "dpkg", why: ESSENTIAL };
    /// Installs the table's packages; fetches other releases' package lists and kernels.
    AptGet = "apt-get", Source::Base { package: "apt", why: APT };
    /// Reads other releases' package lists (which kernel a release ships).
    AptCache = "apt-cache", Source::Base { package: "apt", why: APT };

    /// Builds the workspace and installs the table's crates.
    Cargo = "cargo", Source::Toolchain("it runs xtask itself");
    /// Reports the nightly's sysroot and LLVM version, to build bpf-linker against.
    Rustc = "rustc", Source::Toolchain("it runs xtask itself");
    /// Installs the pinned nightly that builds the eBPF crate.
    Rustup = "rustup", Source::Toolchain("it runs xtask itself");
    /// Links the eBPF crate; setup builds it against the pinned nightly's LLVM (xtask/src/setup.rs).
    BpfLinker = "bpf-linker", Source::Toolchain("setup builds it with the pinned nightly");
}

/// A Debian package that is no program the code starts, but something such a program, or a
/// set-up step, needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SupportPackage {
    pub package: &'static str,
    pub why: &'static str,
}

/// Installed by `cargo xtask setup` with the table's own packages.
pub const SUPPORT_PACKAGES: &[SupportPackage] = &[
    SupportPackage {
        package: "ca-certificates",
        why: "cargo install, pip and rustup fetch over HTTPS",
    },
    SupportPackage {
        package: "python3-venv",
        why: "`python3 -m venv` makes the pinned venvs of the manifest checks and of virtme-ng",
    },
    SupportPackage {
        package: "qemu-system-x86",
        why: "virtme-ng (`cargo xtask test --kernel`) boots the older kernels in qemu",
    },
    SupportPackage {
        package: "python3-grpcio",
        why: "the gRPC service and client that python3 runs in tests/tests/grpc.rs (grpc_app.py)",
    },
    SupportPackage {
        package: "python3-protobuf",
        why: "grpc_app.py builds the descriptor set of tests/tests/grpc.rs (protoc is not needed)",
    },
    SupportPackage {
        package: "busybox-static",
        why: "virtme-ng builds the VM's initramfs with busybox",
    },
];

/// Every Debian package `cargo xtask setup` installs: those of the table's programs and the
/// support packages, each once, sorted.
pub fn debian_packages() -> Vec<&'static str> {
    let programs = Program::ALL.iter().filter_map(|p| match p.source() {
        Source::Debian(package) => Some(package),
        _ => None,
    });
    let support = SUPPORT_PACKAGES.iter().map(|s| s.package);
    programs
        .chain(support)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

impl Program {
    /// Where it is started from: `$CARGO_HOME/bin` for a crate (which need not be on `PATH`),
    /// the cargo that runs us for cargo (`$CARGO`), Debian's own directories for a Debian
    /// package, else the name, found on `PATH`.
    ///
    /// A Debian program is taken from where the package puts it, not from `PATH`: a `python3`
    /// of pyenv or a `curl` of Homebrew earlier on a developer's `PATH` lacks what setup
    /// installed for the tests (python3-grpcio's module, say).
    pub fn path(self) -> PathBuf {
        match self.source() {
            Source::Crate { .. } => cargo_home().join("bin").join(self.name()),
            _ if self == Program::Cargo => std::env::var_os("CARGO")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(self.name())),
            Source::Debian(_) | Source::Base { .. } => DEBIAN_BIN_DIRS
                .iter()
                .map(|dir| Path::new(dir).join(self.name()))
                .find(|path| path.is_file())
                .unwrap_or_else(|| PathBuf::from(self.name())),
            Source::Toolchain(_) => PathBuf::from(self.name()),
        }
    }

    /// A command that starts it, on this host (inside a namespace: [`crate::Netns::exec`]).
    pub fn command(self) -> Command {
        Command::new(self.path())
    }
}

/// "ab (Debian package apache2-utils)", for messages when it cannot be started.
impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source() {
            Source::Debian(package) => write!(f, "{} (Debian package {package})", self.name()),
            Source::Crate { name, version } => {
                write!(f, "{} (crate {name} {version})", self.path().display())
            }
            Source::Toolchain(_) | Source::Base { .. } => f.write_str(self.name()),
        }
    }
}

/// A command that starts one of this workspace's own binaries (`shadow-agent`, see
/// [`crate::agent_bin`]), which cargo builds rather than setup installs.
pub fn built(bin: &Path) -> Command {
    Command::new(bin)
}

/// Where cargo installs crates' binaries: `$CARGO_HOME`, else `~/.cargo`.
pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}
