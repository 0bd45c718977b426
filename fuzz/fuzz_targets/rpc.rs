//! Every RPC of `breakwater.v1.Agent`, called on the real service over the in-memory kernel
//! (the core and the API as the unit tests run them, without root): the input is a sequence of
//! calls, each a byte choosing the RPC (or a connect through the in-memory kernel, or time
//! passing), a length byte, and that many bytes of the request as protobuf. A request is
//! answered or refused with a status that says what was wrong with it: never a panic, never
//! `Internal` or `Unknown`.
#![no_main]

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use breakwater::{
    api::{authz::Authz, AgentService},
    config::{Config, Overrides},
    core::{
        memory::{MemoryKernel, Outcome, NETNS},
        Core,
    },
};
use breakwater_proto::v1::agent_server::Agent;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::{codegen::tokio_stream::StreamExt as _, Code, Request, Status};

/// The calls a sequence is made of: 18 RPCs (0..=17), the kernel's events (18, 19), and the
/// RPCs added since (from 20: the committed seeds keep their numbers).
const CALLS: u8 = 21;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Option<Request<M>> {
    M::decode(bytes).ok().map(Request::new)
}

/// The status of a call; `Ok` for an answer.
fn code<T>(r: Result<T, Status>) -> Result<(), Status> {
    r.map(drop)
}

async fn call(api: &AgentService, kernel: &MemoryKernel, which: u8, b: &[u8]) {
    macro_rules! rpc {
        ($method:ident) => {
            match decode(b) {
                Some(req) => code(api.$method(req).await),
                None => return,
            }
        };
    }
    let result = match which % CALLS {
        0 => rpc!(list_services),
        1 => rpc!(list_destinations),
        2 => rpc!(list_connections),
        3 => rpc!(put_service),
        4 => rpc!(delete_service),
        5 => rpc!(get_agent_info),
        6 => rpc!(get_time_wait),
        7 => rpc!(get_latency),
        8 => rpc!(advise),
        9 => rpc!(list_breakers),
        10 => rpc!(get_breaker),
        11 => rpc!(set_policy),
        12 => rpc!(clear_policy),
        13 => rpc!(trip),
        14 => rpc!(reset),
        15 => rpc!(watch_breaker_events),
        16 => rpc!(reload_config),
        17 => rpc!(watch_connections),
        // Read to its end: its messages are built as they are read.
        20 => match decode(b) {
            Some(req) => match api.stream_connections(req).await {
                Ok(r) => r.into_inner().map(code).collect::<Vec<_>>().await.into_iter().collect(),
                Err(status) => Err(status),
            },
            None => return,
        },
        18 => {
            // A connect from the enforced scope: 127.0.0.x:port, and how it ends.
            let [x, p0, p1, o, ..] = *b else { return };
            let to = SocketAddr::from((Ipv4Addr::new(127, 0, 0, x), u16::from_le_bytes([p0, p1])));
            let outcome = match o % 4 {
                0 => Outcome::Established,
                1 => Outcome::Refused,
                2 => Outcome::Timeout,
                _ => Outcome::Other,
            };
            let _ = kernel.connect(to, outcome);
            return;
        }
        _ => {
            let [a, b0, ..] = *b else { return };
            kernel.advance(Duration::from_millis(u64::from(u16::from_le_bytes([a, b0]))) * 100);
            return;
        }
    };
    if let Err(status) = result {
        assert!(
            !matches!(status.code(), Code::Internal | Code::Unknown),
            "call {} answered {status:?}",
            which % CALLS
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let kernel = MemoryKernel::new();
    let config = Config::default();
    let core = Core::new(kernel.clone(), config.clone(), None, Overrides::default());
    let authz = Authz::new(&config.agent.authz);
    let api = AgentService::new(Arc::new(Mutex::new(core.into_dyn())), authz, NETNS, None);
    runtime().block_on(async {
        let mut rest = data;
        while let [which, len, tail @ ..] = rest {
            let len = usize::from(*len).min(tail.len());
            let (body, next) = tail.split_at(len);
            call(&api, &kernel, *which, body).await;
            rest = next;
        }
    });
});
