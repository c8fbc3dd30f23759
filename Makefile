# duet: top-level build.
#
#   make              build libduet, the programs, tests and benchmarks (CPU; CUDA too when nvcc is found)
#   make test         build and run every test suite (exits non-zero on any failure)
#   make asan         the same tests built with AddressSanitizer + UBSan (in build/asan)
#   make bench        run the benchmarks and print their tables (bench/RESULTS.md records them)
#   make install      install programs and headers under $(DESTDIR)$(PREFIX)
#   make clean        remove build/
#
# Knobs: CC, OPT, CFLAGS, CUDA=0|1 (default: 1 when nvcc is found), NVCC, CUDA_HOME,
#        PREFIX, DESTDIR, BUILD (output folder), ASAN=1.

PREFIX    ?= /usr/local
DESTDIR   ?=
BUILD     ?= build
CC        ?= cc
OPT       ?= -O2
CFLAGS    ?= $(OPT) -g
LDFLAGS   ?=
CUDA_HOME ?= /usr/local/cuda
NVCC      ?= $(shell command -v nvcc 2>/dev/null || { test -x $(CUDA_HOME)/bin/nvcc && echo $(CUDA_HOME)/bin/nvcc; })
ifeq ($(origin CUDA),undefined)
  CUDA := $(if $(NVCC),1,0)
endif
ASAN      ?= 0
DEFAULT_MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

PKGS      := libpcre2-8 libzmq jansson inih libsystemd libcrypto ompi-c
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null)

DUET_CFLAGS := -std=c11 -Wall -Wextra -Werror -D_GNU_SOURCE -pthread -I. -MMD -MP $(PKG_CFLAGS)
DUET_LIBS   := $(PKG_LIBS) -lm -pthread
AVX2_FLAGS  := -mavx2 -mfma -mf16c
TEST_LIBS   := -lcmocka

ifeq ($(ASAN),1)
  SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  DUET_CFLAGS += $(SAN)
  LDFLAGS     += $(SAN)
endif

# ---- sources ---------------------------------------------------------------
# Every .c under the module folders is library code, except NAME_main.c files,
# which hold a program's main(). *_avx2.c files are compiled with AVX2/FMA and
# only entered after a run-time CPU check.
MODULE_DIRS := kv comm kernels worker daemon client
LIB_SRC     := $(filter-out %_main.c,$(foreach d,$(MODULE_DIRS),$(wildcard $(d)/*.c)))
LIB_OBJ     := $(LIB_SRC:%.c=$(BUILD)/%.o)
LIB         := $(BUILD)/libduet.a

# Test and benchmark support code (e.g. the random GGUF writer), shared by both.
SUPPORT_SRC := $(wildcard tests/support/*.c)
SUPPORT_OBJ := $(SUPPORT_SRC:%.c=$(BUILD)/%.o)

TEST_SRC    := $(wildcard tests/test_*.c)
TEST_BIN    := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC   := $(wildcard bench/bench_*.c)
BENCH_BIN   := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
# Developer tools used by tests, benchmarks and scripts (e.g. the random model writer).
TOOL_SRC    := $(wildcard tests/tools/*.c)
TOOL_BIN    := $(TOOL_SRC:tests/tools/%.c=$(BUILD)/tools/%)

# Programs: name:main-file, built when the main file exists.
PROG_DEFS   := duet:client/duet_main.c duetd:daemon/duetd_main.c duet-worker:worker/worker_main.c
PROG_DEFS   := $(foreach p,$(PROG_DEFS),$(if $(wildcard $(word 2,$(subst :, ,$(p)))),$(p)))
PROGS       := $(foreach p,$(PROG_DEFS),$(BUILD)/bin/$(word 1,$(subst :, ,$(p))))

# CUDA: every kernels/*.cu goes into libduet_cuda.a, which programs, tests and benchmarks
# link ahead of libduet.a (it calls into it), with the CUDA runtime and cuBLAS. CI has nvcc
# and no GPU: everything compiles and links there, and GPU tests skip with a reason.
# With CUDA=0, kernels/cuda_stub.c answers every CUDA call with "built without CUDA".
CU_SRC      := $(wildcard kernels/*.cu)
ifeq ($(CUDA),1)
  ifeq ($(NVCC),)
    $(error CUDA=1 but no nvcc found; set NVCC or CUDA_HOME)
  endif
  CU_OBJ      := $(CU_SRC:%.cu=$(BUILD)/%.cu.o)
  CUDA_LIB    := $(if $(CU_OBJ),$(BUILD)/libduet_cuda.a)
  NVCC_ARCH   ?= -arch=sm_90
  NVCC_FLAGS  ?= -O2 -g -lineinfo -std=c++17 $(NVCC_ARCH) -Werror all-warnings \
                 -Xcompiler -Wall,-Wextra,-Werror -I. -DDUET_CUDA=1 -MMD -MP
  DUET_CFLAGS += -DDUET_CUDA=1 -I$(CUDA_HOME)/include
  DUET_LIBS   += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcublasLt -lcudart -lstdc++
endif
LINK_LIBS := $(CUDA_LIB) $(LIB)
# GPU suites (tests/test_gpu_*.c): part of `make test` too, where they skip without a GPU.
GPU_TEST_BIN := $(filter $(BUILD)/tests/test_gpu_%,$(TEST_BIN))

# ---- rules -----------------------------------------------------------------
.PHONY: all lib test asan bench install uninstall clean model golden setup check-deps test-gpu bench-gpu
# Keep the objects of tests, tools and benchmarks (intermediates of pattern rules).
.SECONDARY:
.DEFAULT_GOAL := all

all: check-deps $(LIB) $(CUDA_LIB) $(PROGS) $(TEST_BIN) $(BENCH_BIN) $(TOOL_BIN)
lib: $(LIB)

check-deps:
	@pkg-config --exists $(PKGS) || { echo "missing libraries: run 'scripts/setup' first (needs: $(PKGS))" >&2; exit 1; }

$(BUILD)/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(DUET_CFLAGS) $(if $(filter %_avx2.c,$<),$(AVX2_FLAGS)) -c $< -o $@

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@mkdir -p $(@D)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/libduet_cuda.a: $(CU_OBJ)
	@mkdir -p $(@D)
	@rm -f $@
	ar rcs $@ $^

define prog_rule
$(BUILD)/bin/$(1): $(BUILD)/$(2:.c=.o) $(LINK_LIBS)
	@mkdir -p $$(@D)
	$$(CC) $$(CFLAGS) $$(LDFLAGS) -o $$@ $$< $(LINK_LIBS) $$(DUET_LIBS)
endef
$(foreach p,$(PROG_DEFS),$(eval $(call prog_rule,$(word 1,$(subst :, ,$(p))),$(word 2,$(subst :, ,$(p))))))

$(BUILD)/tests/%: $(BUILD)/tests/%.o $(SUPPORT_OBJ) $(LINK_LIBS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(SUPPORT_OBJ) $(LINK_LIBS) $(DUET_LIBS) $(TEST_LIBS)

$(BUILD)/bench/%: $(BUILD)/bench/%.o $(SUPPORT_OBJ) $(LINK_LIBS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(SUPPORT_OBJ) $(LINK_LIBS) $(DUET_LIBS)

$(BUILD)/tools/%: $(BUILD)/tests/tools/%.o $(SUPPORT_OBJ) $(LINK_LIBS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(SUPPORT_OBJ) $(LINK_LIBS) $(DUET_LIBS)

test: all
	@BUILD=$(BUILD) scripts/run-tests $(TEST_BIN)

asan:
	$(MAKE) BUILD=$(BUILD)/asan ASAN=1 CUDA=0 OPT=-O1 test

# The GPU suites on a machine with an NVIDIA GPU (a missing GPU fails here instead of
# skipping): every kernel against the CPU backend, and GPU greedy tokens against the CPU's.
test-gpu: check-deps $(CUDA_LIB) $(GPU_TEST_BIN)
	$(if $(filter 1,$(CUDA)),,$(error make test-gpu needs CUDA=1 (nvcc and the CUDA toolkit)))
	@DUET_REQUIRE_GPU=1 BUILD=$(BUILD) scripts/run-tests $(GPU_TEST_BIN)

# Decode and prefill on the GPU (a ~1B random Llama) beside PyTorch on the same shapes.
bench-gpu: check-deps $(CUDA_LIB) $(BUILD)/bench/bench_gpu
	$(if $(filter 1,$(CUDA)),,$(error make bench-gpu needs CUDA=1 (nvcc and the CUDA toolkit)))
	$(BUILD)/bench/bench_gpu --run --json $(BUILD)/bench-gpu.json
	python3 scripts/bench-gpu-torch.py --duet $(BUILD)/bench-gpu.json

# The C micro-benchmarks, the engine against llama.cpp (installed by setup --bench), and
# the service (duetd + duet-worker) under N concurrent clients.
bench: all $(DEFAULT_MODEL)
	scripts/setup --bench
	@BUILD=$(BUILD) scripts/run-bench $(filter-out %/bench_model %/bench_serve,$(BENCH_BIN))
	@BUILD=$(BUILD) scripts/bench-model
	@BUILD=$(BUILD) scripts/bench-serve
	@BUILD=$(BUILD) scripts/bench-disagg

setup:
	scripts/setup

model: $(DEFAULT_MODEL)
$(DEFAULT_MODEL):
	scripts/fetch-model

# Re-record the reference outputs of the independent implementation (llama.cpp).
golden: all $(DEFAULT_MODEL)
	scripts/setup --bench
	.venv/bin/python scripts/golden.py

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include/duet/kv
	$(if $(PROGS),install -m 755 $(PROGS) $(DESTDIR)$(PREFIX)/bin/)
	install -m 644 $(LIB) $(DESTDIR)$(PREFIX)/lib/
	install -m 644 kv/*.h $(DESTDIR)$(PREFIX)/include/duet/kv/
	install -m 644 client/libduet.h $(DESTDIR)$(PREFIX)/include/duet/
	install -d $(DESTDIR)$(PREFIX)/lib/systemd/system $(DESTDIR)$(PREFIX)/share/doc/duet
	install -m 644 systemd/duetd.service systemd/duet-worker@.service $(DESTDIR)$(PREFIX)/lib/systemd/system/
	install -m 644 conf/duet.conf docs/PROTOCOL.md $(DESTDIR)$(PREFIX)/share/doc/duet/

uninstall:
	rm -f $(foreach p,$(PROGS),$(DESTDIR)$(PREFIX)/bin/$(notdir $(p))) $(DESTDIR)$(PREFIX)/lib/libduet.a
	rm -rf $(DESTDIR)$(PREFIX)/include/duet $(DESTDIR)$(PREFIX)/share/doc/duet
	rm -f $(DESTDIR)$(PREFIX)/lib/systemd/system/duetd.service $(DESTDIR)$(PREFIX)/lib/systemd/system/duet-worker@.service

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
