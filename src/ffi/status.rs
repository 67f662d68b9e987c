//! Status codes, the thread-local last error, and the panic boundary every entry point uses.

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::Error;

/// What a call did. `TCD_OK` is 0 and every failure is nonzero; the values are stable (new
/// codes are only ever appended). On failure, `tcd_last_error_message` says what went wrong.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tcd_status {
    /// Success.
    TCD_OK = 0,
    /// An argument or request setting is out of range or inconsistent (e.g. zero steps, an
    /// image-to-image request without an image, invalid UTF-8, an unknown execution provider).
    TCD_ERR_INVALID_ARGUMENT = 1,
    /// A pointer the call requires was NULL.
    TCD_ERR_NULL_POINTER = 2,
    /// Reading or writing a file failed.
    TCD_ERR_IO = 3,
    /// The model directory (or a LoRA, or a hub download) is missing a file or is malformed.
    TCD_ERR_MODEL = 4,
    /// ONNX Runtime could not be found or loaded, an execution provider is unavailable, or a
    /// graph failed to run.
    TCD_ERR_RUNTIME = 5,
    /// The tokenizer files could not be read or the prompt could not be encoded.
    TCD_ERR_TOKENIZER = 6,
    /// An input image could not be used.
    TCD_ERR_IMAGE = 7,
    /// The progress callback returned nonzero.
    TCD_ERR_CANCELLED = 8,
    /// The library panicked (a bug: please report it with the message), or a progress callback
    /// unwound. The handles passed to the call are still valid to free; an engine is marked
    /// unusable, and later calls on it return `TCD_ERR_POISONED`.
    TCD_ERR_PANIC = 9,
    /// An invariant of the engine failed (a defect of tcd-ort or of the model's graphs, not of
    /// the request): please report it with the message.
    TCD_ERR_INTERNAL = 10,
    /// The engine is unusable: an earlier call on it returned `TCD_ERR_PANIC` and may have left
    /// it half-updated. Free it and create a new one.
    TCD_ERR_POISONED = 11,
}

impl tcd_status {
    /// The code for a library error; every variant is named so that a new one needs a decision.
    pub(crate) fn of(error: &Error) -> Self {
        match error {
            Error::InvalidInput(_) | Error::InvalidField { .. } | Error::OverLimit { .. } => {
                tcd_status::TCD_ERR_INVALID_ARGUMENT
            }
            Error::Io { .. } => tcd_status::TCD_ERR_IO,
            Error::Model { .. } | Error::NonFinite { .. } | Error::Lora { .. } => {
                tcd_status::TCD_ERR_MODEL
            }
            Error::Runtime(_) => tcd_status::TCD_ERR_RUNTIME,
            Error::Tokenizer(_) => tcd_status::TCD_ERR_TOKENIZER,
            Error::Image { .. } => tcd_status::TCD_ERR_IMAGE,
            Error::Cancelled => tcd_status::TCD_ERR_CANCELLED,
            Error::Internal { .. } => tcd_status::TCD_ERR_INTERNAL,
        }
    }

    fn name(self) -> &'static CStr {
        match self {
            tcd_status::TCD_OK => c"TCD_OK",
            tcd_status::TCD_ERR_INVALID_ARGUMENT => c"TCD_ERR_INVALID_ARGUMENT",
            tcd_status::TCD_ERR_NULL_POINTER => c"TCD_ERR_NULL_POINTER",
            tcd_status::TCD_ERR_IO => c"TCD_ERR_IO",
            tcd_status::TCD_ERR_MODEL => c"TCD_ERR_MODEL",
            tcd_status::TCD_ERR_RUNTIME => c"TCD_ERR_RUNTIME",
            tcd_status::TCD_ERR_TOKENIZER => c"TCD_ERR_TOKENIZER",
            tcd_status::TCD_ERR_IMAGE => c"TCD_ERR_IMAGE",
            tcd_status::TCD_ERR_CANCELLED => c"TCD_ERR_CANCELLED",
            tcd_status::TCD_ERR_PANIC => c"TCD_ERR_PANIC",
            tcd_status::TCD_ERR_INTERNAL => c"TCD_ERR_INTERNAL",
            tcd_status::TCD_ERR_POISONED => c"TCD_ERR_POISONED",
        }
    }
}

/// Why a call failed: its status and the message stored for `tcd_last_error_message`.
#[derive(Debug)]
pub(crate) struct Failure {
    status: tcd_status,
    message: String,
}

impl Failure {
    /// `TCD_ERR_INVALID_ARGUMENT` with a message.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Failure {
            status: tcd_status::TCD_ERR_INVALID_ARGUMENT,
            message: message.into(),
        }
    }

    /// `TCD_ERR_POISONED`: the handle `what` is unusable since an earlier call panicked.
    pub(crate) fn poisoned(what: &str) -> Self {
        Failure {
            status: tcd_status::TCD_ERR_POISONED,
            message: format!(
                "this {what} is unusable: an earlier call on it panicked (TCD_ERR_PANIC) and may have left it half-updated; free it and create a new one"
            ),
        }
    }

    /// `TCD_ERR_NULL_POINTER` for the argument `what`.
    pub(crate) fn null(what: &str) -> Self {
        Failure {
            status: tcd_status::TCD_ERR_NULL_POINTER,
            message: format!("`{what}` is NULL"),
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure {
            status: tcd_status::of(&error),
            message: error.to_string(),
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    format!("internal error (panic): {what}; please report this as a bug")
}

/// Runs one fallible entry point: clears the last error, catches panics, and turns a failure
/// into its status and a message prefixed with the function's name.
pub(crate) fn guard(function: &str, f: impl FnOnce() -> Result<(), Failure>) -> tcd_status {
    set_last_error(String::new());
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => tcd_status::TCD_OK,
        Ok(Err(failure)) => {
            set_last_error(format!("{function}: {}", failure.message));
            failure.status
        }
        Err(payload) => {
            set_last_error(format!("{function}: {}", panic_message(payload.as_ref())));
            tcd_status::TCD_ERR_PANIC
        }
    }
}

/// Runs a constructor that cannot fail except by panicking: a panic gives NULL and a message.
pub(crate) fn guard_new<T>(function: &str, f: impl FnOnce() -> T) -> *mut T {
    set_last_error(String::new());
    match catch_unwind(AssertUnwindSafe(|| Box::into_raw(Box::new(f())))) {
        Ok(ptr) => ptr,
        Err(payload) => {
            set_last_error(format!("{function}: {}", panic_message(payload.as_ref())));
            std::ptr::null_mut()
        }
    }
}

/// Runs an infallible query; a panic gives `fallback`.
pub(crate) fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// Frees a handle made by [`guard_new`] (or `Box::into_raw`); NULL is a no-op.
///
/// # Safety
///
/// `ptr` is NULL or came from `Box::into_raw(Box<T>)` and has not been freed.
pub(crate) unsafe fn free_box<T>(ptr: *mut T) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: the caller passes a pointer from Box::into_raw that nothing else frees.
    let boxed = unsafe { Box::from_raw(ptr) };
    // A panicking destructor must not unwind into C; the memory is then leaked, not reused.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(boxed)));
}

/// Borrows a handle, or fails with `TCD_ERR_NULL_POINTER`.
///
/// # Safety
///
/// `ptr` is NULL or points to a live `T` that nothing mutates during the borrow.
pub(crate) unsafe fn borrow<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller's contract.
    unsafe { ptr.as_ref() }.ok_or_else(|| Failure::null(what))
}

/// Borrows a handle mutably, or fails with `TCD_ERR_NULL_POINTER`.
///
/// # Safety
///
/// `ptr` is NULL or points to a live `T` that nothing else accesses during the borrow.
pub(crate) unsafe fn borrow_mut<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: the caller's contract.
    unsafe { ptr.as_mut() }.ok_or_else(|| Failure::null(what))
}

/// Copies a NUL-terminated UTF-8 string; NULL gives `None`.
///
/// # Safety
///
/// `ptr` is NULL or points to a NUL-terminated string that stays valid during the call.
pub(crate) unsafe fn opt_string(ptr: *const c_char, what: &str) -> Result<Option<String>, Failure> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes
        .to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|e| Failure::invalid(format!("`{what}` is not valid UTF-8: {e}")))
}

/// Copies a NUL-terminated UTF-8 string that must be given.
///
/// # Safety
///
/// As for [`opt_string`].
pub(crate) unsafe fn string(ptr: *const c_char, what: &str) -> Result<String, Failure> {
    // SAFETY: the caller's contract.
    unsafe { opt_string(ptr, what) }?.ok_or_else(|| Failure::null(what))
}

/// Copies the calling thread's last error message into `buf` and returns its full length in
/// bytes, not counting the terminating NUL (0 when the last call on this thread succeeded).
///
/// At most `len - 1` bytes are written, cut at a UTF-8 character boundary, followed by a NUL;
/// nothing is written when `buf` is NULL or `len` is 0. Like `snprintf`, a return value
/// `>= len` means the message was truncated: call again with a buffer of return value + 1
/// bytes. The message is kept until the next fallible call on the same thread.
///
/// # Safety
///
/// `buf` is NULL or points to at least `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn tcd_last_error_message(buf: *mut c_char, len: usize) -> usize {
    guard_value(0, || {
        LAST_ERROR.with(|e| {
            let message = e.borrow();
            // SAFETY: the caller's contract.
            unsafe { copy_out(&message, buf, len) }
        })
    })
}

/// Copies `text` into `buf` like `snprintf`: at most `len - 1` bytes cut at a UTF-8 boundary,
/// then a NUL; nothing when `buf` is NULL or `len` is 0. Returns the full length.
///
/// # Safety
///
/// `buf` is NULL or points to at least `len` writable bytes.
pub(crate) unsafe fn copy_out(text: &str, buf: *mut c_char, len: usize) -> usize {
    if !buf.is_null() && len > 0 {
        let mut n = text.len().min(len - 1);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        // SAFETY: the caller provides `len` writable bytes and n + 1 <= len; the text is a
        // Rust string and cannot overlap the caller's buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    text.len()
}

/// The name of a status code as a static NUL-terminated string (`"TCD_ERR_IO"`), or
/// `"TCD_ERR_UNKNOWN"` for a value that is not a status. Never NULL; do not free it.
#[no_mangle]
pub extern "C" fn tcd_status_name(status: i32) -> *const c_char {
    const ALL: [tcd_status; 12] = [
        tcd_status::TCD_OK,
        tcd_status::TCD_ERR_INVALID_ARGUMENT,
        tcd_status::TCD_ERR_NULL_POINTER,
        tcd_status::TCD_ERR_IO,
        tcd_status::TCD_ERR_MODEL,
        tcd_status::TCD_ERR_RUNTIME,
        tcd_status::TCD_ERR_TOKENIZER,
        tcd_status::TCD_ERR_IMAGE,
        tcd_status::TCD_ERR_CANCELLED,
        tcd_status::TCD_ERR_PANIC,
        tcd_status::TCD_ERR_INTERNAL,
        tcd_status::TCD_ERR_POISONED,
    ];
    ALL.iter()
        .find(|s| **s as i32 == status)
        .map_or(c"TCD_ERR_UNKNOWN", |s| s.name())
        .as_ptr()
}

/// The library version (`"0.1.0"`) as a static NUL-terminated string. Never NULL; do not free
/// it.
#[no_mangle]
pub extern "C" fn tcd_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
