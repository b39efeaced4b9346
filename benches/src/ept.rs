//! The EPT backend on the in-process hypervisor.

use std::sync::Arc;

use mmu_api::{Gpa, Hpa, MemslotFlags, MmuBackend, MmuVcpu, SlotId, VcpuId};
use mmu_ept::testing::InProcessHypervisor;
use mmu_ept::{EptBackend, EptConfig};
use mmu_shadow::soft::NoKick;

use crate::memory::GuestMemory;
use crate::slots::{add_extra_slots, add_slot};

/// An EPT backend holding `slots` memslots (one RAM page at guest-physical
/// 0, then the extra slots of [`add_extra_slots`]) and one vCPU.
#[derive(Debug)]
pub struct EptRig {
    /// The vCPU (declared first: dropped before the backend).
    pub vcpu: Box<dyn MmuVcpu>,
    /// The backend.
    pub backend: EptBackend,
}

impl EptRig {
    /// A backend from `config` with `slots` memslots (at least one).
    pub fn new(config: EptConfig, slots: u32) -> Self {
        let backend = EptBackend::new(config, Arc::new(InProcessHypervisor::new()));
        let ram = GuestMemory::new(mmu_api::PAGE_SIZE).expect("guest memory");
        let slot = ram.memslot(
            SlotId(0),
            Gpa(0),
            0,
            1,
            Hpa(ram.host_addr().0),
            MemslotFlags::empty(),
        );
        add_slot(&backend, ram, slot).expect("RAM");
        add_extra_slots(&backend, slots).expect("extra memslots");
        let vcpu = backend
            .create_vcpu(VcpuId(0), Arc::new(NoKick))
            .expect("vCPU");
        EptRig { vcpu, backend }
    }

    /// The backend counter `name`. Panics if the backend has none.
    pub fn stat(&self, name: &str) -> u64 {
        self.backend
            .stats()
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }
}
