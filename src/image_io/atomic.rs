//! Output files that appear whole or not at all.
//!
//! A file is written to a temporary beside its destination (same directory, so the same
//! filesystem), synced to disk, and only then moved over the destination with a rename. A run
//! interrupted or failing half way (a full disk, a signal, a later output that cannot be
//! written) leaves the destination as it was: absent, or the old file intact. Several outputs of
//! one run are staged first and committed together with [`commit_all`], so that one failing
//! output keeps the others from appearing.
//!
//! A rename replaces a symbolic link at the destination by the new file: the link's target is
//! never written through. Without `overwrite`, the temporary is hard-linked to the destination,
//! which fails if anything (a file, a link, a directory) has appeared there since the check.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Temporaries of this process are numbered, so that two outputs staged at once (or a probe)
/// never share a name.
static NEXT_TEMPORARY: AtomicU64 = AtomicU64::new(0);

/// Longest part of the destination's name kept in a temporary's name: file names are limited
/// (255 bytes on most filesystems) and the temporary adds a dot and a suffix.
const NAME_PREFIX_MAX: usize = 120;

/// An output written to a temporary file beside its destination, not yet in place. Dropping it
/// without [`PendingFile::commit`] removes the temporary.
#[derive(Debug)]
pub struct PendingFile {
    destination: PathBuf,
    temporary: PathBuf,
    overwrite: bool,
    /// False once the temporary has been moved into place (nothing left to remove).
    pending: bool,
}

/// The directory a path lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a new, empty temporary for `destination` in `dir`: `.NAME.tmp-PID-N`, with a number
/// no other temporary of this process has used (and created exclusively, so that a stale file
/// or link of that name is never reused or followed).
fn create_temporary(dir: &Path, destination: &Path) -> std::io::Result<(PathBuf, File)> {
    let name: String = destination
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(NAME_PREFIX_MAX).collect())
        .unwrap_or_default();
    loop {
        let n = NEXT_TEMPORARY.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = OsString::from(".");
        temp_name.push(format!("{name}.tmp-{}-{n}", std::process::id()));
        let path = dir.join(temp_name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn already_exists(path: &Path) -> Error {
    Error::invalid(format!(
        "{} already exists; pass --overwrite to replace it",
        path.display()
    ))
}

impl PendingFile {
    /// Writes the content of `destination` to a fresh temporary beside it with `write` (which
    /// gets a buffered writer), then flushes and syncs it. Refuses an existing destination
    /// unless `overwrite`, and a destination that is a directory. On any failure the temporary
    /// is removed and the destination left alone.
    pub fn write(
        destination: &Path,
        overwrite: bool,
        write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
    ) -> Result<PendingFile> {
        check_destination(destination, overwrite)?;
        let dir = parent_dir(destination);
        let (temporary, file) = create_temporary(dir, destination).map_err(|e| {
            Error::io(
                destination,
                std::io::Error::new(
                    e.kind(),
                    format!("cannot create a file in {}: {e}", dir.display()),
                ),
            )
        })?;
        // From here on, dropping `pending` removes the temporary.
        let pending = PendingFile {
            destination: destination.to_path_buf(),
            temporary,
            overwrite,
            pending: true,
        };
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        let file = writer
            .into_inner()
            .map_err(|e| Error::io(destination, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(destination, e))?;
        Ok(pending)
    }

    /// Where the file goes once committed.
    pub fn destination(&self) -> &Path {
        &self.destination
    }

    /// Where the content is until it is committed.
    pub fn temporary(&self) -> &Path {
        &self.temporary
    }

    /// Moves the temporary over the destination and syncs the directory.
    pub fn commit(self) -> Result<()> {
        commit_all(vec![self])
    }

    /// Moves the temporary into place; the directory is synced by the caller.
    fn move_into_place(&mut self) -> Result<()> {
        if self.overwrite {
            std::fs::rename(&self.temporary, &self.destination)
                .map_err(|e| Error::io(&self.destination, e))?;
        } else {
            // A hard link fails when the destination exists, where a rename would replace it.
            match std::fs::hard_link(&self.temporary, &self.destination) {
                Ok(()) => {
                    self.pending = false;
                    let _ = std::fs::remove_file(&self.temporary);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(already_exists(&self.destination));
                }
                // Filesystems without hard links (FAT, some network mounts): check, then
                // rename; only a file created in between would be replaced.
                Err(_) => {
                    if std::fs::symlink_metadata(&self.destination).is_ok() {
                        return Err(already_exists(&self.destination));
                    }
                    std::fs::rename(&self.temporary, &self.destination)
                        .map_err(|e| Error::io(&self.destination, e))?;
                }
            }
        }
        self.pending = false;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if self.pending {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

/// Moves every staged file into place, in order, then syncs their directories. All of them
/// were written and synced before, so what can still fail here is a rename (a destination that
/// appeared meanwhile without `overwrite`): the files before it stay in place, the rest are
/// removed with their temporaries.
pub fn commit_all(files: Vec<PendingFile>) -> Result<()> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for mut file in files {
        file.move_into_place()?;
        let dir = parent_dir(&file.destination).to_path_buf();
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    for dir in dirs {
        sync_dir(&dir);
    }
    Ok(())
}

/// Makes a rename durable. Best effort: the file is complete and in place already, and some
/// filesystems refuse to sync a directory; a failure here only weakens what survives a power
/// cut, which is no reason to fail a finished run.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Refuses a destination that is a directory, or that exists when `overwrite` is false.
fn check_destination(path: &Path, overwrite: bool) -> Result<()> {
    if path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
        ));
    }
    // A link counts as existing even when it points nowhere: it would be replaced.
    if !overwrite && std::fs::symlink_metadata(path).is_ok() {
        return Err(already_exists(path));
    }
    Ok(())
}

/// Checks, before any work, that `path` can be written as an output: not a directory, not
/// existing unless `overwrite`, in a directory that exists and where a file can be created
/// (a temporary is created there and removed at once).
pub fn check_output_path(path: &Path, overwrite: bool) -> Result<()> {
    check_destination(path, overwrite)?;
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the directory {} does not exist", dir.display()),
            ),
        ));
    }
    let (probe, file) = create_temporary(dir, path).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(
                e.kind(),
                format!("cannot create a file in {}: {e}", dir.display()),
            ),
        )
    })?;
    drop(file);
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Writes `destination` atomically in one go: [`PendingFile::write`], then
/// [`PendingFile::commit`].
pub fn write_atomic(
    destination: &Path,
    overwrite: bool,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    PendingFile::write(destination, overwrite, write)?.commit()
}

/// An [`Error::Io`] for `path` from an error of a writer into it.
pub(crate) fn write_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// Writes `bytes` to a staged file (for text outputs such as JSON reports).
pub fn stage_bytes(destination: &Path, overwrite: bool, bytes: &[u8]) -> Result<PendingFile> {
    PendingFile::write(destination, overwrite, |w| {
        w.write_all(bytes).map_err(write_error(destination))
    })
}
