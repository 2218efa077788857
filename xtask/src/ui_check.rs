//! `cargo xtask ui-check`: the pages people look at, opened in a real browser.
//!
//! Headless Chromium (Debian's `chromium`) opens a run's `report.html` — and the search page of
//! `clip-predict serve`, when this build has that command — saves a screenshot of each, and checks
//! the rendered page (`--dump-dom`, after its scripts ran) holds the captions and image names it
//! should. Chromium runs with a new profile in a temporary folder and with every background
//! service off, so it touches nothing of the user's and reaches no network.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::verify::{build, display, workspace_root};

/// Check the HTML report (and the search page, where built) in headless Chromium.
///
/// Needs Chromium: `sudo apt-get install chromium` (Debian/Ubuntu), or pass --chromium PATH.
/// Screenshots go to OUT (default target/ui-check).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// A run folder to check; default: train one on the demo set into OUT/run.
    #[arg(long, value_name = "RUN")]
    run: Option<PathBuf>,
    /// Where screenshots, DOM dumps and the demo run go (relative paths are under the workspace root).
    #[arg(long, value_name = "DIR", default_value = "target/ui-check")]
    out: PathBuf,
    /// The Chromium (or Chrome) program [default: $CHROMIUM, else chromium, chromium-browser,
    /// google-chrome on the PATH].
    #[arg(long, value_name = "PATH")]
    chromium: Option<PathBuf>,
    /// Browser window size, WIDTHxHEIGHT: what the screenshots show.
    #[arg(long, value_name = "WxH", default_value = "1280x1600", value_parser = parse_size)]
    window: (u32, u32),
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or("expected WIDTHxHEIGHT, e.g. 1280x1600")?;
    let n = |v: &str| v.trim().parse::<u32>().map_err(|e| format!("{v:?}: {e}"));
    let (w, h) = (n(w)?, n(h)?);
    if !(200..=4000).contains(&w) || !(200..=8000).contains(&h) {
        return Err(format!("{w}x{h}: width 200–4000, height 200–8000"));
    }
    Ok((w, h))
}

pub fn run(args: Args) -> Result<bool> {
    let root = workspace_root();
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let browser = Browser::find(args.chromium.as_deref(), args.window)?;
    println!("browser: {}", browser.version());
    let bin_dir = build(&root, false)?;
    let run = match &args.run {
        Some(r) => r.clone(),
        None => train_demo(&bin_dir, &out.join("run"))?,
    };
    let mut ok = check_report(&browser, &run, &out)?;
    ok &= check_search(&browser, &bin_dir, &run, &out, &root)?;
    println!(
        "\n{}",
        if ok {
            "ui-check passed."
        } else {
            "ui-check FAILED (see above)."
        }
    );
    Ok(ok)
}

/// Stage 4 on the demo set: a run folder with its report.
fn train_demo(bin_dir: &Path, run: &Path) -> Result<PathBuf> {
    if run.exists() {
        std::fs::remove_dir_all(run).with_context(|| format!("clearing {}", run.display()))?;
    }
    let mut cmd = Command::new(bin_dir.join("stage4-train"));
    cmd.args(["--device", "cpu", "--out"]).arg(run).stdout(Stdio::null());
    println!("training the demo run: {}", display(&cmd));
    let status = cmd.status().context("running stage4-train")?;
    if !status.success() && !run.join("report.html").is_file() {
        bail!("stage4-train failed and wrote no report.html in {}", run.display());
    }
    Ok(run.to_path_buf())
}

/// Headless Chromium with a throwaway profile.
struct Browser {
    program: PathBuf,
    window: (u32, u32),
}

impl Browser {
    fn find(given: Option<&Path>, window: (u32, u32)) -> Result<Self> {
        let candidates: Vec<PathBuf> = match (given, std::env::var_os("CHROMIUM")) {
            (Some(p), _) => vec![p.to_path_buf()],
            (None, Some(p)) => vec![PathBuf::from(p)],
            (None, None) => ["chromium", "chromium-browser", "google-chrome"]
                .iter()
                .map(PathBuf::from)
                .collect(),
        };
        for program in candidates {
            let found = Command::new(&program)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if found {
                return Ok(Self { program, window });
            }
        }
        bail!(
            "no Chromium found (tried --chromium, $CHROMIUM, chromium, chromium-browser, google-chrome): \
             install it with `sudo apt-get install chromium` (Debian/Ubuntu), and `fonts-noto-cjk` or \
             `fonts-wqy-microhei` so Chinese/Japanese/Korean captions render"
        )
    }

    fn version(&self) -> String {
        Command::new(&self.program)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| self.program.display().to_string())
    }

    /// Chromium headless on `url` with `extra` arguments; its stdout.
    fn run(&self, url: &str, extra: &[String]) -> Result<String> {
        let profile = tempfile::tempdir().context("creating a temporary browser profile")?;
        let mut cmd = Command::new(&self.program);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            // Let the page's scripts (the search page fetches its results) finish first.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={},{}", self.window.0, self.window.1))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null());
        let o = cmd
            .output()
            .with_context(|| format!("running {}", self.program.display()))?;
        if !o.status.success() {
            bail!(
                "{} failed on {url} ({}): {}",
                self.program.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The page's DOM after it loaded and its scripts ran.
    fn dom(&self, url: &str) -> Result<String> {
        self.run(url, &["--dump-dom".to_string()])
    }

    /// A screenshot of the window, checked to be a real picture.
    fn screenshot(&self, url: &str, file: &Path) -> Result<()> {
        let _ = std::fs::remove_file(file);
        self.run(url, &[format!("--screenshot={}", file.display())])?;
        let img = image::open(file)
            .with_context(|| format!("reading the screenshot {}", file.display()))?
            .to_rgb8();
        let colours: std::collections::BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).step_by(7).collect();
        if colours.len() < 50 {
            bail!("{} looks blank ({} colours)", file.display(), colours.len());
        }
        Ok(())
    }
}

/// One line of the checklist, printed as it is checked.
fn check(ok: bool, what: &str, detail: &str) -> bool {
    println!(
        "  [{}] {what}{}",
        if ok { "ok" } else { "FAIL" },
        if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        }
    );
    ok
}

/// `file://` URL of a local file.
fn file_url(p: &Path) -> Result<String> {
    let abs = p.canonicalize().with_context(|| format!("{} not found", p.display()))?;
    let mut url = String::from("file://");
    for b in abs.to_string_lossy().bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => url.push(b as char),
            _ => url.push_str(&format!("%{b:02X}")),
        }
    }
    Ok(url)
}

/// HTML text escaping as the report writes it (the DOM dump serialises text the same way).
fn escaped(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// report.html: renders, shows its curves, every fixed caption and image name, its rankings.
fn check_report(browser: &Browser, run: &Path, out: &Path) -> Result<bool> {
    let page = run.join("report.html");
    println!("\nreport: {}", page.display());
    let url = file_url(&page)?;
    let shot = out.join("report.png");
    browser.screenshot(&url, &shot)?;
    let dom = browser.dom(&url)?;
    std::fs::write(out.join("report.dom.html"), &dom)?;
    let sim: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("similarity.json"))
            .with_context(|| format!("reading {}/similarity.json", run.display()))?,
    )
    .with_context(|| format!("parsing {}/similarity.json", run.display()))?;
    let strings = |k: &str| -> Vec<String> {
        sim[k]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    let (captions, images) = (strings("captions"), strings("images"));
    let mut ok = check(
        !captions.is_empty() && !images.is_empty(),
        "similarity.json names the fixed pairs",
        &format!("{} captions, {} images", captions.len(), images.len()),
    );
    let missing_c: Vec<&String> = captions.iter().filter(|c| !dom.contains(&escaped(c))).collect();
    ok &= check(
        missing_c.is_empty(),
        "every caption of the similarity matrix is on the page",
        &format!(
            "{} of {} found{}",
            captions.len() - missing_c.len(),
            captions.len(),
            missing(&missing_c)
        ),
    );
    let missing_i: Vec<&String> = images.iter().filter(|i| !dom.contains(&escaped(i))).collect();
    ok &= check(
        missing_i.is_empty(),
        "every image name is on the page",
        &format!(
            "{} of {} found{}",
            images.len() - missing_i.len(),
            images.len(),
            missing(&missing_i)
        ),
    );
    let svgs = dom.matches("<svg").count();
    ok &= check(
        svgs >= 3,
        "loss, learning-rate and recall curves (inline SVG)",
        &format!("{svgs} SVG"),
    );
    let cards = dom.matches("class=\"card\"").count();
    ok &= check(
        cards > 0,
        "best captions for each image",
        &format!("{cards} images ranked"),
    );
    let external = ["http://", "https://"].iter().any(|u| dom.contains(u));
    ok &= check(!external, "no external resources", "");
    ok &= check(true, "screenshot", &shot.display().to_string());
    Ok(ok)
}

fn missing(v: &[&String]) -> String {
    if v.is_empty() {
        String::new()
    } else {
        format!(
            "; missing: {}",
            v.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )
    }
}

/// Kills the server when the check ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The search page of `clip-predict serve`, when this build has that command: a text query in
/// the page's URL and through the JSON API finds the demo's coffee photo.
fn check_search(browser: &Browser, bin_dir: &Path, run: &Path, out: &Path, root: &Path) -> Result<bool> {
    let predict = bin_dir.join("clip-predict");
    let help = Command::new(&predict).args(["serve", "--help"]).output();
    let help = match help {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            println!("\nsearch page: skipped (this build's clip-predict has no `serve` command)");
            return Ok(true);
        }
    };
    println!("\nsearch page (clip-predict serve)");
    let index = out.join("index");
    let status = Command::new(&predict)
        .args(["--device", "cpu", "index", "--run"])
        .arg(run)
        .arg("--images")
        .arg(root.join("assets/demo/images"))
        .arg("--out")
        .arg(&index)
        .stdout(Stdio::null())
        .status()
        .context("running clip-predict index")?;
    if !status.success() {
        bail!("clip-predict index failed");
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut cmd = Command::new(&predict);
    cmd.args(["--device", "cpu", "serve", "--run"])
        .arg(run)
        .arg("--index")
        .arg(&index);
    if help.contains("--port") {
        cmd.args(["--port", &port.to_string()]);
    } else if help.contains("--addr") {
        cmd.args(["--addr", &format!("127.0.0.1:{port}")]);
    } else if help.contains("--listen") {
        cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
    }
    let _server = Server(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting clip-predict serve")?,
    );
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("clip-predict serve did not listen on 127.0.0.1:{port} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let base = format!("http://127.0.0.1:{port}");
    let query = "a%20cup%20of%20coffee%20on%20a%20saucer";
    let shot = out.join("search.png");
    browser.screenshot(&format!("{base}/?q={query}"), &shot)?;
    let dom = browser.dom(&format!("{base}/?q={query}"))?;
    std::fs::write(out.join("search.dom.html"), &dom)?;
    let mut ok = check(
        dom.contains("<input") || dom.contains("<form"),
        "the page has a search box",
        "",
    );
    // The result grid is filled by the page's script from the query in its address (?q=…):
    // headless Chromium cannot type into the box.
    ok &= check(
        dom.contains("coffee.jpg"),
        "?q=… on the page shows the coffee photo",
        "",
    );
    let api = browser.dom(&format!("{base}/api/search?q={query}&top=3"))?;
    let first = api.find("coffee.jpg");
    let others = ["astronaut.jpg", "rocket.jpg", "horse.png", "chelsea.webp"]
        .iter()
        .filter_map(|n| api.find(n))
        .min();
    ok &= check(
        matches!((first, others), (Some(f), Some(o)) if f < o) || matches!((first, others), (Some(_), None)),
        "/api/search ranks coffee.jpg first",
        "",
    );
    ok &= check(true, "screenshot", &shot.display().to_string());
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sizes_are_parsed_and_bounded() {
        assert_eq!(parse_size("1280x1600"), Ok((1280, 1600)));
        assert_eq!(parse_size("800X600"), Ok((800, 600)));
        assert!(parse_size("1280").is_err());
        assert!(parse_size("10x10").is_err());
        assert!(parse_size("axb").is_err());
    }

    #[test]
    fn file_urls_escape_what_a_url_cannot_hold() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a b#人.html");
        std::fs::write(&p, "x").unwrap();
        let u = file_url(&p).unwrap();
        assert!(
            u.starts_with("file:///") && u.ends_with("a%20b%23%E4%BA%BA.html"),
            "{u}"
        );
        assert!(file_url(&dir.path().join("missing.html")).is_err());
    }
}
