//! How the command line's process returns freed memory.
//!
//! glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so the
//! mid-sized tensors ONNX Runtime allocates and frees every step end up in the heap, where
//! freed space is kept. On the full SD1.5 job that holds about 0.5 GiB more at the peak than is
//! in use (5.37 -> 4.90 GiB, `benches/README.md`) for no measurable speed. The command line is
//! its own process, so it asks glibc to map every block of 128 KiB or more on its own and to
//! give the top of the heap back when it is freed. The library leaves malloc alone (a host's
//! process is the host's); hosts can set the same with `MALLOC_MMAP_THRESHOLD_=131072
//! MALLOC_TRIM_THRESHOLD_=0`.

/// The mmap threshold set: glibc's default starting value, held there.
pub const MMAP_THRESHOLD: i32 = 128 * 1024;

/// glibc settings a user already made in the environment, which win.
const USER_SETTINGS: [&str; 3] = [
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Applies the settings unless the environment sets glibc's malloc itself; returns whether
/// they were applied.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn return_freed_memory_promptly() -> bool {
    if USER_SETTINGS
        .iter()
        .any(|name| std::env::var_os(name).is_some())
    {
        return false;
    }
    // glibc's <malloc.h>.
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: mallopt only changes allocator parameters; it is called before any thread of the
    // process starts, and both values are in glibc's documented ranges.
    unsafe { mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 && mallopt(M_TRIM_THRESHOLD, 0) == 1 }
}

/// Other C libraries keep their defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn return_freed_memory_promptly() -> bool {
    let _ = USER_SETTINGS;
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_the_settings_unless_the_user_set_them() {
        let user_set = USER_SETTINGS
            .iter()
            .any(|name| std::env::var_os(name).is_some());
        assert_eq!(return_freed_memory_promptly(), !user_set);
    }
}
