//! The generated skeleton of bpf/ringfence.bpf.c (built by build.rs into OUT_DIR).
#![allow(
    clippy::all,
    clippy::pedantic,
    non_camel_case_types,
    dead_code,
    missing_docs
)]
include!(concat!(env!("OUT_DIR"), "/ringfence.skel.rs"));
