//! A minimal host VMM on KVM with the MMU plugged in.
//!
//! ```text
//! cargo run -p mmu-integration --example host_vmm -- --mmu ept
//! cargo run -p mmu-integration --example host_vmm -- --mmu shadow
//! ```
//!
//! The backend is picked from the command line when the VM is created;
//! nothing else in the VMM changes with it. The VMM (`vmm.rs`):
//!
//! 1. creates a KVM VM and builds its MMU with `KvmMmu::new(kind, ...)`;
//! 2. registers the guest's system memory, its RAM (dirty-logged) and a
//!    ROM (read-only) through the MMU's memslot glue, so the backend owns
//!    the memslots (the EPT backend issues `KVM_SET_USER_MEMORY_REGION`
//!    itself);
//! 3. runs one vCPU in a loop: `prepare_entry` before `KVM_RUN`,
//!    `exit_guest` after it, every exit through `handle_kvm_exit` (MMIO is
//!    classified by the backend and served on the VMM's bus: the device,
//!    and its registers through which the guest reports, asks for a
//!    dirty-log harvest and ends), and the port reads of the paravirtual
//!    MMU ABI's hypercalls through the shadow hosting;
//! 4. prints what the guest reported, both dirty logs and the backend's
//!    stats, and checks them against the host's model of the guest.
//!
//! The guest (see `pv_guest.rs`) is a minimal long-mode kernel and a
//! CPL3 program that speaks the paravirtual MMU ABI
//! (`mmu_integration::shadow_host::abi`): its page tables are written by
//! the host before the first entry, its exception stubs report to the VMM
//! with the EXCEPTION hypercall, and its return path runs the replay
//! queue. The program touches pages, asks for a dirty-log harvest and
//! touches them again, does request/response over an MMIO doorbell and
//! status register, writes to the ROM and reads it, reads its pages back,
//! and reports.
//!
//! With `--mmu ept` KVM walks the guest's tables itself and the kernel
//! never runs after the start: MMIO reaches the VMM as KVM's MMIO exits.
//!
//! With `--mmu shadow` the hardware walks the shadow MMU's tables. The
//! VMM hosts it per vCPU with `mmu_integration::shadow_host::ShadowVcpuHost`:
//! `prepare_entry` loads the MMU's root into CR3 (and queues the replay
//! records a host whose KVM shadows page tables needs), every hypercall
//! port read goes to `hypercall`, and the answer completes the read. The
//! program's first accesses fault in the shadow tables (the example
//! checks that the backend counted shadow faults); its MMIO accesses are
//! #PFs on MMIO SPTEs, which the hosting emulates against the same bus;
//! the harvest write-protects pages the host's KVM has already seen, which
//! (under replay coherence) the guest kernel re-asserts from its queue
//! (the example checks that it replayed entries).

mod guest;
mod pv_guest;
mod vmm;

use std::error::Error;
use std::process::ExitCode;

use mmu_backends::BackendKind;

fn parse_args() -> Result<BackendKind, Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, kind] if flag == "--mmu" => Ok(kind.parse()?),
        _ => Err(format!(
            "usage: host_vmm --mmu shadow|ept (this build has {})",
            mmu_backends::KindList(BackendKind::compiled_in())
        )
        .into()),
    }
}

fn run() -> Result<bool, Box<dyn Error>> {
    let outcome = vmm::run_guest(parse_args()?)?;
    print!("{}", outcome.report);
    for what in &outcome.failed {
        eprintln!("host_vmm: {what} differ from the host's model of the guest");
    }
    Ok(outcome.failed.is_empty())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("host_vmm: the guest did not do what the host's model says");
            ExitCode::FAILURE
        }
        Err(e) => {
            let mut message = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("host_vmm: {message}");
            ExitCode::FAILURE
        }
    }
}
