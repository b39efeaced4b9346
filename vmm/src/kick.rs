//! Kicking a vCPU out of `KVM_RUN` from any thread.
//!
//! As Cloud Hypervisor does it: the kicker records a request in the vCPU's
//! control block, then sends a real-time signal to the vCPU's thread. The
//! signal handler, running on that thread, sets `immediate_exit` in the
//! thread's `kvm_run` page. So either the signal interrupts `KVM_RUN`
//! (which returns `EINTR`), or it lands just before the thread enters, and
//! `immediate_exit` makes the next `KVM_RUN` return at once. The vCPU loop
//! clears `immediate_exit` and then reads the requests, so no request is
//! ever missed and the thread never blocks in the guest with one pending.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use mmu_api::VcpuId;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler, unblock_signal};

use crate::error::SetupError;

/// Offset of the kick signal above `SIGRTMIN`.
const KICK_SIGNAL_OFFSET: c_int = 0;

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// The `kvm_run` page of the vCPU this thread is running, if any.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_signal: c_int, _info: *mut siginfo_t, _context: *mut c_void) {
    // The thread-local is const-initialised and has no destructor, so
    // reading it is a plain TLS load, safe in a signal handler.
    let run = KVM_RUN.with(Cell::get);
    if run.is_null() {
        return;
    }
    let field = run
        .wrapping_byte_add(std::mem::offset_of!(kvm_run, immediate_exit))
        .cast::<u8>();
    // SAFETY: `run` is the mmap'd `kvm_run` page of the VcpuFd this thread
    // is running; `RunPageGuard` publishes it only while the VcpuFd is
    // borrowed by this thread and clears it before the borrow ends. The
    // handler runs on this same thread, so the page cannot be unmapped
    // while the handler runs. The field is a u8 inside the page.
    unsafe { field.write_volatile(1) };
}

/// Installs the process-wide kick signal handler (once).
pub(crate) fn install_handler() -> Result<(), SetupError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| SetupError::Signal(vmm_sys_util::errno::Error::new(errno)))
}

/// Publishes a vCPU's `kvm_run` page to this thread's kick handler for as
/// long as it lives.
pub(crate) struct RunPageGuard {
    _not_send: std::marker::PhantomData<*mut kvm_run>,
}

impl RunPageGuard {
    /// Publishes `run`, which must stay mapped until the guard is dropped
    /// (the caller holds the `VcpuFd` borrowed for that long). Also makes
    /// sure the kick signal is not blocked on this thread.
    pub(crate) fn new(run: *mut kvm_run) -> Self {
        // The signal is unblocked in new threads unless a parent blocked
        // it; failing to unblock it only ever costs latency (the time
        // limit still works through immediate_exit), so it is logged.
        if let Err(e) = unblock_signal(kick_signal()) {
            tracing::warn!("cannot unblock the kick signal: {e}");
        }
        KVM_RUN.with(|cell| cell.set(run));
        Self {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for RunPageGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// Requests a vCPU thread reads after every exit.
pub(crate) mod request {
    /// Leave guest mode and call the exit handler's `prepare_entry`.
    pub(crate) const KICK: u32 = 1 << 0;
    /// Stop running: the caller asked.
    pub(crate) const STOP: u32 = 1 << 1;
    /// Stop running: the time limit passed.
    pub(crate) const TIMEOUT: u32 = 1 << 2;
    /// Stop running: another vCPU failed.
    pub(crate) const ABORT: u32 = 1 << 3;
    /// Any of the stop reasons.
    pub(crate) const ANY_STOP: u32 = STOP | TIMEOUT | ABORT;
}

/// The state a vCPU shares with the threads that may kick it.
#[derive(Debug, Default)]
pub(crate) struct VcpuControl {
    requests: AtomicU32,
    /// The thread running the vCPU, while one does. Held locked while
    /// signalling, so the thread cannot exit (and its id be reused) under
    /// a kicker.
    thread: Mutex<Option<libc::pthread_t>>,
    kicks_sent: AtomicU64,
}

impl VcpuControl {
    fn thread(&self) -> MutexGuard<'_, Option<libc::pthread_t>> {
        // The guarded value is a plain thread id; a panic while it was held
        // cannot leave it inconsistent.
        self.thread.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Posts `bits` and signals the vCPU thread if one runs the vCPU.
    pub(crate) fn post(&self, bits: u32) {
        self.requests.fetch_or(bits, Ordering::SeqCst);
        let thread = self.thread();
        if let Some(thread) = *thread {
            self.kicks_sent.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `thread` is a live thread: it is registered by the
            // vCPU thread itself and unregistered (under this lock, which
            // we hold) before that thread exits.
            let ret = unsafe { libc::pthread_kill(thread, kick_signal()) };
            if ret != 0 {
                tracing::warn!("cannot signal a vCPU thread: errno {ret}");
            }
        }
    }

    /// Drops the pending requests in `bits` without signalling.
    pub(crate) fn clear(&self, bits: u32) {
        self.requests.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Takes the pending requests.
    pub(crate) fn take(&self) -> u32 {
        self.requests.swap(0, Ordering::SeqCst)
    }

    /// Registers the calling thread as the one running the vCPU.
    pub(crate) fn attach_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.thread() = Some(me);
    }

    /// Unregisters the running thread; kicks after this only post requests.
    pub(crate) fn detach_thread(&self) {
        *self.thread() = None;
    }

    /// How many signals kickers have sent.
    pub(crate) fn kicks_sent(&self) -> u64 {
        self.kicks_sent.load(Ordering::Relaxed)
    }
}

/// A handle that makes one vCPU leave guest mode, from any thread.
///
/// [`kick`](Kicker::kick) only forces an exit (the vCPU thread then runs its
/// exit handler's `prepare_entry` and re-enters); [`stop`](Kicker::stop)
/// also ends the vCPU's current run (or its next one, if none is running),
/// which then reports [`VcpuOutcome::Stopped`](crate::VcpuOutcome::Stopped).
#[derive(Clone, Debug)]
pub struct Kicker {
    id: VcpuId,
    control: Arc<VcpuControl>,
}

impl Kicker {
    pub(crate) fn new(id: VcpuId, control: Arc<VcpuControl>) -> Self {
        Self { id, control }
    }

    /// The vCPU this handle kicks.
    pub fn vcpu(&self) -> VcpuId {
        self.id
    }

    /// Forces the vCPU out of guest mode; it re-enters after its exit
    /// handler's `prepare_entry`.
    pub fn kick(&self) {
        self.control.post(request::KICK);
    }

    /// Stops the vCPU's current run (or the next one).
    pub fn stop(&self) {
        self.control.post(request::STOP);
    }

    /// How many kick signals have been sent to this vCPU so far.
    pub fn kicks_sent(&self) -> u64 {
        self.control.kicks_sent()
    }
}

impl mmu_api::VcpuKick for Kicker {
    fn kick(&self) {
        Kicker::kick(self);
    }
}
