//! Compiles bpf/ringfence.bpf.c into a CO-RE object and generates its skeleton in OUT_DIR.
//! The object is embedded in the binary: the target host needs no compiler and no headers.
use std::{env, path::PathBuf, process::Command};

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

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let arch_inc = format!("-I/usr/include/{}-linux-gnu", env::consts::ARCH);
    let mut args: Vec<String> = vec![
        "-Wall".into(),
        "-Werror".into(),
        "-mcpu=v3".into(),
        "-O2".into(),
        arch_inc,
    ];
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
