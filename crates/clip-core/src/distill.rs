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

use crate::config::DistillConfig;
use crate::data::{Dataset, TextTokenizer};
use crate::feature_cache::{key_of, key_of_tokens, CachedTower, FeatureCache, FeatureRows, Key};
use crate::hub::Hub;
use crate::loss::{l2_normalize, log_softmax, CLIP_MAX_LOGIT_SCALE};
use crate::model::{ClipModel, Embeddings};
use crate::prepare::{prepare, DataSource, ImageCache};
use crate::run_dir::RunDir;

/// A teacher, loaded: its model and tokenizer, and what it is, in words.
pub struct Teacher {
    pub model: ClipModel,
    pub tokenizer: TextTokenizer,
    /// `run DIR` or `pretrained CLIP SPEC (layout)`.
    pub describe: String,
    /// The tokenizer file a run teacher's captions are tokenised with (`None`: the checkpoint's).
    tokenizer_file: Option<PathBuf>,
}

impl Teacher {
    /// A run folder written by stage 4 (it holds `config.toml`), else a pretrained CLIP (preset,
    /// Hugging Face repo or folder).
    pub fn open(spec: &str, device: &Device) -> Result<Self> {
        let path = Path::new(spec);
        if path.join(crate::run_dir::CONFIG).is_file() {
            let run = RunDir::open(path)?;
            let (model, tokenizer) = run
                .load(device)
                .with_context(|| format!("loading the teacher run {spec}"))?;
            return Ok(Self {
                model,
                tokenizer,
                describe: format!("run {spec}"),
                tokenizer_file: Some(path.join(crate::run_dir::TOKENIZER)),
            });
        }
        let o = crate::pretrained_clip::open(spec, &Hub::from_env(), device)
            .with_context(|| format!("opening the teacher {spec}"))?;
        Ok(Self {
            model: o.model,
            tokenizer: o.tokenizer,
            describe: format!("pretrained CLIP {spec} ({})", o.load.format.describe()),
            tokenizer_file: None,
        })
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
    /// shape, values), its config (architecture and preprocessing) and its tokenizer.
    fn fingerprint(&self) -> Result<String> {
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

/// The teacher's normalised embeddings of a dataset: image rows by image index, caption rows by
/// pair index, and its logit scale.
#[derive(Debug, Clone)]
pub struct Targets {
    pub image: FeatureRows,
    pub text: FeatureRows,
    pub logit_scale: f64,
    pub dim: usize,
    /// Teacher forward passes (batches) this start ran: 0 when everything came from the cache.
    pub forwards: usize,
    pub teacher: String,
    pub teacher_params: usize,
}

impl Targets {
    /// The teacher's embeddings for a batch's pairs: (B, D) image rows and (B, D) caption rows.
    pub fn batch(&self, ds: &Dataset, pairs: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let images: Vec<usize> = pairs.iter().map(|&p| ds.pairs[p].image).collect();
        Ok((self.image.tensor(&images, device)?, self.text.tensor(pairs, device)?))
    }
}

/// Computes (or reads from `cache`) the teacher's embeddings of every image and caption of the
/// dataset `source` names, each input prepared as the teacher reads it. `student` is the
/// student's prepared data, for the check that both see the same pairs.
pub fn targets(teacher: &Teacher, source: &DataSource, student: &Dataset, cache: &Path) -> Result<Targets> {
    let device = teacher.model.device().clone();
    let mut tsource = source.clone();
    tsource.stream = false;
    tsource.tokenizer = teacher.tokenizer_file.clone();
    if matches!(tsource.image_cache, ImageCache::Off) {
        tsource.image_cache = ImageCache::Default;
    }
    let tdata = prepare(&teacher.model.config, &tsource, &device, &crate::progress::Silent)
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
    let fp = teacher.fingerprint()?;
    let dim = teacher.model.config.projection_dim;
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
        text,
        logit_scale: teacher.logit_scale()?,
        dim,
        forwards: forwards.into_inner(),
        teacher: teacher.describe.clone(),
        teacher_params: teacher.params(),
    })
}

/// −mean_i Σ_j softmax(t)_ij · log_softmax(s)_ij: the cross-entropy of the student's rows
/// against the teacher's as soft targets.
fn soft_ce(teacher: &Tensor, student: &Tensor) -> Result<Tensor> {
    let p = log_softmax(teacher)?.exp()?.detach();
    Ok((p * log_softmax(student)?)?.sum(D::Minus1)?.mean_all()?.neg()?)
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
/// MSE a mean over B × D (CLIP-KD's scale, hence its weight 2000).
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
        let mse = |s: &Tensor, t: &Tensor| -> Result<Tensor> { Ok((l2_normalize(s)? - t)?.sqr()?.mean_all()?) };
        Some(((mse(&mapped.image, &t_img)? + mse(&mapped.text, &t_txt)?)? * cfg.feature)?)
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
