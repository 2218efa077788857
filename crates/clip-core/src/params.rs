//! Named parameters and buffers, created from a seeded RNG.
//!
//! candle's `VarMap` initialises through the device RNG, which cannot be seeded on the CPU, and it
//! has no notion of parameter groups or buffers. Training needs all three: the same seed must give
//! the same model, the optimiser gives each tower its own learning rate, and BatchNorm's running
//! statistics must be saved without ever being trained. So every tensor of the model lives here,
//! under its timm / Hugging Face name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

/// Which optimiser group a parameter belongs to (each has its own learning rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    ImageTower,
    TextTower,
    Heads,
}

impl Group {
    pub const ALL: [Group; 3] = [Group::ImageTower, Group::TextTower, Group::Heads];
    pub fn as_str(&self) -> &'static str {
        match self {
            Group::ImageTower => "image tower",
            Group::TextTower => "text tower",
            Group::Heads => "heads",
        }
    }
}

/// Whether a tensor is learned by gradient descent or only updated by the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Learned; `trainable` is false when its tower is frozen.
    Param { trainable: bool },
    /// Running statistics: saved and loaded, never given to the optimiser.
    Buffer,
}

#[derive(Clone)]
pub struct Entry {
    pub var: Var,
    pub group: Group,
    pub kind: Kind,
}

impl Entry {
    pub fn is_trainable(&self) -> bool {
        matches!(self.kind, Kind::Param { trainable: true })
    }
    pub fn is_param(&self) -> bool {
        matches!(self.kind, Kind::Param { .. })
    }
}

/// How a new parameter is filled.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Const(f64),
    Normal { std: f64 },
    Uniform { bound: f64 },
}

/// All tensors of a model, by name, in creation order (a `BTreeMap` keeps listings stable).
/// Decides, by name, which parameters are created locked (not trainable) although their tower trains.
pub type LockRule = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    device: Device,
    lock: Option<LockRule>,
}

struct Inner {
    entries: BTreeMap<String, Entry>,
    rng: rand::rngs::StdRng,
    /// Scalars created so far, per [`Group`] (in [`Group::ALL`]'s order), buffers included.
    created: [u64; 3],
    /// A sizing store ([`ParamStore::sizing`]) counts what it is asked to create and allocates
    /// nothing.
    sizing: bool,
}

/// The number of scalars of a tensor of `shape`, or an error when it overflows (the sizes come
/// from files).
pub fn elem_count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .with_context(|| format!("a tensor of shape {shape:?} has more elements than can be counted"))
}

/// A byte count in GB (10^9 bytes), as reports give it.
pub fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// 0: no limit set by [`limit_memory`].
static MEMORY_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Caps the memory a model's parameters may take, below what the machine has ([`memory_available`]);
/// `None` lifts the cap. For tests and shared machines; it holds for the whole process.
pub fn limit_memory(bytes: Option<u64>) {
    MEMORY_LIMIT.store(bytes.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// The memory this process may fill, in bytes, and what says so: the cap of [`limit_memory`] when
/// one is set and lower, else the kernel's `MemAvailable` (Linux), else the physical memory
/// (other Unix systems); `None` when nothing tells.
pub fn memory_available() -> Option<(u64, &'static str)> {
    let machine = machine_memory();
    let cap = MEMORY_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
    match machine {
        _ if cap == 0 => machine,
        Some((m, _)) if m <= cap => machine,
        _ => Some((cap, "the limit set for this process")),
    }
}

fn machine_memory() -> Option<(u64, &'static str)> {
    if let Ok(text) = std::fs::read_to_string("/proc/meminfo") {
        let kb = text.lines().find_map(|l| {
            let rest = l.strip_prefix("MemAvailable:")?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        });
        if let Some(kb) = kb {
            return Some((kb.saturating_mul(1024), "available (MemAvailable in /proc/meminfo)"));
        }
    }
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system settings.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        if pages > 0 && size > 0 {
            return Some(((pages as u64).saturating_mul(size as u64), "in the machine"));
        }
    }
    None
}

/// Refuses `scalars` f32 values (`what`: "the model's parameters") when they would not fit the
/// memory the machine has ([`memory_available`]): an error naming both sizes in GB, before
/// anything is allocated, instead of an allocation failure that aborts the process.
pub fn check_memory(scalars: u64, what: &str) -> Result<()> {
    let Some(bytes) = scalars.checked_mul(4) else {
        bail!("{what} ({scalars} values) take more bytes than can be counted");
    };
    if let Some((available, source)) = memory_available() {
        if bytes > available {
            bail!(
                "{what} take {} ({scalars} values in f32), more than the {} of memory {source}: the sizes in the config are too large for this machine (or not a real model's)",
                gb(bytes),
                gb(available)
            );
        }
    }
    Ok(())
}

impl ParamStore {
    pub fn new(device: &Device, seed: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                entries: BTreeMap::new(),
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                created: [0; 3],
                sizing: false,
            })),
            device: device.clone(),
            lock: None,
        }
    }

    /// A store that only counts: building a model on it gives tensors that hold no memory (one
    /// value seen through every index), so a model's size is known before it is allocated
    /// ([`ParamStore::created`]). Its tensors are for nothing else.
    pub fn sizing() -> Self {
        let s = Self::new(&Device::Cpu, 0);
        s.inner.lock().unwrap().sizing = true;
        s
    }

    /// Scalars created so far in `group` (parameters and buffers), exact even for a
    /// [`ParamStore::sizing`] store.
    pub fn created(&self, group: Group) -> u64 {
        let i = Group::ALL.iter().position(|g| *g == group).unwrap_or(0);
        self.inner.lock().unwrap().created[i]
    }

    /// Scalars created so far in every group.
    pub fn created_total(&self) -> u64 {
        let c = self.inner.lock().unwrap().created;
        c.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Parameters created from now on whose name `rule` accepts are locked: held out of the
    /// autograd graph and the optimiser, as a frozen tower's are (`--lock-image`).
    pub fn with_lock(mut self, rule: LockRule) -> Self {
        self.lock = Some(rule);
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A builder that prefixes names and tags new tensors with `group`.
    pub fn root(&self, group: Group, trainable: bool) -> ParamBuilder {
        ParamBuilder {
            store: self.clone(),
            prefix: String::new(),
            group,
            trainable,
        }
    }

    pub fn entries(&self) -> Vec<(String, Entry)> {
        let inner = self.inner.lock().unwrap();
        inner.entries.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn get(&self, name: &str) -> Option<Entry> {
        self.inner.lock().unwrap().entries.get(name).cloned()
    }

    /// The trainable variables, with their names and groups.
    pub fn trainable(&self) -> Vec<(String, Group, Var)> {
        self.entries()
            .into_iter()
            .filter(|(_, e)| e.is_trainable())
            .map(|(n, e)| (n, e.group, e.var))
            .collect()
    }

    /// Number of scalar parameters (not buffers) per group, as (trainable, frozen).
    pub fn count(&self, group: Group) -> (usize, usize) {
        let mut t = 0;
        let mut f = 0;
        for (_, e) in self.entries() {
            if e.group != group || !e.is_param() {
                continue;
            }
            let n = e.var.elem_count();
            if e.is_trainable() {
                t += n
            } else {
                f += n
            }
        }
        (t, f)
    }

    pub fn total_params(&self) -> usize {
        Group::ALL
            .iter()
            .map(|g| {
                let (t, f) = self.count(*g);
                t + f
            })
            .sum()
    }

    fn create(&self, name: String, shape: &[usize], init: Init, group: Group, kind: Kind) -> Result<Tensor> {
        let kind = match (kind, &self.lock) {
            (Kind::Param { trainable: true }, Some(rule)) if rule(&name) => Kind::Param { trainable: false },
            (k, _) => k,
        };
        let n = elem_count(shape).with_context(|| format!("creating {name}"))?;
        let mut inner = self.inner.lock().unwrap();
        let g = Group::ALL.iter().position(|x| *x == group).unwrap_or(0);
        inner.created[g] = inner.created[g]
            .checked_add(n as u64)
            .with_context(|| format!("the model has more values than can be counted (at {name})"))?;
        if inner.sizing {
            // A view of one value: the shape without the memory.
            return Ok(Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as(shape)?);
        }
        if inner.entries.contains_key(&name) {
            bail!("internal error: parameter {name} created twice");
        }
        let data: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { bound } => (0..n).map(|_| inner.rng.random_range(-bound..=bound) as f32).collect(),
            Init::Normal { std } => {
                let mut v = Vec::with_capacity(n);
                while v.len() < n {
                    // Box–Muller: two independent normals per pair of uniforms.
                    let u1: f64 = inner.rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let u2: f64 = inner.rng.random::<f64>();
                    let r = (-2.0 * u1.ln()).sqrt();
                    v.push((r * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32);
                    if v.len() < n {
                        v.push((r * (2.0 * std::f64::consts::PI * u2).sin() * std) as f32);
                    }
                }
                v
            }
        };
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(&self.device)?;
        let var = Var::from_tensor(&t)?;
        let tensor = match kind {
            Kind::Param { trainable: true } => var.as_tensor().clone(),
            // Frozen parameters and buffers share the variable's storage (so loading and running-stat
            // updates are seen) but never enter the autograd graph.
            _ => var.as_tensor().detach(),
        };
        inner.entries.insert(name, Entry { var, group, kind });
        Ok(tensor)
    }

    /// Named tensors for saving (parameters and buffers).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.entries()
            .into_iter()
            .map(|(n, e)| (n, e.var.as_tensor().detach()))
            .collect()
    }

    /// Copies each loaded tensor (its name, the entry it fills, the file's value) into its entry,
    /// as f32 on the store's device.
    pub fn set_loaded<N: std::fmt::Display>(&self, plan: &[(N, Entry, &Tensor)]) -> Result<()> {
        for (name, e, t) in plan {
            let t = t.to_dtype(DType::F32)?.to_device(&self.device)?;
            e.var.set(&t).with_context(|| format!("setting {name}"))?;
        }
        Ok(())
    }

    /// Loads every parameter and buffer from tensors in memory. Every name must be present with the
    /// right shape; the error lists what is missing or mismatched so a wrong file is obvious.
    pub fn load_map(&self, loaded: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        let mut missing = vec![];
        let mut mismatched = vec![];
        for (name, e) in self.entries() {
            match loaded.get(&name) {
                None => missing.push(name),
                Some(t) if t.dims() != e.var.dims() => {
                    mismatched.push(format!("{name}: file {:?}, model {:?}", t.dims(), e.var.dims()))
                }
                Some(_) => {}
            }
        }
        if !missing.is_empty() || !mismatched.is_empty() {
            let show = |v: &[String]| crate::listing::first_n(v, 8, ", ");
            bail!(
                "the weights do not fit this model ({} missing, {} with another shape){}{} — was it saved with another config?",
                missing.len(),
                mismatched.len(),
                if missing.is_empty() { String::new() } else { format!("; missing: {}", show(&missing)) },
                if mismatched.is_empty() { String::new() } else { format!("; shapes differ: {}", show(&mismatched)) },
            );
        }
        for (name, e) in self.entries() {
            let t = loaded[&name].to_dtype(DType::F32)?.to_device(&self.device)?;
            e.var.set(&t)?;
        }
        Ok(())
    }
}

/// What kept a file's tensors from fitting a model or one of its towers: the tensors of another
/// shape, those it has that the file lacks, and the file's with no place in it, each as the
/// message names it. Loading a checkpoint reports all three at once, so a wrong file is obvious.
#[derive(Debug, Default)]
pub struct Misfit {
    pub mismatched: Vec<String>,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
}

impl Misfit {
    /// Whether every tensor fit.
    pub fn is_empty(&self) -> bool {
        self.mismatched.is_empty() && self.missing.is_empty() && self.unexpected.is_empty()
    }

    /// The three lists in words, each counted with its first six names, `place` naming what the
    /// file was loaded into (`model`, `tower`).
    pub fn describe(&self, place: &str) -> String {
        let show = |v: &[String]| crate::listing::first_n(v, 6, ", ");
        let mut parts = vec![];
        if !self.mismatched.is_empty() {
            parts.push(format!(
                "{} with another shape: {}",
                self.mismatched.len(),
                show(&self.mismatched)
            ));
        }
        if !self.missing.is_empty() {
            parts.push(format!(
                "{} {place} tensors missing from the file: {}",
                self.missing.len(),
                show(&self.missing)
            ));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "{} file tensors with no place in the {place}: {}",
                self.unexpected.len(),
                show(&self.unexpected)
            ));
        }
        parts.join("; ")
    }
}

/// Creates tensors under a name prefix, like candle-nn's `VarBuilder::pp`.
#[derive(Clone)]
pub struct ParamBuilder {
    store: ParamStore,
    prefix: String,
    group: Group,
    trainable: bool,
}

impl ParamBuilder {
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self { prefix, ..self.clone() }
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// A learned tensor (trainable unless its tower is frozen).
    pub fn param(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.store.create(
            self.full_name(name),
            shape,
            init,
            self.group,
            Kind::Param {
                trainable: self.trainable,
            },
        )
    }

    /// A buffer (running statistics): returns the variable so the forward pass can update it.
    pub fn buffer(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        let full = self.full_name(name);
        self.store.create(full.clone(), shape, init, self.group, Kind::Buffer)?;
        match self.store.get(&full) {
            Some(e) => Ok(e.var),
            // A sizing store keeps no entries: a stand-in of one value.
            None => Ok(Var::zeros((), DType::F32, &Device::Cpu)?),
        }
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }

    pub fn store(&self) -> &ParamStore {
        &self.store
    }
}
