//! The API's requests: any method, path and body (chosen among the routes Kite has,
//! Cloud Hypervisor endpoints it lacks, and anything), answered by the real dispatcher
//! against a running VM's status (guest memory with a hotplug area) and a VMM thread that
//! refuses every action. Every answer has a status from 200 to 599; an error carries a
//! message; a read answers JSON; a resize is accepted only for a size the area can take.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::mem::{MemBacking, MemControl};
use libfuzzer_sys::fuzz_target;
use memory::{RegionSpec, RegionTable};
use serde_json::Value;
use vm_memory::GuestAddress;
use vmm::api::routes::{ROUTES, UNSUPPORTED};
use vmm::api::{Dispatcher, Reply, Request, API_PREFIX};
use vmm::config::VmConfig;
use vmm::control::{ActionError, ActionSender, VmState, VmStatus};
use vmm::machine::MachineView;
use vmm::spec::VmSpec;

const BOOT: u64 = 64 << 20;
const AREA_SIZE: u64 = 128 << 20;

struct Rig {
    dispatcher: Mutex<Dispatcher>,
    hotplug: Arc<MemControl>,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let table = Arc::new(RegionTable::default());
        table
            .insert(RegionSpec::anonymous(GuestAddress(0), BOOT), None)
            .unwrap();
        let hotplug =
            MemControl::new(Arc::clone(&table), 4 << 30, AREA_SIZE, MemBacking::Anonymous)
                .unwrap();
        let kernel = std::env::current_exe().unwrap();
        let spec = VmSpec::resolve(VmConfig {
            kernel: Some(kernel),
            ..VmConfig::default()
        })
        .unwrap();
        let config = vmm::api::vm_config::to_ch_json(
            &spec.config,
            &spec.kernel,
            spec.initramfs.as_deref(),
            spec.config.cmdline.as_deref().unwrap_or_default(),
        );
        let status = Arc::new(Mutex::new(VmStatus {
            config_json: Some(config.to_string().into()),
            vm: Some((VmState::Running, Arc::new(spec))),
            machine: Some(MachineView {
                table,
                boot_memory: BOOT,
                hotplug: Some(Arc::clone(&hotplug)),
                faults: None,
                devices: Vec::new(),
            }),
        }));
        // The VMM thread: refuses every action at once.
        let (tx, rx) = std::sync::mpsc::channel::<vmm::control::Envelope>();
        std::thread::spawn(move || {
            for (_, reply) in rx {
                reply(Err(ActionError::NotCreated));
            }
        });
        let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Rig {
            dispatcher: Mutex::new(Dispatcher::new(status, ActionSender::new(tx, wake))),
            hotplug,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let [route, method, body @ ..] = data else {
        return;
    };
    let known = ROUTES.len() + UNSUPPORTED.len();
    let path = match usize::from(*route) {
        r if r < ROUTES.len() => format!("{API_PREFIX}{}", ROUTES[r].endpoint),
        r if r < known => format!("{API_PREFIX}{}", UNSUPPORTED[r - ROUTES.len()]),
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    let method = ["GET", "PUT", "POST", "DELETE", "PATCH"][usize::from(*method) % 5];
    let request = Request {
        method: method.into(),
        path,
        body: body.to_vec(),
    };
    let rig = rig();
    let reply = rig.dispatcher.lock().unwrap().handle(&request);
    let response = match reply {
        Reply::Now(response) => response,
        Reply::Later(answer) => answer
            .wait(std::time::Duration::from_secs(10))
            .expect("an action is answered"),
    };
    assert!((200..600).contains(&response.status), "{response:?}");
    let json = response
        .body
        .as_deref()
        .map(|b| serde_json::from_slice::<Value>(b).expect("bodies are JSON"));
    if response.status >= 400 {
        let json = json.expect("an error has a body");
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{json}");
    } else if method == "GET" {
        assert!(json.is_some(), "{request:?}");
    }
    assert!(rig.hotplug.requested() <= AREA_SIZE);
});
