//! The KVM side of the benches: guests that touch their memory and wait
//! ([`TouchVm`]), and MMIO request/response guests ([`RrVm`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use mmu_api::{MemslotFlags, SlotId};
use mmu_backends::BackendKind;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{BenchError, Configuration};
use kvm_ioctls::VcpuExit;
use mmu_integration::arena::shared_guest_memory;
use mmu_integration::kvm::Routed;
use mmu_integration::{Action, MmioServiceTimes};
use mmu_vmm::kit::abi::tag;
use mmu_vmm::kit::{Program, Ring, emit};
use mmu_vmm::layout::PAGE_SIZE;
use mmu_vmm::mmu::{Devices, MmuVm, MmuVmConfig};
use mmu_vmm::workload::{self, CHURN_GPA, CHURN_SIZE, CHURN_SLOT, RrCounters, RrDevice, Workload};
use mmu_vmm::{
    ExceptionAction, ExitHandler, GuestException, Kicker, PagingOp, PagingOps, Report, VcpuArgs,
    VcpuContext, VcpuError, VmConfig,
};

/// Most memslots an [`RrVm`] takes (guest RAM is two of them).
pub(crate) const MAX_SLOTS: u32 = 4096;

/// The control block of one vCPU of a [`TouchVm`] guest, in the first
/// page of its slice: the host writes the command, the guest the rest.
mod ctl {
    /// A command number: the guest touches every page once per new value;
    /// `u64::MAX` ends the program.
    pub(super) const COMMAND: u64 = 0;
    /// The last command the guest finished.
    pub(super) const DONE: u64 = 8;
    /// Incremented by every turn of the guest's wait loop at CPL3.
    pub(super) const HEARTBEAT: u64 = 16;
    /// The command that ends the program.
    pub(super) const EXIT: u64 = u64::MAX;
}

/// `touch-wait`: touches every page of its slice from CPL3 when the host
/// gives a new command, and spins at CPL3 in between, counting turns.
///
/// Arguments: RDI = first data page, RSI = pages, RDX = the control
/// block, RCX = seed, R8 = 1 to wait in the host between turns (a REPORT
/// with tag [`WAIT_TAG`], which the host holds until it has news), 0 to
/// spin. Each touch writes `address ^ seed` into the first quadword of
/// each page. Reports the number of touches (tag VALUE).
fn touch_wait() -> Result<Program, mmu_vmm::KitError> {
    Program::assemble("touch-wait", Ring::User, |a| {
        let mut top = a.create_label();
        let mut idle = a.create_label();
        let mut page = a.create_label();
        let mut touched = a.create_label();
        let mut out = a.create_label();
        a.mov(r12, rdi)?;
        a.mov(r13, rsi)?;
        a.mov(r14, rdx)?;
        a.mov(r15, rcx)?;
        a.mov(r9, r8)?; // wait mode
        a.xor(ebp, ebp)?; // last command done
        a.xor(r10d, r10d)?; // touches
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(r14 + ctl::COMMAND as i32))?;
        a.cmp(rax, -1)?;
        a.je(out)?;
        a.cmp(rax, rbp)?;
        a.je(idle)?;
        a.mov(rbp, rax)?;
        a.inc(r10)?;
        a.mov(rbx, r12)?;
        a.mov(rcx, r13)?;
        a.test(rcx, rcx)?;
        a.jz(touched)?;
        a.set_label(&mut page)?;
        a.mov(rdx, rbx)?;
        a.xor(rdx, r15)?;
        a.mov(qword_ptr(rbx), rdx)?;
        a.add(rbx, PAGE_SIZE as i32)?;
        a.dec(rcx)?;
        a.jnz(page)?;
        a.set_label(&mut touched)?;
        a.mov(qword_ptr(r14 + ctl::DONE as i32), rbp)?;
        a.set_label(&mut idle)?;
        a.inc(qword_ptr(r14 + ctl::HEARTBEAT as i32))?;
        a.pause()?;
        a.test(r9, r9)?;
        a.jz(top)?;
        // The kernel's system call preserves the registers it does not use.
        a.push(r9)?;
        a.push(r10)?;
        a.mov(rdi, qword_ptr(r14 + ctl::HEARTBEAT as i32))?;
        emit::report_rdi(a, WAIT_TAG)?;
        a.pop(r10)?;
        a.pop(r9)?;
        a.jmp(top)?;
        a.set_label(&mut out)?;
        a.mov(rdi, r10)?;
        emit::report_rdi(a, tag::VALUE)?;
        emit::exit(a, 0)
    })
}

/// The report tag of a `touch-wait` vCPU that waits for news in the host.
pub const WAIT_TAG: u32 = 0x77a1;

/// How the vCPUs of a [`TouchVm`] wait between commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WaitMode {
    /// Idle, as a guest kernel's idle vCPUs halt: after each turn of its
    /// CPL3 wait loop the vCPU exits (a REPORT system call) and its thread
    /// sleeps in the host until the host has a command or a wake-up for it.
    /// A sleeping vCPU is outside guest mode, so a memslot update need not
    /// wait for it.
    #[default]
    Halt,
    /// Busy: the vCPU spins at CPL3 (each turn a PAUSE), always in guest
    /// mode; on a 2-core host the host's own threads then wait for the
    /// scheduler.
    Spin,
}

impl WaitMode {
    /// Its name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            WaitMode::Halt => "halt",
            WaitMode::Spin => "spin",
        }
    }
}

impl std::str::FromStr for WaitMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "halt" => Ok(WaitMode::Halt),
            "spin" => Ok(WaitMode::Spin),
            other => Err(format!(
                "unknown wait mode {other:?}: expected halt or spin"
            )),
        }
    }
}

/// Wakes the vCPUs of a [`TouchVm`] that wait in the host.
#[derive(Debug, Default)]
struct Bell {
    rung: Mutex<u64>,
    cond: Condvar,
    /// vCPUs asleep in [`Bell::wait`].
    asleep: AtomicUsize,
}

impl Bell {
    fn ring(&self) {
        let mut n = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        *n += 1;
        self.cond.notify_all();
    }

    fn rung(&self) -> u64 {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps until the bell rings after `seen` (or a second passes: the
    /// vCPU then takes one more turn and comes back).
    fn wait(&self, seen: u64) {
        let n = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        self.asleep.fetch_add(1, Ordering::AcqRel);
        let _ = self
            .cond
            .wait_timeout_while(n, Duration::from_secs(1), |n| *n == seen);
        self.asleep.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A vCPU's MMU handler, with the `touch-wait` program's waits served.
struct Waiting<'a> {
    inner: &'a mut mmu_vmm::mmu::MmuHandler,
    bell: &'a Bell,
    /// The bell's count when the vCPU last left its wait.
    seen: u64,
}

impl ExitHandler for Waiting<'_> {
    fn prepare_entry(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        self.inner.prepare_entry(vcpu)
    }

    fn left_guest(&mut self) {
        self.inner.left_guest();
    }

    fn kvm_exit<'e>(&mut self, exit: VcpuExit<'e>) -> Result<Routed<'e>, VcpuError> {
        self.inner.kvm_exit(exit)
    }

    fn complete_exit(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        action: Action,
    ) -> Result<(), VcpuError> {
        self.inner.complete_exit(vcpu, action)
    }

    fn exception(
        &mut self,
        vcpu: &mut VcpuContext<'_>,
        exception: &GuestException,
    ) -> Result<ExceptionAction, VcpuError> {
        self.inner.exception(vcpu, exception)
    }

    fn paging_op(&mut self, vcpu: &mut VcpuContext<'_>, op: PagingOp) -> Result<u32, VcpuError> {
        self.inner.paging_op(vcpu, op)
    }

    fn read_cr3(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<u64, VcpuError> {
        self.inner.read_cr3(vcpu)
    }

    fn replay_refill(&mut self, vcpu: &mut VcpuContext<'_>) -> Result<(), VcpuError> {
        self.inner.replay_refill(vcpu)
    }

    fn report(&mut self, vcpu: &mut VcpuContext<'_>, report: Report) -> Result<(), VcpuError> {
        if report.tag == u64::from(WAIT_TAG) {
            self.bell.wait(self.seen);
            self.seen = self.bell.rung();
            return Ok(());
        }
        self.inner.report(vcpu, report)
    }
}

/// What a [`TouchVm`] session does, in order, while its vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Every vCPU touches every page of its slice; timed until all are done.
    Touch,
    /// One memslot delete + add while every vCPU waits at CPL3.
    Churn,
}

/// The figures of one memslot delete + add.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChurnSample {
    /// The host's delete + add calls.
    pub call: Duration,
    /// From the start of the calls until every vCPU has run CPL3 code again
    /// (its wait loop turned after the calls returned).
    pub resume: Duration,
    /// Shadow only: the deferred half of the zap. `reclaim_obsolete()`,
    /// then a kick of every vCPU, until every one runs CPL3 again (the
    /// kit's CPL0 code replays the zapped frames first on this host).
    pub reclaim: Option<Duration>,
    /// Obsolete shadow pages that reclaim zapped.
    pub reclaimed_pages: u64,
}

/// What one [`Step`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepResult {
    /// A touch of every page, until every vCPU was done.
    Touch(Duration),
    /// A memslot delete + add.
    Churn(ChurnSample),
}

/// A guest under one [`Configuration`] whose vCPUs each write every 4 KiB
/// page of their slice of the data area from CPL3 (through the VMM's
/// identity tables, 4 KiB pages) on command, and spin at CPL3 in between:
/// the guest of the churn bench. A memslot of its own
/// ([`CHURN_SLOT`], which the guest never touches) is deleted and re-added,
/// as in `mmu-vmm run --workload churn`: the delete zaps every shadow page
/// all the same.
pub struct TouchVm {
    vm: MmuVm,
    config: &'static str,
    memory: GuestMemoryMmap,
    churn: GuestMemoryMmap,
    shadow: Option<mmu_backends::shadow::ShadowBackend>,
    kickers: Vec<Kicker>,
    program: Program,
    args: Vec<VcpuArgs>,
    /// Each vCPU's control block.
    ctl: Vec<u64>,
    /// Touch commands given so far.
    commands: u64,
    wait: WaitMode,
}

impl std::fmt::Debug for TouchVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TouchVm")
            .field("config", &self.config)
            .field("vcpus", &self.args.len())
            .field("commands", &self.commands)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

/// A shadow pool for `mem_size` of guest memory: room for four full shadows
/// of it (the old generation stays until reclaimed while the new one is
/// built), and never below the backend's default.
fn pool_pages(config: &Configuration, mem_size: u64) -> u32 {
    let tables = (mem_size / PAGE_SIZE).div_ceil(512);
    let want = 4 * tables + 4096;
    u32::try_from(want)
        .unwrap_or(u32::MAX)
        .max(config.backend.shadow.pool_pages)
}

fn mmu_vm(
    config: &Configuration,
    vcpus: usize,
    mem_size: u64,
    devices: impl FnMut(mmu_api::VcpuId) -> Box<dyn Devices>,
) -> Result<MmuVm, BenchError> {
    let mut backend = config.backend.clone();
    backend.shadow.pool_pages = pool_pages(config, mem_size);
    Ok(MmuVm::with_devices(
        MmuVmConfig {
            kind: config.kind,
            backend,
            vm: VmConfig {
                vcpus,
                mem_size,
                paging_ops: PagingOps::Paravirt,
                ..VmConfig::default()
            },
            log_dirty_data: false,
            coherence: mmu_integration::kvm::HostCoherence::Detect,
        },
        devices,
    )?)
}

impl TouchVm {
    /// Builds the VM: `vcpus` vCPUs waiting as `wait` says, `mem_size`
    /// bytes of guest memory.
    pub fn new(
        config: &Configuration,
        vcpus: usize,
        mem_size: u64,
        wait: WaitMode,
    ) -> Result<Self, BenchError> {
        if vcpus == 0 || vcpus > mmu_vmm::layout::MAX_VCPUS {
            return Err(BenchError::Options(format!(
                "{vcpus} vCPUs requested; 1..={} are supported",
                mmu_vmm::layout::MAX_VCPUS
            )));
        }
        if mem_size > workload::MAX_MEM_SIZE {
            return Err(BenchError::Options(format!(
                "{mem_size} bytes of memory requested; at most {} are supported",
                workload::MAX_MEM_SIZE
            )));
        }
        let vm = mmu_vm(config, vcpus, mem_size, |_| {
            Box::new(mmu_vmm::mmu::NoDevices)
        })?;
        let churn = shared_guest_memory(&[(GuestAddress(CHURN_GPA), CHURN_SIZE as usize)])
            .map_err(|source| mmu_vmm::SetupError::AllocateMemory {
                size: CHURN_SIZE,
                source,
            })?;
        let region = churn
            .iter()
            .next()
            .ok_or_else(|| BenchError::Options("the churn memory has no region".into()))?;
        vm.memslots()
            .add_region(CHURN_SLOT, region, MemslotFlags::empty())?;
        let seed = 0x5eed_0000_00be_7c00;
        let mut args = Vec::with_capacity(vcpus);
        let mut ctl = Vec::with_capacity(vcpus);
        let mut kickers = Vec::with_capacity(vcpus);
        for i in 0..vcpus {
            let slice = vm.vm().layout().data_slice(i, vcpus);
            let pages = ((slice.end - slice.start) / PAGE_SIZE).saturating_sub(1);
            if pages == 0 {
                return Err(BenchError::Options(format!(
                    "{} MiB leave no data page for each of {vcpus} vCPUs",
                    mem_size >> 20
                )));
            }
            ctl.push(slice.start);
            args.push(VcpuArgs([
                slice.start + PAGE_SIZE,
                pages,
                slice.start,
                seed ^ i as u64,
                u64::from(wait == WaitMode::Halt),
                0,
            ]));
            kickers.push(
                vm.vm()
                    .kicker(i)
                    .ok_or_else(|| BenchError::Options(format!("vCPU {i} has no kicker")))?,
            );
        }
        Ok(TouchVm {
            memory: vm.vm().memory().clone(),
            shadow: vm.shadow_backend().cloned(),
            config: config.name,
            vm,
            churn,
            kickers,
            program: touch_wait()?,
            args,
            ctl,
            commands: 0,
            wait,
        })
    }

    /// The configuration's name.
    pub fn config(&self) -> &'static str {
        self.config
    }

    /// The VM.
    pub fn mmu_vm(&self) -> &MmuVm {
        &self.vm
    }

    /// Data pages each vCPU touches.
    pub fn pages_per_vcpu(&self) -> u64 {
        self.args.first().map_or(0, |a| a.0[1])
    }

    /// Runs the vCPUs, waits until each runs its wait loop, does `steps`
    /// from a host thread and ends the guest. `limit` bounds every wait
    /// (and the guest run).
    pub fn session(
        &mut self,
        steps: &[Step],
        limit: Duration,
    ) -> Result<Vec<StepResult>, BenchError> {
        for &c in &self.ctl {
            self.memory
                .write_obj(0u64, GuestAddress(c + ctl::COMMAND))?;
            self.memory.write_obj(0u64, GuestAddress(c + ctl::DONE))?;
            self.memory
                .write_obj(0u64, GuestAddress(c + ctl::HEARTBEAT))?;
        }
        let guest_ended = AtomicBool::new(false);
        let first_command = self.commands;
        let bell = Bell::default();
        let host = Host {
            bell: &bell,
            halt: self.wait == WaitMode::Halt,
            memory: &self.memory,
            ctl: &self.ctl,
            shadow: self.shadow.as_ref(),
            kickers: &self.kickers,
            guest_ended: &guest_ended,
            limit,
        };
        let churn_region = self
            .churn
            .iter()
            .next()
            .ok_or_else(|| BenchError::Options("the churn memory has no region".into()))?;
        let (vm, handlers, memslots) = self.vm.parts();
        let (report, results) = std::thread::scope(|s| {
            let driver = s.spawn(|| {
                let r = host.drive(steps, memslots, churn_region);
                host.command_all(ctl::EXIT);
                host.bell.ring();
                r
            });
            let report = vm.run_with(
                &self.program,
                &self.args,
                limit + limit,
                handlers
                    .iter_mut()
                    .map(|inner| Waiting {
                        inner,
                        bell: &bell,
                        seen: 0,
                    })
                    .collect(),
            );
            guest_ended.store(true, Ordering::Release);
            bell.ring();
            let results = driver
                .join()
                .unwrap_or_else(|_| Err(BenchError::Check("the host thread panicked".to_string())));
            (report, results)
        });
        let report = report?;
        let results = results?;
        self.commands = first_command
            + results
                .iter()
                .filter(|r| matches!(r, StepResult::Touch(_)))
                .count() as u64;
        // The guest touched every page: check a word in each.
        for (i, (vcpu, arg)) in report.vcpus.iter().zip(&self.args).enumerate() {
            let touches = results
                .iter()
                .filter(|r| matches!(r, StepResult::Touch(_)))
                .count() as u64;
            if vcpu.last(tag::VALUE) != Some(touches) {
                return Err(BenchError::Check(format!(
                    "vCPU {i} reported {:?} touches, the host asked for {touches}",
                    vcpu.last(tag::VALUE)
                )));
            }
            if touches > 0 {
                let [base, pages, _, seed, ..] = arg.0;
                for p in 0..pages {
                    let address = base + p * PAGE_SIZE;
                    let got: u64 = self.memory.read_obj(GuestAddress(address))?;
                    if got != address ^ seed {
                        return Err(BenchError::Check(format!(
                            "vCPU {i} page {address:#x} holds {got:#x}, expected {:#x}",
                            address ^ seed
                        )));
                    }
                }
            }
        }
        Ok(results)
    }
}

/// The host thread's view of a running [`TouchVm`].
struct Host<'a> {
    bell: &'a Bell,
    halt: bool,
    memory: &'a GuestMemoryMmap,
    ctl: &'a [u64],
    shadow: Option<&'a mmu_backends::shadow::ShadowBackend>,
    kickers: &'a [Kicker],
    guest_ended: &'a AtomicBool,
    limit: Duration,
}

impl Host<'_> {
    fn read(&self, vcpu: usize, field: u64) -> u64 {
        self.memory
            .read_obj(GuestAddress(self.ctl[vcpu] + field))
            .unwrap_or(0)
    }

    fn command_all(&self, command: u64) {
        for &c in self.ctl {
            let _ = self
                .memory
                .write_obj(command, GuestAddress(c + ctl::COMMAND));
        }
    }

    fn heartbeats(&self) -> Vec<u64> {
        (0..self.ctl.len())
            .map(|i| self.read(i, ctl::HEARTBEAT))
            .collect()
    }

    /// Polls until `done(vcpu)` holds for every vCPU.
    fn wait_all(&self, what: &str, done: impl Fn(usize) -> bool) -> Result<(), BenchError> {
        let start = Instant::now();
        let mut pending: Vec<usize> = (0..self.ctl.len()).collect();
        loop {
            pending.retain(|&i| !done(i));
            if pending.is_empty() {
                return Ok(());
            }
            if self.guest_ended.load(Ordering::Acquire) || start.elapsed() > self.limit {
                return Err(BenchError::Timeout {
                    what: format!("{what} (vCPUs {pending:?} did not)"),
                    limit: self.limit,
                });
            }
            std::hint::spin_loop();
            std::thread::yield_now();
        }
    }

    /// Wakes the vCPUs and waits until every one's wait loop turns past
    /// `since`.
    fn wait_turn(&self, what: &str, since: &[u64]) -> Result<(), BenchError> {
        self.bell.ring();
        self.wait_all(what, |i| self.read(i, ctl::HEARTBEAT) > since[i])
    }

    fn drive(
        &self,
        steps: &[Step],
        memslots: &mmu_integration::Memslots,
        region: &vm_memory::GuestRegionMmap,
    ) -> Result<Vec<StepResult>, BenchError> {
        self.wait_turn("start its wait loop", &vec![0; self.ctl.len()])?;
        let mut command = 0;
        let mut results = Vec::with_capacity(steps.len());
        for step in steps {
            match step {
                Step::Touch => {
                    command += 1;
                    let start = Instant::now();
                    self.command_all(command);
                    self.bell.ring();
                    self.wait_all("finish a touch", |i| self.read(i, ctl::DONE) == command)?;
                    results.push(StepResult::Touch(start.elapsed()));
                }
                Step::Churn => results.push(StepResult::Churn(self.churn(memslots, region)?)),
            }
        }
        Ok(results)
    }

    fn churn(
        &self,
        memslots: &mmu_integration::Memslots,
        region: &vm_memory::GuestRegionMmap,
    ) -> Result<ChurnSample, BenchError> {
        // Every vCPU is in its wait loop.
        let before = self.heartbeats();
        self.wait_turn("wait at CPL3", &before)?;
        if self.halt {
            // Every vCPU asleep in the host, as idle vCPUs are halted.
            let n = self.ctl.len();
            self.wait_all("go to sleep", |_| {
                self.bell.asleep.load(Ordering::Acquire) == n
            })?;
        }
        let start = Instant::now();
        memslots.delete(CHURN_SLOT)?;
        memslots.add_region(CHURN_SLOT, region, MemslotFlags::empty())?;
        let call = start.elapsed();
        let after = self.heartbeats();
        self.wait_turn("run CPL3 code after the delete + add", &after)?;
        let resume = start.elapsed();
        let mut sample = ChurnSample {
            call,
            resume,
            ..ChurnSample::default()
        };
        if let Some(shadow) = self.shadow {
            let start = Instant::now();
            sample.reclaimed_pages = shadow.reclaim_obsolete();
            let beats = self.heartbeats();
            for k in self.kickers {
                k.kick();
            }
            self.wait_turn("run CPL3 code after the reclaim", &beats)?;
            sample.reclaim = Some(start.elapsed());
        }
        Ok(sample)
    }
}

/// The figures of one `mmio-rr` run.
#[derive(Clone, Debug, PartialEq)]
pub struct RrSample {
    /// Transactions, over every vCPU.
    pub transactions: u64,
    /// Wall time of the guest run.
    pub elapsed: Duration,
    /// How long the MMU took to serve each MMIO access, over every vCPU
    /// (the exit and the device excluded), by cache path.
    pub mmio_service: MmioServiceTimes,
}

impl RrSample {
    /// Transactions per second.
    pub fn rate(&self) -> f64 {
        self.transactions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A guest running the `mmio-rr` workload under one configuration, with
/// extra memslots so that the VM holds `slots` in all.
pub struct RrVm {
    vm: MmuVm,
    config: &'static str,
    counters: Vec<Arc<RrCounters>>,
    program: Program,
    args: Vec<VcpuArgs>,
    expect: Vec<Vec<Report>>,
    _extra: Option<GuestMemoryMmap>,
}

impl std::fmt::Debug for RrVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RrVm")
            .field("config", &self.config)
            .field("vcpus", &self.args.len())
            .finish_non_exhaustive()
    }
}

/// Where the extra memslots of an [`RrVm`] start, one 4 KiB page each,
/// 2 MiB apart: above the churn slot, below the MMIO devices.
const EXTRA_SLOT_GPA: u64 = CHURN_GPA + (1 << 30);

/// Builds an [`RrVm`]: `vcpus` vCPUs, each doing `transactions` per run,
/// with `slots` memslots in all (guest RAM is two).
pub fn rr_vm(
    config: &Configuration,
    vcpus: usize,
    transactions: u64,
    slots: u32,
) -> Result<RrVm, BenchError> {
    if slots == 0 || slots > MAX_SLOTS {
        return Err(BenchError::Options(format!(
            "{slots} memslots requested; 1..={MAX_SLOTS} are supported"
        )));
    }
    let counters: Vec<Arc<RrCounters>> = (0..vcpus).map(|_| Arc::default()).collect();
    let vm = mmu_vm(config, vcpus, 16 << 20, |id| {
        let index = id.0 as usize;
        Box::new(RrDevice::new(
            workload::mmio_page(index),
            Arc::clone(&counters[index]),
        ))
    })?;
    let params = workload::Params {
        ops: Some(transactions),
        ..workload::Params::default()
    };
    let plan = mmu_vmm::run::guest_plan(vm.vm(), Workload::MmioRr, &params)?;
    let extra_count = slots.saturating_sub(2);
    let extra = if extra_count > 0 {
        let ranges: Vec<(GuestAddress, usize)> = (0..u64::from(extra_count))
            .map(|i| {
                (
                    GuestAddress(EXTRA_SLOT_GPA + i * (2 << 20)),
                    PAGE_SIZE as usize,
                )
            })
            .collect();
        let memory =
            shared_guest_memory(&ranges).map_err(|source| mmu_vmm::SetupError::AllocateMemory {
                size: u64::from(extra_count) * PAGE_SIZE,
                source,
            })?;
        for (i, region) in memory.iter().enumerate() {
            vm.memslots()
                .add_region(SlotId(16 + i as u32), region, MemslotFlags::empty())?;
        }
        Some(memory)
    } else {
        None
    };
    let args = plan
        .rounds
        .first()
        .cloned()
        .ok_or_else(|| BenchError::Options("the mmio-rr plan has no round".into()))?;
    Ok(RrVm {
        vm,
        config: config.name,
        counters,
        program: plan.program,
        args,
        expect: plan.reports,
        _extra: extra,
    })
}

impl RrVm {
    /// The configuration's name.
    pub fn config(&self) -> &'static str {
        self.config
    }

    /// The backend's kind.
    pub fn kind(&self) -> BackendKind {
        self.vm.kind()
    }

    /// The backend's counters.
    pub fn stats(&self) -> mmu_api::MmuStats {
        self.vm.backend().stats()
    }

    /// One run of every vCPU's transactions; checks the reports and the
    /// devices' counters against the host's model.
    pub fn run(&mut self, limit: Duration) -> Result<RrSample, BenchError> {
        let before: Vec<(u64, u64, u64)> = self.counters.iter().map(|c| c.snapshot()).collect();
        for i in 0..self.args.len() {
            if let Some(handler) = self.vm.handler(i) {
                handler.exits().record_mmio_service_times(true);
            }
        }
        let report = self.vm.run(&self.program, &self.args, limit)?;
        let mut mmio_service = MmioServiceTimes::default();
        for i in 0..self.args.len() {
            if let Some(handler) = self.vm.handler(i) {
                mmio_service.extend(handler.exits().take_mmio_service_times());
            }
        }
        let mut transactions = 0;
        for (i, (vcpu, expect)) in report.vcpus.iter().zip(&self.expect).enumerate() {
            if &vcpu.reports != expect {
                return Err(BenchError::Check(format!(
                    "vCPU {i} reported {:?}, expected {expect:?}",
                    vcpu.reports
                )));
            }
            let (d, r, idle) = self.counters[i].snapshot();
            let (d0, r0, idle0) = before[i];
            let want = |t: u32| {
                expect
                    .iter()
                    .find(|r| r.tag == u64::from(t))
                    .map_or(0, |r| r.value)
            };
            if (d - d0, r - r0, idle - idle0) != (want(tag::TRANSACTIONS), want(tag::POLLS), 0) {
                return Err(BenchError::Check(format!(
                    "vCPU {i}'s device counted {:?} (doorbells, status reads, idle reads)",
                    (d - d0, r - r0, idle - idle0)
                )));
            }
            transactions += want(tag::TRANSACTIONS);
        }
        Ok(RrSample {
            transactions,
            elapsed: report.elapsed,
            mmio_service,
        })
    }
}
