//! The control socket (`--api-socket PATH`): HTTP/1.1 over a Unix socket, mode 0600,
//! served by its own thread ([`ApiServer`], a [`Handler`] answering each [`Request`]);
//! [`request`] is its client. Malformed, oversized or late requests get an error status
//! with `{"error": "..."}`; the VM is unaffected.
//!
//! Until the Cloud Hypervisor routes replace them, [`legacy_handler`] serves the old
//! commands: `GET /api/v1/vm.info` → `{"ok": true, "memory": {...}, "region_table":
//! {...}}`; `PUT /api/v1/vm.resize` with `{"memory": "2G"}` (total guest memory, boot RAM
//! included) → `{"ok": true}` or 400 with `{"ok": false, "error": "..."}`.

mod client;
mod connection;
mod http;
mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::mem::MemControl;
use memory::RegionTable;
use serde_json::{json, Value};

use crate::config::Size;
pub use client::request;
pub use http::{Handler, Request, Response, MAX_HEAD};
pub use server::{ApiServer, CLIENT_DEADLINE, MAX_CONNECTIONS};

/// Largest request body read (a larger one gets 413).
pub const MAX_REQUEST: u64 = 64 << 10;

/// Errors starting the control socket.
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

/// What the control socket reports on and acts on.
pub struct ApiContext {
    /// Guest memory.
    pub table: Arc<RegionTable>,
    /// Boot RAM in bytes.
    pub boot_memory: u64,
    /// The hotplug area, if any.
    pub hotplug: Option<Arc<MemControl>>,
    /// The userfaultfd fault handler of lazy memory, if any.
    pub faults: Option<Arc<memory::FaultHandler>>,
}

pub(crate) fn error(message: String) -> Value {
    json!({"ok": false, "error": message})
}

/// The reply to `request`.
pub fn handle(request: &Value, context: &ApiContext) -> Value {
    match request.get("command").and_then(Value::as_str) {
        Some("info") => info(context),
        Some("resize") => resize(request, context),
        Some(other) => error(format!("unknown command '{other}' (info, resize)")),
        None => error("no \"command\" (info, resize)".into()),
    }
}

fn info(context: &ApiContext) -> Value {
    let m = context.table.metrics();
    let waits = &m.writer_waits;
    let memory = match &context.hotplug {
        Some(h) => {
            let stats = h.stats();
            json!({
                "boot": context.boot_memory,
                "hotplug_size": h.size(),
                "driver_ok": h.driver_ready(),
                "requested": h.requested(),
                "plugged": h.plugged(),
                "resize_requests": stats.requests,
                "blocks_plugged": stats.plugs,
                "blocks_unplugged": stats.unplugs,
                "last_resize_latency_ms": stats.last_latency_ns.map(|ns| ns as f64 / 1e6),
            })
        }
        None => json!({"boot": context.boot_memory, "hotplug_size": 0}),
    };
    let faults = context.faults.as_ref().map(|f| {
        let s = f.stats();
        json!({
            "faults": s.faults,
            "zero_fills": s.zero_fills,
            "file_fills": s.file_fills,
            "already_present": s.already_present,
            "unregistered": s.unregistered,
            "errors": s.errors,
        })
    });
    json!({
        "ok": true,
        "memory": memory,
        "fault_handler": faults,
        "region_table": {
            "regions": m.regions.len(),
            "fast_path_hits": m.fast_path_hits,
            "fast_path_misses": m.fast_path_misses,
            "slow_path_lookups": m.slow_path_lookups,
            "slow_path_readers": m.slow_path_readers,
            "retired_regions": m.retired_regions,
            "writers_draining": m.writers_draining,
            "writer_waits": {
                "count": waits.count,
                "p50_ns": waits.p50_ns,
                "p99_ns": waits.p99_ns,
                "max_ns": waits.max_ns,
            },
        },
    })
}

fn resize(request: &Value, context: &ApiContext) -> Value {
    let Some(hotplug) = &context.hotplug else {
        return error("this VM has no hotplug memory (--memory ...,hotplug_size=)".into());
    };
    let total = match request.get("memory") {
        Some(Value::String(s)) => s.parse::<Size>().map(Size::bytes),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Size)
            .map(Size::bytes)
            .ok_or_else(|| crate::config::ConfigError::BadSize(n.to_string())),
        _ => return error("resize needs \"memory\": the new total, e.g. \"2G\"".into()),
    };
    let total = match total {
        Ok(t) => t,
        Err(e) => return error(e.to_string()),
    };
    let Some(extra) = total.checked_sub(context.boot_memory) else {
        return error(format!(
            "memory {} is below the boot memory {}",
            Size(total),
            Size(context.boot_memory)
        ));
    };
    match hotplug.request(extra) {
        Ok(()) => json!({"ok": true}),
        Err(e) => error(e.to_string()),
    }
}

/// Temporary glue until the Cloud Hypervisor routes come: the old commands over HTTP.
/// `GET /api/v1/vm.info` and `PUT /api/v1/vm.resize` take the old request's other fields
/// as their JSON body; an error reply is sent with 400.
pub fn legacy_handler(context: ApiContext) -> Handler {
    Box::new(move |request: &Request| {
        let Some(command) = request.path.strip_prefix("/api/v1/vm.") else {
            return Response::error(404, format!("no such path: {}", request.path));
        };
        let method = if command == "info" { "GET" } else { "PUT" };
        if request.method != method {
            return Response::error(405, format!("{} wants {method}", request.path));
        }
        let mut fields = match request.body.as_slice() {
            b"" => json!({}),
            body => match serde_json::from_slice::<Value>(body) {
                Ok(fields @ Value::Object(_)) => fields,
                _ => return Response::error(400, "the body is not a JSON object"),
            },
        };
        fields["command"] = command.into();
        let reply = handle(&fields, &context);
        let status = if reply["ok"] == json!(true) { 200 } else { 400 };
        Response::json(status, &reply)
    })
}

/// Temporary glue for the tests until the Cloud Hypervisor routes come: sends an old
/// request (`{"command": ...}`) the way [`legacy_handler`] takes it and returns the old
/// reply (`{"ok": false, "error"}` for any error status).
pub fn call(path: &Path, request: &Value, timeout: Duration) -> std::io::Result<Value> {
    let command = request["command"].as_str().unwrap_or_default();
    let method = if command == "info" { "GET" } else { "PUT" };
    let mut fields = request.clone();
    if let Some(fields) = fields.as_object_mut() {
        fields.remove("command");
    }
    let body = serde_json::to_vec(&fields)?;
    let target = format!("/api/v1/vm.{command}");
    let (status, reply) = self::request(path, method, &target, Some(&body), timeout)?;
    let reply: Value = serde_json::from_slice(&reply).unwrap_or(Value::Null);
    Ok(match status {
        200..=299 => reply,
        _ if reply.get("ok").is_some() => reply,
        _ => error(format!(
            "{status}: {}",
            reply["error"].as_str().unwrap_or("?")
        )),
    })
}
