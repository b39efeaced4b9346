//! A software CPU for tests without KVM: it walks the shadow tables exactly
//! as the hardware would (with the reference walker), keeps a TLB, and
//! exits to the MMU on a #PF. It has no KVM counterpart: it stands in for
//! the processor. Like a processor it walks without the MMU lock.
//!
//! The TLB is the point: a translation stays cached until INVLPG, a flush or
//! a root change, exactly like hardware, so an MMU that forgets a remote
//! flush leaves a stale entry here and the test comparing against the guest's
//! own page tables fails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mmu_api::paging::{
    GuestPhysMemory, PhysMemError, WalkError, WalkOptions, permission_fault, walk_with, write_bytes,
};
use mmu_api::{
    Access, AccessKind, AccessMode, BackendError, FaultOutcome, Gpa, Gva, Hpa, MmuVcpu, PAGE_SIZE,
    PagingContext, PfErrorCode, Rights, VcpuError, VcpuId, VcpuKick,
};

use crate::ShadowBackend;
use crate::memslots::Slots;
use crate::pool::PoolMem;
use crate::vcpu::ShadowVcpu;

/// A kick for a vCPU that runs on the caller's thread: it is never in
/// guest mode while another thread waits for it (the soft vCPU leaves guest
/// mode at the end of every access), so there is nothing to interrupt.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoKick;

impl VcpuKick for NoKick {
    fn kick(&self) {}
}

/// What one access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftOutcome {
    /// The access completed; the value read (or written).
    Done(u64),
    /// The guest gets #PF with this error code and CR2.
    PageFault {
        /// Error code.
        error_code: PfErrorCode,
        /// CR2.
        cr2: Gva,
    },
    /// The access is MMIO at this guest-physical address.
    Mmio(Gpa),
    /// The guest gets #GP.
    GeneralProtection,
}

/// Failures of the soft CPU itself (each one is an MMU bug or a misuse).
#[derive(Debug, thiserror::Error)]
pub enum SoftError {
    /// The MMU reported an error.
    #[error("the MMU failed")]
    Vcpu(#[from] VcpuError),
    /// Access size not 1, 2, 4 or 8, or not naturally aligned.
    #[error("access of {size} bytes at {gva} is not naturally aligned")]
    Unaligned {
        /// Address.
        gva: Gva,
        /// Size.
        size: u8,
    },
    /// The MMU kept answering "retry" without fixing the mapping.
    #[error("no progress after {0} faults at the same address")]
    NoProgress(u32),
    /// A translation (from the TLB or the tables) points at memory no
    /// memslot backs: a stale translation survived a memslot change.
    #[error("a translation reaches {0}, which no memslot backs")]
    StaleFrame(Hpa),
    /// The hardware walk of the shadow tables failed in a way no correct
    /// shadow table allows (a reserved bit, an unreadable table).
    #[error("the hardware walk of the shadow tables failed")]
    Walk(#[source] WalkError),
    /// The MMU asked for something the access cannot do (emulate a read).
    #[error("the MMU answered {0:?} to a {1:?}")]
    Unexpected(FaultOutcome, AccessKind),
}

/// A model of a host hypervisor that shadows the pool itself, as PVM (or
/// KVM without EPT) does: the hardware reads each pool entry once and keeps
/// it while it is present (a walk that faults on cached entries makes the
/// host read them again), and the host learns of a change only when it is replayed
/// ([`ShadowBackend::take_replay`]). Shared by the soft vCPUs of one VM, as
/// the host's shadow is. Under [`Coherence::Direct`](crate::Coherence::Direct)
/// nothing is replayed, so this host runs on stale entries, which is what
/// makes the coherence policy testable without KVM.
#[derive(Clone, Debug, Default)]
pub struct ShadowingHost(Arc<Mutex<HashMap<u64, u64>>>);

impl ShadowingHost {
    /// A host that has read nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Copy, Debug)]
struct TlbEntry {
    frame: Hpa,
    rights: Rights,
    pkey: Option<u8>,
}

/// Bound on faults per access before the soft CPU calls it a livelock.
const MAX_FAULTS_PER_ACCESS: u32 = 16;

/// A software CPU running on the shadow backend.
#[derive(Debug)]
pub struct SoftVcpu {
    backend: ShadowBackend,
    mmu: ShadowVcpu,
    tlb: HashMap<u64, TlbEntry>,
    root: Option<Hpa>,
    host: Option<ShadowingHost>,
}

impl SoftVcpu {
    /// Creates vCPU `id` on `backend`.
    pub fn new(backend: &ShadowBackend, id: VcpuId) -> Result<Self, BackendError> {
        let mmu = backend.create_shadow_vcpu(id, Arc::new(NoKick))?;
        Ok(SoftVcpu {
            backend: backend.clone(),
            mmu,
            tlb: HashMap::new(),
            root: None,
            host: None,
        })
    }

    /// Creates vCPU `id` on `backend`, hosted by `host`, a hypervisor that
    /// shadows the pool (shared by the VM's soft vCPUs). Before every entry
    /// the vCPU replays what the backend journaled, as the guest kit's CPL0
    /// code does on such a host.
    pub fn with_shadowing_host(
        backend: &ShadowBackend,
        id: VcpuId,
        host: ShadowingHost,
    ) -> Result<Self, BackendError> {
        let mut cpu = Self::new(backend, id)?;
        cpu.host = Some(host);
        Ok(cpu)
    }

    /// Loads guest registers (MOV CR3 / CR0 / CR4 / EFER): the MMU picks the
    /// root, and the TLB is flushed.
    pub fn load_context(&mut self, ctx: &PagingContext) -> Result<(), VcpuError> {
        let load = self.mmu.set_paging_context(ctx)?;
        self.root = load.root;
        self.tlb.clear();
        Ok(())
    }

    /// INVLPG.
    pub fn invlpg(&mut self, gva: Gva) {
        self.tlb.remove(&gva.page_number());
        self.mmu.invlpg(gva);
    }

    /// A full TLB flush.
    pub fn flush(&mut self) {
        self.tlb.clear();
        self.mmu.flush_tlb(true);
    }

    /// The MMU half, for what the CPU does not model.
    pub fn mmu(&mut self) -> &mut ShadowVcpu {
        &mut self.mmu
    }

    /// Cached translations.
    pub fn tlb_len(&self) -> usize {
        self.tlb.len()
    }

    /// Reads `size` bytes at `gva`.
    pub fn read(&mut self, gva: Gva, size: u8, mode: AccessMode) -> Result<SoftOutcome, SoftError> {
        self.access(gva, AccessKind::Read, mode, size, 0)
    }

    /// Writes the low `size` bytes of `value` at `gva`.
    pub fn write(
        &mut self,
        gva: Gva,
        size: u8,
        value: u64,
        mode: AccessMode,
    ) -> Result<SoftOutcome, SoftError> {
        self.access(gva, AccessKind::Write, mode, size, value)
    }

    /// Fetches 1 byte at `gva`.
    pub fn fetch(&mut self, gva: Gva, mode: AccessMode) -> Result<SoftOutcome, SoftError> {
        self.access(gva, AccessKind::Fetch, mode, 1, 0)
    }

    fn enter(&mut self) -> Result<(), VcpuError> {
        let load = self.mmu.prepare_entry()?;
        if load.root != self.root || load.flush_tlb {
            self.tlb.clear();
        }
        self.root = load.root;
        if let Some(host) = &self.host {
            // The replay: a compare-and-exchange of each entry's value with
            // itself, which tells the host the entry's current value, and a
            // one-byte rewrite of each zapped frame, which makes the host
            // forget the frame.
            let replay = self.backend.take_replay();
            if !replay.is_empty() {
                let pool = &*self.backend.inner.pool;
                let window = self
                    .backend
                    .inner
                    .window_gva()
                    .expect("replay implies a window");
                let mut entries = host.entries();
                for frame_gva in &replay.frames {
                    let frame = ((frame_gva.raw() - window.raw()) / PAGE_SIZE) as u32;
                    let start = pool.hpa(frame).raw();
                    entries.retain(|hpa, _| !(start..start + PAGE_SIZE).contains(hpa));
                }
                for gva in &replay.entries {
                    let offset = gva.raw() - window.raw();
                    let frame = (offset / PAGE_SIZE) as u32;
                    let index = ((offset % PAGE_SIZE) / 8) as usize;
                    entries.insert(
                        pool.hpa(frame).raw() + index as u64 * 8,
                        pool.load(frame, index),
                    );
                }
                drop(entries);
                self.backend.replay_done(replay.epoch);
                // The kit reloads CR3 after a replay.
                self.tlb.clear();
            }
        }
        Ok(())
    }

    /// One access, exiting to the MMU on faults until it completes.
    pub fn access(
        &mut self,
        gva: Gva,
        kind: AccessKind,
        mode: AccessMode,
        size: u8,
        value: u64,
    ) -> Result<SoftOutcome, SoftError> {
        if !matches!(size, 1 | 2 | 4 | 8) || !gva.raw().is_multiple_of(u64::from(size)) {
            return Err(SoftError::Unaligned { gva, size });
        }
        let access = Access { kind, mode };
        let page = gva.page_number();
        for _ in 0..MAX_FAULTS_PER_ACCESS {
            // The memory the hardware reaches, as of before the entry: a
            // memslot deleted after this point is waited out (the delete's
            // reload handshake) before its backing goes, and one deleted
            // before it has asked this vCPU to reload, so no translation
            // through the old slot survives the entry.
            let slots = self.backend.inner.memslots.load();
            self.enter()?;
            let guest = *self.mmu.paging_context();
            let root = self.root.ok_or(VcpuError::OutOfPages)?;
            let hw =
                crate::hardware_context(&guest, root, self.backend.inner.config.host_maxphyaddr);
            let cached = self.tlb.get(&page).copied();
            let frame = match cached {
                Some(e) if permission_fault(&hw, e.rights, e.pkey, access).is_none() => Ok(e.frame),
                _ => {
                    // A miss, or a hit the rights refuse: the CPU drops the
                    // entry and walks the tables.
                    self.tlb.remove(&page);
                    // The hardware walks without the MMU lock.
                    let walk = |refresh| {
                        walk_with(
                            &hw,
                            &HardwareMemory {
                                pool: &self.backend.inner.pool,
                                slots: &slots,
                                host: self.host.as_ref(),
                                refresh,
                            },
                            gva,
                            access,
                            WalkOptions::without_accessed_dirty(),
                        )
                    };
                    // A host that shadows the pool walks it afresh when its
                    // cached entries fault (as KVM's shadow MMU does), so a
                    // widened entry needs no replay.
                    let r = match walk(false) {
                        Err(_) if self.host.is_some() => walk(true),
                        r => r,
                    };
                    match r {
                        Ok(t) => {
                            let frame = Hpa(t.page_gpa().raw()
                                + (gva.raw() & (t.page_size.bytes() - 1) & !0xfff));
                            self.tlb.insert(
                                page,
                                TlbEntry {
                                    frame,
                                    rights: t.rights,
                                    pkey: t.pkey,
                                },
                            );
                            Ok(frame)
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            let frame = match frame {
                Ok(f) => f,
                Err(WalkError::PageFault(pf)) => {
                    self.mmu.exit_guest();
                    drop(slots);
                    match self.mmu.handle_page_fault(gva, pf.error_code)? {
                        FaultOutcome::Retry => continue,
                        FaultOutcome::InjectPageFault { error_code, cr2 } => {
                            return Ok(SoftOutcome::PageFault { error_code, cr2 });
                        }
                        FaultOutcome::Mmio { gpa } => return Ok(SoftOutcome::Mmio(gpa)),
                        FaultOutcome::Emulate { gpa } if kind == AccessKind::Write => {
                            let bytes = value.to_le_bytes();
                            self.mmu.write_guest(gpa, &bytes[..usize::from(size)])?;
                            return Ok(SoftOutcome::Done(value));
                        }
                        FaultOutcome::InjectGeneralProtection => {
                            return Ok(SoftOutcome::GeneralProtection);
                        }
                        other => return Err(SoftError::Unexpected(other, kind)),
                    }
                }
                Err(WalkError::NonCanonical(_)) => {
                    self.mmu.exit_guest();
                    return Ok(SoftOutcome::GeneralProtection);
                }
                Err(e) => {
                    self.mmu.exit_guest();
                    return Err(SoftError::Walk(e));
                }
            };
            let hpa = Hpa(frame.raw() + gva.page_offset());
            // A leaf into the hypervisor's MMIO window: the hypervisor
            // finds no memory there and exits as MMIO, the window taken off.
            let config = &self.backend.inner.config;
            if let Some(window) = config.mmio_window.filter(|_| config.mmio_caching)
                && hpa.raw() >= window.raw()
                && hpa.raw() < 1u64 << config.host_maxphyaddr.min(52)
            {
                self.mmu.exit_guest();
                return Ok(SoftOutcome::Mmio(Gpa(hpa.raw() - window.raw())));
            }
            // The slot may have been deleted and created again since the
            // entry, with the translation made afterwards: then the current
            // memslots hold it.
            let result = match hpa_to_gpa(&slots, hpa) {
                Some(_) => host_access(&slots, hpa, kind, size, value),
                None => host_access(&self.backend.inner.memslots.load(), hpa, kind, size, value),
            };
            self.mmu.exit_guest();
            return result.map(SoftOutcome::Done);
        }
        self.mmu.exit_guest();
        Err(SoftError::NoProgress(MAX_FAULTS_PER_ACCESS))
    }
}

/// Reads or writes guest memory at a host-physical address, as the memory
/// bus would.
fn host_access(
    slots: &Slots,
    hpa: Hpa,
    kind: AccessKind,
    size: u8,
    value: u64,
) -> Result<u64, SoftError> {
    let gpa = hpa_to_gpa(slots, hpa).ok_or(SoftError::StaleFrame(hpa))?;
    let mem = slots.guest_mem();
    if kind == AccessKind::Write {
        write_bytes(&mem, gpa, &value.to_le_bytes()[..usize::from(size)])
            .map_err(|_| SoftError::StaleFrame(hpa))?;
        return Ok(value);
    }
    let word = mem
        .read_u64(Gpa(gpa.raw() & !7))
        .map_err(|_| SoftError::StaleFrame(hpa))?;
    let shift = (gpa.raw() & 7) * 8;
    let mask = if size == 8 {
        u64::MAX
    } else {
        (1u64 << (u32::from(size) * 8)) - 1
    };
    Ok((word >> shift) & mask)
}

impl Drop for SoftVcpu {
    fn drop(&mut self) {
        self.mmu.exit_guest();
    }
}

/// The guest-physical address whose memslot backing holds `hpa`.
fn hpa_to_gpa(slots: &Slots, hpa: Hpa) -> Option<Gpa> {
    slots.table.iter().find_map(|s| {
        let off = hpa.raw().checked_sub(s.backing.hpa.raw())?;
        (off < s.size).then(|| Gpa(s.guest_base.raw() + off))
    })
}

/// Host-physical memory as the hardware sees it: the shadow pool (through
/// the host's cached copy when it shadows the pool) and the memslots'
/// backing.
struct HardwareMemory<'a> {
    pool: &'a PoolMem,
    slots: &'a Slots,
    /// The host's own copy of pool entries, when it shadows the pool.
    host: Option<&'a ShadowingHost>,
    /// Read every entry afresh into the host's copy (the host's walk after
    /// its cached entries faulted).
    refresh: bool,
}

impl GuestPhysMemory for HardwareMemory<'_> {
    fn read_u64(&self, addr: Gpa) -> Result<u64, PhysMemError> {
        let hpa = Hpa(addr.raw());
        if let Some(frame) = self.pool.frame_at(hpa) {
            let value = self.pool.load(frame, (hpa.page_offset() / 8) as usize);
            // The host keeps what it read while it is present; a
            // not-present entry faults into the host, which reads it again.
            return Ok(match self.host {
                Some(host) => {
                    let mut entries = host.entries();
                    let cached = entries.entry(hpa.raw()).or_insert(value);
                    if *cached & 1 == 0 || self.refresh {
                        *cached = value;
                    }
                    *cached
                }
                None => value,
            });
        }
        let gpa = hpa_to_gpa(self.slots, hpa).ok_or(PhysMemError::Unbacked(addr))?;
        self.slots.guest_mem().read_u64(gpa)
    }

    fn compare_exchange_u64(
        &self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        let hpa = Hpa(addr.raw());
        if let Some(frame) = self.pool.frame_at(hpa) {
            let index = (hpa.page_offset() / 8) as usize;
            return Ok(self
                .pool
                .compare_exchange(frame, index, current, new)
                .map(|_| ()));
        }
        let gpa = hpa_to_gpa(self.slots, hpa).ok_or(PhysMemError::Unbacked(addr))?;
        self.slots
            .guest_mem()
            .compare_exchange_u64(gpa, current, new)
    }
}
