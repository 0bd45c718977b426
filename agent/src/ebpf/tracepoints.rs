//! `tp_btf` programs.

use aya::{programs::BtfTracePoint, Btf, Ebpf};
use breakwater_common::names;

use super::{LoadError, ProgramSummary};

pub fn attach(ebpf: &mut Ebpf) -> Result<ProgramSummary, LoadError> {
    let btf = Btf::from_sys_fs().map_err(|e| LoadError::Program {
        what: "kernel BTF",
        source: aya::programs::ProgramError::Btf(e),
    })?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(names::PROG_SOCK_STATE)
        .ok_or(LoadError::Missing {
            kind: "program",
            name: names::PROG_SOCK_STATE,
        })?
        .try_into()
        .map_err(LoadError::program("tp_btf"))?;
    prog.load(names::TRACEPOINT_SOCK_STATE, &btf)
        .map_err(LoadError::program("tp_btf/inet_sock_set_state load"))?;
    prog.attach()
        .map_err(LoadError::program("tp_btf/inet_sock_set_state attach"))?;
    Ok(ProgramSummary {
        name: names::PROG_SOCK_STATE,
        attach: format!("tp_btf/{}", names::TRACEPOINT_SOCK_STATE),
        id: prog.info().map(|i| i.id()).unwrap_or_default(),
        ..Default::default()
    })
}
