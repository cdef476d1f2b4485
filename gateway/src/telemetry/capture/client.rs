//! `gateway capture` and `gateway trace`: the client side. The request goes
//! over the control socket; the copies come back ([`super::stream`]) and
//! are written as pcapng, one interface per point and kind of packet, the
//! tunnel and drop reason in each packet's comment; traces are printed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness};
use serde_json::{json, Value};

use super::stream::{read_message, Message, Packet, END, HELLO, TRACE};
use super::{Link, Point};
use crate::telemetry::metrics::control_name;

/// What `gateway capture` asks for.
#[derive(Debug, Clone)]
pub struct CaptureArgs {
    pub iface: String,
    pub filter: Option<String>,
    pub points: Vec<String>,
    pub tunnel: Option<String>,
    pub reason: Option<String>,
    pub count: Option<u64>,
    pub snaplen: Option<usize>,
    /// A file, or `-` for standard output.
    pub write: PathBuf,
}

/// What `gateway trace` asks for.
#[derive(Debug, Clone)]
pub struct TraceArgs {
    pub iface: String,
    pub filter: Option<String>,
    pub tunnel: Option<String>,
    pub count: u64,
    pub json: bool,
}

/// The longest request line the gateway reads (its control socket's).
const MAX_REQUEST: usize = 8000;

/// Connects to the gateway on `iface` and sends `word` and `ask`.
fn open(iface: &str, word: &str, ask: &Value) -> anyhow::Result<UnixStream> {
    let line = format!("{word} {ask}\n");
    if line.len() > MAX_REQUEST {
        anyhow::bail!(
            "the filter expression is too long ({} bytes; the request may hold {MAX_REQUEST})",
            line.len()
        );
    }
    let addr = SocketAddr::from_abstract_name(control_name(iface).as_bytes())?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        anyhow::anyhow!("no gateway answers for {iface} in this network namespace ({e}); is it running (gateway --iface {iface})?")
    })?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(line.as_bytes())?;
    Ok(s)
}

/// Ctrl-C (or SIGTERM) ends the session cleanly: the client closes its
/// side, the gateway sends what it holds and its figures. Another signal
/// a second or more later ends the client at once (one right after the
/// first, as `timeout` or a terminal may send, is the same request).
fn stop_on_signal(conn: &UnixStream) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let conn = conn.try_clone()?;
    std::thread::Builder::new()
        .name("stop".into())
        .spawn(move || {
            let mut first: Option<std::time::Instant> = None;
            for _ in signals.forever() {
                match first {
                    None => {
                        first = Some(std::time::Instant::now());
                        let _ = conn.shutdown(std::net::Shutdown::Write);
                    }
                    Some(t) if t.elapsed() >= Duration::from_secs(1) => std::process::exit(130),
                    Some(_) => {}
                }
            }
        })?;
    Ok(())
}

/// The first message: the session started, or why not.
fn hello(conn: &mut UnixStream, iface: &str) -> anyhow::Result<()> {
    match read_message(conn)? {
        Some(Message::Json(HELLO, _)) => Ok(()),
        Some(Message::Error(e)) => anyhow::bail!("{e}"),
        Some(_) => anyhow::bail!("the gateway on {iface} answered out of turn"),
        None => anyhow::bail!(
            "the gateway on {iface} closed the connection; only root or the gateway's own user may capture, and it may be busy or stopping"
        ),
    }
}

/// The end: what the gateway counted.
fn summary(end: Option<&Value>, what: &str, iface: &str) -> String {
    match end {
        Some(v) => {
            let taken = v["taken"].as_u64().unwrap_or(0);
            let lost = v["lost"].as_u64().unwrap_or(0);
            let s_ = if taken == 1 { "" } else { "s" };
            let mut s = format!("{taken} {what}{s_} taken");
            if lost > 0 {
                s.push_str(&format!(
                    ", {lost} lost (the reader was slower than the traffic; every packet itself went on)"
                ));
            }
            s
        }
        None => format!("the gateway on {iface} stopped before the end"),
    }
}

/// `gateway capture`: writes pcapng to `args.write` until `-c` copies,
/// Ctrl-C, or the gateway's end; prints the figures on stderr.
pub fn capture(args: &CaptureArgs) -> anyhow::Result<()> {
    let ask = json!({
        "points": args.points,
        "filter": args.filter,
        "tunnel": args.tunnel,
        "reason": args.reason,
        "count": args.count,
        "snaplen": args.snaplen,
    });
    let to_stdout = args.write.as_os_str() == "-";
    // The file first, so that a path that cannot be written is said before
    // anything starts.
    let out: Box<dyn Write> = if to_stdout {
        Box::new(io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(&args.write)
                .map_err(|e| anyhow::anyhow!("-w {}: {e}", args.write.display()))?,
        )
    };
    let mut conn = open(&args.iface, "capture", &ask)?;
    hello(&mut conn, &args.iface)?;
    let points = if args.points.is_empty() {
        "every point".to_string()
    } else {
        args.points.join(", ")
    };
    eprintln!(
        "capturing on the gateway of {} ({points}{}), to {}; Ctrl-C stops",
        args.iface,
        args.filter
            .as_deref()
            .map_or(String::new(), |f| format!(", filter {f:?}")),
        args.write.display()
    );
    stop_on_signal(&conn)?;
    let snaplen = match args.snaplen {
        None | Some(0) => super::serve::MAX_SNAPLEN,
        Some(n) => n.min(super::serve::MAX_SNAPLEN),
    };
    let mut file = Pcapng::new(BufWriter::new(out), &args.iface, snaplen as u32)?;
    let mut input = io::BufReader::with_capacity(256 << 10, &conn);
    let mut end = None;
    let mut cut = None;
    let mut reader_gone = false;
    loop {
        // All that arrived is written out before waiting for more: a file
        // grows as the capture goes, and a pipe gets each packet at once.
        if input.buffer().is_empty() {
            if let Err(e) = file.flush() {
                reader_gone = e.kind() == io::ErrorKind::BrokenPipe;
                if !reader_gone {
                    return Err(e.into());
                }
                break;
            }
        }
        let m = match read_message(&mut input) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                cut = Some(e);
                break;
            }
        };
        match m {
            Message::Packet(p) => {
                if let Err(e) = file.packet(&p) {
                    // `| head`: the reader has what it wanted.
                    if e.chain().any(|c| {
                        c.downcast_ref::<io::Error>()
                            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
                    }) {
                        reader_gone = true;
                        break;
                    }
                    return Err(e);
                }
            }
            Message::Json(END, v) => {
                end = Some(v);
                break;
            }
            Message::Error(e) => anyhow::bail!("{e}"),
            Message::Json(..) => {}
        }
    }
    if reader_gone {
        return Ok(());
    }
    file.flush()?;
    if end.is_none() {
        match cut {
            Some(e) => anyhow::bail!(
                "the capture ended before its reader took everything ({e}); {} holds what it took",
                args.write.display()
            ),
            None => anyhow::bail!(
                "the capture ended without the gateway's figures: the gateway on {} stopped, or the reader did not take what was queued within 2 s of the end; {} holds what came",
                args.iface,
                args.write.display()
            ),
        }
    }
    eprintln!("{}", summary(end.as_ref(), "packet", &args.iface));
    Ok(())
}

/// A pcapng stream: one interface per (point, kind of packet), described
/// as it first appears.
struct Pcapng<W: Write> {
    w: PcapNgWriter<W>,
    interfaces: HashMap<(Point, Link), u32>,
    iface: String,
    snaplen: u32,
}

impl<W: Write> Pcapng<W> {
    fn new(w: W, iface: &str, snaplen: u32) -> anyhow::Result<Self> {
        let section = SectionHeaderBlock {
            endianness: Endianness::native(),
            options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
                "gateway capture {}",
                env!("CARGO_PKG_VERSION")
            )))],
            ..Default::default()
        };
        Ok(Pcapng {
            w: PcapNgWriter::with_section_header(w, section)?,
            interfaces: HashMap::new(),
            iface: iface.to_string(),
            snaplen,
        })
    }

    fn interface(&mut self, point: Point, link: Link) -> anyhow::Result<u32> {
        if let Some(&id) = self.interfaces.get(&(point, link)) {
            return Ok(id);
        }
        let id = self.interfaces.len() as u32;
        let (linktype, kind) = match link {
            Link::Ethernet => (DataLink::ETHERNET, "Ethernet"),
            Link::Raw => (DataLink::RAW, "IP"),
        };
        let idb = InterfaceDescriptionBlock {
            linktype,
            snaplen: self.snaplen,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed(point.name())),
                InterfaceDescriptionOption::IfDescription(Cow::Owned(format!(
                    "gateway on {}: {} ({kind})",
                    self.iface,
                    point.description()
                ))),
                // Nanosecond timestamps.
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        self.w.write_pcapng_block(idb)?;
        self.interfaces.insert((point, link), id);
        Ok(id)
    }

    fn packet(&mut self, p: &Packet) -> anyhow::Result<()> {
        // (pcap-file's errors carry the writer's io::Error.)
        let id = self.interface(p.point, p.link)?;
        let mut comment = format!("point={}", p.point.name());
        if let Some(t) = &p.tunnel {
            comment.push_str(&format!(" tunnel={t}"));
        }
        if let Some(r) = &p.reason {
            comment.push_str(&format!(" reason={r}"));
        }
        comment.push_str(&format!(" queue={}", p.queue));
        let epb = EnhancedPacketBlock {
            interface_id: id,
            timestamp: Duration::from_nanos(p.time_ns),
            original_len: p.len,
            data: Cow::Borrowed(&p.data),
            options: vec![
                EnhancedPacketOption::Comment(Cow::Owned(comment)),
                // Direction: 01 inbound, 10 outbound, 00 unknown (drops).
                EnhancedPacketOption::Flags(p.point.direction()),
            ],
        };
        self.w.write_pcapng_block(epb)?;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.get_mut().flush()
    }
}

/// `gateway trace`: prints the next `count` traces, for a person or as
/// JSON lines.
pub fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    let ask = json!({
        "filter": args.filter,
        "tunnel": args.tunnel,
        "count": args.count,
    });
    let mut conn = open(&args.iface, "trace", &ask)?;
    hello(&mut conn, &args.iface)?;
    eprintln!(
        "tracing the next {} packet{} on the gateway of {}{}; Ctrl-C stops",
        args.count,
        if args.count == 1 { "" } else { "s" },
        args.iface,
        args.filter
            .as_deref()
            .map_or(String::new(), |f| format!(" matching {f:?}"))
    );
    stop_on_signal(&conn)?;
    let mut out = io::stdout().lock();
    let mut n = 0;
    let mut end = None;
    while let Some(m) = read_message(&mut conn)
        .map_err(|e| anyhow::anyhow!("the trace ended before its reader took everything ({e})"))?
    {
        match m {
            Message::Json(TRACE, v) => {
                n += 1;
                if args.json {
                    writeln!(out, "{v}")?;
                } else {
                    write!(out, "{}", human(n, &v))?;
                }
                out.flush()?;
            }
            Message::Json(END, v) => {
                end = Some(v);
                break;
            }
            Message::Error(e) => anyhow::bail!("{e}"),
            _ => {}
        }
    }
    if end.is_none() {
        anyhow::bail!("the gateway on {} stopped during the trace", args.iface);
    }
    eprintln!("{}", summary(end.as_ref(), "trace", &args.iface));
    Ok(())
}

/// A trace for a person: a heading, then a line per stage.
fn human(n: u64, v: &Value) -> String {
    let t = v["time"].as_f64().unwrap_or(0.0);
    let secs = t as u64;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let micros = ((t - secs as f64) * 1e6) as u64;
    let dir = match v["direction"].as_str() {
        Some("out") => "from a device",
        _ => "from the wire",
    };
    let mut o = format!(
        "packet {n}: {dir}, queue {}, {h:02}:{m:02}:{s:02}.{micros:06} UTC\n",
        v["queue"]
    );
    for st in v["stages"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "  {:<11} {}\n",
            st["stage"].as_str().unwrap_or("?"),
            st["decision"].as_str().unwrap_or("")
        ));
    }
    o
}
