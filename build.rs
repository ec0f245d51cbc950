//! Compiles bpf/ringfence.bpf.c into a CO-RE object and generates its skeleton in OUT_DIR.
//! The object is embedded in the binary: the target host needs no compiler and no headers.
use std::{env, fs, path::PathBuf, process::Command};

use libbpf_cargo::SkeletonBuilder;

/// `BPF_CLANG` wins; otherwise the newest `clang-N` on PATH, then plain `clang`.
fn find_clang() -> PathBuf {
    if let Some(c) = env::var_os("BPF_CLANG") {
        return c.into();
    }
    for v in (14..=30).rev() {
        let name = format!("clang-{v}");
        if Command::new(&name).arg("--version").output().is_ok() {
            return name.into();
        }
    }
    "clang".into()
}

/// The headers that define what the BPF programs and the agent exchange through maps and
/// events (types, map definitions). A daemon keeps maps pinned across its own restarts;
/// one built from different headers must not reuse them, so their bytes are the ABI.
const ABI_HEADERS: &[&str] = &["bpf/abi.h", "bpf/maps.h"];

/// FNV-1a, 64 bits: stable across Rust versions and platforms (unlike `DefaultHasher`).
fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// Writes `ABI_VERSION` (included by src/kernel/abi.rs): the hash of each ABI header's
/// name, length and bytes, so that moving text from one header to another changes it too.
fn abi_version(out: &std::path::Path) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for path in ABI_HEADERS {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        fnv1a(&mut h, path.as_bytes());
        fnv1a(&mut h, &(bytes.len() as u64).to_le_bytes());
        fnv1a(&mut h, &bytes);
    }
    let doc = format!(
        "/// Hash (FNV-1a) of {}: maps pinned by a build with another value are not understood.\n",
        ABI_HEADERS.join(", ")
    );
    fs::write(
        out.join("abi_version.rs"),
        format!("{doc}pub const ABI_VERSION: u64 = {h:#018x};\n"),
    )
    .expect("writing abi_version.rs");
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    abi_version(&out);
    let arch_inc = format!("-I/usr/include/{}-linux-gnu", env::consts::ARCH);
    let mut args: Vec<String> = vec![
        "-Wall".into(),
        "-Werror".into(),
        "-mcpu=v3".into(),
        "-O2".into(),
        arch_inc,
    ];
    // x86-64 keeps loads in order with loads (TSO): the seqlock reader of bpf/maps.h's
    // sk_flows can use plain loads there; elsewhere it pays for an atomic read.
    if env::consts::ARCH == "x86_64" {
        args.push("-DRF_LOADS_IN_ORDER=1".into());
    }
    if let Ok(extra) = env::var("BPF_CFLAGS") {
        args.extend(extra.split_whitespace().map(String::from));
    }
    SkeletonBuilder::new()
        .source("bpf/ringfence.bpf.c")
        .obj(out.join("ringfence.bpf.o"))
        .clang(find_clang())
        .clang_args(args)
        .build_and_generate(out.join("ringfence.skel.rs"))
        .expect("compiling bpf/ringfence.bpf.c (set BPF_CLANG to choose clang)");
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    println!("cargo:rerun-if-env-changed=BPF_CFLAGS");
}
