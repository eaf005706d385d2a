//! PNG charts for evaluation reports: win rates with their intervals, and training curves.
//! Text is drawn with the DejaVu Sans font embedded in the binary, so nothing depends on system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::error::{Error, Result};

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The bytes are a valid TTF shipped by the `dejavu` crate; a failure would only lose labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::output(path, format!("cannot draw: {e}"))
}

/// Draw to a temporary file, then rename it into place (atomic like every other write).
fn draw_atomic(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        draw(&root)?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// One bar per method: win rate against the baseline, with its 95% interval and a line at 0.5.
pub fn win_rate_chart(path: &Path, title: &str, rows: &[(String, f64, [f64; 2])]) -> Result<()> {
    draw_atomic(path, (800, 480), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((0..rows.len()).into_segmented(), 0f64..1f64)
            .map_err(|e| plot_err(path, e))?;
        let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("win rate vs baseline")
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (_, w, _))| {
                let mut bar = Rectangle::new(
                    [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *w)],
                    BLUE.mix(0.5).filled(),
                );
                bar.set_margin(0, 0, 12, 12);
                bar
            }))
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(rows.iter().enumerate().map(|(i, (_, _, ci))| {
                PathElement::new(
                    vec![(SegmentValue::CenterOf(i), ci[0]), (SegmentValue::CenterOf(i), ci[1])],
                    BLACK.stroke_width(2),
                )
            }))
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(SegmentValue::Exact(0), 0.5), (SegmentValue::Exact(rows.len()), 0.5)],
                RED.stroke_width(1),
            )))
            .map_err(|e| plot_err(path, e))?;
        Ok(())
    })
}

/// Loss against step, one line per run.
pub fn training_curves(path: &Path, title: &str, runs: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let max_x = runs.iter().flat_map(|r| r.1.iter().map(|p| p.0)).fold(1.0, f64::max);
    let max_y = runs.iter().flat_map(|r| r.1.iter().map(|p| p.1)).filter(|y| y.is_finite()).fold(0.1, f64::max) * 1.05;
    draw_atomic(path, (800, 480), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..max_x, 0f64..max_y)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        for (i, (name, points)) in runs.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| plot_err(path, e))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        Ok(())
    })
}

/// One method's win rate at one model size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizePoint {
    pub parameters: f64,
    pub win_rate: f64,
    pub ci95: [f64; 2],
}

/// Win rate against model size (parameters, log scale), one line per method with its 95% intervals as
/// vertical bars, and a line at 0.5. `lines`: (method, its points).
pub fn win_rate_by_size(path: &Path, title: &str, lines: &[(String, Vec<SizePoint>)]) -> Result<()> {
    let xs = || lines.iter().flat_map(|l| l.1.iter().map(|p| p.parameters));
    let (lo, hi) = (xs().fold(f64::INFINITY, f64::min).max(1.0), xs().fold(1.0, f64::max));
    let (lo, hi) = (lo / 1.5, hi * 1.5);
    draw_atomic(path, (900, 540), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)
            .map_err(|e| plot_err(path, e))?;
        chart
            .configure_mesh()
            .x_desc("parameters")
            .y_desc("win rate vs SFT")
            .x_label_formatter(&|x| format!("{:.2}M", x / 1e6))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        chart
            .draw_series(std::iter::once(PathElement::new(vec![(lo, 0.5), (hi, 0.5)], BLACK.mix(0.4).stroke_width(1))))
            .map_err(|e| plot_err(path, e))?;
        for (i, (name, points)) in lines.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            // Methods at one size are nudged apart a little so that their intervals do not hide each other.
            let nudge = 1.0 + 0.015 * (i as f64 - lines.len() as f64 / 2.0);
            let at = |x: f64| x * nudge;
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| (at(p.parameters), p.win_rate)),
                    colour.stroke_width(2),
                ))
                .map_err(|e| plot_err(path, e))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
            chart
                .draw_series(points.iter().map(|p| {
                    PathElement::new(
                        vec![(at(p.parameters), p.ci95[0]), (at(p.parameters), p.ci95[1])],
                        colour.stroke_width(1),
                    )
                }))
                .map_err(|e| plot_err(path, e))?;
            chart
                .draw_series(points.iter().map(|p| Circle::new((at(p.parameters), p.win_rate), 3, colour.filled())))
                .map_err(|e| plot_err(path, e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| plot_err(path, e))?;
        Ok(())
    })
}
