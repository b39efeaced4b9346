//! The per-vCPU fault log the kernel keeps for faults delivered to the
//! guest ([`abi::action::DELIVER`]), read by the host.
//!
//! It is what a guest observes of its faults: the differential runner
//! compares it between backends entry by entry.

use std::fmt;

use super::abi::{self, percpu};

/// One fault the kernel logged: what a guest #PF handler would see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FaultRecord {
    /// The exception vector (14 for #PF).
    pub vector: u8,
    /// The error code the guest saw.
    pub error_code: u64,
    /// CR2 when the fault was delivered (the faulting address of a #PF).
    pub cr2: u64,
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} error code {:#x} cr2 {:#x}",
            crate::x86::vector_name(self.vector),
            self.error_code,
            self.cr2
        )
    }
}

/// A vCPU's fault log: how many faults were delivered, and the first
/// [`abi::FAULT_CAPACITY`] of them (per run).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FaultLog {
    /// Faults delivered.
    pub count: u64,
    /// The logged ones, in order (fewer than `count` when the log filled).
    pub entries: Vec<FaultRecord>,
}

impl FaultLog {
    /// Parses a kernel page (its 512 words, as the vCPU left it).
    pub fn from_kernel_page(words: &[u64]) -> FaultLog {
        let word = |offset: u64| words.get((offset / 8) as usize).copied().unwrap_or(0);
        let count = word(percpu::FAULT_COUNT);
        let logged = count.min(abi::FAULT_CAPACITY);
        let entries = (0..logged)
            .map(|i| {
                let at = percpu::FAULT_LOG + 8 * abi::FAULT_ENTRY_WORDS * i;
                FaultRecord {
                    vector: word(at) as u8,
                    error_code: word(at + 8),
                    cr2: word(at + 16),
                }
            })
            .collect();
        FaultLog { count, entries }
    }

    /// Faults counted but not logged (the log was full).
    pub fn lost(&self) -> u64 {
        self.count - self.entries.len() as u64
    }

    /// Appends the log of a later run of the same vCPU.
    pub fn append(&mut self, later: FaultLog) {
        self.count += later.count;
        self.entries.extend(later.entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_parse_and_count_what_did_not_fit() {
        let mut page = vec![0u64; 512];
        page[(percpu::FAULT_COUNT / 8) as usize] = 2;
        let first = (percpu::FAULT_LOG / 8) as usize;
        page[first..first + 6].copy_from_slice(&[14, 7, 0x1000, 14, 4, 0x2008]);
        let log = FaultLog::from_kernel_page(&page);
        assert_eq!(log.count, 2);
        assert_eq!(
            log.entries,
            [
                FaultRecord {
                    vector: 14,
                    error_code: 7,
                    cr2: 0x1000
                },
                FaultRecord {
                    vector: 14,
                    error_code: 4,
                    cr2: 0x2008
                }
            ]
        );
        assert_eq!(log.lost(), 0);
        assert_eq!(log.entries[0].to_string(), "#PF error code 0x7 cr2 0x1000");

        page[(percpu::FAULT_COUNT / 8) as usize] = abi::FAULT_CAPACITY + 5;
        let full = FaultLog::from_kernel_page(&page);
        assert_eq!(full.entries.len() as u64, abi::FAULT_CAPACITY);
        assert_eq!(full.lost(), 5);
        // The last entry ends exactly at the end of the page.
        let end = percpu::FAULT_LOG + 8 * abi::FAULT_ENTRY_WORDS * abi::FAULT_CAPACITY;
        assert!(end <= crate::layout::PAGE_SIZE);
        assert!(end + 8 * abi::FAULT_ENTRY_WORDS > crate::layout::PAGE_SIZE);

        let mut both = log.clone();
        both.append(full);
        assert_eq!(both.count, abi::FAULT_CAPACITY + 7);
        assert_eq!(both.lost(), 5);
    }
}
