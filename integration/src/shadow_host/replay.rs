//! The replay of the shadow MMU's table writes by the guest kernel, for a
//! host whose KVM shadows guest page tables (`Coherence::Replay`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_regs, kvm_sregs};
use mmu_api::paging::WalkOptions;
use mmu_api::{Access, AccessKind, AccessMode, Gpa, Gva};
use mmu_backends::shadow::ShadowBackend;

use super::abi::{self, REPLAY_CAPACITY, REPLAY_ENTRY_SIZE, percpu};
use super::{HostingError, PvVcpu, ShadowVcpuHost, needs_replay};
use crate::exits::VcpuExits;

/// One vCPU's replay state.
#[derive(Debug, Default)]
pub(super) struct VcpuReplay {
    /// Records (window address with [`abi::REASSERT`] or
    /// [`abi::REASSERT_FRAME`]) not yet put in the queue.
    set: HashSet<u64>,
    /// The newest batch whose records are in `set` or `inflight`.
    through: u64,
    /// Records put in the queue and not yet seen replayed.
    inflight: Vec<u64>,
    /// The newest batch this vCPU finished replaying. Frames leave
    /// quarantine at the oldest of these over the VM's vCPUs.
    confirmed: u64,
}

/// The replay records of every vCPU of one VM. Every record goes to every
/// vCPU: KVM's shadow is shared, but each vCPU must know its own CPL3 code
/// will not run before the record was replayed, and the cheapest proof is
/// to replay it itself.
#[derive(Debug)]
pub struct ReplayHub {
    backend: ShadowBackend,
    vcpus: Mutex<Vec<VcpuReplay>>,
}

impl ReplayHub {
    /// A hub for `vcpus` vCPUs of `backend`.
    pub fn new(backend: ShadowBackend, vcpus: usize) -> Self {
        ReplayHub {
            backend,
            vcpus: Mutex::new((0..vcpus).map(|_| VcpuReplay::default()).collect()),
        }
    }

    /// The hub `backend`'s vCPUs share if its coherence needs one
    /// ([`needs_replay`]), else `None`.
    pub fn for_backend(backend: &ShadowBackend, vcpus: usize) -> Option<Arc<ReplayHub>> {
        needs_replay(backend).then(|| Arc::new(ReplayHub::new(backend.clone(), vcpus)))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<VcpuReplay>> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the backend's journal and hands it to every vCPU, under the
    /// hub's lock (`vcpus`), so no vCPU can find the journal taken and its
    /// own set not yet filled.
    fn collect(&self, vcpus: &mut [VcpuReplay]) {
        let batch = self.backend.take_replay();
        if batch.is_empty() {
            return;
        }
        let records: Vec<u64> = batch
            .entries
            .iter()
            .map(|g| g.raw() | abi::REASSERT)
            .chain(batch.frames.iter().map(|g| g.raw() | abi::REASSERT_FRAME))
            .collect();
        for v in vcpus.iter_mut() {
            v.set.extend(records.iter().copied());
            v.through = batch.epoch;
        }
    }
}

impl ShadowVcpuHost {
    fn kernel_word(&self, offset: u64) -> Gpa {
        Gpa(self.layout.kernel_page.raw() + offset)
    }

    /// A new run put the guest's own tables in CR3: whatever this vCPU had
    /// queued may have been cleared with its kernel page, so it goes back
    /// to be queued again.
    pub(super) fn new_run(&mut self, guest_cr3: u64) {
        self.guest_cr3 = guest_cr3;
        if let Some(hub) = &self.hub {
            let mut vcpus = hub.lock();
            let me = &mut vcpus[self.index];
            let inflight = std::mem::take(&mut me.inflight);
            me.set.extend(inflight);
        }
    }

    /// Before an entry: collect the backend's journal and put this vCPU's
    /// records where its kernel replays them before CPL3 code runs.
    pub(super) fn prepare_replay(
        &mut self,
        vcpu: &mut dyn PvVcpu,
        exits: &mut VcpuExits,
        sregs: &kvm_sregs,
    ) -> Result<(), HostingError> {
        let Some(hub) = self.hub.clone() else {
            return Ok(());
        };
        let mut vcpus = hub.lock();
        hub.collect(&mut vcpus);
        let count = vcpu.read_guest_u64(self.kernel_word(percpu::REPLAY_COUNT))?;
        let pending = vcpu.read_guest_u64(self.kernel_word(percpu::REPLAY_PENDING))?;
        let me = &mut vcpus[self.index];
        if count == 0 && pending == 0 && !me.inflight.is_empty() {
            me.inflight.clear();
            if me.set.is_empty() && me.through > me.confirmed {
                me.confirmed = me.through;
                // A frame leaves quarantine only when every vCPU has
                // replayed its record: a record replayed late, after the
                // frame began a new life (as this vCPU's root, say), would
                // make KVM drop a live page under a running vCPU.
                let all = vcpus.iter().map(|v| v.confirmed).min().unwrap_or(0);
                self.backend.replay_done(all);
            }
        }
        let me = &mut vcpus[self.index];
        if me.set.is_empty() {
            return Ok(());
        }
        let mut regs = vcpu.get_regs()?;
        let cpl = sregs.cs.selector & 3;
        if cpl == 0 && self.kernel.in_replay_routine(regs.rip) {
            // The routine is reading the queue: it asks for more when done.
            return vcpu.write_guest_u64(self.kernel_word(percpu::REPLAY_PENDING), 1);
        }
        self.fill_queue(vcpu, me, count)?;
        if cpl == 3 {
            let mut events = vcpu.get_vcpu_events()?;
            let busy = events.exception.injected != 0
                || events.exception.pending != 0
                || events.interrupt.injected != 0
                || events.nmi.injected != 0;
            if !busy && !self.syscall_entry_pending(vcpu, exits, &regs) {
                events.exception.injected = 1;
                events.exception.pending = 0;
                events.exception.nr = abi::REPLAY_VECTOR;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                events.exception_has_payload = 0;
                vcpu.set_vcpu_events(&events)?;
            }
        } else {
            let rip = self.kernel.replay_restart_rip(regs.rip);
            if rip != regs.rip {
                regs.rip = rip;
                vcpu.set_regs(&regs)?;
            }
        }
        Ok(())
    }

    /// The guest's REPLAY_REFILL hypercall: the queue is empty; fill it
    /// again (and set or clear `REPLAY_PENDING`).
    pub fn replay_refill(&mut self, vcpu: &mut dyn PvVcpu) -> Result<(), HostingError> {
        vcpu.write_guest_u64(self.kernel_word(percpu::REPLAY_PENDING), 0)?;
        let Some(hub) = self.hub.clone() else {
            return Ok(());
        };
        let mut vcpus = hub.lock();
        hub.collect(&mut vcpus);
        let me = &mut vcpus[self.index];
        let count = vcpu.read_guest_u64(self.kernel_word(percpu::REPLAY_COUNT))?;
        self.fill_queue(vcpu, me, count)
    }

    /// Moves as many of `me`'s records as fit behind the `count` queued
    /// ones, and sets `REPLAY_PENDING` if any are left.
    fn fill_queue(
        &self,
        vcpu: &mut dyn PvVcpu,
        me: &mut VcpuReplay,
        count: u64,
    ) -> Result<(), HostingError> {
        let room = REPLAY_CAPACITY.saturating_sub(count as usize);
        let take: Vec<u64> = me.set.iter().copied().take(room).collect();
        let queue = self.layout.replay_queue.raw();
        for (i, record) in take.iter().enumerate() {
            let slot = queue + REPLAY_ENTRY_SIZE * (count + i as u64);
            vcpu.write_guest_u64(Gpa(slot), *record)?;
            vcpu.write_guest_u64(Gpa(slot + 8), 0)?;
            me.set.remove(record);
        }
        me.inflight.extend_from_slice(&take);
        vcpu.write_guest_u64(
            self.kernel_word(percpu::REPLAY_COUNT),
            count + take.len() as u64,
        )?;
        if !me.set.is_empty() {
            vcpu.write_guest_u64(self.kernel_word(percpu::REPLAY_PENDING), 1)?;
        }
        Ok(())
    }

    /// True if the vCPU, stopped at CPL3, has executed a system call's
    /// trap and owes the kernel entry ([`super::PvKernel::syscall_entry_pending`]).
    /// The bytes before RIP are read through the guest's own tables; where
    /// they cannot be, the answer is no (an injection is always safe then).
    fn syscall_entry_pending(
        &self,
        vcpu: &mut dyn PvVcpu,
        exits: &mut VcpuExits,
        regs: &kvm_regs,
    ) -> bool {
        let len = self.kernel.syscall_bytes_len() as u64;
        if len == 0 {
            return false;
        }
        let Some(start) = regs.rip.checked_sub(len) else {
            return false;
        };
        let access = Access {
            kind: AccessKind::Fetch,
            mode: AccessMode::User,
        };
        let options = WalkOptions::without_accessed_dirty();
        let Ok(segments) = exits.mmu().translate(Gva(start), len, access, options) else {
            return false;
        };
        let mut bytes = Vec::with_capacity(len as usize);
        for s in segments {
            let mut part = vec![0u8; s.len as usize];
            if vcpu.read_guest(s.gpa, &mut part).is_err() {
                return false;
            }
            bytes.extend_from_slice(&part);
        }
        self.kernel.syscall_entry_pending(&bytes, regs)
    }
}
