//! What the API does with each request: reads and `vm.resize` answered on the API thread
//! from the shared [`VmStatus`] (never waiting for the VMM thread or a writer of the
//! region table), actions on the VM's life sent to the VMM thread.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::http::{Deferred, Reply, Request, Response};
use super::routes::{self, ApiRequest};
use crate::config::Size;
use crate::control::{Action, ActionError, ActionSender, VmState, VmStatus};
use crate::machine::{Blame, MachineError, MachineView};

/// Features `vmm.ping` reports.
pub const FEATURES: &[&str] = &[
    "kvm",
    "virtio-blk",
    "virtio-rng",
    "virtio-mem",
    "lazy-memory",
    "snapshot",
    "seccomp",
];

/// Answers API requests.
pub struct Dispatcher {
    status: Arc<Mutex<VmStatus>>,
    actions: ActionSender,
}

impl Dispatcher {
    /// Reads `status`, sends actions with `actions`.
    pub fn new(status: Arc<Mutex<VmStatus>>, actions: ActionSender) -> Self {
        Dispatcher { status, actions }
    }

    /// The reply to `request`: reads and `vm.resize` at once, actions on the VM's life
    /// once the VMM thread has carried them out.
    pub fn handle(&mut self, request: &Request) -> Reply {
        match routes::parse(&request.method, &request.path, &request.body) {
            Ok(request) => self.answer(request),
            Err(response) => response.into(),
        }
    }

    /// The status, locked. Answers are built while it is held (everything they read is
    /// lock-free or behind short locks), so this thread never holds the last reference to
    /// a machine's memory: the VMM thread tears machines down, under its own filter.
    fn status(&self) -> std::sync::MutexGuard<'_, VmStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(&mut self, request: ApiRequest) -> Reply {
        let response = match request {
            ApiRequest::Ping => Response::json(
                200,
                &json!({
                    "build_version": concat!("kite ", env!("CARGO_PKG_VERSION")),
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "features": FEATURES,
                }),
            ),
            ApiRequest::Info => self.info(),
            ApiRequest::Counters => self.counters(),
            ApiRequest::Resize(total) => self.resize(total),
            ApiRequest::PowerButton => Response::error(
                400,
                "vm.power-button: Kite has no ACPI, so there is no power button; use \
                 vm.shutdown (or have the guest reboot)",
            ),
            ApiRequest::Create(config) => return self.act(Action::Create(config)),
            ApiRequest::Boot => return self.act(Action::Boot),
            ApiRequest::Delete => return self.act(Action::Delete),
            ApiRequest::Pause => return self.act(Action::Pause),
            ApiRequest::Resume => return self.act(Action::Resume),
            ApiRequest::Shutdown => return self.act(Action::Shutdown),
            ApiRequest::Reboot => return self.act(Action::Reboot),
            ApiRequest::ShutdownVmm => return self.act(Action::ShutdownVmm),
            ApiRequest::Snapshot(dir) => return self.act(Action::Snapshot(dir)),
            ApiRequest::Restore(request) => return self.act(Action::Restore(request)),
        };
        response.into()
    }

    /// Sends `action` to the VMM thread; the answer comes when it is carried out, and
    /// other clients are served meanwhile.
    fn act(&self, action: Action) -> Reply {
        let (deferred, answerer) = match Deferred::new() {
            Ok(pair) => pair,
            Err(e) => return Response::error(500, format!("cannot wait for the VMM: {e}")).into(),
        };
        let sent = self.actions.send(
            action,
            Box::new(move |result: Result<(), ActionError>| {
                answerer.answer(match result {
                    Ok(()) => Response::no_content(),
                    Err(e) => Response::error(action_status(&e), e),
                })
            }),
        );
        if sent {
            Reply::Later(deferred)
        } else {
            Response::error(500, "the VMM thread is gone").into()
        }
    }

    fn info(&self) -> Response {
        let status = self.status();
        let (Some((state, spec)), Some(config)) = (&status.vm, &status.config_json) else {
            return Response::error(404, ActionError::NotCreated);
        };
        let memory = status
            .machine
            .as_ref()
            .map_or(spec.memory, MachineView::memory_actual_size);
        // The configuration's JSON is made once per change (`VmStatus::config_json`).
        let body = format!(
            r#"{{"config":{config},"state":{},"memory_actual_size":{memory}}}"#,
            json!(state)
        );
        Response {
            status: 200,
            body: Some(body.into_bytes()),
        }
    }

    fn counters(&self) -> Response {
        let status = self.status();
        if status.vm.is_none() {
            return Response::error(404, ActionError::NotCreated);
        }
        let Some(view) = &status.machine else {
            return Response::json(200, &json!({}));
        };
        Response::json(200, &counters(view))
    }

    fn resize(&self, total: u64) -> Response {
        let status = self.status();
        let Some((state, _)) = &status.vm else {
            return Response::error(404, ActionError::NotCreated);
        };
        let (Some(view), VmState::Running) = (&status.machine, *state) else {
            return Response::error(
                409,
                format!("the VM is {state:?}: vm.resize needs it Running"),
            );
        };
        let Some(hotplug) = &view.hotplug else {
            return Response::error(
                400,
                "vm.resize: this VM has no hotplug memory (memory.hotplug_size with \
                 hotplug_method VirtioMem)",
            );
        };
        let Some(extra) = total.checked_sub(view.boot_memory) else {
            return Response::error(
                400,
                format!(
                    "vm.resize: desired_ram {} is below the boot memory {}",
                    Size(total),
                    Size(view.boot_memory)
                ),
            );
        };
        // A resize in progress may be cut short or called off (towards what is plugged:
        // a guest that cannot unplug must not block resizing for ever), not redirected.
        let (plugged, requested) = (hotplug.plugged(), hotplug.requested());
        let on_the_way = plugged.min(requested)..=plugged.max(requested);
        if hotplug.driver_ready() && plugged != requested && !on_the_way.contains(&extra) {
            return Response::error(
                409,
                format!(
                    "vm.resize: a resize is in progress ({} plugged of {} requested); ask \
                     for a size between those (or wait: vm.info shows when it is done)",
                    Size(view.boot_memory + plugged),
                    Size(view.boot_memory + requested)
                ),
            );
        }
        match hotplug.request(extra) {
            Ok(()) => Response::no_content(),
            Err(e) => Response::error(400, format!("vm.resize: {e}")),
        }
    }
}

/// The status code of a refused action.
fn action_status(e: &ActionError) -> u16 {
    match e {
        ActionError::NotCreated => 404,
        // Cloud Hypervisor's status for these, in its API document.
        ActionError::WrongState {
            action: "vm.pause" | "vm.resume" | "vm.shutdown" | "vm.reboot",
            ..
        } => 405,
        ActionError::WrongState { .. } | ActionError::Ended => 409,
        ActionError::Config(_) => 400,
        ActionError::Machine(MachineError::PauseTimeout(..)) => 500,
        ActionError::Machine(MachineError::Snapshot(e)) if e.is_not_ready() => 409,
        ActionError::Machine(e) => match e.blame() {
            Blame::Arguments | Blame::InputFile => 400,
            Blame::Vmm => 500,
        },
    }
}

/// `vm.counters`: per device (`vda`, ..., `rng`, `mem`), then Kite's own
/// (`region_table`, `fault_handler`).
pub fn counters(view: &MachineView) -> Value {
    let m = view.table.metrics();
    let waits = &m.writer_waits;
    let mut counters = serde_json::Map::new();
    for (name, device) in &view.devices {
        let values = device
            .values()
            .into_iter()
            .map(|(counter, value)| (counter.to_string(), Value::from(value)))
            .collect();
        counters.insert(name.clone(), Value::Object(values));
    }
    if let Some(h) = &view.hotplug {
        let stats = h.stats();
        counters.insert(
            "mem".into(),
            json!({
                "requested_bytes": h.requested(),
                "plugged_bytes": h.plugged(),
                "resize_requests": stats.requests,
                "blocks_plugged": stats.plugs,
                "blocks_unplugged": stats.unplugs,
                "last_resize_latency_ns": stats.last_latency_ns.unwrap_or(0),
            }),
        );
    }
    if let Some(f) = &view.faults {
        let s = f.stats();
        counters.insert(
            "fault_handler".into(),
            json!({
                "faults": s.faults,
                "zero_fills": s.zero_fills,
                "file_fills": s.file_fills,
                "already_present": s.already_present,
                "unregistered": s.unregistered,
                "errors": s.errors,
            }),
        );
    }
    counters.insert(
        "region_table".into(),
        json!({
            "regions": m.regions.len(),
            "fast_path_hits": m.fast_path_hits,
            "fast_path_misses": m.fast_path_misses,
            "slow_path_lookups": m.slow_path_lookups,
            "slow_path_readers": m.slow_path_readers,
            "retired_regions": m.retired_regions,
            "writers_draining": m.writers_draining,
            "writer_waits": waits.count,
            "writer_wait_p50_ns": waits.p50_ns,
            "writer_wait_p99_ns": waits.p99_ns,
            "writer_wait_max_ns": waits.max_ns,
        }),
    );
    Value::Object(counters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::DeviceCounters;
    use devices::virtio::block::{BlockCounters, BlockOutcome};
    use devices::virtio::rng::RngCounters;

    #[test]
    fn counters_name_each_device_and_its_counters() {
        let disk = Arc::new(BlockCounters::default());
        disk.record(BlockOutcome::Read(4096));
        disk.record(BlockOutcome::Write(512));
        disk.record(BlockOutcome::Flush);
        disk.record(BlockOutcome::Error);
        let rng = Arc::new(RngCounters::default());
        rng.record(64);
        let view = MachineView {
            table: Arc::default(),
            boot_memory: 0,
            hotplug: None,
            faults: None,
            devices: vec![
                ("vda".into(), DeviceCounters::Block(Arc::clone(&disk))),
                ("vdb".into(), DeviceCounters::Block(Arc::default())),
                ("rng".into(), DeviceCounters::Rng(rng)),
            ],
        };
        let c = counters(&view);
        assert_eq!(
            c["vda"],
            json!({"read_bytes": 4096, "write_bytes": 512, "read_ops": 1, "write_ops": 1,
                   "flush_ops": 1, "errors": 1}),
            "{c}"
        );
        assert_eq!(c["vdb"]["write_ops"], 0, "{c}");
        assert_eq!(c["rng"], json!({"read_bytes": 64, "requests": 1}), "{c}");
        assert!(c["region_table"].is_object(), "{c}");
        assert!(c.get("mem").is_none(), "{c}");

        // The documented keys of a disk's and the rng's counters are the ones reported.
        let doc: Value = serde_json::from_str(crate::api::OPENAPI).unwrap();
        for (schema, device) in [("BlockCounters", "vda"), ("RngCounters", "rng")] {
            let documented = &doc["components"]["schemas"][schema]["properties"];
            let mut documented: Vec<_> = documented.as_object().unwrap().keys().collect();
            let mut reported: Vec<_> = c[device].as_object().unwrap().keys().collect();
            documented.sort();
            reported.sort();
            assert_eq!(documented, reported, "{schema}");
        }
    }
}
