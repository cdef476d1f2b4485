//! Output files: HdrHistogram's percentile-distribution text (`.hgrm`) and
//! an SVG plot. The SVG is written directly: two simple charts do not need
//! a plotting stack (plotters' text layout wants system fonts, which these
//! machines do not have).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// The `.hgrm` text of a histogram recorded in nanoseconds, values in
/// microseconds, as HdrHistogram's `outputPercentileDistribution` writes it.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / 1000.0;
        if q < 1.0 {
            let _ = writeln!(
                s,
                "{value:12.3} {q:14.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(s, "{value:12.3} {q:14.12} {total:10}");
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        h.distinct_values()
    );
    s
}

/// One latency curve: a label, a colour, dashed or not, and the histogram.
pub struct Curve<'a> {
    pub label: String,
    pub colour: &'static str,
    pub dashed: bool,
    pub hist: &'a Histogram<u64>,
}

/// One bar of the throughput chart (packets per second).
pub struct Bar {
    pub label: String,
    pub pps: f64,
    pub colour: &'static str,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Latency against percentile (log scale of 1/(1-p), as HdrHistogram plots
/// it), one curve per load level, and beside it the throughput bars.
pub fn svg(title: &str, curves: &[Curve], bars: &[Bar]) -> String {
    let (w, h) = (1100.0, 480.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="24" font-size="16">{}</text>"#,
        esc(title)
    );

    // Left: latency by percentile.
    let (x0, y0, pw, ph) = (70.0, 60.0, 560.0, 340.0);
    let max_exp = 5.0; // up to 99.999%
                       // Log scale of latency: from 1 µs to the next power of ten above the
                       // largest value shown.
    let ymax = curves
        .iter()
        .map(|c| c.hist.value_at_quantile(0.99999) as f64 / 1000.0)
        .fold(10.0, f64::max);
    let decades = ymax.log10().ceil().max(1.0);
    let ypos = |us: f64| y0 + ph - ph * (us.max(1.0).log10() / decades).min(1.0);
    let _ = writeln!(
        s,
        r#"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    for e in 0..=5 {
        let x = x0 + pw * f64::from(e) / max_exp;
        let label = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"][e as usize];
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{y0}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            y0 + ph,
            y0 + ph + 16.0
        );
    }
    for d in 0..=(decades as i32) {
        let v = 10f64.powi(d);
        let y = ypos(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{v}</text>"##,
            x0 + pw,
            x0 - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" transform="rotate(-90 18 {})" text-anchor="middle">round trip (µs, log scale)</text>"#,
        y0 + ph / 2.0,
        y0 + ph / 2.0
    );
    for (i, c) in curves.iter().enumerate() {
        if c.hist.is_empty() {
            continue;
        }
        let mut pts = String::new();
        for k in 0..=200 {
            let e = max_exp * f64::from(k) / 200.0;
            let q = 1.0 - 10f64.powf(-e);
            let v = c.hist.value_at_quantile(q.min(1.0)) as f64 / 1000.0;
            let x = x0 + pw * e / max_exp;
            let y = ypos(v);
            let _ = write!(pts, "{x:.1},{y:.1} ");
        }
        let dash = if c.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{pts}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            c.colour
        );
        let ly = y0 + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            x0 + 10.0,
            ly - 4.0,
            x0 + 34.0,
            ly - 4.0,
            c.colour,
            x0 + 40.0,
            ly,
            esc(&c.label)
        );
    }

    // Right: throughput against the ceilings.
    let (bx0, by0, bw, bh) = (720.0, 60.0, 340.0, 340.0);
    let bmax = nice(bars.iter().map(|b| b.pps).fold(1.0, f64::max));
    let _ = writeln!(
        s,
        r#"<text x="{bx0}" y="{}">packets per second (thousands)</text>"#,
        by0 - 8.0
    );
    let slot = bh / bars.len().max(1) as f64;
    for (i, b) in bars.iter().enumerate() {
        let y = by0 + slot * i as f64 + 4.0;
        let len = bw * (b.pps / bmax);
        let _ = writeln!(
            s,
            r#"<rect x="{bx0}" y="{y:.1}" width="{len:.1}" height="{:.1}" fill="{}"/>"#,
            slot * 0.55,
            b.colour
        );
        let _ = writeln!(
            s,
            r#"<text x="{bx0}" y="{:.1}">{} — {:.0}k</text>"#,
            y + slot * 0.55 + 13.0,
            esc(&b.label),
            b.pps / 1000.0
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// A round upper bound for an axis.
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

/// The machine the bench ran on: kernel, CPU model, cores.
pub(crate) fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    json!({
        "kernel": kernel.trim(),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// Latency percentiles of a histogram recorded in nanoseconds, in µs.
pub(crate) fn percentiles(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_us": us(0.50),
        "p90_us": us(0.90),
        "p99_us": us(0.99),
        "p99_9_us": us(0.999),
        "p99_99_us": us(0.9999),
        "max_us": h.max() as f64 / 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_and_svg_are_well_formed() {
        let mut h = crate::gen::new_histogram();
        for v in [10_000u64, 20_000, 30_000, 1_000_000] {
            h.record(v).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("#[Max     =     1000.447") || text.contains("#[Max     ="));
        assert!(text.contains("Total count    =            4"));
        let svg = svg(
            "t",
            &[Curve {
                label: "a".into(),
                colour: "red",
                dashed: false,
                hist: &h,
            }],
            &[Bar {
                label: "b".into(),
                pps: 1e5,
                colour: "blue",
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(nice(0.7), 1.0);
        assert_eq!(nice(3.0), 5.0);
    }
}
