//! SVG charts (plotters' SVG backend) for both benchmark binaries:
//! `meshbench`'s reports (docs/benchmarks.md) and `meshsim`'s scaling
//! plots (docs/scaling.md). One module, so both draw lines alike.

use std::path::Path;

use plotters::prelude::*;

pub use plotters::chart::SeriesLabelPosition;

/// One line of a chart.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// The colours of lines and bars, in order.
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0xb0, 0x7a, 0xa1),
];

/// How a line chart looks.
#[derive(Clone, Debug)]
pub struct LineChart<'a> {
    /// Heading.
    pub title: &'a str,
    /// X axis label.
    pub x: &'a str,
    /// Y axis label.
    pub y: &'a str,
    /// Width and height in pixels.
    pub size: (u32, u32),
    /// X on a log scale (every x must then be positive).
    pub log_x: bool,
    /// Where the legend goes.
    pub legend: SeriesLabelPosition,
}

impl<'a> LineChart<'a> {
    /// A 900 × 420 chart, linear x, legend upper left.
    pub fn new(title: &'a str, x: &'a str, y: &'a str) -> Self {
        Self {
            title,
            x,
            y,
            size: (900, 420),
            log_x: false,
            legend: SeriesLabelPosition::UpperLeft,
        }
    }
}

/// Writes `series` as lines to `path`: x over the points' range, y from 0
/// to a tenth above the highest point.
pub fn lines(path: &Path, chart: &LineChart<'_>, series: &[Series]) -> Result<(), String> {
    let root = SVGBackend::new(path, chart.size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (x0, mut x1) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let x0 = if x0 > x1 { 0.0 } else { x0 };
    if x1 <= x0 {
        // No points, or one x: a range plotters can draw.
        x1 = x0 + 1.0;
    }
    let top = all().map(|p| p.1).fold(0.1, f64::max) * 1.1;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut c = $chart;
            c.configure_mesh()
                .x_desc(chart.x)
                .y_desc(chart.y)
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, s) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                c.draw_series(std::iter::once(PathElement::new(
                    s.points.clone(),
                    color.stroke_width(2),
                )))
                .map_err(|e| e.to_string())?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            }
            c.configure_series_labels()
                .position(chart.legend.clone())
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }};
    }
    if chart.log_x {
        draw!(
            builder
                .build_cartesian_2d((x0..x1).log_scale(), 0f64..top)
                .map_err(|e| e.to_string())?
        );
    } else {
        draw!(
            builder
                .build_cartesian_2d(x0..x1, 0f64..top)
                .map_err(|e| e.to_string())?
        );
    }
    root.present().map_err(|e| e.to_string())
}
