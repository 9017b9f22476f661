//! Listeners. For now only the bootstrap's static HTTP listeners (`0.0.0.0_15021` readiness →
//! `agent`, `0.0.0.0_15090` Prometheus → `prometheus_stats`); the dynamic waypoint listeners arrive
//! with the data path.

pub mod static_http;
