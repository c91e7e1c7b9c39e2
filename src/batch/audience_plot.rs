//! PNG histograms of each product's scores with its three cut-offs, for `segmentd audiences
//! --plots DIR`: the view an analyst uses to check that the thresholds are sensible.
//!
//! Drawn with `plotters` on its bitmap backend at 1000×600. Text uses the bundled DejaVu Sans
//! (`assets/fonts`, Bitstream Vera licence) through plotters' `ab_glyph` renderer, so no
//! system font library or font file is needed at build or run time.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use rayon::prelude::*;

use super::FileError;
use crate::audience::engine::{Readiness, Thresholds, Tier};

/// Image size in pixels.
pub const SIZE: (u32, u32) = (1000, 600);
/// Histogram bins.
const BINS: usize = 60;
const FONT_NAME: &str = "sans-serif";
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT)
                .map_err(|_| "the bundled font is unreadable".to_owned())
        })
        .clone()
}

/// The file name of a product's plot: its id with anything but `[A-Za-z0-9._-]` replaced.
fn file_stem(product: &str) -> String {
    let stem: String = product
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if stem.is_empty() || stem.starts_with('.') {
        format!("product_{stem}")
    } else {
        stem
    }
}

/// What a product's plot shows: its thresholds and its tier sizes.
#[derive(Debug, Clone, Copy)]
pub struct PlotProduct<'a> {
    /// Product id.
    pub product: &'a str,
    /// The thresholds in force.
    pub thresholds: &'a Thresholds,
    /// Placed visitors per tier (premium, growth, volume).
    pub sizes: [u64; 3],
}

/// Why plots could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// A file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// A plot could not be drawn.
    #[error("plot of product {product}: {reason}")]
    Draw {
        /// The product.
        product: String,
        /// Why.
        reason: String,
    },
}

/// Draws every product's plot into `dir` (created if missing), in parallel; returns each
/// product's file.
pub fn draw_all<'a>(
    dir: &Path,
    products: &[PlotProduct<'_>],
    scores: impl Fn(&str) -> &'a [f32] + Sync,
) -> Result<Vec<Option<PathBuf>>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| {
        PlotError::File(FileError::Io {
            path: dir.display().to_string(),
            source,
        })
    })?;
    register_font().map_err(|reason| PlotError::Draw {
        product: "*".into(),
        reason,
    })?;
    // Distinct file names even when two ids sanitise alike.
    let mut used = std::collections::HashSet::new();
    let paths: Vec<PathBuf> = products
        .iter()
        .map(|p| {
            let stem = file_stem(p.product);
            let mut name = format!("{stem}.png");
            let mut n = 2;
            while !used.insert(name.clone()) {
                name = format!("{stem}-{n}.png");
                n += 1;
            }
            dir.join(name)
        })
        .collect();
    products
        .par_iter()
        .zip(paths.par_iter())
        .map(|(product, path)| {
            draw(path, product, scores(product.product))
                .map(|()| Some(path.clone()))
                .map_err(|reason| PlotError::Draw {
                    product: product.product.to_owned(),
                    reason,
                })
        })
        .collect()
}

fn tier_colour(tier: Tier) -> RGBColor {
    match tier {
        Tier::Premium => RGBColor(200, 30, 45),
        Tier::Growth => RGBColor(230, 130, 0),
        Tier::Volume => RGBColor(30, 110, 180),
    }
}

/// The chart every plot draws on: probability across, score count up.
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A product's scores binned over the range the plot shows.
struct Bins {
    lo: f64,
    hi: f64,
    width: f64,
    counts: [u64; BINS],
    /// The y-axis top.
    top: f64,
}

impl Bins {
    /// Bins the scores over a range that also shows every finite cut-off.
    fn new(t: &Thresholds, scores: &[f32]) -> Self {
        let cutoffs: Vec<f64> = Tier::ALL
            .iter()
            .map(|&tier| t.cutoffs.get(tier))
            .filter(|v| v.is_finite())
            .collect();
        let values = scores
            .iter()
            .map(|&s| f64::from(s))
            .chain(cutoffs.iter().copied());
        let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-6 {
            lo = (lo - 0.005).max(0.0);
            hi = (hi + 0.005).min(1.0).max(lo + 0.01);
        }
        let pad = (hi - lo) * 0.02;
        let (lo, hi) = ((lo - pad).max(0.0), (hi + pad).min(1.0));
        let width = (hi - lo) / BINS as f64;
        let mut counts = [0u64; BINS];
        for &s in scores {
            let i = (((f64::from(s) - lo) / width) as usize).min(BINS - 1);
            counts[i] += 1;
        }
        // Headroom above the highest bar for the legend.
        let top = (*counts.iter().max().unwrap_or(&1)).max(1) as f64 * 1.3;
        Self {
            lo,
            hi,
            width,
            counts,
            top,
        }
    }
}

/// One product's histogram with its cut-offs.
pub fn draw(path: &Path, product: &PlotProduct<'_>, scores: &[f32]) -> Result<(), String> {
    register_font()?;
    let t = product.thresholds;
    let bins = Bins::new(t, scores);
    let (lo, hi, width) = (bins.lo, bins.hi, bins.width);
    // The legend goes on the side away from the cut-offs (where the tail is).
    let legend = if t.cutoffs.premium.is_finite() && t.cutoffs.premium > (lo + hi) / 2.0 {
        SeriesLabelPosition::UpperLeft
    } else {
        SeriesLabelPosition::UpperRight
    };

    let e = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let caption = format!(
        "{}: {} scores, skewness {:.2}, variance {:.4}, confidence {:.2}",
        product.product,
        super::text::count(t.count),
        t.skewness,
        t.variance,
        t.confidence
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT_NAME, 22))
        .margin(18)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d(lo..hi, 0f64..bins.top)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("conversion probability")
        .y_desc("scores")
        .x_labels(10)
        .y_labels(8)
        .x_label_formatter(&|v| format!("{v:.3}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style((FONT_NAME, 15))
        .axis_desc_style((FONT_NAME, 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(bins.counts.iter().enumerate().map(|(i, &count)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new(
                [(x0, 0.0), (x0 + width, count as f64)],
                RGBColor(150, 175, 205).filled(),
            )
        }))
        .map_err(|x| e(&x))?;
    draw_cutoffs(&mut chart, product, bins.top)?;
    chart
        .configure_series_labels()
        .position(legend)
        .margin(12)
        .label_font((FONT_NAME, 16))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(120, 120, 120))
        .draw()
        .map_err(|x| e(&x))?;
    if t.readiness != Readiness::Ready {
        let note = match t.readiness {
            Readiness::TooFewScores => "too few scores: reported, no one placed",
            _ => "constant scores: reported, no one placed",
        };
        root.draw(&Text::new(
            note,
            (95, 52),
            (FONT_NAME, 17).into_font().color(&RGBColor(200, 30, 45)),
        ))
        .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}

/// A vertical line in the tier's colour at each finite cut-off, with its legend entry.
fn draw_cutoffs(
    chart: &mut Chart<'_, '_>,
    product: &PlotProduct<'_>,
    top: f64,
) -> Result<(), String> {
    let t = product.thresholds;
    for (i, tier) in Tier::ALL.into_iter().enumerate() {
        let value = t.cutoffs.get(tier);
        if !value.is_finite() {
            continue;
        }
        let colour = tier_colour(tier);
        let label = format!(
            "{} \u{2265} {:.4} (p{:.1}, {} visitors)",
            tier.as_str(),
            value,
            t.percentiles.get(tier),
            product.sizes[i]
        );
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(value, 0.0), (value, top)],
                colour.stroke_width(3),
            )))
            .map_err(|x| x.to_string())?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
    }
    Ok(())
}
