//! The core bus: the Greengrass Lite wire protocol local clients speak to iotcored.

pub mod frame;
pub mod object;
pub mod server;
