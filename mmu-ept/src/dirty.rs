//! The log of pages the VMM itself wrote, kept per LOG_DIRTY memslot.
//!
//! The hypervisor logs guest writes; writes the VMM makes through its own
//! mapping (device emulation, DMA) never reach that log, so the backend
//! keeps them here and merges both at harvest time.

use std::sync::atomic::{AtomicU64, Ordering};

/// A lock-free bitmap of slot-relative pages, in KVM's word layout.
///
/// Marking is a `fetch_or` and harvesting a `swap(0)` per word, so a mark
/// that races with a harvest lands in exactly one of the two harvests that
/// straddle it: none is lost, none is reported twice.
#[derive(Debug)]
pub(crate) struct HostDirtyLog {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl HostDirtyLog {
    /// A clean log for a slot of `pages` pages.
    pub(crate) fn new(pages: u64) -> Self {
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { words, pages }
    }

    /// Marks pages `first..=last` (slot-relative, clamped to the slot).
    pub(crate) fn mark(&self, first: u64, last: u64) {
        if self.pages == 0 || first >= self.pages {
            return;
        }
        let last = last.min(self.pages - 1);
        let mut page = first;
        while page <= last {
            let word = page / 64;
            let lo = page % 64;
            let hi = if last / 64 == word { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            self.words[word as usize].fetch_or(mask, Ordering::AcqRel);
            page = (word + 1) * 64;
        }
    }

    /// Takes the marked pages out of the log, leaving it clean.
    pub(crate) fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_ranges_across_words_and_clamps() {
        let log = HostDirtyLog::new(130);
        log.mark(62, 65);
        log.mark(129, 400);
        log.mark(200, 300); // wholly outside: ignored
        assert_eq!(
            log.take(),
            vec![0b11 << 62, 0b11, 1 << 1],
            "pages 62..=65 and 129"
        );
        assert_eq!(log.take(), vec![0, 0, 0], "a harvest leaves it clean");
    }

    #[test]
    fn whole_words_and_single_pages() {
        let log = HostDirtyLog::new(192);
        log.mark(0, 191);
        assert_eq!(log.take(), vec![u64::MAX; 3]);
        log.mark(64, 64);
        assert_eq!(log.take(), vec![0, 1, 0]);
        let empty = HostDirtyLog::new(0);
        empty.mark(0, 0);
        assert!(empty.take().is_empty());
    }

    #[test]
    fn concurrent_marks_survive_concurrent_harvests() {
        let log = HostDirtyLog::new(4096);
        let mut harvested = vec![0u64; 64];
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                for page in 0..4096 {
                    log.mark(page, page);
                }
            });
            while !writer.is_finished() {
                for (acc, w) in harvested.iter_mut().zip(log.take()) {
                    assert_eq!(*acc & w, 0, "a page was reported twice");
                    *acc |= w;
                }
            }
        });
        for (acc, w) in harvested.iter_mut().zip(log.take()) {
            *acc |= w;
        }
        assert_eq!(harvested, vec![u64::MAX; 64], "every mark was harvested");
    }
}
