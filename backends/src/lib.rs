//! The backend registry: the only place a host VMM names an MMU backend.
//!
//! A VMM enables the backends it wants as cargo features of this crate
//! (`shadow` and `ept`, both on by default), reads a [`BackendKind`] from
//! its configuration or command line (`"shadow"` / `"ept"`), and builds the
//! VM's backend with [`create`]. Everything after that goes through
//! [`mmu_api::MmuBackend`], so swapping backends is a change of one string
//! at VM creation.
//!
//! | feature | backend | crate | needs from the host |
//! | --- | --- | --- | --- |
//! | `shadow` | software shadow paging | `mmu-shadow` | nothing at creation ([`ShadowConfig`] places its page pool) |
//! | `ept` | hardware two-dimensional paging passed through | `mmu-ept` | the hypervisor's memory-region port ([`HypervisorMemory`], in [`BackendParts`]) |
//!
//! A kind whose feature is off still parses as a name, so a configuration
//! file can say `ept` on a build without it, but [`BackendKind::from_str`]
//! and [`create`] refuse it with an error that lists what this build has
//! ([`BackendKind::compiled_in`]).
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "ept")] {
//! use std::sync::Arc;
//!
//! use mmu_backends::{BackendConfig, BackendKind, BackendParts, create};
//! use mmu_api::{Gpa, MmioClass, MmuBackend, VcpuId, VcpuKick};
//!
//! #[derive(Debug)]
//! struct NoKick;
//! impl VcpuKick for NoKick {
//!     fn kick(&self) {}
//! }
//!
//! // What the VMM's command line said.
//! let kind: BackendKind = "ept".parse()?;
//! // The hypervisor's memory regions; on KVM this is
//! // `mmu_integration::kvm::KvmMemory` over the VM fd.
//! let port = Arc::new(mmu_ept::testing::InProcessHypervisor::new());
//! let parts = BackendParts::new().with_hypervisor_memory(port);
//! let config = BackendConfig::default().with_gpa_width(46);
//!
//! let backend: Arc<dyn MmuBackend> = create(kind, &config, &parts)?;
//! assert_eq!(backend.name(), "ept");
//! let mut vcpu = backend.create_vcpu(VcpuId(0), Arc::new(NoKick))?;
//! assert_eq!(vcpu.classify_mmio(Gpa(0xfee0_0000), false), MmioClass::Mmio);
//! assert!(BackendKind::compiled_in().contains(&BackendKind::Ept));
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use mmu_api::MmuBackend;

#[cfg(feature = "ept")]
pub use mmu_ept::{EptConfig, HypervisorMemory};
/// The shadow backend's crate, for hosts that need its concrete type
/// (hosting calls such as `ShadowBackend::take_replay`).
#[cfg(feature = "shadow")]
pub use mmu_shadow as shadow;
#[cfg(feature = "shadow")]
pub use mmu_shadow::{PoolError, ShadowConfig};

/// Which MMU backend a VM uses. Parses from and prints as `"shadow"` /
/// `"ept"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// Software shadow paging (`mmu-shadow`, cargo feature `shadow`).
    Shadow,
    /// Hardware two-dimensional paging passed through (`mmu-ept`, cargo
    /// feature `ept`).
    Ept,
}

/// The kinds compiled into this build, in [`BackendKind::ALL`] order.
const COMPILED_IN: &[BackendKind] = &[
    #[cfg(feature = "shadow")]
    BackendKind::Shadow,
    #[cfg(feature = "ept")]
    BackendKind::Ept,
];

impl BackendKind {
    /// Every kind this crate knows, compiled in or not.
    pub const ALL: [BackendKind; 2] = [BackendKind::Shadow, BackendKind::Ept];

    /// The name it parses from and prints as.
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Shadow => "shadow",
            BackendKind::Ept => "ept",
        }
    }

    /// The cargo feature of this crate that compiles the backend in (the
    /// same string as [`name`](Self::name)).
    pub const fn feature(self) -> &'static str {
        self.name()
    }

    /// True if this build has the backend.
    pub const fn is_compiled_in(self) -> bool {
        match self {
            BackendKind::Shadow => cfg!(feature = "shadow"),
            BackendKind::Ept => cfg!(feature = "ept"),
        }
    }

    /// The kinds this build has, in [`ALL`](Self::ALL) order.
    pub fn compiled_in() -> &'static [BackendKind] {
        COMPILED_IN
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A list of kinds, printed as `shadow, ept` (or `none`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindList(pub &'static [BackendKind]);

impl fmt::Display for KindList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, kind) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(kind.name())?;
        }
        Ok(())
    }
}

/// Why a string is not a usable [`BackendKind`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseKindError {
    /// Not the name of any backend.
    #[error("unknown MMU backend {name:?}: this build has {compiled_in}")]
    Unknown {
        /// What was given.
        name: String,
        /// The kinds this build has.
        compiled_in: KindList,
    },
    /// A backend this build was compiled without.
    #[error(
        "the {kind} MMU backend is not compiled into this build (cargo feature `{}` of crate `mmu-backends`); this build has {compiled_in}",
        kind.feature()
    )]
    NotCompiledIn {
        /// The backend named.
        kind: BackendKind,
        /// The kinds this build has.
        compiled_in: KindList,
    },
}

impl FromStr for BackendKind {
    type Err = ParseKindError;

    /// Parses `"shadow"` or `"ept"` (ASCII case ignored, surrounding white
    /// space trimmed). A known name whose backend is not compiled in is
    /// refused with [`ParseKindError::NotCompiledIn`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        let kind = BackendKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| ParseKindError::Unknown {
                name: s.to_string(),
                compiled_in: KindList(COMPILED_IN),
            })?;
        if !kind.is_compiled_in() {
            return Err(ParseKindError::NotCompiledIn {
                kind,
                compiled_in: KindList(COMPILED_IN),
            });
        }
        Ok(kind)
    }
}

/// The configuration of every compiled-in backend; [`create`] uses the one
/// of the kind it builds. Start from [`Default`] and change fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendConfig {
    /// How a shadow backend is built.
    #[cfg(feature = "shadow")]
    pub shadow: ShadowConfig,
    /// How an EPT backend is built.
    #[cfg(feature = "ept")]
    pub ept: EptConfig,
}

impl BackendConfig {
    /// The same configuration with the guest-physical address width (the
    /// vCPUs' MAXPHYADDR, which memslots must fit in) set for every
    /// backend.
    pub fn with_gpa_width(self, bits: u8) -> Self {
        #[allow(unused_mut)]
        let mut config = self;
        #[cfg(feature = "shadow")]
        {
            config.shadow.gpa_width = bits;
        }
        #[cfg(feature = "ept")]
        {
            config.ept.gpa_width = bits;
        }
        let _ = bits;
        config
    }
}

/// What the host VMM hands a backend at creation, beyond its configuration.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct BackendParts {
    /// The hypervisor's memory regions, which the EPT backend owns the
    /// memslots through (required for [`BackendKind::Ept`]).
    #[cfg(feature = "ept")]
    pub hypervisor_memory: Option<Arc<dyn HypervisorMemory>>,
}

impl BackendParts {
    /// No parts: enough for the shadow backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same parts with the hypervisor's memory-region port.
    #[cfg(feature = "ept")]
    pub fn with_hypervisor_memory(mut self, port: Arc<dyn HypervisorMemory>) -> Self {
        self.hypervisor_memory = Some(port);
        self
    }
}

/// Why [`create`] could not build a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The kind's cargo feature is off in this build.
    #[error(
        "the {kind} MMU backend is not compiled into this build (cargo feature `{}` of crate `mmu-backends`); this build has {compiled_in}",
        kind.feature()
    )]
    NotCompiledIn {
        /// The backend asked for.
        kind: BackendKind,
        /// The kinds this build has.
        compiled_in: KindList,
    },
    /// The EPT backend was asked for without the hypervisor's
    /// memory-region port.
    #[error("the ept MMU backend needs the hypervisor's memory-region port in BackendParts")]
    MissingHypervisorMemory,
    /// The shadow backend's page pool could not be set up.
    #[cfg(feature = "shadow")]
    #[error("the shadow MMU backend's page pool could not be set up")]
    ShadowPool(#[source] PoolError),
}

/// Builds the MMU backend of one VM: `kind`, configured by its part of
/// `config`, with the host `parts` it needs.
///
/// The backend starts with no memslots and no vCPUs.
pub fn create(
    kind: BackendKind,
    config: &BackendConfig,
    parts: &BackendParts,
) -> Result<Arc<dyn MmuBackend>, CreateError> {
    match kind {
        #[cfg(feature = "shadow")]
        BackendKind::Shadow => {
            let backend = mmu_shadow::ShadowBackend::new(config.shadow.clone())
                .map_err(CreateError::ShadowPool)?;
            Ok(Arc::new(backend))
        }
        #[cfg(feature = "ept")]
        BackendKind::Ept => {
            let port = parts
                .hypervisor_memory
                .clone()
                .ok_or(CreateError::MissingHypervisorMemory)?;
            Ok(Arc::new(mmu_ept::EptBackend::new(config.ept.clone(), port)))
        }
        #[allow(unreachable_patterns)]
        other => {
            let _ = (config, parts);
            Err(CreateError::NotCompiledIn {
                kind: other,
                compiled_in: KindList(COMPILED_IN),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_in_follows_the_features() {
        let expected: Vec<BackendKind> = BackendKind::ALL
            .into_iter()
            .filter(|k| match k {
                BackendKind::Shadow => cfg!(feature = "shadow"),
                BackendKind::Ept => cfg!(feature = "ept"),
            })
            .collect();
        assert_eq!(BackendKind::compiled_in(), expected.as_slice());
        for kind in BackendKind::ALL {
            assert_eq!(
                kind.is_compiled_in(),
                BackendKind::compiled_in().contains(&kind)
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for kind in BackendKind::ALL {
            assert_eq!(kind.to_string(), kind.name());
            match kind.name().parse::<BackendKind>() {
                Ok(parsed) => {
                    assert!(kind.is_compiled_in());
                    assert_eq!(parsed, kind);
                }
                Err(ParseKindError::NotCompiledIn { kind: named, .. }) => {
                    assert!(!kind.is_compiled_in());
                    assert_eq!(named, kind);
                }
                Err(other) => panic!("{kind}: {other}"),
            }
        }
        assert_eq!(BackendKind::Shadow.to_string(), "shadow");
        assert_eq!(BackendKind::Ept.to_string(), "ept");
    }

    #[test]
    fn parsing_ignores_case_and_surrounding_space() {
        for kind in BackendKind::compiled_in() {
            let loud = format!("  {}\n", kind.name().to_ascii_uppercase());
            assert_eq!(loud.parse::<BackendKind>(), Ok(*kind));
        }
    }

    #[test]
    fn unknown_names_list_what_is_compiled_in() {
        let err = "npt".parse::<BackendKind>().unwrap_err();
        assert_eq!(
            err,
            ParseKindError::Unknown {
                name: "npt".to_string(),
                compiled_in: KindList(BackendKind::compiled_in()),
            }
        );
        let message = err.to_string();
        assert!(
            message.starts_with("unknown MMU backend \"npt\""),
            "{message}"
        );
        for kind in BackendKind::compiled_in() {
            assert!(message.contains(kind.name()), "{message}");
        }
        assert!("".parse::<BackendKind>().is_err());
        assert!("shadow-ept".parse::<BackendKind>().is_err());
    }

    #[test]
    fn kind_lists_print_as_words() {
        assert_eq!(KindList(&[]).to_string(), "none");
        assert_eq!(KindList(&[BackendKind::Ept]).to_string(), "ept");
        assert_eq!(KindList(&BackendKind::ALL).to_string(), "shadow, ept");
    }

    #[cfg(not(feature = "shadow"))]
    #[test]
    fn shadow_is_refused_without_its_feature() {
        let err = "shadow".parse::<BackendKind>().unwrap_err();
        assert!(matches!(
            err,
            ParseKindError::NotCompiledIn {
                kind: BackendKind::Shadow,
                ..
            }
        ));
        assert!(err.to_string().contains("cargo feature `shadow`"), "{err}");
        let created = create(
            BackendKind::Shadow,
            &BackendConfig::default(),
            &BackendParts::new(),
        );
        assert!(matches!(
            created,
            Err(CreateError::NotCompiledIn {
                kind: BackendKind::Shadow,
                ..
            })
        ));
    }

    #[cfg(not(feature = "ept"))]
    #[test]
    fn ept_is_refused_without_its_feature() {
        let err = "ept".parse::<BackendKind>().unwrap_err();
        assert!(err.to_string().contains("cargo feature `ept`"), "{err}");
        let created = create(
            BackendKind::Ept,
            &BackendConfig::default(),
            &BackendParts::new(),
        );
        assert!(matches!(
            created,
            Err(CreateError::NotCompiledIn {
                kind: BackendKind::Ept,
                ..
            })
        ));
    }

    #[cfg(feature = "shadow")]
    #[test]
    fn shadow_backend_is_built_from_its_config() {
        let mut config = BackendConfig::default();
        config.shadow.page_limit = Some(100);
        let backend = create(BackendKind::Shadow, &config, &BackendParts::new()).unwrap();
        assert_eq!(backend.name(), "shadow");
        assert_eq!(backend.page_limit(), Some(100));
        assert!(backend.memslots().is_empty());
    }

    #[cfg(feature = "shadow")]
    #[test]
    fn shadow_pool_errors_are_reported() {
        let mut config = BackendConfig::default();
        config.shadow.pool_pages = 0;
        let err = create(BackendKind::Shadow, &config, &BackendParts::new()).unwrap_err();
        assert!(matches!(err, CreateError::ShadowPool(_)), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[cfg(feature = "ept")]
    #[test]
    fn ept_backend_needs_the_hypervisor_port() {
        let err = create(
            BackendKind::Ept,
            &BackendConfig::default(),
            &BackendParts::new(),
        )
        .unwrap_err();
        assert!(matches!(err, CreateError::MissingHypervisorMemory));
        assert_eq!(
            err.to_string(),
            "the ept MMU backend needs the hypervisor's memory-region port in BackendParts"
        );
    }

    #[cfg(feature = "ept")]
    #[test]
    fn ept_backend_mirrors_memslots_into_the_port() {
        use mmu_api::{Gpa, MemslotFlags, SlotId};
        use mmu_ept::testing::{GuestRam, InProcessHypervisor};

        let ram = Box::leak(Box::new(GuestRam::new(0x4000)));
        let port = Arc::new(InProcessHypervisor::new());
        let mut config = BackendConfig::default();
        config.ept.mmio_cache_entries = 0;
        let parts = BackendParts::new().with_hypervisor_memory(port.clone());
        let backend = create(BackendKind::Ept, &config, &parts).unwrap();
        assert_eq!(backend.name(), "ept");
        let slot = ram.memslot(SlotId(3), Gpa(0x10_0000), MemslotFlags::empty());
        // SAFETY: `ram` is leaked, so its host range stays valid for the
        // rest of the process.
        unsafe { backend.set_memslot(slot) }.unwrap();
        assert_eq!(port.regions(), vec![slot]);
        backend.delete_memslot(SlotId(3)).unwrap();
        assert!(port.regions().is_empty());
    }

    #[test]
    fn gpa_width_reaches_every_backend() {
        let config = BackendConfig::default().with_gpa_width(36);
        #[cfg(feature = "shadow")]
        assert_eq!(config.shadow.gpa_width, 36);
        #[cfg(feature = "ept")]
        assert_eq!(config.ept.gpa_width, 36);
        let _ = config;
    }
}
