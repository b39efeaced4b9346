//! Fuzzes the reference walker with arbitrary tables, contexts and accesses.
//!
//! Checks properties that hold whatever the input: no panic; a translation
//! never grants an access its own rights forbid; a repeated walk without
//! A/D updates lands on the same address; a successful walk leaves A set on
//! every level (D on a written leaf); a fault leaves memory untouched;
//! error codes are well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmu_api::paging::{
    Access, AccessKind, AccessMode, CpuFeatures, Cr0, Cr4, Efer, GuestPhysMemory, PagingContext,
    PfErrorCode, SparseMemory, WalkError, WalkOptions, walk, walk_with,
};
use mmu_api::{Gfn, Gpa, Gva};

/// Frames 0..8 hold the tables; entries point among them most of the time.
const FRAMES: u64 = 8;

fn le_u64(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 32 {
        return;
    }
    let ctl = le_u64(data, 0);
    let gva = Gva(le_u64(data, 8));
    let mut ctx = PagingContext {
        cr0: Cr0::PE | Cr0::PG,
        cr3: (ctl & 7) << 12,
        cr4: Cr4::empty(),
        efer: Efer::empty(),
        cpl: ((ctl >> 3) & 3) as u8,
        eflags_ac: ctl & (1 << 5) != 0,
        pkru: (ctl >> 32) as u32,
        maxphyaddr: 32 + ((ctl >> 6) % 21) as u8,
        features: CpuFeatures::from_bits_truncate((ctl >> 11) as u32),
    };
    let bit = |n: u32| ctl & (1 << n) != 0;
    for (n, flag) in [
        (19, Cr4::PAE),
        (20, Cr4::PSE),
        (21, Cr4::SMEP),
        (22, Cr4::SMAP),
        (23, Cr4::PKE),
        (24, Cr4::LA57),
        (25, Cr4::PGE),
    ] {
        if bit(n) {
            ctx.cr4 |= flag;
        }
    }
    if bit(26) {
        ctx.cr0 |= Cr0::WP;
    }
    if bit(27) {
        ctx.efer |= Efer::NXE;
    }
    if bit(28) && ctx.cr4.contains(Cr4::PAE) {
        ctx.efer |= Efer::LME | Efer::LMA;
    }
    if ctx.validate().is_err() {
        return;
    }
    let kind = match (ctl >> 29) % 3 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    };
    let mode = match (ctl >> 31) & 1 {
        0 if ctx.cpl == 3 => AccessMode::User,
        0 => AccessMode::Supervisor,
        _ => AccessMode::ImplicitSupervisor,
    };
    let access = Access { kind, mode };

    let mem = SparseMemory::new();
    for f in 0..FRAMES {
        mem.add_frame(Gfn(f));
    }
    // The rest of the input fills table words, spread over the frames.
    for chunk in data[16..].chunks(10) {
        if chunk.len() < 10 {
            break;
        }
        let slot = u64::from(u16::from_le_bytes([chunk[0], chunk[1]])) % (FRAMES * 512);
        let value = le_u64(chunk, 2);
        mem.write_u64(Gpa(slot * 8), value)
            .expect("frame is backed");
    }
    let snapshot: Vec<u64> = (0..FRAMES * 512)
        .map(|w| mem.read_u64(Gpa(w * 8)).expect("backed"))
        .collect();

    match walk(&ctx, &mem, gva, access) {
        Ok(t) => {
            let r = t.rights;
            match access.mode {
                AccessMode::User => {
                    assert!(r.user, "user access through a supervisor walk");
                    assert!(
                        !access.is_write() || r.write,
                        "user write through read-only walk"
                    );
                    assert!(!access.is_fetch() || r.exec, "user fetch through XD walk");
                }
                _ => {
                    assert!(!access.is_fetch() || r.exec, "fetch through XD walk");
                    if access.is_write() && ctx.cr0.contains(Cr0::WP) {
                        assert!(r.write, "supervisor write to read-only with WP");
                    }
                }
            }
            let again = walk_with(
                &ctx,
                &mem,
                gva,
                access,
                WalkOptions {
                    set_accessed_dirty: false,
                },
            )
            .expect("a successful walk repeats");
            assert_eq!(again.gpa, t.gpa);
            for step in again.steps() {
                let is_pae_pdpte = ctx.mode() == mmu_api::PagingMode::Pae && step.level == 3;
                if !is_pae_pdpte {
                    assert!(
                        step.entry.raw() & 0x20 != 0,
                        "A bit missing at level {}",
                        step.level
                    );
                }
            }
            if access.is_write() {
                let leaf = again.leaf().expect("paging is on");
                assert!(
                    leaf.entry.raw() & 0x40 != 0,
                    "D bit missing on written leaf"
                );
            }
        }
        Err(WalkError::PageFault(pf)) => {
            let e = pf.error_code;
            assert!(!e.contains(PfErrorCode::RSVD) || e.contains(PfErrorCode::PRESENT));
            assert_eq!(e.contains(PfErrorCode::WRITE), access.is_write());
            assert_eq!(
                e.contains(PfErrorCode::USER),
                access.mode == AccessMode::User
            );
            for (w, &old) in snapshot.iter().enumerate() {
                assert_eq!(
                    mem.read_u64(Gpa(w as u64 * 8)).expect("backed"),
                    old,
                    "fault changed memory"
                );
            }
        }
        Err(_) => {}
    }
});
