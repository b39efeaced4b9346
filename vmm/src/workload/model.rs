//! The host's model of guest memory and of the guest's page walks, for
//! the workloads whose results depend on page tables (`pt-edit`,
//! `access`): guest memory as the modelled guest left it, walked by
//! `mmu-api`'s reference walker.

use std::collections::HashMap;

use mmu_api::paging::{GuestPhysMemory, PhysMemError, WalkError, WalkOptions, walk_with};
use mmu_api::{Access, AccessKind, Gpa, Gva};

use super::PlanError;
use crate::kit::FaultRecord;
use crate::vm::{GuestPhys, Vm};
use crate::x86;

/// Guest memory as the model sees it: the VM's, with the words the
/// modelled guest wrote laid over it.
pub(super) struct Overlay<'a> {
    base: GuestPhys<'a>,
    /// The words the modelled guest wrote, by guest-physical address.
    pub(super) words: HashMap<u64, u64>,
}

impl<'a> Overlay<'a> {
    pub(super) fn new(vm: &'a Vm) -> Self {
        Overlay {
            base: GuestPhys(vm.memory()),
            words: HashMap::new(),
        }
    }

    pub(super) fn read(&self, gpa: u64) -> u64 {
        self.read_u64(Gpa(gpa)).unwrap_or(0)
    }

    pub(super) fn write(&mut self, gpa: u64, value: u64) {
        self.words.insert(gpa, value);
    }

    /// Every word the modelled guest wrote, by address.
    pub(super) fn written(&self) -> Vec<(u64, u64)> {
        let mut words: Vec<_> = self.words.iter().map(|(&g, &v)| (g, v)).collect();
        words.sort_unstable();
        words
    }
}

impl GuestPhysMemory for Overlay<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysMemError> {
        match self.words.get(&gpa.raw()) {
            Some(v) => Ok(*v),
            None => self.base.read_u64(gpa),
        }
    }

    /// The model never sets A/D bits: it walks without updating them.
    fn compare_exchange_u64(
        &self,
        gpa: Gpa,
        current: u64,
        _new: u64,
    ) -> Result<Result<(), u64>, PhysMemError> {
        let actual = self.read_u64(gpa)?;
        Ok(if actual == current {
            Ok(())
        } else {
            Err(actual)
        })
    }
}

/// The reference walker's verdict on `access` at `gva` under `root`: the
/// guest-physical address, or the #PF the guest must see.
pub(super) fn model_access(
    vm: &Vm,
    memory: &Overlay<'_>,
    root: u64,
    gva: u64,
    kind: AccessKind,
    cpl: u8,
) -> Result<Result<u64, FaultRecord>, PlanError> {
    let mut ctx = vm.paging_context(cpl);
    ctx.cr3 = root;
    let access = if cpl == 3 {
        Access::user(kind)
    } else {
        Access::supervisor(kind)
    };
    let options = WalkOptions::without_accessed_dirty();
    match walk_with(&ctx, memory, Gva(gva), access, options) {
        Ok(t) => Ok(Ok(t.gpa.raw())),
        Err(WalkError::PageFault(pf)) => Ok(Err(FaultRecord {
            vector: x86::VECTOR_PF,
            error_code: u64::from(pf.error_code.bits()),
            cr2: pf.address.raw(),
        })),
        Err(other) => Err(other.into()),
    }
}
