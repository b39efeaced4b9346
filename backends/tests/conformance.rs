//! One conformance body, run against every backend compiled in, through
//! `Arc<dyn MmuBackend>` only: translation (rights, page-crossing
//! accesses, A/D bits), MMIO classification before and after memslot
//! changes, dirty-log completeness for the writes the VMM makes, and the
//! memslot errors.
//!
//! The EPT backend runs over `mmu-ept`'s in-process hypervisor double (no
//! `/dev/kvm` needed); the shadow backend needs nothing.

use std::sync::Arc;

use mmu_api::paging::{WalkError, WalkOptions};
use mmu_api::{
    Access, AccessKind, Gpa, Gva, Hpa, Memslot, MemslotChange, MemslotError, MemslotFlags,
    MmioClass, MmuBackend, MmuVcpu, PagingContext, PagingMode, PfErrorCode, SlotId, VcpuId,
    VcpuKick,
};
use mmu_backends::{BackendConfig, BackendKind, BackendParts, create};
use mmu_ept::testing::GuestRam;

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const A: u64 = 0x20;
const D: u64 = 0x40;
/// Where the "hardware" sees guest RAM at guest-physical 0 (below the
/// shadow backend's 46-bit host width, away from its pool).
const RAM_HPA: u64 = 0x10_0000_0000;

#[derive(Debug)]
struct NoKick;

impl VcpuKick for NoKick {
    fn kick(&self) {}
}

fn backend(kind: BackendKind) -> Arc<dyn MmuBackend> {
    #[allow(unused_mut)]
    let mut config = BackendConfig::default().with_gpa_width(46);
    #[cfg(feature = "shadow")]
    {
        config.shadow.pool_pages = 512;
    }
    #[allow(unused_mut)]
    let mut parts = BackendParts::new();
    #[cfg(feature = "ept")]
    {
        let port = Arc::new(mmu_ept::testing::InProcessHypervisor::new());
        parts = parts.with_hypervisor_memory(port);
    }
    create(kind, &config, &parts).expect("backend")
}

/// Guest RAM that is never freed, so its memslots stay valid for the rest
/// of the process.
fn leak_ram(size: u64) -> &'static GuestRam {
    Box::leak(Box::new(GuestRam::new(size)))
}

fn slot(ram: &GuestRam, id: u32, base: u64, flags: MemslotFlags) -> Memslot {
    let mut slot = ram.memslot(SlotId(id), Gpa(base), flags);
    slot.backing.hpa = Hpa(RAM_HPA + u64::from(id) * 0x1000_0000);
    slot
}

fn set(backend: &dyn MmuBackend, slot: Memslot) -> Result<MemslotChange, MemslotError> {
    // SAFETY: every slot here is made from leaked GuestRam: its host range
    // stays valid for reads and writes for the rest of the process.
    unsafe { backend.set_memslot(slot) }
}

fn vcpu(backend: &dyn MmuBackend) -> Box<dyn MmuVcpu> {
    backend.create_vcpu(VcpuId(0), Arc::new(NoKick)).unwrap()
}

/// Runs `body` against every backend compiled in.
fn for_each_backend(body: impl Fn(BackendKind, Arc<dyn MmuBackend>)) {
    let kinds = BackendKind::compiled_in();
    assert!(!kinds.is_empty());
    for &kind in kinds {
        body(kind, backend(kind));
        println!("conformance body passed on the {kind} backend");
    }
}

/// 4-level tables in `ram` (at guest-physical 0): PML4 at 0x1000, PDPT at
/// 0x2000, PD at 0x3000, PT at 0x4000, mapping 0x40_0000 + i * 4 KiB to
/// `leaves[i]` (0 = not present).
fn map(ram: &GuestRam, leaves: &[u64]) -> PagingContext {
    ram.write_u64(0x1000, 0x2000 | P | W | U);
    ram.write_u64(0x2000, 0x3000 | P | W | U);
    ram.write_u64(0x3000 + 2 * 8, 0x4000 | P | W | U);
    for (i, leaf) in leaves.iter().enumerate() {
        ram.write_u64(0x4000 + 8 * i as u64, *leaf);
    }
    let mut ctx = PagingContext::for_mode(
        PagingMode::Level4,
        0x1000,
        46,
        mmu_api::paging::CpuFeatures::all(),
    )
    .unwrap();
    ctx.cpl = 3;
    ctx
}

const DEBUG: WalkOptions = WalkOptions::without_accessed_dirty();
const AS_CPU: WalkOptions = WalkOptions::with_accessed_dirty();

#[test]
fn translation_follows_the_guest_tables() {
    for_each_backend(|kind, backend| {
        let ram = leak_ram(0x10_0000);
        set(&*backend, slot(ram, 0, 0, MemslotFlags::empty())).unwrap();
        // 0x40_0000: RW user page at 0x8000; 0x40_1000: read-only user page
        // at 0x9000; 0x40_2000: not present.
        let ctx = map(ram, &[0x8000 | P | W | U, 0x9000 | P | U, 0]);
        let mut v = vcpu(&*backend);
        v.set_paging_context(&ctx).unwrap();

        // A read crossing into the read-only page: two segments.
        let read = Access::user(AccessKind::Read);
        let segments = v.translate(Gva(0x40_0ff8), 16, read, DEBUG).unwrap();
        let pieces: Vec<_> = segments.iter().map(|s| (s.gva, s.gpa, s.len)).collect();
        assert_eq!(
            pieces,
            [
                (Gva(0x40_0ff8), Gpa(0x8ff8), 8),
                (Gva(0x40_1000), Gpa(0x9000), 8)
            ],
            "{kind}"
        );
        // The same write faults on the second page with P | W | U.
        let write = Access::user(AccessKind::Write);
        match v.translate(Gva(0x40_0ff8), 16, write, DEBUG) {
            Err(WalkError::PageFault(pf)) => {
                assert_eq!(pf.address, Gva(0x40_1000), "{kind}");
                assert_eq!(
                    pf.error_code,
                    PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER,
                    "{kind}"
                );
            }
            other => panic!("{kind}: {other:?}"),
        }
        // Not present: U only.
        match v.translate(Gva(0x40_2000), 1, read, DEBUG) {
            Err(WalkError::PageFault(pf)) => {
                assert_eq!(pf.error_code, PfErrorCode::USER, "{kind}")
            }
            other => panic!("{kind}: {other:?}"),
        }
        // A debug walk leaves A/D alone; a CPU-like write sets them.
        assert_eq!(ram.read_u64(0x4000) & (A | D), 0, "{kind}");
        v.translate(Gva(0x40_0010), 8, write, AS_CPU).unwrap();
        assert_eq!(ram.read_u64(0x4000) & (A | D), A | D, "{kind}");
        assert_eq!(ram.read_u64(0x4008) & (A | D), 0, "{kind}");

        // The guest makes the read-only page writable and invalidates it.
        ram.write_u64(0x4008, 0x9000 | P | W | U);
        v.invlpg(Gva(0x40_1000));
        let segments = v.translate(Gva(0x40_0ff8), 16, write, AS_CPU).unwrap();
        assert_eq!(segments.len(), 2, "{kind}");
        assert_eq!(ram.read_u64(0x4008) & (A | D), A | D, "{kind}");
    });
}

#[test]
fn mmio_classification_follows_memslot_changes() {
    for_each_backend(|kind, backend| {
        let ram = leak_ram(0x4000);
        let mut v = vcpu(&*backend);
        let at = Gpa(0x20_1008);
        assert_eq!(v.classify_mmio(at, false), MmioClass::Mmio, "{kind}");

        // Added: memory.
        let mut s = slot(ram, 4, 0x20_0000, MemslotFlags::empty());
        assert_eq!(set(&*backend, s), Ok(MemslotChange::Created), "{kind}");
        let memory = MmioClass::Memory { slot: SlotId(4) };
        assert_eq!(v.classify_mmio(at, false), memory, "{kind}");
        assert_eq!(v.classify_mmio(at, true), memory, "{kind}");

        // Read-only: writes go to the device behind it.
        s.flags = MemslotFlags::READONLY;
        assert!(matches!(
            set(&*backend, s),
            Ok(MemslotChange::FlagsChanged { .. })
        ));
        assert_eq!(v.classify_mmio(at, false), memory, "{kind}");
        assert_eq!(
            v.classify_mmio(at, true),
            MmioClass::ReadOnlyWrite { slot: SlotId(4) },
            "{kind}"
        );

        // Moved: the old place is MMIO, the new one memory.
        s.guest_base = Gpa(0x30_0000);
        assert!(matches!(set(&*backend, s), Ok(MemslotChange::Moved { .. })));
        assert_eq!(v.classify_mmio(at, false), MmioClass::Mmio, "{kind}");
        assert_eq!(v.classify_mmio(Gpa(0x30_1008), false), memory, "{kind}");

        // Deleted: MMIO everywhere.
        backend.delete_memslot(SlotId(4)).unwrap();
        assert_eq!(
            v.classify_mmio(Gpa(0x30_1008), false),
            MmioClass::Mmio,
            "{kind}"
        );
        assert!(backend.memslots().is_empty(), "{kind}");
    });
}

#[test]
fn dirty_logs_keep_every_write_the_vmm_makes() {
    for_each_backend(|kind, backend| {
        let ram = leak_ram(0x10_000);
        let mut s = slot(ram, 1, 0x10_0000, MemslotFlags::LOG_DIRTY);
        set(&*backend, s).unwrap();
        let mut v = vcpu(&*backend);
        // Emulated guest writes (through the vCPU's MMU) and the VMM's own
        // device writes (noted).
        v.write_guest(Gpa(0x10_2000), &[1; 8]).unwrap();
        v.write_guest(Gpa(0x10_fff8), &[2; 8]).unwrap();
        backend.note_host_write(Gpa(0x10_4ff0), 0x20); // pages 4 and 5
        backend.note_host_write(Gpa(0x20_0000), 8); // outside: ignored
        let log = backend.get_dirty_log(SlotId(1)).unwrap();
        assert_eq!(
            log.iter_dirty().collect::<Vec<_>>(),
            [2, 4, 5, 15],
            "{kind}"
        );
        assert_eq!(ram.read_u64(0x2000), 0x0101_0101_0101_0101, "{kind}");
        // A harvest clears; the next write lands in the next harvest.
        assert_eq!(backend.get_dirty_log(SlotId(1)).unwrap().count(), 0);
        v.write_guest(Gpa(0x10_7000), &[3]).unwrap();
        let log = backend.get_dirty_log(SlotId(1)).unwrap();
        assert_eq!(log.iter_dirty().collect::<Vec<_>>(), [7], "{kind}");

        // Without LOG_DIRTY there is no log.
        s.flags = MemslotFlags::empty();
        set(&*backend, s).unwrap();
        assert_eq!(
            backend.get_dirty_log(SlotId(1)),
            Err(MemslotError::NotLogging(SlotId(1))),
            "{kind}"
        );
        // Writes to read-only memory are refused.
        s.flags = MemslotFlags::READONLY;
        set(&*backend, s).unwrap();
        assert!(v.write_guest(Gpa(0x10_0000), &[0]).is_err(), "{kind}");
    });
}

#[test]
fn memslot_errors_are_the_same_everywhere() {
    for_each_backend(|kind, backend| {
        let ram = leak_ram(0x4000);
        let good = slot(ram, 0, 0x10_0000, MemslotFlags::empty());
        set(&*backend, good).unwrap();
        let generation = backend.memslot_generation();

        let zero = {
            let mut m = good;
            m.size = 0;
            m
        };
        assert_eq!(set(&*backend, zero), Err(MemslotError::ZeroSize(SlotId(0))));
        let unaligned = {
            let mut m = good;
            m.id = SlotId(1);
            m.guest_base = Gpa(0x20_0800);
            m
        };
        assert_eq!(
            set(&*backend, unaligned),
            Err(MemslotError::Unaligned(SlotId(1))),
            "{kind}"
        );
        let too_high = {
            let mut m = good;
            m.id = SlotId(1);
            m.guest_base = Gpa((1 << 46) - 0x1000);
            m
        };
        assert!(
            matches!(set(&*backend, too_high), Err(MemslotError::TooLarge { .. })),
            "{kind}"
        );
        let other = slot(leak_ram(0x4000), 1, 0x10_2000, MemslotFlags::empty());
        assert!(
            matches!(
                set(&*backend, other),
                Err(MemslotError::Overlap {
                    slot: SlotId(1),
                    other: SlotId(0),
                    ..
                })
            ),
            "{kind}"
        );
        let grown = {
            let mut m = good;
            m.size = good.size + 0x1000;
            m
        };
        assert_eq!(
            set(&*backend, grown),
            Err(MemslotError::IllegalChange(SlotId(0))),
            "{kind}"
        );
        let moved_and_flagged = {
            let mut m = good;
            m.guest_base = Gpa(0x40_0000);
            m.flags = MemslotFlags::READONLY;
            m
        };
        assert_eq!(
            set(&*backend, moved_and_flagged),
            Err(MemslotError::IllegalChange(SlotId(0))),
            "{kind}"
        );
        assert_eq!(
            backend.delete_memslot(SlotId(7)),
            Err(MemslotError::UnknownSlot(SlotId(7))),
            "{kind}"
        );
        assert_eq!(
            backend.get_dirty_log(SlotId(7)),
            Err(MemslotError::UnknownSlot(SlotId(7))),
            "{kind}"
        );
        // Nothing refused changed anything.
        assert_eq!(backend.memslot_generation(), generation, "{kind}");
        assert_eq!(backend.memslots(), [good], "{kind}");
        assert_eq!(set(&*backend, good), Ok(MemslotChange::Unchanged), "{kind}");
    });
}
