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
