//! The API's routes, and requests parsed into [`ApiRequest`]: one place that knows
//! paths, methods and bodies. Cloud Hypervisor's paths under `/api/v1`.

use serde::Deserialize;

use std::path::PathBuf;

use super::http::Response;
use crate::config::VmConfig;
use crate::control::RestoreRequest;
use crate::snapshot::MemoryRestore;

/// Where every route lives.
pub const API_PREFIX: &str = "/api/v1/";

/// A route: its endpoint (after [`API_PREFIX`]) and method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The endpoint, e.g. `vm.info`.
    pub endpoint: &'static str,
    /// `GET` or `PUT`.
    pub method: &'static str,
}

const fn route(endpoint: &'static str, method: &'static str) -> Route {
    Route { endpoint, method }
}

/// Every route Kite answers.
pub const ROUTES: &[Route] = &[
    route("vmm.ping", "GET"),
    route("vmm.shutdown", "PUT"),
    route("vm.create", "PUT"),
    route("vm.boot", "PUT"),
    route("vm.delete", "PUT"),
    route("vm.info", "GET"),
    route("vm.counters", "GET"),
    route("vm.resize", "PUT"),
    route("vm.pause", "PUT"),
    route("vm.resume", "PUT"),
    route("vm.shutdown", "PUT"),
    route("vm.reboot", "PUT"),
    route("vm.power-button", "PUT"),
    route("vm.snapshot", "PUT"),
    route("vm.restore", "PUT"),
];

/// Cloud Hypervisor endpoints Kite does not have: answered 501 with their name, not 404.
pub const UNSUPPORTED: &[&str] = &[
    "vm.add-device",
    "vm.add-disk",
    "vm.add-fs",
    "vm.add-net",
    "vm.add-pmem",
    "vm.add-user-device",
    "vm.add-vdpa",
    "vm.add-vsock",
    "vm.remove-device",
    "vm.resize-zone",
    "vm.resize-disk",
    "vm.coredump",
    "vm.send-migration",
    "vm.receive-migration",
    "vm.nmi",
    "vmm.nmi",
];

/// `vm.resize`'s body (Cloud Hypervisor's `VmResize`).
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResize {
    /// vCPUs wanted: Kite has no vCPU hotplug.
    #[serde(default)]
    pub desired_vcpus: Option<u32>,
    /// Guest memory wanted in all (boot RAM + hotplugged), bytes.
    #[serde(default)]
    pub desired_ram: Option<u64>,
    /// Balloon size wanted: Kite has no balloon.
    #[serde(default)]
    pub desired_balloon: Option<u64>,
}

/// `vm.snapshot`'s body (Cloud Hypervisor's `VmSnapshotConfig`).
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotConfig {
    /// Where to write it: `file:///DIR`, a directory that does not exist yet.
    pub destination_url: String,
}

/// `vm.restore`'s body (Cloud Hypervisor's `RestoreConfig`).
#[derive(Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// The snapshot: `file:///DIR`.
    pub source_url: String,
    /// Read all of guest memory before the VM runs (else it is filled on first touch).
    #[serde(default)]
    pub prefault: bool,
    /// Network descriptors: Kite has no network devices.
    #[serde(default)]
    pub net_fds: Option<serde_json::Value>,
}

/// The directory of a `file:///DIR` URL (absolute; no host part).
fn file_url(what: &str, url: &str) -> Result<PathBuf, Response> {
    let bad = |why: &str| Response::error(400, format!("{what}: {why}"));
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| bad("a file:///DIR URL is needed (Kite writes snapshots to files)"))?;
    if !path.starts_with('/') || path == "/" || path.contains('\0') {
        return Err(bad("the URL's path must be an absolute directory path"));
    }
    Ok(PathBuf::from(path))
}

/// A request of the API, typed.
#[derive(Debug)]
pub enum ApiRequest {
    /// `GET vmm.ping`.
    Ping,
    /// `PUT vmm.shutdown`.
    ShutdownVmm,
    /// `PUT vm.create`.
    Create(Box<VmConfig>),
    /// `PUT vm.boot`.
    Boot,
    /// `PUT vm.delete`.
    Delete,
    /// `GET vm.info`.
    Info,
    /// `GET vm.counters`.
    Counters,
    /// `PUT vm.resize`: the new total guest memory.
    Resize(u64),
    /// `PUT vm.pause`.
    Pause,
    /// `PUT vm.resume`.
    Resume,
    /// `PUT vm.shutdown`.
    Shutdown,
    /// `PUT vm.reboot`.
    Reboot,
    /// `PUT vm.power-button`.
    PowerButton,
    /// `PUT vm.snapshot`: the directory to write.
    Snapshot(PathBuf),
    /// `PUT vm.restore`.
    Restore(Box<RestoreRequest>),
}

/// Parses a request for `path` with `method` and `body`; an error response if it is not
/// one Kite answers.
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, Response> {
    let Some(endpoint) = path.strip_prefix(API_PREFIX) else {
        return Err(Response::error(
            404,
            format!("no such path: {path} (routes are under {API_PREFIX})"),
        ));
    };
    let Some(route) = ROUTES.iter().find(|r| r.endpoint == endpoint) else {
        if UNSUPPORTED.contains(&endpoint) {
            return Err(Response::error(
                501,
                format!("{endpoint}: Kite does not support this Cloud Hypervisor action"),
            ));
        }
        return Err(Response::error(
            404,
            format!("no such endpoint: {endpoint}"),
        ));
    };
    if route.method != method {
        return Err(Response::error(
            405,
            format!("{endpoint} takes {}, not {method}", route.method),
        ));
    }
    Ok(match endpoint {
        "vmm.ping" => ApiRequest::Ping,
        "vmm.shutdown" => ApiRequest::ShutdownVmm,
        "vm.create" => ApiRequest::Create(Box::new(
            super::vm_config::parse_vm_config(body)
                .map_err(|e| Response::error(400, format!("vm.create: {e}")))?,
        )),
        "vm.boot" => ApiRequest::Boot,
        "vm.delete" => ApiRequest::Delete,
        "vm.info" => ApiRequest::Info,
        "vm.counters" => ApiRequest::Counters,
        "vm.resize" => ApiRequest::Resize(resize(body)?),
        "vm.pause" => ApiRequest::Pause,
        "vm.resume" => ApiRequest::Resume,
        "vm.shutdown" => ApiRequest::Shutdown,
        "vm.reboot" => ApiRequest::Reboot,
        "vm.snapshot" => {
            let config: VmSnapshotConfig = serde_json::from_slice(body)
                .map_err(|e| Response::error(400, format!("vm.snapshot: {e}")))?;
            ApiRequest::Snapshot(file_url(
                "vm.snapshot: destination_url",
                &config.destination_url,
            )?)
        }
        "vm.restore" => {
            let config: RestoreConfig = serde_json::from_slice(body)
                .map_err(|e| Response::error(400, format!("vm.restore: {e}")))?;
            if config
                .net_fds
                .as_ref()
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
            {
                return Err(Response::error(
                    400,
                    "vm.restore: net_fds: Kite has no network devices",
                ));
            }
            ApiRequest::Restore(Box::new(RestoreRequest {
                dir: file_url("vm.restore: source_url", &config.source_url)?,
                mode: if config.prefault {
                    MemoryRestore::Eager
                } else {
                    MemoryRestore::Lazy
                },
                disks: None,
            }))
        }
        _ => ApiRequest::PowerButton,
    })
}

/// `vm.resize`'s new total memory.
fn resize(body: &[u8]) -> Result<u64, Response> {
    let bad = |why: String| Response::error(400, format!("vm.resize: {why}"));
    let resize: VmResize = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    if resize.desired_vcpus.is_some() {
        return Err(bad("desired_vcpus: Kite has no vCPU hotplug".into()));
    }
    if resize.desired_balloon.is_some() {
        return Err(bad("desired_balloon: Kite has no balloon device".into()));
    }
    resize
        .desired_ram
        .ok_or_else(|| bad("desired_ram is required (the new guest memory in bytes)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_methods_and_bodies_are_checked() {
        let status = |m: &str, p: &str, b: &str| parse(m, p, b.as_bytes()).err().map(|r| r.status);
        assert_eq!(status("GET", "/api/v1/vm.info", ""), None);
        assert_eq!(status("PUT", "/api/v1/vm.info", ""), Some(405));
        assert_eq!(status("GET", "/api/v1/vm.nothing", ""), Some(404));
        assert_eq!(status("GET", "/vm.info", ""), Some(404));
        assert_eq!(status("PUT", "/api/v1/vm.add-net", "{}"), Some(501));
        assert_eq!(
            status("PUT", "/api/v1/vm.resize", r#"{"desired_ram": 1073741824}"#),
            None
        );
        for bad in [
            "",
            "{",
            r#"{"desired_ram": "1G"}"#,
            r#"{"desired_ram": -1}"#,
            r#"{"desired_vcpus": 2}"#,
            r#"{"desired_balloon": 0}"#,
            r#"{"desired_ram": 1, "extra": 1}"#,
            "{}",
        ] {
            assert_eq!(status("PUT", "/api/v1/vm.resize", bad), Some(400), "{bad}");
        }
        assert!(matches!(
            parse("PUT", "/api/v1/vm.resize", br#"{"desired_ram": 5}"#),
            Ok(ApiRequest::Resize(5))
        ));
    }

    /// The routes of the OpenAPI document: (endpoint, METHOD, documented statuses).
    fn documented() -> Vec<(String, String, Vec<u16>)> {
        let doc: serde_json::Value = serde_json::from_str(crate::api::OPENAPI).unwrap();
        let paths = doc["paths"].as_object().expect("paths");
        let mut routes = Vec::new();
        for (path, methods) in paths {
            let endpoint = path
                .trim_start_matches(API_PREFIX.trim_end_matches('/'))
                .trim_start_matches('/');
            for (method, operation) in methods.as_object().expect("methods") {
                let statuses = operation["responses"]
                    .as_object()
                    .expect("responses")
                    .keys()
                    .filter_map(|k| k.parse().ok())
                    .collect();
                routes.push((endpoint.to_string(), method.to_uppercase(), statuses));
            }
        }
        routes
    }

    #[test]
    fn the_openapi_document_and_the_routes_agree() {
        let documented = documented();
        for route in ROUTES {
            assert!(
                documented
                    .iter()
                    .any(|(e, m, _)| e == route.endpoint && m == route.method),
                "{route:?} is not in openapi.json"
            );
        }
        for (endpoint, method, statuses) in &documented {
            assert!(
                ROUTES
                    .iter()
                    .any(|r| r.endpoint == endpoint && r.method == method),
                "openapi.json has {method} {endpoint}, which the server does not"
            );
            // Each documented route answers (not "no such path" or "wrong method").
            let path = format!("{API_PREFIX}{endpoint}");
            if let Err(response) = parse(method, &path, b"{}") {
                assert!(
                    statuses.contains(&response.status) && response.status != 405,
                    "{method} {endpoint} answered {} (documented: {statuses:?})",
                    response.status
                );
            }
        }
    }
}
