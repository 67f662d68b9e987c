//! `--model owner/name` against a local stand-in for the Hugging Face hub: what is downloaded,
//! where it lands in the cache, offline use of that cache (downloaded or copied by hand), and the
//! errors a user sees.
//!
//! The stand-in serves what `hf-hub`'s sync client asks for and nothing more: the listing at
//! `/api/models/{id}/revision/{rev}` (`sha` and `siblings`), and files at
//! `/{id}/resolve/{rev}/{file}`, which the client first asks for with `Range: bytes=0-0` to read
//! `x-repo-commit` (the snapshot's name), `etag` (the blob's name) and `Content-Range` (the size),
//! then downloads with `Range: bytes={start}-`. It listens on 127.0.0.1 only.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::{read_png_rgb, repo_root, scratch_dir};

/// The hub id the committed demo model is served under.
const REPO_ID: &str = "tcd-ort/tiny-sd15";
/// The commit the stand-in reports for every repository (40 hex digits, like a git sha).
const COMMIT: &str = "1f3e5c7a9b2d4f6e8a0c1b3d5f7e9a2c4b6d8f0e";
/// Files in the served repository that a pipeline never reads.
const UNWANTED: &[&str] = &["README.md", "unet/diffusion_pytorch_model.safetensors"];

/// One repository: its commit and its files by path.
pub struct FakeRepo {
    pub sha: String,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl FakeRepo {
    /// The committed demo model, plus a README and PyTorch weights that must not be fetched.
    pub fn tiny_sd15() -> Self {
        let mut files = BTreeMap::new();
        collect_files(&demo_model(), "", &mut files);
        for name in UNWANTED {
            files.insert(
                (*name).to_string(),
                format!("not needed: {name}\n").into_bytes(),
            );
        }
        FakeRepo {
            sha: COMMIT.to_string(),
            files,
        }
    }
}

fn collect_files(dir: &Path, prefix: &str, into: &mut BTreeMap<String, Vec<u8>>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let name = format!(
            "{prefix}{}",
            path.file_name().expect("file name").to_string_lossy()
        );
        if path.is_dir() {
            collect_files(&path, &format!("{name}/"), into);
        } else {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            into.insert(name, bytes);
        }
    }
}

/// A content hash for etags and blob names; any stable, file-distinct string will do.
fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A minimal HTTP/1.1 server (one connection at a time, `Connection: close`) standing in for the
/// hub. It stops and joins its thread when dropped.
pub struct FakeHub {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    /// Serves `repos` by id; any other id gets 404.
    pub fn start(repos: HashMap<String, FakeRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        // Polled, so that dropping the server ends the thread without a connection to wake it.
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (Arc::clone(&requests), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            // A client that hangs up mid-request is its own problem.
                            let _ = serve(stream, &repos, &requests);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => break,
                    }
                }
            })
        };
        FakeHub {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// The value for `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far as `METHOD /path`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("request log").clone()
    }

    /// How many requests asked for `file` of `id`.
    pub fn file_hits(&self, id: &str, file: &str) -> usize {
        let prefix = format!("/{id}/resolve/");
        let suffix = format!("/{file}");
        self.requests()
            .iter()
            .filter_map(|r| r.split_once(' ').map(|(_, path)| path.to_string()))
            .filter(|p| p.starts_with(&prefix) && p.ends_with(&suffix))
            .count()
    }

    /// Forgets the requests so far.
    pub fn clear_requests(&self) {
        self.requests.lock().expect("request log").clear();
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: &serde_json::Value) -> Self {
        Response {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }

    fn not_found(code: &str, message: &str) -> Self {
        let mut r = Self::json(404, &serde_json::json!({ "error": message }));
        r.headers.push(("X-Error-Code", code.into()));
        r
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Bad Request",
    }
}

fn serve(
    stream: TcpStream,
    repos: &HashMap<String, FakeRepo>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut words = request_line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let target = words.next().unwrap_or_default().to_string();
    let mut range = None;
    for _ in 0..100 {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    if let Ok(mut log) = log.lock() {
        log.push(format!("{method} {target}"));
    }
    let response = respond(&method, &target, range.as_deref(), repos);

    let mut out = stream;
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        out.write_all(&response.body)?;
    }
    out.flush()?;
    out.shutdown(std::net::Shutdown::Write)
}

fn respond(
    method: &str,
    target: &str,
    range: Option<&str>,
    repos: &HashMap<String, FakeRepo>,
) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::json(405, &serde_json::json!({ "error": "method not allowed" }));
    }
    let path = target.split('?').next().unwrap_or_default();
    let repo_for = |id: &str, rev: &str| {
        repos
            .get(id)
            .filter(|repo| rev == "main" || rev == repo.sha)
    };

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let listed = rest
            .split_once("/revision/")
            .and_then(|(id, rev)| Some((id, repo_for(id, rev)?)));
        return match listed {
            Some((id, repo)) => Response::json(
                200,
                &serde_json::json!({
                    "id": id,
                    "modelId": id,
                    "sha": repo.sha,
                    "siblings": repo
                        .files
                        .keys()
                        .map(|f| serde_json::json!({ "rfilename": f }))
                        .collect::<Vec<_>>(),
                }),
            ),
            None => Response::not_found("RepoNotFound", "Repository not found"),
        };
    }

    // /{owner}/{name}/resolve/{revision}/{file}
    let mut parts = path.trim_start_matches('/').splitn(5, '/');
    let (owner, name, resolve, rev, file) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if resolve != "resolve" {
        return Response::not_found("NotFound", "no such route");
    }
    let Some(repo) = repo_for(&format!("{owner}/{name}"), rev) else {
        return Response::not_found("RepoNotFound", "Repository not found");
    };
    let Some(bytes) = repo.files.get(file) else {
        return Response::not_found("EntryNotFound", "Entry not found");
    };

    let len = bytes.len();
    let mut headers = vec![
        ("Content-Type", "application/octet-stream".to_string()),
        ("Accept-Ranges", "bytes".to_string()),
        ("ETag", format!("\"{}\"", fnv1a(bytes))),
        ("X-Repo-Commit", repo.sha.clone()),
    ];
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return Response {
            status: 200,
            headers,
            body: bytes.clone(),
        };
    };
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.trim().parse().unwrap_or(usize::MAX);
    let end: usize = match end.trim() {
        "" => len.saturating_sub(1),
        e => e.parse::<usize>().unwrap_or(0).min(len.saturating_sub(1)),
    };
    if start >= len || start > end {
        headers.push(("Content-Range", format!("bytes */{len}")));
        return Response {
            status: 416,
            headers,
            body: Vec::new(),
        };
    }
    headers.push(("Content-Range", format!("bytes {start}-{end}/{len}")));
    Response {
        status: 206,
        headers,
        body: bytes[start..=end].to_vec(),
    }
}

fn demo_model() -> PathBuf {
    repo_root().join("models").join("tiny-sd15")
}

/// The pipeline files of the demo model, relative to its root.
fn pipeline_files() -> Vec<String> {
    let mut files = BTreeMap::new();
    collect_files(&demo_model(), "", &mut files);
    files.into_keys().collect()
}

fn cache_repo_dir(hf_home: &Path, id: &str) -> PathBuf {
    hf_home
        .join("hub")
        .join(format!("models--{}", id.replace('/', "--")))
}

/// Runs `tcd-ort run` on `model` with the hub environment of one test and nothing inherited
/// that could send a request elsewhere (a token, an endpoint, a proxy).
fn tcd_run(model: &str, output: &Path, hf_home: &Path, endpoint: Option<&str>) -> Output {
    tcd_run_with(model, &[], output, hf_home, endpoint)
}

/// [`tcd_run`] with extra arguments (LoRAs).
fn tcd_run_with(
    model: &str,
    extra: &[&str],
    output: &Path,
    hf_home: &Path,
    endpoint: Option<&str>,
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcd-ort"));
    cmd.args(["run", "--model", model, "--prompt", "a cat", "--seed", "0"])
        .args(extra)
        .args(["--steps", "1", "-q", "--output"])
        .arg(output)
        .current_dir(repo_root())
        .env("HF_HOME", hf_home)
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1");
    for var in [
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    match endpoint {
        Some(endpoint) => cmd.env("HF_ENDPOINT", endpoint),
        None => cmd
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_ENDPOINT", "http://127.0.0.1:9"),
    };
    cmd.output().expect("the binary starts")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a clean failure: non-zero status, one `error:` line containing every needle, no
/// panic, no image written.
fn assert_fails_with(out: &Output, output: &Path, needles: &[&str]) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {err}");
    for needle in needles {
        assert!(
            errors[0].contains(needle),
            "expected '{needle}' in: {}",
            errors[0]
        );
    }
    assert!(!output.exists(), "{} was written", output.display());
}

/// The pixels the demo model gives from its committed directory with the arguments above.
fn reference_pixels() -> &'static (u32, u32, Vec<u8>) {
    static REFERENCE: OnceLock<(u32, u32, Vec<u8>)> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = scratch_dir("hub-reference");
        let png = dir.join("local.png");
        let model = demo_model().to_string_lossy().into_owned();
        let out = tcd_run(&model, &png, &dir.join("hf"), None);
        assert!(out.status.success(), "{}", stderr(&out));
        read_png_rgb(&png)
    })
}

fn assert_same_image(png: &Path) {
    let (w, h, pixels) = read_png_rgb(png);
    let (rw, rh, reference) = reference_pixels();
    assert_eq!((w, h), (*rw, *rh));
    assert!(
        pixels == *reference,
        "{} differs from the image made from the local directory",
        png.display()
    );
}

#[test]
fn hub_id_downloads_only_the_onnx_pipeline_then_runs_offline_from_the_cache() {
    let dir = scratch_dir("hub-download");
    let hf_home = dir.join("hf");
    let hub = FakeHub::start(HashMap::from([(
        REPO_ID.to_string(),
        FakeRepo::tiny_sd15(),
    )]));

    let png = dir.join("hub.png");
    let out = tcd_run(REPO_ID, &png, &hf_home, Some(&hub.endpoint()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_image(&png);

    // What was asked for: the listing once, every pipeline file, nothing else.
    let requests = hub.requests();
    let listing = format!("GET /api/models/{REPO_ID}/revision/main");
    assert_eq!(
        requests.iter().filter(|r| **r == listing).count(),
        1,
        "{requests:#?}"
    );
    for file in pipeline_files() {
        assert!(
            hub.file_hits(REPO_ID, &file) > 0,
            "{file} was not requested"
        );
    }
    for file in UNWANTED {
        assert_eq!(hub.file_hits(REPO_ID, file), 0, "{file} was requested");
    }

    // The standard layout: refs/main names the commit the server reported in x-repo-commit,
    // snapshots/<commit>/ mirrors the repository with links into blobs/.
    let cached = cache_repo_dir(&hf_home, REPO_ID);
    let main_ref = std::fs::read_to_string(cached.join("refs").join("main")).expect("refs/main");
    assert_eq!(main_ref, COMMIT);
    let snapshot = cached.join("snapshots").join(COMMIT);
    for file in pipeline_files() {
        let local = snapshot.join(&file);
        let served = std::fs::read(demo_model().join(&file)).expect("demo file");
        let fetched = std::fs::read(&local).unwrap_or_else(|e| panic!("{}: {e}", local.display()));
        assert!(fetched == served, "{file} differs from the served copy");
        let blob = cached.join("blobs").join(fnv1a(&served));
        assert!(blob.is_file(), "no blob {} for {file}", blob.display());
    }
    for file in UNWANTED {
        assert!(!snapshot.join(file).exists(), "{file} is in the snapshot");
    }

    // Online again with everything cached: only the listing is requested.
    hub.clear_requests();
    let again = dir.join("again.png");
    let out = tcd_run(REPO_ID, &again, &hf_home, Some(&hub.endpoint()));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(hub.requests(), vec![listing]);
    assert_same_image(&again);

    // Offline with the server gone: the cache alone is enough.
    drop(hub);
    let offline = dir.join("offline.png");
    let out = tcd_run(REPO_ID, &offline, &hf_home, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_image(&offline);
}

#[test]
fn offline_with_an_empty_cache_is_an_error_naming_the_cache() {
    let dir = scratch_dir("hub-offline-empty");
    let hf_home = dir.join("hf");
    let png = dir.join("out.png");
    let out = tcd_run(REPO_ID, &png, &hf_home, None);
    let cache = hf_home.join("hub");
    assert_fails_with(
        &out,
        &png,
        &["HF_HUB_OFFLINE", "cache", &cache.to_string_lossy(), REPO_ID],
    );
}

/// Writes one file into a hub cache the way `huggingface_hub` does: content in `blobs/<etag>`,
/// a relative link from `snapshots/<commit>/<file>` (a copy where links are unavailable).
fn write_cached_file(repo_dir: &Path, commit: &str, file: &str, bytes: &[u8]) {
    let blob = repo_dir.join("blobs").join(fnv1a(bytes));
    std::fs::create_dir_all(repo_dir.join("blobs")).expect("blobs dir");
    std::fs::write(&blob, bytes).expect("blob");
    let pointer = repo_dir.join("snapshots").join(commit).join(file);
    let parent = pointer.parent().expect("pointer parent");
    std::fs::create_dir_all(parent).expect("snapshot dir");
    #[cfg(unix)]
    {
        let depth = file.split('/').count() + 1;
        let target = Path::new(&"../".repeat(depth))
            .join("blobs")
            .join(fnv1a(bytes));
        std::os::unix::fs::symlink(target, &pointer).expect("symlink");
    }
    #[cfg(not(unix))]
    std::fs::copy(&blob, &pointer).expect("copy");
}

#[test]
fn offline_runs_from_a_cache_laid_out_by_hand() {
    let dir = scratch_dir("hub-offline-by-hand");
    let hf_home = dir.join("hf");
    let repo_dir = cache_repo_dir(&hf_home, REPO_ID);
    // A commit other than the stand-in's: the cache is found through refs/main alone.
    let commit = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
    for file in pipeline_files() {
        let bytes = std::fs::read(demo_model().join(&file)).expect("demo file");
        write_cached_file(&repo_dir, commit, &file, &bytes);
    }
    std::fs::create_dir_all(repo_dir.join("refs")).expect("refs dir");
    std::fs::write(repo_dir.join("refs").join("main"), commit).expect("refs/main");

    let png = dir.join("out.png");
    let out = tcd_run(REPO_ID, &png, &hf_home, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_image(&png);
}

#[test]
fn a_repository_without_onnx_graphs_asks_for_an_export() {
    let dir = scratch_dir("hub-no-onnx");
    let id = "tcd-ort/pytorch-only";
    let index = std::fs::read(demo_model().join("model_index.json")).expect("model_index.json");
    let repo = FakeRepo {
        sha: COMMIT.to_string(),
        files: BTreeMap::from([
            ("model_index.json".to_string(), index),
            (
                "unet/diffusion_pytorch_model.safetensors".to_string(),
                b"weights".to_vec(),
            ),
            (
                "text_encoder/model.safetensors".to_string(),
                b"weights".to_vec(),
            ),
        ]),
    };
    let hub = FakeHub::start(HashMap::from([(id.to_string(), repo)]));
    let png = dir.join("out.png");
    let out = tcd_run(id, &png, &dir.join("hf"), Some(&hub.endpoint()));
    assert_fails_with(&out, &png, &[id, "no ONNX graphs", "export"]);
    assert_eq!(
        hub.file_hits(id, "unet/diffusion_pytorch_model.safetensors"),
        0
    );
}

#[test]
fn a_repository_the_hub_does_not_have_is_an_error() {
    let dir = scratch_dir("hub-404");
    let hub = FakeHub::start(HashMap::new());
    let png = dir.join("out.png");
    let out = tcd_run(
        "tcd-ort/no-such-model",
        &png,
        &dir.join("hf"),
        Some(&hub.endpoint()),
    );
    assert_fails_with(
        &out,
        &png,
        &[
            "tcd-ort/no-such-model",
            &hub.endpoint(),
            "HTTP 404",
            "check the id",
        ],
    );
    // The server answered: a hint about the network would mislead.
    assert!(!stderr(&out).contains("no network"), "{}", stderr(&out));
    assert_eq!(
        hub.requests(),
        vec!["GET /api/models/tcd-ort/no-such-model/revision/main".to_string()]
    );
}

#[test]
fn a_lora_hub_id_downloads_its_weights_file_and_then_works_offline() {
    let dir = scratch_dir("hub-lora");
    let hf_home = dir.join("hf");
    let lora = crate::common::tiny_lora_bytes();
    let local_lora = dir.join("local_lora.safetensors");
    std::fs::write(&local_lora, &lora).expect("write lora");
    let mut files = BTreeMap::new();
    files.insert("pytorch_lora_weights.safetensors".to_string(), lora);
    files.insert("README.md".to_string(), b"a LoRA".to_vec());
    let mut repos = HashMap::new();
    repos.insert(
        "tcd-ort/tiny-lora".to_string(),
        FakeRepo {
            sha: COMMIT.to_string(),
            files,
        },
    );
    let hub = FakeHub::start(repos);
    let model = demo_model().to_string_lossy().into_owned();

    let from_hub = dir.join("hub.png");
    let out = tcd_run_with(
        &model,
        &["--lora", "tcd-ort/tiny-lora:0.8"],
        &from_hub,
        &hf_home,
        Some(&hub.endpoint()),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        hub.file_hits("tcd-ort/tiny-lora", "pytorch_lora_weights.safetensors"),
        2,
        "one metadata and one download request: {:?}",
        hub.requests()
    );
    assert_eq!(hub.file_hits("tcd-ort/tiny-lora", "README.md"), 0);

    let from_file = dir.join("file.png");
    let local_arg = format!("{}:0.8", local_lora.display());
    let out = tcd_run_with(&model, &["--lora", &local_arg], &from_file, &hf_home, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let hub_pixels = read_png_rgb(&from_hub);
    assert_eq!(hub_pixels, read_png_rgb(&from_file));
    assert_ne!(
        &hub_pixels,
        reference_pixels(),
        "the LoRA must change the image"
    );

    drop(hub);
    let offline = dir.join("offline.png");
    let out = tcd_run_with(
        &model,
        &["--lora", "tcd-ort/tiny-lora:0.8"],
        &offline,
        &hf_home,
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(read_png_rgb(&offline), hub_pixels);

    let missing = dir.join("missing.png");
    let out = tcd_run_with(
        &model,
        &["--lora", "tcd-ort/other-lora"],
        &missing,
        &hf_home,
        None,
    );
    assert_fails_with(
        &out,
        &missing,
        &["HF_HUB_OFFLINE", "pytorch_lora_weights.safetensors"],
    );
}
