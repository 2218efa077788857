//! The PNG plots: the expected size, not blank, and text where the title and axis labels go.

use std::path::Path;

use clip_cli::plot::{self, HeatMap, LinePlot, Series};

fn out_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Share of pixels that are not white, in a rectangle of the image.
fn ink(img: &image::RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> f64 {
    let mut n = 0usize;
    for y in y0..y1 {
        for x in x0..x1 {
            n += (img.get_pixel(x, y).0 != [255, 255, 255]) as usize;
        }
    }
    n as f64 / ((x1 - x0) * (y1 - y0)) as f64
}

fn open(p: &Path) -> image::RgbImage {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

/// Pixels of (about) one colour.
fn count_colour(img: &image::RgbImage, c: [u8; 3]) -> usize {
    img.pixels()
        .filter(|p| p.0.iter().zip(c).all(|(a, b)| (*a as i32 - b as i32).abs() <= 8))
        .count()
}

#[test]
fn a_line_plot_has_its_size_lines_title_axes_and_legend() {
    let dir = out_dir();
    let train = [2.3, 1.9, 1.2, 0.8, 0.5, 0.41];
    let val = [2.4, 2.0, 1.5, 1.1, 0.9, 0.92];
    let path = dir.path().join("loss.png");
    plot::line_plot(
        &path,
        &LinePlot {
            title: "Loss per epoch",
            x_label: "epoch",
            y_label: "loss",
            series: vec![
                Series {
                    name: "train",
                    values: &train,
                    colour: plot::BLUE,
                    width: 2,
                },
                Series {
                    name: "validation",
                    values: &val,
                    colour: plot::ORANGE,
                    width: 2,
                },
            ],
            log_y: false,
            y_range: None,
            x: None,
        },
    )
    .unwrap();
    let img = open(&path);
    assert_eq!((img.width(), img.height()), plot::LINE_SIZE);
    // Both series are drawn in their colours (lines, markers and legend swatches).
    assert!(count_colour(&img, plot::BLUE) > 300, "train line missing");
    assert!(count_colour(&img, plot::ORANGE) > 300, "validation line missing");
    // The title: dark text in the middle of the top strip; the y label: text at the far left.
    let (w, h) = (img.width(), img.height());
    assert!(ink(&img, w / 3, 4, 2 * w / 3, 34) > 0.02, "no title");
    assert!(ink(&img, 0, h / 3, 30, 2 * h / 3) > 0.01, "no y-axis label");
    assert!(ink(&img, w / 3, h - 30, 2 * w / 3, h) > 0.01, "no x-axis label");
    // A blank image (all white) or one colour would fail; so would a plot with no text at all.
    assert!(
        ink(&img, 0, 0, w, h) < 0.5,
        "mostly ink: the background was not drawn white"
    );
}

#[test]
fn a_log_scale_plot_of_learning_rates_is_drawn() {
    let dir = out_dir();
    let head = [1e-3, 1e-3, 5e-4, 2.5e-4];
    let img_lr = [1e-4, 1e-4, 5e-5, 2.5e-5];
    let path = dir.path().join("lr.png");
    plot::line_plot(
        &path,
        &LinePlot {
            title: "Learning rate per epoch",
            x_label: "epoch",
            y_label: "learning rate",
            series: vec![
                Series {
                    name: "heads",
                    values: &head,
                    colour: plot::GREEN,
                    width: 2,
                },
                Series {
                    name: "image tower",
                    values: &img_lr,
                    colour: plot::PURPLE,
                    width: 2,
                },
            ],
            log_y: true,
            y_range: None,
            x: None,
        },
    )
    .unwrap();
    let img = open(&path);
    assert_eq!((img.width(), img.height()), plot::LINE_SIZE);
    assert!(count_colour(&img, plot::GREEN) > 200);
    assert!(count_colour(&img, plot::PURPLE) > 200);
}

#[test]
fn a_single_epoch_plot_still_draws() {
    let dir = out_dir();
    let path = dir.path().join("one.png");
    plot::line_plot(
        &path,
        &LinePlot {
            title: "Recall@1 per epoch",
            x_label: "epoch",
            y_label: "recall@1",
            series: vec![Series {
                name: "image → text",
                values: &[0.3],
                colour: plot::RED,
                width: 2,
            }],
            log_y: false,
            y_range: Some((0.0, 1.0)),
            x: None,
        },
    )
    .unwrap();
    let img = open(&path);
    assert!(
        count_colour(&img, plot::RED) > 20,
        "the one point and the legend swatch"
    );
}

#[test]
fn a_heat_map_has_cells_a_diagonal_a_colour_bar_and_a_key() {
    let dir = out_dir();
    let n = 5;
    let m: Vec<Vec<f32>> = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 0.9 } else { -0.2 }).collect())
        .collect();
    let rows: Vec<String> = (0..n).map(|i| format!("image-{i}.jpg")).collect();
    let cols: Vec<String> = vec![
        "人蔘".into(),
        "a cup of coffee".into(),
        "枸杞".into(),
        "a cat".into(),
        "rocket".into(),
    ];
    let path = dir.path().join("sim.png");
    plot::heat_map(
        &path,
        &m,
        &HeatMap {
            title: "Similarity after training",
            row_axis: "image",
            col_axis: "caption",
            row_names: &rows,
            col_names: &cols,
            lo: -1.0,
            hi: 1.0,
            value_label: "cosine similarity",
            see_also: "report.html",
        },
    )
    .unwrap();
    let img = open(&path);
    assert!(
        img.width() > 800 && img.height() >= 560,
        "{}×{}",
        img.width(),
        img.height()
    );
    // The diagonal's red (0.9 → near red) and the off-diagonal's light blue cells.
    let red = plot::css_colour(0.9, -1.0, 1.0);
    let rgb = |s: &str| [0, 2, 4].map(|k| u8::from_str_radix(&s[1 + k..3 + k], 16).unwrap());
    assert!(count_colour(&img, rgb(&red)) > 5 * 1000, "diagonal cells");
    assert!(
        count_colour(&img, rgb(&plot::css_colour(-0.2, -1.0, 1.0))) > 20 * 1000,
        "off-diagonal cells"
    );
    // The key beside the matrix holds text.
    assert!(ink(&img, 680, 40, img.width(), 300) > 0.01, "no key");
}

#[test]
fn only_text_the_font_has_is_drawable() {
    assert!(plot::drawable("an astronaut in an orange suit, with a helmet"));
    assert!(plot::drawable("é → × ≤"));
    assert!(!plot::drawable("人蔘"));
    assert_eq!(plot::shorten("abcdef", 4), "abc…");
    assert_eq!(plot::shorten("abc", 4), "abc");
}

#[test]
fn a_contact_sheet_writes_rank_score_and_name_under_each_image() {
    let dir = out_dir();
    let photo = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
    let tiles: Vec<plot::Tile> = (0..4)
        .map(|k| plot::Tile {
            image: (k != 3).then(|| photo.clone()),
            lines: vec![format!("#{}  cosine 0.{k}12", k + 1), format!("photo-{k}.jpg")],
        })
        .collect();
    let path = dir.path().join("sheet.png");
    plot::contact_sheet(&path, "Best images for \"a cup of coffee\"", &tiles).unwrap();
    let img = open(&path);
    let (cols, rows) = (3, 2);
    let cell = plot::TILE + 16;
    assert_eq!(img.width(), cols * cell);
    assert!(
        img.height() > rows * (plot::TILE + 36),
        "room for two lines of text per tile"
    );
    // Text under the first tile (between the thumbnail and the next row) and in the title strip.
    let top = 36;
    let under = top + 4 + plot::TILE + 2;
    assert!(
        ink(&img, 8, under, 8 + plot::TILE, under + 36) > 0.02,
        "no text under the first tile"
    );
    assert!(ink(&img, 0, 0, img.width(), 30) > 0.01, "no title");
    // The missing image is a grey box, not a crash or a gap.
    let (gx, gy) = (8 + plot::TILE / 2, top + cell + plot::TILE / 2);
    assert_eq!(img.get_pixel(gx, gy).0, [220, 220, 220]);
}

#[test]
fn empty_input_still_gives_a_labelled_picture_not_a_panic() {
    let dir = out_dir();
    let path = dir.path().join("empty.png");
    plot::line_plot(
        &path,
        &LinePlot {
            title: "Loss per epoch",
            x_label: "epoch",
            y_label: "loss",
            series: vec![Series {
                name: "train",
                values: &[f64::NAN],
                colour: plot::BLUE,
                width: 2,
            }],
            log_y: true,
            y_range: None,
            x: None,
        },
    )
    .unwrap();
    let img = open(&path);
    assert!(
        ink(&img, img.width() / 3, 4, 2 * img.width() / 3, 34) > 0.02,
        "no title"
    );
}
