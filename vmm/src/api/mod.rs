//! The control socket (`--api-socket PATH`): a Unix socket, mode 0600, served by its own
//! thread ([`server`]). One JSON request per connection, one JSON line back:
//!
//! - `{"command": "info"}` → `{"ok": true, "memory": {...}, "region_table": {...}}`
//! - `{"command": "resize", "memory": "2G"}` (total guest memory, boot RAM included) →
//!   `{"ok": true}`, or `{"ok": false, "error": "..."}`
//!
//! Malformed, unknown or oversized requests get an error reply; the VM is unaffected.

mod server;
pub mod vm_config;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::mem::MemControl;
use memory::RegionTable;
use serde_json::{json, Value};

use crate::config::Size;
pub use server::{ApiServer, CLIENT_DEADLINE};

/// The OpenAPI 3.0 document of Kite's HTTP API: the subset of Cloud Hypervisor's that Kite
/// serves, under `/api/v1`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest request read.
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

/// Sends `request` to the control socket at `path` and returns the reply.
pub fn call(path: &Path, request: &Value, timeout: Duration) -> std::io::Result<Value> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    match (&stream).write_all(&line) {
        // The server may answer (a refusal) before it has read the whole request.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    let mut reply = Vec::new();
    BufReader::new((&stream).take(1 << 20)).read_until(b'\n', &mut reply)?;
    Ok(serde_json::from_slice(&reply)?)
}
