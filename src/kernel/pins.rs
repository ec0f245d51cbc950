//! Every bpffs path the daemon pins under, in one place (as cilium's paths.go), with the base
//! injectable so tests can pin side by side:
//!
//! ```text
//! <base>/abi            a one-entry array map: the ABI version of the build that pinned
//! <base>/maps/<name>    every map of the skeleton (the .rodata/.bss internals and sk_flows,
//!                       whose entries hold only for the load that made them, excepted)
//! <base>/links/<name>   TCX links (tcx-<ifindex>-egress|ingress) and each job's cgroup
//!                       links (job-<slot>-<program>)
//! ```
//!
//! Maps and links pinned here outlive the daemon: the kernel keeps enforcing, binding DNS
//! answers and writing the ring buffer while no daemon runs, and the next daemon reuses
//! them. The ABI version guards that reuse: a daemon of another build refuses pinned maps
//! whose layout it may not share, rather than misreading them.
use std::path::{Path, PathBuf};

use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

/// Where the daemon pins by default.
pub const DEFAULT_BASE: &str = "/sys/fs/bpf/ringfence";
/// bpffs's magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "the dataplane pinned at {base} was made by a ringfence build of ABI version \
         {found:#018x}; this build is {ours:#018x} and cannot read its maps. Stop with the \
         build that pinned it (`ringfence unload`), or remove {base} (this detaches \
         everything it enforces), then start again"
    )]
    AbiMismatch { base: String, found: u64, ours: u64 },
    #[error("{base} holds pinned objects but no ABI record ({base}/abi): it was not made by ringfence, or only in part; remove it first")]
    NoAbiRecord { base: String },
    #[error("{path} is not on a BPF filesystem (bpffs), so nothing can be pinned there: {why}")]
    NotBpffs { path: String, why: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, PinError>;

/// The pinned dataplane's paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pins {
    base: PathBuf,
}

/// What [`Pins::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing pinned: load fresh, then pin.
    Nothing,
    /// A dataplane of this ABI: reuse its maps, update its links in place.
    Adoptable,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PinError + 'a {
    move |source| PinError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        // f_type's width differs between architectures.
        .map(|s| {
            #[allow(clippy::unnecessary_cast)]
            let t = s.filesystem_type().0 as i64;
            t == BPF_FS_MAGIC
        })
        .unwrap_or(false)
}

impl Pins {
    pub fn new(base: impl Into<PathBuf>) -> Pins {
        Pins { base: base.into() }
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn abi(&self) -> PathBuf {
        self.base.join("abi")
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.base.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.base.join("links")
    }

    /// A TCX link of one interface and direction.
    pub fn tcx_link(&self, ifindex: u32, egress: bool) -> PathBuf {
        let dir = if egress { "egress" } else { "ingress" };
        self.links_dir().join(format!("tcx-{ifindex}-{dir}"))
    }

    /// A cgroup link of one job (`owner` is the job's slot, or "exec").
    pub fn job_link(&self, owner: &str, prog: &str) -> PathBuf {
        self.links_dir().join(format!("job-{owner}-{prog}"))
    }

    /// The pinned links of one job, as (program name, path).
    pub fn job_links(&self, owner: &str) -> Vec<(String, PathBuf)> {
        let prefix = format!("job-{owner}-");
        self.list_links()
            .into_iter()
            .filter_map(|(name, p)| Some((name.strip_prefix(&prefix)?.to_string(), p)))
            .collect()
    }

    /// Every pinned link, as (file name, path).
    pub fn list_links(&self) -> Vec<(String, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.links_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<(String, PathBuf)> = rd
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        v.sort();
        v
    }

    /// Makes sure the base sits on a bpffs, mounting one at /sys/fs/bpf when nothing is
    /// mounted there (systemd mounts it on most hosts; minimal VMs and containers do not),
    /// and creates the directories.
    pub fn prepare(&self) -> Result<()> {
        let parent = self.base.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) {
            let sys_bpf = Path::new("/sys/fs/bpf");
            if self.base.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
                std::fs::create_dir_all(sys_bpf).map_err(io("creating", sys_bpf))?;
                nix::mount::mount(
                    Some("bpf"),
                    sys_bpf,
                    Some("bpf"),
                    nix::mount::MsFlags::MS_NOSUID
                        | nix::mount::MsFlags::MS_NODEV
                        | nix::mount::MsFlags::MS_NOEXEC,
                    Some("mode=0700"),
                )
                .map_err(|e| PinError::NotBpffs {
                    path: sys_bpf.display().to_string(),
                    why: format!("mounting bpffs there failed: {e}"),
                })?;
                tracing::info!("mounted a BPF filesystem at /sys/fs/bpf");
            }
            if !is_bpffs(parent) {
                return Err(PinError::NotBpffs {
                    path: self.base.display().to_string(),
                    why: "mount one (mount -t bpf bpf DIR) or choose a base under /sys/fs/bpf"
                        .into(),
                });
            }
        }
        for d in [self.base.clone(), self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
        }
        Ok(())
    }

    /// What is pinned at the base, checked against this build's ABI.
    pub fn check(&self, ours: u64) -> Result<Found> {
        let abi = self.abi();
        if !abi.exists() {
            let has_maps = std::fs::read_dir(self.maps_dir())
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            return if has_maps {
                Err(PinError::NoAbiRecord {
                    base: self.base.display().to_string(),
                })
            } else {
                Ok(Found::Nothing)
            };
        }
        let found = read_abi(&abi).map_err(io("reading the ABI record", &abi))?;
        if found != ours {
            return Err(PinError::AbiMismatch {
                base: self.base.display().to_string(),
                found,
                ours,
            });
        }
        Ok(Found::Adoptable)
    }

    /// Records `version` as the ABI of what is pinned (after the maps are).
    pub fn write_abi(&self, version: u64) -> Result<()> {
        let path = self.abi();
        let mut map = MapHandle::create(
            MapType::Array,
            Some("rf_abi"),
            4,
            8,
            1,
            &libbpf_rs::libbpf_sys::bpf_map_create_opts {
                sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
                ..Default::default()
            },
        )
        .map_err(|e| io("creating the ABI record", &path)(std::io::Error::other(e)))?;
        map.update(&0u32.to_ne_bytes(), &version.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| io("writing the ABI record", &path)(std::io::Error::other(e)))?;
        map.pin(&path)
            .map_err(|e| io("pinning the ABI record", &path)(std::io::Error::other(e)))?;
        Ok(())
    }

    /// Overwrites the recorded ABI version (tests: a dataplane "of another build").
    pub fn overwrite_abi(&self, version: u64) -> std::io::Result<()> {
        let map = MapHandle::from_pinned_path(self.abi()).map_err(std::io::Error::other)?;
        map.update(&0u32.to_ne_bytes(), &version.to_ne_bytes(), MapFlags::ANY)
            .map_err(std::io::Error::other)
    }

    /// Removes every pin (links first: an unpinned link with no other holder detaches).
    pub fn remove_all(&self) -> Result<()> {
        for d in [self.links_dir(), self.maps_dir()] {
            if let Ok(rd) = std::fs::read_dir(&d) {
                for e in rd.flatten() {
                    let p = e.path();
                    std::fs::remove_file(&p).map_err(io("unpinning", &p))?;
                }
            }
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing", &d)(e)),
            }
        }
        let abi = self.abi();
        match std::fs::remove_file(&abi) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("unpinning", &abi)(e)),
        }
        match std::fs::remove_dir(&self.base) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &self.base)(e)),
        }
    }
}

fn read_abi(path: &Path) -> std::io::Result<u64> {
    let map = MapHandle::from_pinned_path(path).map_err(std::io::Error::other)?;
    let v = map
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .map_err(std::io::Error::other)?
        .ok_or_else(|| std::io::Error::other("empty"))?;
    let b: [u8; 8] = v
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| std::io::Error::other("short value"))?;
    Ok(u64::from_ne_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_under_the_base() {
        let p = Pins::new("/sys/fs/bpf/rf-test");
        assert_eq!(p.map("allow"), Path::new("/sys/fs/bpf/rf-test/maps/allow"));
        assert_eq!(
            p.tcx_link(7, true),
            Path::new("/sys/fs/bpf/rf-test/links/tcx-7-egress")
        );
        assert_eq!(
            p.job_link("12", "rf_backstop"),
            Path::new("/sys/fs/bpf/rf-test/links/job-12-rf_backstop")
        );
    }
}
