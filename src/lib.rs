//! iotcored: an MQTT 3.1.1 spooler daemon for AWS IoT Core.
//!
//! The event loop (`event_loop`) owns every socket and the clock; everything
//! it drives is sans-I/O and takes `now` as an argument. `unsafe` code is
//! denied (Cargo.toml's `[lints.rust]`) but in `sys` and `pkcs11::ffi`.

pub mod bus;
pub mod config;
pub mod consts;
pub mod crc;
pub mod event_loop;
pub mod journal;
pub mod limits;
pub mod mqtt;
pub mod pkcs11;
pub mod router;
pub mod service;
pub mod spool;
#[allow(unsafe_code)]
pub mod sys;
#[cfg(test)]
mod test_rng;
pub mod time;
pub mod tls;
