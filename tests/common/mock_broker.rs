//! A scripted TLS mock broker for protocol corners a real broker cannot
//! produce: each connection follows one [`Behaviour`], and everything it
//! receives is recorded for the test to look at. Its threads check the stop
//! flag at least every 50 ms and are joined on drop.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::net::{bind_nonblocking, is_timeout};
use super::pki::Pki;
use super::{lock, POLL};

/// CONNACK, session present 0, return code 0 (accepted).
pub const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
/// The same in MQTT 5: reason 0x00, no properties.
pub const CONNACK_ACCEPTED_V5: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];
/// An MQTT 5 CONNACK allowing 8 topic aliases, as AWS IoT Core's.
pub const CONNACK_ALIASES_V5: [u8; 8] = [0x20, 0x06, 0x00, 0x00, 0x03, 0x22, 0x00, 0x08];

/// What [`MockBroker`] does on one connection once TLS is up.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Read the CONNECT packet, then close (close_notify and FIN) without CONNACK.
    CloseAfterConnect,
    /// Read the CONNECT packet, write these raw bytes, then read (and
    /// record) until the peer closes. A 3.1.1 CONNACK at their start is
    /// written in MQTT 5 form (its return code mapped to the reason code
    /// [MQTT5-3.2.2.2] gives for it, no properties) when the CONNECT was
    /// MQTT 5, so that a script serves both protocols.
    Reply(Vec<u8>),
    /// As `Reply`, the bytes as given whatever the protocol.
    ReplyRaw(Vec<u8>),
    /// A broker that takes publishes: CONNACK (MQTT 5: with Topic Alias
    /// Maximum 8, as AWS IoT Core's), a PUBACK for every QoS 1 PUBLISH,
    /// PINGRESP for PINGREQ; but a PUBLISH whose topic (aliases resolved)
    /// starts with this prefix gets DISCONNECT 0x95 (packet too large;
    /// 3.1.1: a plain close), as AWS closes on a message it will not take.
    DisconnectOn(String),
    /// Never write anything; read (and record) until the peer closes.
    Silent,
    /// Accept the CONNECT, then answer every SUBSCRIBE with a SUBACK of its
    /// packet id and these return codes (however many filters it had), and
    /// record until the peer closes.
    Suback(Vec<u8>),
    /// Write `first`, then `repeat` `count` times, and never read again:
    /// a broker that stops reading while it keeps sending.
    Flood {
        first: Vec<u8>,
        repeat: Vec<u8>,
        count: usize,
    },
}

/// A TLS server on 127.0.0.1 (server.pem, client certificates verified
/// against ca.pem by webpki), a thread per connection: connection `i`
/// (in accept order) follows `script[i]`, the last entry repeating.
pub struct MockBroker {
    port: u16,
    state: Arc<Mutex<MockState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct MockState {
    connections: usize,
    handshakes: usize,
    closed: usize,
    first_packets: Vec<Vec<u8>>,
    received: Vec<Vec<u8>>,
    errors: Vec<String>,
}

impl MockBroker {
    /// Serves every connection with `behaviour`.
    pub fn start(pki: &Pki, behaviour: Behaviour) -> MockBroker {
        MockBroker::with_script(pki, vec![behaviour])
    }

    /// Serves connection `i` with `script[i]`; the last entry repeats.
    pub fn with_script(pki: &Pki, script: Vec<Behaviour>) -> MockBroker {
        assert!(!script.is_empty(), "empty MockBroker script");
        let config = mock_server_config(pki);
        let listener = bind_nonblocking(0).expect("mock broker bind");
        let port = listener.local_addr().expect("mock broker address").port();
        let state = Arc::new(Mutex::new(MockState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_state, t_stop) = (Arc::clone(&state), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name("mock-broker".into())
            .spawn(move || mock_serve(&listener, &config, &script, &t_state, &t_stop))
            .expect("spawn mock broker");
        MockBroker {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    /// TLS handshakes completed (client certificate accepted).
    pub fn handshakes(&self) -> usize {
        lock(&self.state).handshakes
    }

    /// Connections finished and closed on our side.
    pub fn closed(&self) -> usize {
        lock(&self.state).closed
    }

    /// The raw bytes of the first complete MQTT packet of each connection
    /// that sent one, in order.
    pub fn first_packets(&self) -> Vec<Vec<u8>> {
        lock(&self.state).first_packets.clone()
    }

    /// Every plaintext byte received, one entry per connection that
    /// completed its handshake.
    pub fn received(&self) -> Vec<Vec<u8>> {
        lock(&self.state).received.clone()
    }

    /// TLS or I/O errors seen, one line each (e.g. a rejected client cert).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.state).errors.clone()
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client id of a CONNECT packet (MQTT 3.1.1 section 3.1.3.1), if the
/// bytes are a well-formed CONNECT up to that field.
pub fn connect_client_id(packet: &[u8]) -> Option<String> {
    if packet.first()? >> 4 != 1 {
        return None;
    }
    let (_, len_bytes) = decode_remaining_length(&packet[1..])?;
    let body = packet.get(1 + len_bytes..)?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    // Protocol name, level (1), flags (1), keep alive (2), and with MQTT 5
    // the properties (their length, then them).
    let level = *body.get(2 + name_len)?;
    let mut rest = body.get(2 + name_len + 4..)?;
    if level == 5 {
        let (props_len, used) = decode_remaining_length(rest)?;
        rest = rest.get(used + props_len..)?;
    }
    let id_len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let id = rest.get(2..2 + id_len)?;
    String::from_utf8(id.to_vec()).ok()
}

/// A PUBLISH as the mock sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenPublish {
    /// As sent: empty when only an alias names it.
    pub topic: String,
    pub id: Option<u16>,
    /// Its Topic Alias (MQTT 5).
    pub alias: Option<u16>,
    pub payload: Vec<u8>,
}

/// A PUBLISH packet's topic, packet id (QoS 1), topic alias and payload.
pub fn parse_publish(packet: &[u8], v5: bool) -> Option<SeenPublish> {
    let (_, len_bytes) = decode_remaining_length(packet.get(1..)?)?;
    let body = packet.get(1 + len_bytes..)?;
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let topic = String::from_utf8(body.get(2..2 + topic_len)?.to_vec()).ok()?;
    let mut rest = body.get(2 + topic_len..)?;
    let qos = (packet.first()? >> 1) & 3;
    let id = if qos > 0 {
        let id = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]);
        rest = rest.get(2..)?;
        Some(id)
    } else {
        None
    };
    let mut alias = None;
    if v5 {
        let (props_len, used) = decode_remaining_length(rest)?;
        let mut props = rest.get(used..used + props_len)?;
        // The daemon's own properties: the Topic Alias (2 bytes), the
        // Message Expiry Interval (4), and the rest are skipped whole.
        while let Some((&id, after)) = props.split_first() {
            match id {
                0x23 => {
                    alias = Some(u16::from_be_bytes([*after.first()?, *after.get(1)?]));
                    props = after.get(2..)?;
                }
                0x02 => props = after.get(4..)?,
                _ => break,
            }
        }
        rest = rest.get(used + props_len..)?;
    }
    Some(SeenPublish {
        topic,
        id,
        alias,
        payload: rest.to_vec(),
    })
}

/// Every PUBLISH in a connection's recorded bytes (the CONNECT first), in
/// order.
pub fn publishes_in(bytes: &[u8]) -> Vec<SeenPublish> {
    let mut out = Vec::new();
    let v5 = connect_level(bytes) == Some(5);
    let mut at = 0;
    while at < bytes.len() {
        let Some((len, used)) = bytes.get(at + 1..).and_then(decode_remaining_length) else {
            break;
        };
        let Some(packet) = bytes.get(at..at + 1 + used + len) else {
            break;
        };
        if packet[0] >> 4 == 3 {
            if let Some(p) = parse_publish(packet, v5) {
                out.push(p);
            }
        }
        at += 1 + used + len;
    }
    out
}

/// The protocol level of a CONNECT packet (4: 3.1.1, 5: MQTT 5).
pub fn connect_level(packet: &[u8]) -> Option<u8> {
    if packet.first()? >> 4 != 1 {
        return None;
    }
    let (_, len_bytes) = decode_remaining_length(&packet[1..])?;
    let body = packet.get(1 + len_bytes..)?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    body.get(2 + name_len).copied()
}

/// `bytes` with a 3.1.1 CONNACK at their start rewritten in MQTT 5 form.
fn as_v5(bytes: &[u8]) -> Vec<u8> {
    match bytes {
        [0x20, 0x02, flags, code, rest @ ..] => {
            let reason = match code {
                0 => 0x00,
                1 => 0x84,
                2 => 0x85,
                3 => 0x88,
                4 => 0x86,
                5 => 0x87,
                other => *other,
            };
            let mut out = vec![0x20, 0x03, *flags, reason, 0x00];
            out.extend_from_slice(rest);
            out
        }
        _ => bytes.to_vec(),
    }
}

/// Decodes an MQTT remaining length; returns (value, bytes used).
fn decode_remaining_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn mock_server_config(pki: &Pki) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("read ca.pem") {
        roots.add(cert.expect("parse ca.pem")).expect("add ca.pem");
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .expect("read server.pem")
        .collect::<Result<_, _>>()
        .expect("parse server.pem");
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("read server.key");
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("server certificate");
    Arc::new(config)
}

fn mock_serve(
    listener: &TcpListener,
    config: &Arc<ServerConfig>,
    script: &[Behaviour],
    state: &Mutex<MockState>,
    stop: &AtomicBool,
) {
    // One thread per connection, so that several connections of one
    // client (its extra MQTT connections) can be open at once; each stops
    // within 50 ms of the stop flag.
    thread::scope(|scope| {
        while !stop.load(Ordering::SeqCst) {
            let sock = match listener.accept() {
                Ok((sock, _)) => sock,
                Err(_) => {
                    thread::sleep(POLL / 2);
                    continue;
                }
            };
            let index = {
                let mut st = lock(state);
                st.connections += 1;
                st.connections - 1
            };
            let behaviour = &script[index.min(script.len() - 1)];
            scope.spawn(move || {
                let result = mock_connection(sock, config, behaviour, state, stop);
                let mut st = lock(state);
                st.closed += 1;
                if let Err(e) = result {
                    st.errors.push(format!("connection {index}: {e}"));
                }
            });
        }
    });
}

/// A server-side TLS connection with blocking reads that time out, so the
/// stop flag is checked at least every 50 ms.
struct MockTls<'a> {
    tls: ServerConnection,
    sock: TcpStream,
    stop: &'a AtomicBool,
    plain: Vec<u8>,
    eof: bool,
}

impl MockTls<'_> {
    fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => self.check_stop()?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn check_stop(&self) -> io::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("mock broker stopping"));
        }
        Ok(())
    }

    /// Reads TLS records once; sets `eof` at the end of the TCP stream.
    fn read_records(&mut self) -> io::Result<()> {
        match self.tls.read_tls(&mut self.sock) {
            Ok(0) => self.eof = true,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return self.check_stop(),
            Err(e) => return Err(e),
        }
        let processed = self.tls.process_new_packets();
        // Send whatever that produced, an alert included.
        let flushed = self.flush();
        processed.map_err(|e| io::Error::other(format!("TLS: {e}")))?;
        flushed?;
        // Move the plaintext into our buffer.
        let mut buf = [0u8; 4096];
        loop {
            match self.tls.reader().read(&mut buf) {
                Ok(0) => {
                    self.eof = true; // close_notify
                    break;
                }
                Ok(n) => self.plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.eof = true;
                    break;
                }
            }
        }
        Ok(())
    }

    fn handshake(&mut self) -> io::Result<()> {
        while self.tls.is_handshaking() {
            self.flush()?;
            if self.eof {
                return Err(io::Error::other("peer closed during the handshake"));
            }
            self.read_records()?;
        }
        self.flush()
    }

    /// Takes exactly `n` plaintext bytes; `None` at end of stream.
    fn take(&mut self, n: usize) -> io::Result<Option<Vec<u8>>> {
        while self.plain.len() < n {
            if self.eof {
                return Ok(None);
            }
            self.read_records()?;
        }
        Ok(Some(self.plain.drain(..n).collect()))
    }

    /// Reads one MQTT packet by its fixed header; `None` at end of stream.
    fn read_packet(&mut self) -> io::Result<Option<Vec<u8>>> {
        let Some(mut packet) = self.take(1)? else {
            return Ok(None);
        };
        loop {
            let Some(b) = self.take(1)? else {
                return Ok(None);
            };
            packet.extend_from_slice(&b);
            if b[0] & 0x80 == 0 {
                break;
            }
            if packet.len() > 4 {
                return Err(io::Error::other("malformed remaining length"));
            }
        }
        let (len, _) = decode_remaining_length(&packet[1..])
            .ok_or_else(|| io::Error::other("malformed remaining length"))?;
        let Some(body) = self.take(len)? else {
            return Ok(None);
        };
        packet.extend_from_slice(&body);
        Ok(Some(packet))
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(bytes)?;
        self.flush()
    }
}

fn mock_connection(
    sock: TcpStream,
    config: &Arc<ServerConfig>,
    behaviour: &Behaviour,
    state: &Mutex<MockState>,
    stop: &AtomicBool,
) -> io::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    sock.set_write_timeout(Some(Duration::from_millis(50)))?;
    let tls = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
    let mut conn = MockTls {
        tls,
        sock,
        stop,
        plain: Vec::new(),
        eof: false,
    };
    conn.handshake()?;
    let index = {
        let mut st = lock(state);
        st.handshakes += 1;
        st.received.push(Vec::new());
        st.received.len() - 1
    };
    let result = mock_script(&mut conn, behaviour, state, index);
    let _ = conn.sock.shutdown(Shutdown::Both);
    result
}

fn mock_script(
    conn: &mut MockTls<'_>,
    behaviour: &Behaviour,
    state: &Mutex<MockState>,
    index: usize,
) -> io::Result<()> {
    let record = |bytes: &[u8]| lock(state).received[index].extend_from_slice(bytes);
    let Some(first) = conn.read_packet()? else {
        return Ok(());
    };
    record(&first);
    let v5 = connect_level(&first) == Some(5);
    lock(state).first_packets.push(first);
    let connack_accepted: &[u8] = if v5 {
        &CONNACK_ACCEPTED_V5
    } else {
        &CONNACK_ACCEPTED
    };
    match behaviour {
        Behaviour::CloseAfterConnect => {
            conn.tls.send_close_notify();
            conn.flush()
        }
        Behaviour::Reply(bytes) => {
            let bytes = if v5 { as_v5(bytes) } else { bytes.clone() };
            conn.write_all(&bytes)?;
            drain_recording(conn, record)
        }
        Behaviour::ReplyRaw(bytes) => {
            conn.write_all(bytes)?;
            drain_recording(conn, record)
        }
        Behaviour::DisconnectOn(poison) => {
            if v5 {
                conn.write_all(&CONNACK_ALIASES_V5)?;
            } else {
                conn.write_all(connack_accepted)?;
            }
            let mut aliases: std::collections::HashMap<u16, String> = Default::default();
            while let Some(packet) = conn.read_packet()? {
                record(&packet);
                match packet.first().map(|b| b >> 4) {
                    Some(3) => {
                        let Some(p) = parse_publish(&packet, v5) else {
                            return Err(io::Error::other("malformed PUBLISH"));
                        };
                        let (mut topic, id) = (p.topic, p.id);
                        match (topic.is_empty(), p.alias) {
                            (false, Some(a)) => {
                                aliases.insert(a, topic.clone());
                            }
                            (true, Some(a)) => {
                                topic = aliases
                                    .get(&a)
                                    .cloned()
                                    .ok_or_else(|| io::Error::other("an alias never set"))?;
                            }
                            (true, None) => return Err(io::Error::other("an empty topic")),
                            (false, None) => {}
                        }
                        if topic.starts_with(poison.as_str()) {
                            if v5 {
                                conn.write_all(&[0xE0, 0x01, 0x95])?;
                            }
                            conn.tls.send_close_notify();
                            return conn.flush();
                        }
                        if let Some(id) = id {
                            let [hi, lo] = id.to_be_bytes();
                            conn.write_all(&[0x40, 0x02, hi, lo])?;
                        }
                    }
                    Some(12) => conn.write_all(&[0xD0, 0x00])?,
                    _ => {}
                }
            }
            Ok(())
        }
        Behaviour::Silent => drain_recording(conn, record),
        Behaviour::Suback(codes) => {
            conn.write_all(connack_accepted)?;
            while let Some(packet) = conn.read_packet()? {
                record(&packet);
                // SUBSCRIBE: type 8, flags 0b0010; its packet id follows the
                // one-byte remaining length of these short test packets.
                if packet.first() == Some(&0x82) && packet.len() >= 4 {
                    let props = usize::from(v5);
                    let rl = u8::try_from(2 + props + codes.len()).unwrap_or(0);
                    let mut suback = vec![0x90, rl];
                    suback.extend_from_slice(&packet[2..4]);
                    if v5 {
                        suback.push(0); // no properties
                    }
                    suback.extend_from_slice(codes);
                    conn.write_all(&suback)?;
                }
            }
            Ok(())
        }
        Behaviour::Flood {
            first,
            repeat,
            count,
        } => {
            // A small receive buffer, so that what we never read backs up
            // into the client quickly.
            let small: libc::c_int = 4096;
            // SAFETY: a valid socket and a c_int option value of its size.
            unsafe {
                libc::setsockopt(
                    conn.sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    std::ptr::addr_of!(small).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
                );
            }
            conn.write_all(&if v5 { as_v5(first) } else { first.clone() })?;
            for _ in 0..*count {
                let mut rest = repeat.as_slice();
                while !rest.is_empty() {
                    let n = conn.tls.writer().write(rest)?;
                    rest = &rest[n..];
                    conn.flush()?;
                }
            }
            // Hold the connection open without reading until told to stop.
            loop {
                conn.check_stop()?;
                thread::sleep(POLL);
            }
        }
    }
}

fn drain_recording(conn: &mut MockTls<'_>, record: impl Fn(&[u8])) -> io::Result<()> {
    loop {
        record(&conn.plain);
        conn.plain.clear();
        if conn.eof {
            return Ok(());
        }
        conn.read_records()?;
    }
}
