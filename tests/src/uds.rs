//! gRPC over Unix sockets, as the proxy talks to the agent's SDS and XDS servers.

use std::path::{Path, PathBuf};

use tonic::transport::{Channel, Endpoint};

/// A gRPC channel to the server listening on the Unix socket `path`.
pub async fn channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    Endpoint::from_static("http://uds.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}
