//! Upstreams: clusters at run time (hosts, load balancing, pools, circuit breakers, outlier
//! detection), connecting to hosts.

pub mod breaker;
pub mod cluster_manager;
pub mod connect;
pub mod dns;
pub mod h1;
pub mod lb;
pub mod outlier;
pub mod pool;
pub mod retry_priority;
