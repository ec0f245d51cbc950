//! cgroup v2: find the unified hierarchy, give each job a cgroup of its own, and clean it up.
//! A job is known to the kernel by its cgroup id (the directory's inode number), and every
//! process it starts stays in it or below it.
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (no cgroup2 entry in /proc/self/mountinfo) and mounting one at {path} failed: {errno}; this kernel may lack cgroup v2")]
    NoCgroup2 {
        path: String,
        errno: nix::errno::Errno,
    },
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup on most hosts, /sys/fs/cgroup/unified on
/// hybrid ones. Read from mountinfo rather than assumed.
/// When none is mounted here (`ip netns exec` remounts /sys and hides it; some containers
/// never had it), the one hierarchy is mounted privately under /run.
pub fn find_cgroup2() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(p) = parse_mountinfo(&info) {
        return Ok(p);
    }
    let path = PathBuf::from(PRIVATE_MOUNT);
    let fail = |errno| CgroupError::NoCgroup2 {
        path: PRIVATE_MOUNT.to_string(),
        errno,
    };
    fs::create_dir_all(&path)
        .map_err(|e| fail(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
    nix::mount::mount(
        Some("cgroup2"),
        &path,
        Some("cgroup2"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(fail)?;
    Ok(path)
}

const PRIVATE_MOUNT: &str = "/run/ringfence/cgroup2";

fn parse_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw"
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

/// A job's cgroup. Dropping it kills what is left in it and removes it.
pub struct JobCgroup {
    path: PathBuf,
    id: u64,
    level: u32,
}

impl JobCgroup {
    /// Creates `<cgroup2>/ringfence/<name>`.
    pub fn create(name: &str) -> Result<JobCgroup> {
        let root = find_cgroup2()?;
        let parent = root.join("ringfence");
        fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let path = parent.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let id = fs::metadata(&path).map_err(io_err(&path))?.ino();
        let level = path
            .strip_prefix(&root)
            .map(|p| p.components().count() as u32)
            .unwrap_or(0);
        Ok(JobCgroup { path, id, level })
    }

    /// A handle on an existing job cgroup (the guard process's, after ringfence died):
    /// dropping it kills what is left and removes it, as for the one that created it.
    pub fn adopt(path: &Path) -> JobCgroup {
        let id = fs::metadata(path).map(|m| m.ino()).unwrap_or(0);
        JobCgroup {
            path: path.to_path_buf(),
            id,
            level: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id the kernel reports for sockets of this cgroup (bpf_skb_cgroup_id).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Depth below the cgroup2 root (bpf_skb_ancestor_cgroup_id level).
    pub fn level(&self) -> u32 {
        self.level
    }

    /// An open `cgroup.procs`, for a child to move itself in before exec: then even its
    /// very first packet belongs to the job.
    pub fn procs_file(&self) -> Result<fs::File> {
        let p = self.path.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err(&p))
    }

    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let mut f = self.procs_file()?;
        write!(f, "{pid}").map_err(io_err(&self.path))
    }

    pub fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        collect_pids(&self.path, &mut out);
        out
    }

    /// Kills every process left in the job (a job's daemons do not outlive it).
    pub fn kill_all(&self) {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() && fs::write(&kill, "1").is_ok() {
        } else {
            for pid in self.pids() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The cgroup `pid` is in, relative to the cgroup2 root (`/ringfence/job-1/sub`), from
/// /proc/PID/cgroup. None when the process is gone.
pub fn cgroup_of(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(PathBuf::from)
}

/// `dir` (an absolute cgroup directory) relative to the cgroup2 root, as /proc/PID/cgroup
/// writes it (`/ringfence/job-1`).
pub fn relative(dir: &Path) -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let root = parse_mountinfo(&info).unwrap_or_else(|| PathBuf::from(PRIVATE_MOUNT));
    dir.strip_prefix(&root).ok().map(|p| Path::new("/").join(p))
}

fn collect_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        self.kill_all();
        remove_tree(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_mountinfo() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_mountinfo("27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n"),
            None
        );
    }
}
