//! The tracing programs, chosen per feature: for each, the best hook this kernel has (a `tp_btf`
//! tracepoint, else `fentry` on the function that fires it, or the tracepoint's older form).

use std::ops::RangeInclusive;

use aya::{
    programs::{BtfTracePoint, FEntry},
    Btf, Ebpf,
};
use breakwater_common::names;
use tracing::debug;

use super::{btf::KernelBtf, refused, LoadError, ProgramSummary};

/// One way to run a program: a hook and the program written for it.
#[derive(Clone, Debug)]
pub enum Hook {
    /// `tp_btf/<tracepoint>`, in a form whose arguments number within `args` (the program
    /// reads up to its lower bound; the forms differ by kernel).
    TpBtf {
        prog: &'static str,
        tracepoint: &'static str,
        args: RangeInclusive<usize>,
    },
    /// `fentry/<function>`: for kernels without the tracepoint. Needs a kernel that allows
    /// fentry (lockdown and some builds refuse it).
    FEntry {
        prog: &'static str,
        function: &'static str,
    },
}

impl Hook {
    pub fn prog(&self) -> &'static str {
        match self {
            Hook::TpBtf { prog, .. } | Hook::FEntry { prog, .. } => prog,
        }
    }

    /// `tp_btf/inet_sock_set_state`, `fentry/tcp_data_ready`: as `info` shows it.
    pub fn describe(&self) -> String {
        match self {
            // A form with a fixed count is an older one: say which.
            Hook::TpBtf {
                tracepoint, args, ..
            } if args.start() == args.end() => {
                format!("tp_btf/{tracepoint} ({}-argument form)", args.start())
            }
            Hook::TpBtf { tracepoint, .. } => format!("tp_btf/{tracepoint}"),
            Hook::FEntry { function, .. } => format!("fentry/{function}"),
        }
    }

    /// Why the kernel's BTF rules this hook out, if it does.
    fn unavailable(&self, btf: &KernelBtf) -> Option<String> {
        match *self {
            Hook::TpBtf {
                tracepoint,
                ref args,
                ..
            } => match btf.tracepoint_args(tracepoint) {
                None => Some("the kernel has no such tracepoint".into()),
                Some(n) if !args.contains(&n) => Some(format!(
                    "the tracepoint has {n} arguments here, this program is for {}",
                    if args.end() == args.start() {
                        args.start().to_string()
                    } else {
                        format!("{} or more", args.start())
                    }
                )),
                Some(_) => None,
            },
            Hook::FEntry { function, .. } => (!btf.has_function(function))
                .then(|| "the kernel's BTF has no such function".into()),
        }
    }

    /// Loads and attaches the program; on failure it is unloaded again.
    fn attach(&self, ebpf: &mut Ebpf, btf: &Btf) -> Result<ProgramSummary, String> {
        let prog = self.prog();
        let attached = match self {
            Hook::TpBtf { tracepoint, .. } => {
                let p: &mut BtfTracePoint =
                    super::program(ebpf, prog, "tp_btf").map_err(|e| e.to_string())?;
                p.load(tracepoint, btf)
                    .and_then(|()| p.attach().map(drop))
                    .map_err(|e| (e, p.unload().err()))
                    .map(|()| p.info().map(|i| i.id()).unwrap_or_default())
            }
            Hook::FEntry { function, .. } => {
                let p: &mut FEntry =
                    super::program(ebpf, prog, "fentry").map_err(|e| e.to_string())?;
                p.load(function, btf)
                    .and_then(|()| p.attach().map(drop))
                    .map_err(|e| (e, p.unload().err()))
                    .map(|()| p.info().map(|i| i.id()).unwrap_or_default())
            }
        };
        match attached {
            Ok(id) => Ok(ProgramSummary {
                name: prog,
                attach: self.describe(),
                id,
                ..Default::default()
            }),
            Err((e, _)) => Err(refused(&e)),
        }
    }
}

/// No upper bound on a tracepoint's arguments: later kernels may add more.
const ANY: usize = usize::MAX;

/// Where connections are tracked: every TCP state change.
pub const SOCK_STATE: &[Hook] = &[Hook::TpBtf {
    prog: names::PROG_SOCK_STATE,
    tracepoint: names::TRACEPOINT_SOCK_STATE,
    args: 3..=ANY,
}];

/// A request's send, in order of preference.
pub const SEND: &[Hook] = &[
    Hook::TpBtf {
        prog: names::PROG_SOCK_SEND,
        tracepoint: names::TRACEPOINT_SOCK_SEND,
        args: 1..=ANY,
    },
    Hook::FEntry {
        prog: names::PROG_SOCK_SEND_FENTRY,
        function: names::FUNC_SOCK_SEND,
    },
];

/// Where the kernel has it (6.1), the other way a request leaves: `sendfile()`, `splice()`.
pub const SENDPAGES: &[Hook] = &[Hook::FEntry {
    prog: names::PROG_SOCK_SENDPAGES_FENTRY,
    function: names::FUNC_SOCK_SENDPAGES,
}];

/// The data that answers it.
pub const DATA_READY: &[Hook] = &[
    Hook::TpBtf {
        prog: names::PROG_DATA_READY,
        tracepoint: names::TRACEPOINT_DATA_READY,
        args: 1..=ANY,
    },
    Hook::FEntry {
        prog: names::PROG_DATA_READY_FENTRY,
        function: names::FUNC_DATA_READY,
    },
];

/// Retransmitted segments: the tracepoint's current form (with the send's error), then 6.1's.
pub const RETRANSMIT: &[Hook] = &[
    Hook::TpBtf {
        prog: names::PROG_RETRANSMIT,
        tracepoint: names::TRACEPOINT_RETRANSMIT,
        args: 3..=ANY,
    },
    Hook::TpBtf {
        prog: names::PROG_RETRANSMIT_SENT,
        tracepoint: names::TRACEPOINT_RETRANSMIT,
        args: 2..=2,
    },
];

/// Every hook the loader chooses from.
const ALL: [&[Hook]; 5] = [SOCK_STATE, SEND, SENDPAGES, DATA_READY, RETRANSMIT];

/// What the kernel's BTF says of each hook, read at load so that the BTF can go before the
/// programs are loaded.
#[derive(Debug)]
pub struct Probed(Vec<(&'static str, Option<String>)>);

impl Probed {
    pub fn new(btf: &KernelBtf) -> Self {
        Self(
            ALL.iter()
                .flat_map(|hooks| hooks.iter())
                .map(|hook| (hook.prog(), hook.unavailable(btf)))
                .collect(),
        )
    }

    /// Why the kernel's BTF rules `hook` out, if it does; a hook not probed is tried.
    fn unavailable(&self, hook: &Hook) -> Option<String> {
        self.0
            .iter()
            .find(|(prog, _)| *prog == hook.prog())
            .and_then(|(_, why)| why.clone())
    }

    /// Whether the kernel's BTF leaves one of `hooks` to try.
    pub fn any(&self, hooks: &[Hook]) -> bool {
        hooks.iter().any(|hook| self.unavailable(hook).is_none())
    }
}

/// Attaches the first of `hooks` that this kernel has and accepts. Err says, hook by hook,
/// why none did.
pub fn attach_first(
    ebpf: &mut Ebpf,
    probed: &Probed,
    btf: &Btf,
    hooks: &[Hook],
) -> Result<(Hook, ProgramSummary), String> {
    let mut why = Vec::new();
    for hook in hooks {
        let tried = match probed.unavailable(hook) {
            Some(reason) => Err(reason),
            None => hook.attach(ebpf, btf),
        };
        match tried {
            Ok(summary) => return Ok((hook.clone(), summary)),
            Err(reason) => {
                debug!(hook = %hook.describe(), %reason, "hook not available");
                why.push(format!("{}: {reason}", hook.describe()));
            }
        }
    }
    Err(why.join("; "))
}

impl Hook {
    /// Detaches and unloads a program [`attach_first`] attached.
    pub fn detach(&self, ebpf: &mut Ebpf) -> Result<(), LoadError> {
        match self {
            Hook::TpBtf { prog, .. } => super::program::<BtfTracePoint>(ebpf, prog, "tp_btf")?
                .unload()
                .map_err(LoadError::program("tp_btf unload")),
            Hook::FEntry { prog, .. } => super::program::<FEntry>(ebpf, prog, "fentry")?
                .unload()
                .map_err(LoadError::program("fentry unload")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Probed` finds a hook's answer by its program's name.
    #[test]
    fn every_hook_has_its_own_program() {
        let progs: Vec<_> = ALL.iter().flat_map(|h| h.iter()).map(Hook::prog).collect();
        let mut unique = progs.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), progs.len(), "{progs:?}");
    }
}
