//! breakwater's eBPF programs, one module per hook family.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::needless_borrows_for_generic_args,
        reason = "aya's map methods take `impl Borrow<K>`: a key or value passed by value is \
                  copied once more on the stack, `&key` is not (measured: `bw_sock_state` from \
                  464 to 472 of its 512 bytes, 185 more instructions)"
    )
)]

#[cfg(target_arch = "bpf")]
mod breaker;
#[cfg(target_arch = "bpf")]
mod iter;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tracepoints;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Host builds (clippy, `cargo build --workspace`) see an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
