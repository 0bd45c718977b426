//! Read-only views of `BPF_F_MMAPABLE` arrays: a whole table in one `mmap` instead of a
//! syscall per slot (ListServices over 10,000 services reads 1.3 M histogram slots).
//!
//! A view is made for one query and unmapped after it: the kernel maps every page at once,
//! and a view kept for the agent's life would count the whole table in its RSS.

use std::{
    marker::PhantomData,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;

pub struct Mapped<'a, T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
    _map: PhantomData<&'a MapData>,
}

impl<'a, T: Copy> Mapped<'a, T> {
    /// The first `len` slots of `map`, an array created with `BPF_F_MMAPABLE` whose values are
    /// `T`s.
    pub fn new(map: &'a MapData, len: usize) -> std::io::Result<Self> {
        // The kernel lays mmapable slots out every round_up(value_size, 8) bytes.
        const { assert!(size_of::<T>().is_multiple_of(8) && size_of::<T>() > 0) };
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (len * size_of::<T>()).div_ceil(page).max(1) * page;
        // SAFETY: a fresh read-only shared mapping of the map's fd; the kernel checks the
        // length against the array's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?,
            len,
            bytes,
            _map: PhantomData,
        })
    }

    /// Slot `i`, read as the programs may be writing it (as a lookup syscall would).
    pub fn get(&self, i: usize) -> Option<T> {
        // SAFETY: in bounds of the mapping, aligned (page-aligned start, 8-byte multiples).
        (i < self.len).then(|| unsafe { self.ptr.as_ptr().add(i).read_volatile() })
    }

    /// `N` slots from `start`, in one copy; None if any is out of range.
    pub fn array<const N: usize>(&self, start: usize) -> Option<[T; N]> {
        // SAFETY: in bounds (checked), aligned as `get`'s.
        (start.checked_add(N)? <= self.len).then(|| unsafe {
            self.ptr
                .as_ptr()
                .add(start)
                .cast::<[T; N]>()
                .read_volatile()
        })
    }
}

impl<T> Drop for Mapped<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
