//! Host coherence: on a host whose hypervisor shadows the pool itself (PVM,
//! modelled by `ShadowingHost`), every SPTE the VMM changes must be replayed
//! before the vCPU runs again. Under `Coherence::Replay` it is; under
//! `Coherence::Direct` the vCPU keeps running on what the host cached.

mod common;

use common::{GuestRam, add_slot, config};
use mmu_api::{
    AccessMode, Gpa, Gva, MemslotFlags, MmuBackend, MmuVcpu, PagingContext, PagingMode, SlotId,
    VcpuId,
};
use mmu_shadow::soft::{ShadowingHost, SoftOutcome, SoftVcpu};
use mmu_shadow::{Coherence, ShadowBackend};

const PWU: u64 = 7;
const WINDOW: Gva = Gva(0xffff_8000_0000_0000);

fn setup(coherence: Coherence) -> (GuestRam, ShadowBackend, SoftVcpu) {
    let mut ram = GuestRam::new(64);
    ram.set_word(1, 0, 0x2000 | PWU);
    ram.set_word(2, 0, 0x3000 | PWU);
    ram.set_word(3, 0, 0x4000 | PWU);
    ram.set_word(4, 1, 0x11_000 | PWU);
    ram.set_word(17, 0, 0x1111);
    ram.set_word(18, 0, 0x2222);
    let b = ShadowBackend::new({
        let mut m = config(None, 0);
        m.coherence = coherence;
        m
    })
    .unwrap();
    add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::empty()));
    let mut cpu = SoftVcpu::with_shadowing_host(&b, VcpuId(0), ShadowingHost::new()).unwrap();
    cpu.load_context(
        &PagingContext::for_mode(
            PagingMode::Level4,
            0x1000,
            40,
            mmu_api::paging::CpuFeatures::all(),
        )
        .unwrap(),
    )
    .unwrap();
    (ram, b, cpu)
}

/// The vCPU reads a mapping; the guest's kernel (through the emulator)
/// remaps it and invalidates it; the next read must see the new page.
fn remap_and_read(coherence: Coherence) -> (SoftOutcome, ShadowBackend) {
    let (_ram, b, mut cpu) = setup(coherence);
    assert_eq!(
        cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap(),
        SoftOutcome::Done(0x1111)
    );
    cpu.mmu()
        .write_guest(Gpa(0x4008), &(0x12_000 | PWU).to_le_bytes())
        .unwrap();
    cpu.invlpg(Gva(0x1000));
    (cpu.read(Gva(0x1000), 8, AccessMode::User).unwrap(), b)
}

#[test]
fn replay_makes_host_changes_visible() {
    let (out, b) = remap_and_read(Coherence::Replay { window: WINDOW });
    assert_eq!(out, SoftOutcome::Done(0x2222));
    let s = b.stats();
    assert!(
        s.get("replays").unwrap() > 0 && s.get("replayed_entries").unwrap() > 0,
        "{s}"
    );
    b.audit().unwrap();
}

#[test]
fn without_replay_a_shadowing_host_runs_stale() {
    let (out, _b) = remap_and_read(Coherence::Direct);
    assert_eq!(
        out,
        SoftOutcome::Done(0x1111),
        "the host still maps the old page"
    );
}

/// Dirty logging needs coherence too: a harvest write-protects pages the
/// host may still hold writable.
#[test]
fn replay_keeps_dirty_logging_complete() {
    for (coherence, complete) in [
        (Coherence::Replay { window: WINDOW }, true),
        (Coherence::Direct, false),
    ] {
        let (ram, b, mut cpu) = setup(coherence);
        add_slot(&b, ram.slot(0, 0, 0, 48, MemslotFlags::LOG_DIRTY));
        cpu.write(Gva(0x1000), 8, 1, AccessMode::User).unwrap();
        assert!(b.get_dirty_log(SlotId(0)).unwrap().is_dirty(17));
        cpu.write(Gva(0x1000), 8, 2, AccessMode::User).unwrap();
        let logged = b.get_dirty_log(SlotId(0)).unwrap().is_dirty(17);
        assert_eq!(logged, complete, "{coherence:?}");
    }
}

#[test]
fn the_window_is_reserved() {
    let (_ram, b, mut cpu) = setup(Coherence::Replay { window: WINDOW });
    // The window is supervisor-only; the guest's user code faults on it and
    // the MMU refuses to map anything of the guest's there.
    assert_eq!(
        cpu.read(Gva(WINDOW.raw() + 0x1000), 8, AccessMode::User)
            .unwrap(),
        SoftOutcome::GeneralProtection
    );
    let s = b.stats();
    assert_eq!(
        s.get("sps_in_use").unwrap(),
        4 + 1,
        "window pages and the root: {s}"
    );
    b.audit().unwrap();
    let bad = ShadowBackend::new({
        let mut m = config(None, 0);
        m.coherence = Coherence::Replay {
            window: Gva(0x1000),
        };
        m
    });
    assert!(bad.is_err());
    let _ = b.memslots();
    let _ = cpu.mmu().id();
}
