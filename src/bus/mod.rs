//! The core bus: the Greengrass Lite wire protocol local clients speak to iotcored.

#[doc(hidden)]
pub mod example;
pub mod frame;
pub mod object;
pub mod server;

/// The longest interface name [bus-sock-1]: the last part of a socket path
/// `<socket-dir>/<name>`, whether it is the interface iotcored serves or a
/// `response_endpoint` it delivers to.
pub const MAX_INTERFACE_NAME_LEN: usize = 50;

/// Whether `name` can name an interface: 1 to `MAX_INTERFACE_NAME_LEN`
/// bytes, a single path component (no '/', not "." or "..") without NUL.
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME_LEN
        && !name.contains(['/', '\0'])
        && name != "."
        && name != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_one_path_component_of_at_most_50_bytes() {
        let longest = "n".repeat(MAX_INTERFACE_NAME_LEN);
        for ok in ["aws_iot_mqtt", "a", ".hidden", "x..y", longest.as_str()] {
            assert!(is_interface_name(ok), "{ok:?}");
        }
        let too_long = "n".repeat(MAX_INTERFACE_NAME_LEN + 1);
        for bad in ["", ".", "..", "../x", "a/b", "a\0b", too_long.as_str()] {
            assert!(!is_interface_name(bad), "{bad:?}");
        }
    }
}
