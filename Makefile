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

.PHONY: all deno test demo dist clean fmt lint check lab

all: $(BUILD)/dvmm

$(TOOLS)/deno:
	@command -v npm >/dev/null || { echo "installing npm (apt-get)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }
	mkdir -p $(TOOLS)/npm
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)/npm deno@$(DENO_VERSION)
	ln -sf $(TOOLS)/npm/node_modules/@deno/linux-x64-glibc/deno $(TOOLS)/deno
	$(TOOLS)/deno --version

deno: $(DENO)

$(SHIM): libkvmshim/kvmshim.c libkvmshim/kvmshim.h
	@command -v $(CC) >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; }
	mkdir -p $(BUILD)
	$(CC) $(CFLAGS) -shared -o $@ libkvmshim/kvmshim.c -lpthread

# The launcher: a small script that runs main.ts with the checkout's Deno and shim. Module cache
# (DENO_DIR) is filled here so the first run (and the lab, which carries the cache) compiles nothing.
$(BUILD)/dvmm: $(SHIM) $(TS_SOURCES) deno.json | deno
	mkdir -p $(BUILD)
	$(DENO) cache main.ts
	printf '%s\n' '#!/bin/sh' \
	  'here=$$(cd "$$(dirname "$$0")/.." && pwd)' \
	  ': "$${DENO_DIR:=$$here/build/deno_dir}"; export DENO_DIR' \
	  ': "$${DVMM_SHIM:=$$here/build/libkvmshim.so}"; export DVMM_SHIM' \
	  'deno=$$(command -v deno || echo "$$here/.tools/deno")' \
	  '[ -x "$$deno" ] || deno="$$here/.tools/deno"' \
	  'exec "$$deno" run --allow-all --quiet --no-prompt "$$here/main.ts" "$$@"' > $@
	chmod +x $@

check: | deno
	$(DENO) check main.ts $$(find tests -name '*.ts')

fmt: | deno
	$(DENO) fmt

lint: | deno
	$(DENO) lint

test: all
	tests/run

clean:
	rm -rf $(BUILD)
