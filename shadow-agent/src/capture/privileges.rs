//! What the kernel must offer and what the agent must be allowed, checked before anything is
//! loaded or attached, so that a missing piece is named instead of surfacing as EPERM later.
use caps::{CapSet, Capability};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error(
        "missing capability {name}: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (run as root, or grant them, e.g. `setcap cap_bpf,cap_net_admin,cap_perfmon+ep`)"
    )]
    MissingCapability { name: String },
    #[error("cannot read the process capabilities: {0}")]
    Read(String),
    #[error(
        "kernel {found} has no BPF ring buffer (needs 5.8 or newer; shadow supports 5.15 and newer)"
    )]
    KernelTooOld { found: String },
    #[error("cannot tell the kernel version: {0}")]
    KernelVersion(String),
}

/// The capabilities the agent needs: loading programs and maps (CAP_BPF), attaching to TC
/// (CAP_NET_ADMIN), and pointer-reading helpers such as `bpf_skb_load_bytes` on packet data
/// (CAP_PERFMON).
pub const REQUIRED: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_PERFMON,
];

/// Fails naming the first required capability missing from the effective set.
pub fn check_capabilities() -> Result<(), PrivilegeError> {
    let effective =
        caps::read(None, CapSet::Effective).map_err(|e| PrivilegeError::Read(e.to_string()))?;
    for cap in REQUIRED {
        // CAP_SYS_ADMIN implies CAP_BPF and CAP_PERFMON on the kernels that have them.
        let implied = matches!(cap, Capability::CAP_BPF | Capability::CAP_PERFMON)
            && effective.contains(&Capability::CAP_SYS_ADMIN);
        if !effective.contains(&cap) && !implied {
            return Err(PrivilegeError::MissingCapability {
                name: cap.to_string(),
            });
        }
    }
    Ok(())
}

/// Fails when the kernel predates BPF ring buffers (5.8).
pub fn check_kernel() -> Result<(), PrivilegeError> {
    let version = aya::util::KernelVersion::current()
        .map_err(|e| PrivilegeError::KernelVersion(e.to_string()))?;
    if version < aya::util::KernelVersion::new(5, 8, 0) {
        return Err(PrivilegeError::KernelTooOld {
            found: format!("{version:?}"),
        });
    }
    Ok(())
}
