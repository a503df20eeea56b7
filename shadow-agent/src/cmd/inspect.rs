//! `shadow-agent inspect --pcap FILE [--port P ...]`: the HTTP exchanges in a capture file,
//! one JSON object per request on stdout, and the pipeline's counters on stderr.
//!
//! The file goes through the same [`Pipeline`] as live capture. A request is printed when its
//! response arrives, or when its connection ends without one; per connection the output keeps
//! request order. Credentials are printed redacted unless `--show-secrets` asks for them.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};
use shadow_agent::http::{HttpEvent, Request, Version};
use shadow_agent::pcap::{self, ReadSummary};
use shadow_agent::pipeline::{
    FlowAddrs, Pipeline, PipelineConfig, PipelineCounters, PipelineEvent,
};

#[derive(clap::Args)]
pub struct Args {
    /// A pcap or pcapng file, as written by tcpdump or `shadow-agent capture`.
    #[arg(long)]
    pub pcap: PathBuf,
    /// A port servers listen on (repeatable). Without it every TCP connection is read and the
    /// client is told from the handshake or the payload.
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// Print the values of Authorization, Proxy-Authorization, Cookie and Set-Cookie headers as
    /// captured. By default each is printed as its length and the start of its SHA-256.
    #[arg(long)]
    pub show_secrets: bool,
}

/// Whether header values that carry credentials are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// As `<redacted N bytes sha256:XXXXXXXX>`: equal values can be told apart from different
    /// ones (and checked against a value one already has), the value itself is not shown.
    Redact,
    Show,
}

/// Headers whose values are credentials (RFC 9110 sections 11.6.2 and 11.7.1, RFC 6265).
const SECRET_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Hex digits of the SHA-256 printed for a redacted value: enough to tell values apart.
const REDACTED_HASH_HEX: usize = 8;

impl Secrets {
    /// A header value as printed.
    fn printed(self, name: &str, value: &[u8]) -> String {
        let secret = SECRET_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(name));
        if self == Self::Show || !secret {
            return String::from_utf8_lossy(value).into_owned();
        }
        let mut hash = format!("{:x}", Sha256::digest(value));
        hash.truncate(REDACTED_HASH_HEX);
        format!("<redacted {} bytes sha256:{hash}>", value.len())
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let stdout = std::io::stdout().lock();
    let mut stdout = std::io::BufWriter::new(stdout);
    let secrets = if args.show_secrets {
        Secrets::Show
    } else {
        Secrets::Redact
    };
    let report = inspect(&args.pcap, &args.ports, secrets, &mut stdout)?;
    stdout.flush().context("cannot write to stdout")?;
    let mut stderr = std::io::stderr().lock();
    write_summary(&report, &mut stderr).context("cannot write to stderr")?;
    Ok(())
}

/// What [`inspect`] found besides the exchanges.
#[derive(Debug, Clone)]
pub struct Report {
    pub read: ReadSummary,
    pub counters: PipelineCounters,
    pub exchanges: u64,
}

/// Rebuilds the exchanges in the capture at `path` and writes them to `out` as JSON lines.
pub fn inspect(
    path: &Path,
    ports: &[u16],
    secrets: Secrets,
    out: &mut impl Write,
) -> anyhow::Result<Report> {
    let mut pipeline = Pipeline::new(PipelineConfig {
        service_ports: ports.to_vec(),
        ..PipelineConfig::default()
    });
    let mut printer = Printer::new(secrets);
    let mut events = Vec::new();
    let mut write_result = Ok(());
    let read = pcap::read_file(path, |frame| {
        pipeline.push_frame(frame.link, frame.ts, frame.data, &mut events);
        if write_result.is_ok() {
            write_result = printer.take(events.drain(..), out);
        } else {
            events.clear();
        }
    })
    .with_context(|| format!("cannot inspect {}", path.display()))?;
    write_result.context("cannot write the exchanges")?;
    pipeline.finish(&mut events);
    printer
        .take(events.drain(..), out)
        .context("cannot write the exchanges")?;
    Ok(Report {
        read,
        counters: pipeline.counters().clone(),
        exchanges: printer.printed,
    })
}

/// The summary: every counter, then the anomalies by kind.
pub fn write_summary(report: &Report, err: &mut impl Write) -> std::io::Result<()> {
    writeln!(err, "exchanges {}", report.exchanges)?;
    if report.read.truncated {
        writeln!(
            err,
            "note: the file ends in the middle of a record; frames before it were read"
        )?;
    }
    for (name, value) in report.counters.pairs() {
        writeln!(err, "{name} {value}")?;
    }
    for (kind, value) in &report.counters.http_anomalies {
        writeln!(err, "http_anomaly{{kind={kind}}} {value}")?;
    }
    Ok(())
}

/// One printed line.
#[derive(Debug, Serialize)]
struct Exchange {
    flow: String,
    method: String,
    target: String,
    version: &'static str,
    /// The HTTP/2 stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<u32>,
    headers: Vec<(String, String)>,
    body_len: usize,
    body_sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_body_len: Option<usize>,
}

impl Exchange {
    fn new(flow: &FlowAddrs, request: &Request, secrets: Secrets) -> Self {
        Self {
            flow: format!("{} -> {}", flow.client, flow.server),
            method: request.method.clone(),
            target: request.target.clone(),
            version: match request.version {
                Version::Http10 => "HTTP/1.0",
                Version::Http11 => "HTTP/1.1",
                Version::Http2 => "HTTP/2",
            },
            stream_id: request.stream_id,
            headers: request
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), secrets.printed(name, value)))
                .collect(),
            body_len: request.body.len(),
            body_sha256: format!("{:x}", Sha256::digest(&request.body)),
            status: None,
            response_body_len: None,
        }
    }
}

/// Requests waiting for their response, per connection.
struct Printer {
    secrets: Secrets,
    pending: HashMap<FlowAddrs, VecDeque<(u64, Exchange)>>,
    /// Responses that completed before their request did (a server may answer, say, a large
    /// upload before reading all of it): status and body length by request sequence number.
    early: HashMap<FlowAddrs, BTreeMap<u64, (u16, usize)>>,
    printed: u64,
}

/// Early responses kept per connection at most; they only wait for a request in progress.
const EARLY_RESPONSES_MAX: usize = 64;

impl Printer {
    fn new(secrets: Secrets) -> Self {
        Self {
            secrets,
            pending: HashMap::new(),
            early: HashMap::new(),
            printed: 0,
        }
    }

    fn take(
        &mut self,
        events: impl Iterator<Item = PipelineEvent>,
        out: &mut impl Write,
    ) -> std::io::Result<()> {
        for event in events {
            match event {
                PipelineEvent::Http {
                    flow,
                    event: HttpEvent::Request(request),
                } => {
                    let mut exchange = Exchange::new(&flow, &request, self.secrets);
                    let early = self
                        .early
                        .get_mut(&flow)
                        .and_then(|e| e.remove(&request.seq));
                    match early {
                        Some((status, body_len)) => {
                            exchange.status = Some(status);
                            exchange.response_body_len = Some(body_len);
                            // HTTP/1.x responses come in request order: earlier requests will
                            // get none. HTTP/2 streams are answered in any order.
                            if request.stream_id.is_none() {
                                let earlier = self.pending.remove(&flow).unwrap_or_default();
                                for (_, e) in earlier {
                                    self.print(&e, out)?;
                                }
                            }
                            self.print(&exchange, out)?;
                        }
                        None => self
                            .pending
                            .entry(flow)
                            .or_default()
                            .push_back((request.seq, exchange)),
                    }
                }
                PipelineEvent::Http {
                    flow,
                    event: HttpEvent::Response(response),
                } => {
                    let Some(seq) = response.request_seq else {
                        continue;
                    };
                    let at = self
                        .pending
                        .get(&flow)
                        .and_then(|q| q.iter().position(|(s, _)| *s == seq));
                    let (Some(at), Some(queue)) = (at, self.pending.get_mut(&flow)) else {
                        let early = self.early.entry(flow).or_default();
                        if early.len() < EARLY_RESPONSES_MAX {
                            early.insert(seq, (response.status, response.body.len()));
                        }
                        continue;
                    };
                    queue[at].1.status = Some(response.status);
                    queue[at].1.response_body_len = Some(response.body.len());
                    // HTTP/1.x responses come in request order: earlier requests will get
                    // none. HTTP/2 streams are answered in any order.
                    let first = if response.stream_id.is_some() { at } else { 0 };
                    let done: Vec<_> = queue.drain(first..=at).collect();
                    for (_, exchange) in done {
                        self.print(&exchange, out)?;
                    }
                }
                PipelineEvent::Http {
                    event: HttpEvent::Anomaly(_),
                    ..
                } => {}
                PipelineEvent::FlowEnded { flow, .. } => {
                    self.early.remove(&flow);
                    for (_, exchange) in self.pending.remove(&flow).unwrap_or_default() {
                        self.print(&exchange, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn print(&mut self, exchange: &Exchange, out: &mut impl Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut *out, exchange)?;
        out.write_all(b"\n")?;
        self.printed += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::net::SocketAddr;
    use std::time::Duration;

    use ::pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
    use ::pcap_file::pcapng::PcapNgWriter;
    use ::pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
    use ::pcap_file::pcapng::blocks::interface_description::{
        InterfaceDescriptionBlock, InterfaceDescriptionOption,
    };
    use ::pcap_file::{DataLink, TsResolution};
    use bytes::Bytes;
    use shadow_agent::http::Response;
    use shadow_agent::pipeline::synthetic::{TcpFlags, ethernet_frame, ip_packet};

    use super::*;

    const CLIENT: &str = "192.168.1.10:51000";
    const SERVER: &str = "192.168.1.20:8080";
    const REQUEST_1: &[u8] = b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc";
    const REQUEST_2: &[u8] = b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n";
    const RESPONSE_1: &[u8] = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// A connection with two requests, the first answered, the second not, as (from client,
    /// seq, flags, payload).
    fn conversation() -> Vec<(bool, u32, TcpFlags, &'static [u8])> {
        let (c, s) = (100u32, 900u32);
        let ack_s = |n: u32| TcpFlags {
            ack: Some(s + 1 + n),
            ..TcpFlags::default()
        };
        let ack_c = |n: u32| TcpFlags {
            ack: Some(c + 1 + n),
            ..TcpFlags::default()
        };
        let r1 = REQUEST_1.len() as u32;
        vec![
            (
                true,
                c,
                TcpFlags {
                    syn: true,
                    ..TcpFlags::default()
                },
                b"",
            ),
            (
                false,
                s,
                TcpFlags {
                    syn: true,
                    ack: Some(c + 1),
                    ..TcpFlags::default()
                },
                b"",
            ),
            (true, c + 1, ack_s(0), REQUEST_1),
            (false, s + 1, ack_c(r1), RESPONSE_1),
            (true, c + 1 + r1, ack_s(RESPONSE_1.len() as u32), REQUEST_2),
        ]
    }

    fn frames(build: fn(SocketAddr, SocketAddr, u32, TcpFlags, &[u8]) -> Vec<u8>) -> Vec<Vec<u8>> {
        conversation()
            .into_iter()
            .map(|(from_client, seq, flags, payload)| {
                let (src, dst) = if from_client {
                    (addr(CLIENT), addr(SERVER))
                } else {
                    (addr(SERVER), addr(CLIENT))
                };
                build(src, dst, seq, flags, payload)
            })
            .collect()
    }

    fn check(lines: &str) {
        let lines: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        let first = &lines[0];
        assert_eq!(first["flow"], "192.168.1.10:51000 -> 192.168.1.20:8080");
        assert_eq!(first["method"], "POST");
        assert_eq!(first["target"], "/a");
        assert_eq!(first["version"], "HTTP/1.1");
        assert_eq!(
            first["headers"],
            serde_json::json!([["Host", "svc"], ["Content-Length", "3"]])
        );
        assert_eq!(first["body_len"], 3);
        assert_eq!(
            first["body_sha256"],
            format!("{:x}", Sha256::digest(b"abc"))
        );
        assert_eq!(first["status"], 201);
        assert_eq!(first["response_body_len"], 4);
        let second = &lines[1];
        assert_eq!(second["target"], "/b");
        assert_eq!(second["body_len"], 0);
        assert!(second.get("status").is_none(), "no response came: {second}");
    }

    #[test]
    fn http2_streams_answered_out_of_order() {
        let flow = FlowAddrs {
            client: addr(CLIENT),
            server: addr(SERVER),
            client_isn: None,
            server_isn: None,
        };
        let request = |seq: u64, stream: u32, target: &str| Request {
            seq,
            stream_id: Some(stream),
            method: "GET".into(),
            target: target.into(),
            version: Version::Http2,
            headers: vec![("host".into(), b"svc".to_vec())],
            body: Bytes::new(),
            trailers: Vec::new(),
            wire_len: 0,
            started: Duration::ZERO,
            completed: Duration::ZERO,
        };
        let response = |seq: u64, stream: u32, status: u16, body: &'static [u8]| Response {
            request_seq: Some(seq),
            stream_id: Some(stream),
            status,
            reason: String::new(),
            version: Version::Http2,
            headers: Vec::new(),
            body: Bytes::from_static(body),
            trailers: Vec::new(),
            wire_len: 0,
            started: Duration::ZERO,
            completed: Duration::ZERO,
        };
        let http = |event| PipelineEvent::Http { flow, event };
        let events = vec![
            http(HttpEvent::Request(request(0, 1, "/slow"))),
            http(HttpEvent::Request(request(1, 3, "/fast"))),
            http(HttpEvent::Response(response(1, 3, 404, b"no"))),
            http(HttpEvent::Response(response(0, 1, 200, b"done"))),
        ];
        let mut printer = Printer::new(Secrets::Redact);
        let mut out = Vec::new();
        printer.take(events.into_iter(), &mut out).expect("print");
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .expect("UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        let summary: Vec<_> = lines
            .iter()
            .map(|l| {
                (
                    l["stream_id"].as_u64(),
                    l["target"].as_str(),
                    l["status"].as_u64(),
                    l["version"].as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (Some(3), Some("/fast"), Some(404), Some("HTTP/2")),
                (Some(1), Some("/slow"), Some(200), Some("HTTP/2")),
            ]
        );
    }

    #[test]
    fn ethernet_nanosecond_pcap() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("capture.pcap");
        let header = PcapHeader {
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::NanoSecond,
            ..PcapHeader::default()
        };
        let mut writer =
            PcapWriter::with_header(std::fs::File::create(&path).expect("create"), header)
                .expect("pcap header");
        let build = |s, d, seq, f, p: &[u8]| ethernet_frame(s, d, seq, f, p).expect("frame");
        for (i, frame) in frames(build).iter().enumerate() {
            let ts = Duration::new(1_700_000_000, i as u32 * 1_000_001);
            writer
                .write_packet(&PcapPacket::new(ts, frame.len() as u32, frame))
                .expect("write");
        }
        drop(writer);
        let mut out = Vec::new();
        let report = inspect(&path, &[], Secrets::Redact, &mut out).expect("inspect");
        check(&String::from_utf8(out).expect("UTF-8"));
        assert_eq!(report.exchanges, 2);
        assert_eq!(report.counters.http.requests, 2);
        let mut summary = Vec::new();
        write_summary(&report, &mut summary).expect("summary");
        assert!(String::from_utf8_lossy(&summary).contains("requests 2"));
    }

    #[test]
    fn pcapng_with_sll2_and_a_second_interface() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("capture.pcapng");
        let mut writer =
            PcapNgWriter::new(std::fs::File::create(&path).expect("create")).expect("pcapng");
        let mut eth = InterfaceDescriptionBlock::new(DataLink::ETHERNET, 65_535);
        eth.options.push(InterfaceDescriptionOption::IfTsResol(9));
        writer.write_pcapng_block(eth).expect("idb 0");
        writer
            .write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::LINUX_SLL2, 65_535))
            .expect("idb 1");
        let build = |s, d, seq, f, p: &[u8]| {
            let mut frame = vec![
                0x08, 0x00, 0, 0, 0, 0, 0, 3, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0,
            ];
            frame.extend(ip_packet(s, d, seq, f, p).expect("packet"));
            frame
        };
        for (i, frame) in frames(build).iter().enumerate() {
            // Default resolution on interface 1: microseconds.
            let block = EnhancedPacketBlock {
                interface_id: 1,
                timestamp: Duration::from_nanos(1_700_000_000_000_000 + i as u64),
                original_len: frame.len() as u32,
                data: Cow::Borrowed(frame),
                options: vec![],
            };
            writer.write_pcapng_block(block).expect("epb");
        }
        // A stray ARP frame on the Ethernet interface is counted, not fatal.
        let arp = [vec![0xff; 12], vec![0x08, 0x06], vec![0; 28]].concat();
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::ZERO,
            original_len: 42,
            data: Cow::Borrowed(&arp),
            options: vec![],
        };
        writer.write_pcapng_block(block).expect("epb");
        drop(writer);
        let mut out = Vec::new();
        let report = inspect(&path, &[8080], Secrets::Redact, &mut out).expect("inspect");
        check(&String::from_utf8(out).expect("UTF-8"));
        assert_eq!(report.counters.frames.frames_not_ip, 1);
    }

    #[test]
    fn credentials_are_redacted_unless_shown() {
        let token = b"Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.sig";
        let request = Request {
            seq: 0,
            stream_id: None,
            method: "GET".into(),
            target: "/me".into(),
            version: Version::Http11,
            headers: vec![
                ("Host".into(), b"svc".to_vec()),
                ("Authorization".into(), token.to_vec()),
                ("proxy-authorization".into(), b"Basic dTpw".to_vec()),
                ("COOKIE".into(), b"session=s3cr3t; theme=dark".to_vec()),
                ("Set-Cookie".into(), b"id=1".to_vec()),
                ("X-Authorization-Hint".into(), b"visible".to_vec()),
                ("Cookie".into(), b"session=s3cr3t; theme=dark".to_vec()),
            ],
            body: bytes::Bytes::new(),
            trailers: Vec::new(),
            wire_len: 0,
            started: Duration::ZERO,
            completed: Duration::ZERO,
        };
        let flow = FlowAddrs::new(addr(CLIENT), addr(SERVER));
        let redacted = Exchange::new(&flow, &request, Secrets::Redact);
        let hash = |v: &[u8]| format!("{:x}", Sha256::digest(v))[..8].to_owned();
        let want = |v: &[u8]| format!("<redacted {} bytes sha256:{}>", v.len(), hash(v));
        let values: Vec<&str> = redacted.headers.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(
            values,
            [
                "svc",
                want(token).as_str(),
                want(b"Basic dTpw").as_str(),
                want(b"session=s3cr3t; theme=dark").as_str(),
                want(b"id=1").as_str(),
                "visible",
                want(b"session=s3cr3t; theme=dark").as_str(),
            ]
        );
        // As `printf %s "$token" | sha256sum` has it.
        assert_eq!(values[1], "<redacted 40 bytes sha256:2f4e5ce4>");
        // Equal values print alike, so repeated credentials can still be recognised.
        assert_eq!(values[3], values[6]);
        let line = serde_json::to_string(&redacted).expect("JSON");
        assert!(!line.contains("s3cr3t") && !line.contains("eyJ"), "{line}");

        let shown = Exchange::new(&flow, &request, Secrets::Show);
        let shown: Vec<(String, String)> = shown.headers;
        let raw: Vec<(String, String)> = request
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        assert_eq!(shown, raw);
    }

    #[test]
    fn missing_unreadable_and_unsupported_files_are_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = inspect(
            &dir.path().join("nope.pcap"),
            &[],
            Secrets::Redact,
            &mut Vec::new(),
        );
        assert!(format!("{:#}", missing.expect_err("missing file")).contains("cannot open"));
        let text = dir.path().join("text.pcap");
        std::fs::write(&text, b"hello world").expect("write");
        let err = inspect(&text, &[], Secrets::Redact, &mut Vec::new()).expect_err("not a capture");
        assert!(
            format!("{err:#}").contains("not a pcap or pcapng file"),
            "{err:#}"
        );
        let usb = dir.path().join("usb.pcap");
        let header = PcapHeader {
            datalink: DataLink::USB_LINUX,
            ..PcapHeader::default()
        };
        drop(
            PcapWriter::with_header(std::fs::File::create(&usb).expect("create"), header)
                .expect("header"),
        );
        let err =
            inspect(&usb, &[], Secrets::Redact, &mut Vec::new()).expect_err("unsupported link");
        assert!(
            format!("{err:#}").contains("unsupported link type 189"),
            "{err:#}"
        );
    }
}
