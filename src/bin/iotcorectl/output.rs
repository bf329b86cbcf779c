//! How results are printed on stdout: a subscription message as its raw
//! payload (after its topic with `-v`), a connection state as a line, and
//! the stats object as `path value` lines. Every write is checked, so a
//! closed stdout ends the run ([`Error::Stdout`]).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{self, Write};

use iotcored::bus::object::Object;

use crate::Error;

/// A subscription message: its payload, raw, then a newline; with
/// `verbose`, its topic and a space first. Flushed, so a pipe sees each
/// message as it arrives.
pub(crate) fn print_message(
    out: &mut impl Write,
    topic: &[u8],
    payload: &[u8],
    verbose: bool,
) -> Result<(), Error> {
    if verbose {
        out.write_all(topic).map_err(Error::Stdout)?;
        out.write_all(b" ").map_err(Error::Stdout)?;
    }
    out.write_all(payload).map_err(Error::Stdout)?;
    out.write_all(b"\n").map_err(Error::Stdout)?;
    out.flush().map_err(Error::Stdout)
}

/// A connection state as the line `connected` or `disconnected`, flushed.
pub(crate) fn print_state(out: &mut impl Write, connected: bool) -> Result<(), Error> {
    let line: &[u8] = if connected {
        b"connected\n"
    } else {
        b"disconnected\n"
    };
    out.write_all(line)
        .and_then(|()| out.flush())
        .map_err(Error::Stdout)
}

/// The answer of `stats` as `path value` lines (see [`render`]).
pub(crate) fn print_stats(stats: &Object<'_>) -> Result<(), Error> {
    let mut text = String::new();
    render(&mut text, "", stats);
    io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(Error::Stdout)
}

/// Bytes as text: UTF-8 without control characters as is, else escaped.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) => Cow::Borrowed(s),
        _ => Cow::Owned(bytes.escape_ascii().to_string()),
    }
}

/// Writes `obj` as `path value` lines; containers are flattened into
/// dotted paths (`connections.0.id thing`), an empty one is `[]` or `{}`.
/// Depth is bounded by the object codec's validation [bus-obj-1].
fn render(out: &mut String, path: &str, obj: &Object<'_>) {
    let child = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    let scalar = match obj {
        Object::Map(m) if !m.is_empty() => {
            for (k, v) in m.iter() {
                render(out, &child(&text(k)), &v);
            }
            return;
        }
        Object::List(l) if !l.is_empty() => {
            for (i, v) in l.iter().enumerate() {
                render(out, &child(&i.to_string()), &v);
            }
            return;
        }
        Object::Map(_) => Cow::Borrowed("{}"),
        Object::List(_) => Cow::Borrowed("[]"),
        Object::Null => Cow::Borrowed("null"),
        Object::Bool(b) => Cow::Owned(b.to_string()),
        Object::I64(v) => Cow::Owned(v.to_string()),
        Object::F64(v) => Cow::Owned(v.to_string()),
        Object::Buf(b) => text(b),
    };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{path} {scalar}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotcored::bus::object::Encoder;

    #[test]
    fn stats_print_as_key_value_lines_with_dotted_paths() {
        let mut buf = [0u8; 512];
        let mut enc = Encoder::new(&mut buf);
        enc.map(6).unwrap();
        enc.key(b"published").unwrap().i64(12).unwrap();
        enc.key(b"ratio").unwrap().f64(0.5).unwrap();
        enc.key(b"connections").unwrap().list(2).unwrap();
        enc.map(3).unwrap();
        enc.key(b"id").unwrap().buf(b"thing").unwrap();
        enc.key(b"connected").unwrap().bool(true).unwrap();
        enc.key(b"inflight").unwrap().i64(0).unwrap();
        enc.map(2).unwrap();
        enc.key(b"id").unwrap().buf(b"thing_1\n").unwrap();
        enc.key(b"tags").unwrap().list(0).unwrap();
        enc.key(b"extra").unwrap().map(0).unwrap();
        // A buffer is the rest of its line, spaces and all; empty is empty.
        enc.key(b"last_disconnect")
            .unwrap()
            .buf(b"TLS: peer sent no certificates")
            .unwrap();
        enc.key(b"never").unwrap().buf(b"").unwrap();
        let n = enc.written();
        let obj = Object::parse(&buf[..n]).unwrap();
        let mut out = String::new();
        render(&mut out, "", &obj);
        assert_eq!(
            out,
            "published 12\n\
             ratio 0.5\n\
             connections.0.id thing\n\
             connections.0.connected true\n\
             connections.0.inflight 0\n\
             connections.1.id thing_1\\n\n\
             connections.1.tags []\n\
             extra {}\n\
             last_disconnect TLS: peer sent no certificates\n\
             never \n"
        );
    }
}
