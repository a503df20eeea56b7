//! Which BPF programs are attached to the interfaces of a namespace.
//!
//! Debian 12's bpftool (7.1) predates TCX and lists only XDP and classic tc attachments, so TCX
//! (what aya picks on kernels from 6.6 on) is asked of the kernel directly with `BPF_PROG_QUERY`.
use std::io;

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// The `BPF_PROG_QUERY` member of `union bpf_attr` (Linux 6.6 layout).
#[repr(C, align(8))]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// How many programs are attached with TCX to `ifindex` (of the calling thread's network
/// namespace), on ingress and on egress; `None` on a kernel without TCX (before 6.6), which
/// does not know the attach type and answers EINVAL.
pub fn tcx_program_counts(ifindex: u32) -> io::Result<Option<(u32, u32)>> {
    let ingress = match query(ifindex, BPF_TCX_INGRESS) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some((ingress, query(ifindex, BPF_TCX_EGRESS)?)))
}

/// Whether the running kernel has TCX (6.6 and later). Without it the agent attaches netlink
/// clsact filters, which outlive a killed agent until its next start replaces them.
pub fn kernel_has_tcx() -> bool {
    // The loopback interface always has index 1 in the calling thread's namespace.
    !matches!(tcx_program_counts(1), Ok(None))
}

#[allow(
    unsafe_code,
    reason = "the bpf syscall has no safe wrapper in the test's dependencies"
)]
fn query(ifindex: u32, attach_type: u32) -> io::Result<u32> {
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type,
        ..QueryAttr::default()
    };
    // SAFETY: `attr` is a valid, zero-padded `bpf_attr` prefix of the size passed; with
    // `prog_ids` null the kernel only writes the count back into it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.prog_cnt)
}
