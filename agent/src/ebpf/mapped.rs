//! Read-only views of `BPF_F_MMAPABLE` arrays: a whole table in one `mmap` instead of a
//! syscall per slot (ListServices over 10,000 services reads 1.3 M histogram slots).
//!
//! A view is made for one query and unmapped after it: the kernel maps every page at once,
//! and a view kept for the agent's life would count the whole table in its RSS.

use std::{
    marker::PhantomData,
    ops::Range,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;

pub struct Mapped<'a, T> {
    /// Where the mapping starts: the page that holds slot `slots.start`.
    base: NonNull<u8>,
    bytes: usize,
    /// The byte offset in the map of `base`.
    offset: usize,
    slots: Range<usize>,
    _map: PhantomData<(&'a MapData, T)>,
}

impl<'a, T: Copy> Mapped<'a, T> {
    /// Slots `slots` of `map`, an array created with `BPF_F_MMAPABLE` whose values are `T`s:
    /// only the pages that hold them (one service's, for an answer about one).
    pub fn new(map: &'a MapData, slots: Range<usize>) -> std::io::Result<Self> {
        // The kernel lays mmapable slots out every round_up(value_size, 8) bytes.
        const { assert!(size_of::<T>().is_multiple_of(8) && size_of::<T>() > 0) };
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let offset = slots.start * size_of::<T>() / page * page;
        let end = (slots.end * size_of::<T>()).div_ceil(page) * page;
        let bytes = end.saturating_sub(offset).max(page);
        // SAFETY: a fresh read-only shared mapping of the map's fd at a page-aligned offset;
        // the kernel checks offset and length against the array's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                libc::off_t::try_from(offset).map_err(std::io::Error::other)?,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?,
            bytes,
            offset,
            slots,
            _map: PhantomData,
        })
    }

    /// Slot `i` of the map, read as the programs may be writing it (as a lookup syscall would);
    /// None outside the mapped slots.
    pub fn get(&self, i: usize) -> Option<T> {
        self.array::<1>(i).map(|[v]| v)
    }

    /// `N` slots from slot `start` of the map, in one copy; None if any is outside the mapped
    /// slots.
    pub fn array<const N: usize>(&self, start: usize) -> Option<[T; N]> {
        let inside = start >= self.slots.start && start.checked_add(N)? <= self.slots.end;
        // SAFETY: inside the mapping (checked), aligned (a page-aligned base, 8-byte multiples).
        inside.then(|| unsafe {
            self.base
                .as_ptr()
                .add(start * size_of::<T>() - self.offset)
                .cast::<[T; N]>()
                .read_volatile()
        })
    }
}

impl<T> Drop for Mapped<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
