//! Test and demo scaffolding: network namespaces with real DNS servers (`testbed`), running
//! ringfence against them (`testrun`), the seed tutorial (`demo`), and the verifier's cost
//! per program against bench/verifier.json (`verifier_cost`). Built only with the
//! `testkit` cargo feature (on by default for `ringfence demo`); a daemon built with
//! `--no-default-features` carries none of it.
pub mod demo;
pub mod testbed;
pub mod testrun;
pub mod verifier_cost;
