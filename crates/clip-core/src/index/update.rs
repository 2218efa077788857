//! Updating an index: files unchanged keep their rows, new or changed ones are embedded into a
//! new segment, deleted ones are dropped; then segments are merged when there are many or many
//! rows are dead.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::files::{self, embed_image_files, Embedded};
use super::{
    check_entry_path, ImageIndex, IndexEntry, IndexOptions, Segment, UpdateStats, DEAD, MAX_DEAD_SHARE, MAX_SEGMENTS,
};
use crate::model::ClipModel;

/// Each file of an update: its entry now, and the old entry whose row it keeps (`None`: to embed).
type Plan = Vec<(IndexEntry, Option<usize>)>;

impl ImageIndex {
    /// Builds or refreshes an index of `root`: files unchanged since `previous` (same model, path,
    /// size, modification time to the nanosecond and inode: see [`IndexEntry`]) keep their embedding; new or changed ones are embedded into a
    /// new segment; deleted ones are dropped. An index made by another model is refused.
    pub fn update(
        previous: Option<ImageIndex>,
        model: &ClipModel,
        fingerprint: &str,
        root: &Path,
        chunk: usize,
        opts: &IndexOptions,
        on_progress: impl FnMut(usize),
    ) -> Result<(Self, UpdateStats)> {
        Self::update_with(previous, fingerprint, model.embed_dim(), root, opts, |paths| {
            embed_image_files(model, &model.config, paths, chunk, on_progress)
        })
    }

    /// [`ImageIndex::update`] with any embedder of `dim`-wide rows: `embed` gets the files to
    /// embed and returns what [`embed_image_files`] does.
    pub fn update_with(
        previous: Option<ImageIndex>,
        fingerprint: &str,
        dim: usize,
        root: &Path,
        opts: &IndexOptions,
        embed: impl FnOnce(&[PathBuf]) -> Result<Embedded>,
    ) -> Result<(Self, UpdateStats)> {
        let started = std::time::Instant::now();
        let mut idx = Self::reopen(previous, fingerprint, dim, root)?;
        let mut stats = UpdateStats::default();
        let files = indexable_files(root, &mut stats)?;
        let (plan, todo) = idx.plan(root, &files, &mut stats)?;
        let paths: Vec<PathBuf> = todo.iter().map(|&i| root.join(&plan[i].0.path)).collect();
        let (new_emb, ok, failed) = embed(&paths)?;
        let failed_set: HashSet<usize> = failed.iter().map(|(i, _)| todo[*i]).collect();
        for (i, reason) in failed {
            stats.failed.push((plan[todo[i]].0.path.clone(), reason));
        }
        let new_rows: HashMap<usize, usize> = ok.iter().enumerate().map(|(row, &i)| (todo[i], row)).collect();
        let new_seg = match new_emb {
            Some(t) => Some(idx.add_embedded(&t, ok.len(), opts, &mut stats)?),
            None => None,
        };
        idx.place(plan, &failed_set, new_seg, &new_rows, &mut stats)?;
        stats.merged = idx.compact(opts)?;
        for s in idx.segments.iter_mut() {
            if !s.has_graph() && opts.graph.wants(s.rows()) {
                s.add_graph(opts.params);
                idx.unsaved.insert(s.id);
                stats.graphs_built += 1;
            }
        }
        stats.segments = idx.segments.len();
        stats.seconds = started.elapsed().as_secs_f64();
        stats.images_per_second = stats.embedded as f64 / stats.seconds.max(1e-9);
        Ok((idx, stats))
    }

    /// The index an update starts from, for `root`: `previous` when the same model made it,
    /// else a new one.
    fn reopen(previous: Option<ImageIndex>, fingerprint: &str, dim: usize, root: &Path) -> Result<Self> {
        let mut idx = match previous {
            Some(p) if p.fingerprint != fingerprint => bail!(
                "this index was made by another model (fingerprint {}, this run {fingerprint}): write a new index with --out, or delete it",
                p.fingerprint
            ),
            Some(p) if p.dim != dim => bail!("this index holds {}-wide embeddings, the model makes {dim}", p.dim),
            Some(p) => p,
            None => Self::empty(fingerprint, root, dim),
        };
        idx.root = root.to_path_buf();
        Ok(idx)
    }

    /// Each file: reuse an old row, or embed it. Returns the plan and the positions in it of the
    /// files to embed; counts the entries whose files are gone.
    fn plan(&self, root: &Path, files: &[String], stats: &mut UpdateStats) -> Result<(Plan, Vec<usize>)> {
        let old: HashMap<&str, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_str(), i))
            .collect();
        let present: HashSet<&str> = files.iter().map(String::as_str).collect();
        stats.removed = old.keys().filter(|k| !present.contains(*k)).count();
        let mut plan = vec![];
        let mut todo = vec![];
        for f in files {
            let entry = files::stat(&root.join(f), f)?;
            match old.get(f.as_str()) {
                Some(&i) if self.entries[i].unchanged(&entry) => plan.push((entry, Some(i))),
                _ => {
                    todo.push(plan.len());
                    plan.push((entry, None));
                }
            }
        }
        Ok((plan, todo))
    }

    /// Stores the `n` new embeddings (n × dim) as a new segment (with a graph when the policy
    /// wants one); returns its position.
    fn add_embedded(&mut self, t: &Tensor, n: usize, opts: &IndexOptions, stats: &mut UpdateStats) -> Result<usize> {
        let dim = self.dim;
        let rows = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if rows.len() != n * dim {
            bail!("the embedder returned {} values for {n} images of {dim}", rows.len());
        }
        let graph = opts.graph.wants(n).then_some(opts.params);
        stats.graphs_built += graph.is_some() as usize;
        self.add_segment(rows, graph)
    }

    /// The index's entries from the plan: each file that kept its row or was embedded (into
    /// segment `new_seg`, at `new_rows`), those that failed left out.
    fn place(
        &mut self,
        plan: Plan,
        failed: &HashSet<usize>,
        new_seg: Option<usize>,
        new_rows: &HashMap<usize, usize>,
        stats: &mut UpdateStats,
    ) -> Result<()> {
        let mut entries = vec![];
        let mut loc = vec![];
        for (k, (entry, old_i)) in plan.into_iter().enumerate() {
            if failed.contains(&k) {
                continue;
            }
            match old_i {
                Some(i) => {
                    stats.reused += 1;
                    loc.push(self.loc[i]);
                }
                None => {
                    stats.embedded += 1;
                    loc.push((new_seg.expect("embedded rows have a segment"), new_rows[&k]));
                }
            }
            entries.push(entry);
        }
        self.entries = entries;
        self.loc = loc;
        self.rebuild_owner()
    }

    /// Drops segments with no live rows, then merges: every segment when more than
    /// [`MAX_DEAD_SHARE`] of the stored rows are deleted, all but the largest when there are
    /// more than [`MAX_SEGMENTS`]. Returns how many segments were merged away.
    fn compact(&mut self, opts: &IndexOptions) -> Result<usize> {
        let stored: usize = self.segments.iter().map(Segment::rows).sum();
        let dead = stored - self.entries.len();
        let mut chosen: Vec<usize> = if stored > 0 && dead as f64 > MAX_DEAD_SHARE * stored as f64 {
            (0..self.segments.len()).collect()
        } else if self.segments.len() > MAX_SEGMENTS {
            let largest = (0..self.segments.len())
                .max_by_key(|&s| self.segments[s].rows())
                .unwrap_or(0);
            (0..self.segments.len()).filter(|&s| s != largest).collect()
        } else {
            vec![]
        };
        // Segments whose rows are all deleted go anyway.
        for (s, o) in self.owner.iter().enumerate() {
            if o.iter().all(|&e| e == DEAD) && !chosen.contains(&s) {
                chosen.push(s);
            }
        }
        if chosen.is_empty() {
            return Ok(0);
        }
        let chosen_set: HashSet<usize> = chosen.iter().copied().collect();
        let mut rows = vec![];
        let mut moved = vec![];
        for (i, &(s, r)) in self.loc.iter().enumerate() {
            if chosen_set.contains(&s) {
                rows.extend_from_slice(self.segments[s].row(r));
                moved.push(i);
            }
        }
        // Remove the chosen segments, renumbering the positions of the others.
        let mut new_pos = vec![usize::MAX; self.segments.len()];
        let mut kept = vec![];
        for (s, seg) in std::mem::take(&mut self.segments).into_iter().enumerate() {
            if chosen_set.contains(&s) {
                self.unsaved.remove(&seg.id);
            } else {
                new_pos[s] = kept.len();
                kept.push(seg);
            }
        }
        self.segments = kept;
        for l in self.loc.iter_mut() {
            if !chosen_set.contains(&l.0) {
                l.0 = new_pos[l.0];
            }
        }
        if !moved.is_empty() {
            let n = moved.len();
            let graph = opts.graph.wants(n).then_some(opts.params);
            let p = self.add_segment(rows, graph)?;
            for (row, &i) in moved.iter().enumerate() {
                self.loc[i] = (p, row);
            }
        }
        self.rebuild_owner()?;
        Ok(chosen.len())
    }
}

/// The files under `root` an index can hold: a name it could not be reopened with (a backslash,
/// say), and links leading outside the folder or to folders, are left out and said so.
fn indexable_files(root: &Path, stats: &mut UpdateStats) -> Result<Vec<String>> {
    let listing = crate::data::image_files(root)?;
    let mut files = listing.files;
    files.retain(|f| match check_entry_path(f) {
        Ok(()) => true,
        Err(why) => {
            stats.failed.push((f.clone(), format!("{why}: left out of the index")));
            false
        }
    });
    stats.failed.extend(listing.skipped);
    Ok(files)
}
