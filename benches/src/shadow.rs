//! The shadow backend on the soft vCPU, ready to run a [`Guest`].

use mmu_api::{AccessMode, Gpa, Gva, Hpa, MemslotFlags, MmuBackend, PAGE_SIZE, SlotId, VcpuId};
use mmu_shadow::soft::{SoftOutcome, SoftVcpu};
use mmu_shadow::{ShadowBackend, ShadowConfig};

use crate::guest::{GUEST_MAXPHYADDR, Guest};
use crate::slots::{RAM_HPA, add_extra_slots, add_slot};

/// Where the hardware sees the shadow pool (above every bench memslot's
/// backing, below the default host MAXPHYADDR of 46).
pub const POOL_HPA: Hpa = Hpa(1 << 40);

/// The backend's defaults (fast zap, FIFO reclaim, prefetch 8, MMIO
/// caching) with a pool of `pool_pages` frames at [`POOL_HPA`] and the
/// guests' physical width.
pub fn config(pool_pages: u32) -> ShadowConfig {
    {
        let mut m = ShadowConfig::default();
        m.pool_pages = pool_pages;
        m.pool_hpa = POOL_HPA;
        m.gpa_width = GUEST_MAXPHYADDR;
        m
    }
}

/// A shadow backend with the guest's RAM as memslot 0 and one soft vCPU
/// running the guest's context.
#[derive(Debug)]
pub struct ShadowRig {
    /// The soft vCPU (declared first: dropped before the backend).
    pub cpu: SoftVcpu,
    /// The backend.
    pub backend: ShadowBackend,
}

impl ShadowRig {
    /// A fresh backend built from `config`, running `guest`.
    pub fn new(guest: &Guest, config: ShadowConfig) -> Self {
        Self::with_slots(guest, config, 1)
    }

    /// As [`new`](Self::new), with `slots` memslots in all (the extra ones
    /// from [`add_extra_slots`]).
    pub fn with_slots(guest: &Guest, config: ShadowConfig, slots: u32) -> Self {
        let backend = ShadowBackend::new(config).expect("shadow backend");
        let memory = guest.memory();
        let ram = memory.memslot(
            SlotId(0),
            Gpa(0),
            0,
            memory.pages(),
            RAM_HPA,
            MemslotFlags::empty(),
        );
        add_slot(&backend, memory, ram).expect("RAM memslot");
        add_extra_slots(&backend, slots).expect("extra memslots");
        let mut cpu = SoftVcpu::new(&backend, VcpuId(0)).expect("vCPU");
        cpu.load_context(&guest.context()).expect("guest context");
        ShadowRig { cpu, backend }
    }

    /// A user-mode 8-byte read at `gva`. Panics on a soft-vCPU error (an
    /// MMU bug).
    pub fn read(&mut self, gva: Gva) -> SoftOutcome {
        self.cpu
            .read(gva, 8, AccessMode::User)
            .expect("soft vCPU access")
    }

    /// Reads the first word of `pages` consecutive pages from `first`;
    /// panics unless each read completes (no MMIO, no guest fault).
    pub fn touch(&mut self, first: Gva, pages: u64) {
        for i in 0..pages {
            let out = self.read(Gva(first.raw() + i * PAGE_SIZE));
            assert!(matches!(out, SoftOutcome::Done(_)), "{out:?}");
        }
    }

    /// The backend counter `name`. Panics if the backend has none.
    pub fn stat(&self, name: &str) -> u64 {
        self.backend
            .stats()
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// `name=value` for each of `names`, space-separated.
    pub fn stats_line(&self, names: &[&str]) -> String {
        let stats = self.backend.stats();
        names
            .iter()
            .map(|n| format!("{n}={}", stats.get(n).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
