//! A CPU cgroup of its own for the agent, weighted as a Kubernetes pod's: the shape production
//! gives it (a DaemonSet pod, a systemd service with `CPUWeight=`), where the kernel first
//! divides the CPU between cgroups by weight and only then, inside each, between its threads.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// What a Kubernetes CPU request of `millicores` gives its pod's cgroup: `cpu.shares`
/// (cgroup v1) as the kubelet computes it, and its cgroup v2 `cpu.weight`, as the kubelet and
/// runc convert one to the other.
pub fn pod_weight(millicores: u64) -> (u64, u64) {
    let shares = (millicores * 1024 / 1000).max(2);
    let weight = 1 + (shares - 2) * 9999 / 262_142;
    (shares, weight)
}

/// A CPU cgroup, removed on drop (once its processes have left or ended).
pub struct CpuGroup {
    path: PathBuf,
    /// Where processes go back to: the hierarchy's root.
    root: PathBuf,
}

impl CpuGroup {
    /// Creates `name` under the CPU hierarchy's root with the weight of a pod that requests
    /// `millicores`, on cgroup v1 (`cpu.shares`) or v2 (`cpu.weight`).
    pub fn pod(name: &str, millicores: u64) -> Result<Self> {
        let (shares, weight) = pod_weight(millicores);
        let (group, v1) = Self::create(name)?;
        let (file, value) = if v1 {
            ("cpu.shares", shares)
        } else {
            ("cpu.weight", weight)
        };
        group.write(file, value)?;
        Ok(group)
    }

    /// Creates `name` as an idle group (`cpu.idle`, kernel 5.15 and newer): against the groups
    /// beside it, it gets only CPU time they leave, as SCHED_IDLE does among threads. It is what
    /// systemd's `CPUWeight=idle` makes of a service's cgroup.
    pub fn idle(name: &str) -> Result<Self> {
        let (group, _) = Self::create(name)?;
        group.write("cpu.idle", 1)?;
        Ok(group)
    }

    /// The group `name` under the CPU hierarchy's root, and whether that is cgroup v1.
    fn create(name: &str) -> Result<(Self, bool)> {
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let (root, is_v1) = if v1.join("cpu.shares").exists() {
            (v1.to_path_buf(), true)
        } else if std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"))
        {
            std::fs::write(v2.join("cgroup.subtree_control"), "+cpu")
                .context("cannot enable the cpu controller for child cgroups")?;
            (v2.to_path_buf(), false)
        } else {
            bail!("no CPU cgroup controller here (neither cgroup v1 `cpu` nor v2 `cpu`)");
        };
        let path = root.join(name);
        if !path.exists() {
            std::fs::create_dir(&path)
                .with_context(|| format!("cannot create the cgroup {}", path.display()))?;
        }
        Ok((Self { path, root }, is_v1))
    }

    fn write(&self, file: &str, value: u64) -> Result<()> {
        std::fs::write(self.path.join(file), value.to_string())
            .with_context(|| format!("cannot set {file} of {}", self.path.display()))
    }

    /// Moves a process, all of its threads, into the group; its new threads start there too.
    pub fn add(&self, pid: u32) -> Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move {pid} into {}", self.path.display()))
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // Whatever still runs in it goes back to the root, so the group can go.
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_pod_requests() {
        // The kubelet: 100m is 102 shares; runc: 102 shares is weight 4 (1 + 100 * 9999 /
        // 262142), and 1024 shares (one CPU) is weight 39.
        assert_eq!(pod_weight(100), (102, 4));
        assert_eq!(pod_weight(1000), (1024, 39));
        assert_eq!(pod_weight(0), (2, 1));
    }
}
