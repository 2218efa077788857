//! `clip-predict serve` on a trained demo run: the page, text and image queries through the JSON
//! API, serving indexed images only (traversal, absolute paths, links out, non-image files and
//! indexes of `/` are refused), the bounds on queries and uploads, concurrent requests, Host and
//! Origin checks (DNS rebinding, other sites), a load of stalled, idle and oversized
//! connections, idle connections beyond the bound (the idle longest make room) and uploads
//! beyond the upload budget (503). Requests are written by hand over a TCP socket so that paths and headers reach
//! the server exactly as sent (an HTTP client would normalise `..` away).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use clip_core::fit::Trainer;
use clip_core::prepare::{prepare, DataSource};
use clip_core::ClipConfig;

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo")
}

/// The demo set trained as `cargo xtask verify` trains it (tiny, 40 epochs): every caption then
/// finds its own image.
fn trained_run(dir: &Path) -> PathBuf {
    let cfg = ClipConfig::tiny();
    let data = prepare(&cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap();
    let out = dir.join("run");
    let mut t = Trainer::new(&cfg, data, &out).unwrap();
    while t.state().epoch < cfg.train.epochs {
        let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
        let v = t.validate().unwrap();
        t.end_epoch(loss, &v, 0.0, pps).unwrap();
    }
    out
}

/// Kills the server when the test ends, passed or not.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Server {
    match try_start(args) {
        Ok(server) => server,
        Err((line, err)) => panic!("the server did not start: {line:?} {err}"),
    }
}

/// Starts the server, or returns what it printed (its first line, its errors) if it stopped
/// instead of serving.
fn try_start(args: &[&str]) -> Result<Server, (String, String)> {
    spawn(Command::new(env!("CARGO_BIN_EXE_clip-predict")), args)
}

/// Starts the server under an open-file limit of `files` (a shell's `ulimit -n`, then exec).
fn start_with_open_files(files: u32, args: &[&str]) -> Server {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!("ulimit -n {files} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_clip-predict"));
    spawn(sh, args).unwrap_or_else(|(line, err)| panic!("the server did not start: {line:?} {err}"))
}

fn spawn(mut command: Command, args: &[&str]) -> Result<Server, (String, String)> {
    let mut child = command
        .args(["--device", "cpu", "serve", "--addr", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok());
    let Some(port) = port else {
        let mut err = String::new();
        let _ = child.kill();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let _ = child.wait();
        return Err((line, err));
    };
    Ok(Server { child, port })
}

/// One HTTP/1.1 request; returns (status, headers, body).
fn http(port: u16, method: &str, target: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    http_with(port, method, target, &[("Host", "127.0.0.1")], body)
}

/// One HTTP/1.1 request with these headers (Host among them, or none).
fn http_with(port: u16, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += &format!("Connection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body: a failed write is not a failure.
    let _ = s.write_all(body);
    let mut raw = vec![];
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

fn get_json(port: u16, target: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = http(port, "GET", target, b"");
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

fn enc(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

#[test]
fn the_search_page_answers_text_and_image_queries_and_serves_only_indexed_images() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    // The photos: the demo images, plus a link to an image outside the folder.
    let photos = tmp.path().join("photos");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    for e in std::fs::read_dir(demo().join("images")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, photos.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(demo().join("images/coffee.jpg"), outside.join("secret.jpg")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.jpg"), photos.join("leak.jpg")).unwrap();
    let index = tmp.path().join("index");
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .args(["--device", "cpu", "--json", "index", "--approx", "always", "--run"])
        .arg(&run)
        .arg("--images")
        .arg(&photos)
        .arg("--out")
        .arg(&index)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The link leading outside the folder is never indexed, and the index says why.
    assert_eq!((v["images"].as_u64(), v["graphs"].as_u64()), (Some(10), Some(1)), "{v}");
    assert!(
        v["stats"]["failed"].to_string().contains("leak.jpg") && v["stats"]["failed"].to_string().contains("outside"),
        "{v}"
    );

    // An indexed photo replaced by a link out of the folder after indexing: the server must
    // check where a path leads when it serves it, not only when it indexed it.
    std::fs::remove_file(photos.join("coffee.jpg")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.jpg"), photos.join("coffee.jpg")).unwrap();

    let captions = demo().join("captions.csv");
    let server = start(&[
        "--run",
        run.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "--texts-file",
        captions.to_str().unwrap(),
    ]);
    let port = server.port;

    // The page itself, self-contained.
    let (status, head, page) = http(port, "GET", "/", b"");
    let page = String::from_utf8(page).unwrap();
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: text/html"), "{head}");
    assert!(page.contains("Search your photos") && page.contains("/api/search"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page loads nothing from elsewhere"
    );

    // Text → image: each image's first caption finds that image first.
    let text = std::fs::read_to_string(&captions).unwrap();
    let mut firsts: Vec<(String, String)> = vec![];
    let ds = clip_core::data::Dataset::load(&captions, &Default::default()).unwrap();
    for p in &ds.pairs {
        let name = ds.images[p.image].name.clone();
        if !firsts.iter().any(|(n, _)| *n == name) {
            firsts.push((name, p.caption.clone()));
        }
    }
    assert_eq!(firsts.len(), 10, "{text}");
    for (image, caption) in &firsts {
        let (status, v) = get_json(port, &format!("/api/search?q={}&top=3", enc(caption)));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["results"].as_array().unwrap().len(), 3);
        assert_eq!(v["results"][0]["path"], image.as_str(), "{caption}: {v}");
        assert_eq!(v["query"], caption.as_str());
    }

    // Image → text and image → image: an uploaded photo's best caption is one of its own, and the
    // most similar indexed photo is itself (the link to a copy of it ties at the top).
    let bytes = std::fs::read(demo().join("images/rocket.jpg")).unwrap();
    let (status, _, body) = http(port, "POST", "/api/image?top=5", &bytes);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{v}");
    let own: Vec<&str> = ds
        .pairs
        .iter()
        .filter(|p| ds.images[p.image].name == "rocket.jpg")
        .map(|p| p.caption.as_str())
        .collect();
    assert!(own.contains(&v["captions"][0]["caption"].as_str().unwrap()), "{v}");
    assert_eq!(v["photos"][0]["path"], "rocket.jpg", "{v}");
    assert_eq!(v["photos"][0]["url"], "/images/rocket.jpg", "{v}");
    assert!((v["photos"][0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-3, "{v}");
    let probs: f64 = v["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["probability"].as_f64().unwrap())
        .sum();
    assert!(probs > 0.0 && probs <= 1.0 + 1e-5);

    // An indexed image is served as it is on disk.
    let (status, head, img) = http(port, "GET", v["photos"][0]["url"].as_str().unwrap(), b"");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: image/jpeg"), "{head}");
    assert_eq!(img, bytes);

    // Anything else is refused: traversal (plain and encoded), absolute paths, a link out of the
    // folder (indexed, but leading elsewhere), unindexed files.
    let secret = std::fs::read(outside.join("secret.jpg")).unwrap();
    for (target, want) in [
        ("/images/../run/config.toml", 403),
        ("/images/..%2F..%2Fetc%2Fpasswd", 403),
        ("/images/%2Fetc%2Fpasswd", 403),
        ("/images//etc/passwd", 403),
        ("/images/sub%5C..%5C..%5Cx.jpg", 403),
        ("/images/coffee.jpg", 403),
        ("/images/leak.jpg", 404),
        ("/images/nothere.jpg", 404),
        ("/images/", 404),
        ("/../../etc/passwd", 404),
    ] {
        let (status, _, body) = http(port, "GET", target, b"");
        assert_eq!(status, want, "{target}: {}", String::from_utf8_lossy(&body));
        if target == "/images/coffee.jpg" {
            assert!(String::from_utf8_lossy(&body).contains("leads outside the indexed folder"));
        }
        assert!(!body.windows(secret.len()).any(|w| w == secret.as_slice()));
        assert!(!String::from_utf8_lossy(&body).contains("root:"), "{target}");
    }

    // Bounds: query length, result count, upload size and content.
    let (status, v) = get_json(port, &format!("/api/search?q={}", "a".repeat(501)));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("500"), "{v}");
    for top in ["0", "101", "-3", "many"] {
        let (status, v) = get_json(port, &format!("/api/search?q=coffee&top={top}"));
        assert_eq!(status, 400, "top={top}: {v}");
    }
    let (status, v) = get_json(port, "/api/search?q=coffee&top=100");
    assert_eq!((status, v["results"].as_array().map(Vec::len)), (200, Some(10)), "{v}");
    let (status, _) = get_json(port, "/api/search?q=");
    assert_eq!(status, 400);
    let (status, _, body) = http(port, "POST", "/api/image", b"not an image");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = http(port, "POST", "/api/image", &vec![0u8; (16 << 20) + 1]);
    assert_eq!(status, 413);

    // Concurrent requests are all answered, with the same results.
    let (_, want) = get_json(port, &format!("/api/search?q={}&top=5", enc(&firsts[3].1)));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let target = format!("/api/search?q={}&top=5", enc(&firsts[3].1));
            std::thread::spawn(move || (0..4).map(|_| get_json(port, &target)).collect::<Vec<_>>())
        })
        .collect();
    for t in threads {
        for (status, v) in t.join().unwrap() {
            assert_eq!(status, 200);
            assert_eq!(v["results"], want["results"]);
        }
    }
}

#[test]
fn serve_names_a_missing_run() {
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .args(["serve", "--run", "/nonexistent/run", "--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
}

/// A tiny pretrained CLIP made with transformers (clip-core's test fixtures), as a folder.
fn checkpoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../clip-core/tests/fixtures/clip/hub/models--test--hf-clip/snapshots/89abcdef0123456789abcdef0123456789abcdef",
    )
}

#[test]
fn serve_searches_with_a_pretrained_clip() {
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for f in ["coffee.jpg", "rocket.jpg"] {
        std::fs::copy(demo().join("images").join(f), photos.join(f)).unwrap();
    }
    let model = checkpoint();
    let m = model.to_str().unwrap();
    // With --model, the index folder must be named.
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .args(["serve", "--model", m, "--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("with --model, name the index folder"));
    let index = tmp.path().join("index");
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .args([
            "--device",
            "cpu",
            "index",
            "--model",
            m,
            "--images",
            photos.to_str().unwrap(),
        ])
        .args(["--out", index.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let server = start(&[
        "--model",
        m,
        "--index",
        index.to_str().unwrap(),
        "--texts",
        "a cup",
        "a rocket",
    ]);
    let (status, j) = get_json(server.port, &format!("/api/search?q={}", enc("a photo of a cat")));
    assert_eq!(status, 200, "{j}");
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{j}");
    // The same index may not be served by another model.
    let other = checkpoint().to_str().unwrap().replace("hf-clip", "cn-clip");
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .args([
            "serve",
            "--model",
            &other,
            "--index",
            index.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("was made by another model"));
}

/// A copy of a folder and what it holds.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Two demo photos indexed by the tiny pretrained CLIP: (model folder, photos, index folder).
/// Rewrites an index's entries with the current size, times and inode of its files.
fn restamp(index: &Path, photos: &Path) {
    let manifest = index.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    for e in m["entries"].as_array_mut().unwrap() {
        let meta = std::fs::metadata(photos.join(e["path"].as_str().unwrap())).unwrap();
        let t = meta.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap();
        e["size"] = meta.len().into();
        e["modified"] = t.as_secs().into();
        e["modified_ns"] = t.subsec_nanos().into();
        e["inode"] = std::os::unix::fs::MetadataExt::ino(&meta).into();
    }
    std::fs::write(&manifest, m.to_string()).unwrap();
}

#[test]
fn an_index_pointed_at_another_folder_serves_nothing_from_it() {
    // A manifest whose root names a folder of the same photos (names and bytes alike, as a
    // forger could guess), not the one it was made of: none of its files is the indexed one.
    let tmp = tempfile::tempdir().unwrap();
    let (model, photos, index) = pretrained_index(tmp.path());
    let other = tmp.path().join("private");
    copy_dir(&photos, &other);
    let manifest = index.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["root"] = other.to_str().unwrap().into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let server = start(&["--model", &model, "--index", index.to_str().unwrap()]);
    for f in ["coffee.jpg", "rocket.jpg"] {
        let (status, _, body) = http(server.port, "GET", &format!("/images/{f}"), b"");
        assert_eq!(status, 404, "{f}: {}", String::from_utf8_lossy(&body));
    }
    drop(server);
    // The folder it was made of serves them.
    m["root"] = photos.to_str().unwrap().into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let server = start(&["--model", &model, "--index", index.to_str().unwrap()]);
    let (status, head, _) = http(server.port, "GET", "/images/coffee.jpg", b"");
    assert_eq!(status, 200, "{head}");
}

fn pretrained_index(dir: &Path) -> (String, PathBuf, PathBuf) {
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for f in ["coffee.jpg", "rocket.jpg"] {
        std::fs::copy(demo().join("images").join(f), photos.join(f)).unwrap();
    }
    let model = checkpoint().to_str().unwrap().to_string();
    let index = dir.join("index");
    let o = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
        .args(["--device", "cpu", "index", "--model", &model, "--images"])
        .arg(&photos)
        .arg("--out")
        .arg(&index)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    (model, photos, index)
}

#[test]
fn an_index_of_the_whole_file_system_is_refused_and_only_images_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, photos, index) = pretrained_index(tmp.path());
    let idx = index.to_str().unwrap();

    // A crafted index whose folder is `/` is refused at start, with how to mean it.
    let crafted = tmp.path().join("crafted");
    copy_dir(&index, &crafted);
    let manifest = crafted.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["root"] = "/".into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let c = crafted.to_str().unwrap();
    let (_, err) = try_start(&["--model", &model, "--index", c])
        .err()
        .expect("an index of / is refused");
    assert!(
        err.contains("root of the file system") && err.contains("--images /"),
        "{err}"
    );

    // Its first entry renamed etc/passwd: refused at start (here, or by the index loader); named
    // with --images /, the file is still never served (it is not an image).
    m["entries"][0]["path"] = "etc/passwd".into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    assert!(try_start(&["--model", &model, "--index", c]).is_err());
    if let Ok(server) = try_start(&["--model", &model, "--index", c, "--images", "/"]) {
        for target in ["/images/etc/passwd", "/images/etc%2Fpasswd"] {
            let (status, _, body) = http(server.port, "GET", target, b"");
            let body = String::from_utf8_lossy(&body);
            assert!(status == 403 || status == 404, "{target}: {status} {body}");
            assert!(!body.contains("root:"), "{target}: {body}");
        }
    }

    // --images must be the index's folder.
    let (_, err) = try_start(&[
        "--model",
        &model,
        "--index",
        idx,
        "--images",
        tmp.path().to_str().unwrap(),
    ])
    .err()
    .expect("--images naming another folder is refused");
    assert!(err.contains("is not the folder the index"), "{err}");

    // In the indexed folder: a file listed by the index that is not an image is not served; one
    // that is a PNG under a .jpg name is served as the PNG it is.
    std::fs::write(photos.join("rocket.jpg"), "user:secret-password\n").unwrap();
    let mut png = std::io::Cursor::new(vec![]);
    image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10]))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let png = png.into_inner();
    std::fs::write(photos.join("coffee.jpg"), &png).unwrap();
    // Changed files are not the indexed ones: nothing is served until they are indexed again.
    let server = start(&["--model", &model, "--index", idx]);
    for target in ["/images/rocket.jpg", "/images/coffee.jpg"] {
        let (status, _, body) = http(server.port, "GET", target, b"");
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 404, "{target}: {text}");
        assert!(
            text.contains("not the one the index holds") && !text.contains("secret"),
            "{text}"
        );
    }
    drop(server);
    // Were their stamps in the index (as a manifest forged by someone who could see them would
    // have), the bytes still decide: text is refused, a PNG is served as one.
    restamp(&index, &photos);
    let server = start(&["--model", &model, "--index", idx]);
    let (status, _, body) = http(server.port, "GET", "/images/rocket.jpg", b"");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 403, "{text}");
    assert!(
        !text.contains("secret-password") && text.contains("not an image"),
        "{text}"
    );
    let (status, head, body) = http(server.port, "GET", "/images/coffee.jpg", b"");
    assert_eq!(status, 200, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: image/png"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert_eq!(body, png);
}

#[test]
fn requests_for_other_hosts_or_from_other_sites_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _, index) = pretrained_index(tmp.path());
    let server = start(&[
        "--model",
        &model,
        "--index",
        index.to_str().unwrap(),
        "--allow-host",
        "photos.example",
    ]);
    let port = server.port;
    let info = |headers: &[(&str, &str)]| http_with(port, "GET", "/api/info", headers, b"").0;
    let addr = format!("127.0.0.1:{port}");
    let local = format!("localhost:{port}");
    // DNS rebinding: a name of the attacker's that resolves here.
    for bad in [
        "evil.attacker.example",
        &format!("evil.attacker.example:{port}"),
        "127.0.0.1.evil.example",
    ] {
        assert_eq!(info(&[("Host", bad)]), 421, "{bad}");
        let (status, _, body) = http_with(port, "GET", "/images/coffee.jpg", &[("Host", bad)], b"");
        assert_eq!(status, 421, "{bad}");
        assert!(!body.starts_with(b"\xff\xd8"), "{bad}");
    }
    assert_eq!(info(&[]), 400, "no Host");
    for ok in [
        addr.as_str(),
        "127.0.0.1",
        &local,
        "localhost",
        "photos.example",
        "photos.example:8080",
    ] {
        assert_eq!(info(&[("Host", ok)]), 200, "{ok}");
    }
    // A page of another site can neither read nor post, even to the right host.
    for origin in [
        "http://evil.attacker.example",
        "https://evil.attacker.example",
        "null",
        &format!("https://{addr}"),
    ] {
        assert_eq!(info(&[("Host", &addr), ("Origin", origin)]), 403, "{origin}");
    }
    let photo = std::fs::read(demo().join("images/rocket.jpg")).unwrap();
    let (status, _, body) = http_with(
        port,
        "POST",
        "/api/image",
        &[("Host", &addr), ("Origin", "http://evil.attacker.example")],
        &photo,
    );
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    // The page's own origin is answered.
    assert_eq!(info(&[("Host", &addr), ("Origin", &format!("http://{addr}"))]), 200);
    let (status, _, body) = http_with(
        port,
        "POST",
        "/api/image",
        &[("Host", &local), ("Origin", &format!("http://{local}"))],
        &photo,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// `GET target` answered within `limit`, or why not.
fn timed_get(port: u16, target: &str, limit: Duration) -> Result<(u16, Duration), String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = vec![];
    s.read_to_end(&mut raw)
        .map_err(|e| format!("no answer after {:?}: {e}", started.elapsed()))?;
    let status = String::from_utf8_lossy(&raw)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", String::from_utf8_lossy(&raw)))?;
    Ok((status, started.elapsed()))
}

/// A line of /proc/PID/status (Linux), as a number: `Threads`, `VmRSS` (kB).
fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{key}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the server closed this connection (read end of file or a reset, not "no data yet").
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn stalled_uploads_idle_connections_and_a_huge_head_leave_the_server_answering() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _, index) = pretrained_index(tmp.path());
    let server = start(&["--model", &model, "--index", index.to_str().unwrap(), "--workers", "4"]);
    let (port, pid) = (server.port, server.child.id());
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    assert_eq!(timed_get(port, "/api/info", Duration::from_secs(5)).unwrap().0, 200);
    let rss_before = proc_status(pid, "VmRSS");

    // As many stalled uploads as workers, each declaring a megabyte and sending three bytes.
    let mut held = vec![];
    for _ in 0..4 {
        let mut s = connect();
        s.write_all(b"POST /api/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n\xff\xd8\xff")
            .unwrap();
        held.push(s);
    }
    // 400 idle connections, a quarter of them stopped in the middle of a request head.
    let opened = Instant::now();
    for i in 0..400 {
        let mut s = connect();
        if i % 4 == 0 {
            s.write_all(b"GET /api/info HTTP/1.1\r\nHo").unwrap();
        }
        held.push(s);
    }
    // A 4 MiB request line without CRLF: answered 431 (or closed) once the head limit is passed.
    let huge = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = b"GET /".to_vec();
        line.resize(4 << 20, b'a');
        let _ = s.write_all(&line);
        let mut answer = vec![];
        let _ = s.read_to_end(&mut answer);
        answer
    });
    std::thread::sleep(Duration::from_millis(500));

    // The server still answers at once, and its workers are free for the model.
    let (status, took) = timed_get(port, "/api/info", Duration::from_secs(1)).expect("/api/info under load");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
    let (status, search_took) =
        timed_get(port, "/api/search?q=a%20cup", Duration::from_secs(10)).expect("/api/search under load");
    assert_eq!(status, 200);
    let threads = proc_status(pid, "Threads");
    let rss_after = proc_status(pid, "VmRSS");
    eprintln!(
        "under load (4 stalled uploads, 400 idle, a 4 MiB head): /api/info in {took:?}, /api/search in {search_took:?}; threads {threads:?}; VmRSS {rss_before:?} -> {rss_after:?} kB"
    );
    if let Some(threads) = threads {
        assert!(threads < 32, "{threads} threads for 405 connections");
    }
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        assert!(b < a + (64 << 10), "VmRSS {a} -> {b} kB");
    }
    let answer = huge.join().unwrap();
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );

    // An idle connection is closed by the server within its head timeout (10 s).
    let mut idle = held.pop().unwrap();
    let mut rest = vec![];
    let read = idle.read_to_end(&mut rest);
    assert!(
        !matches!(&read, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "an idle connection still open after {:?}",
        opened.elapsed()
    );
    assert!(opened.elapsed() < Duration::from_secs(15), "{:?}", opened.elapsed());
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    let (status, took) = timed_get(port, "/api/info", Duration::from_secs(1)).expect("/api/info after the load");
    assert_eq!(status, 200, "{took:?}");
}

/// The server's stderr line saying how many connections it holds at once (the rest of its
/// stderr is read on, so the server can go on writing there).
fn connection_bound_line(server: &mut Server) -> String {
    let mut err = BufReader::new(server.child.stderr.take().unwrap());
    let mut found = None;
    for _ in 0..50 {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.contains("connections at once") {
            found = Some(line);
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    found.expect("the server did not say how many connections it holds")
}

#[test]
fn idle_connections_beyond_the_bound_close_the_idle_longest_never_a_request_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _, index) = pretrained_index(tmp.path());
    // An open-file limit of 256: at most 192 connections (a quarter of the files kept free).
    let mut server = start_with_open_files(
        256,
        &["--model", &model, "--index", index.to_str().unwrap(), "--workers", "4"],
    );
    let port = server.port;
    let bound = connection_bound_line(&mut server);
    assert!(bound.contains("at most 192 connections"), "{bound}");
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    // 4 stalled uploads (their head received: a request in flight), then 300 idle connections,
    // a quarter of them stopped in the middle of a request head.
    let mut uploads: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect();
            s.write_all(b"POST /api/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n\xff\xd8\xff")
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut idle: Vec<TcpStream> = (0..300)
        .map(|i| {
            let mut s = connect();
            if i % 4 == 0 {
                s.write_all(b"GET /api/info HTTP/1.1\r\nHo").unwrap();
            }
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // A newcomer is answered at once: the idle connection idle longest made room for it.
    let (status, took) = timed_get(port, "/api/info", Duration::from_secs(1)).expect("/api/info at the bound");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "{took:?}");
    std::thread::sleep(Duration::from_millis(300));
    let closed: Vec<bool> = idle.iter_mut().map(closed_by_server).collect();
    let n = closed.iter().filter(|&&c| c).count();
    eprintln!("at the bound (192; 4 stalled uploads, 300 idle): /api/info in {took:?}; {n} idle connections closed");
    // 4 + 300 + 1 connections for 192 places: the oldest idle ones closed, the newest kept.
    assert!((113..=130).contains(&n), "{n} of 300 idle connections closed");
    assert!(closed[..100].iter().all(|&c| c), "{closed:?}");
    assert!(closed[200..].iter().all(|&c| !c), "{closed:?}");
    // The uploads in flight were never closed to make room.
    for (i, s) in uploads.iter_mut().enumerate() {
        assert!(!closed_by_server(s), "upload {i} closed");
    }
    // Nor is a slow request answered: a search still runs.
    let (status, _) = timed_get(port, "/api/search?q=a%20cup", Duration::from_secs(10)).expect("/api/search");
    assert_eq!(status, 200);
}

#[test]
fn uploads_beyond_the_upload_budget_are_answered_503_and_memory_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _, index) = pretrained_index(tmp.path());
    let server = start(&["--model", &model, "--index", index.to_str().unwrap()]);
    let (port, pid) = (server.port, server.child.id());
    assert_eq!(timed_get(port, "/api/info", Duration::from_secs(5)).unwrap().0, 200);
    let rss_before = proc_status(pid, "VmRSS");

    // 10 uploads each declaring 16 MiB: those told 503 at once stop; the others send all but the
    // last byte and stall.
    const LEN: usize = 16 << 20;
    let uploads: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                write!(
                    s,
                    "POST /api/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {LEN}\r\n\r\n"
                )
                .unwrap();
                let mut answer = vec![0u8; 4096];
                match s.read(&mut answer) {
                    Ok(n) if n > 0 => (Some(String::from_utf8_lossy(&answer[..n]).into_owned()), s),
                    _ => {
                        s.write_all(&vec![7u8; LEN - 1]).unwrap();
                        (None, s)
                    }
                }
            })
        })
        .collect();
    let uploads: Vec<(Option<String>, TcpStream)> = uploads.into_iter().map(|t| t.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = proc_status(pid, "VmRSS");
    let (status, took) = timed_get(port, "/api/info", Duration::from_secs(1)).expect("/api/info under uploads");
    assert_eq!(status, 200);
    let refused: Vec<&String> = uploads.iter().filter_map(|(a, _)| a.as_ref()).collect();
    eprintln!(
        "10 uploads of 16 MiB: {} refused; /api/info in {took:?}; VmRSS {rss_before:?} -> {rss_after:?} kB",
        refused.len()
    );
    // 64 MiB of uploads at once: 4 read, 6 told to come back.
    assert_eq!(refused.len(), 6, "{refused:?}");
    for a in &refused {
        let a = a.to_ascii_lowercase();
        assert!(a.starts_with("http/1.1 503") && a.contains("retry-after: 1"), "{a}");
    }
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        assert!(b < a + (100 << 10), "VmRSS {a} -> {b} kB for 10 uploads of 16 MiB");
    }
    // The stalled ones, completed, are read whole and answered (not an image); then the budget is
    // free again.
    for (_, mut s) in uploads.into_iter().filter(|(a, _)| a.is_none()) {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&[7]).unwrap();
        let mut answer = [0u8; 12];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HTTP/1.1 400", "{}", String::from_utf8_lossy(&answer));
    }
    let photo = std::fs::read(demo().join("images/rocket.jpg")).unwrap();
    let (status, _, body) = http(port, "POST", "/api/image", &photo);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}
