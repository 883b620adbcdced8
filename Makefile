# `make demo` runs the main job (train + sample + score a DDT on the embedded MNIST digits);
# `make test` runs the test suite. Both create .venv on first use with the exact versions in
# constraints.txt: the runtime (jax, flax, optax, orbax, grain, clu + tensorflow-cpu, ...) for the
# demo, plus torch CPU, diffusers and transformers for the tests' reference checks.
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test
DEMO_DIR ?= runs/mnist
DEMO_TRAIN_FLAGS ?=
DEMO_SAMPLE_FLAGS ?= --num_samples=1000 --batch_size=200
# Two CPU "devices" = data parallelism over two cores: 2.2 vs 1.7 steps/s for one device (whose
# small matmuls keep one core busy). The demo's batch (32) divides by 1, 2, 4, 8 or 16.
DEMO_CPU_DEVICES ?= 2

.PHONY: install test demo clean-demo
install: $(RUNTIME)

$(RUNTIME): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e .
	touch $@

$(TESTDEPS): $(RUNTIME)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# libtpu goes to its own folder, not into the venv: installed there, every JAX process would try to
# start a TPU backend. Only the TPU-compile test puts it on PYTHONPATH.
LIBTPU := $(VENV)/libtpu/.installed
$(LIBTPU): $(RUNTIME)
	$(VENV)/bin/pip install --quiet --no-deps --target $(VENV)/libtpu "libtpu==0.0.42.*"
	touch $@

test: $(TESTDEPS) $(LIBTPU)
	$(PY) -m pytest tests

# Each stage resumes: shards are skipped when complete, training continues from its last
# checkpoint, sampling from its finished batches. DEMO_DIR=/elsewhere make demo to move it.
demo: export XLA_FLAGS = --xla_force_host_platform_device_count=$(DEMO_CPU_DEVICES)
demo: $(RUNTIME)
	$(PY) -m input_pipeline.mnist --output $(DEMO_DIR)/data
	$(PY) train.py --config=configs/mnist.py --workdir=$(DEMO_DIR) --config.data.path=$(DEMO_DIR)/data \
		$(DEMO_TRAIN_FLAGS)
	$(PY) sample.py --workdir=$(DEMO_DIR) --output=$(DEMO_DIR)/eval_samples --balanced --config.num_steps=25 \
		--config.guidance=3.0 --config.guidance_interval_min=0.0 --config.last_step=0.04 \
		--config.state_refresh_rate=2 $(DEMO_SAMPLE_FLAGS)
	$(PY) -m ddt_jax.evaluation.mnist_eval $(DEMO_DIR)/eval_samples/samples.npz --output $(DEMO_DIR)/metrics.json

clean-demo:
	rm -rf $(DEMO_DIR)
