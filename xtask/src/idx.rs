//! The IDX format of (Fashion-)MNIST: a magic number, big-endian dimensions, then raw bytes.
//!
//! The sizes come from the file, so every one is checked (with overflow-checked arithmetic)
//! before any slice is taken: a truncated, corrupt or hostile file is an error, never a panic.

use anyhow::{bail, Result};

/// Magic numbers: unsigned bytes, 3 dimensions (images) or 1 (labels).
const IMAGES_MAGIC: u32 = 2051;
const LABELS_MAGIC: u32 = 2049;

/// A pair of IDX files: `n` images of `h`×`w` grey pixels and their labels.
#[derive(Debug)]
pub struct Idx<'a> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pixels: &'a [u8],
    labels: &'a [u8],
}

impl<'a> Idx<'a> {
    /// Checks an images file and a labels file against each other; labels must be below `classes`.
    pub fn parse(images: &'a [u8], labels: &'a [u8], classes: usize) -> Result<Self> {
        let be = |b: &[u8], at: usize| -> Option<usize> {
            Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
        };
        let (Some(im), Some(lm)) = (be(images, 0), be(labels, 0)) else {
            bail!("too short for IDX files ({} and {} bytes)", images.len(), labels.len());
        };
        if im != IMAGES_MAGIC as usize || lm != LABELS_MAGIC as usize {
            bail!("not IDX image and label files (magic numbers {im} and {lm}, expected {IMAGES_MAGIC} and {LABELS_MAGIC})");
        }
        let (Some(n), Some(h), Some(w), Some(nl)) = (be(images, 4), be(images, 8), be(images, 12), be(labels, 4))
        else {
            bail!("truncated IDX header");
        };
        if nl != n {
            bail!("{n} images but {nl} labels");
        }
        if h == 0 || w == 0 || h > u16::MAX as usize || w > u16::MAX as usize {
            bail!("image size {h}×{w} is not a picture");
        }
        let want = n.checked_mul(h * w).and_then(|p| p.checked_add(16));
        if want != Some(images.len()) || labels.len() != n.saturating_add(8) {
            bail!(
                "the files do not hold {n} images of {h}×{w} and {n} labels ({} and {} bytes)",
                images.len(),
                labels.len()
            );
        }
        let labels = &labels[8..];
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
            bail!("label {l} of image {i} is not one of the {classes} classes");
        }
        Ok(Self {
            n,
            h,
            w,
            pixels: &images[16..],
            labels,
        })
    }

    /// Image `i`'s label and its `h·w` pixels, row by row.
    pub fn get(&self, i: usize) -> Option<(usize, &'a [u8])> {
        let per = self.h * self.w;
        Some((*self.labels.get(i)? as usize, self.pixels.get(i * per..(i + 1) * per)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn files(n: u32, h: u32, w: u32, label: u8) -> (Vec<u8>, Vec<u8>) {
        let mut images = [IMAGES_MAGIC, n, h, w]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<_>>();
        images.extend((0..n * h * w).map(|i| i as u8));
        let mut labels = [LABELS_MAGIC, n]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<_>>();
        labels.extend((0..n).map(|i| (i as u8 + label) % 10));
        (images, labels)
    }

    #[test]
    fn reads_images_and_labels() {
        let (im, lb) = files(3, 2, 4, 0);
        let idx = Idx::parse(&im, &lb, 10).unwrap();
        assert_eq!((idx.n, idx.h, idx.w), (3, 2, 4));
        assert_eq!(idx.get(1), Some((1, &im[24..32])));
        assert_eq!(idx.get(3), None);
    }

    #[test]
    fn bad_files_are_errors() {
        let (im, lb) = files(3, 2, 4, 0);
        assert!(Idx::parse(&im[..20], &lb, 10).is_err(), "truncated");
        assert!(Idx::parse(&lb, &im, 10).is_err(), "swapped");
        assert!(Idx::parse(&im, &lb, 2).unwrap_err().to_string().contains("label 2"));
        // A header promising 2^32-1 images of 65535² pixels does not overflow.
        let mut huge = im.clone();
        huge[4..16].copy_from_slice(&[0xFF; 12]);
        assert!(Idx::parse(&huge, &lb, 10).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(images in proptest::collection::vec(any::<u8>(), 0..64),
                                       labels in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = Idx::parse(&images, &labels, 10);
        }

        #[test]
        fn corrupted_valid_files_never_panic(n in 0u32..4, h in 1u32..4, w in 1u32..4,
                                             flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                                             cut in any::<usize>()) {
            let (mut im, mut lb) = files(n, h, w, 0);
            for (at, v) in flips {
                if at % 2 == 0 { let k = at / 2 % im.len(); im[k] = v; } else { let k = at / 2 % lb.len(); lb[k] = v; }
            }
            im.truncate(im.len() - cut % 3);
            if let Ok(idx) = Idx::parse(&im, &lb, 10) {
                for i in 0..idx.n {
                    let (label, px) = idx.get(i).expect("every counted image is there");
                    prop_assert!(label < 10 && px.len() == idx.h * idx.w);
                }
            }
        }
    }
}
