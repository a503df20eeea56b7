//! Another program on shadow's TCX hooks: `shadow_test_pass`, from the agent's own eBPF object,
//! which ends the chain for every packet with a final verdict (`TCX_PASS`), as Cilium's programs
//! do. Loaded and attached by the test process itself: a TCX link lives as long as its file
//! descriptor, so it goes when the guard is dropped, on a panic too, and with the test process
//! however it ends.
use std::path::PathBuf;

use aya::{
    Ebpf, EbpfLoader,
    programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType, tc::TcAttachOptions},
    sys::SyscallError,
};

use crate::Netns;

const PROGRAM: &str = "shadow_test_pass";

/// The agent's eBPF object: `$SHADOW_EBPF_OBJECT` (`cargo xtask test` sets it), else the newest
/// that the agent's build script wrote under `target/debug`.
pub fn ebpf_object() -> PathBuf {
    if let Some(path) = std::env::var_os("SHADOW_EBPF_OBJECT") {
        return PathBuf::from(path);
    }
    let build = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/build");
    std::fs::read_dir(&build)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("shadow-agent-"))
        .map(|e| e.path().join("out/shadow-ebpf"))
        .filter_map(|p| {
            let meta = std::fs::metadata(&p).ok().filter(|m| m.len() > 0)?;
            Some((meta.modified().ok()?, p))
        })
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "no eBPF object under {}: build the agent (`cargo build -p shadow-agent`) or set \
                 SHADOW_EBPF_OBJECT",
                build.display()
            )
        })
}

/// Instances of `shadow_test_pass` attached by TCX, for as long as this lives.
pub struct TcxPass {
    /// One object per instance: a TCX hook takes each program once.
    _loaded: Vec<Ebpf>,
}

impl TcxPass {
    /// At the head of both chains (ingress and egress) of `iface` in `ns`.
    pub fn first(ns: &Netns, iface: &str) -> Self {
        let bytes = read_object();
        let loaded = ns.run_in(|| {
            let mut ebpf = load(&bytes);
            let pass = program(&mut ebpf);
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                pass.attach_with_options(
                    iface,
                    hook,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .unwrap_or_else(|e| panic!("cannot attach {PROGRAM} to {iface}: {e}"));
            }
            ebpf
        });
        Self {
            _loaded: vec![loaded],
        }
    }

    /// As many instances on the ingress chain of `iface` in `ns` as the kernel takes (it holds
    /// at most 64 programs per hook), so that no other program can be attached there. Returns
    /// how many were attached, and the kernel's answer to one more.
    pub fn fill_ingress(ns: &Netns, iface: &str) -> (Self, usize, std::io::Error) {
        let bytes = read_object();
        let (loaded, refusal) = ns.run_in(|| {
            let mut loaded = Vec::new();
            loop {
                let mut ebpf = load(&bytes);
                let attached = program(&mut ebpf).attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::last()),
                );
                match attached {
                    Ok(_) => loaded.push(ebpf),
                    Err(ProgramError::SyscallError(SyscallError { io_error, .. })) => {
                        break (loaded, io_error);
                    }
                    Err(e) => panic!("attaching {PROGRAM} to {iface}: {e}"),
                }
                assert!(loaded.len() <= 1024, "{iface} takes programs without end");
            }
        });
        let n = loaded.len();
        (Self { _loaded: loaded }, n, refusal)
    }
}

fn read_object() -> Vec<u8> {
    let path = ebpf_object();
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn load(bytes: &[u8]) -> Ebpf {
    let mut ebpf = EbpfLoader::new()
        // Only the program is used; keep the unused ring buffer small.
        .map_max_entries("EVENTS", 4096)
        .load(bytes)
        .unwrap_or_else(|e| panic!("cannot load the eBPF object: {e}"));
    program(&mut ebpf)
        .load()
        .unwrap_or_else(|e| panic!("cannot load {PROGRAM}: {e}"));
    ebpf
}

fn program(ebpf: &mut Ebpf) -> &mut SchedClassifier {
    ebpf.program_mut(PROGRAM)
        .unwrap_or_else(|| panic!("the eBPF object has no {PROGRAM}: rebuild the agent"))
        .try_into()
        .unwrap_or_else(|e| panic!("{PROGRAM} is not a classifier: {e}"))
}
