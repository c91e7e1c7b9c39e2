//! Not the product: what surrounds it for demonstration and proof. The embedded demo, the
//! benchmark, `generate` (a seeded shop as CSV files), the development broker, and the kill -9
//! harness.

pub mod bench;
pub mod broker;
pub mod chaos;
pub mod demo;
pub mod generate;

/// A plain HTTP/1.1 GET of `path` on `address` (`host:port`): the response body. For the
/// tools that watch a daemon process through its HTTP endpoints.
pub(crate) fn http_get(address: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// The value of an unlabelled metric `name` in Prometheus text `metrics`.
pub(crate) fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// What the metrics of the daemon whose HTTP endpoints are at `address` say of its input
/// partitions: (owned, still restoring), or `None` while they cannot be read.
pub(crate) fn partitions_held(address: &str) -> Option<(f64, f64)> {
    let metrics = http_get(address, "/metrics").ok()?;
    Some((
        metric(&metrics, "segmentd_partitions_owned")?,
        metric(&metrics, "segmentd_partitions_restoring")?,
    ))
}

/// Whether [`partitions_held`] read every one of `partitions` owned and none restoring.
pub(crate) fn holds_every_partition(held: Option<(f64, f64)>, partitions: i32) -> bool {
    held == Some((f64::from(partitions), 0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_read_by_its_whole_name_only() {
        let text = "# TYPE segmentd_partitions_owned gauge\n\
                    segmentd_partitions_owned_total 9\n\
                    segmentd_partitions_owned 4\n\
                    segmentd_partitions_restoring{partition=\"1\"} 1\n\
                    segmentd_partitions_restoring 0\n";
        assert_eq!(metric(text, "segmentd_partitions_owned"), Some(4.0));
        assert_eq!(metric(text, "segmentd_partitions_restoring"), Some(0.0));
        assert_eq!(metric(text, "segmentd_partitions"), None);
        assert!(holds_every_partition(Some((4.0, 0.0)), 4));
        assert!(!holds_every_partition(Some((4.0, 1.0)), 4));
        assert!(!holds_every_partition(Some((3.0, 0.0)), 4));
        assert!(!holds_every_partition(None, 4));
    }
}
