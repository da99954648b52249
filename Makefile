# dvmm build. `make` installs what a fresh Debian machine lacks (Deno from npm, gcc), builds the shim
# and the launcher build/dvmm. `make test` runs the whole suite, lab included.
SHELL := /bin/bash
ROOT := $(CURDIR)
BUILD := $(ROOT)/build
DENO_VERSION := 2.9.6
TOOLS := $(ROOT)/.tools
export DENO_DIR ?= $(BUILD)/deno_dir
DENO := $(shell command -v deno 2>/dev/null || echo $(TOOLS)/deno)
CC ?= gcc
CFLAGS := -O2 -g -Wall -Wextra -Werror -fPIC -std=gnu11

SHIM := $(BUILD)/libkvmshim.so
TS_SOURCES := $(shell find ffi vmm devices api -name '*.ts' 2>/dev/null) main.ts

.PHONY: fuzz all deno test test-deps demo dist clean fmt lint check

all: $(BUILD)/dvmm

include tests/lab/lab.mk

$(TOOLS)/deno:
	@command -v npm >/dev/null || { echo "installing npm (apt-get)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }
	mkdir -p $(TOOLS)/npm
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)/npm deno@$(DENO_VERSION)
	ln -sf $(TOOLS)/npm/node_modules/@deno/linux-x64-glibc/deno $(TOOLS)/deno
	$(TOOLS)/deno --version

deno: $(DENO)

$(SHIM): libkvmshim/kvmshim.c libkvmshim/sandbox.c libkvmshim/uring.c libkvmshim/kvmshim.h
	@command -v $(CC) >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; }
	mkdir -p $(BUILD)
	$(CC) $(CFLAGS) -shared -o $@ libkvmshim/kvmshim.c libkvmshim/sandbox.c libkvmshim/uring.c -lpthread

# The bundled build: main.ts and each worker's module graph as one JavaScript file each (build/js, laid
# out as the sources are, so that worker URLs resolve alike: see vmm/worker_pool.ts workerUrl). One file
# to load per isolate instead of a hundred modules: start-up. dbus-next stays an npm import (loaded only
# for --dbus-service-name).
JS := $(BUILD)/js
WORKERS := vmm/vcpu_worker vmm/migration_worker devices/virtio/worker
ENTRIES := main.ts $(WORKERS:=.ts)
$(JS)/vmm/main.js: $(TS_SOURCES) deno.json | deno
	$(DENO) bundle --quiet --platform deno --external dbus-next -o $(JS)/vmm/main.js main.ts
	for e in $(WORKERS); do $(DENO) bundle --quiet --platform deno -o $(JS)/$$e.js $$e.ts || exit 1; done

# The launcher: a small script that runs the bundled main with the checkout's Deno and shim. Module cache
# (DENO_DIR) is filled here so the first run (and the lab, which carries the cache) compiles nothing;
# the sources are cached too, for tests and `deno run main.ts`.
$(BUILD)/dvmm: $(SHIM) $(JS)/vmm/main.js $(TS_SOURCES) deno.json | deno
	mkdir -p $(BUILD)
	$(DENO) cache $(ENTRIES)
	$(DENO) cache --config deno.json $(JS)/vmm/main.js $(WORKERS:%=$(JS)/%.js)
	printf '%s\n' '#!/bin/sh' \
	  'here=$$(cd "$$(dirname "$$0")/.." && pwd)' \
	  ': "$${DENO_DIR:=$$here/build/deno_dir}"; export DENO_DIR' \
	  ': "$${DVMM_SHIM:=$$here/build/libkvmshim.so}"; export DVMM_SHIM' \
	  'DENO_NO_UPDATE_CHECK=1; export DENO_NO_UPDATE_CHECK' \
	  'deno=$$(command -v deno || echo "$$here/.tools/deno")' \
	  '[ -x "$$deno" ] || deno="$$here/.tools/deno"' \
	  'exec "$$deno" run --allow-all --quiet --no-prompt --config "$$here/deno.json" "$$here/build/js/vmm/main.js" "$$@"' > $@
	chmod +x $@

check: | deno
	$(DENO) check main.ts $$(find tests -name '*.ts')

fmt: | deno
	$(DENO) fmt

lint: | deno
	$(DENO) lint

# Tools the tests use besides the lab's (the lab scripts install theirs): curl for the seed's curl
# examples, iasl to disassemble the ACPI tables, dbus-daemon and dbus-send for the D-Bus API, the
# Debian cloud kernel for the loader tests.
test-deps:
	@want=""; \
	command -v curl >/dev/null || want="$$want curl"; \
	command -v iasl >/dev/null || want="$$want acpica-tools"; \
	{ command -v dbus-daemon >/dev/null && command -v dbus-send >/dev/null; } || want="$$want dbus"; \
	ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || want="$$want linux-image-cloud-amd64"; \
	if [ -n "$$want" ]; then \
	  echo "installing$$want (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$want; \
	fi

test: all test-deps lab-images
	tests/run

# The in-tree fuzzers, long runs (make test runs a bounded number of episodes of each): counts printed.
FUZZ_EPISODES ?= 100000
FUZZ_API ?= 20000
FUZZ_CONFIG ?= 1500000
FUZZ_LOADER ?= 400000
fuzz: all
	DVMM_FUZZ_EPISODES=$(FUZZ_EPISODES) DVMM_FUZZ_API=$(FUZZ_API) DVMM_FUZZ_CONFIG=$(FUZZ_CONFIG) \
	  DVMM_FUZZ_LOADER=$(FUZZ_LOADER) tests/run tests/fuzz_virtqueue_test.ts tests/fuzz_api_test.ts \
	  tests/fuzz_config_test.ts tests/fuzz_loader_test.ts

# Boots the default guest (Debian cloud kernel + busybox initramfs) to a shell line and powers it off:
# directly when this host's KVM runs stock kernels (VT-x/AMD-V), otherwise inside the KVM lab.
DEMO_SCRIPT := echo; echo "Hello from a dvmm guest: $$(uname -sr), $$(nproc) vCPUs, $$(grep MemTotal /proc/meminfo)"; echo "guest$$ ls /"; ls /; echo "guest$$ poweroff"
DEMO_ARGS = --cpus boot=2 --memory size=512M --serial tty --console off
demo: all lab-images
	@if grep -qw -e vmx -e svm /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ] && [ -w /dev/kvm ]; then \
	  echo "== dvmm: booting the default guest on this host's KVM"; \
	  build/dvmm --kernel build/lab/guest/vmlinuz --initramfs build/lab/guest/initramfs.gz \
	    --cmdline "console=ttyS0 panic=-1 $$(tests/lab/guest-arg '$(DEMO_SCRIPT)')" $(DEMO_ARGS); \
	else \
	  echo "== this host's KVM cannot run a stock kernel (no vmx/svm, or PVM): booting in the KVM lab"; \
	  $(LAB) --timeout 600 -- 'dvmm --kernel /lab/vmlinuz --initramfs /lab/initramfs.gz \
	    --cmdline "console=ttyS0 panic=-1 $$(guest-arg '"'"'$(DEMO_SCRIPT)'"'"')" $(DEMO_ARGS); echo "== dvmm exited with status $$?"'; \
	fi

# One self-contained binary (shim embedded). Needs Deno's denort, which this network cannot download:
# point DENORT_BIN at a denort binary where it can be had.
dist: all
	@[ -n "$${DENORT_BIN:-}" ] || { echo "make dist needs DENORT_BIN=/path/to/denort (deno compile's runtime)"; exit 1; }
	DENORT_BIN=$(DENORT_BIN) $(DENO) compile --allow-all --no-prompt --include $(SHIM) \
	  $(WORKERS:%=--include %.ts) -o $(BUILD)/dvmm-dist main.ts

clean:
	rm -rf $(BUILD)
