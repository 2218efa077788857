//! Knowledge distillation: a big CLIP (a pretrained checkpoint, or any clipmine run) teaches a
//! small student, so the student answers the way the teacher does.
//!
//! Every published CLIP distillation loss — open_clip's `DistillClipLoss`, TinyCLIP's affinity
//! mimicking, CLIP-KD's feature distillation — reads only the teacher's final normalised
//! embeddings and its logit scale. So the teacher runs **once**: its embeddings of every image
//! and caption of the dataset are computed at the start (each input as the teacher sees it: its
//! own image size, mean and std, and tokenizer), kept in the feature cache under a fingerprint of
//! the teacher's weights and preprocessing, and the teacher is dropped before the first epoch. A
//! second run with the same teacher and data reads them back without a single teacher forward.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use xxhash_rust::xxh3::Xxh3;

use crate::config::{ClipConfig, DistillConfig};
use crate::data::{Dataset, TextTokenizer};
use crate::embed::l2_normalize;
use crate::feature_cache::{key_of, key_of_tokens, CachedTower, FeatureCache, FeatureRows, Key};
use crate::hub::Hub;
use crate::loss::{log_softmax, CLIP_MAX_LOGIT_SCALE};
use crate::model::{ClipModel, Embeddings};
use crate::model_source::{open_model, ModelSpec, Origin};
use crate::prepare::{prepare, DataSource, ImageCache, Prepared};

/// A teacher, loaded: its model and tokenizer, and what it is, in words.
pub struct Teacher {
    pub model: ClipModel,
    pub tokenizer: TextTokenizer,
    /// `run DIR` or `pretrained CLIP SPEC (layout)`.
    pub describe: String,
    /// The tokenizer file a run teacher's captions are tokenised with (`None`: the checkpoint's).
    tokenizer_file: Option<PathBuf>,
    fingerprint: std::sync::OnceLock<String>,
}

impl Teacher {
    /// A run folder written by stage 4 (it holds `config.toml`), else a pretrained CLIP (preset,
    /// Hugging Face repo or folder).
    pub fn open(spec: &str, device: &Device) -> Result<Self> {
        Self::open_with(spec, &Hub::from_env(), device)
    }

    /// The teacher a run folder records (a student distilled on images alone answers captions
    /// with it). A run folder may come from anyone, so what it names is opened only as a local
    /// folder, with the Hub offline: nothing is ever downloaded because a run says so, only
    /// because the user named a model on the command line.
    pub fn open_recorded(spec: &str, device: &Device) -> Result<Self> {
        let path = Path::new(spec);
        if !path.is_absolute() || !path.is_dir() {
            bail!("{}", not_local_teacher(spec));
        }
        let offline = Hub::new(Hub::from_env().cache_dir(), true).with_progress(false);
        Self::open_with(spec, &offline, device)
    }

    /// [`Teacher::open`] through a given Hub.
    pub fn open_with(spec: &str, hub: &Hub, device: &Device) -> Result<Self> {
        let which = ModelSpec::guess(spec);
        let o = open_model(which, hub, device).with_context(|| match which {
            ModelSpec::Run(_) => format!("loading the teacher run {spec}"),
            ModelSpec::Pretrained(_) => format!("opening the teacher {spec}"),
        })?;
        let (describe, tokenizer_file) = match &o.origin {
            Origin::Run(_) => (
                format!("run {spec}"),
                Some(Path::new(spec).join(crate::run_dir::TOKENIZER)),
            ),
            Origin::Checkpoint { load, .. } => (format!("pretrained CLIP {spec} ({})", load.format.describe()), None),
        };
        Ok(Self {
            model: o.model,
            tokenizer: o.tokenizer,
            describe,
            tokenizer_file,
            fingerprint: Default::default(),
        })
    }

    /// Whether the teacher is a pretrained CLIP (not a clipmine run): its captions read best
    /// through a prompt ensemble.
    pub fn pretrained(&self) -> bool {
        self.tokenizer_file.is_none()
    }

    /// Parameters of the teacher.
    pub fn params(&self) -> usize {
        self.model.params.total_params()
    }

    /// Its logit scale exp(s), at most 100 (1 for a model trained with the `soft` loss).
    pub fn logit_scale(&self) -> Result<f64> {
        Ok(self.model.logit_scale()?.map_or(1.0, |s| s as f64))
    }

    /// A fingerprint of everything that decides the teacher's embeddings: every tensor (name,
    /// shape, values), its config (architecture and preprocessing) and its tokenizer. Computed
    /// once.
    pub fn fingerprint(&self) -> Result<String> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f.clone());
        }
        let f = self.compute_fingerprint()?;
        Ok(self.fingerprint.get_or_init(|| f).clone())
    }

    fn compute_fingerprint(&self) -> Result<String> {
        let mut h = Xxh3::new();
        h.update(b"clipmine-teacher/1");
        let cfg = &self.model.config;
        h.update(serde_json::to_string(&(&cfg.image, &cfg.text, &cfg.data, cfg.projection_dim, cfg.head))?.as_bytes());
        h.update(self.tokenizer.to_json()?.as_bytes());
        for (name, t) in self.model.params.tensors() {
            h.update(name.as_bytes());
            let v = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
            h.update(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        }
        Ok(format!("{:032x}", h.digest128()))
    }
}

/// Why a teacher named by a run (not by the user) is refused: it is not a local folder.
pub fn not_local_teacher(spec: &str) -> String {
    format!(
        "the teacher {spec:?} is not a local folder (an absolute path): a student distilled on images alone answers captions with the teacher its run records, and clipmine opens what a run folder names only from this machine — it never downloads a model because a run folder says so. Train the student with --teacher set to the teacher's folder (a clipmine run, or a pretrained CLIP's files downloaded beforehand)"
    )
}

/// The teacher whose text tower answers a model's captions: for a student distilled on images
/// alone (its own text tower learned nothing; [`crate::config::DistillConfig::images_only`]),
/// the teacher it learned from — the student's image embeddings are in that teacher's space.
/// `None` for every other model. Refused when the teacher cannot be opened or has changed since.
pub fn caption_teacher(cfg: &crate::ClipConfig, device: &Device) -> Result<Option<Teacher>> {
    if !cfg.distill.images_only {
        return Ok(None);
    }
    let why = "this student was distilled on images without captions, so its own text tower learned nothing and its captions are answered by its teacher's text tower";
    let Some(spec) = cfg.distill.teacher.as_deref() else {
        bail!("{why}, but its config names no teacher ([distill] teacher)");
    };
    let teacher = Teacher::open_recorded(spec, device).with_context(|| {
        format!("{why}: the teacher {spec} could not be opened — put it back there (a symbolic link to where it is now will do)")
    })?;
    if let Some(want) = &cfg.distill.teacher_fingerprint {
        let got = teacher.fingerprint()?;
        if &got != want {
            bail!(
                "{why}, and the teacher {spec} has changed since the student learned from it (fingerprint {got}, recorded {want}): its captions would not match the student's images — distil the student again from this teacher"
            );
        }
    }
    if let Some(d) = cfg.distill.teacher_dim {
        if teacher.model.embed_dim() != d {
            bail!(
                "{why}, and the teacher {spec} gives {}-dimensional embeddings where the student learned {d}-dimensional ones",
                teacher.model.embed_dim()
            );
        }
    }
    Ok(Some(teacher))
}

/// The teacher's normalised embeddings of a dataset: image rows by image index, caption rows by
/// pair index, and its logit scale.
#[derive(Debug, Clone)]
pub struct Targets {
    pub image: FeatureRows,
    /// With augmentation: the teacher's embeddings of view v of every image
    /// ([`crate::data::CropSeed::View`]), by image index.
    pub views: Vec<FeatureRows>,
    pub text: FeatureRows,
    pub logit_scale: f64,
    pub dim: usize,
    /// Teacher forward passes (batches) this start ran: 0 when everything came from the cache.
    pub forwards: usize,
    pub teacher: String,
    pub teacher_params: usize,
}

impl Targets {
    /// The teacher's embeddings for a batch's pairs: (B, D) image rows — of the images as they
    /// are, or of their augmented `view` — and (B, D) caption rows.
    pub fn batch(
        &self,
        ds: &Dataset,
        pairs: &[usize],
        view: Option<usize>,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let images: Vec<usize> = pairs.iter().map(|&p| ds.pairs[p].image).collect();
        let rows = match view {
            None => &self.image,
            Some(v) => self.views.get(v).with_context(|| {
                format!(
                    "the teacher embedded {} augmented views, not view {v}",
                    self.views.len()
                )
            })?,
        };
        Ok((rows.tensor(&images, device)?, self.text.tensor(pairs, device)?))
    }

    /// The view epoch `epoch` trains on: `None` without augmented views.
    pub fn view_of_epoch(&self, epoch: usize) -> Option<usize> {
        (!self.views.is_empty()).then(|| epoch % self.views.len())
    }
}

/// Computes (or reads from `cache`) the teacher's embeddings of every image and caption of the
/// dataset `source` names, each input prepared as the teacher reads it, and of `views`
/// augmented views of every image (0 without augmentation). `student` is the student's
/// prepared data, for the check that both see the same pairs.
pub fn targets(
    teacher: &Teacher,
    source: &DataSource,
    student: &Dataset,
    cache: &Path,
    views: usize,
) -> Result<Targets> {
    let device = teacher.model.device().clone();
    let tdata = teacher_data(teacher, source, student, &device)?;
    let ds = &tdata.dataset;
    let fp = teacher.fingerprint()?;
    let dim = teacher.model.embed_dim();
    let cache = FeatureCache::new(cache);
    let forwards = AtomicUsize::new(0);
    let chunk = 32;
    let image_keys: Vec<Option<Key>> = (0..tdata.store.len())
        .map(|i| Ok(tdata.store.rgb(i)?.map(|p| key_of(&p))))
        .collect::<Result<_>>()?;
    let image = cache.features(
        CachedTower::Image,
        &format!("teacher-{fp}"),
        dim,
        &image_keys,
        chunk,
        |items| {
            forwards.fetch_add(1, Ordering::Relaxed);
            let x = tdata.store.batch_tensor(items, None, &device)?;
            l2_normalize(&teacher.model.embed_images(&x)?)
        },
    )?;
    let original_keys = original_keys(&tdata, &image_keys, views)?;
    let views = (0..views as u64)
        .map(|v| {
            cache.features(
                CachedTower::Image,
                &format!("teacher-{fp}"),
                dim,
                &view_keys(&original_keys, v),
                chunk,
                |items| {
                    forwards.fetch_add(1, Ordering::Relaxed);
                    let x = tdata
                        .store
                        .crop_tensor(items, Some(crate::data::CropSeed::View(v)), &device)?;
                    l2_normalize(&teacher.model.embed_images(&x)?)
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let text_keys: Vec<Option<Key>> = (0..ds.pairs.len())
        .map(|p| Some(key_of_tokens(tdata.loader.tokens(p))))
        .collect();
    let text = cache.features(
        CachedTower::Text,
        &format!("teacher-{fp}"),
        dim,
        &text_keys,
        chunk,
        |items| {
            forwards.fetch_add(1, Ordering::Relaxed);
            let (ids, mask) = tdata.loader.text_inputs(items)?;
            l2_normalize(&teacher.model.embed_texts(&ids, &mask)?)
        },
    )?;
    Ok(Targets {
        image,
        views,
        text,
        logit_scale: teacher.logit_scale()?,
        dim,
        forwards: forwards.into_inner(),
        teacher: teacher.describe.clone(),
        teacher_params: teacher.params(),
    })
}

/// The student's data as the teacher reads it (its tokenizer, its preprocessing, never streamed:
/// every image is embedded once and cached), checked to hold the same pairs of the same images.
fn teacher_data(teacher: &Teacher, source: &DataSource, student: &Dataset, device: &Device) -> Result<Prepared> {
    let mut tsource = source.clone();
    tsource.stream = false;
    tsource.tokenizer = teacher.tokenizer_file.clone();
    if matches!(tsource.image_cache, ImageCache::Off) {
        tsource.image_cache = ImageCache::Default;
    }
    let tdata = prepare(&teacher.model.config, &tsource, device, &crate::progress::Silent)
        .context("preparing the data as the teacher reads it")?;
    let ds = &tdata.dataset;
    if ds.pairs.len() != student.pairs.len() || ds.images.len() != student.images.len() {
        bail!(
            "the teacher's view of the data has {} pairs of {} images, the student's {} of {}",
            ds.pairs.len(),
            ds.images.len(),
            student.pairs.len(),
            student.images.len()
        );
    }
    Ok(tdata)
}

/// The key of each image's original file (none without augmented `views`, or for an image
/// without a key). View v of image i is a random crop of the original file, fixed by (v, i): its
/// key holds the original's bytes (an edit anywhere in the photo, even outside the centre crop
/// the image key sees, is a new key), v, i and the crop's version.
fn original_keys(tdata: &Prepared, image_keys: &[Option<Key>], views: usize) -> Result<Vec<Option<Key>>> {
    if views == 0 {
        return Ok(vec![]);
    }
    image_keys
        .iter()
        .enumerate()
        .map(|(i, k)| k.map(|_| tdata.store.original_key(i)).transpose())
        .collect()
}

/// The cache keys of augmented view `v` of every image, from the originals' keys.
fn view_keys(original_keys: &[Option<Key>], v: u64) -> Vec<Option<Key>> {
    original_keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            k.map(|k| {
                let mut b = k.to_vec();
                b.extend_from_slice(b"augmented-view/2");
                b.extend_from_slice(&v.to_le_bytes());
                b.extend_from_slice(&(i as u64).to_le_bytes());
                key_of(&b)
            })
        })
        .collect()
}

/// −mean_i Σ_j softmax(t)_ij · log_softmax(s)_ij: the cross-entropy of the student's rows
/// against the teacher's as soft targets.
fn soft_ce(teacher: &Tensor, student: &Tensor) -> Result<Tensor> {
    let p = log_softmax(teacher)?.exp()?.detach();
    Ok((p * log_softmax(student)?)?.sum(D::Minus1)?.mean_all()?.neg()?)
}

/// The width CLIP-KD's feature weight (2000 × an MSE averaged over B × D) was set at: its
/// teacher's 512-dimensional embeddings. The feature MSE here is scaled by D / 512, the same
/// distance weighed the same at any width.
pub const FEATURE_WIDTH: f64 = 512.0;

/// `mean((norm(s) - t)²)` over B × D, scaled to [`FEATURE_WIDTH`] dimensions.
fn feature_mse(s: &Tensor, t: &Tensor) -> Result<Tensor> {
    let d = t.dim(D::Minus1)? as f64;
    Ok(((l2_normalize(s)? - t)?.sqr()?.mean_all()? * (d / FEATURE_WIDTH))?)
}

/// The terms of one batch's distillation loss (each already weighted), and their sum.
pub struct DistillLoss {
    pub total: Tensor,
    pub contrastive: Option<Tensor>,
    pub affinity: Option<Tensor>,
    pub feature: Option<Tensor>,
}

/// The student's loss on a batch with the teacher's embeddings `(t_image, t_text)` of the same
/// pairs: `contrastive` × the model's own loss, `affinity` × ½[H(t, s) + H(tᵀ, sᵀ)] over the
/// scaled similarity matrices, `feature` × [MSE(norm(P f), f_t) + MSE(norm(P g), g_t)], each
/// MSE a mean over B × D times D / 512 (CLIP-KD's scale at its teacher's width, hence its
/// weight 2000).
pub fn loss(
    model: &ClipModel,
    e: &Embeddings,
    positives: Option<&Tensor>,
    teacher: (&Tensor, &Tensor),
    teacher_scale: f64,
    cfg: &DistillConfig,
) -> Result<DistillLoss> {
    let mut terms = vec![];
    let contrastive = if cfg.contrastive > 0.0 {
        Some((model.loss(e, positives)? * cfg.contrastive)?)
    } else {
        None
    };
    let (t_img, t_txt) = (teacher.0.detach(), teacher.1.detach());
    let affinity = if cfg.affinity > 0.0 {
        let (img, txt) = (l2_normalize(&e.image)?, l2_normalize(&e.text)?);
        let sim = img.matmul(&txt.t()?)?;
        let s = match model.logit_scale_param() {
            Some(ls) => sim.broadcast_mul(&ls.clamp(f64::NEG_INFINITY, CLIP_MAX_LOGIT_SCALE)?.exp()?)?,
            None => (sim / model.config.temperature)?,
        };
        let t = (t_img.matmul(&t_txt.t()?)? * teacher_scale)?;
        let both = ((soft_ce(&t, &s)? + soft_ce(&t.t()?, &s.t()?)?)? * (0.5 * cfg.affinity))?;
        Some(both)
    } else {
        None
    };
    let feature = if cfg.feature > 0.0 {
        let mapped = model.to_teacher_space(e)?;
        Some(((feature_mse(&mapped.image, &t_img)? + feature_mse(&mapped.text, &t_txt)?)? * cfg.feature)?)
    } else {
        None
    };
    for t in [&contrastive, &affinity, &feature].into_iter().flatten() {
        terms.push(t.clone());
    }
    let mut total = terms
        .first()
        .context("no distillation loss term has a weight above 0")?
        .clone();
    for t in &terms[1..] {
        total = (total + t)?;
    }
    Ok(DistillLoss {
        total,
        contrastive,
        affinity,
        feature,
    })
}

/// Why images without captions cannot train with these weights (`None`: they can). Only the
/// feature term has an image side of its own: the contrastive and affinity terms compare images
/// with captions.
pub fn images_only_refusal(cfg: &DistillConfig) -> Option<String> {
    let mut text_side = vec![];
    if cfg.contrastive > 0.0 {
        text_side.push(format!("contrastive = {}", cfg.contrastive));
    }
    if cfg.affinity > 0.0 {
        text_side.push(format!("affinity = {}", cfg.affinity));
    }
    if !text_side.is_empty() {
        return Some(format!(
            "images without captions distil only the image tower, through the feature term: {} {} images with captions, and these have none — set {} under [distill] (contrastive = 0.0, affinity = 0.0) and keep feature above 0",
            text_side.join(" and "),
            if text_side.len() == 1 { "compares" } else { "compare" },
            if text_side.len() == 1 { "it to 0" } else { "them to 0" }
        ));
    }
    if cfg.feature <= 0.0 {
        return Some(
            "images without captions distil the image tower through the feature term alone, and distill.feature is 0: set it above 0 (2000 is CLIP-KD's)".into(),
        );
    }
    None
}

/// Whether `ds` can train with this distillation config: images without captions need a teacher
/// and the feature term alone (see [`images_only_refusal`]). Checked as soon as the data is
/// known, before a run folder is made.
pub fn check_data(ds: &Dataset, cfg: &DistillConfig) -> Result<()> {
    if !ds.captionless() {
        return Ok(());
    }
    if cfg.teacher.is_none() {
        bail!(
            "{}: images without captions — a CLIP learns from images *with* captions. With a teacher they can distil the image tower: stage4-train --teacher RUN|MODEL, with contrastive = 0.0 and affinity = 0.0 under [distill]",
            ds.root.display()
        );
    }
    if let Some(why) = images_only_refusal(cfg) {
        bail!("{}: {why}", ds.root.display());
    }
    Ok(())
}

/// The loss of a batch of images without captions: `feature` × MSE(norm(P f), f_t) over the
/// image side alone (the student's image embeddings `image`, the teacher's `t_image`).
pub fn image_loss(model: &ClipModel, image: &Tensor, t_image: &Tensor, cfg: &DistillConfig) -> Result<DistillLoss> {
    let mapped = model.image_to_teacher_space(image)?;
    let feature = (feature_mse(&mapped, &t_image.detach())? * cfg.feature)?;
    Ok(DistillLoss {
        total: feature.clone(),
        contrastive: None,
        affinity: None,
        feature: Some(feature),
    })
}

/// Top-1 neighbour agreement, for images without captions: over the images, the share whose
/// nearest other image is the same for the student's embeddings as for the teacher's.
pub fn neighbour_agreement(s_img: &Tensor, t_img: &Tensor) -> Result<f64> {
    let n = s_img.dim(0)?;
    if n < 2 {
        return Ok(0.0);
    }
    let mask = (Tensor::eye(n, candle_core::DType::F32, s_img.device())? * -1e4)?;
    let best = |e: &Tensor| -> Result<Vec<u32>> {
        let e = l2_normalize(&e.to_dtype(candle_core::DType::F32)?)?;
        Ok(e.matmul(&e.t()?)?.add(&mask)?.argmax(D::Minus1)?.to_vec1::<u32>()?)
    };
    let (a, b) = (best(s_img)?, best(t_img)?);
    Ok(a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / n as f64)
}

/// Top-1 agreement with the teacher: over the distinct images of `pairs`, the share whose best
/// caption (among the distinct captions of `pairs`) is the same for the student embeddings
/// (`s_img`, `s_txt`, rows by image / by caption) as for the teacher's.
pub fn agreement(s_img: &Tensor, s_txt: &Tensor, t_img: &Tensor, t_txt: &Tensor) -> Result<f64> {
    let best = |i: &Tensor, t: &Tensor| -> Result<Vec<u32>> {
        Ok(l2_normalize(i)?
            .matmul(&l2_normalize(t)?.t()?)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?)
    };
    let (a, b) = (best(s_img, s_txt)?, best(t_img, t_txt)?);
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    Ok(same as f64 / a.len().max(1) as f64)
}

/// How fast a model embeds, and how big its weights are: what a student is for.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Footprint {
    pub parameters: usize,
    /// The weights as stored (every tensor at its dtype), in bytes.
    pub weight_bytes: usize,
    pub images_per_second: f64,
    pub captions_per_second: f64,
}

/// The teacher beside the student at the end of a distillation (metrics.json, report.html).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub teacher: String,
    /// The teacher's parameters, and the student's (its model's); 0 in a run summarised before
    /// they were recorded.
    #[serde(default)]
    pub teacher_params: usize,
    #[serde(default)]
    pub student_params: usize,
    /// Measured one after the other at the start of the run (`None` when not measured).
    pub teacher_footprint: Option<Footprint>,
    pub student_footprint: Option<Footprint>,
    /// Validation recall@1 (`None` for images without captions).
    pub teacher_recall: Option<crate::retrieval::Recall>,
    pub student_recall: Option<crate::retrieval::Recall>,
    /// Validation zero-shot accuracy (class folders).
    pub teacher_zero_shot: Option<f64>,
    pub student_zero_shot: Option<f64>,
    pub agreement_start: Option<f64>,
    pub agreement: f64,
    pub images_only: bool,
}

/// Measures `model` on random inputs of its own shapes (speed does not depend on the pixels):
/// batches of `batch` images at its image size and of `batch` captions of `tokens` tokens, one
/// untimed batch first, then batches until about `seconds` have passed (at least 2).
pub fn footprint(model: &ClipModel, batch: usize, tokens: usize, seconds: f64) -> Result<Footprint> {
    let dev = model.device();
    let s = model.config.image.image_size;
    let images = Tensor::randn(0f32, 1.0, (batch, 3, s, s), dev)?;
    let l = tokens.clamp(2, model.config.max_tokens());
    let vocab = model.config.text.vocab_size as u32;
    let ids: Vec<u32> = (0..batch * l)
        .map(|i| 1 + (i as u32 * 7919) % (vocab - 1).max(1))
        .collect();
    let ids = Tensor::from_vec(ids, (batch, l), dev)?;
    let mask = Tensor::ones((batch, l), candle_core::DType::U32, dev)?;
    let rate = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?;
        let started = std::time::Instant::now();
        let mut n = 0;
        while n < 2 || started.elapsed().as_secs_f64() < seconds {
            f()?;
            n += 1;
        }
        Ok((n * batch) as f64 / started.elapsed().as_secs_f64())
    };
    let images_per_second = rate(&|| {
        model.embed_images(&images)?.to_device(&Device::Cpu)?;
        Ok(())
    })?;
    let captions_per_second = rate(&|| {
        model.embed_texts(&ids, &mask)?.to_device(&Device::Cpu)?;
        Ok(())
    })?;
    // The maps into a teacher's space serve training only: not part of what is shipped.
    let tensors = model.params.tensors();
    let shipped = tensors.iter().filter(|(n, _)| !n.starts_with("distill."));
    let (parameters, weight_bytes) = shipped.fold((0, 0), |(p, b), (_, t)| {
        (p + t.elem_count(), b + t.elem_count() * t.dtype().size_in_bytes())
    });
    Ok(Footprint {
        parameters,
        weight_bytes,
        images_per_second,
        captions_per_second,
    })
}

/// What [`inherit`] copied from the teacher into the student.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Inherited {
    /// One line per tower: which teacher blocks, which widths.
    pub towers: Vec<String>,
    /// Tensors copied (whole or as leading slices).
    pub tensors: usize,
    /// Student tensors left as initialised, and why.
    pub skipped: Vec<String>,
}

/// The teacher tensor's leading slice of the student's shape, or why not.
fn leading_slice(t: &Tensor, shape: &[usize]) -> std::result::Result<Tensor, String> {
    if t.rank() != shape.len() {
        return Err(format!("rank {} vs {}", t.rank(), shape.len()));
    }
    let mut out = t.clone();
    for (d, (&have, &want)) in t.dims().iter().zip(shape).enumerate() {
        if have < want {
            return Err(format!("the teacher's is narrower ({:?} < {shape:?})", t.dims()));
        }
        if have > want {
            out = out.narrow(d, 0, want).map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// The teacher's name for a student tensor when student block `i` comes from teacher block `i·k`.
fn teacher_name(name: &str, k: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let mut out = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        out.push(parts[i].to_string());
        if matches!(parts[i], "layers" | "layer") {
            if let Some(n) = parts.get(i + 1).and_then(|n| n.parse::<usize>().ok()) {
                out.push((n * k).to_string());
                i += 2;
                continue;
            }
        }
        i += 1;
    }
    out.join(".")
}

/// TinyCLIP's manual weight inheritance: where a student tower is of the teacher's family (a ViT
/// from a ViT, a CLIP text transformer from one, a BERT from a BERT), student block i starts from
/// teacher block i·⌊L_teacher / L_student⌋ and every tensor from the leading slice of the
/// teacher's (the first heads, the first channels), embeddings, norms and projections alike.
/// A ViT's patch convolution and position table are inherited only when the patch size and the
/// image size agree (a slice of either would be another filter or another place in the image).
/// ResNet towers are left as initialised.
///
/// The token table is inherited only with `same_tokenizer` (the student reads the teacher's ids:
/// a run teacher trained on the same captions, or a student using the teacher's tokenizer).
pub fn inherit(student: &ClipModel, teacher: &ClipModel, same_tokenizer: bool) -> Result<Inherited> {
    use crate::config::{ImageArch, TextKind};
    let (s, t) = (&student.config, &teacher.config);
    let mut report = Inherited::default();
    // A tower with weights of its own (a timm or Hugging Face tower, a whole pretrained CLIP)
    // keeps them: inheritance is for towers that would otherwise start from random numbers.
    let image_family = s.image.arch == t.image.arch
        && s.image.arch == ImageArch::Vit
        && s.image.pretrained.is_none()
        && s.pretrained.is_none();
    let text_family = s.text.kind == t.text.kind
        && matches!(s.text.kind, TextKind::Clip | TextKind::Bert | TextKind::Distilbert)
        && s.text.pretrained.is_none()
        && s.pretrained.is_none();
    let (si, st) = s.block_counts();
    let (ti, tt) = t.block_counts();
    let k_image = block_stride(si, ti);
    let k_text = block_stride(st, tt);
    let teacher_tensors = teacher.params.tensors();
    let mut copied = [0usize; 2];
    for (name, entry) in student.params.entries() {
        let (tower, k, family) = if name.starts_with("image_encoder.") || name.starts_with("image_projection.") {
            (0, k_image, image_family)
        } else if name.starts_with("text_encoder.") || name.starts_with("text_projection.") {
            (1, k_text, text_family)
        } else {
            continue;
        };
        if !family {
            continue;
        }
        if let Some(why) = not_inherited(&name, tower, s, t, same_tokenizer) {
            report.skipped.push(why);
            continue;
        }
        let from = teacher_name(&name, k);
        let Some(src) = teacher_tensors.get(&from) else {
            report.skipped.push(format!("{name}: the teacher has no {from}"));
            continue;
        };
        match leading_slice(src, entry.var.dims()) {
            Ok(v) => {
                entry.var.set(&v.contiguous()?.to_device(student.device())?)?;
                copied[tower] += 1;
                report.tensors += 1;
            }
            Err(why) => report.skipped.push(format!("{name}: {why}")),
        }
    }
    // The teacher's temperature suits inherited towers; a student from scratch keeps its own.
    if copied.iter().any(|&c| c > 0) {
        if let (Some(entry), Some(v)) = (student.params.get("logit_scale"), teacher_tensors.get("logit_scale")) {
            entry.var.set(&v.to_device(student.device())?)?;
            report.tensors += 1;
        }
    }
    report.towers = tower_lines(s, t, [image_family, text_family], copied);
    Ok(report)
}

/// Why student tensor `name` of `tower` (0 image, 1 text) of the teacher's family is not
/// inherited after all: a patch convolution or position table of another patch grid, or a
/// token table read through another tokenizer. `None` when it is inherited.
fn not_inherited(name: &str, tower: usize, s: &ClipConfig, t: &ClipConfig, same_tokenizer: bool) -> Option<String> {
    let same_grid = s.image.patch_size == t.image.patch_size && s.image.image_size == t.image.image_size;
    if tower == 0 && !same_grid && name.contains("embeddings.p") {
        return Some(format!(
            "{name}: the patch grid differs (patch {} at {} px, teacher's {} at {} px)",
            s.image.patch_size, s.image.image_size, t.image.patch_size, t.image.image_size
        ));
    }
    if tower == 1 && !same_tokenizer && (name.contains("token_embedding") || name.contains("word_embeddings")) {
        // The student reads its own tokenizer's ids: row i of the teacher's table is
        // another word.
        return Some(format!(
            "{name}: the student's tokenizer is its own (its ids are not the teacher's)"
        ));
    }
    None
}

/// Teacher block i·k feeds student block i, k = ⌊L_teacher / L_student⌋ (at least 1).
fn block_stride(student_blocks: usize, teacher_blocks: usize) -> usize {
    (teacher_blocks / student_blocks.max(1)).max(1)
}

/// The report's line for each tower of the teacher's family (`families`: image, text) that
/// inherited tensors (`copied` of each): which teacher blocks, the widths, how many tensors.
fn tower_lines(s: &ClipConfig, t: &ClipConfig, families: [bool; 2], copied: [usize; 2]) -> Vec<String> {
    let (si, st) = s.block_counts();
    let (ti, tt) = t.block_counts();
    let mut towers = vec![];
    if families[0] && copied[0] > 0 {
        let picked: Vec<String> = (0..si).map(|i| (i * block_stride(si, ti)).to_string()).collect();
        towers.push(format!(
            "image tower (ViT): blocks {} of the teacher's {ti} → the student's {si}, width {} → {}: {} tensors",
            picked.join(", "),
            t.image.width,
            s.image.width,
            copied[0]
        ));
    }
    if families[1] && copied[1] > 0 {
        let picked: Vec<String> = (0..st).map(|i| (i * block_stride(st, tt)).to_string()).collect();
        towers.push(format!(
            "text tower: blocks {} of the teacher's {tt} → the student's {st}, width {} → {}: {} tensors",
            picked.join(", "),
            t.text.dim,
            s.text.dim,
            copied[1]
        ));
    }
    towers
}
