//! Test and demo scaffolding: network namespaces with real DNS servers (`testbed`), running
//! ringfence against them (`testrun`), and the seed tutorial (`demo`). Built only with the
//! `testkit` cargo feature (on by default for `ringfence demo`); a daemon built with
//! `--no-default-features` carries none of it.
pub mod demo;
pub mod testbed;
pub mod testrun;
