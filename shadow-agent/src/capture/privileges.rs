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
    #[error(
        "missing capability CAP_SYS_RESOURCE: kernel {kernel} (before 5.11) charges BPF maps to \
         the locked-memory limit, which is {limit} here; grant CAP_SYS_RESOURCE, with which the \
         agent lifts the limit, or raise it (`ulimit -l unlimited`, systemd's \
         `LimitMEMLOCK=infinity`)"
    )]
    MemlockLimit { kernel: String, limit: String },
    #[error("cannot read the process capabilities: {0}")]
    Read(String),
    #[error(
        "kernel {found} has no BPF ring buffer (needs 5.8 or newer; shadow supports 5.10 and newer)"
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

/// The first kernel that charges BPF maps to the memory cgroup instead of RLIMIT_MEMLOCK.
const MEMCG_ACCOUNTING: (u8, u8, u16) = (5, 11, 0);

/// Fails naming the first required capability missing from the effective set, and, on kernels
/// that charge BPF maps to the locked-memory limit, when that limit is finite and the agent may
/// not lift it (CAP_SYS_RESOURCE): the ring buffer alone is megabytes, and the usual limit is
/// 64 KiB or 8 MiB.
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
    let version = kernel_version()?;
    let (major, minor, patch) = MEMCG_ACCOUNTING;
    if version < aya::util::KernelVersion::new(major, minor, patch)
        && !effective.contains(&Capability::CAP_SYS_RESOURCE)
        && let Some(limit) = finite_memlock_limit()
    {
        return Err(PrivilegeError::MemlockLimit {
            kernel: version.to_string(),
            limit: format!("{} KiB", limit / 1024),
        });
    }
    Ok(())
}

/// Fails when the kernel predates BPF ring buffers (5.8).
pub fn check_kernel() -> Result<(), PrivilegeError> {
    let version = kernel_version()?;
    if version < aya::util::KernelVersion::new(5, 8, 0) {
        return Err(PrivilegeError::KernelTooOld {
            found: version.to_string(),
        });
    }
    Ok(())
}

fn kernel_version() -> Result<aya::util::KernelVersion, PrivilegeError> {
    aya::util::KernelVersion::current().map_err(|e| PrivilegeError::KernelVersion(e.to_string()))
}

/// The soft RLIMIT_MEMLOCK in bytes, `None` when unlimited (or unreadable: loading then says
/// what went wrong).
fn finite_memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through the valid pointer it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}
