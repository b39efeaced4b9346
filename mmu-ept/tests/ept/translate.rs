//! Guest-virtual translation: the reference walker's answers over real
//! guest page tables in host RAM, with the software TLB's invalidation
//! rules (CR3 load, INVLPG, flush, memslot generation, zap-all) and exact
//! A/D behaviour.

use mmu_api::paging::{Cr0, Cr4, PageFault, RangeSegment, WalkError};
use mmu_api::{
    Access, AccessKind, ContextError, FaultOutcome, Gpa, Gva, MemslotFlags, MmuBackend, MmuVcpu,
    PagingContext, PfErrorCode, RootLoad, SlotId, VcpuError,
};
use mmu_ept::EptConfig;

use crate::common::{
    A, AD, D, G, P, PAGE, PEEK, Tables, U, Vm, W, XD, add_ram, ctx4, leak_ram, set_slot,
};

/// A VM with 256 KiB of RAM at guest-physical 0 (slot 0, LOG_DIRTY so the
/// tests can change its flags), page tables from 0x1000, and a vCPU in
/// 4-level paging on them.
struct Guest {
    vm: Vm,
    tables: Tables,
    vcpu: Box<dyn MmuVcpu>,
}

impl Guest {
    fn new() -> Self {
        Self::with_config(EptConfig::default())
    }

    fn with_config(config: EptConfig) -> Self {
        let vm = Vm::with_config(config);
        let ram = leak_ram(64 * PAGE);
        add_ram(&vm.backend, ram, 0, 0, MemslotFlags::LOG_DIRTY).unwrap();
        let tables = Tables::new(ram, 0, 0x1000);
        let mut vcpu = vm.vcpu(0);
        vcpu.set_paging_context(&ctx4(tables.cr3)).unwrap();
        Self { vm, tables, vcpu }
    }

    fn xlate(
        &mut self,
        gva: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<RangeSegment>, WalkError> {
        self.vcpu.translate(Gva(gva), len, access, AD)
    }

    /// The guest-physical address of one byte, or the fault.
    fn gpa(&mut self, gva: u64, access: Access) -> Result<u64, WalkError> {
        self.xlate(gva, 1, access).map(|s| s[0].gpa.raw())
    }
}

fn user(kind: AccessKind) -> Access {
    Access::user(kind)
}

fn sup(kind: AccessKind) -> Access {
    Access::supervisor(kind)
}

fn fault(e: WalkError) -> PageFault {
    *e.page_fault().unwrap_or_else(|| panic!("not a #PF: {e:?}"))
}

/// Rights are the AND of the whole walk, checked per access; faults carry
/// the CPU's error code and the faulting address.
#[test]
fn translations_honour_the_walks_rights() {
    let mut g = Guest::new();
    g.tables.map(0x40_0000, 0x1_0000, P | W | U);
    g.tables.map(0x40_1000, 0x1_1000, P | U);
    g.tables.map(0x40_2000, 0x1_2000, P | W);
    g.tables.map(0x40_3000, 0x1_3000, P | W | U | XD);

    assert_eq!(g.gpa(0x40_0abc, user(AccessKind::Write)), Ok(0x1_0abc));
    assert_eq!(g.gpa(0x40_1abc, user(AccessKind::Read)), Ok(0x1_1abc));
    let f = fault(g.gpa(0x40_1000, user(AccessKind::Write)).unwrap_err());
    assert_eq!(
        f.error_code,
        PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER
    );
    assert_eq!(f.address, Gva(0x40_1000));
    let f = fault(g.gpa(0x40_2008, user(AccessKind::Read)).unwrap_err());
    assert_eq!(f.error_code, PfErrorCode::PRESENT | PfErrorCode::USER);
    assert_eq!(f.address, Gva(0x40_2008));
    let f = fault(g.gpa(0x40_3000, user(AccessKind::Fetch)).unwrap_err());
    assert_eq!(
        f.error_code,
        PfErrorCode::PRESENT | PfErrorCode::USER | PfErrorCode::FETCH
    );
    let f = fault(g.gpa(0x50_0000, sup(AccessKind::Read)).unwrap_err());
    assert_eq!(f.error_code, PfErrorCode::empty(), "not present");
    assert_eq!(
        g.gpa(0x8000_0000_0000, sup(AccessKind::Read)),
        Err(WalkError::NonCanonical(Gva(0x8000_0000_0000)))
    );

    // Supervisor writes to a read-only page depend on CR0.WP; changing it
    // changes the answer even though the page was just translated.
    assert!(g.gpa(0x40_1000, sup(AccessKind::Write)).is_err());
    let mut no_wp = ctx4(g.tables.cr3);
    no_wp.cr0.remove(Cr0::WP);
    g.vcpu.set_paging_context(&no_wp).unwrap();
    assert_eq!(g.gpa(0x40_1000, sup(AccessKind::Write)), Ok(0x1_1000));
    g.vcpu.set_paging_context(&ctx4(g.tables.cr3)).unwrap();
    assert!(g.gpa(0x40_1000, sup(AccessKind::Write)).is_err());
}

/// An access that crosses a page is split; each page is checked; a fault
/// on the second page reports that page's first byte, a fault on the first
/// page the access's own address.
#[test]
fn cross_page_accesses_are_split() {
    let mut g = Guest::new();
    let pte0 = g.tables.map(0x40_0000, 0x1_0000, P | W | U);
    let pte1 = g.tables.map(0x40_1000, 0x2_0000, P | W | U);
    g.tables.map(0x40_2000, 0x3_0000, P | U);

    let segs = g.xlate(0x40_0ffc, 8, user(AccessKind::Write)).unwrap();
    assert_eq!(
        segs,
        [
            RangeSegment {
                gva: Gva(0x40_0ffc),
                gpa: Gpa(0x1_0ffc),
                len: 4
            },
            RangeSegment {
                gva: Gva(0x40_1000),
                gpa: Gpa(0x2_0000),
                len: 4
            },
        ]
    );
    assert_eq!(g.tables.read(pte0) & (A | D), A | D, "both leaves dirtied");
    assert_eq!(g.tables.read(pte1) & (A | D), A | D);

    let lens: Vec<u64> = g
        .xlate(0x40_0800, 0x2000, user(AccessKind::Read))
        .unwrap()
        .iter()
        .map(|s| s.len)
        .collect();
    assert_eq!(lens, [0x800, 0x1000, 0x800]);

    let f = fault(g.xlate(0x40_1ffe, 4, user(AccessKind::Write)).unwrap_err());
    assert_eq!(
        f.address,
        Gva(0x40_2000),
        "CR2 is the second page's first byte"
    );
    assert_eq!(
        f.error_code,
        PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER
    );
    let f = fault(g.xlate(0x3f_fffe, 4, user(AccessKind::Read)).unwrap_err());
    assert_eq!(f.address, Gva(0x3f_fffe));
    assert_eq!(g.xlate(0x40_0000, 0, user(AccessKind::Read)), Ok(vec![]));
}

/// A guest that edits a PTE and does not invalidate sees the old
/// translation, as on hardware; INVLPG (of any byte of the page) makes the
/// new one visible.
#[test]
fn stale_translation_until_invlpg() {
    let mut g = Guest::new();
    let pte = g.tables.map(0x40_0000, 0x1_0000, P | W);
    let read = sup(AccessKind::Read);
    assert_eq!(g.gpa(0x40_0010, read), Ok(0x1_0010));
    g.tables.write(pte, 0x2_0000 | P | W);
    assert_eq!(g.gpa(0x40_0010, read), Ok(0x1_0010), "stale until INVLPG");
    g.vcpu.invlpg(Gva(0x40_0fff));
    assert_eq!(g.gpa(0x40_0010, read), Ok(0x2_0010));
    assert_eq!(g.vm.stat("tlb_misses"), 2);
    assert_eq!(g.vm.stat("tlb_hits"), 1);
    assert_eq!(g.vm.stat("translations"), 3);

    // Unmapping needs the same INVLPG before the guest sees the fault.
    g.tables.write(pte, 0);
    assert!(g.gpa(0x40_0010, read).is_ok());
    g.vcpu.invlpg(Gva(0x40_0000));
    assert!(g.gpa(0x40_0010, read).is_err());
}

/// A CR3 load (a context change of CR3 only) and a non-global flush drop
/// non-global translations but keep global ones (CR4.PGE); a global flush
/// and INVLPG drop those too; any other context change drops everything.
#[test]
fn cr3_load_and_flushes_follow_global_pages() {
    let mut g = Guest::new();
    let global = g.tables.map(0x40_0000, 0x1_0000, P | W | G);
    let local = g.tables.map(0x40_1000, 0x1_1000, P | W);
    let read = sup(AccessKind::Read);
    let both = |g: &mut Guest| {
        (
            g.gpa(0x40_0000, read).unwrap(),
            g.gpa(0x40_1000, read).unwrap(),
        )
    };
    let remap = |g: &Guest, base: u64| {
        g.tables.write(global, base | P | W | G);
        g.tables.write(local, (base + PAGE) | P | W);
    };
    assert_eq!(both(&mut g), (0x1_0000, 0x1_1000));

    remap(&g, 0x2_0000);
    let ctx = *g.vcpu.paging_context();
    assert_eq!(
        g.vcpu.set_paging_context(&ctx),
        Ok(RootLoad::new(None, false))
    );
    assert_eq!(both(&mut g), (0x1_0000, 0x2_1000), "CR3 load keeps G");

    remap(&g, 0x3_0000);
    g.vcpu.flush_tlb(false);
    assert_eq!(
        both(&mut g),
        (0x1_0000, 0x3_1000),
        "non-global flush keeps G"
    );
    g.vcpu.flush_tlb(true);
    assert_eq!(both(&mut g), (0x3_0000, 0x3_1000));

    remap(&g, 0x4_0000);
    g.vcpu.invlpg(Gva(0x40_0000));
    assert_eq!(both(&mut g).0, 0x4_0000, "INVLPG drops a global page");

    remap(&g, 0x5_0000);
    let mut no_pge = ctx;
    no_pge.cr4.remove(Cr4::PGE);
    g.vcpu.set_paging_context(&no_pge).unwrap();
    assert_eq!(both(&mut g), (0x5_0000, 0x5_1000), "CR4 change drops all");
}

/// A memslot change (generation), zap-all, and a memslot delete each drop
/// the TLB; a translation that needs a deleted slot's tables then faults
/// as not present.
#[test]
fn memslot_generation_and_zap_all_drop_the_tlb() {
    let mut g = Guest::new();
    let pte = g.tables.map(0x40_0000, 0x1_0000, P | W);
    let read = sup(AccessKind::Read);
    assert_eq!(g.gpa(0x40_0000, read), Ok(0x1_0000));

    g.tables.write(pte, 0x2_0000 | P | W);
    add_ram(
        &g.vm.backend,
        leak_ram(PAGE),
        1,
        0x100_0000,
        MemslotFlags::empty(),
    )
    .unwrap();
    assert_eq!(g.gpa(0x40_0000, read), Ok(0x2_0000), "a new generation");

    g.tables.write(pte, 0x3_0000 | P | W);
    g.vm.backend.zap_all();
    assert_eq!(g.gpa(0x40_0000, read), Ok(0x3_0000), "zap-all");

    g.tables.write(pte, 0x4_0000 | P | W);
    let flushes = g.vm.stat("tlb_flushes");
    g.vm.backend.delete_memslot(SlotId(1)).unwrap();
    assert_eq!(g.vcpu.prepare_entry(), Ok(RootLoad::default()));
    assert_eq!(g.vm.stat("tlb_flushes"), flushes + 1, "flushed at entry");
    g.vcpu.exit_guest();
    assert_eq!(g.gpa(0x40_0000, read), Ok(0x4_0000));

    g.vm.backend.delete_memslot(SlotId(0)).unwrap();
    let f = fault(g.gpa(0x40_0000, read).unwrap_err());
    assert_eq!(f.unbacked_table, Some(Gpa(g.tables.cr3)));
}

/// A cached translation never skips setting A or D: the first write
/// through a translation cached by a read walks again to set D in the
/// guest's PTE; later writes hit. Debug translations change no bit and
/// fill nothing.
#[test]
fn dirty_bit_is_set_by_the_first_write_even_after_a_cached_read() {
    let mut g = Guest::new();
    let pte = g.tables.map(0x40_0000, 0x1_0000, P | W);
    let pde = g.tables.entry(0x40_0000, 2);
    let read = sup(AccessKind::Read);
    let write = sup(AccessKind::Write);

    assert_eq!(g.gpa(0x40_0000, read), Ok(0x1_0000));
    assert_eq!(g.tables.read(pte) & (A | D), A);
    assert_eq!(g.tables.read(pde) & (A | D), A);
    assert_eq!(g.gpa(0x40_0000, read), Ok(0x1_0000));
    assert_eq!((g.vm.stat("tlb_hits"), g.vm.stat("tlb_misses")), (1, 1));

    // A debugger's write translation: served, but sets no D.
    let peek = g.vcpu.translate(Gva(0x40_0000), 8, write, PEEK).unwrap();
    assert_eq!(peek[0].gpa, Gpa(0x1_0000));
    assert_eq!(g.tables.read(pte) & D, 0);

    assert_eq!(g.gpa(0x40_0000, write), Ok(0x1_0000));
    assert_eq!(g.tables.read(pte) & (A | D), A | D, "the write set D");
    assert_eq!(g.tables.read(pde) & D, 0, "D only on the leaf");
    let misses = g.vm.stat("tlb_misses");
    assert_eq!(g.gpa(0x40_0000, write), Ok(0x1_0000));
    assert_eq!(g.vm.stat("tlb_misses"), misses, "the dirty entry hits");

    // The guest cleans the page (clears D) and invalidates: the next write
    // must set D again.
    g.tables.write(pte, 0x1_0000 | P | W | A);
    g.vcpu.invlpg(Gva(0x40_0000));
    assert_eq!(g.gpa(0x40_0000, read), Ok(0x1_0000));
    assert_eq!(g.gpa(0x40_0000, write), Ok(0x1_0000));
    assert_eq!(g.tables.read(pte) & D, D);

    // A debug translation of an untouched page sets no A anywhere.
    let fresh = g.tables.map(0x60_0000, 0x2_0000, P | W);
    let pde2 = g.tables.entry(0x60_0000, 2);
    g.vcpu.translate(Gva(0x60_0000), 1, read, PEEK).unwrap();
    assert_eq!(g.tables.read(fresh) & A, 0);
    assert_eq!(g.tables.read(pde2) & A, 0);
}

/// A hit needs that very access to have been allowed: a cached user read
/// does not let a user write through, and a permission upgrade the guest
/// made without INVLPG (Linux's lazy upgrade) is seen at once, because an
/// access the entry did not allow always walks.
#[test]
fn hits_are_checked_against_the_cached_rights() {
    let mut g = Guest::new();
    let pte = g.tables.map(0x40_0000, 0x1_0000, P | U);
    assert_eq!(g.gpa(0x40_0000, user(AccessKind::Read)), Ok(0x1_0000));
    for _ in 0..2 {
        let f = fault(g.gpa(0x40_0000, user(AccessKind::Write)).unwrap_err());
        assert_eq!(
            f.error_code,
            PfErrorCode::PRESENT | PfErrorCode::WRITE | PfErrorCode::USER
        );
    }
    g.tables.write(pte, 0x1_0000 | P | U | W | A);
    assert_eq!(g.gpa(0x40_0000, user(AccessKind::Write)), Ok(0x1_0000));
    assert_eq!(g.tables.read(pte) & D, D);
}

/// INVLPG of any address inside a 2 MiB page drops every 4 KiB piece of
/// it that the TLB holds.
#[test]
fn invlpg_inside_a_large_page_drops_all_of_it() {
    let mut g = Guest::new();
    let pde = g.tables.map_2m(0x60_0000, 0x4000_0000, P | W);
    let read = sup(AccessKind::Read);
    assert_eq!(g.gpa(0x60_0123, read), Ok(0x4000_0123));
    assert_eq!(g.gpa(0x7f_f123, read), Ok(0x401f_f123));
    g.tables.write(pde, 0x4020_0000 | P | W | 0x80);
    assert_eq!(g.gpa(0x7f_f123, read), Ok(0x401f_f123), "stale");
    g.vcpu.invlpg(Gva(0x6a_b000));
    assert_eq!(g.gpa(0x60_0123, read), Ok(0x4020_0123));
    assert_eq!(g.gpa(0x7f_f123, read), Ok(0x403f_f123));
}

/// With the TLB off every translation walks (counted as a miss, so a bench
/// compares like with like), so an edit is seen at once.
#[test]
fn tlb_off_walks_every_time() {
    let mut config = EptConfig::default();
    config.tlb_entries = 0;
    let mut g = Guest::with_config(config);
    let pte = g.tables.map(0x40_0000, 0x1_0000, P | W);
    assert_eq!(g.gpa(0x40_0000, sup(AccessKind::Read)), Ok(0x1_0000));
    g.tables.write(pte, 0x2_0000 | P | W);
    assert_eq!(g.gpa(0x40_0000, sup(AccessKind::Read)), Ok(0x2_0000));
    assert_eq!(
        (g.vm.stat("tlb_hits"), g.vm.stat("tlb_misses")),
        (0, 2),
        "every page walked, as misses do"
    );
}

/// Without paging a linear address is the physical one (low 32 bits).
#[test]
fn no_paging_is_identity() {
    let vm = Vm::new();
    let mut vcpu = vm.vcpu(0);
    assert_eq!(*vcpu.paging_context(), PagingContext::default());
    let segs = vcpu
        .translate(Gva(0x1_2345_6789), 1, sup(AccessKind::Write), AD)
        .unwrap();
    assert_eq!(segs[0].gpa, Gpa(0x2345_6789));
}

/// An intercepted #PF is reflected to the guest unchanged, and the TLB
/// entry for the address goes, as the CPU drops it when it faults.
#[test]
fn intercepted_page_fault_is_reflected() {
    let mut g = Guest::new();
    let pte = g.tables.map(0x40_0000, 0x1_0000, P | W);
    assert_eq!(g.gpa(0x40_0000, sup(AccessKind::Read)), Ok(0x1_0000));
    g.tables.write(pte, 0x2_0000 | P | W);
    let code = PfErrorCode::PRESENT | PfErrorCode::WRITE;
    assert_eq!(
        g.vcpu.handle_page_fault(Gva(0x40_0123), code),
        Ok(FaultOutcome::InjectPageFault {
            error_code: code,
            cr2: Gva(0x40_0123)
        })
    );
    assert_eq!(g.gpa(0x40_0000, sup(AccessKind::Read)), Ok(0x2_0000));
    assert_eq!(g.vm.stat("page_faults_reflected"), 1);
}

/// The paging context is validated before it is loaded; EPT never hands
/// the hardware a root of its own.
#[test]
fn paging_context_is_validated_and_loads_no_root() {
    let mut g = Guest::new();
    let good = *g.vcpu.paging_context();
    let mut bad = good;
    bad.cpl = 4;
    assert_eq!(
        g.vcpu.set_paging_context(&bad),
        Err(VcpuError::Context(ContextError::Cpl(4)))
    );
    assert_eq!(*g.vcpu.paging_context(), good, "the old context stays");
    assert_eq!(g.vcpu.prepare_entry(), Ok(RootLoad::default()));
}

/// Page tables in a READONLY slot can be walked, but the walk cannot set
/// A there, so the access faults as the reference walker says.
#[test]
fn tables_in_a_read_only_slot() {
    let mut g = Guest::new();
    g.tables.map(0x40_0000, 0x1_0000, P | W | A | D);
    let slot = g.vm.backend.memslots()[0];
    let read = sup(AccessKind::Read);
    assert_eq!(g.gpa(0x40_0000, read), Ok(0x1_0000), "sets A everywhere");
    g.vcpu.flush_tlb(true);
    set_slot(&g.vm.backend, {
        let mut m = slot;
        m.flags = MemslotFlags::READONLY;
        m
    })
    .unwrap();
    assert_eq!(
        g.gpa(0x40_0000, read),
        Ok(0x1_0000),
        "A already set: no write"
    );
    g.tables.map(0x40_1000, 0x1_1000, P | W);
    g.vcpu.invlpg(Gva(0x40_1000));
    let f = fault(g.gpa(0x40_1000, read).unwrap_err());
    assert!(f.unbacked_table.is_some(), "{f:?}");
}

/// vCPU threads translate while another thread churns an unrelated
/// memslot (new generations, table swaps): every answer stays right.
#[test]
fn translation_under_memslot_churn() {
    let g = Guest::new();
    let mut tables = g.tables;
    tables.map(0x40_0000, 0x1_0000, P | W);
    tables.map(0x40_1000, 0x1_1000, P | W);
    let cr3 = tables.cr3;
    let backend = &g.vm.backend;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for id in 1..3 {
            let mut vcpu = g.vm.vcpu(id);
            vcpu.set_paging_context(&ctx4(cr3)).unwrap();
            let done = &done;
            s.spawn(move || {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let segs = vcpu
                        .translate(Gva(0x40_0ff8), 16, sup(AccessKind::Write), AD)
                        .unwrap();
                    assert_eq!((segs[0].gpa, segs[1].gpa), (Gpa(0x1_0ff8), Gpa(0x1_1000)));
                    vcpu.prepare_entry().unwrap();
                    vcpu.exit_guest();
                }
            });
        }
        let ram = leak_ram(PAGE);
        for _ in 0..200 {
            add_ram(backend, ram, 1, 0x100_0000, MemslotFlags::empty()).unwrap();
            backend.delete_memslot(SlotId(1)).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    assert!(g.vm.stat("tlb_flushes") > 0);
}
