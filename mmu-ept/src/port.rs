//! The port through which the backend drives the hypervisor's memory
//! regions, so the backend never owns the VM file descriptor.

use std::fmt;
use std::io;

use mmu_api::Memslot;

/// The hypervisor's guest memory regions (KVM: `KVM_SET_USER_MEMORY_REGION`
/// and `KVM_GET_DIRTY_LOG` on the VM fd).
///
/// The backend validates every change with [`mmu_api::MemslotTable`] before
/// it calls the port, and calls the mutating methods from one thread at a
/// time (memslot updates are serialized). [`get_dirty_log`](Self::get_dirty_log)
/// may be called from any thread, concurrently with the others. The backend
/// may hold its memslot lock during a call, so an implementation must not
/// call back into the backend.
pub trait HypervisorMemory: Send + Sync + fmt::Debug {
    /// Creates the region for `slot`, or, for a slot id the hypervisor
    /// already has, moves it to `slot.guest_base` or changes its flags
    /// (KVM: one `KVM_SET_USER_MEMORY_REGION` with the slot's number, base,
    /// size, host address, and `KVM_MEM_READONLY` /
    /// `KVM_MEM_LOG_DIRTY_PAGES`). When `LOG_DIRTY` is newly set the log
    /// starts clean; when it is cleared the log is dropped; a move keeps it.
    ///
    /// # Safety
    ///
    /// `slot.backing.host_addr` must be valid for reads and writes of
    /// `slot.size` bytes until [`delete_user_memory_region`](Self::delete_user_memory_region)
    /// for the slot has returned: the guest reads and writes it directly.
    unsafe fn set_user_memory_region(&self, slot: &Memslot) -> io::Result<()>;

    /// Removes the region of `slot` (KVM: the same ioctl with size zero).
    /// On return the guest can no longer reach the slot's host memory.
    fn delete_user_memory_region(&self, slot: &Memslot) -> io::Result<()>;

    /// Returns and clears the pages of `slot` the guest wrote since the last
    /// call, in KVM layout: bit `i % 64` of word `i / 64` is page `i` of the
    /// slot, `slot.pages().div_ceil(64)` words. Fails if the slot does not
    /// have `LOG_DIRTY`.
    fn get_dirty_log(&self, slot: &Memslot) -> io::Result<Vec<u64>>;
}
