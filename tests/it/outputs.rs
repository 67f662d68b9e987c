//! Output files (issue 19): written whole or not at all, through temporaries that never
//! outlive a failure; a symbolic link in an output's place replaced, never written through;
//! every output checked before the model loads; and a run stopped by SIGINT or SIGTERM leaving
//! no file behind.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tcd_ort::image_io::{
    check_output_path, commit_all, stage_bytes, write_atomic, write_png, RgbImage,
};
use tcd_ort::Error;

use crate::common::{committed_model, read_png_rgb, repo_root, scratch_dir};

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

// --- The command line. ----------------------------------------------------------------------

fn demo_model() -> String {
    committed_model("tiny-sd15")
}

fn tcd(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tcd-ort"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("the binary starts")
}

/// `run` on the demo model, with progress on stderr (no `-q`).
fn run_args(output: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--model", &demo_model(), "--prompt", "a cat"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--seed".into(), "0".into(), "--output".into()]);
    args.push(output.to_string_lossy().into_owned());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn outputs_that_cannot_be_written_are_refused_before_loading() {
    let dir = scratch_dir("cli-unwritable");
    let png = dir.join("out.png");
    std::fs::create_dir(dir.join("folder.png")).expect("mkdir");
    std::fs::write(dir.join("old.json"), b"{}").expect("write");
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let mut cases = vec![
        (dir.join("folder.png"), vec![], "--output"),
        (
            png.clone(),
            vec!["--save-latents", "/nonexistent-dir/l.npy"],
            "--save-latents",
        ),
        (png.clone(), vec!["--timings", "TIMINGS"], "--timings"),
    ];
    #[cfg(target_os = "linux")]
    cases.push((
        png.clone(),
        vec!["--save-latents", "/proc/l.npy"],
        "--save-latents",
    ));
    let timings = s(dir.join("old.json"));
    for (output, extra, flag) in cases {
        let extra: Vec<&str> = extra
            .iter()
            .map(|a| if *a == "TIMINGS" { timings.as_str() } else { a })
            .collect();
        let out = tcd(&run_args(&output, &extra));
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{flag}: {err}");
        assert!(err.contains(&format!("error: {flag}")), "{flag}: {err}");
        assert!(!err.contains("loaded"), "refused before loading: {err}");
    }
    assert_eq!(listing(&dir), ["folder.png", "old.json"]);
    assert_eq!(std::fs::read(dir.join("old.json")).expect("read"), b"{}");
}

#[cfg(unix)]
#[test]
fn overwrite_on_the_command_line_replaces_a_symlink_not_its_target() {
    let dir = scratch_dir("cli-symlink");
    let outside = scratch_dir("cli-symlink-target");
    let target = outside.join("precious.png");
    std::fs::write(&target, b"precious").expect("write");
    let link = dir.join("out.png");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let out = tcd(&run_args(&link, &["--steps", "1", "-q", "--overwrite"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&target).expect("read"), b"precious");
    assert!(std::fs::symlink_metadata(&link)
        .expect("meta")
        .file_type()
        .is_file());
    assert!(read_png_rgb(&link).0 > 0);
}

/// Starts a long run (4 images, 50 steps), waits for its first step on stderr, calls `act`
/// with the process id, and returns the exit status and all of stderr.
#[cfg(unix)]
fn during_generation(
    output: &Path,
    extra: &[&str],
    act: impl FnOnce(u32),
) -> (std::process::ExitStatus, String) {
    let mut args = run_args(output, &["--steps", "50", "--num-images", "4"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcd-ort"))
        .args(&args)
        .current_dir(repo_root())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("the binary starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    let mut act = Some(act);
    let mut line = String::new();
    while stderr.read_line(&mut line).expect("read stderr") > 0 {
        if line.starts_with("1/50 steps") {
            if let Some(act) = act.take() {
                act(child.id());
            }
        }
        seen.push_str(&line);
        line.clear();
    }
    let status = child.wait().expect("wait");
    assert!(
        act.is_none(),
        "the run never reached its first step: {seen}"
    );
    (status, seen)
}

#[cfg(unix)]
fn send(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill starts");
    assert!(status.success());
}

#[cfg(unix)]
#[test]
fn a_signal_during_generation_stops_it_and_leaves_no_file() {
    use std::os::unix::process::ExitStatusExt;
    for (signal, code, name) in [("INT", 130, "SIGINT"), ("TERM", 143, "SIGTERM")] {
        let dir = scratch_dir(&format!("cli-signal-{signal}"));
        let png = dir.join("out.png");
        let latents = dir.join("latents.npy");
        let extra = ["--save-latents", latents.to_str().expect("utf-8")];
        let (status, err) = during_generation(&png, &extra, |pid| send(signal, pid));
        assert_eq!(status.code(), Some(code), "{name}: {status:?} {err}");
        assert_eq!(status.signal(), None, "exits on its own: {err}");
        assert!(err.contains(&format!("interrupted by {name}")), "{err}");
        assert!(!err.contains("50/50 steps"), "stopped between steps: {err}");
        assert!(listing(&dir).is_empty(), "{name}: {:?}", listing(&dir));
    }
}

#[cfg(unix)]
#[test]
fn a_second_sigint_exits_at_once_and_leaves_no_file() {
    let dir = scratch_dir("cli-signal-twice");
    let png = dir.join("out.png");
    let (status, err) = during_generation(&png, &[], |pid| {
        send("INT", pid);
        // Two signals at once would merge into one.
        std::thread::sleep(std::time::Duration::from_millis(20));
        send("INT", pid);
    });
    // The engine may have reached the end of its step between the two: either way, 130.
    assert_eq!(status.code(), Some(130), "{status:?} {err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
}

#[cfg(unix)]
#[test]
fn a_failing_save_latents_leaves_no_png() {
    let dir = scratch_dir("cli-latents-fail");
    let elsewhere = scratch_dir("cli-latents-fail-npy");
    let png = dir.join("out.png");
    let latents = elsewhere.join("latents.npy");
    let extra = ["--save-latents", latents.to_str().expect("utf-8")];
    // The directory passes the check, then goes away while the images are generated.
    let (status, err) = during_generation(&png, &extra, |_| {
        std::fs::remove_dir_all(&elsewhere).expect("remove the latents' directory");
    });
    assert!(!status.success(), "{err}");
    assert!(err.contains("--save-latents"), "{err}");
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
}

// --- The C ABI. -----------------------------------------------------------------------------

/// `tcd_result_write_png` goes through the same writer: the image the result holds, no
/// replacement without `overwrite`, a symlink replaced rather than written through, and a
/// missing directory an I/O error that leaves nothing behind.
#[cfg(unix)]
#[test]
fn the_c_abi_writes_pngs_atomically() {
    use std::ffi::CString;
    use std::ptr::null_mut;
    use tcd_ort::ffi::*;

    let dir = scratch_dir("ffi-write-png");
    let outside = scratch_dir("ffi-write-png-target");
    let target = outside.join("precious.png");
    std::fs::write(&target, b"precious").expect("write");
    let link = dir.join("out.png");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let c = |p: &Path| CString::new(p.to_str().expect("utf-8")).expect("no NUL");
    let (link_c, missing_c) = (c(&link), c(&dir.join("no-such-dir").join("x.png")));
    let model = CString::new(demo_model()).expect("no NUL");
    // SAFETY: live handles and NUL-terminated strings throughout; each handle freed once.
    unsafe {
        let options = tcd_engine_options_new();
        assert_eq!(
            tcd_engine_options_set_model(options, model.as_ptr()),
            tcd_status::TCD_OK
        );
        let mut engine = null_mut();
        assert_eq!(tcd_engine_new(options, &mut engine), tcd_status::TCD_OK);
        tcd_engine_options_free(options);
        let request = tcd_request_new();
        tcd_request_set_prompt(request, c"a cat".as_ptr());
        tcd_request_set_steps(request, 1);
        let mut result = null_mut();
        let status = tcd_engine_generate(engine, request, None, null_mut(), &mut result);
        assert_eq!(status, tcd_status::TCD_OK);

        let write = |path: &CString, index, overwrite| {
            tcd_result_write_png(result, index, path.as_ptr(), overwrite)
        };
        assert_eq!(write(&link_c, 0, 0), tcd_status::TCD_ERR_INVALID_ARGUMENT);
        assert_eq!(write(&link_c, 1, 1), tcd_status::TCD_ERR_INVALID_ARGUMENT);
        assert_eq!(write(&missing_c, 0, 1), tcd_status::TCD_ERR_IO);
        assert_eq!(write(&link_c, 0, 1), tcd_status::TCD_OK);
        let (mut w, mut h, mut stride, mut pixels) = (0, 0, 0, std::ptr::null());
        tcd_result_image(result, 0, &mut w, &mut h, &mut stride, &mut pixels);
        let expected = std::slice::from_raw_parts(pixels, stride * h as usize).to_vec();
        tcd_result_free(result);
        tcd_request_free(request);
        tcd_engine_free(engine);
        assert_eq!(read_png_rgb(&link), (w, h, expected));
    }
    assert_eq!(std::fs::read(&target).expect("read"), b"precious");
    assert!(std::fs::symlink_metadata(&link)
        .expect("meta")
        .file_type()
        .is_file());
    assert_eq!(listing(&dir), ["out.png"]);
}
