//! The built-in presets and reading a config from TOML (a file may start from a preset and
//! override what it sets).

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::ClipConfig;

pub const PRESETS: [&str; 10] = [
    "tiny",
    "simple-clip",
    "simple-clip-pretrained",
    "simple-clip-pretrained-zh",
    "clip-vit-b-32",
    "clip-rn50",
    "chinese-clip-vit-b-16",
    "student-vit-s",
    "student-resnet-s",
    "student-minilm",
];

/// The presets' TOML files, built into every program: one source for each preset, the same file
/// a user can copy and edit (`--config assets/configs/NAME.toml`).
const PRESET_FILES: [(&str, &str); 10] = [
    ("tiny", include_str!("../../../../assets/configs/tiny.toml")),
    (
        "simple-clip",
        include_str!("../../../../assets/configs/simple-clip.toml"),
    ),
    (
        "simple-clip-pretrained",
        include_str!("../../../../assets/configs/simple-clip-pretrained.toml"),
    ),
    (
        "simple-clip-pretrained-zh",
        include_str!("../../../../assets/configs/simple-clip-pretrained-zh.toml"),
    ),
    (
        "clip-vit-b-32",
        include_str!("../../../../assets/configs/clip-vit-b-32.toml"),
    ),
    ("clip-rn50", include_str!("../../../../assets/configs/clip-rn50.toml")),
    (
        "chinese-clip-vit-b-16",
        include_str!("../../../../assets/configs/chinese-clip-vit-b-16.toml"),
    ),
    (
        "student-vit-s",
        include_str!("../../../../assets/configs/student-vit-s.toml"),
    ),
    (
        "student-resnet-s",
        include_str!("../../../../assets/configs/student-resnet-s.toml"),
    ),
    (
        "student-minilm",
        include_str!("../../../../assets/configs/student-minilm.toml"),
    ),
];

impl ClipConfig {
    /// Small enough to train on a 2-core CPU in minutes: the demo default (`tiny.toml`).
    pub fn tiny() -> Self {
        Self::builtin("tiny")
    }

    /// The tutorial's model: ResNet50 + DistilBERT base + 256-d heads, `soft` loss
    /// (`simple-clip.toml`).
    pub fn simple_clip() -> Self {
        Self::builtin("simple-clip")
    }

    /// The tutorial's own setup: timm `resnet50.a1_in1k` and `distilbert-base-uncased`, fine-tuned
    /// at 1e-4 (image) / 1e-5 (text) / 1e-3 (heads) (`simple-clip-pretrained.toml`). The
    /// architecture shown is what the repos' config.json files say; they are read again when the
    /// model is built.
    pub fn simple_clip_pretrained() -> Self {
        Self::builtin("simple-clip-pretrained")
    }

    /// As `simple-clip-pretrained`, with a text tower that reads Chinese (and 100 other
    /// languages): `distilbert-base-multilingual-cased` (`simple-clip-pretrained-zh.toml`).
    pub fn simple_clip_pretrained_zh() -> Self {
        Self::builtin("simple-clip-pretrained-zh")
    }

    /// A preset that is built in: its file parses (every preset is parsed by the tests).
    fn builtin(name: &str) -> Self {
        Self::preset(name).unwrap_or_else(|e| panic!("the built-in preset {name} does not parse: {e:#}"))
    }

    /// The preset `name`, from its built-in TOML file.
    pub fn preset(name: &str) -> Result<Self> {
        let Some((_, text)) = PRESET_FILES.iter().find(|(n, _)| *n == name) else {
            bail!("unknown preset {name:?}; the presets are: {}", PRESETS.join(", "))
        };
        Self::from_toml_str(text).with_context(|| format!("in the built-in preset {name} (assets/configs/{name}.toml)"))
    }

    /// Reads a TOML config. Errors name the file, and TOML's message names the line and column.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let cfg = Self::from_toml_str(&text).with_context(|| format!("in config {}", path.display()))?;
        Ok(cfg)
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        // Parse straight into the struct first: TOML's errors then name the line and column of an
        // unknown key or a wrong type.
        let direct: Self = toml::from_str(text)?;
        if direct.preset.is_none() && direct.pretrained.is_none() {
            direct.validate()?;
            return Ok(direct);
        }
        // A config may start from a preset (`preset = "simple-clip"`) and override fields; one
        // that names a `pretrained` CLIP starts from the defaults for fine-tuning one.
        let value: toml::Table = toml::from_str(text)?;
        let mut base = match value.get("preset") {
            Some(toml::Value::String(p)) => toml::Table::try_from(Self::preset(p)?)?,
            Some(_) => bail!("`preset` must be a string, one of: {}", PRESETS.join(", ")),
            None => toml::Table::try_from(Self::tiny().with_pretrained_start())?,
        };
        merge(&mut base, value);
        base.remove("preset");
        let cfg: Self = base
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}", e.message()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `--config FILE` wins over `--preset NAME`; neither gives `tiny`. Pure data: a tower that
    /// names `pretrained` weights gets its architecture from the model's own config.json only
    /// when the program applies it ([`crate::pretrained::apply_configs`], with the one
    /// [`crate::hub::Hub`] it builds).
    pub fn resolve(config: Option<&Path>, preset: Option<&str>) -> Result<Self> {
        Ok(match (config, preset) {
            (Some(p), _) => Self::from_toml_file(p)?,
            (None, Some(name)) => Self::preset(name)?,
            (None, None) => Self::tiny(),
        })
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
