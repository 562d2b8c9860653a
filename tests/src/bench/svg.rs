//! Minimal SVG charts (a bar chart and a line chart), written by hand: no plotting crate.

use std::fmt::Write as _;

const W: f64 = 640.0;
const H: f64 = 360.0;
const LEFT: f64 = 90.0;
const BOTTOM: f64 = 50.0;
const TOP: f64 = 40.0;
const COLORS: [&str; 6] = [
    "#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#4a5568",
];

fn header(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        escape(title)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Y axis with 5 ticks from 0 to `max`.
fn y_axis(s: &mut String, max: f64, unit: &str) {
    let plot_h = H - TOP - BOTTOM;
    for i in 0..=5 {
        let v = max * f64::from(i) / 5.0;
        let y = H - BOTTOM - plot_h * f64::from(i) / 5.0;
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - 20.0,
            LEFT - 6.0,
            y + 4.0,
            human(v)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{}</text>",
        H / 2.0,
        H / 2.0,
        escape(unit)
    );
}

pub fn bar_chart(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let mut s = header(title);
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0) * 1.1;
    y_axis(&mut s, max, unit);
    let plot_w = W - LEFT - 20.0;
    let plot_h = H - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    for (i, (label, v)) in bars.iter().enumerate() {
        let h = plot_h * v / max;
        let x = LEFT + slot * i as f64 + slot * 0.15;
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            H - BOTTOM - h,
            slot * 0.7,
            COLORS[i % COLORS.len()],
            x + slot * 0.35,
            H - BOTTOM + 18.0,
            escape(label),
            x + slot * 0.35,
            H - BOTTOM - h - 5.0,
            human(*v)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Lines over a log-scaled x axis (Service counts span decades).
pub fn line_chart(
    title: &str,
    x_label: &str,
    unit: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let mut s = header(title);
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let max_y = points.clone().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.1;
    let (min_x, max_x) = points
        .map(|p| p.0.max(1.0).log10())
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (min_x, max_x) = if min_x >= max_x {
        (min_x - 1.0, min_x + 1.0)
    } else {
        (min_x, max_x)
    };
    y_axis(&mut s, max_y, unit);
    let plot_w = W - LEFT - 40.0;
    let plot_h = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + 10.0 + plot_w * (x.max(1.0).log10() - min_x) / (max_x - min_x);
    let py = |y: f64| H - BOTTOM - plot_h * y / max_y;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for p in pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                px(p.0),
                py(p.1),
                px(p.0),
                H - BOTTOM + 16.0,
                human(p.0)
            );
        }
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            LEFT + 20.0,
            TOP + 4.0 + 16.0 * i as f64,
            LEFT + 36.0,
            TOP + 13.0 + 16.0 * i as f64,
            escape(name)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} (log scale)</text>",
        W / 2.0,
        H - 10.0,
        escape(x_label)
    );
    s.push_str("</svg>\n");
    s
}
