//! Self-test of the end-to-end harness in `tests/common`, with real parts:
//! the generated PKI in rustls and openssl, mosquitto with mosquitto_pub and
//! mosquitto_sub as clients, the proxy's faults, the mock broker seen by a
//! rustls client, and the daemon guard driving a shell script.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const T: Duration = Duration::from_secs(5);

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A rustls client config trusting `ca` and authenticating with cert/key.
fn client_config(ca: &str, cert: &str, key_file: &str) -> Result<ClientConfig, rustls::Error> {
    let pki = Pki::get();
    let mut roots = RootCertStore::empty();
    for c in certs(&pki.path(ca)) {
        roots.add(c)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(&pki.path(cert)), key(&pki.path(key_file)))
}

/// Connects a rustls client to 127.0.0.1:`port` and completes the handshake.
fn tls_connect(
    port: u16,
    config: ClientConfig,
    name: &str,
) -> io::Result<StreamOwned<ClientConnection, TcpStream>> {
    let sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(T))?;
    sock.set_write_timeout(Some(T))?;
    let name = ServerName::try_from(name.to_string()).map_err(io::Error::other)?;
    let conn = ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// A minimal MQTT 3.1.1 CONNECT (clean session, keepalive 60).
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&u16::try_from(client_id.len()).unwrap().to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend_from_slice(&body);
    packet
}

#[test]
fn generated_pki_loads_in_rustls_and_the_expired_certificate_is_expired() {
    let pki = Pki::get();
    // (certificate, key, chain length, key encoding)
    let pairs = [
        ("client.pem", "client.key", 1, "pkcs8"),
        ("client.pem", "client-ec-sec1.key", 1, "sec1"),
        ("client-rsa.pem", "client-rsa.key", 1, "pkcs1"),
        ("client-nonl.pem", "client-nonl.key", 1, "pkcs8"),
        ("client-chain.pem", "client-chain.key", 2, "pkcs8"),
        ("client-expired.pem", "client-expired.key", 1, "pkcs8"),
        ("client-untrusted.pem", "client-untrusted.key", 1, "pkcs8"),
        ("server.pem", "server.key", 1, "pkcs8"),
        ("server-wronghost.pem", "server-wronghost.key", 1, "pkcs8"),
    ];
    for (cert, key_file, chain_len, encoding) in pairs {
        assert_eq!(certs(&pki.path(cert)).len(), chain_len, "{cert}");
        let found = match key(&pki.path(key_file)) {
            PrivateKeyDer::Pkcs8(_) => "pkcs8",
            PrivateKeyDer::Sec1(_) => "sec1",
            PrivateKeyDer::Pkcs1(_) => "pkcs1",
            _ => "other",
        };
        assert_eq!(found, encoding, "{key_file}");
        // Parses the leaf with webpki (v3, SANs) and checks the key matches it.
        client_config("ca.pem", cert, key_file)
            .unwrap_or_else(|e| panic!("{cert} + {key_file}: {e}"));
    }
    client_config("ca-nonl.pem", "client.pem", "client.key").expect("ca-nonl.pem");
    for f in ["client-nonl.pem", "client-nonl.key", "ca-nonl.pem"] {
        let bytes = std::fs::read(pki.path(f)).unwrap();
        assert_ne!(bytes.last(), Some(&b'\n'), "{f} ends with a newline");
    }
    let mismatch = client_config("ca.pem", "client.pem", "other.key");
    assert!(mismatch.is_err(), "other.key must not match client.pem");

    let checkend = |cert: &str| {
        Command::new("openssl")
            .args(["x509", "-checkend", "0", "-noout", "-in"])
            .arg(pki.path(cert))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        !checkend("client-expired.pem"),
        "client-expired.pem is still valid"
    );
    assert!(checkend("client.pem"), "client.pem is already expired");
}

#[test]
fn mock_broker_verifies_client_certificates_with_webpki() {
    let pki = Pki::get();
    let broker = MockBroker::start(pki, Behaviour::CloseAfterConnect);
    let accepted = [
        ("client.pem", "client.key"),
        ("client.pem", "client-ec-sec1.key"),
        ("client-rsa.pem", "client-rsa.key"),
        ("client-nonl.pem", "client-nonl.key"),
        ("client-chain.pem", "client-chain.key"),
    ];
    for (i, (cert, key_file)) in accepted.iter().enumerate() {
        let config = client_config("ca.pem", cert, key_file).unwrap();
        let mut s = tls_connect(broker.port(), config, "localhost")
            .unwrap_or_else(|e| panic!("{cert}: {e}"));
        s.write_all(&connect_packet(&format!("id-{i}"))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            s.read(&mut buf).unwrap(),
            0,
            "{cert}: expected close_notify"
        );
        assert!(wait_until(T, || broker.handshakes() == i + 1), "{cert}");
    }
    for (cert, key_file) in [
        ("client-expired.pem", "client-expired.key"),
        ("client-untrusted.pem", "client-untrusted.key"),
    ] {
        let config = client_config("ca.pem", cert, key_file).unwrap();
        // TLS 1.3: the client finishes first; the rejection arrives as an alert.
        let outcome = tls_connect(broker.port(), config, "localhost").and_then(|mut s| {
            s.write_all(&connect_packet("rejected"))?;
            let mut buf = [0u8; 16];
            s.read(&mut buf)
        });
        assert!(outcome.is_err(), "{cert} was accepted: {outcome:?}");
    }
    assert!(wait_until(T, || broker.closed() == accepted.len() + 2));
    assert_eq!(broker.connections(), accepted.len() + 2);
    assert_eq!(broker.handshakes(), accepted.len());
    let ids: Vec<String> = broker
        .first_packets()
        .iter()
        .map(|p| connect_client_id(p).unwrap())
        .collect();
    assert_eq!(ids, ["id-0", "id-1", "id-2", "id-3", "id-4"]);
    assert_eq!(broker.errors().len(), 2, "{:?}", broker.errors());
}

#[test]
fn mock_broker_close_reply_and_silence_are_seen_by_a_rustls_client() {
    let pki = Pki::get();
    let mut reply = CONNACK_ACCEPTED.to_vec();
    reply.extend_from_slice(&[0x30, 0xff, 0xff, 0xff, 0xff]); // malformed remaining length
    let broker = MockBroker::with_script(
        pki,
        vec![
            Behaviour::CloseAfterConnect,
            Behaviour::Reply(reply.clone()),
            Behaviour::Silent,
        ],
    );
    let config = client_config("ca.pem", "client.pem", "client.key").unwrap();

    let mut s = tls_connect(broker.port(), config.clone(), "localhost").unwrap();
    s.write_all(&connect_packet("first")).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "no CONNACK, just a close");
    drop(s);

    let mut s = tls_connect(broker.port(), config.clone(), "localhost").unwrap();
    s.write_all(&connect_packet("second")).unwrap();
    let mut got = Vec::new();
    while got.len() < reply.len() {
        let n = s.read(&mut buf).unwrap();
        assert_ne!(n, 0, "closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, reply);
    s.write_all(b"\xc0\x00").unwrap(); // PINGREQ, recorded after the CONNECT
    s.conn.send_close_notify();
    s.flush().unwrap();
    s.sock.shutdown(Shutdown::Write).unwrap();

    assert!(wait_until(T, || broker.closed() == 2));

    let mut s = tls_connect(broker.port(), config, "localhost").unwrap();
    s.write_all(&connect_packet("third")).unwrap();
    s.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let silence = s.read(&mut buf).unwrap_err();
    assert_eq!(silence.kind(), io::ErrorKind::WouldBlock, "{silence}");
    drop(s);

    assert!(wait_until(T, || broker.closed() == 3));
    assert_eq!(broker.handshakes(), 3);
    let firsts = broker.first_packets();
    assert_eq!(connect_client_id(&firsts[1]).as_deref(), Some("second"));
    assert_eq!(connect_client_id(&firsts[2]).as_deref(), Some("third"));
    let received = broker.received();
    assert!(received[1].ends_with(b"\xc0\x00"), "{:?}", received[1]);
    assert!(broker.errors().is_empty(), "{:?}", broker.errors());
}

#[test]
fn mosquitto_accepts_client_pem_and_rejects_an_untrusted_client() {
    let pki = Pki::get();
    let broker = Mosquitto::start();
    let ok = Publish::new(broker.port(), "harness/ok", "x").qos(1).run();
    assert!(ok.success(), "{ok:?}");
    assert!(broker.wait_log("u'iotcored-test'", T), "CN is the username");

    let bad = Publish::new(broker.port(), "harness/bad", "x")
        .identity(
            pki.path("client-untrusted.pem"),
            pki.path("client-untrusted.key"),
        )
        .run();
    assert!(!bad.success(), "{bad:?}");
    assert!(
        broker.wait_log("certificate verify failed", T),
        "{}",
        broker.log()
    );
}

#[test]
fn a_published_message_reaches_the_subscriber() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "harness/#", 1);
    publish(&broker, "harness/a", "hello world", 1, false);
    publish(&broker, "harness/b", b"\x00binary", 0, false);
    assert!(sub.wait_lines(2, T), "{:?}", sub.lines());
    let lines = sub.lines();
    assert_eq!(lines[0], "harness/a hello world");
    assert!(lines[1].starts_with("harness/b "), "{lines:?}");
}

#[test]
fn password_file_mode_refuses_a_certificate_only_client() {
    let broker = Mosquitto::builder().password_file_mode().start();
    let out = Publish::new(broker.port(), "harness/x", "x").run();
    assert!(!out.success(), "{out:?}");
    assert!(out.output.contains("not authorised"), "{out:?}");
    assert!(broker.wait_log("(0, 5)", T), "CONNACK 5:\n{}", broker.log());
    assert!(broker.wait_log("not authorised", T), "{}", broker.log());
}

#[test]
fn mosquitto_restarts_on_its_port_and_serves_a_custom_server_certificate() {
    let pki = Pki::get();
    let mut broker = Mosquitto::builder()
        .server_cert(
            pki.path("server-wronghost.pem"),
            pki.path("server-wronghost.key"),
        )
        .tls_version("tlsv1.2")
        .start();
    let port = broker.port();
    let config = || client_config("ca.pem", "client.pem", "client.key").unwrap();
    let err = tls_connect(port, config(), "localhost").err();
    let err = err.expect("a wrong-host certificate must fail the name check");
    assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
    let s = tls_connect(port, config(), "wrong.example.com").expect("right name");
    assert_eq!(
        s.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    drop(s);

    broker.kill();
    assert!(!broker.is_running());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    broker.restart();
    assert_eq!(broker.port(), port);
    assert!(tls_connect(port, config(), "wrong.example.com").is_ok());
    assert_eq!(
        broker.count_log("mosquitto version"),
        4,
        "two starts, log appended"
    );
}

#[test]
fn proxy_carries_a_subscription_and_a_reset_cut_disconnects_it() {
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.port());
    let sub = Subscriber::builder(&broker, "harness/p")
        .qos(1)
        .port(proxy.port())
        .client_id("via-proxy")
        .start();
    assert_eq!(proxy.connections(), 1);
    publish(&broker, "harness/p", "through", 1, false);
    assert!(sub.wait_lines(1, T), "{:?}", sub.lines());
    assert_eq!(sub.lines(), ["harness/p through"]);

    // mosquitto 2.0 logs a reset as "disconnected: Protocol error" and a
    // FIN as "closed its connection".
    proxy.cut(Cut::Rst);
    assert_eq!(proxy.live_connections(), 0);
    assert!(
        broker.wait_log("Client via-proxy disconnected", T),
        "{}",
        broker.log()
    );
    assert_eq!(
        broker.count_log("Client via-proxy closed its connection"),
        0
    );
    // mosquitto_sub reconnects, through the proxy again.
    assert!(wait_until(T, || proxy.connections() == 2));
    assert!(broker.wait_log_count("Sending SUBACK to via-proxy", 2, T));
}

#[test]
fn proxy_blackhole_holds_bytes_and_refuse_closes_the_port() {
    // An echo server as the target.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let target_port = target.local_addr().unwrap().port();
    let echo = thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = target.accept().unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let proxy = Proxy::start(target_port);
    let mut c = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    c.write_all(b"ping").unwrap();
    assert_eq!(c.read(&mut buf).unwrap(), 4);

    proxy.blackhole(true);
    c.write_all(b"held").unwrap();
    let silent = c.read(&mut buf);
    assert!(silent.is_err(), "blackhole let through {silent:?}");
    proxy.blackhole(false);
    c.set_read_timeout(Some(T)).unwrap();
    assert_eq!(c.read(&mut buf).unwrap(), 4);
    assert_eq!(&buf[..4], b"held");

    proxy.refuse(true);
    let refused = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    c.write_all(b"live").unwrap(); // established connections survive
    assert_eq!(c.read(&mut buf).unwrap(), 4);
    proxy.refuse(false);
    let mut c2 = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    c2.set_read_timeout(Some(T)).unwrap();
    drop(c); // the echo server serves one connection at a time
    c2.write_all(b"again").unwrap();
    assert_eq!(c2.read(&mut buf).unwrap(), 5);
    assert_eq!(proxy.connections(), 2);

    proxy.cut(Cut::Fin);
    assert_eq!(c2.read(&mut buf).unwrap(), 0, "FIN reads as end of stream");
    echo.join().unwrap();
}

#[test]
fn daemon_guard_logs_signals_and_reaps() {
    let script = "echo starting; echo oops >&2; trap 'echo got-term; exit 3' TERM; \
                  while :; do sleep 0.05; done";
    let started = Instant::now();
    let mut d = Daemon::builder("/bin/sh")
        .args(["-c", script])
        .env("EXTRA", "1")
        .start();
    assert!(d.wait_log("oops", T), "{}", d.log());
    assert_eq!(d.count_log("starting"), 1);
    assert!(d.is_running());
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(T).expect("exited");
    assert_eq!(status.code(), Some(3));
    assert!(d.log().contains("got-term"));
    assert!(started.elapsed() < T);

    let args = iotcored_args(Pki::get(), 8883, "thing");
    assert_eq!(args[..4], ["-e", "127.0.0.1", "-i", "thing"]);
    assert_eq!(args[args.len() - 2..], ["--port", "8883"]);
    let mut echo = Daemon::builder("/bin/sh")
        .args(["-c", "printf '%s\\n' \"$@\"", "sh"])
        .args(&args)
        .start();
    assert!(echo.wait_exit(T).is_some_and(|s| s.success()));
    assert_eq!(echo.log().lines().collect::<Vec<_>>(), args);
}

/// One MQTT 5 QoS 1 publish by `mosquitto_pub -d` with `cert`/`key`
/// (bounded by `timeout`); returns its stdout and stderr.
fn publish_v5_debug(broker: &Mosquitto, topic: &str, cert: &str, key_file: &str) -> String {
    let pki = Pki::get();
    let out = Command::new("timeout")
        .arg("10")
        .arg("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-V", "5", "-q", "1", "-d", "-t", topic, "-m", "x"])
        .arg("--cafile")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path(cert))
        .arg("--key")
        .arg(pki.path(key_file))
        .output()
        .expect("run mosquitto_pub");
    assert!(out.status.success(), "{out:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn deny_publish_refuses_matching_topics_and_allows_the_rest() {
    let broker = Mosquitto::builder().deny_publish("forbidden/#").start();
    let sub = Subscriber::start(&broker, "#", 1);

    let denied = publish_v5_debug(&broker, "forbidden/x", "client.pem", "client.key");
    assert!(denied.contains("PUBACK (Mid: 1, RC:135)"), "{denied}");
    // MQTT 3.1.1 has no reason code: a plain PUBACK, the message dropped.
    publish(&broker, "forbidden/y", "x", 1, false);
    assert!(
        broker.wait_log_count("Denied PUBLISH", 2, T),
        "{}",
        broker.log()
    );

    let allowed = publish_v5_debug(&broker, "allowed/x", "client.pem", "client.key");
    assert!(allowed.contains("PUBACK (Mid: 1, RC:0)"), "{allowed}");
    // Another CN of the PKI is known to the plugin too.
    let rsa = publish_v5_debug(&broker, "allowed/y", "client-rsa.pem", "client-rsa.key");
    assert!(rsa.contains("PUBACK (Mid: 1, RC:0)"), "{rsa}");
    assert!(sub.wait_lines(2, T), "{:?}", sub.lines());
    assert_eq!(sub.lines(), ["allowed/x x", "allowed/y x"]);
}
