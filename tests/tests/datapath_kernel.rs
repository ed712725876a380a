//! What the running kernel offers the programs. The VM tier runs this on every kernel
//! vcnpath supports: the helper probe agrees with the kernel, the object loads with the
//! clock the kernel has, and a helper the kernel lacks stops the start with the error the
//! README documents (on 5.10, the oldest kernel, with a real helper it lacks).

use vcnpath::datapath::{
    DatapathError,
    probe::{self, COARSE_CLOCK, Features, Helper},
};
use vcnpath_tests::{datapath_fixture::Fixture, privileged::have_root};

/// `(major, minor)` of the running kernel.
fn kernel_version() -> (u32, u32) {
    let release = probe::kernel_release();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (
        parts.next().expect("a major version"),
        parts.next().expect("a minor version"),
    )
}

#[test]
fn the_coarse_clock_probe_matches_the_kernel_and_the_object_loads_either_way() {
    if !have_root("the_coarse_clock_probe_matches_the_kernel") {
        return;
    }
    let has = probe::helper_supported(COARSE_CLOCK).expect("probing works as root");
    assert_eq!(
        has,
        kernel_version() >= (5, 11),
        "bpf_ktime_get_coarse_ns arrived in Linux 5.11; the probe on {} says {has}",
        probe::kernel_release()
    );
    for helper in probe::REQUIRED {
        assert!(
            probe::helper_supported(*helper).expect("probing works as root"),
            "{} ({}) must exist on {}",
            helper.name,
            helper.since,
            probe::kernel_release()
        );
    }
    // The object passes the verifier with whichever clock the probe chose.
    let _fx = Fixture::new("kernel-clock", 1024, 65535);
}

#[test]
fn a_helper_the_kernel_lacks_stops_the_start_with_the_documented_error() {
    if !have_root("a_helper_the_kernel_lacks_stops_the_start") {
        return;
    }
    // On kernels before 5.11 a helper the programs use where it exists; everywhere a
    // helper number no kernel has yet.
    let missing = if kernel_version() < (5, 11) {
        COARSE_CLOCK
    } else {
        Helper {
            id: 100_000,
            name: "bpf_from_a_later_kernel",
            since: "99.0",
        }
    };
    let mut required = probe::REQUIRED.to_vec();
    required.push(missing);
    let error = Features::detect(&required).expect_err("a missing helper must stop the start");
    assert!(
        matches!(error, DatapathError::KernelFeature { helper, .. } if helper == missing.name),
        "expected the missing-helper error for {}, got {error:?}",
        missing.name
    );
    assert_eq!(
        error.to_string(),
        format!(
            "kernel {} lacks the BPF helper {} (added in Linux {}); vcnpath needs Linux {} or newer",
            probe::kernel_release(),
            missing.name,
            missing.since,
            probe::MINIMUM_KERNEL
        )
    );
}
