//! Output files (issue 19): written whole or not at all, through temporaries that never
//! outlive a failure; a symbolic link in an output's place replaced, never written through.

use std::io::Write;
use std::path::Path;

use tcd_ort::image_io::{
    check_output_path, commit_all, stage_bytes, write_atomic, write_png, RgbImage,
};
use tcd_ort::Error;

use crate::common::{read_png_rgb, scratch_dir};

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_failing_write_leaves_the_old_file_and_no_temporary() {
    let dir = scratch_dir("atomic-fail");
    let path = dir.join("out.json");
    std::fs::write(&path, b"old").expect("write");
    // What a full disk does half way through a file.
    let err = write_atomic(&path, true, |w| {
        w.write_all(b"partial").expect("buffered");
        Err(Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left"),
        ))
    })
    .expect_err("the write fails");
    assert!(err.to_string().contains("no space left"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), b"old");
    assert_eq!(listing(&dir), ["out.json"]);

    write_atomic(&path, true, |w| {
        w.write_all(b"new").map_err(|e| Error::io(&path, e))
    })
    .expect("write");
    assert_eq!(std::fs::read(&path).expect("read"), b"new");
    assert_eq!(listing(&dir), ["out.json"]);
}

#[test]
fn staged_files_appear_together_on_commit() {
    let dir = scratch_dir("atomic-stage");
    let (a, b, c) = (dir.join("a.txt"), dir.join("b.txt"), dir.join("c.txt"));
    let staged_a = stage_bytes(&a, false, b"a").expect("stage a");
    let staged_b = stage_bytes(&b, false, b"b").expect("stage b");
    let staged_c = stage_bytes(&c, false, b"c").expect("stage c");
    assert!(!a.exists() && !b.exists() && !c.exists());
    let temporaries = listing(&dir);
    assert_eq!(temporaries.len(), 3, "{temporaries:?}");
    assert!(
        temporaries
            .iter()
            .all(|n| n.starts_with('.') && n.contains(".tmp-")),
        "{temporaries:?}"
    );
    // An output given up (a later one failed) takes its temporary with it.
    drop(staged_c);
    commit_all(vec![staged_a, staged_b]).expect("commit");
    assert_eq!(listing(&dir), ["a.txt", "b.txt"]);
    assert_eq!(std::fs::read(&b).expect("read"), b"b");
}

#[test]
fn without_overwrite_a_file_that_appears_meanwhile_is_kept() {
    let dir = scratch_dir("atomic-race");
    let path = dir.join("out.txt");
    let staged = stage_bytes(&path, false, b"ours").expect("stage");
    std::fs::write(&path, b"theirs").expect("write");
    let err = commit_all(vec![staged]).expect_err("refused");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), b"theirs");
    assert_eq!(listing(&dir), ["out.txt"]);
}

#[cfg(unix)]
#[test]
fn overwrite_replaces_a_symlink_not_its_target() {
    let dir = scratch_dir("atomic-symlink");
    let outside = scratch_dir("atomic-symlink-target");
    let target = outside.join("precious.png");
    std::fs::write(&target, b"precious").expect("write");
    let link = dir.join("out.png");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let image = RgbImage::new(2, 2, vec![7; 12]).expect("image");

    let err = write_png(&link, &image, &[], false).expect_err("exists");
    assert!(err.to_string().contains("already exists"), "{err}");
    write_png(&link, &image, &[], true).expect("overwrite");
    assert_eq!(std::fs::read(&target).expect("read"), b"precious");
    let meta = std::fs::symlink_metadata(&link).expect("meta");
    assert!(meta.file_type().is_file(), "the link itself was replaced");
    assert_eq!(read_png_rgb(&link).2, vec![7; 12]);

    // A dangling link is in the way too: without --overwrite it is kept.
    let dangling = dir.join("dangling.png");
    std::os::unix::fs::symlink(outside.join("nowhere.png"), &dangling).expect("symlink");
    assert!(write_png(&dangling, &image, &[], false).is_err());
    assert!(!outside.join("nowhere.png").exists());
    assert_eq!(listing(&dir), ["dangling.png", "out.png"]);
}

#[test]
fn unwritable_outputs_are_found_by_the_check() {
    let dir = scratch_dir("atomic-check");
    check_output_path(&dir.join("fine.png"), false).expect("writable");
    assert!(listing(&dir).is_empty(), "the probe is removed");
    let err = check_output_path(&dir, true).expect_err("a directory");
    assert!(err.to_string().contains("is a directory"), "{err}");
    let err = check_output_path(&dir.join("no-such-dir/x.png"), true).expect_err("no dir");
    assert!(err.to_string().contains("does not exist"), "{err}");
    // Not even root may create a file in /proc.
    #[cfg(target_os = "linux")]
    {
        let err = check_output_path(Path::new("/proc/tcd-ort-out.png"), true).expect_err("proc");
        assert!(err.to_string().contains("cannot create a file"), "{err}");
    }
}
