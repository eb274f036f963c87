//! The API socket (`--api-socket PATH`): Cloud Hypervisor's HTTP API, HTTP/1.1 over a
//! Unix socket, mode 0600, served by its own thread.
//!
//! - transport: [`ApiServer`] (one thread, every connection on one poll loop, an absolute
//!   deadline per request), [`Request`]/[`Response`], and [`request`], the client;
//! - [`routes`]: paths, methods and bodies, parsed into a typed [`routes::ApiRequest`];
//! - [`handlers`]: what each request does ([`Dispatcher`]);
//! - [`vm_config`]: Cloud Hypervisor's `VmConfig` body, to and from Kite's configuration;
//! - [`OPENAPI`]: the document of Kite's subset (a test keeps it and [`routes::ROUTES`]
//!   in step).
//!
//! Malformed, oversized or late requests get an error status with `{"error": "..."}`;
//! the VM is unaffected.

mod client;
mod connection;
pub mod handlers;
mod http;
pub mod routes;
mod server;
pub mod vm_config;

use std::path::PathBuf;

pub use client::request;
pub use handlers::Dispatcher;
pub use http::{Answerer, Deferred, Handler, Reply, Request, Response, MAX_HEAD};
pub use routes::API_PREFIX;
pub use server::{ApiServer, CLIENT_DEADLINE, MAX_CONNECTIONS};

/// The OpenAPI 3.0 document of Kite's HTTP API: the subset of Cloud Hypervisor's that Kite
/// serves, under `/api/v1`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest request body read (a larger one gets 413).
pub const MAX_REQUEST: u64 = 64 << 10;

/// Errors starting the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket cannot be made.
    #[error("--api-socket {path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Something other than a stale socket is at the path.
    #[error("--api-socket {0}: the path exists and is not a socket")]
    Exists(PathBuf),
    /// A live socket is at the path: another VM's, or another program's.
    #[error("--api-socket {0}: another process is listening there")]
    InUse(PathBuf),
}
