//! `clip-predict serve` on a trained demo run: the page, text and image queries through the JSON
//! API, serving indexed images only (traversal, absolute paths and links out are refused), the
//! bounds on queries and uploads, and concurrent requests. Requests are written by hand over a
//! TCP socket so that paths reach the server exactly as sent (an HTTP client would normalise
//! `..` away).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_clip-predict"))
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
        panic!("the server did not start: {line:?} {err}");
    };
    Server { child, port }
}

/// One HTTP/1.1 request; returns (status, headers, body).
fn http(port: u16, method: &str, target: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
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
