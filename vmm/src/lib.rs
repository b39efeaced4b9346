//! The reference VMM on KVM: every test, bench and tool of the workspace
//! runs real guests through it.
//!
//! - [`Vm`]: a KVM VM (kvm-ioctls) with guest memory from vm-memory
//!   registered as memslots, vCPUs with the host's supported CPUID, and a
//!   64-bit long-mode image the VMM builds before the first run: identity
//!   page tables, a GDT with ring-0 and ring-3 segments, one TSS per vCPU,
//!   an IDT, and the guest kit's kernel ([`layout`] has the map).
//! - [`Vm::run`] / [`Vm::run_with`]: run a [`Program`] on some vCPUs, each
//!   on its own thread, under a time limit, with an [`ExitHandler`] per
//!   vCPU for the exits the kit does not serve itself.
//! - [`Kicker`]: makes a vCPU leave `KVM_RUN` from any thread (a real-time
//!   signal plus `immediate_exit`), to service a request or to stop.
//! - [`kit`]: the guest kit, a tiny CPL0 kernel and CPL3 workloads
//!   assembled with iced-x86. Its ABI (system calls, hypercall ports,
//!   exception frames, the replay queue) is documented in [`kit::abi`].
//!
//! - [`conformance`]: the access-matrix test of `mmu-api`'s reference
//!   walker against KVM (`mmu-vmm conformance`).
//! - [`mmu`]: [`MmuVm`](mmu::MmuVm), a VM whose memslots and exits go
//!   through a pluggable MMU backend (`mmu-backends` + `mmu-integration`), chosen
//!   by name at creation; [`run`] is `mmu-vmm run` on top of it, with the
//!   guest workloads of [`workload`] in address spaces built by [`space`];
//!   [`diff`] runs a workload under two backends and compares what the
//!   guest observed ([`observe`]).
//! - [`json`] and [`units`]: the one-object JSON writer and the
//!   three-significant-figure formatting of the command's outputs.
//!
//! The measurements of `mmu-vmm bench` / `compare` and of the criterion
//! benches on KVM guests live in the `mmu-bench` crate, and the `mmu-vmm`
//! command itself in `mmu-cli`; both are built on this library.
//!
//! # The guest ABI in brief
//!
//! | from | mechanism | what |
//! | --- | --- | --- |
//! | CPL3 program | `int3` (DPL3 gate, vector 3), number in EAX, args RDI, RSI, result RAX | EXIT, REPORT, LOAD_CR3, INVLPG, FLUSH_TLB, STORE, LOAD, CALL, SWAP_ENTRIES, READ_CR0/CR3, WRITE_CR0, RDMSR, WRMSR, SET_FAULT_HANDLER ([`kit::abi::syscall`]) |
//! | CPL0 kernel | `in eax, dx` on port 0x500 + n, args RDI, RSI, answer EAX | DONE 0x500, REPORT 0x501, EXCEPTION 0x502, LOAD_CR3 0x503, INVLPG 0x504, FLUSH_TLB 0x505, BAD_SYSCALL 0x506, READ_CR3 0x507, REPLAY_REFILL 0x508 ([`kit::abi::hypercall`]; all but DONE, REPORT and BAD_SYSCALL are the paravirtual MMU ABI of [`mmu_integration::shadow_host::abi`], version 1) |
//! | IDT stub | pushes vector (and a zero error code if none), saves RAX/RDX, EXCEPTION hypercall; the VMM reads the frame at RSP and CR2 | answer bits REPLAY, NATIVE, DELIVER (log the fault, resume the program at its handler), REDIRECT ([`kit::abi::action`]) |
//!
//! Under [`PagingOps::Native`] the kernel's LOAD_CR3 / INVLPG / FLUSH_TLB
//! are `mov cr3` / `invlpg` / a CR3 reload; under [`PagingOps::Paravirt`]
//! they are hypercalls first, and the VMM answers whether the kernel must
//! still replay queued table writes and execute the native instruction.
//! CPL3 has IOPL 0 and no I/O bitmap: every port access from CPL3 is a #GP.
//!
//! # The `mmu-vmm` command
//!
//! `mmu-vmm info` (what KVM offers), `mmu-vmm touch` (the touch workload
//! on N vCPUs, checksums checked), `mmu-vmm conformance [--cases N]
//! [--seed S] [--levels 4|5] [--json]`, `mmu-vmm run --mmu shadow|ept
//! --workload W [--vcpus N] [--mem SIZE] [--json]` (a workload under an
//! MMU backend, with its checks against the host's model and the backend's
//! stats), and `mmu-vmm diff --workload W [--a K] [--b K] [--json]` (the
//! workload under two backends, and every difference the guest could
//! observe), `mmu-vmm bench churn|mmio-rr|faults|reclaim` and
//! `mmu-vmm compare [--quick]` (the backends measured side by side:
//! the `mmu-bench` crate). Both backends run guests on KVM; under `shadow`
//! the kit's paravirtual paging calls and #PF stub reach the MMU through
//! `mmu-integration`'s shadow hosting ([`mmu_integration::shadow_host`]).
//!
//! A guest that triple-faults, runs past its time limit, touches a port or
//! address nothing serves, or takes an exception nothing resolves ends its
//! run with a [`RunError`] naming the vCPU and a [`VcpuError`] saying
//! what happened, never a hang or a panic.
//!
//! # The KVM on these machines
//!
//! Where `/dev/kvm` is PVM (KVM's shadow MMU; `CpuInfo::pvm`), guest CPL0
//! code runs in KVM's instruction emulator at about 1.8 us an instruction
//! and CPL3 code runs natively. So workloads run at CPL3 and the kernel is
//! a few instructions per event. KVM caches guest page tables for CPL3
//! execution: the tables the VMM writes before the first run are seen,
//! later host-side edits are not. Guest CPL0 stores followed by a CR3 load
//! or INVLPG are; that is what the STORE system call and the replay queue
//! are for.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use mmu_vmm::kit::workloads::{TouchKind, touch};
//! use mmu_vmm::{Vm, VmConfig, VcpuArgs};
//!
//! let mut vm = Vm::new(VmConfig { vcpus: 2, ..VmConfig::default() })?;
//! let program = touch(TouchKind::Write)?;
//! let args: Vec<VcpuArgs> = (0..2)
//!     .map(|i| {
//!         let slice = vm.layout().data_slice(i, 2);
//!         VcpuArgs([slice.start, 64, 1, 0x5eed, 0, 0])
//!     })
//!     .collect();
//! let report = vm.run(&program, &args, Duration::from_secs(10))?;
//! for vcpu in &report.vcpus {
//!     println!("{}: checksum {:#x}", vcpu.id, vcpu.last(mmu_vmm::kit::abi::tag::CHECKSUM).unwrap());
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod conformance;
pub mod diff;
mod error;
pub mod json;
mod kick;
pub mod kit;
pub mod layout;
pub mod mmu;
pub mod observe;
mod rng;
pub mod run;
pub mod space;
pub mod stress;
pub mod tables;
pub mod units;
mod vcpu;
mod vm;
pub mod workload;
pub mod x86;

pub use error::{GuestException, IoDirection, KitError, KvmError, RunError, SetupError, VcpuError};
pub use kick::{Kicker, kick_signal};
pub use kit::{PagingOps, Program, Ring};
pub use vcpu::{
    DefaultHandler, ExceptionAction, ExitHandler, ExitStats, PagingOp, Report, VcpuContext,
    VcpuOutcome, VcpuReport,
};
pub use vm::{CpuInfo, GuestPhys, RunReport, VcpuArgs, Vm, VmConfig, kvm_available};
