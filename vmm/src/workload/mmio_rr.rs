//! `mmio-rr`: each vCPU makes `ops` request/response transactions (1000
//! by default) on an MMIO device of its own, from CPL3: it writes a
//! request id to the doorbell, then polls the status register until it
//! reads [`READY`](rr_reg::READY) with the response, and reports the
//! wrapping sum of the responses, the transactions and the polls.
//!
//! The device ([`RrDevice`]) sits in a page no memslot covers
//! ([`mmio_page`]), mapped at the start of the vCPU's window, so every
//! access is an MMIO exit. The model ([`rr_model`]) checks the three
//! reports; `run` also checks the device's counters ([`RrCounters`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mmu_api::Gpa;
use mmu_integration::BusError;

use super::{
    DATA_FLAGS, Expect, Params, Plan, PlanError, Shape, SpaceBuilder, VcpuPlan, Workload, build,
    mmio_page, report, vcpu_seed,
};
use crate::kit::abi::tag;
use crate::kit::workloads::{self, rr_reg};
use crate::layout::PAGE_SIZE;
use crate::mmu::Devices;
use crate::vm::{VcpuArgs, Vm};

/// Plans `mmio-rr`.
pub(super) fn plan(vm: &Vm, params: &Params) -> Result<Plan, PlanError> {
    let transactions = params.ops.unwrap_or(1000);
    let shape = Shape {
        program: workloads::mmio_rr()?,
        parameters: vec![("transactions", transactions)],
        table_frames: SpaceBuilder::frames_for(1, vm.layout().levels()),
        data_pages: 1,
    };
    build(vm, Workload::MmioRr, params, shape, |v| {
        let root = v.space.fork_identity()?;
        v.space
            .map_4k(root, v.base, mmio_page(v.index), DATA_FLAGS)?;
        let first_id = first_request(params.seed, v.index);
        let (checksum, polls) = rr_model(first_id, transactions);
        Ok(VcpuPlan {
            expect: Expect {
                reports: vec![
                    report(tag::CHECKSUM, checksum),
                    report(tag::TRANSACTIONS, transactions),
                    report(tag::POLLS, polls),
                ],
                ..Expect::default()
            },
            roots: vec![root],
            rounds: vec![VcpuArgs([root, transactions, v.base, first_id, 0, 0])],
        })
    })
}

/// The first request id vCPU `index` sends.
fn first_request(seed: u64, index: usize) -> u64 {
    (vcpu_seed(seed, index) & 0xffff_ffff) | ((index as u64) << 40)
}

/// The checksum and status reads of `transactions` transactions from
/// request `first_id` on.
pub fn rr_model(first_id: u64, transactions: u64) -> (u64, u64) {
    (0..transactions).fold((0u64, 0u64), |(sum, polls), t| {
        let id = first_id.wrapping_add(t);
        (
            sum.wrapping_add(workloads::rr_response(id)),
            polls + workloads::rr_busy_reads(id) + 1,
        )
    })
}

/// The counters of one vCPU's `mmio-rr` device.
#[derive(Debug, Default)]
pub struct RrCounters {
    /// Requests written to the doorbell.
    pub doorbells: AtomicU64,
    /// Status reads.
    pub status_reads: AtomicU64,
    /// Status reads with no request pending (a guest that lost track).
    pub idle_reads: AtomicU64,
}

impl RrCounters {
    /// (doorbells, status reads, idle reads) now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.doorbells.load(Ordering::Relaxed),
            self.status_reads.load(Ordering::Relaxed),
            self.idle_reads.load(Ordering::Relaxed),
        )
    }
}

/// The `mmio-rr` device of one vCPU: a doorbell and a status register
/// ([`rr_reg`]) in one page no memslot covers. A doorbell write starts a
/// request; the status reads "busy" (0) [`rr_busy_reads`](workloads::rr_busy_reads)
/// times, then [`READY`](rr_reg::READY) | [`rr_response`](workloads::rr_response)
/// once.
#[derive(Debug)]
pub struct RrDevice {
    page: u64,
    pending: Option<(u64, u64)>,
    counters: Arc<RrCounters>,
}

impl RrDevice {
    /// The device at guest-physical page `page`, counting into `counters`.
    pub fn new(page: u64, counters: Arc<RrCounters>) -> Self {
        RrDevice {
            page,
            pending: None,
            counters,
        }
    }

    /// The register at `gpa` for an 8-byte access, or None.
    fn register(&self, gpa: Gpa, len: usize) -> Option<u64> {
        let offset = gpa.raw().checked_sub(self.page)?;
        (offset < PAGE_SIZE && len == 8).then_some(offset)
    }
}

impl Devices for RrDevice {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Result<(), BusError> {
        if self.register(gpa, data.len()) != Some(rr_reg::STATUS) {
            return Err(BusError::NoDevice(gpa));
        }
        self.counters.status_reads.fetch_add(1, Ordering::Relaxed);
        let value = match self.pending {
            Some((id, 0)) => {
                self.pending = None;
                rr_reg::READY | workloads::rr_response(id)
            }
            Some((id, busy)) => {
                self.pending = Some((id, busy - 1));
                0
            }
            None => {
                self.counters.idle_reads.fetch_add(1, Ordering::Relaxed);
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Result<(), BusError> {
        if self.register(gpa, data.len()) != Some(rr_reg::DOORBELL) {
            return Err(BusError::NoDevice(gpa));
        }
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(data);
        let id = u64::from_le_bytes(bytes);
        self.counters.doorbells.fetch_add(1, Ordering::Relaxed);
        self.pending = Some((id, workloads::rr_busy_reads(id)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rr_device_answers_after_its_busy_reads() {
        let counters = Arc::new(RrCounters::default());
        let page = mmio_page(0);
        let mut device = RrDevice::new(page, Arc::clone(&counters));
        let id = 5u64; // two busy reads
        device
            .mmio_write(Gpa(page + rr_reg::DOORBELL), &id.to_le_bytes())
            .unwrap();
        let mut reads = Vec::new();
        for _ in 0..4 {
            let mut data = [0u8; 8];
            device
                .mmio_read(Gpa(page + rr_reg::STATUS), &mut data)
                .unwrap();
            reads.push(u64::from_le_bytes(data));
        }
        assert_eq!(
            reads,
            [
                0,
                0,
                rr_reg::READY | workloads::rr_response(5),
                0 // idle
            ]
        );
        assert_eq!(counters.snapshot(), (1, 4, 1));
        // Wrong registers and sizes are bus errors, not panics.
        assert!(device.mmio_read(Gpa(page), &mut [0u8; 8]).is_err());
        assert!(
            device
                .mmio_read(Gpa(page + rr_reg::STATUS), &mut [0u8; 4])
                .is_err()
        );
        assert!(device.mmio_write(Gpa(page + 16), &[0u8; 8]).is_err());
        assert!(device.mmio_write(Gpa(page - 8), &[0u8; 8]).is_err());
        // The model counts the same reads.
        assert_eq!(rr_model(5, 1), (workloads::rr_response(5), 3));
        let (sum, polls) = rr_model(3, 3);
        assert_eq!(polls, 1 + 2 + 3);
        assert_eq!(
            sum,
            workloads::rr_response(3)
                .wrapping_add(workloads::rr_response(4))
                .wrapping_add(workloads::rr_response(5))
        );
    }
}
