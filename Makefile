# iotcored: build, test, demo, bench, lint.
# `make demo` and `make test` install what they need on Debian (apt-get).

CARGO ?= cargo
DEMO_DIR ?= $(CURDIR)/demo

.PHONY: all build release test demo deps lint fmt clippy clean size bench fuzz cross soak

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# Installs what is missing of the broker, its clients, openssl, and the
# PKCS#11 tests' SoftHSM2, OpenSC's pkcs11-tool and p11-kit's proxy module
# (Debian or Ubuntu, as root); nothing already installed is upgraded. Debian's
# mosquitto package enables and starts mosquitto.service (localhost:1883),
# which the tests and the demo do not use (README, "Development").
deps:
	@missing=; \
	command -v mosquitto >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v mosquitto_sub >/dev/null 2>&1 || missing="$$missing mosquitto-clients"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v softhsm2-util >/dev/null 2>&1 || missing="$$missing softhsm2"; \
	command -v pkcs11-tool >/dev/null 2>&1 || missing="$$missing opensc"; \
	ls /usr/lib/*/p11-kit-proxy.so /usr/lib/p11-kit-proxy.so 2>/dev/null | grep -q . || \
	  missing="$$missing p11-kit-modules"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade $$missing; \
	fi

# Unit tests and end-to-end tests against a real mosquitto with mutual TLS,
# the daemon speaking MQTT 5 (its default); then the end-to-end tests that
# do not depend on the protocol again with MQTT 3.1.1 [mqtt5-1]; then the
# unit tests and the PKCS#11 tests of a build without the pkcs11 feature
# (in target/no-pkcs11, so the two builds do not replace each other).
E2E_BOTH = --test bus --test connect --test disk --test isolation \
	--test limits --test robustness --test spool
test: deps
	$(CARGO) test --all-targets
	IOTCORED_TEST_MQTT=3.1.1 $(CARGO) test $(E2E_BOTH)
	CARGO_TARGET_DIR=$(CURDIR)/target/no-pkcs11 \
	  $(CARGO) test --no-default-features --lib --test pkcs11

# Fuzzing on stable Rust (tests/fuzz): every decoder of outside bytes fed
# a seeded mutator over valid inputs, in release: FUZZ_CASES per target
# (default 10^7: about 10 minutes on 2 cores, most of it the spool
# journal's target), or FUZZ_SECONDS per target instead (or whichever comes
# first, when both are given). FUZZ_SEED=random for a new seed (printed),
# FUZZ_TARGET=NAME for one target. A failure prints the input and how to
# reproduce it and exits 1. `make test` runs a short fixed-seed pass.
FUZZ_CASES ?= $(if $(FUZZ_SECONDS),,10000000)
fuzz:
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_SECONDS=$(FUZZ_SECONDS) $(CARGO) test --release --test fuzz

# aarch64 and armv7: release binaries (paths and sizes printed), clippy,
# the unit tests under qemu-user, and the end-to-end tests CROSS_E2E
# (default: connect bus mqtt5 isolation spool; "all") on aarch64 under
# qemu, with Debian's rustc-web and cross toolchains (installed if missing,
# as root). See config/dev/cross.sh.
cross: deps
	bash config/dev/cross.sh

# The soak (tests/soak): the release daemon (MQTT 5, disk spool) for
# SOAK_MINUTES (default 60) against a local mosquitto through a
# fault-injecting proxy (link cuts, blackholes, broker restarts every
# SOAK_FAULT_SECS, default 60), with thousands of well-behaved and hostile
# bus clients as processes of their own. Samples memory, fds and stats every
# 10 s; writes target/soak/report.json and target/soak/soak.svg; exits 1 if
# a check failed (memory or fds not flat, a QoS 1 message lost, a
# well-behaved client refused, a hostile one not contained).
SOAK_MINUTES ?= 60
soak: deps
	SOAK_MINUTES=$(SOAK_MINUTES) $(CARGO) test --release --test soak

# A local mosquitto with generated certificates on 127.0.0.1:DEMO_PORT,
# and iotcored in the foreground against it; prints the iotcorectl status,
# stats, sub and pub commands and a broker-side mosquitto_sub line. Ctrl-C
# stops both and make exits 0. DEMO_PORT (default 8883; from the command
# line, make demo DEMO_PORT=18883, or the environment) chooses the port;
# DEMO_DIR holds the PKI (made once, kept), the config, the broker's log and
# the bus socket. A second demo on a DEMO_DIR whose demo runs exits 1 and
# leaves it alone; so does one whose port is taken. See config/dev/demo.sh.
DEMO_PORT ?= 8883
demo: deps release
	DEMO_PORT=$(DEMO_PORT) bash config/dev/demo.sh $(DEMO_DIR)

lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --no-default-features -- -D warnings
	$(CARGO) clippy --test bench --test soak -- -D warnings
	$(CARGO) clippy --examples -- -D warnings

size: release
	@for bin in iotcored iotcorectl; do \
	  ls -l target/release/$$bin | awk -v b=$$bin '{ printf "%s: stripped release binary, %d bytes (%.2f MiB)\n", b, $$5, $$5/1048576 }'; \
	done

# Benchmark against a local mosquitto on 127.0.0.1 (about 2 minutes): the
# publish rate limit, throughput, latency, CPU per message, CPU per
# one-connection call next to a minimal server's, memory, spool capacity
# and binary size. Prints a report and writes target/bench/report.json; a
# missed target is reported, not a failure. The variant without a rate
# limit, and the minimal server (examples/bench_floor.rs), are built into
# target/bench-unlimited.
bench: deps
	$(CARGO) build --release
	IOTCORED_PUBLISH_RATE=0 IOTCORED_PUBLISH_BYTES_PER_SEC=0 \
	  CARGO_TARGET_DIR=$(CURDIR)/target/bench-unlimited \
	  $(CARGO) build --release --bin iotcored --example bench_floor
	$(CARGO) test --release --test bench
	@command -v valgrind >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }
	bash config/dev/alloc-check.sh

clean:
	$(CARGO) clean
	rm -rf $(DEMO_DIR)

# make install [DESTDIR=/staging] [PREFIX=/usr] [NOBUILD=1]
# Builds the release binaries (unless NOBUILD=1: then it installs what is in
# BUILDDIR, e.g. target/aarch64-unknown-linux-gnu/release after a cross
# build) and installs them with the systemd units, the sysusers.d file and,
# only if there is none yet, $(SYSCONFDIR)/iotcored/iotcored.env from
# config/systemd/iotcored.env.example. The units are rewritten for BINDIR
# and SYSCONFDIR. Nothing is enabled or started, and no user is created
# (systemd-sysusers or the package manager does that).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
SYSCONFDIR ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
BUILDDIR ?= target/release
INSTALL ?= install

.PHONY: install
install: $(if $(NOBUILD),,release)
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSTEMDUNITDIR) \
	  $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(SYSCONFDIR)/iotcored
	$(INSTALL) -m 0755 $(BUILDDIR)/iotcored $(BUILDDIR)/iotcorectl $(DESTDIR)$(BINDIR)/
	for unit in iotcored.service iotcored.socket; do \
	  sed -e 's|/usr/bin/iotcored|$(BINDIR)/iotcored|g' \
	      -e 's|/etc/iotcored/|$(SYSCONFDIR)/iotcored/|g' \
	      config/systemd/$$unit > $(DESTDIR)$(SYSTEMDUNITDIR)/$$unit && \
	  chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/$$unit || exit 1; \
	done
	$(INSTALL) -m 0644 config/systemd/iotcored.sysusers $(DESTDIR)$(SYSUSERSDIR)/iotcored.conf
	@env=$(DESTDIR)$(SYSCONFDIR)/iotcored/iotcored.env; \
	if [ -e "$$env" ]; then \
	  echo "keeping the existing $$env"; \
	else \
	  echo "$(INSTALL) -m 0644 config/systemd/iotcored.env.example $$env"; \
	  $(INSTALL) -m 0644 config/systemd/iotcored.env.example "$$env"; \
	fi
