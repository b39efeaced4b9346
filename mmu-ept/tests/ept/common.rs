//! Shared fixtures: a backend over the in-process hypervisor, guest RAM that
//! lives for the whole test process, and a 4-level page-table builder that
//! writes real entries into that RAM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use mmu_api::paging::WalkOptions;
use mmu_api::{
    Gpa, Memslot, MemslotChange, MemslotError, MemslotFlags, MmuBackend, MmuVcpu, PagingContext,
    PagingMode, SlotId, VcpuId, VcpuKick,
};
use mmu_ept::testing::{GuestRam, InProcessHypervisor};
use mmu_ept::{EptBackend, EptConfig, HypervisorMemory};

pub(crate) const P: u64 = 1;
pub(crate) const W: u64 = 2;
pub(crate) const U: u64 = 4;
pub(crate) const A: u64 = 0x20;
pub(crate) const D: u64 = 0x40;
pub(crate) const PS: u64 = 0x80;
pub(crate) const G: u64 = 0x100;
pub(crate) const XD: u64 = 1 << 63;
pub(crate) const PAGE: u64 = 0x1000;

/// Guest RAM that is never freed, so every memslot made from it satisfies
/// `set_memslot`'s contract for the rest of the process, whatever order
/// the test drops its backend and vCPUs in.
pub(crate) fn leak_ram(size: u64) -> &'static GuestRam {
    Box::leak(Box::new(GuestRam::new(size)))
}

/// Registers `ram` as slot `id` at `base`.
pub(crate) fn add_ram(
    backend: &dyn MmuBackend,
    ram: &'static GuestRam,
    id: u32,
    base: u64,
    flags: MemslotFlags,
) -> Result<MemslotChange, MemslotError> {
    // SAFETY: `ram` is leaked, so its host range stays valid for reads and
    // writes for the rest of the process, beyond any delete_memslot.
    unsafe { backend.set_memslot(ram.memslot(SlotId(id), Gpa(base), flags)) }
}

/// Sets a slot that was made from a leaked [`GuestRam`] (a move or flag
/// change of one registered with [`add_ram`]).
pub(crate) fn set_slot(
    backend: &dyn MmuBackend,
    slot: Memslot,
) -> Result<MemslotChange, MemslotError> {
    // SAFETY: every slot the tests pass here keeps the host range of a
    // leaked GuestRam (MemslotTable::set refuses a new backing for an
    // existing id, and tests only build slots from leaked RAM).
    unsafe { backend.set_memslot(slot) }
}

/// A kick that counts: the EPT backend must never need one.
#[derive(Debug, Default)]
pub(crate) struct CountingKick(pub(crate) AtomicU64);

impl VcpuKick for CountingKick {
    fn kick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A backend over an in-process hypervisor.
pub(crate) struct Vm {
    pub(crate) hv: Arc<InProcessHypervisor>,
    pub(crate) backend: EptBackend,
    pub(crate) kick: Arc<CountingKick>,
}

impl Vm {
    pub(crate) fn new() -> Self {
        Self::with_config(EptConfig::default())
    }

    pub(crate) fn with_config(config: EptConfig) -> Self {
        let hv = Arc::new(InProcessHypervisor::new());
        let backend = EptBackend::new(config, hv.clone());
        Self {
            hv,
            backend,
            kick: Arc::default(),
        }
    }

    pub(crate) fn vcpu(&self, id: u32) -> Box<dyn MmuVcpu> {
        self.backend
            .create_vcpu(VcpuId(id), self.kick.clone())
            .unwrap()
    }

    pub(crate) fn stat(&self, name: &str) -> u64 {
        self.backend
            .stats()
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }
}

/// 4-level guest page tables built in guest RAM at guest-physical
/// `ram_base`; tables are taken from `next_table` upwards.
pub(crate) struct Tables {
    pub(crate) ram: &'static GuestRam,
    pub(crate) ram_base: u64,
    pub(crate) cr3: u64,
    next_table: u64,
}

impl Tables {
    /// Upper-level entries the builder creates: present, writable, user.
    pub(crate) const UPPER: u64 = P | W | U;

    pub(crate) fn new(ram: &'static GuestRam, ram_base: u64, first_table: u64) -> Self {
        Self {
            ram,
            ram_base,
            cr3: first_table,
            next_table: first_table + PAGE,
        }
    }

    pub(crate) fn read(&self, gpa: u64) -> u64 {
        self.ram.read_u64(gpa - self.ram_base)
    }

    pub(crate) fn write(&self, gpa: u64, value: u64) {
        self.ram.write_u64(gpa - self.ram_base, value);
    }

    fn index(gva: u64, level: u32) -> u64 {
        (gva >> (12 + 9 * (level - 1))) & 0x1ff
    }

    /// Guest-physical address of the entry for `gva` at `level` (1 = PTE),
    /// creating the tables above it.
    pub(crate) fn entry(&mut self, gva: u64, level: u32) -> u64 {
        let mut table = self.cr3;
        for l in (level + 1..=4).rev() {
            let e = table + Self::index(gva, l) * 8;
            let v = self.read(e);
            table = if v & P == 0 {
                let t = self.next_table;
                self.next_table += PAGE;
                self.write(e, t | Self::UPPER);
                t
            } else {
                v & 0x000f_ffff_ffff_f000
            };
        }
        table + Self::index(gva, level) * 8
    }

    /// Maps the 4 KiB page at `gva` to `gpa` with leaf `flags`.
    pub(crate) fn map(&mut self, gva: u64, gpa: u64, flags: u64) -> u64 {
        let e = self.entry(gva, 1);
        self.write(e, gpa | flags);
        e
    }

    /// Maps the 2 MiB page at `gva` to `gpa` with PDE `flags` (PS added).
    pub(crate) fn map_2m(&mut self, gva: u64, gpa: u64, flags: u64) -> u64 {
        let e = self.entry(gva, 2);
        self.write(e, gpa | flags | PS);
        e
    }
}

/// A 4-level CPL0 context (WP, NXE) on `cr3`, with CR4.PGE.
pub(crate) fn ctx4(cr3: u64) -> PagingContext {
    let mut ctx = PagingContext::for_mode(
        PagingMode::Level4,
        cr3,
        46,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap();
    ctx.cr4 |= mmu_api::paging::Cr4::PGE;
    ctx
}

/// Translations that set A/D, as the CPU's own accesses do.
pub(crate) const AD: WalkOptions = WalkOptions::with_accessed_dirty();

/// Debug translations: no A/D side effects.
pub(crate) const PEEK: WalkOptions = WalkOptions::without_accessed_dirty();

/// A hypervisor port that stops inside its next memory-region update until
/// the test lets it go, so the test can look at the backend mid-update.
#[derive(Debug)]
pub(crate) struct GatedHypervisor {
    pub(crate) inner: InProcessHypervisor,
    armed: AtomicBool,
    /// Both sides wait here once the update has entered the port...
    pub(crate) entered: Barrier,
    /// ...and here to let it finish.
    pub(crate) release: Barrier,
}

impl GatedHypervisor {
    pub(crate) fn new() -> Self {
        Self {
            inner: InProcessHypervisor::new(),
            armed: AtomicBool::new(false),
            entered: Barrier::new(2),
            release: Barrier::new(2),
        }
    }

    /// Gate the next update.
    pub(crate) fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn gate(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.wait();
            self.release.wait();
        }
    }
}

impl HypervisorMemory for GatedHypervisor {
    unsafe fn set_user_memory_region(&self, slot: &Memslot) -> std::io::Result<()> {
        self.gate();
        // SAFETY: our caller's promise about the slot's host range is
        // forwarded unchanged.
        unsafe { self.inner.set_user_memory_region(slot) }
    }

    fn delete_user_memory_region(&self, slot: &Memslot) -> std::io::Result<()> {
        self.gate();
        self.inner.delete_user_memory_region(slot)
    }

    fn get_dirty_log(&self, slot: &Memslot) -> std::io::Result<Vec<u64>> {
        self.inner.get_dirty_log(slot)
    }
}
