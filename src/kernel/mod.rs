//! Everything that touches libbpf and the kernel's BPF objects: the ABI shared with
//! bpf/abi.h (`abi`), the generated skeleton (`skel`), loading, attaching and the maps
//! (`dataplane`), how many entries the maps hold (`capacity`), the bpffs paths the daemon pins under (`pins`), interfaces and their
//! link types (`netif`), what this kernel supports (`probe`), and what the verifier
//! spent on each program (`verifier`).
pub mod abi;
pub mod capacity;
pub mod dataplane;
pub mod netif;
pub mod pins;
pub mod probe;
pub mod skel;
pub mod verifier;
