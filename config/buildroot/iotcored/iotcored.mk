################################################################################
#
# iotcored
#
################################################################################

# Set these for your release: the repository and the tag. Buildroot vendors
# the crates of Cargo.lock into the tarball it makes at download time, and
# builds offline with --locked. iotcored.hash (the sha256 of that tarball)
# has to be written per release: see Config.in.
IOTCORED_VERSION = 0.1.0
IOTCORED_SITE = https://git.example.com/iotcored.git
IOTCORED_SITE_METHOD = git
# iotcored is Apache-2.0; the crates it links are MIT or Apache-2.0, ISC
# (ring, rustls-webpki, untrusted) and BSD-3-Clause (subtle).
IOTCORED_LICENSE = Apache-2.0, MIT, ISC, BSD-3-Clause

# Build-time capacities (build.rs), from the BR2_PACKAGE_IOTCORED_* options.
# Passed to both cargo build and cargo install.
IOTCORED_CARGO_ENV = \
	IOTCORED_MAX_CONNECTIONS=$(BR2_PACKAGE_IOTCORED_MAX_CONNECTIONS) \
	IOTCORED_SUBSCRIPTIONS_PER_CONNECTION=$(BR2_PACKAGE_IOTCORED_SUBSCRIPTIONS_PER_CONNECTION) \
	IOTCORED_MAX_SUBSCRIPTIONS=$(BR2_PACKAGE_IOTCORED_MAX_SUBSCRIPTIONS) \
	IOTCORED_MQTT_MAX_PACKET=$(BR2_PACKAGE_IOTCORED_MQTT_MAX_PACKET) \
	IOTCORED_MAX_BUS_CLIENTS=$(BR2_PACKAGE_IOTCORED_MAX_BUS_CLIENTS) \
	IOTCORED_BUS_MAX_FRAME=$(BR2_PACKAGE_IOTCORED_BUS_MAX_FRAME) \
	IOTCORED_BUS_SLOT_BUFFER=$(BR2_PACKAGE_IOTCORED_BUS_SLOT_BUFFER) \
	IOTCORED_BUS_LARGE_BUFFERS=$(BR2_PACKAGE_IOTCORED_BUS_LARGE_BUFFERS) \
	IOTCORED_BUS_CLIENT_TX=$(BR2_PACKAGE_IOTCORED_BUS_CLIENT_TX) \
	IOTCORED_SPOOL_BYTES=$(BR2_PACKAGE_IOTCORED_SPOOL_BYTES) \
	IOTCORED_SPOOL_MESSAGES=$(BR2_PACKAGE_IOTCORED_SPOOL_MESSAGES) \
	IOTCORED_MAX_INFLIGHT=$(BR2_PACKAGE_IOTCORED_MAX_INFLIGHT) \
	IOTCORED_PUBLISH_LANES=$(BR2_PACKAGE_IOTCORED_PUBLISH_LANES) \
	IOTCORED_PUBLISH_RATE=$(BR2_PACKAGE_IOTCORED_PUBLISH_RATE) \
	IOTCORED_PUBLISH_BYTES_PER_SEC=$(BR2_PACKAGE_IOTCORED_PUBLISH_BYTES_PER_SEC)

# PKCS#11 keys are the cargo feature pkcs11, a default one.
ifeq ($(BR2_PACKAGE_IOTCORED_PKCS11),)
IOTCORED_CARGO_BUILD_OPTS += --no-default-features
IOTCORED_CARGO_INSTALL_OPTS += --no-default-features
endif

# The daemon's user and group, and `iotcore`, the group of core bus clients
# (the socket is root:iotcore 0660); iotcored is in it too. The same as
# config/systemd/iotcored.sysusers.
define IOTCORED_USERS
	- - iotcore -1 * - - - Core bus clients of iotcored
	iotcored -1 iotcored -1 * - - iotcore AWS IoT Core MQTT spooler
endef

# cargo install puts iotcored and iotcorectl in /usr/bin. With systemd as
# init: the units (enabled by Buildroot's presets), the sysusers.d file and
# the environment file, which a rootfs overlay normally replaces.
define IOTCORED_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/config/systemd/iotcored.service \
		$(TARGET_DIR)/usr/lib/systemd/system/iotcored.service
	$(INSTALL) -D -m 0644 $(@D)/config/systemd/iotcored.socket \
		$(TARGET_DIR)/usr/lib/systemd/system/iotcored.socket
	$(INSTALL) -D -m 0644 $(@D)/config/systemd/iotcored.sysusers \
		$(TARGET_DIR)/usr/lib/sysusers.d/iotcored.conf
	$(INSTALL) -D -m 0644 $(@D)/config/systemd/iotcored.env.example \
		$(TARGET_DIR)/etc/iotcored/iotcored.env
endef

$(eval $(cargo-package))
