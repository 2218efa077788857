//! Where a pretrained model's files come from: a local folder or file, or a Hugging Face Hub repo
//! fetched through the `hf-hub` crate into the standard Hugging Face cache.
//!
//! People keep one Hugging Face cache for every tool (Python's `huggingface_hub`, transformers,
//! timm, candle), and steer it with environment variables. `hf-hub` 0.4.3 reads only `HF_HOME` and
//! `HF_ENDPOINT`; this module adds what users expect from the others, following
//! `huggingface_hub`'s rules: `HF_HUB_CACHE` (then `HUGGINGFACE_HUB_CACHE`) moves the cache,
//! `HF_TOKEN` (then `HUGGING_FACE_HUB_TOKEN`, then the token file `huggingface-cli login`
//! writes) authenticates, and `HF_HUB_OFFLINE=1` never touches the network: files are then looked
//! up in the cache exactly as `huggingface_hub` does (`models--org--name/refs/<rev>` holds the
//! commit, `snapshots/<commit>/<file>` the file), which `hf-hub` itself cannot be told to do.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo};

/// How files are fetched from the Hub: the cache folder, and whether the network may be used.
#[derive(Debug, Clone)]
pub struct Hub {
    cache: PathBuf,
    offline: bool,
    /// HF_ENDPOINT and HF_TOKEN, used only when downloading (the `download` feature).
    #[cfg_attr(not(feature = "download"), allow(dead_code))]
    endpoint: Option<String>,
    #[cfg_attr(not(feature = "download"), allow(dead_code))]
    token: Option<String>,
    progress: bool,
}

/// `huggingface_hub`'s truth values for flags such as `HF_HUB_OFFLINE`.
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Hub {
    /// Settings from the environment, as `huggingface_hub` reads them.
    pub fn from_env() -> Self {
        let cache = env_nonempty("HF_HUB_CACHE")
            .or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| {
                // Without HF_HOME, huggingface_hub honours XDG_CACHE_HOME; hf-hub does not.
                (env_nonempty("HF_HOME").is_none())
                    .then(|| env_nonempty("XDG_CACHE_HOME"))
                    .flatten()
                    .map(|x| PathBuf::from(x).join("huggingface").join("hub"))
            })
            .unwrap_or_else(|| Cache::from_env().path().clone());
        let token = env_nonempty("HF_TOKEN")
            .or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                env_nonempty("HF_TOKEN_PATH")
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            })
            .or_else(|| Cache::from_env().token());
        Self {
            cache,
            offline: env_flag("HF_HUB_OFFLINE"),
            endpoint: env_nonempty("HF_ENDPOINT"),
            token,
            progress: true,
        }
    }

    /// A given cache folder, with no token and the default endpoint (tests, tools).
    pub fn new(cache: impl Into<PathBuf>, offline: bool) -> Self {
        Self {
            cache: cache.into(),
            offline,
            endpoint: None,
            token: None,
            progress: false,
        }
    }

    /// Whether downloads show a progress bar (on by default from the environment).
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The cache folder of a model repo (`models--org--name`).
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache.join(Repo::model(repo.to_string()).folder_name())
    }

    /// The cached copy of `file`, without any network: the commit of `revision` from
    /// `refs/<revision>` (or `revision` itself when it is a commit hash), then
    /// `snapshots/<commit>/<file>`.
    pub fn cached(&self, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
        // Both are joined into paths: a revision such as `../../x` must never leave the cache, and
        // a ref file is only trusted to hold a commit hash.
        validate_revision(revision).ok()?;
        let dir = self.repo_dir(repo);
        let commit = match std::fs::read_to_string(dir.join("refs").join(revision)) {
            Ok(c) => c.trim().to_string(),
            Err(_) if is_commit_hash(revision) => revision.to_string(),
            Err(_) => return None,
        };
        if !is_commit_hash(&commit) {
            return None;
        }
        let path = dir.join("snapshots").join(commit).join(file);
        path.is_file().then_some(path)
    }

    /// `file` of `repo` at `revision`: from the cache, else downloaded into it (unless offline).
    pub fn get(&self, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        validate_revision(revision)?;
        if let Some(p) = self.cached(repo, revision, file) {
            return Ok(p);
        }
        let how = format!(
            "get the files there with `huggingface-cli download {repo}{}` (or `hf download`) on a machine that can reach the Hub, and copy that cache folder here (or set HF_HUB_CACHE to it), or point `pretrained` at a local folder with the model's files",
            if revision == "main" {
                String::new()
            } else {
                format!(" --revision {revision}")
            }
        );
        if self.offline {
            bail!(
                "{file} of {repo} (revision {revision}) is not in the Hugging Face cache {} and HF_HUB_OFFLINE is set, so nothing is downloaded: {how}",
                self.repo_dir(repo).display()
            );
        }
        self.download(repo, revision, file, &how)
    }

    /// Downloads into the cache with hf-hub's blocking client (the `download` feature).
    #[cfg(feature = "download")]
    fn download(&self, repo: &str, revision: &str, file: &str, how: &str) -> Result<PathBuf> {
        use hf_hub::api::sync::ApiBuilder;
        let mut builder = ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_token(self.token.clone())
            .with_progress(self.progress);
        if let Some(e) = &self.endpoint {
            builder = builder.with_endpoint(e.clone());
        }
        let api = builder.build().context("starting the Hugging Face Hub client")?;
        let repo_handle = api.repo(Repo::with_revision(
            repo.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        ));
        repo_handle.get(file).map_err(|e| {
            anyhow::anyhow!(
                "could not download {file} of {repo} (revision {revision}) from {}: {e}. It is not in the Hugging Face cache {} either: check the repo name (private and gated repos need HF_TOKEN), or {how}",
                self.endpoint.as_deref().unwrap_or("https://huggingface.co"),
                self.repo_dir(repo).display()
            )
        })
    }

    /// A library build without the `download` feature reads the cache and local folders only.
    #[cfg(not(feature = "download"))]
    fn download(&self, repo: &str, revision: &str, file: &str, how: &str) -> Result<PathBuf> {
        bail!(
            "{file} of {repo} (revision {revision}) is not in the Hugging Face cache {}, and this build of clip-core cannot download (enable its `download` feature): {how}",
            self.repo_dir(repo).display()
        )
    }
}

/// Refuses a revision that is not a git ref name or commit as the Hub accepts them (a branch, a
/// tag, `refs/pr/N`, a commit hash), by git's `check-ref-format` rules: no `..`, no part starting
/// with `.` or ending in `.lock`, no `@{`, no control characters, spaces or `~^:?*[\\`, no empty
/// part, no leading or trailing `/`. The revision names a file under the cache's `refs/`, so this
/// is what keeps `refs/../..` out of the file system.
pub fn validate_revision(revision: &str) -> Result<()> {
    let bad = |why: &str| anyhow::anyhow!("revision {revision:?} is not a valid branch, tag or commit name: {why}");
    if revision.is_empty() {
        return Err(bad("it is empty"));
    }
    if revision.len() > 255 {
        return Err(bad("it is longer than 255 characters"));
    }
    if let Some(c) = revision
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(*c))
    {
        return Err(bad(&format!("it contains {c:?}")));
    }
    if revision.contains("..") {
        return Err(bad("it contains `..`"));
    }
    if revision.contains("@{") || revision == "@" {
        return Err(bad("it contains `@{`"));
    }
    if revision.starts_with('/') || revision.ends_with('/') || revision.ends_with('.') {
        return Err(bad("it starts or ends with `/`, or ends with `.`"));
    }
    for part in revision.split('/') {
        if part.is_empty() {
            return Err(bad("it has an empty part (`//`)"));
        }
        if part.starts_with('.') || part.ends_with(".lock") {
            return Err(bad("a part starts with `.` or ends with `.lock`"));
        }
    }
    Ok(())
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pretrained model as a config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder with config.json, model.safetensors … or one `.safetensors` file (its folder is
    /// searched for the other files).
    Local { dir: PathBuf, weights: Option<PathBuf> },
    /// A Hub repo id and revision (`main` unless given).
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// `spec` is a path when one exists there (or it starts with `.`, `/` or `~`), else a repo id,
    /// optionally `org/name@revision`. A separate `revision` wins over `@revision`.
    pub fn parse(spec: &str, revision: Option<&str>) -> Result<Self> {
        let spec = spec.trim();
        if spec.is_empty() {
            bail!("`pretrained` is empty: name a Hugging Face repo (org/name) or a local folder");
        }
        let path = expand_home(spec);
        if path.exists() || spec.starts_with(['.', '/', '~']) || spec.ends_with(".safetensors") {
            if !path.exists() {
                bail!("pretrained model {} does not exist", path.display());
            }
            return Ok(if path.is_file() {
                ModelSource::Local {
                    dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
                    weights: Some(path),
                }
            } else {
                ModelSource::Local {
                    dir: path,
                    weights: None,
                }
            });
        }
        let (repo, at) = match spec.split_once('@') {
            Some((r, rev)) => (r, Some(rev)),
            None => (spec, None),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() > 2 || !parts.iter().all(|p| valid(p)) {
            bail!("`pretrained = {spec:?}` is neither an existing path nor a Hugging Face repo id (org/name, optionally @revision)");
        }
        let revision = revision.or(at).unwrap_or("main").to_string();
        validate_revision(&revision).with_context(|| format!("`pretrained = {spec:?}`"))?;
        Ok(ModelSource::Hub {
            repo: repo.to_string(),
            revision,
        })
    }

    /// The path of `file`: in the local folder, or through the Hub and its cache.
    pub fn get(&self, hub: &Hub, file: &str) -> Result<PathBuf> {
        match self {
            ModelSource::Local { dir, .. } => {
                let p = dir.join(file);
                if !p.is_file() {
                    bail!("{} has no {file}", dir.display());
                }
                Ok(p)
            }
            ModelSource::Hub { repo, revision } => hub.get(repo, revision, file),
        }
    }

    /// The first of `files` that exists, with every failure when none does.
    pub fn get_any(&self, hub: &Hub, files: &[&str]) -> Result<PathBuf> {
        let mut errs = vec![];
        for f in files {
            match self.get(hub, f) {
                Ok(p) => return Ok(p),
                Err(e) => errs.push(format!("{e:#}")),
            }
        }
        bail!("{}", errs.join("; "))
    }

    /// The weights file: the one named, else `model.safetensors`.
    pub fn weights(&self, hub: &Hub) -> Result<PathBuf> {
        match self {
            ModelSource::Local { weights: Some(w), .. } => Ok(w.clone()),
            _ => self.get(hub, "model.safetensors").context(
                "clipmine reads weights in safetensors format (model.safetensors); convert a pytorch_model.bin with `safetensors` first",
            ),
        }
    }

    /// "org/name@main" or the local path, for reports.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Local { dir, weights } => weights.as_ref().unwrap_or(dir).display().to_string(),
            ModelSource::Hub { repo, revision } => format!("{repo}@{revision}"),
        }
    }

    /// A repo's name (for hints), or the folder name.
    pub fn name(&self) -> String {
        match self {
            ModelSource::Hub { repo, .. } => repo.clone(),
            ModelSource::Local { dir, .. } => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}

/// The commit a cached file belongs to (`…/snapshots/<commit>/file`), if it is in a Hub cache. A
/// path that only spells one (`snap/snapshots/../model.safetensors`, whose folder is `..`) is in
/// none.
pub fn snapshot_commit(path: &Path) -> Option<String> {
    let parent = path.parent()?;
    let grand = parent.parent()?;
    let commit = parent.file_name()?.to_string_lossy();
    (grand.file_name()? == "snapshots").then(|| commit.into_owned())
}

fn expand_home(spec: &str) -> PathBuf {
    match spec.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME").map_or_else(|| PathBuf::from(spec), |h| PathBuf::from(h).join(rest)),
        None => PathBuf::from(spec),
    }
}
