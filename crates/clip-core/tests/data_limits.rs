//! Decompression bombs: a file of a few hundred bytes whose header declares a huge image is
//! refused from its header, at once and without allocating its pixels, naming the file and row;
//! `skip_bad` leaves it out and keeps the rest.

use std::path::Path;
use std::time::{Duration, Instant};

use clip_core::data::{Dataset, ImageStore, LoadOptions, MAX_DECODE_BYTES};
use clip_core::ClipConfig;
use image::{Rgb, RgbImage};

fn small() -> RgbImage {
    RgbImage::from_fn(16, 16, |x, y| Rgb([x as u8 * 16, y as u8 * 16, 80]))
}

/// A real 16×16 JPEG whose start-of-frame header is rewritten to say `w`×`h`.
fn jpeg_declaring(w: u16, h: u16) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(vec![]);
    small().write_to(&mut bytes, image::ImageFormat::Jpeg).unwrap();
    let mut b = bytes.into_inner();
    // SOFn marker: FF C0..C2, length (2), precision (1), height (2), width (2).
    let sof = b
        .windows(2)
        .position(|m| m[0] == 0xFF && (0xC0..=0xC2).contains(&m[1]))
        .expect("a start-of-frame marker");
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &byte in data {
        c ^= byte as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A real 16×16 PNG whose IHDR chunk (with a valid checksum) says `w`×`h`.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(vec![]);
    small().write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    let mut b = bytes.into_inner();
    // Signature (8), then IHDR: length (4), "IHDR" (4), width (4), height (4), 5 more, CRC (4).
    assert_eq!(&b[12..16], b"IHDR");
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

/// images/good.png, images/bomb.EXT and a captions.csv using the bomb on line 3.
fn dataset(bomb_name: &str, bomb: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    small().save(dir.path().join("images/good.png")).unwrap();
    std::fs::write(dir.path().join("images").join(bomb_name), bomb).unwrap();
    std::fs::write(
        dir.path().join("captions.csv"),
        format!("image,caption\ngood.png,a good picture\n{bomb_name},a bomb\ngood.png,again\n"),
    )
    .unwrap();
    dir
}

fn assert_refused(bomb_name: &str, bomb: &[u8]) {
    assert!(bomb.len() < 2000, "the bomb itself is small: {} bytes", bomb.len());
    let dir = dataset(bomb_name, bomb);
    let cfg = ClipConfig::tiny();
    let silent = &clip_core::progress::Silent;
    let t = Instant::now();
    let err = Dataset::load_with_images(dir.path(), &LoadOptions::default(), &cfg, silent).unwrap_err();
    let took = t.elapsed();
    let err = format!("{err:#}");
    assert!(err.contains("captions.csv:3:"), "no file:line in: {err}");
    assert!(err.contains(bomb_name) && err.contains("image too large"), "{err}");
    assert!(took < Duration::from_millis(500), "refusing took {took:?}");

    let skip = LoadOptions {
        skip_bad: true,
        ..LoadOptions::default()
    };
    let (ds, store) = Dataset::load_with_images(dir.path(), &skip, &cfg, silent).unwrap();
    assert_eq!(ds.pairs.len(), 2, "the good picture's two captions are kept");
    assert_eq!(ds.bad.len(), 1);
    assert_eq!(ds.bad[0].line, 3);
    assert!(ds.bad[0].reason.contains("too large"), "{}", ds.bad[0]);
    assert_eq!(store.len(), 2);

    // The single-image path (clip-predict, the index) refuses it too, naming the file.
    let path = dir.path().join("images").join(bomb_name);
    let err = format!("{:#}", ImageStore::load_one(&path, &cfg).unwrap_err());
    assert!(err.contains(bomb_name) && err.contains("too large"), "{err}");
}

#[test]
fn a_jpeg_declaring_65535_square_is_refused_from_its_header() {
    assert_refused("bomb.jpg", &jpeg_declaring(65535, 65535));
}

#[test]
fn a_png_declaring_a_huge_size_is_refused_from_its_header() {
    assert_refused("bomb.png", &png_declaring(1 << 20, 1 << 20));
}

#[test]
fn an_image_within_the_side_limit_but_over_the_memory_limit_is_refused() {
    // 16000×16000 RGB is 768 MB: both sides are allowed, the allocation is not.
    const { assert!(16_000u64 * 16_000 * 3 > MAX_DECODE_BYTES) };
    assert_refused("wide.png", &png_declaring(16_000, 16_000));
    assert_refused("wide.jpg", &jpeg_declaring(16_000, 16_000));
}

#[test]
fn ordinary_images_still_decode() {
    let dir = dataset("fine.jpg", &{
        let mut b = std::io::Cursor::new(vec![]);
        small().write_to(&mut b, image::ImageFormat::Jpeg).unwrap();
        b.into_inner()
    });
    let (ds, _) = Dataset::load_with_images(
        dir.path(),
        &LoadOptions::default(),
        &ClipConfig::tiny(),
        &clip_core::progress::Silent,
    )
    .unwrap();
    assert_eq!(ds.pairs.len(), 3);
    assert!(Path::new(&ds.images[1].path).ends_with("images/fine.jpg"));
}

/// A tar header for a regular file `name` of `size` bytes.
fn tar_header(name: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// A tar shard holding `members` (name, bytes), then a last member `huge.jpg` whose header claims
/// `claimed` bytes while only a few follow (the shard ends there, without the end-of-archive
/// blocks a writer adds).
fn shard_with_liar(path: &Path, members: &[(&str, Vec<u8>)], claimed: u64) {
    let mut raw = vec![];
    for (name, bytes) in members {
        raw.extend(tar_header(name, bytes.len() as u64));
        raw.extend_from_slice(bytes);
        raw.resize(raw.len().div_ceil(512) * 512, 0);
    }
    raw.extend(tar_header("huge.jpg", claimed));
    raw.extend_from_slice(&[0xFF, 0xD8, 0xFF, 0xE0]);
    raw.extend_from_slice(&[0u8; 508]);
    std::fs::write(path, raw).unwrap();
}

#[test]
fn webdataset_members_are_held_to_the_same_limits_as_files() {
    let dir = tempfile::tempdir().unwrap();
    let png = |img: &RgbImage| {
        let mut b = std::io::Cursor::new(vec![]);
        img.write_to(&mut b, image::ImageFormat::Png).unwrap();
        b.into_inner()
    };
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    // Past the end of its shard, and past any image's size (100 GB).
    shard_with_liar(
        &shards.join("shard-001.tar"),
        &[("fine.png", png(&small())), ("fine.txt", b"a fine picture".to_vec())],
        1 << 20,
    );
    shard_with_liar(
        &shards.join("shard-000.tar"),
        &[
            ("good.png", png(&small())),
            ("good.txt", b"a good picture".to_vec()),
            ("bomb.jpg", jpeg_declaring(65535, 65535)),
            ("bomb.txt", b"a bomb".to_vec()),
            ("huge.txt", b"a header that lies".to_vec()),
        ],
        100 << 30,
    );
    let skip = LoadOptions {
        skip_bad: true,
        ..LoadOptions::default()
    };
    let cfg = ClipConfig::tiny();
    let t = Instant::now();
    let (ds, store) = Dataset::load_with_images(&shards, &skip, &cfg, &clip_core::progress::Silent).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(ds.captions(), ["a good picture", "a fine picture"], "{:?}", ds.bad);
    assert_eq!((0..store.len()).filter(|&i| store.contains(i)).count(), 2);
    let bad: Vec<String> = ds.bad.iter().map(|b| b.to_string()).collect();
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert!(
        bad.iter()
            .any(|b| b.contains("shard-000.tar:huge.jpg") && b.contains("107374182400 bytes, more than the 256 MiB")),
        "{bad:?}"
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("shard-001.tar:huge.jpg") && b.contains("past the end of the shard")),
        "{bad:?}"
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("shard-000.tar:bomb.jpg") && b.contains("image too large")),
        "{bad:?}"
    );

    // A header within the shard but over the image limit is refused by its size alone.
    let big = dir.path().join("big.tar");
    // Written sparse: the 256 MiB of the image member are a hole, not bytes on disk.
    let header = tar_header;
    let f = std::fs::File::create(&big).unwrap();
    let size = MAX_DECODE_BYTES + 1;
    let next = 512 + size.div_ceil(512) * 512;
    use std::os::unix::fs::FileExt;
    f.write_all_at(&header("big.jpg", size), 0).unwrap();
    f.write_all_at(&header("big.txt", 7), next).unwrap();
    f.write_all_at(b"too big", next + 512).unwrap();
    f.set_len(next + 1024 + 1024).unwrap();
    drop(f);
    let err = format!("{:#}", Dataset::load(&big, &skip).unwrap_err());
    assert!(
        err.contains("big.tar:big.jpg") && err.contains("268435457 bytes, more than the 256 MiB"),
        "{err}"
    );
}
