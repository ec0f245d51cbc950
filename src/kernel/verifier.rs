//! What the verifier spent on each program as this kernel loaded it: the instructions it
//! processed (`bpf_prog_info.verified_insns`, kernel 5.16+), the figure cilium's complexity
//! tests track. A change that grows it brings a program closer to the verifier's limit
//! (1M instructions processed) and slows every load; bench/verifier.json keeps the figures
//! per kernel, and `rfbench verifier` and tests/verifier_cost.rs compare against it.
use std::os::fd::AsFd;

use thiserror::Error;

use crate::kernel::dataplane::Dataplane;

/// One program of the object and what its verification cost on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramCost {
    pub name: String,
    /// `None`: not loaded on this kernel (a hook it lacks, see `Dataplane::load`).
    pub verified_insns: Option<u32>,
}

#[derive(Debug, Error)]
pub enum VerifierError {
    #[error("reading bpf_prog_info of program {program}: {source}")]
    Info {
        program: String,
        source: std::io::Error,
    },
    #[error(
        "the kernel reports 0 instructions processed for program {program}: \
         bpf_prog_info.verified_insns needs kernel 5.16 or later"
    )]
    Unreported { program: String },
}

/// Every program of `dp`'s object with its `verified_insns`, in the object's order. A
/// loaded program whose figure cannot be read is an error, not a gap.
pub fn costs(dp: &Dataplane) -> Result<Vec<ProgramCost>, VerifierError> {
    let mut out = Vec::new();
    for prog in dp.programs() {
        let name = prog.name().to_string_lossy().into_owned();
        // A program left out of the load has no fd (-1): never ask the kernel about it.
        if !prog.autoload() {
            out.push(ProgramCost {
                name,
                verified_insns: None,
            });
            continue;
        }
        let n = verified_insns(prog.as_fd()).map_err(|source| VerifierError::Info {
            program: name.clone(),
            source,
        })?;
        if n == 0 {
            return Err(VerifierError::Unreported { program: name });
        }
        out.push(ProgramCost {
            name,
            verified_insns: Some(n),
        });
    }
    Ok(out)
}

/// `bpf_prog_info.verified_insns` of the program behind `fd`. libbpf-rs 0.27 reads it only
/// through `ProgInfoIter`, which walks every program on the host and skips what it cannot
/// read; this asks for the one program, with no arrays (the kernel fills the counters).
fn verified_insns(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u32> {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::AsRawFd;
    let mut info = sys::bpf_prog_info::default();
    let mut len = std::mem::size_of::<sys::bpf_prog_info>() as u32;
    // SAFETY: `info` is a zeroed bpf_prog_info of `len` bytes that outlives the call; with
    // every array pointer null and every array length 0 the kernel writes only into it.
    let rc = unsafe {
        sys::bpf_obj_get_info_by_fd(
            fd.as_raw_fd(),
            (&mut info as *mut sys::bpf_prog_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(-rc));
    }
    Ok(info.verified_insns)
}
