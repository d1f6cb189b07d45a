# Front door of the build. The real build is CMake (CMakePresets.json); these targets install what
# is missing (Debian packages via apt-get), configure and build.
#   make            optimized binary at build/strata
#   make demo       build, then run `strata daemon` on its embedded default
#   make test       sanitizer build (build-asan/) and every test through CTest
#   make test-long  make test, then a long fuzzing soak
#   make bench      benchmarks side by side with QEMU's tools and fio (scripts/run-benchmarks,
#                   scripts/bench-img, scripts/bench-convert, scripts/bench-nbd,
#                   scripts/bench-fleece, scripts/bench-stream, scripts/bench-mirror)
#   make fuzz       libFuzzer targets (clang), each run briefly
#   make format     rewrite the tree with clang-format

.PHONY: all build deps deps-peers demo test test-long bench fuzz format clean

all: build

deps:
	@scripts/install-deps

deps-peers:
	@scripts/install-deps --peers

build: deps
	cmake --preset release
	cmake --build --preset release

demo: build
	./build/strata daemon

# The optimized build is compiled too: release-only warnings (-O3) must fail here, not in `make`.
test: deps-peers
	cmake --preset release
	cmake --build --preset release-all
	cmake --preset asan
	cmake --build --preset asan
	ctest --preset asan

# Soak: every test, 100 fleecing sessions under ASan, then each libFuzzer target for
# FUZZ_SECONDS (default 300 s here).
test-long: test
	cd tests && FLEECE_ROUNDS=100 STRATA_BIN=$(CURDIR)/build-asan/strata \
		/usr/bin/python3 -m pytest -q -p no:cacheprovider interop/test_fleecing_soak.py
	cmake --preset fuzz
	cmake --build --preset fuzz
	FUZZ_SECONDS=$${FUZZ_SECONDS:-300} scripts/run-fuzzers

bench: deps-peers
	cmake --preset release
	cmake --build --preset release-all
	scripts/run-benchmarks
	scripts/bench-img
	scripts/bench-convert
	scripts/bench-nbd
	scripts/bench-fleece
	scripts/bench-stream
	scripts/bench-mirror
	scripts/bench-vmstate

fuzz: deps
	cmake --preset fuzz
	cmake --build --preset fuzz
	scripts/run-fuzzers

format:
	scripts/check-format --fix

clean:
	rm -rf build build-asan build-fuzz
