//! What the running kernel offers the programs, asked the way `bpftool feature probe`
//! does: load a two-instruction TC program that calls one helper and read the verifier's
//! answer. A helper the programs cannot do without stops the start with an error naming
//! the kernel, the helper and the Linux release that added it; an optional one switches
//! a read-only global of the object.

use std::{ffi::CStr, io};

use super::DatapathError;

/// A BPF helper, by its number in the kernel's `enum bpf_func_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Helper {
    pub id: i32,
    pub name: &'static str,
    /// The Linux release that added it, for the error message.
    pub since: &'static str,
}

/// Helpers the programs call unconditionally (numbers from `include/uapi/linux/bpf.h`).
pub const REQUIRED: &[Helper] = &[
    Helper {
        id: 85,
        name: "bpf_sk_lookup_udp",
        since: "4.20",
    },
    Helper {
        id: 86,
        name: "bpf_sk_release",
        since: "4.20",
    },
    Helper {
        id: 99,
        name: "bpf_skc_lookup_tcp",
        since: "5.2",
    },
    Helper {
        id: 152,
        name: "bpf_redirect_neigh",
        since: "5.10",
    },
];

/// Used where the kernel has it; the precise clock stands in on older kernels.
pub const COARSE_CLOCK: Helper = Helper {
    id: 160,
    name: "bpf_ktime_get_coarse_ns",
    since: "5.11",
};

/// The oldest kernel every required helper exists in.
pub const MINIMUM_KERNEL: &str = "5.10";

/// What the kernel offers beyond the required helpers.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub coarse_clock: bool,
}

impl Features {
    /// Checks `required` and probes the optional helpers.
    pub fn detect(required: &[Helper]) -> Result<Self, DatapathError> {
        for helper in required {
            if !helper_supported(*helper)? {
                return Err(DatapathError::KernelFeature {
                    kernel: kernel_release(),
                    helper: helper.name,
                    since: helper.since,
                    minimum: MINIMUM_KERNEL,
                });
            }
        }
        Ok(Self {
            coarse_clock: helper_supported(COARSE_CLOCK)?,
        })
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: uname fills the struct it is given; zeroed is a valid starting value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: the kernel NUL-terminates `release`.
    unsafe { CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel zero-fills the rest.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// `struct bpf_insn`: opcode, registers (dst low nibble, src high), offset, immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const BPF_CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const BPF_MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const BPF_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// Whether the kernel knows `helper` for TC programs. Like bpftool, a load refused for any
/// reason other than an unknown function (the probe passes no arguments) means it exists.
pub fn helper_supported(helper: Helper) -> Result<bool, DatapathError> {
    let insns = [
        Insn {
            code: BPF_CALL,
            regs: 0,
            off: 0,
            imm: helper.id,
        },
        Insn {
            code: BPF_MOV64_IMM,
            regs: 0,
            off: 0,
            imm: 0,
        },
        Insn {
            code: BPF_EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points at live buffers (instructions, license, log) for the whole
    // call and its size is passed; the kernel reads the struct and writes only the log.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &raw const attr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a file descriptor the kernel just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    let text = String::from_utf8_lossy(&log);
    if text.contains("invalid func") || text.contains("unknown func") {
        return Ok(false);
    }
    match error.raw_os_error() {
        // The verifier refused the argument-less call: the helper is known.
        Some(libc::EINVAL | libc::EACCES) => Ok(true),
        _ => Err(DatapathError::Probe {
            helper: helper.name,
            source: error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_numbers_match_the_uapi_header() {
        // The numbers aya-ebpf's bindings call (include/uapi/linux/bpf.h), so a typo
        // cannot probe another helper than the programs use.
        let ids: Vec<(i32, &str)> = REQUIRED
            .iter()
            .chain([&COARSE_CLOCK])
            .map(|h| (h.id, h.name))
            .collect();
        assert_eq!(
            ids,
            [
                (85, "bpf_sk_lookup_udp"),
                (86, "bpf_sk_release"),
                (99, "bpf_skc_lookup_tcp"),
                (152, "bpf_redirect_neigh"),
                (160, "bpf_ktime_get_coarse_ns"),
            ]
        );
    }
}
