//! The shadow backend hosted on KVM: what one vCPU's exit handler does on
//! top of `mmu-integration` when the tables KVM walks are the shadow tables.
//!
//! - **Roots**: the vCPU's real CR3 is the shadow root the MMU gives; the
//!   guest's own CR3 lives here ([`ShadowVcpuHost::guest_cr3`]) and is what
//!   the kit's paravirtual READ_CR3 answers. A new root gets the kernel's
//!   own pages (code, GDT, IDT, TSS, this vCPU's kernel area) faulted in at
//!   once: the CPU delivers exceptions through them, and a #PF there would
//!   be a double fault.
//! - **Coherence** ([`Coherence::Replay`], PVM here): KVM shadows the pool
//!   and does not see the VMM's writes to it. Every vCPU keeps the set of
//!   journaled records it has not replayed ([`ReplayHub`]); before its CPL3
//!   code runs again it replays them from its queue at CPL0 (the kit's
//!   return path does so whenever the queue is not empty, and a vCPU
//!   kicked at CPL3 is sent there with [`abi::REPLAY_VECTOR`], unless it
//!   stopped between a system call's `int3` and the kernel entry, which
//!   PVM then holds where the VMM cannot see it:
//!   [`abi::syscall_entry_pending`]). Each
//!   journaled change also posted a remote flush, which kicked every vCPU,
//!   so no vCPU runs CPL3 code on a stale KVM entry. When a vCPU has
//!   replayed everything up to a batch, the frames that batch carried leave
//!   quarantine.
//! - **Emulation**: an MMIO access (the reserved-bit #PF) and a write to a
//!   write-protected guest page table are decoded at the faulting RIP
//!   ([`crate::insn`]) and carried out against the device bus or through
//!   the MMU, and RIP advances.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::kvm_sregs;
use mmu_api::paging::WalkOptions;
use mmu_api::{Access, AccessKind, AccessMode, Gpa, Gva, PfErrorCode};
use mmu_backends::shadow::{Coherence, ShadowBackend};
use mmu_integration::VcpuExits;

use crate::error::{GuestException, VcpuError};
use crate::insn::{self, MemAccess};
use crate::kit::ReplayRestart;
use crate::kit::abi::{self, REPLAY_CAPACITY, percpu};
use crate::layout::{GDT_GPA, IDT_GPA, KERNEL_AREA_SIZE, KERNEL_CODE_GPA, Layout, PAGE_SIZE};
use crate::vcpu::VcpuContext;

/// One vCPU's replay state.
#[derive(Debug, Default)]
struct VcpuReplay {
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

/// What one vCPU's handler needs to host the shadow backend.
#[derive(Debug)]
pub struct ShadowVcpuHost {
    index: usize,
    backend: ShadowBackend,
    hub: Option<Arc<ReplayHub>>,
    restart: ReplayRestart,
    /// The pool's hardware addresses: a CR3 outside is the guest's own (a
    /// new run set it).
    pool: std::ops::Range<u64>,
    guest_cr3: u64,
    /// Kernel pages every root must map: (address, error code of the
    /// access the CPU makes there).
    prefault: Vec<(u64, PfErrorCode)>,
    kernel_page: u64,
    queue: u64,
}

impl ShadowVcpuHost {
    /// The host of vCPU `index`; `hub` is shared by the VM's vCPUs (and
    /// `None` when the hardware walks the pool itself).
    pub fn new(
        index: usize,
        backend: ShadowBackend,
        hub: Option<Arc<ReplayHub>>,
        layout: &Layout,
        restart: ReplayRestart,
        kernel_code_len: u64,
        guest_cr3: u64,
    ) -> Self {
        let (_, size, hpa) = backend.pool_region();
        let write = PfErrorCode::WRITE;
        let fetch = PfErrorCode::FETCH;
        let mut prefault = vec![
            (GDT_GPA, write),
            (IDT_GPA, write),
            (layout.tss(index) & !(PAGE_SIZE - 1), write),
        ];
        let mut code = KERNEL_CODE_GPA;
        while code < KERNEL_CODE_GPA + kernel_code_len {
            prefault.push((code, fetch));
            code += PAGE_SIZE;
        }
        let area = layout.kernel_page(index);
        let mut page = area;
        while page < area + KERNEL_AREA_SIZE {
            prefault.push((page, write));
            page += PAGE_SIZE;
        }
        ShadowVcpuHost {
            index,
            hub,
            restart,
            pool: hpa.raw()..hpa.raw() + size,
            guest_cr3,
            prefault,
            kernel_page: area,
            queue: layout.replay_queue(index),
            backend,
        }
    }

    /// The guest's own CR3.
    pub fn guest_cr3(&self) -> u64 {
        self.guest_cr3
    }

    /// Records the guest's new CR3 (its LOAD_CR3 call).
    pub fn set_guest_cr3(&mut self, cr3: u64) {
        self.guest_cr3 = cr3;
    }

    /// True if `cr3` is a shadow root rather than the guest's own tables.
    pub fn is_root(&self, cr3: u64) -> bool {
        self.pool.contains(&cr3)
    }

    /// A new run put the guest's own tables in CR3: whatever this vCPU had
    /// queued may have been cleared with its kernel page, so it goes back
    /// to be queued again.
    pub fn new_run(&mut self, guest_cr3: u64) {
        self.guest_cr3 = guest_cr3;
        if let Some(hub) = &self.hub {
            let mut vcpus = hub.lock();
            let me = &mut vcpus[self.index];
            let inflight = std::mem::take(&mut me.inflight);
            me.set.extend(inflight);
        }
    }

    /// Loads `root` into the hardware CR3 if it is not there, and faults
    /// the kernel's pages into it.
    pub fn load_root(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        exits: &mut VcpuExits,
        sregs: &mut kvm_sregs,
        root: u64,
        flush: bool,
    ) -> Result<(), VcpuError> {
        let direct_flush = flush && self.hub.is_none();
        if sregs.cr3 == root && !direct_flush {
            return Ok(());
        }
        // The exit may be a hypercall KVM has yet to complete; changing the
        // special registers under a pending port read goes wrong under PVM.
        crate::vcpu::complete_pending_io(vcpu.fd())?;
        vcpu.forget_regs();
        *sregs = vcpu.sregs()?;
        sregs.cr3 = root;
        vcpu.fd()
            .set_sregs(sregs)
            .map_err(|e| crate::error::KvmError::new("KVM_SET_SREGS", e))?;
        if sregs.cs.selector & 3 == 0 {
            // Stopped between a CR3 read and its write back: the write
            // would load the old root again. Read the new one first.
            let mut regs = vcpu.regs()?;
            if let Some(rip) = self.restart.cr3_reload_restart(regs.rip) {
                regs.rip = rip;
                vcpu.set_regs(&regs)?;
            }
        }
        for &(gva, code) in &self.prefault {
            // Only the fault's side effect matters: a page the guest's
            // tables do not map stays unmapped, as on hardware.
            exits.page_fault(Gva(gva), code)?;
        }
        Ok(())
    }

    /// Before an entry: collect the backend's journal and put this vCPU's
    /// records where its kernel replays them before CPL3 code runs.
    pub fn prepare_replay(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        exits: &mut VcpuExits,
        sregs: &kvm_sregs,
    ) -> Result<(), VcpuError> {
        let Some(hub) = self.hub.clone() else {
            return Ok(());
        };
        let mut vcpus = hub.lock();
        hub.collect(&mut vcpus);
        let count = vcpu.read_u64(self.kernel_page + percpu::REPLAY_COUNT)?;
        let pending = vcpu.read_u64(self.kernel_page + percpu::REPLAY_PENDING)?;
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
        let mut regs = vcpu.regs()?;
        let cpl = sregs.cs.selector & 3;
        if cpl == 0 && self.restart.in_routine(regs.rip) {
            // The routine is reading the queue: it asks for more when done.
            return vcpu.write_u64(self.kernel_page + percpu::REPLAY_PENDING, 1);
        }
        self.fill_queue(vcpu, me, count)?;
        if cpl == 3 {
            let mut events = vcpu
                .fd()
                .get_vcpu_events()
                .map_err(|e| crate::error::KvmError::new("KVM_GET_VCPU_EVENTS", e))?;
            let busy = events.exception.injected != 0
                || events.exception.pending != 0
                || events.interrupt.injected != 0
                || events.nmi.injected != 0;
            if !busy && !syscall_entry_pending(vcpu, exits, &regs) {
                events.exception.injected = 1;
                events.exception.pending = 0;
                events.exception.nr = abi::REPLAY_VECTOR;
                events.exception.has_error_code = 0;
                events.exception.error_code = 0;
                events.exception_has_payload = 0;
                vcpu.fd()
                    .set_vcpu_events(&events)
                    .map_err(|e| crate::error::KvmError::new("KVM_SET_VCPU_EVENTS", e))?;
            }
        } else {
            let rip = self.restart.restart_rip(regs.rip);
            if rip != regs.rip {
                regs.rip = rip;
                vcpu.set_regs(&regs)?;
            }
        }
        Ok(())
    }

    /// The kernel's REPLAY_REFILL: the queue is empty; fill it again.
    pub fn refill(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        vcpu.write_u64(self.kernel_page + percpu::REPLAY_PENDING, 0)?;
        let Some(hub) = self.hub.clone() else {
            return Ok(());
        };
        let mut vcpus = hub.lock();
        hub.collect(&mut vcpus);
        let me = &mut vcpus[self.index];
        let count = vcpu.read_u64(self.kernel_page + percpu::REPLAY_COUNT)?;
        self.fill_queue(vcpu, me, count)
    }

    /// Moves as many of `me`'s records as fit behind the `count` queued
    /// ones, and sets `REPLAY_PENDING` if any are left.
    fn fill_queue(
        &self,
        vcpu: &mut VcpuContext<'_>,
        me: &mut VcpuReplay,
        count: u64,
    ) -> Result<(), VcpuError> {
        let room = REPLAY_CAPACITY.saturating_sub(count as usize);
        let take: Vec<u64> = me.set.iter().copied().take(room).collect();
        for (i, record) in take.iter().enumerate() {
            let slot = self.queue + 16 * (count + i as u64);
            vcpu.write_u64(slot, *record)?;
            vcpu.write_u64(slot + 8, 0)?;
            me.set.remove(record);
        }
        me.inflight.extend_from_slice(&take);
        vcpu.write_u64(
            self.kernel_page + percpu::REPLAY_COUNT,
            count + take.len() as u64,
        )?;
        if !me.set.is_empty() {
            vcpu.write_u64(self.kernel_page + percpu::REPLAY_PENDING, 1)?;
        }
        Ok(())
    }
}

/// True if the vCPU, stopped at CPL3, has executed a system call's `int3`
/// and owes the kernel entry ([`abi::syscall_entry_pending`]). The bytes
/// before RIP are read through the guest's own tables; where they cannot
/// be, the answer is no (an injection is always safe then).
fn syscall_entry_pending(
    vcpu: &mut VcpuContext<'_>,
    exits: &mut VcpuExits,
    regs: &kvm_bindings::kvm_regs,
) -> bool {
    let len = abi::syscall_bytes(0).len() as u64;
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
        for i in 0..s.len {
            match vcpu.memory_byte(s.gpa.raw() + i) {
                Ok(b) => bytes.push(b),
                Err(_) => return false,
            }
        }
    }
    abi::syscall_entry_pending(&bytes, regs.rax, regs.rflags)
}

/// What an emulated instruction accesses.
#[derive(Clone, Copy, Debug)]
pub enum Emulation {
    /// A device register at this address.
    Mmio(Gpa),
    /// A write-protected guest page table at this address.
    PageTableWrite(Gpa),
}

/// Emulates the instruction the exception in `exception` interrupted (its
/// frame is at the kernel's RSP, see [`abi`]) and moves its RIP past it.
pub fn emulate(
    vcpu: &mut VcpuContext<'_>,
    exits: &mut VcpuExits,
    bus: &mut dyn mmu_integration::MmioBus,
    exception: &GuestException,
    target: Emulation,
) -> Result<(), VcpuError> {
    let mut kregs = vcpu.regs()?;
    let frame = kregs.rsp;
    let saved_rdx = vcpu.read_u64(frame)?;
    let saved_rax = vcpu.read_u64(frame + 8)?;
    let before = [
        saved_rax,
        kregs.rcx,
        saved_rdx,
        kregs.rbx,
        exception.rsp,
        kregs.rbp,
        kregs.rsi,
        kregs.rdi,
        kregs.r8,
        kregs.r9,
        kregs.r10,
        kregs.r11,
        kregs.r12,
        kregs.r13,
        kregs.r14,
        kregs.r15,
    ];
    let bytes = fetch_instruction(vcpu, exits, exception)?;
    let decoded = insn::decode(&bytes, exception.rip)
        .map_err(|e| VcpuError::Handler(format!("cannot emulate: {e}")))?;
    let mut gprs = before;
    match (target, decoded.access) {
        (Emulation::PageTableWrite(gpa), MemAccess::Store { .. }) => {
            let data = decoded.store_bytes(&gprs).unwrap_or_default();
            exits.write_guest(gpa, &data)?;
        }
        (Emulation::Mmio(gpa), MemAccess::Store { .. }) => {
            let data = decoded.store_bytes(&gprs).unwrap_or_default();
            exits.mmio_write(gpa, &data, bus)?;
        }
        (Emulation::Mmio(gpa), MemAccess::Load { size, .. }) => {
            let mut data = vec![0u8; usize::from(size)];
            exits.mmio_read(gpa, &mut data, bus)?;
            decoded.complete_load(&mut gprs, &data);
        }
        (Emulation::PageTableWrite(gpa), MemAccess::Load { .. }) => {
            return Err(VcpuError::Handler(format!(
                "a read at {gpa} faulted as a page-table write at RIP {:#x}",
                exception.rip
            )));
        }
    }
    let mut regs_changed = false;
    for (index, (&old, &new)) in before.iter().zip(gprs.iter()).enumerate() {
        if old == new {
            continue;
        }
        match index {
            0 => vcpu.write_u64(frame + 8, new)?,
            2 => vcpu.write_u64(frame, new)?,
            4 => vcpu.write_u64(frame + 56, new)?,
            _ => {
                *gpr_mut(&mut kregs, index) = new;
                regs_changed = true;
            }
        }
    }
    if regs_changed {
        vcpu.set_regs(&kregs)?;
    }
    vcpu.write_u64(frame + 32, exception.rip + u64::from(decoded.len))
}

fn gpr_mut(regs: &mut kvm_bindings::kvm_regs, index: usize) -> &mut u64 {
    match index {
        1 => &mut regs.rcx,
        3 => &mut regs.rbx,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// Up to 15 bytes at the interrupted RIP, read through the guest's own
/// tables (the bytes the CPU fetched).
fn fetch_instruction(
    vcpu: &mut VcpuContext<'_>,
    exits: &mut VcpuExits,
    exception: &GuestException,
) -> Result<Vec<u8>, VcpuError> {
    let mode = if exception.cpl() == 3 {
        AccessMode::User
    } else {
        AccessMode::Supervisor
    };
    let access = Access {
        kind: AccessKind::Fetch,
        mode,
    };
    // Stop at the end of the second page: 15 bytes never span more.
    let segments = exits
        .mmu()
        .translate(
            Gva(exception.rip),
            15,
            access,
            WalkOptions::without_accessed_dirty(),
        )
        .map_err(|e| {
            VcpuError::Handler(format!(
                "cannot fetch the instruction at {:#x}: {e}",
                exception.rip
            ))
        })?;
    let mut bytes = Vec::with_capacity(15);
    for s in segments {
        for i in 0..s.len {
            bytes.push(vcpu.memory_byte(s.gpa.raw() + i)?);
        }
    }
    Ok(bytes)
}

/// The coherence policy a VM's shadow hosting uses.
pub fn needs_replay(backend: &ShadowBackend) -> bool {
    matches!(backend.config().coherence, Coherence::Replay { .. })
}
