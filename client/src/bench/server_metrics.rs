//! What the bench reads from the server's `/metrics` (Prometheus text, over https for a `wss://`
//! server): its CPU, memory and underrun counters around a run, and quantiles of its histograms.
use serde::Serialize;
use std::time::Duration;

/// From the server's `/metrics` before and after the run; `None` where the metric is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerUsage {
    pub cpu_seconds: Option<f64>,
    /// CPU seconds / wall seconds: cores busy on average.
    pub cpu_cores: Option<f64>,
    /// Resident memory at the end of the run.
    pub rss_bytes: Option<f64>,
    /// Peak resident memory of the server process so far.
    pub peak_rss_bytes: Option<f64>,
    /// Underruns the server counted in the run (reply frames it sent after a real-time player
    /// needed them), by cause: the audio reached its sender late (the pipeline), or the sender
    /// ran late. The client's count also holds delays in transit.
    pub underruns_audio_late: Option<f64>,
    pub underruns_sender_late: Option<f64>,
}

impl ServerUsage {
    pub fn from_metrics(before: Option<&str>, after: Option<&str>, wall_s: f64) -> Self {
        let value = |text: Option<&str>, name| text.and_then(|t| metric_value(t, name));
        let delta = |name| value(after, name).zip(value(before, name)).map(|(a, b)| a - b);
        let cpu_seconds = delta("process_cpu_seconds_total");
        Self {
            cpu_seconds,
            cpu_cores: cpu_seconds.filter(|_| wall_s > 0.0).map(|s| s / wall_s),
            rss_bytes: value(after, "process_resident_memory_bytes"),
            peak_rss_bytes: value(after, "process_peak_resident_memory_bytes"),
            underruns_audio_late: delta(r#"parley_reply_underruns_total{cause="audio_late"}"#),
            underruns_sender_late: delta(r#"parley_reply_underruns_total{cause="sender_late"}"#),
        }
    }
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

/// `host:port` of the server's HTTP side and whether it speaks TLS, from
/// `ws[s]://host[:port][/path]`.
pub fn metrics_address(server: &str) -> Option<(String, bool)> {
    let (rest, tls) = match server.strip_prefix("wss://") {
        Some(rest) => (rest, true),
        None => (server.strip_prefix("ws://")?, false),
    };
    let authority = rest.split('/').next().filter(|a| !a.is_empty())?;
    let has_port = authority.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    let port = if tls { 443 } else { 80 };
    Some((if has_port { authority.to_string() } else { format!("{authority}:{port}") }, tls))
}

/// Quantile `q` (0–1) of the unlabelled histogram `name` over a run, from its cumulative buckets
/// in Prometheus text before (`None`: from zero) and after: the upper bound of the bucket the
/// quantile falls in, seconds. `None` without observations in the run.
pub fn histogram_quantile(before: Option<&str>, after: &str, name: &str, q: f64) -> Option<f64> {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        text.lines()
            .filter_map(|line| {
                let (bound, count) = line.strip_prefix(&prefix)?.split_once("\"} ")?;
                Some((bound.parse().ok()?, count.trim().parse().ok()?))
            })
            .collect()
    };
    let after = buckets(after);
    let before = before.map(buckets).unwrap_or_default();
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|&(bound, n)| (bound, n - before.iter().find(|b| b.0 == bound).map_or(0.0, |b| b.1)))
        .collect();
    let total = counts.iter().find(|b| b.0.is_infinite())?.1;
    (total > 0.0).then(|| counts.iter().find(|b| b.1 >= q * total).map_or(f64::INFINITY, |b| b.0))
}

/// `GET /metrics` over HTTP/1.1 (TLS for a `wss://` server); `None` when unreachable or not 200.
pub async fn fetch_metrics(server: &str) -> Option<String> {
    let (address, tls) = metrics_address(server)?;
    let request = async {
        let tcp = tokio::net::TcpStream::connect(&address).await.ok()?;
        if !tls {
            return get_metrics(tcp, &address).await;
        }
        let host = address.rsplit_once(':')?.0.trim_start_matches('[').trim_end_matches(']');
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string()).ok()?;
        let stream = tokio_rustls::TlsConnector::from(crate::tls_config().ok()?).connect(name, tcp).await.ok()?;
        get_metrics(stream, &address).await
    };
    tokio::time::timeout(Duration::from_secs(5), request).await.ok().flatten()
}

async fn get_metrics<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    // A TLS peer may close without close_notify: what arrived is still the whole response.
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8(response).ok()?;
    let (status, body) = response.split_once("\r\n\r\n")?;
    status.split_whitespace().nth(1).filter(|code| *code == "200").map(|_| body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_are_read_from_prometheus_text() {
        let before = "# HELP process_cpu_seconds_total CPU.\n# TYPE process_cpu_seconds_total counter\n\
                      process_cpu_seconds_total 10.5\nprocess_resident_memory_bytes 1e8\n\
                      parley_reply_underruns_total{cause=\"audio_late\"} 2\n";
        let after = "process_cpu_seconds_total_extra 99\nprocess_cpu_seconds_total 16.5\n\
                     parley_stage_seconds_count{stage=\"x\"} 3\nprocess_resident_memory_bytes 2.5e+08\n\
                     process_peak_resident_memory_bytes 300000000\n\
                     parley_reply_underruns_total{cause=\"audio_late\"} 5\n";
        assert_eq!(metric_value(after, "process_cpu_seconds_total"), Some(16.5));
        assert_eq!(metric_value(after, "parley_stage_seconds_count"), None);
        let usage = ServerUsage::from_metrics(Some(before), Some(after), 3.0);
        assert_eq!(
            usage,
            ServerUsage {
                cpu_seconds: Some(6.0),
                cpu_cores: Some(2.0),
                rss_bytes: Some(2.5e8),
                peak_rss_bytes: Some(3e8),
                underruns_audio_late: Some(3.0),
                underruns_sender_late: None,
            }
        );
        assert_eq!(ServerUsage::from_metrics(None, Some("parley_sessions_active 0\n"), 3.0), ServerUsage::default());
    }

    #[test]
    fn metrics_address_comes_from_the_ws_url() {
        let plain = |a: &str| Some((a.to_string(), false));
        assert_eq!(metrics_address("ws://127.0.0.1:8099"), plain("127.0.0.1:8099"));
        assert_eq!(metrics_address("ws://host:8080/v1/voice"), plain("host:8080"));
        assert_eq!(metrics_address("ws://host"), plain("host:80"));
        assert_eq!(metrics_address("ws://[::1]:9000/"), plain("[::1]:9000"));
        assert_eq!(metrics_address("wss://host"), Some(("host:443".to_string(), true)));
        assert_eq!(metrics_address("http://host"), None);
    }

    #[test]
    fn histogram_quantiles_come_from_the_run_s_bucket_counts() {
        let text = |counts: [u32; 4]| {
            let bounds = ["0.001", "0.002", "0.005", "+Inf"];
            let lines = bounds.iter().zip(counts).map(|(b, n)| format!("h_bucket{{le=\"{b}\"}} {n}\n"));
            lines.collect::<String>() + "h_sum 1\nh_count 0\n"
        };
        let (before, after) = (text([5, 5, 5, 5]), text([95, 104, 105, 105]));
        assert_eq!(histogram_quantile(Some(&before), &after, "h", 0.5), Some(0.001));
        assert_eq!(histogram_quantile(Some(&before), &after, "h", 0.99), Some(0.002));
        assert_eq!(histogram_quantile(Some(&before), &after, "h", 1.0), Some(0.005));
        assert_eq!(histogram_quantile(None, &after, "h", 0.5), Some(0.001));
        assert_eq!(histogram_quantile(Some(&after), &after, "h", 0.5), None);
        assert_eq!(histogram_quantile(None, &after, "other", 0.5), None);
    }
}
