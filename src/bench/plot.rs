//! The SVG of a run: latency CDFs (time to first token, end to end) and output tokens/s over
//! time, in one file (plotters' SVG backend: no fonts or system libraries needed).

use std::path::Path;

use plotters::prelude::*;

use super::report::Report;

/// Output tokens per 1-second bucket, each request's tokens spread evenly from its first
/// token to its end.
fn throughput(r: &Report) -> Vec<(f64, f64)> {
    let end = r.records.iter().map(|x| x.end).fold(0.0, f64::max);
    let mut buckets = vec![0.0; end.ceil() as usize + 1];
    for x in r.records.iter().filter(|x| x.ok() && x.output_tokens > 0) {
        let from = x.start + x.ttft.unwrap_or(0.0);
        let span = (x.end - from).max(1e-6);
        let n = 64;
        for i in 0..n {
            let t = from + span * (i as f64 + 0.5) / n as f64;
            buckets[t as usize] += x.output_tokens as f64 / n as f64;
        }
    }
    buckets
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as f64, v))
        .collect()
}

fn cdf(mut v: Vec<f64>) -> Vec<(f64, f64)> {
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.into_iter()
        .enumerate()
        .map(|(i, x)| (x * 1e3, (i + 1) as f64 / n))
        .collect()
}

pub fn write_svg(r: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let ok: Vec<_> = r
        .records
        .iter()
        .filter(|x| x.ok() && x.start >= r.warmup_s)
        .collect();
    let e2e = cdf(ok.iter().map(|x| x.e2e()).collect());
    let ttft = cdf(ok.iter().filter_map(|x| x.ttft).collect());
    let xmax = e2e.last().map_or(1.0, |p| p.0).max(1.0) * 1.05;
    let mut c = ChartBuilder::on(&left)
        .caption("latency CDF", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..xmax, 0f64..1.0)?;
    c.configure_mesh()
        .x_desc("ms")
        .y_desc("fraction of requests")
        .draw()?;
    c.draw_series(LineSeries::new(ttft, &BLUE))?
        .label("time to first token")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE));
    c.draw_series(LineSeries::new(e2e, &RED))?
        .label("end to end")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED));
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    let tp = throughput(r);
    let tmax = tp.len().max(2) as f64;
    let ymax = tp.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&right)
        .caption("output tokens/s", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)?;
    c.configure_mesh()
        .x_desc("seconds since start")
        .y_desc("tokens/s")
        .draw()?;
    c.draw_series(LineSeries::new(tp, &BLACK))?;
    c.draw_series(std::iter::once(PathElement::new(
        [(r.warmup_s, 0.0), (r.warmup_s, ymax)],
        RGBColor(150, 150, 150),
    )))?;
    root.present()?;
    Ok(())
}
