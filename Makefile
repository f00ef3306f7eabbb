# Thin wrapper over CMake. `make demo` and `make test` are the two commands of the README.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=RelWithDebInfo

.PHONY: deps configure build demo test fuzz test-threads test-sanitize format clean

deps:
	./scripts/install-deps.sh

configure: deps
	cmake -S . -B $(BUILD_DIR) $(CMAKE_FLAGS)

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

demo: build
	$(BUILD_DIR)/bin/switchyard run examples/configs/demo.toml --check \
	  --set output.path=$(BUILD_DIR)/demo_y.npy

# The suite builds with warnings as errors (users' builds keep them as warnings).
test: deps
	cmake -S . -B $(BUILD_DIR) $(CMAKE_FLAGS) -DSWITCHYARD_WERROR=ON
	cmake --build $(BUILD_DIR) -j $(JOBS)
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) --timeout 600
	@grep -h "^SKIPPED:" $(BUILD_DIR)/Testing/Temporary/LastTest.log | sort | uniq -c | \
	  sed 's/^ */make test: skipped tests (label gpu): /' || true
	$(MAKE) fuzz test-threads

# libFuzzer targets (clang; the core instrumented) for the TOML config, .npy, safetensors
# and the store protocol, each for FUZZ_SECONDS from its seed corpus in tests/fuzz/corpus.
FUZZ_SECONDS ?= 20
fuzz: deps
	./tests/fuzz/run.sh $(BUILD_DIR)-fuzz $(FUZZ_SECONDS)

# The in-process suite (ranks are threads) under ThreadSanitizer, in its own build folder.
test-threads: deps
	./tests/threads/run.sh $(BUILD_DIR)-tsan

# The same suite under AddressSanitizer and UBSan, in its own build folder.
test-sanitize: deps
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DSWITCHYARD_SANITIZE=ON -DSWITCHYARD_WERROR=ON
	cmake --build build-asan -j $(JOBS)
	cd build-asan && ctest --output-on-failure -j $(JOBS) --timeout 900

format:
	find core plugins tests examples bindings benchmarks -name '*.cpp' -o -name '*.hpp' -o -name '*.h' -o -name '*.c' -o -name '*.cu' -o -name '*.cuh' | xargs clang-format -i

clean:
	rm -rf $(BUILD_DIR) $(BUILD_DIR)-fuzz $(BUILD_DIR)-tsan build-asan
