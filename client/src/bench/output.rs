//! The bench report for people and plots: the markdown tables and the hand-drawn SVG chart
//! (latency CDF per session count, p50/p95 against load), written next to the JSON.
use super::{BenchReport, Percentiles, RunSummary, ServerUsage, sorted};
use anyhow::Context;
use std::fmt::Write as _;
use std::path::Path;

/// Writes the JSON report at `path`, the markdown summary and the SVG chart next to it.
pub fn write_outputs(report: &BenchReport, path: &Path) -> anyhow::Result<()> {
    let write =
        |path: &Path, text: String| std::fs::write(path, text).with_context(|| format!("writing {}", path.display()));
    write(path, serde_json::to_string_pretty(report)? + "\n")?;
    write(&path.with_extension("md"), markdown(report))?;
    write(&path.with_extension("svg"), svg(report))
}

fn ms(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_infinite() => "∞".into(),
        Some(v) => format!("{v:.0}"),
        None => "–".into(),
    }
}

fn mb(value: Option<f64>) -> String {
    value.map_or("–".into(), |v| format!("{:.0}", v / 1e6))
}

/// The markdown summary: one row per run, then the stage breakdown (median / p95 per run).
pub fn markdown(report: &BenchReport) -> String {
    const COLUMNS: [&str; 19] = [
        "sessions",
        "clips",
        "utterances",
        "server turns",
        "answered",
        "talk-overs",
        "no reply",
        "late endpoints",
        "v2v p50",
        "v2v p95",
        "v2v p99",
        "v2v max",
        "underruns (stall ms: total / max)",
        "server-side underruns (audio / sender late)",
        "drops",
        "errors",
        "CPU cores",
        "RSS MB",
        "peak RSS MB",
    ];
    let mut out = format!(
        "# parley bench: {} (protocol {})\n\n{} clip(s) per session; voice-to-voice in ms from each utterance's reference \
         end of speech, an utterance without a reply after its end counting as ∞; underruns: stalls of a \
         player that starts each reply {} ms after its first frame and plays on from a late frame.\n\n\
         | {} |\n|{}\n",
        report.server,
        report.protocol,
        report.turns_per_session,
        report.jitter_allowance_ms,
        COLUMNS.join(" | "),
        "---:|".repeat(COLUMNS.len())
    );
    for r in &report.runs {
        let v = &r.voice_to_voice_ms;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({:.0} / {:.0}) | {} | {} | {} | {} | {} | {} |",
            r.sessions,
            r.turns,
            r.accounting.utterances,
            r.accounting.server_turns,
            r.accounting.answered,
            r.accounting.talk_overs,
            r.accounting.missing_replies,
            r.accounting.late_endpoints,
            ms(v.p50),
            ms(v.p95),
            ms(v.p99),
            ms(v.max),
            r.underruns.count,
            r.underruns.late_ms,
            r.underruns.max_late_ms,
            server_underruns(&r.server_usage),
            r.frames_dropped,
            r.errors.total(),
            r.server_usage.cpu_cores.map_or("–".into(), |c| format!("{c:.2}")),
            mb(r.server_usage.rss_bytes),
            mb(r.server_usage.peak_rss_bytes),
        );
    }
    let _ = match report.max_sessions_within_bound {
        Some(n) => writeln!(out, "\nLargest session count with v2v p95 ≤ {} ms: **{n}**", report.p95_bound_ms),
        None => writeln!(out, "\nNo session count had v2v p95 ≤ {} ms.", report.p95_bound_ms),
    };
    out += "\n## Server stages (ms, median / p95)\n\n| stage |";
    let mut stages: Vec<&str> = Vec::new();
    for r in &report.runs {
        let _ = write!(out, " {} session(s) |", r.sessions);
        stages.extend(r.stages_ms.iter().map(|s| s.stage.as_str()).filter(|s| !stages.contains(s)).collect::<Vec<_>>());
    }
    out += &format!("\n|---|{}\n", "---:|".repeat(report.runs.len()));
    for stage in stages {
        let _ = write!(out, "| {stage} |");
        for r in &report.runs {
            let cell = r.stages_ms.iter().find(|s| s.stage == stage);
            let cell = cell.map_or("–".into(), |s| format!("{:.0} / {:.0}", s.median_ms, s.p95_ms));
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// The server's own underrun counts of a run, "audio late / sender late" ("–" without them).
fn server_underruns(usage: &ServerUsage) -> String {
    match (usage.underruns_audio_late, usage.underruns_sender_late) {
        (Some(audio), Some(sender)) => format!("{audio:.0} / {sender:.0}"),
        _ => "–".into(),
    }
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];
const MIDDLE: &str = r#"text-anchor="middle""#;

fn text(out: &mut String, x: f64, y: f64, attributes: &str, content: impl std::fmt::Display) {
    let _ = writeln!(out, r#"<text x="{x:.1}" y="{y:.1}" {attributes}>{content}</text>"#);
}

/// A plot area in pixels and the data range it shows (both axes from 0).
struct Panel {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x_max: f64,
    y_max: f64,
}

impl Panel {
    fn at(&self, x: f64, y: f64) -> (f64, f64) {
        (self.left + x / self.x_max * self.width, self.top + self.height - y / self.y_max * self.height)
    }

    /// Title, axes, grid, tick labels and axis labels.
    fn axes(&self, out: &mut String, title: &str, labels: (&str, &str), x_ticks: &[f64], y_ticks: &[f64]) {
        let (l, t, r, b) = (self.left, self.top, self.left + self.width, self.top + self.height);
        text(out, l + self.width / 2.0, t - 14.0, r#"text-anchor="middle" font-weight="bold""#, title);
        for &y in y_ticks {
            let y_px = self.at(0.0, y).1;
            let _ = writeln!(out, r##"<line x1="{l}" y1="{y_px:.1}" x2="{r}" y2="{y_px:.1}" stroke="#eee"/>"##);
            text(out, l - 6.0, y_px + 4.0, r#"text-anchor="end""#, y);
        }
        for &x in x_ticks {
            text(out, self.at(x, 0.0).0, b + 16.0, MIDDLE, x);
        }
        let _ = writeln!(out, r##"<path d="M{l},{t} V{b} H{r}" fill="none" stroke="#333"/>"##);
        text(out, l + self.width / 2.0, b + 36.0, MIDDLE, labels.0);
        let (x, y) = (l - 48.0, t + self.height / 2.0);
        let _ = writeln!(out, r#"<text transform="translate({x},{y}) rotate(-90)" {MIDDLE}>{}</text>"#, labels.1);
    }

    fn line(&self, out: &mut String, points: &[(f64, f64)], color: &str, dash: &str) {
        let points: Vec<String> =
            points.iter().map(|&(x, y)| self.at(x, y)).map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#,
            points.join(" ")
        );
    }
}

/// Round tick values from 0 to `max`, about five of them.
fn ticks(max: f64) -> Vec<f64> {
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(raw);
    (0..).map(|i| i as f64 * step).take_while(|t| *t <= max).collect()
}

/// The chart: voice-to-voice CDF over the turns attempted per session count (left); p50 and p95
/// vs. session count (right).
pub fn svg(report: &BenchReport) -> String {
    let samples = report.runs.iter().flat_map(|r| &r.voice_to_voice_samples_ms);
    let latency_max = samples.copied().fold(report.p95_bound_ms.max(1.0), f64::max) * 1.05;
    let sessions_max = report.runs.iter().map(|r| r.sessions).max().unwrap_or(1) as f64 * 1.05;
    let cdf = Panel { left: 70.0, top: 40.0, width: 360.0, height: 260.0, x_max: latency_max, y_max: 1.0 };
    let trend = Panel { left: 560.0, top: 40.0, width: 360.0, height: 260.0, x_max: sessions_max, y_max: latency_max };
    let mut out = String::from(concat!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="960" height="360" font-family="sans-serif" font-size="12">"#,
        "\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    ));
    let latency_ticks = ticks(latency_max);
    let fractions = [0.0, 0.25, 0.5, 0.75, 1.0];
    cdf.axes(&mut out, "Voice-to-voice latency (CDF)", ("ms", "fraction of turns"), &latency_ticks, &fractions);
    let session_ticks: Vec<f64> = report.runs.iter().map(|r| r.sessions as f64).collect();
    trend.axes(&mut out, "Voice-to-voice vs. load", ("concurrent sessions", "ms"), &session_ticks, &latency_ticks);
    for (i, run) in report.runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let s = sorted(&run.voice_to_voice_samples_ms);
        let n = run.accounting.utterances.max(s.len()) as f64; // missing replies keep the curve below 1
        let steps: Vec<(f64, f64)> =
            s.iter().enumerate().flat_map(|(k, &v)| [(v, k as f64 / n), (v, (k + 1) as f64 / n)]).collect();
        cdf.line(&mut out, &steps, color, "none");
        let y = cdf.top + cdf.height - 10.0 - 16.0 * (report.runs.len() - 1 - i) as f64;
        text(
            &mut out,
            cdf.left + cdf.width - 90.0,
            y,
            &format!(r#"fill="{color}""#),
            format!("{} session(s)", run.sessions),
        );
    }
    let series = |pick: fn(&Percentiles) -> Option<f64>| -> Vec<(f64, f64)> {
        let finite = |r: &RunSummary| pick(&r.voice_to_voice_ms).filter(|v| v.is_finite());
        report.runs.iter().filter_map(|r| finite(r).map(|v| (r.sessions as f64, v))).collect()
    };
    let bound = [(0.0, report.p95_bound_ms), (sessions_max, report.p95_bound_ms)];
    for (column, (label, color, points, dash)) in [
        ("p50", COLORS[0], series(|p| p.p50), "none"),
        ("p95", COLORS[1], series(|p| p.p95), "none"),
        ("p95 bound", "#888", bound.to_vec(), "6 4"),
    ]
    .into_iter()
    .enumerate()
    {
        trend.line(&mut out, &points, color, dash);
        let (x, y) = (trend.left + 10.0 + 50.0 * column as f64, trend.top + trend.height - 10.0); // along the bottom
        text(&mut out, x, y, &format!(r#"fill="{color}""#), label);
    }
    out + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outputs_name_every_run() {
        let run = |sessions| RunSummary {
            sessions,
            voice_to_voice_samples_ms: vec![400.0, 900.0],
            voice_to_voice_ms: Percentiles::of(&[400.0, 900.0], 1),
            ..Default::default()
        };
        let report = BenchReport {
            server: "ws://x".into(),
            protocol: crate::bench::Protocol::V1,
            turns_per_session: 1,
            jitter_allowance_ms: 0,
            p95_bound_ms: 1000.0,
            max_sessions_within_bound: Some(2),
            runs: vec![run(1), run(2)],
        };
        let md = markdown(&report);
        assert!(md.contains("| 2 | 0 |") && md.contains("| 900 | ∞ | ∞ | ∞ |") && md.contains("**2**"), "{md}");
        let svg = svg(&report);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n") && svg.matches("<polyline").count() == 5, "{svg}");
    }
}
