# iotcored: build, test, demo, bench, lint.
# `make demo` and `make test` install what they need on Debian (apt-get).

CARGO ?= cargo
DEMO_DIR ?= $(CURDIR)/demo
APT_PACKAGES = mosquitto mosquitto-clients openssl

.PHONY: all build release test demo deps lint fmt clippy clean size

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# Installs the broker and openssl when missing (Debian/Ubuntu, as root).
deps:
	@missing=; \
	for cmd in mosquitto mosquitto_sub openssl; do \
	  command -v $$cmd >/dev/null 2>&1 || missing=1; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi

# Unit tests and end-to-end tests against a real mosquitto with mutual TLS.
test: deps
	$(CARGO) test --all-targets

# A local mosquitto with generated certificates on 127.0.0.1, and iotcored
# in the foreground against it. Ctrl-C stops both.
demo: deps release
	bash config/dev/demo.sh $(DEMO_DIR)

lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

size: release
	@ls -l target/release/iotcored | awk '{ printf "stripped release binary: %d bytes (%.2f MiB)\n", $$5, $$5/1048576 }'

clean:
	$(CARGO) clean
	rm -rf $(DEMO_DIR)
