//! What a program decided for a packet: the TC action and the reason it is counted under.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

use vcnpath_common::Reason;

/// The verdict returned to TC and the counter it is accounted to.
#[derive(Clone, Copy)]
pub struct Decision {
    pub action: i32,
    pub reason: Reason,
}

impl Decision {
    /// Let the packet continue unmodified (or as rewritten) on its kernel path.
    #[inline(always)]
    pub const fn pass(reason: Reason) -> Self {
        Self {
            action: TC_ACT_OK,
            reason,
        }
    }

    /// Drop the packet.
    #[inline(always)]
    pub const fn drop(reason: Reason) -> Self {
        Self {
            action: TC_ACT_SHOT,
            reason,
        }
    }

    /// The packet was handed to `bpf_redirect*`.
    #[inline(always)]
    pub const fn redirect(reason: Reason) -> Self {
        Self {
            action: TC_ACT_REDIRECT,
            reason,
        }
    }
}

/// Result of a step: `Err` short-circuits with a final decision.
pub type Step<T> = Result<T, Decision>;
