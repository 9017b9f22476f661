//! Pieces shared by the agent, the proxy and the test bed: SPIFFE identities, TLS material, retry
//! backoff and logging set-up.

pub mod backoff;
pub mod identity;
pub mod logging;
pub mod pem;
pub mod tls;
