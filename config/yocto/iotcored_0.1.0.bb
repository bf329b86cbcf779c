SUMMARY = "MQTT 3.1.1 spooler daemon for AWS IoT Core, speaking the Greengrass Lite core bus"
DESCRIPTION = "iotcored shares one set of AWS IoT credentials and one MQTT \
connection among the local programs of a gateway, which reach it over a Unix \
socket (/run/greengrass/aws_iot_mqtt). iotcorectl is its command-line client."
SECTION = "net"

# iotcored is Apache-2.0. The binary links these crates statically: MIT or
# Apache-2.0 (most), ISC (ring, rustls-webpki, untrusted), BSD-3-Clause
# (subtle). The repository has no LICENSE file of its own yet, hence the
# common licence text.
LICENSE = "Apache-2.0 & MIT & ISC & BSD-3-Clause"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# Classes: oe-core's own `cargo` (not meta-rust-bin's `cargo_bin`), so the
# recipe builds with the release's Rust and fetches every crate through
# bitbake (offline builds, mirrors, license and CVE tooling).
# cargo-update-recipe-crates adds `bitbake -c update_crates iotcored`,
# which rewrites iotcored-crates.inc from Cargo.lock.
#
# Rust: 1.75 or later (Cargo.toml rust-version; Cargo.lock pins the
# dependencies to versions that build with it), so scarthgap (5.0, Rust
# 1.75) and every later release build it with their own Rust.
inherit cargo cargo-update-recipe-crates systemd useradd

# Set these for your release: the repository and the commit of the tag.
SRC_URI = "git://git.example.com/iotcored.git;protocol=https;branch=main"
SRCREV = "0000000000000000000000000000000000000000"
# Where current oe-core's git fetcher unpacks (${UNPACKDIR}/${BP}); on
# scarthgap, which has no BB_GIT_DEFAULT_DESTSUFFIX, use S = "${WORKDIR}/git".
S = "${UNPACKDIR}/${BB_GIT_DEFAULT_DESTSUFFIX}"

require ${BPN}-crates.inc

# --- Build-time capacities -------------------------------------------------
# build.rs reads these IOTCORED_* variables and fails the build on a value
# out of range. The defaults below are build.rs's own (tests/packaging.rs
# checks that they agree). Set them in local.conf or a bbappend, e.g.
#   IOTCORED_MAX_CONNECTIONS:pn-iotcored = "3"
#   IOTCORED_BUS_LARGE_BUFFERS:pn-iotcored = "8"
# They are exported to cargo and listed in do_compile[vardeps], so changing
# one rebuilds the recipe.
export IOTCORED_MAX_CONNECTIONS ?= "1"
export IOTCORED_SUBSCRIPTIONS_PER_CONNECTION ?= "50"
export IOTCORED_MAX_SUBSCRIPTIONS ?= "100"
export IOTCORED_MQTT_MAX_PACKET ?= "133120"
export IOTCORED_MAX_BUS_CLIENTS ?= "100"
export IOTCORED_BUS_MAX_FRAME ?= "147456"
export IOTCORED_BUS_SLOT_BUFFER ?= "10012"
export IOTCORED_BUS_LARGE_BUFFERS ?= "4"
export IOTCORED_BUS_CLIENT_TX ?= "8192"
export IOTCORED_SPOOL_BYTES ?= "1048576"
export IOTCORED_SPOOL_MESSAGES ?= "2048"
export IOTCORED_MAX_INFLIGHT ?= "100"
export IOTCORED_PUBLISH_LANES ?= "16"
export IOTCORED_PUBLISH_RATE ?= "100"
export IOTCORED_PUBLISH_BYTES_PER_SEC ?= "524288"

IOTCORED_CAPACITIES = "\
    IOTCORED_MAX_CONNECTIONS \
    IOTCORED_SUBSCRIPTIONS_PER_CONNECTION \
    IOTCORED_MAX_SUBSCRIPTIONS \
    IOTCORED_MQTT_MAX_PACKET \
    IOTCORED_MAX_BUS_CLIENTS \
    IOTCORED_BUS_MAX_FRAME \
    IOTCORED_BUS_SLOT_BUFFER \
    IOTCORED_BUS_LARGE_BUFFERS \
    IOTCORED_BUS_CLIENT_TX \
    IOTCORED_SPOOL_BYTES \
    IOTCORED_SPOOL_MESSAGES \
    IOTCORED_MAX_INFLIGHT \
    IOTCORED_PUBLISH_LANES \
    IOTCORED_PUBLISH_RATE \
    IOTCORED_PUBLISH_BYTES_PER_SEC \
"
do_compile[vardeps] += "${IOTCORED_CAPACITIES}"

# --- PKCS#11 keys ----------------------------------------------------------
# -k pkcs11:… (RFC 7512 URIs): the device key stays on a TPM 2.0
# (tpm2-pkcs11, in meta-security's meta-tpm), an HSM or a secure element.
# On by default (cargo feature pkcs11, 47 KiB); to build without:
#   PACKAGECONFIG:remove:pn-iotcored = "pkcs11"
# The module is loaded at run time (dlopen), so nothing links against it:
# install the one your device needs (tpm2-pkcs11, and p11-kit for its proxy
# module, which iotcored uses when the URI has no module-path).
PACKAGECONFIG ??= "pkcs11"
PACKAGECONFIG[pkcs11] = ",--no-default-features"

# Cargo.toml's release profile strips the binary; let the build system
# strip it instead and keep the symbols in iotcored-dbg.
export CARGO_PROFILE_RELEASE_STRIP = "false"

# --- Installation ------------------------------------------------------------
# cargo_do_install puts iotcored and iotcorectl in ${bindir}.
do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    for unit in iotcored.service iotcored.socket; do
        sed -e 's|/usr/bin/iotcored|${bindir}/iotcored|g' \
            -e 's|/etc/iotcored/|${sysconfdir}/iotcored/|g' \
            ${S}/config/systemd/$unit > ${D}${systemd_system_unitdir}/$unit
        chmod 0644 ${D}${systemd_system_unitdir}/$unit
    done
    install -D -m 0644 ${S}/config/systemd/iotcored.sysusers \
        ${D}${nonarch_libdir}/sysusers.d/iotcored.conf
    # The environment file holds the device's endpoint, client id and PEM
    # paths: a bbappend usually replaces it. It is a CONFFILE, so package
    # upgrades keep local edits.
    install -D -m 0644 ${S}/config/systemd/iotcored.env.example \
        ${D}${sysconfdir}/iotcored/iotcored.env
}

FILES:${PN} += "${nonarch_libdir}/sysusers.d/iotcored.conf"
CONFFILES:${PN} = "${sysconfdir}/iotcored/iotcored.env"

# The socket is enabled (sockets.target) so clients can connect from early
# boot, and the service (multi-user.target) so the MQTT connection is made
# without waiting for a client.
SYSTEMD_SERVICE:${PN} = "iotcored.socket iotcored.service"
SYSTEMD_AUTO_ENABLE = "enable"

# The same accounts as config/systemd/iotcored.sysusers, for images built
# without systemd-sysusers: the daemon's user and group `iotcored`, and
# `iotcore`, the group of core bus clients (the socket is root:iotcore 0660),
# which iotcored belongs to as well.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system iotcore"
USERADD_PARAM:${PN} = "--system --user-group --groups iotcore \
    --home-dir / --no-create-home --shell /sbin/nologin \
    --comment 'AWS IoT Core MQTT spooler' iotcored"
