//! What a vCPU's exit loop sees, counted for a test thread to wait on
//! (instead of pausing for a fixed time and hoping the guest got
//! somewhere).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mmu_integration::Action;
use mmu_integration::kvm::Routed;
use mmu_vmm::{
    ExceptionAction, ExitHandler, GuestException, PagingOp, Report, VcpuContext, VcpuError,
};

/// Per vCPU: guest entries and exits, and the reports so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counts {
    /// Entries into the guest (`prepare_entry` calls), by vCPU.
    pub(crate) entries: Vec<u64>,
    /// Exits from `KVM_RUN` (not interruptions), by vCPU.
    pub(crate) exits: Vec<u64>,
    /// Every REPORT, by vCPU.
    pub(crate) reports: Vec<Vec<Report>>,
    /// Set by [`Progress::finish`]: the run is over.
    pub(crate) finished: bool,
}

/// Counts shared between the vCPU threads and the test's threads.
#[derive(Debug)]
pub(crate) struct Progress {
    counts: Mutex<Counts>,
    changed: Condvar,
}

impl Progress {
    pub(crate) fn new(vcpus: usize) -> Progress {
        Progress {
            counts: Mutex::new(Counts {
                entries: vec![0; vcpus],
                exits: vec![0; vcpus],
                reports: vec![Vec::new(); vcpus],
                finished: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// Marks the run over (wakes every waiter).
    pub(crate) fn finish(&self) {
        self.update(|c| c.finished = true);
    }

    /// The counts now.
    pub(crate) fn snapshot(&self) -> Counts {
        self.lock().clone()
    }

    /// Waits until `done(counts)` holds and returns the counts then;
    /// panics naming `what` if it does not hold within `timeout` (a hang).
    pub(crate) fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Counts) -> bool,
    ) -> Counts {
        let deadline = Instant::now() + timeout;
        let mut counts = self.lock();
        while !done(&counts) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no {what} within {timeout:?}: {counts:?}");
            }
            counts = self
                .changed
                .wait_timeout(counts, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        counts.clone()
    }

    /// `handler` for vCPU `vcpu`, counting into this.
    pub(crate) fn observe<H: ExitHandler>(&self, vcpu: usize, handler: H) -> Observed<'_, H> {
        Observed {
            inner: handler,
            vcpu,
            progress: self,
        }
    }
}

/// An exit handler that counts into a [`Progress`] and passes every call
/// on to the handler it wraps.
pub(crate) struct Observed<'p, H> {
    inner: H,
    vcpu: usize,
    progress: &'p Progress,
}

impl<H: ExitHandler> ExitHandler for Observed<'_, H> {
    fn prepare_entry(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        self.inner.prepare_entry(vcpu)?;
        let i = self.vcpu;
        self.progress.update(|c| c.entries[i] += 1);
        Ok(())
    }

    fn left_guest(&mut self) {
        self.inner.left_guest();
    }

    fn kvm_exit<'e>(&mut self, exit: kvm_ioctls::VcpuExit<'e>) -> Result<Routed<'e>, VcpuError> {
        let i = self.vcpu;
        self.progress.update(|c| c.exits[i] += 1);
        self.inner.kvm_exit(exit)
    }

    fn complete_exit(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        action: Action,
    ) -> Result<(), VcpuError> {
        self.inner.complete_exit(vcpu, action)
    }

    fn exception(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        exception: &GuestException,
    ) -> Result<ExceptionAction, VcpuError> {
        self.inner.exception(vcpu, exception)
    }

    fn paging_op(&mut self, vcpu: &mut VcpuContext<'_>, op: PagingOp) -> Result<u32, VcpuError> {
        self.inner.paging_op(vcpu, op)
    }

    fn read_cr3(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<u64, VcpuError> {
        self.inner.read_cr3(vcpu)
    }

    fn replay_refill(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        self.inner.replay_refill(vcpu)
    }

    fn report(&mut self, vcpu: &mut VcpuContext<'_>, report: Report) -> Result<(), VcpuError> {
        self.inner.report(vcpu, report)?;
        let i = self.vcpu;
        self.progress.update(|c| c.reports[i].push(report));
        Ok(())
    }

    fn port_read(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        port: u16,
        data: &mut [u8],
    ) -> Result<bool, VcpuError> {
        self.inner.port_read(vcpu, port, data)
    }

    fn port_write(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        port: u16,
        data: &[u8],
    ) -> Result<bool, VcpuError> {
        self.inner.port_write(vcpu, port, data)
    }

    fn mmio_read(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        gpa: u64,
        data: &mut [u8],
    ) -> Result<bool, VcpuError> {
        self.inner.mmio_read(vcpu, gpa, data)
    }

    fn mmio_write(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        gpa: u64,
        data: &[u8],
    ) -> Result<bool, VcpuError> {
        self.inner.mmio_write(vcpu, gpa, data)
    }
}
