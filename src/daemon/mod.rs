//! The host daemon: `ringfence run` owns one pinned dataplane (`server`), jobs come and go
//! through its control socket (`protocol`; the `job`, `report`, `status` and `unload`
//! commands are its `client`), and what it must remember to take its jobs over after a
//! restart is in `state`. `config` is its TOML file.
pub mod client;
pub mod config;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod state;
pub mod watch;
