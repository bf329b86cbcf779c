//! Valid inputs the mutator starts from: made with the crate's own
//! encoders where it has them, written out byte by byte where it does not
//! (packets only a broker sends). `main` checks that each is accepted.

use iotcored::bus::example::{PUBLISH_CALL, PUBLISH_PARAMS};
use iotcored::bus::frame::{self, HeaderValue, RequestType};
use iotcored::bus::object::Encoder;
use iotcored::mqtt::packet::{Packet, Version};
use iotcored::mqtt::props::{Context, Props};
use iotcored::mqtt::session::connect_packet;

fn object(write: impl FnOnce(&mut Encoder<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut e = Encoder::new(&mut buf);
    write(&mut e);
    let n = e.written();
    buf.truncate(n);
    buf
}

fn publish_params(topic: &[u8], payload: &[u8], qos: i64, extra: bool) -> Vec<u8> {
    object(|e| {
        e.map(if extra { 5 } else { 3 }).unwrap();
        e.key(b"topic").unwrap().buf(topic).unwrap();
        e.key(b"payload").unwrap().buf(payload).unwrap();
        e.key(b"qos").unwrap().i64(qos).unwrap();
        if extra {
            e.key(b"retain").unwrap().bool(true).unwrap();
            e.key(b"properties").unwrap().map(2).unwrap();
            e.key(b"message_expiry").unwrap().i64(60).unwrap();
            e.key(b"user_properties").unwrap().list(1).unwrap();
            e.list(2).unwrap().buf(b"k").unwrap().buf(b"v").unwrap();
        }
    })
}

fn subscribe_params(filters: &[&[u8]], qos: i64) -> Vec<u8> {
    object(|e| {
        e.map(2).unwrap();
        e.key(b"topic_filter").unwrap().list(filters.len()).unwrap();
        for f in filters {
            e.buf(f).unwrap();
        }
        e.key(b"qos").unwrap().i64(qos).unwrap();
    })
}

pub fn bus_objects() -> Vec<Vec<u8>> {
    vec![
        PUBLISH_PARAMS.to_vec(),
        publish_params(b"sensors/t", b"21.5", 0, false),
        publish_params(b"a/b", &[0u8; 40], 1, true),
        subscribe_params(&[b"a/#", b"+/b"], 1),
        object(|e| {
            e.map(1)
                .unwrap()
                .key(b"topic_filter")
                .unwrap()
                .buf(b"x/y")
                .unwrap();
        }),
        object(|e| {
            e.map(6).unwrap();
            e.key(b"null").unwrap().null().unwrap();
            e.key(b"t").unwrap().bool(true).unwrap();
            e.key(b"min").unwrap().i64(i64::MIN).unwrap();
            e.key(b"pi").unwrap().f64(std::f64::consts::PI).unwrap();
            e.key(b"empty").unwrap().list(0).unwrap();
            e.key(b"nested").unwrap().list(1).unwrap();
            e.list(1).unwrap().map(0).unwrap();
        }),
        object(|e| {
            e.buf(b"a bare buffer").unwrap();
        }),
        object(|e| {
            e.i64(-1).unwrap();
        }),
    ]
}

fn request(method: &[u8], kind: RequestType, params: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 8192];
    let mut e = frame::begin_request(&mut buf, method, kind).unwrap();
    e.payload_mut()[..params.len()].copy_from_slice(params);
    let n = e.finish(params.len()).unwrap();
    buf.truncate(n);
    buf
}

fn frame_with(headers: &[(&str, HeaderValue<'_>)], payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 8192];
    let n = frame::emit(&mut buf, headers, payload).unwrap();
    buf.truncate(n);
    buf
}

pub fn bus_frames() -> Vec<Vec<u8>> {
    let mut v = vec![PUBLISH_CALL.to_vec()];
    v.push(request(
        b"publish",
        RequestType::Call,
        &publish_params(b"a/b", b"hello", 1, true),
    ));
    v.push(request(
        b"subscribe",
        RequestType::Subscribe,
        &subscribe_params(&[b"a/#"], 0),
    ));
    v.push(request(
        b"unsubscribe",
        RequestType::Call,
        &subscribe_params(&[b"a/#"], 0),
    ));
    v.push(request(
        b"connection_status",
        RequestType::Call,
        &object(|e| {
            e.map(0).unwrap();
        }),
    ));
    v.push(request(b"stats", RequestType::Notify, &[]));
    let mut buf = vec![0u8; 256];
    let n = frame::emit_error(&mut buf, frame::ErrorCode::Range).unwrap();
    v.push(buf[..n].to_vec());
    let n = frame::emit_accepted(&mut buf).unwrap();
    v.push(buf[..n].to_vec());
    v.push(frame_with(&[], &publish_params(b"t", b"m", 0, false)));
    v.push(frame_with(
        &[
            ("method", HeaderValue::Str(b"publish")),
            ("type", HeaderValue::I32(1)),
            ("x-extra", HeaderValue::Str(b"")),
            ("n", HeaderValue::I32(-7)),
        ],
        PUBLISH_PARAMS,
    ));
    v
}

fn emit(p: &Packet<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let n = p.emit(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Packets of `version`, of every type, those a broker sends and those a
/// client sends.
pub fn mqtt_packets(version: Version) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let mut connect = connect_packet("fuzz-client", true);
    if version == Version::V5 {
        connect.properties = Some(Props::EMPTY);
    }
    v.push(emit(&Packet::Connect(connect)));
    connect.username = Some("user");
    connect.password = Some(b"secret");
    connect.keepalive = 60;
    v.push(emit(&Packet::Connect(connect)));
    v.extend(broker_packets(version));
    if version == Version::V311 {
        v.push(vec![0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1]); // SUBSCRIBE
        v.push(vec![0xa2, 7, 0, 2, 0, 3, b'a', b'/', b'#']); // UNSUBSCRIBE
        v.push(vec![0xc0, 0]); // PINGREQ
    } else {
        v.push(vec![0x82, 9, 0, 1, 0, 0, 3, b'a', b'/', b'#', 1]);
        // With a subscription identifier.
        v.push(vec![0x82, 11, 0, 1, 2, 0x0b, 5, 0, 3, b'a', b'/', b'#', 1]);
        v.push(vec![0xa2, 8, 0, 2, 0, 0, 3, b'a', b'/', b'#']);
        v.push(vec![0xc0, 0]);
    }
    v
}

/// Packets a broker sends.
fn broker_packets(version: Version) -> Vec<Vec<u8>> {
    if version == Version::V311 {
        return vec![
            vec![0x20, 2, 0, 0],                                     // CONNACK
            vec![0x20, 2, 1, 0],                                     // session present
            vec![0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'],       // PUBLISH qos 0
            vec![0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i'], // qos 1
            vec![0x3b, 8, 0, 3, b'a', b'/', b'b', 0, 8, b'!'],       // dup retain qos 1
            vec![0x40, 2, 0, 7],                                     // PUBACK
            vec![0x90, 3, 0, 1, 1],                                  // SUBACK
            vec![0x90, 4, 0, 1, 0, 0x80],
            vec![0xb0, 2, 0, 2], // UNSUBACK
            vec![0xd0, 0],       // PINGRESP
            vec![0xe0, 0],       // DISCONNECT
        ];
    }
    let mut publish = vec![0x32, 35, 0, 3, b'a', b'/', b'b', 0, 7, 25];
    publish.extend_from_slice(&[0x01, 1]); // payload format
    publish.extend_from_slice(&[0x02, 0, 0, 0, 60]); // message expiry
    publish.extend_from_slice(&[0x23, 0, 3]); // topic alias
    publish.extend_from_slice(&[0x26, 0, 1, b'k', 0, 1, b'v']); // user property
    publish.extend_from_slice(&[0x08, 0, 1, b'r']); // response topic
    publish.extend_from_slice(&[0x09, 0, 1, b'c']); // correlation data
    publish.extend_from_slice(b"hi");
    let mut connack = vec![0x20, 21, 0, 0, 18];
    connack.extend_from_slice(&[0x21, 0, 20]); // receive maximum
    connack.extend_from_slice(&[0x27, 0, 1, 0, 0]); // maximum packet size
    connack.extend_from_slice(&[0x22, 0, 10]); // topic alias maximum
    connack.extend_from_slice(&[0x25, 1]); // retain available
    connack.extend_from_slice(&[0x1f, 0, 2, b'o', b'k']); // reason string
    vec![
        vec![0x20, 3, 0, 0, 0],
        connack,
        vec![0x20, 3, 0, 0x87, 0], // refused: not authorized
        vec![0x30, 8, 0, 3, b'a', b'/', b'b', 0, b'h', b'i'],
        publish,
        // An aliased publish: empty topic, alias 3.
        vec![0x30, 8, 0, 0, 3, 0x23, 0, 3, b'h', b'i'],
        vec![0x40, 2, 0, 7],
        vec![0x40, 3, 0, 7, 0x10],
        vec![0x40, 9, 0, 7, 0x87, 5, 0x1f, 0, 2, b'n', b'o'],
        vec![0x90, 4, 0, 1, 0, 1],
        vec![0x90, 9, 0, 1, 5, 0x1f, 0, 2, b'n', b'o', 0x87],
        vec![0xb0, 4, 0, 2, 0, 0],
        vec![0xd0, 0],
        vec![0xe0, 0],
        vec![0xe0, 1, 0x8e],
        vec![0xe0, 7, 0x8e, 5, 0x1f, 0, 2, b'b', b'y'],
        vec![0xe0, 8, 0x9c, 6, 0x1c, 0, 3, b'h', b'o', b's'],
    ]
}

/// Property blocks, each after the byte that names its packet type.
pub fn property_blocks() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for p in broker_packets(Version::V5)
        .iter()
        .chain(&mqtt_packets(Version::V5))
    {
        if let Some((ctx, block)) = block_of(p) {
            if Props::parse(block, Context(ctx)).is_ok() && !block.is_empty() {
                let mut e = vec![ctx];
                e.extend_from_slice(block);
                v.push(e);
            }
        }
    }
    // Every form of value: byte, u16, u32, varint, string, binary, pair.
    v.push(vec![
        3, 0x01, 0, 0x23, 0, 9, 0x02, 0, 0, 1, 0, 0x03, 0, 1, b'j', 0x09, 0, 2, 1, 2, 0x26, 0, 1,
        b'a', 0, 0,
    ]);
    v.push(vec![8, 0x0b, 0xff, 0x7f]); // SUBSCRIBE, subscription id 16383
    v
}

/// The packet type and property block of a PUBLISH, CONNACK, PUBACK, SUBACK
/// or DISCONNECT written above (whose layouts are known here).
fn block_of(p: &[u8]) -> Option<(u8, &[u8])> {
    let ptype = p.first()? >> 4;
    let body = p.get(2..)?;
    let at = match ptype {
        2 => 2, // flags, code
        3 => {
            2 + usize::from(u16::from_be_bytes([body[0], body[1]])) + usize::from(p[0] & 6 != 0) * 2
        }
        4 | 9 | 11 if body.len() > 3 => 3, // id, reason
        9 | 11 => 2,
        14 if body.len() > 1 => 1,
        _ => return None,
    };
    let len = usize::from(*body.get(at)?);
    if len >= 0x80 {
        return None;
    }
    Some((ptype, body.get(at + 1..at + 1 + len)?))
}

/// What a broker sends after our CONNECT: a CONNACK, then a run of packets.
pub fn broker_streams(version: Version) -> Vec<Vec<u8>> {
    let packets = broker_packets(version);
    let connack = packets[if version == Version::V5 { 1 } else { 0 }].clone();
    let rest: Vec<&Vec<u8>> = packets
        .iter()
        .filter(|p| p[0] >> 4 != 2 && p[0] >> 4 != 14)
        .collect();
    let mut v = Vec::new();
    for n in 1..=rest.len() {
        let mut s = connack.clone();
        for p in rest.iter().take(n) {
            s.extend_from_slice(p);
        }
        v.push(s);
    }
    // One that ends with the broker's DISCONNECT.
    let mut s = connack;
    s.extend_from_slice(&packets[packets.len() - 1]);
    v.push(s);
    v
}
