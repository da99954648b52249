# KVM lab (see tests/lab/README.md). Included from the top-level Makefile.
#   $(LAB) [--smp N] [--mem MiB] [--add DIR]... [--timeout SEC] -- COMMAND...
#   make lab-images    build/refresh the cached lab images under build/lab/ (also done by every $(LAB) run)
#   make lab-selftest  prove the lab works (/dev/kvm, Deno FFI, QEMU -accel kvm boots the default guest)
LAB := tests/lab/run

.PHONY: lab-images lab-selftest

lab-images: | deno
	tests/lab/images.sh

lab-selftest: lab-images $(SHIM)
	tests/lab/lab_selftest.sh
