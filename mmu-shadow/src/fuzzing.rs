//! Internals exposed for the fuzz targets in `fuzz/` (`mmio_spte`), so they
//! can check the SPTE encodings directly. Not part of the API: hidden from
//! the docs, no SemVer promise, may change with any release.

use mmu_api::{Gfn, Hpa, Rights};

use crate::spte::{Spte, mmio};

/// Generation bits an MMIO SPTE can hold at most.
pub const MMIO_MAX_GEN_BITS: u8 = mmio::MAX_GEN_BITS;

/// The reserved address bit that marks an MMIO SPTE (bit 51).
pub const MMIO_MARKER: u64 = mmio::MARKER;

/// The MMIO SPTE for `gfn` with `rights`, tagged with the low `bits` bits of
/// memslot generation `generation` (what the fault path installs).
pub fn mmio_encode(gfn: Gfn, generation: u64, bits: u8, rights: Rights) -> u64 {
    mmio::encode(gfn, generation, bits, rights)
}

/// The gfn, generation tag and rights of an MMIO SPTE.
pub fn mmio_decode(spte: u64) -> (Gfn, u64, Rights) {
    mmio::decode(spte)
}

/// True if the MMU takes `spte` for an MMIO SPTE.
pub fn is_mmio(spte: u64) -> bool {
    mmio::is_mmio(spte)
}

/// True if an MMIO SPTE can name `gfn` (the fault path caches MMIO answers
/// only for such gfns).
pub fn mmio_fits(gfn: Gfn) -> bool {
    mmio::fits(gfn)
}

/// The tag generation `generation` gets in `bits` bits.
pub fn mmio_tag(generation: u64, bits: u8) -> u64 {
    mmio::tag(generation, bits)
}

/// A 4 KiB leaf mapping `frame` with the given rights and protection key,
/// as the fault path and prefetch build it.
pub fn memory_leaf(frame: Hpa, write: bool, user: bool, exec: bool, pkey: Option<u8>) -> u64 {
    let spte = Spte::leaf(frame, write, user, exec);
    pkey.map_or(spte, |k| spte.with_pkey(k)).0
}

/// The same leaf with write access removed (write protection, dirty
/// logging, a harvest).
pub fn write_protected(spte: u64) -> u64 {
    Spte(spte).write_protected().0
}

/// A link to a lower-level shadow table at `child`.
pub fn link(child: Hpa) -> u64 {
    Spte::link(child).0
}
