//! A Kafka-protocol proxy in front of one mock broker, enforcing the broker's record-batch
//! size limit the way Kafka does (`message.max.bytes`), which librdkafka's mock cluster does
//! not.
//!
//! Every request is forwarded byte for byte except a Produce request carrying a partition
//! whose records exceed the limit: those partitions are answered with `MESSAGE_TOO_LARGE`
//! (error code 10) by the proxy, and the rest of the request goes on to the broker; its
//! response gets the refused partitions spliced back in. Responses reach the client in request
//! order, as the protocol requires. The mock cluster is pinned to Produce v0–v8, the versions
//! without flexible encoding, so only those need parsing here.

use std::collections::VecDeque;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Produce's API key.
const PRODUCE: i16 = 0;
/// Highest Produce version parsed (the last without flexible encoding).
pub const MAX_PRODUCE_VERSION: i16 = 8;
/// Kafka's `MESSAGE_TOO_LARGE`.
const MESSAGE_TOO_LARGE: i16 = 10;
/// Largest frame accepted from either side.
const MAX_FRAME: usize = 256 << 20;

/// Accepts connections on `listener` and proxies each to `upstream` until the task is
/// dropped. `limit`: the largest records field (one partition's record batches) accepted in a
/// Produce request, in bytes.
pub async fn serve(listener: TcpListener, upstream: SocketAddr, limit: Option<usize>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Err(e) = connection(client, upstream, limit).await {
                tracing::debug!(error = %e, "proxy connection ended");
            }
        });
    }
}

/// What the response side owes the client for one request, in request order.
enum Owed {
    /// The broker's response, passed through, with these refused partitions spliced in.
    Upstream {
        version: i16,
        refused: Vec<(Vec<u8>, i32)>,
    },
    /// A response made here (every partition of the request was refused).
    Local(Vec<u8>),
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    limit: Option<usize>,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let broker = TcpStream::connect(upstream).await?;
    broker.set_nodelay(true)?;
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut broker_rx, mut broker_tx) = broker.into_split();
    let (owed_tx, mut owed_rx) = mpsc::unbounded_channel::<Owed>();

    let requests = async move {
        while let Some(frame) = read_frame(&mut client_rx).await? {
            // Without a limit nothing is refused, but Produce requests are still read for
            // their acks: one with acks = 0 gets no response to wait for.
            let (forward, owed) = screen(&frame, limit.unwrap_or(usize::MAX));
            if let Some(owed) = owed {
                if owed_tx.send(owed).is_err() {
                    break;
                }
            }
            if let Some(forward) = forward {
                broker_tx.write_all(&forward).await?;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let responses = async move {
        let mut pending: VecDeque<Owed> = VecDeque::new();
        loop {
            let owed = match pending.pop_front() {
                Some(owed) => owed,
                None => match owed_rx.recv().await {
                    Some(owed) => owed,
                    None => break,
                },
            };
            let frame = match owed {
                Owed::Local(frame) => frame,
                Owed::Upstream { version, refused } => {
                    let Some(frame) = read_frame(&mut broker_rx).await? else {
                        break;
                    };
                    if refused.is_empty() {
                        frame
                    } else {
                        splice(&frame, version, &refused).unwrap_or(frame)
                    }
                }
            };
            client_tx.write_all(&frame).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let (a, b) = tokio::join!(requests, responses);
    a.and(b)
}

/// Reads one size-prefixed frame (with its prefix); `None` at a clean end of stream.
async fn read_frame(rx: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut size = [0u8; 4];
    match rx.read_exact(&mut size).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = i32::from_be_bytes(size);
    if len < 0 || len as usize > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut frame = vec![0u8; 4 + len as usize];
    frame[..4].copy_from_slice(&size);
    rx.read_exact(&mut frame[4..]).await?;
    Ok(Some(frame))
}

/// What a forwarded request is owed: every request gets a response except a Produce with
/// `acks = 0`.
fn expects_response(produce_acks: Option<i16>) -> Option<Owed> {
    (produce_acks != Some(0)).then_some(Owed::Upstream {
        version: 0,
        refused: Vec::new(),
    })
}

/// Decides what to forward for one request frame and what its response will be.
fn screen(frame: &[u8], limit: usize) -> (Option<Vec<u8>>, Option<Owed>) {
    let Some(request) = ProduceRequest::parse(frame) else {
        // Not a Produce request, or one this proxy does not parse: pass it through.
        return (Some(frame.to_vec()), expects_response(None));
    };
    let mut refused = Vec::new();
    let mut kept = request.topics.clone();
    for (topic, partitions) in &mut kept {
        partitions.retain(|(partition, records)| {
            let over = records.as_ref().is_some_and(|r| r.len() > limit);
            if over {
                refused.push((topic.clone(), *partition));
            }
            !over
        });
    }
    kept.retain(|(_, partitions)| !partitions.is_empty());
    if refused.is_empty() {
        return (Some(frame.to_vec()), expects_response(Some(request.acks)));
    }
    tracing::info!(
        partitions = refused.len(),
        limit,
        "produce refused: record batch too large"
    );
    if request.acks == 0 {
        let forward = (!kept.is_empty()).then(|| request.encode(&kept));
        return (forward, None);
    }
    if kept.is_empty() {
        let response = produce_response(request.correlation_id, request.version, &refused, &[]);
        return (None, Some(Owed::Local(response)));
    }
    (
        Some(request.encode(&kept)),
        Some(Owed::Upstream {
            version: request.version,
            refused,
        }),
    )
}

/// One partition's records (`None`: a null records field).
type PartitionData = (i32, Option<Vec<u8>>);

/// A parsed Produce request, v0–v8.
struct ProduceRequest {
    version: i16,
    correlation_id: i32,
    /// The request header as sent (API key, version, correlation id, client id).
    header: Vec<u8>,
    /// The transactional id as sent (v3+), length prefix included.
    transactional_id: Vec<u8>,
    acks: i16,
    timeout_ms: i32,
    topics: Vec<(Vec<u8>, Vec<PartitionData>)>,
}

impl ProduceRequest {
    fn parse(frame: &[u8]) -> Option<Self> {
        let mut r = Reader::new(&frame[4..]);
        let api_key = r.i16()?;
        let version = r.i16()?;
        if api_key != PRODUCE || !(0..=MAX_PRODUCE_VERSION).contains(&version) {
            return None;
        }
        let correlation_id = r.i32()?;
        r.nullable_string()?; // client id
        let header = frame[4..4 + r.pos].to_vec();
        let start = r.pos;
        if version >= 3 {
            r.nullable_string()?;
        }
        let transactional_id = frame[4 + start..4 + r.pos].to_vec();
        let acks = r.i16()?;
        let timeout_ms = r.i32()?;
        let mut topics = Vec::new();
        for _ in 0..r.count()? {
            let name = r.string()?.to_vec();
            let mut partitions = Vec::new();
            for _ in 0..r.count()? {
                let index = r.i32()?;
                let records = r.nullable_bytes()?.map(<[u8]>::to_vec);
                partitions.push((index, records));
            }
            topics.push((name, partitions));
        }
        (r.pos == frame.len() - 4).then_some(Self {
            version,
            correlation_id,
            header,
            transactional_id,
            acks,
            timeout_ms,
            topics,
        })
    }

    /// This request with only `topics`, as a frame.
    fn encode(&self, topics: &[(Vec<u8>, Vec<PartitionData>)]) -> Vec<u8> {
        let mut w = Writer::frame();
        w.raw(&self.header);
        w.raw(&self.transactional_id);
        w.i16(self.acks);
        w.i32(self.timeout_ms);
        w.i32(topics.len() as i32);
        for (name, partitions) in topics {
            w.string(name);
            w.i32(partitions.len() as i32);
            for (index, records) in partitions {
                w.i32(*index);
                match records {
                    Some(records) => {
                        w.i32(records.len() as i32);
                        w.raw(records);
                    }
                    None => w.i32(-1),
                }
            }
        }
        w.finish()
    }
}

/// A Produce response frame, v0–v8: `refused` partitions with `MESSAGE_TOO_LARGE` after the
/// `kept` ones (each the raw bytes of a topic's entry: name and partition responses).
fn produce_response(
    correlation_id: i32,
    version: i16,
    refused: &[(Vec<u8>, i32)],
    kept: &[(Vec<u8>, Vec<Vec<u8>>)],
) -> Vec<u8> {
    let mut topics: Vec<(Vec<u8>, Vec<Vec<u8>>)> = kept.to_vec();
    for (name, partition) in refused {
        let entry = refused_partition(version, *partition);
        match topics.iter_mut().find(|(n, _)| n == name) {
            Some((_, partitions)) => partitions.push(entry),
            None => topics.push((name.clone(), vec![entry])),
        }
    }
    let mut w = Writer::frame();
    w.i32(correlation_id);
    w.i32(topics.len() as i32);
    for (name, partitions) in &topics {
        w.string(name);
        w.i32(partitions.len() as i32);
        for partition in partitions {
            w.raw(partition);
        }
    }
    if version >= 1 {
        w.i32(0); // throttle time
    }
    w.finish()
}

/// One partition's `MESSAGE_TOO_LARGE` response.
fn refused_partition(version: i16, partition: i32) -> Vec<u8> {
    let mut w = Writer::default();
    w.i32(partition);
    w.i16(MESSAGE_TOO_LARGE);
    w.i64(-1); // base offset
    if version >= 2 {
        w.i64(-1); // log append time
    }
    if version >= 5 {
        w.i64(-1); // log start offset
    }
    if version >= 8 {
        w.i32(0); // record errors
        w.string_opt(Some(
            b"record batch larger than the broker's message.max.bytes",
        ));
    }
    w.buf
}

/// The broker's response to a reduced request, with the refused partitions added.
fn splice(frame: &[u8], version: i16, refused: &[(Vec<u8>, i32)]) -> Option<Vec<u8>> {
    let mut r = Reader::new(&frame[4..]);
    let correlation_id = r.i32()?;
    let mut topics = Vec::new();
    for _ in 0..r.count()? {
        let name = r.string()?.to_vec();
        let mut partitions = Vec::new();
        for _ in 0..r.count()? {
            let start = r.pos;
            r.skip(4 + 2 + 8)?;
            if version >= 2 {
                r.skip(8)?;
            }
            if version >= 5 {
                r.skip(8)?;
            }
            if version >= 8 {
                for _ in 0..r.count()? {
                    r.skip(4)?;
                    r.nullable_string()?;
                }
                r.nullable_string()?;
            }
            partitions.push(r.buf[start..r.pos].to_vec());
        }
        topics.push((name, partitions));
    }
    Some(produce_response(correlation_id, version, refused, &topics))
}

/// Big-endian reads over a request or response body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn count(&mut self) -> Option<usize> {
        usize::try_from(self.i32()?).ok()
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.i16()?).ok()?;
        self.take(len)
    }

    fn nullable_string(&mut self) -> Option<Option<&'a [u8]>> {
        match self.i16()? {
            -1 => Some(None),
            len => Some(Some(self.take(usize::try_from(len).ok()?)?)),
        }
    }

    fn nullable_bytes(&mut self) -> Option<Option<&'a [u8]>> {
        match self.i32()? {
            -1 => Some(None),
            len => Some(Some(self.take(usize::try_from(len).ok()?)?)),
        }
    }
}

/// Big-endian writes; [`Writer::frame`] reserves the size prefix that [`Writer::finish`]
/// fills in.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn frame() -> Self {
        Self { buf: vec![0; 4] }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = (self.buf.len() - 4) as i32;
        self.buf[..4].copy_from_slice(&len.to_be_bytes());
        self.buf
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn i16(&mut self, v: i16) {
        self.raw(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.raw(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.raw(&v.to_be_bytes());
    }

    fn string(&mut self, s: &[u8]) {
        self.i16(s.len() as i16);
        self.raw(s);
    }

    fn string_opt(&mut self, s: Option<&[u8]>) {
        match s {
            Some(s) => self.string(s),
            None => self.i16(-1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Produce v`version` request frame with the given partitions.
    fn request(version: i16, acks: i16, topics: &[(&str, Vec<(i32, usize)>)]) -> Vec<u8> {
        let mut w = Writer::frame();
        w.i16(PRODUCE);
        w.i16(version);
        w.i32(77);
        w.string(b"client");
        if version >= 3 {
            w.string_opt(None);
        }
        w.i16(acks);
        w.i32(30_000);
        w.i32(topics.len() as i32);
        for (name, partitions) in topics {
            w.string(name.as_bytes());
            w.i32(partitions.len() as i32);
            for (index, size) in partitions {
                w.i32(*index);
                w.i32(*size as i32);
                w.raw(&vec![7u8; *size]);
            }
        }
        w.finish()
    }

    /// The (topic, partition, error) triples of a Produce v`version` response frame.
    fn errors(frame: &[u8], version: i16) -> Vec<(String, i32, i16)> {
        let mut r = Reader::new(&frame[4..]);
        assert_eq!(r.i32(), Some(77));
        let mut out = Vec::new();
        for _ in 0..r.count().unwrap() {
            let name = String::from_utf8(r.string().unwrap().to_vec()).unwrap();
            for _ in 0..r.count().unwrap() {
                let index = r.i32().unwrap();
                let error = r.i16().unwrap();
                r.skip(8).unwrap();
                if version >= 2 {
                    r.skip(8).unwrap();
                }
                if version >= 5 {
                    r.skip(8).unwrap();
                }
                if version >= 8 {
                    for _ in 0..r.count().unwrap() {
                        r.skip(4).unwrap();
                        r.nullable_string().unwrap();
                    }
                    r.nullable_string().unwrap();
                }
                out.push((name.clone(), index, error));
            }
        }
        if version >= 1 {
            assert_eq!(r.i32(), Some(0));
        }
        assert_eq!(r.pos, frame.len() - 4, "trailing bytes");
        out
    }

    #[test]
    fn requests_within_the_limit_pass_unchanged() {
        let frame = request(7, -1, &[("orders", vec![(0, 100), (1, 500)])]);
        let (forward, owed) = screen(&frame, 500);
        assert_eq!(forward.as_deref(), Some(frame.as_slice()));
        assert!(matches!(owed, Some(Owed::Upstream { ref refused, .. }) if refused.is_empty()));
        // Other APIs are never parsed.
        let mut fetch = frame.clone();
        fetch[4..6].copy_from_slice(&1i16.to_be_bytes());
        assert_eq!(screen(&fetch, 10).0.as_deref(), Some(fetch.as_slice()));
    }

    #[test]
    fn a_request_whose_only_partition_is_too_large_is_answered_here() {
        for version in [3, 7, 8] {
            let frame = request(version, -1, &[("dead", vec![(2, 1_000)])]);
            let (forward, owed) = screen(&frame, 999);
            assert!(forward.is_none());
            let Some(Owed::Local(response)) = owed else {
                panic!("expected a local response");
            };
            assert_eq!(
                errors(&response, version),
                vec![("dead".into(), 2, MESSAGE_TOO_LARGE)]
            );
        }
    }

    #[test]
    fn a_mixed_request_forwards_the_rest_and_splices_the_refusal_in() {
        let frame = request(
            8,
            -1,
            &[("out", vec![(0, 10)]), ("dead", vec![(0, 2_000), (1, 20)])],
        );
        let (forward, owed) = screen(&frame, 1_000);
        let forward = ProduceRequest::parse(&forward.unwrap()).unwrap();
        let kept: Vec<(Vec<u8>, Vec<i32>)> = forward
            .topics
            .iter()
            .map(|(n, p)| (n.clone(), p.iter().map(|(i, _)| *i).collect()))
            .collect();
        assert_eq!(
            kept,
            vec![(b"out".to_vec(), vec![0]), (b"dead".to_vec(), vec![1])]
        );
        let Some(Owed::Upstream { version, refused }) = owed else {
            panic!("expected the broker's response");
        };
        // What the broker would answer for the two kept partitions.
        let upstream = produce_response(
            77,
            version,
            &[],
            &[
                (b"out".to_vec(), vec![ok_partition(0)]),
                (b"dead".to_vec(), vec![ok_partition(1)]),
            ],
        );
        let spliced = splice(&upstream, version, &refused).unwrap();
        assert_eq!(
            errors(&spliced, 8),
            vec![
                ("out".into(), 0, 0),
                ("dead".into(), 1, 0),
                ("dead".into(), 0, MESSAGE_TOO_LARGE)
            ]
        );
    }

    fn ok_partition(index: i32) -> Vec<u8> {
        let mut w = Writer::default();
        w.i32(index);
        w.i16(0);
        w.i64(5);
        w.i64(-1);
        w.i64(0);
        w.i32(0);
        w.string_opt(None);
        w.buf
    }

    #[test]
    fn acks_zero_gets_no_response() {
        let frame = request(3, 0, &[("dead", vec![(0, 2_000)])]);
        let (forward, owed) = screen(&frame, 1_000);
        assert!(forward.is_none() && owed.is_none());
    }
}
