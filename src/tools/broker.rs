//! `segmentd broker`: librdkafka's mock Kafka cluster in a process of its own, for
//! development and for crash tests that kill the daemon while the broker lives on.
//!
//! **Not for production**: it keeps everything in memory, about 5 MiB per partition (older
//! records are dropped silently), has no durability, no security and incomplete
//! transactions. It speaks enough of the protocol for segmentd, kcat and any librdkafka client:
//! produce (idempotent too), fetch, consumer groups, offsets, auto-created topics (4
//! partitions unless named with `--topic`).
//!
//! Each mock broker sits behind a small proxy ([`proxy`]) that listens on the address clients
//! use (so `--listen` can name a fixed port) and enforces `--message-max-bytes` per record
//! batch the way a Kafka broker does, which the mock itself does not. The mock advertises the
//! proxies' addresses in its metadata, so clients never bypass them.

pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaApiKey;
use tokio::net::TcpListener;

/// `segmentd broker`.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Address of the first broker, the bootstrap address (port 0: any free port). Further
    /// brokers take the next ports.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub listen: SocketAddr,
    /// Brokers in the cluster.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=16))]
    pub brokers: i32,
    /// A topic to create, as NAME:PARTITIONS (repeatable). Other topics are created on first
    /// use with 4 partitions.
    #[arg(long = "topic", value_name = "NAME:PARTITIONS", value_parser = parse_topic)]
    pub topics: Vec<(String, i32)>,
    /// Round-trip time the brokers add to every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub rtt_ms: u64,
    /// Largest record batch a partition accepts in one produce request, in bytes, like
    /// Kafka's `message.max.bytes` (whose default this is); larger ones are refused with
    /// MESSAGE_TOO_LARGE. 0: no limit.
    #[arg(long, default_value_t = 1_048_588)]
    pub message_max_bytes: usize,
    /// How long a consumer group's first rebalance waits for more members, in milliseconds
    /// (Kafka's `group.initial.rebalance.delay.ms`). A member whose session timeout is
    /// shorter than this never gets its partitions on the mock cluster.
    #[arg(long, default_value_t = 3_000)]
    pub initial_rebalance_delay_ms: u64,
}

impl Default for BrokerArgs {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            brokers: 1,
            topics: Vec::new(),
            rtt_ms: 0,
            message_max_bytes: 1_048_588,
            initial_rebalance_delay_ms: 3_000,
        }
    }
}

fn parse_topic(arg: &str) -> Result<(String, i32), String> {
    let (name, partitions) = arg
        .rsplit_once(':')
        .ok_or_else(|| format!("{arg:?}: expected NAME:PARTITIONS"))?;
    let partitions: i32 = partitions
        .parse()
        .map_err(|_| format!("{arg:?}: the partition count is not a number"))?;
    if name.is_empty() || !(1..=1024).contains(&partitions) {
        return Err(format!("{arg:?}: expected a name and 1 to 1024 partitions"));
    }
    Ok((name.to_owned(), partitions))
}

/// A running development broker. Dropping it stops the cluster (the proxies stop with the
/// runtime they were started on, or when their task is aborted).
pub struct DevBroker {
    /// The client whose handle owns the mock cluster.
    client: BaseProducer,
    bootstrap: String,
    proxies: Vec<tokio::task::JoinHandle<()>>,
}

impl DevBroker {
    /// Starts the cluster and its proxies on the current tokio runtime.
    pub async fn start(args: &BrokerArgs) -> anyhow::Result<Self> {
        // A client created with `test.mock.num.brokers` owns a mock cluster; its handle is
        // what the cluster's settings are made through.
        let client: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", args.brokers.to_string())
            .create()
            .context("starting the mock cluster")?;
        let mock = client
            .client()
            .mock_cluster()
            .context("the mock cluster did not start")?;
        // The proxies parse Produce requests up to v8 (no flexible encoding).
        mock.apiversion(
            RDKafkaApiKey::Produce,
            Some(0),
            Some(proxy::MAX_PRODUCE_VERSION),
        )
        .context("pinning the Produce versions")?;
        if args.rtt_ms > 0 {
            mock.broker_round_trip_time(-1, Duration::from_millis(args.rtt_ms))
                .context("setting the round-trip time")?;
        }
        for (name, partitions) in &args.topics {
            mock.create_topic(name, *partitions, 1)
                .with_context(|| format!("creating topic {name}"))?;
        }
        let upstream: Vec<SocketAddr> = mock
            .bootstrap_servers()
            .split(',')
            .map(|a| a.parse())
            .collect::<Result<_, _>>()
            .context("reading the mock brokers' addresses")?;
        let limit = (args.message_max_bytes > 0).then_some(args.message_max_bytes);
        let mut proxies = Vec::new();
        let mut addresses = Vec::new();
        for (i, upstream) in upstream.iter().enumerate() {
            let mut listen = args.listen;
            if listen.port() != 0 {
                listen.set_port(listen.port() + i as u16);
            }
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("listening on {listen}"))?;
            let local = listener.local_addr()?;
            set_raw(&client, RawSetting::Advertise(i as i32 + 1, local))?;
            addresses.push(local.to_string());
            proxies.push(tokio::spawn(proxy::serve(listener, *upstream, limit)));
        }
        drop(mock);
        set_raw(
            &client,
            RawSetting::InitialRebalanceDelay(Duration::from_millis(
                args.initial_rebalance_delay_ms,
            )),
        )?;
        Ok(Self {
            client,
            bootstrap: addresses.join(","),
            proxies,
        })
    }

    /// The bootstrap address clients connect to.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Sets the round-trip time of every broker.
    pub fn set_round_trip_time(&self, rtt: Duration) -> anyhow::Result<()> {
        let mock = self
            .client
            .client()
            .mock_cluster()
            .context("the mock cluster is gone")?;
        mock.broker_round_trip_time(-1, rtt)?;
        Ok(())
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        for proxy in &self.proxies {
            proxy.abort();
        }
    }
}

/// Settings of the mock cluster that rdkafka has no safe wrapper for.
enum RawSetting {
    /// Mock broker `id` advertises this address in its metadata, so clients reach it through
    /// its proxy.
    Advertise(i32, SocketAddr),
    /// The delay before a group's first rebalance (Kafka's
    /// `group.initial.rebalance.delay.ms`).
    InitialRebalanceDelay(Duration),
}

fn set_raw(client: &BaseProducer, setting: RawSetting) -> anyhow::Result<()> {
    let host = match &setting {
        RawSetting::Advertise(_, address) => std::ffi::CString::new(address.ip().to_string())?,
        RawSetting::InitialRebalanceDelay(_) => std::ffi::CString::default(),
    };
    // SAFETY: the mock cluster handle comes from a live client that `client` borrows for the
    // whole call (librdkafka returns null for a client without one, checked below); `host`
    // is a NUL-terminated string that outlives the call, and librdkafka copies it under the
    // cluster's lock. Both functions take plain values otherwise.
    unsafe {
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(client.client().native_ptr());
        anyhow::ensure!(!cluster.is_null(), "the client has no mock cluster");
        match setting {
            RawSetting::Advertise(id, address) => {
                rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
                    cluster,
                    id,
                    host.as_ptr(),
                    i32::from(address.port()),
                )
            }
            RawSetting::InitialRebalanceDelay(delay) => {
                let ms = i32::try_from(delay.as_millis()).unwrap_or(i32::MAX);
                rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, ms)
            }
        }
    }
    Ok(())
}

/// `segmentd broker`: starts the cluster, prints its bootstrap address on stdout, and runs
/// until SIGTERM or SIGINT.
pub fn broker(args: BrokerArgs) -> anyhow::Result<std::process::ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("segmentd-broker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let broker = DevBroker::start(&args).await?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", broker.bootstrap())?;
            out.flush()?;
        }
        tracing::info!(
            bootstrap = broker.bootstrap(),
            brokers = args.brokers,
            rtt_ms = args.rtt_ms,
            message_max_bytes = args.message_max_bytes,
            topics = ?args.topics,
            "development broker up (librdkafka's mock cluster: in memory, about 5 MiB kept per \
             partition; not for production)"
        );
        tokio::select! {
            _ = crate::shutdown::wait_for_signal() => {}
            _ = commands(&broker) => {}
        }
        tracing::info!("development broker stopping");
        drop(broker);
        Ok(std::process::ExitCode::SUCCESS)
    })
}

/// Reads commands from stdin, one per line, until it closes (then waits forever): `rtt MS`
/// sets every broker's round-trip time. A test harness slows the broker down while it kills
/// daemons and speeds it up to read the results.
async fn commands(broker: &DevBroker) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let outcome = match words.as_slice() {
            ["rtt", ms] => match ms.parse::<u64>() {
                Ok(ms) => broker.set_round_trip_time(Duration::from_millis(ms)),
                Err(_) => Err(anyhow::anyhow!("rtt takes milliseconds")),
            },
            [] => Ok(()),
            _ => Err(anyhow::anyhow!("unknown command (known: rtt MS)")),
        };
        match outcome {
            Ok(()) => tracing::info!(command = %line.trim(), "done"),
            Err(e) => tracing::warn!(command = %line.trim(), error = %e, "command refused"),
        }
    }
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_specs_parse() {
        assert_eq!(parse_topic("orders:8"), Ok(("orders".into(), 8)));
        assert_eq!(parse_topic("a:b:2"), Ok(("a:b".into(), 2)));
        assert!(parse_topic("orders").is_err());
        assert!(parse_topic("orders:0").is_err());
        assert!(parse_topic(":3").is_err());
    }
}
