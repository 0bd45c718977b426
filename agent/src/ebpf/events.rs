//! The kernel's ring buffers, read as they fill: breaker state changes and connection events,
//! handed to the core in batches.

use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use breakwater_common::{breaker, ConnEvent};
use tokio::io::unix::AsyncFd;

use crate::core::Core;

/// Waits for the ring buffer to have records, and takes every record there is of type `T`
/// (plain old data the kernel wrote): a batch, never empty.
async fn next_batch<T: aya::Pod>(fd: &mut AsyncFd<RingBuf<MapData>>) -> std::io::Result<Vec<T>> {
    loop {
        let mut guard = fd.readable_mut().await?;
        let mut batch = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if item.len() >= std::mem::size_of::<T>() {
                // SAFETY: the kernel wrote a `T` (plain old data) here.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) });
            }
        }
        guard.clear_ready();
        if !batch.is_empty() {
            return Ok(batch);
        }
    }
}

fn register(ring: RingBuf<MapData>) -> std::io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, while the AsyncFd
    // owns the ring buffer.
    Ok(unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? })
}

/// Reads the kernel's breaker transitions as they come and hands them to the core.
pub async fn read_breaker_events(
    core: Arc<Mutex<Core>>,
    ring: RingBuf<MapData>,
) -> std::io::Result<()> {
    let mut fd = register(ring)?;
    loop {
        let batch = next_batch::<breaker::Event>(&mut fd).await?;
        let core = core.clone();
        // Termination walks every namespace: off the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut core) = core.lock() {
                core.on_kernel_events(&batch);
            }
        })
        .await;
    }
}

/// Reads the kernel's connection events as they come and hands them to the core, which fans
/// them out to the subscribers.
pub async fn read_connection_events(
    core: Arc<Mutex<Core>>,
    ring: RingBuf<MapData>,
) -> std::io::Result<()> {
    let mut fd = register(ring)?;
    loop {
        let batch = next_batch::<ConnEvent>(&mut fd).await?;
        let Ok(mut core) = core.lock() else {
            return Ok(());
        };
        core.on_connection_events(&batch);
    }
}
