//! `tp_btf` programs.

use aya::{programs::BtfTracePoint, Btf, Ebpf};
use breakwater_common::names;

use super::{LoadError, ProgramSummary};

/// The `tp_btf` programs and the tracepoints they attach to.
pub const PROGRAMS: [(&str, &str); 4] = [
    (names::PROG_SOCK_STATE, names::TRACEPOINT_SOCK_STATE),
    (names::PROG_SOCK_SEND, names::TRACEPOINT_SOCK_SEND),
    (names::PROG_DATA_READY, names::TRACEPOINT_DATA_READY),
    (names::PROG_RETRANSMIT, names::TRACEPOINT_RETRANSMIT),
];

pub fn attach(ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<ProgramSummary>, LoadError> {
    PROGRAMS
        .iter()
        .map(|&(name, tracepoint)| {
            let prog: &mut BtfTracePoint = super::program(ebpf, name, "tp_btf")?;
            prog.load(tracepoint, btf)
                .map_err(LoadError::program("tp_btf load"))?;
            prog.attach().map_err(LoadError::program("tp_btf attach"))?;
            Ok(ProgramSummary {
                name,
                attach: format!("tp_btf/{tracepoint}"),
                id: prog.info().map(|i| i.id()).unwrap_or_default(),
                ..Default::default()
            })
        })
        .collect()
}
