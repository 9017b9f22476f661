//! The waypoint proxy: reads an Envoy v3 bootstrap, consumes the xDS istiod generates for a waypoint
//! (through the agent's XDS proxy), compiles it into immutable snapshots with precise NACKs for
//! anything it does not implement, and serves the admin API (data path: later issues).

pub mod admin;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod hbone;
pub mod listener;
pub mod server;
pub mod stats;
pub mod xds;
