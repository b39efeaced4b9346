//! What a guest can observe after a run, collected by the host so that two
//! runs (under two MMU backends) can be compared: its memory, its page
//! tables and their A/D bits, and each vCPU's reports and fault log.
//!
//! Memory is summarised by a hash per page of the data area; the words of
//! page-table frames are hashed with A and D masked out, because those
//! bits are compared one entry at a time instead. The tables are the
//! frames reachable from every root the workload used.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::kit::FaultLog;
use crate::layout::{PAGE_SIZE, pte};
use crate::vcpu::{Report, VcpuOutcome};
use crate::vm::Vm;

/// A and D.
const AD: u64 = pte::A | pte::D;
/// PS: a large page at level 2 or 3.
const PS: u64 = 1 << 7;

/// One present page-table entry and its A/D bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdEntry {
    /// Where the entry lives.
    pub gpa: u64,
    /// Its level (1 = PTE).
    pub level: u8,
    /// Bit 0: accessed; bit 1: dirty.
    pub bits: u8,
}

impl AdEntry {
    /// The bits as the guest would name them: `--`, `A-`, `AD`, `-D`.
    pub fn flags(&self) -> &'static str {
        match self.bits & 3 {
            0 => "--",
            1 => "A-",
            2 => "-D",
            _ => "AD",
        }
    }
}

/// What one vCPU observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuObservation {
    /// How its (last) run ended.
    pub outcome: VcpuOutcome,
    /// Every value it reported, in order.
    pub reports: Vec<Report>,
    /// Every fault delivered to it.
    pub faults: FaultLog,
}

/// Everything the guest can observe after a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The first page of the data area.
    pub data_base: u64,
    /// A hash of each page of the data area (A/D masked in table frames).
    pub data_pages: Vec<u64>,
    /// Every table frame reachable from the roots, with the hash of its
    /// words with A/D masked.
    pub tables: BTreeMap<u64, u64>,
    /// Every present entry of those tables, by address.
    pub ad: Vec<AdEntry>,
    /// The roots the tables were walked from.
    pub roots: Vec<u64>,
    /// Per vCPU.
    pub vcpus: Vec<VcpuObservation>,
}

/// A 64-bit hash of words (FNV-1a-like, a word at a time).
#[derive(Clone, Copy, Debug)]
pub(crate) struct WordHash(u64);

impl WordHash {
    pub(crate) fn new() -> Self {
        WordHash(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(0x0000_0100_0000_01b3);
        self.0 ^= self.0 >> 29;
    }

    pub(crate) fn value(self) -> u64 {
        self.0
    }
}

impl Observation {
    /// The checksum of the data area: a hash of the page hashes.
    pub fn data_hash(&self) -> u64 {
        let mut h = WordHash::new();
        for page in &self.data_pages {
            h.add(*page);
        }
        h.value()
    }

    /// The checksum of the page tables (A/D masked): a hash of (frame,
    /// hash) pairs.
    pub fn tables_hash(&self) -> u64 {
        let mut h = WordHash::new();
        for (frame, hash) in &self.tables {
            h.add(*frame);
            h.add(*hash);
        }
        h.value()
    }

    /// Faults delivered, over every vCPU.
    pub fn faults(&self) -> u64 {
        self.vcpus.iter().map(|v| v.faults.count).sum()
    }
}

fn read_frame(memory: &GuestMemoryMmap, frame: u64) -> Option<Vec<u64>> {
    let mut bytes = vec![0u8; PAGE_SIZE as usize];
    memory.read_slice(&mut bytes, GuestAddress(frame)).ok()?;
    Some(words(&bytes))
}

fn words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn hash_words(words: &[u64], mask: u64) -> u64 {
    let mut h = WordHash::new();
    for w in words {
        h.add(w & mask);
    }
    h.value()
}

/// Collects what the guest of `vm` can observe: its data area, the tables
/// reachable from `roots` (`levels`-level paging), and `vcpus`.
pub fn observe(vm: &Vm, roots: &[u64], vcpus: Vec<VcpuObservation>) -> Observation {
    let memory = vm.memory();
    let levels = vm.layout().levels();
    let address_mask = pte::ADDR & ((1u64 << vm.cpu().maxphyaddr) - 1);
    let mut tables = BTreeMap::new();
    let mut ad = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for &root in roots {
        let mut stack = vec![(root & address_mask, levels)];
        while let Some((frame, level)) = stack.pop() {
            if !seen.insert((frame, level)) {
                continue;
            }
            let Some(entries) = read_frame(memory, frame) else {
                continue;
            };
            tables.insert(frame, hash_words(&entries, !AD));
            for (i, entry) in entries.iter().enumerate() {
                if entry & pte::P == 0 {
                    continue;
                }
                let gpa = frame + 8 * i as u64;
                ad.insert(
                    gpa,
                    AdEntry {
                        gpa,
                        level,
                        bits: ((entry & AD) >> 5) as u8,
                    },
                );
                let leaf = level == 1 || (level <= 3 && entry & PS != 0);
                if !leaf {
                    stack.push((entry & address_mask, level - 1));
                }
            }
        }
    }
    let data = vm.layout().data();
    let mut data_pages = Vec::with_capacity(((data.end - data.start) / PAGE_SIZE) as usize);
    const CHUNK: u64 = 1 << 20;
    let mut bytes = vec![0u8; CHUNK as usize];
    let mut at = data.start;
    while at < data.end {
        let len = CHUNK.min(data.end - at);
        let buf = &mut bytes[..len as usize];
        if memory.read_slice(buf, GuestAddress(at)).is_err() {
            buf.fill(0);
        }
        for (i, page) in buf.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let frame = at + i as u64 * PAGE_SIZE;
            let mask = if tables.contains_key(&frame) {
                !AD
            } else {
                u64::MAX
            };
            data_pages.push(hash_words(&words(page), mask));
        }
        at += len;
    }
    Observation {
        data_base: data.start,
        data_pages,
        tables,
        ad: ad.into_values().collect(),
        roots: roots.to_vec(),
        vcpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_mask_what_they_should() {
        let a = hash_words(&[0x1000 | pte::P | pte::A], !AD);
        let b = hash_words(&[0x1000 | pte::P | pte::D], !AD);
        assert_eq!(a, b);
        assert_ne!(a, hash_words(&[0x2000 | pte::P], !AD));
        assert_ne!(hash_words(&[1, 2], u64::MAX), hash_words(&[2, 1], u64::MAX));
        let e = AdEntry {
            gpa: 0,
            level: 1,
            bits: 3,
        };
        assert_eq!(e.flags(), "AD");
        assert_eq!(AdEntry { bits: 1, ..e }.flags(), "A-");
        assert_eq!(AdEntry { bits: 0, ..e }.flags(), "--");
    }
}
