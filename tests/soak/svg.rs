//! The soak's picture: its samples as stacked line charts sharing one time
//! axis (memory; file descriptors; the queue; messages accepted and
//! evicted; packets sent and PUBACKs), each fault a dashed vertical line.
//! Plain SVG, no library.

use std::fmt::Write as _;
use std::time::Duration;

use super::{Report, Sample};

const WIDTH: f64 = 960.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const PANEL: f64 = 150.0;
const GAP: f64 = 40.0;
const TOP: f64 = 50.0;

/// A series: its name, colour and values at the samples' times.
struct Series {
    name: &'static str,
    colour: &'static str,
    points: Vec<(f64, f64)>,
}

struct Panel {
    title: &'static str,
    unit: &'static str,
    series: Vec<Series>,
}

fn stat(s: &Sample, key: &str) -> Option<f64> {
    s.stats.get(key).map(|v| *v as f64)
}

/// A counter's rate between consecutive samples that both have it.
fn rate(samples: &[Sample], key: &str) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].t - w[0].t;
            let dv = stat(&w[1], key)? - stat(&w[0], key)?;
            (dt > 0.0).then(|| (w[1].t, dv / dt))
        })
        .collect()
}

fn series(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Vec<(f64, f64)> {
    samples.iter().filter_map(|s| Some((s.t, f(s)?))).collect()
}

/// The SVG document.
pub fn draw(r: &Report, run: Duration) -> String {
    let s = &r.samples;
    let panels = [
        Panel {
            title: "Memory",
            unit: "KiB",
            series: vec![
                Series {
                    name: "RSS",
                    colour: "#1f77b4",
                    points: series(s, |x| Some(x.rss_kib as f64)),
                },
                Series {
                    name: "Anonymous",
                    colour: "#d62728",
                    points: series(s, |x| Some(x.anon_kib as f64)),
                },
                Series {
                    name: "Private dirty",
                    colour: "#2ca02c",
                    points: series(s, |x| Some(x.dirty_kib as f64)),
                },
            ],
        },
        Panel {
            title: "Open file descriptors",
            unit: "",
            series: vec![Series {
                name: "fds",
                colour: "#9467bd",
                points: series(s, |x| Some(x.fds as f64)),
            }],
        },
        Panel {
            title: "Outgoing queue",
            unit: "messages",
            series: vec![
                Series {
                    name: "queued",
                    colour: "#ff7f0e",
                    points: series(s, |x| stat(x, "spooled")),
                },
                Series {
                    name: "on disk",
                    colour: "#8c564b",
                    points: series(s, |x| stat(x, "stored")),
                },
            ],
        },
        Panel {
            title: "From local clients",
            unit: "messages per second",
            series: vec![
                Series {
                    name: "accepted",
                    colour: "#1f77b4",
                    points: rate(s, "published"),
                },
                Series {
                    name: "evicted (QoS 0)",
                    colour: "#7f7f7f",
                    points: rate(s, "evicted"),
                },
            ],
        },
        Panel {
            title: "To the broker",
            unit: "packets per second",
            series: vec![
                Series {
                    name: "sent",
                    colour: "#2ca02c",
                    points: rate(s, "sent"),
                },
                Series {
                    name: "resent",
                    colour: "#ff7f0e",
                    points: rate(s, "resent"),
                },
                Series {
                    name: "PUBACKs",
                    colour: "#d62728",
                    points: rate(s, "acked"),
                },
            ],
        },
    ];
    let height = TOP + panels.len() as f64 * (PANEL + GAP) + 30.0;
    let t_max = run.as_secs_f64().max(1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |t: f64| LEFT + plot_w * (t / t_max).clamp(0.0, 1.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let pass = r.checks.iter().all(|c| c.pass);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="24" font-size="16">iotcored soak: {:.0} min, {} bus connections, {} faults, {} broker connections; checks {}</text>"#,
        t_max / 60.0,
        r.bus_connections(),
        r.faults.len(),
        r.connections,
        if pass { "passed" } else { "FAILED" }
    );
    for (i, p) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP);
        let bottom = top + PANEL;
        let hi = p
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|(_, v)| *v))
            .fold(0.0f64, f64::max);
        let hi = nice(hi);
        let y = |v: f64| bottom - PANEL * (v / hi).clamp(0.0, 1.0);
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{} {}</text>"#,
            top - 6.0,
            p.title,
            if p.unit.is_empty() {
                String::new()
            } else {
                format!("({})", p.unit)
            }
        );
        for k in 0..=4 {
            let v = hi * f64::from(k) / 4.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 6.0,
                y(v) + 4.0,
                label(v),
                y = y(v)
            );
        }
        for f in &r.faults {
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top}" y2="{bottom}" stroke="{}" stroke-dasharray="3,3"/>"##,
                fault_colour(f.kind),
                x = x(f.t)
            );
        }
        for (j, s) in p.series.iter().enumerate() {
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                s.colour,
                pts.join(" ")
            );
            let ly = top + 14.0 + j as f64 * 16.0;
            let lx = LEFT + plot_w + 12.0;
            let _ = writeln!(
                svg,
                r#"<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="{}" stroke-width="2"/><text x="{}" y="{ly}">{}</text>"#,
                lx + 18.0,
                ly - 4.0,
                ly - 4.0,
                s.colour,
                lx + 24.0,
                s.name
            );
        }
    }
    let axis_y = TOP + panels.len() as f64 * (PANEL + GAP) - GAP + 16.0;
    let step = if t_max > 1200.0 {
        600.0
    } else if t_max > 300.0 {
        60.0
    } else {
        30.0
    };
    let mut t = 0.0;
    while t <= t_max + 0.5 {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{axis_y}" text-anchor="middle">{}</text>"#,
            x(t),
            if step >= 60.0 {
                format!("{:.0} min", t / 60.0)
            } else {
                format!("{t:.0} s")
            }
        );
        t += step;
    }
    let kinds = ["cut (RST)", "broker restart", "cut (FIN)", "blackhole 20 s"];
    for (j, k) in kinds.iter().enumerate() {
        // In the right-hand column of the one-series panel (fds).
        let ly = TOP + PANEL + GAP + 46.0 + j as f64 * 16.0;
        let lx = LEFT + plot_w + 12.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="{}" stroke-dasharray="3,3" stroke-width="2"/><text x="{}" y="{ly}">{k}</text>"#,
            lx + 18.0,
            ly - 4.0,
            ly - 4.0,
            fault_colour(k),
            lx + 24.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn fault_colour(kind: &str) -> &'static str {
    match kind {
        "cut (RST)" => "#d62728",
        "broker restart" => "#000000",
        "cut (FIN)" => "#ff7f0e",
        _ => "#17becf",
    }
}

/// A round upper bound for an axis: 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|b| *b >= v)
        .unwrap_or(10.0 * p)
}

fn label(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
