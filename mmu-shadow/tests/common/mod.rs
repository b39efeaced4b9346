//! Test support: guest RAM in real host memory, the test configuration,
//! and (in `sequence`) the shadow-vs-reference sequence runner the
//! differential test and the `shadow_ops` fuzz target share.
#![allow(dead_code, unreachable_pub)]

pub mod sequence;

use mmu_api::{
    Gpa, HostBacking, HostVirtAddr, Hpa, Memslot, MemslotFlags, MmuBackend, PAGE_SIZE, SlotId,
};
use mmu_shadow::{ShadowBackend, ShadowConfig};

/// Page-aligned guest RAM owned by the test. It never moves or resizes, so
/// its address stays valid while the backend holds slots into it.
pub struct GuestRam {
    words: Box<[u64]>,
    offset: usize,
    pub pages: u64,
}

/// Where tests pretend the hardware sees RAM page 0.
pub const RAM_HPA: u64 = 0x10_0000_0000;

/// Where the hardware sees the test configuration's shadow pool.
pub const POOL_HPA: u64 = 0x40_0000_0000;

/// Frames in the test configuration's shadow pool.
pub const POOL_PAGES: u32 = 512;

impl GuestRam {
    pub fn new(pages: u64) -> Self {
        let words = vec![0u64; (pages as usize + 1) * 512].into_boxed_slice();
        let addr = words.as_ptr() as usize;
        let offset = (addr.next_multiple_of(4096) - addr) / 8;
        GuestRam {
            words,
            offset,
            pages,
        }
    }

    pub fn host_addr(&self, page: u64) -> HostVirtAddr {
        HostVirtAddr(self.words.as_ptr() as u64 + 8 * (self.offset as u64 + page * 512))
    }

    /// A memslot of `pages` RAM pages starting at RAM page `first`.
    pub fn slot(&self, id: u32, gpa: u64, first: u64, pages: u64, flags: MemslotFlags) -> Memslot {
        assert!(first + pages <= self.pages);
        let backing = HostBacking {
            hpa: Hpa(RAM_HPA + first * PAGE_SIZE),
            host_addr: self.host_addr(first),
        };
        Memslot::new(SlotId(id), Gpa(gpa), pages * PAGE_SIZE, backing, flags)
    }

    /// Word `index` of RAM page `page` (host view).
    pub fn word(&self, page: u64, index: usize) -> u64 {
        let p = (self.host_addr(page).0 as *const u64).wrapping_add(index);
        // SAFETY: `page` < `pages` and `index` < 512 keep `p` inside `words`,
        // which lives as long as `self`; u64 reads of our own buffer.
        unsafe { p.read_volatile() }
    }

    pub fn set_word(&mut self, page: u64, index: usize, value: u64) {
        assert!(page < self.pages && index < 512);
        self.words[self.offset + page as usize * 512 + index] = value;
    }

    pub fn page_words(&self, page: u64) -> &[u64] {
        let start = self.offset + page as usize * 512;
        &self.words[start..start + 512]
    }
}

/// The test configuration: a small pool at a high hardware address.
pub fn config(page_limit: Option<u64>, prefetch: usize) -> ShadowConfig {
    {
        let mut m = ShadowConfig::default();
        m.pool_pages = POOL_PAGES;
        m.pool_hpa = Hpa(POOL_HPA);
        m.page_limit = page_limit;
        m.prefetch = prefetch;
        m.gpa_width = 40;
        m
    }
}

/// A backend with the test configuration.
pub fn backend(page_limit: Option<u64>, prefetch: usize) -> ShadowBackend {
    ShadowBackend::new(config(page_limit, prefetch)).expect("pool")
}

/// Registers `slot` with `backend`.
pub fn add_slot(backend: &ShadowBackend, slot: Memslot) {
    // SAFETY: test slots point into a `GuestRam` the test keeps alive for
    // as long as the backend exists.
    unsafe { backend.set_memslot(slot) }.expect("slot");
}

/// A 4-level guest with CR3 at RAM page 1 whose one page directory (page 3)
/// points to 8 page tables (pages 4..12), each mapping one page: gva
/// `t << 21` reaches RAM page 16 + t. Every address needs its own level-1
/// shadow page, which is what reclaim tests want.
pub fn eight_table_guest(ram: &mut GuestRam) {
    const PWU: u64 = 7;
    ram.set_word(1, 0, 0x2000 | PWU);
    ram.set_word(2, 0, 0x3000 | PWU);
    for t in 0..8u64 {
        ram.set_word(3, t as usize, (0x4000 + 0x1000 * t) | PWU);
        ram.set_word(4 + t, 0, (0x10_000 + 0x1000 * t) | PWU);
    }
}
