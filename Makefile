# The README's two commands are `make demo` and `make test`. Each installs what it needs on first use, from the
# hash-pinned locks in locks/ (made by `make lock`), and builds only what changed.
#
# Interpreters: python3.11 for the tools and the CLI, python3.13 for the deployed runtime; found on PATH or under
# pyenv, whatever the patch release (tools/bin/find-python).
SHELL := /bin/bash
PY311 := $(shell tools/bin/find-python 3.11 2>/dev/null)
PY313 := $(shell tools/bin/find-python 3.13 2>/dev/null)
VENV := .venv
BIN := $(VENV)/bin
VENV313 := .venv-3.13
HOST_PLATFORM := manylinux2014_$(shell uname -m)
# SAM builds for python3.13 with the functions' Makefiles: it needs python3.13 first on the PATH.
SAM := SAM_CLI_TELEMETRY=0 PATH="$(dir $(PY313)):$$PATH" $(BIN)/sam
PIP_LOCKED := pip install --quiet --disable-pip-version-check --require-hashes --no-deps
PIP_EDITABLE := pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
# Some machines' pip configuration names local indexes that do not exist; pip warns once a package, to no purpose.
PIP_NOISE := 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# What a build reads: a change to any of these builds again; nothing else does.
BUILD_INPUTS := template.yaml $(shell find layers functions -type f -not -path '*/__pycache__/*' -not -name '*.pyc')
say = @printf '\033[1m==> %s\033[0m\n' $(1)

.PHONY: demo deploy stack test test-fast test-latest lint typecheck template bench load load-limited load-unlimited load-busy build build-host lock clean

# -- environments, each from its lock --------------------------------------------------------------------------------

# $(1) the venv, $(2) its interpreter, $(3) the lock: the venv made once, the lock installed, then the project itself.
define install-locked
	@test -x $(1)/bin/python || $(2) -m venv $(1)
	@$(1)/bin/$(PIP_LOCKED) -r $(3) $(PIP_NOISE)
	@$(1)/bin/$(PIP_EDITABLE) $(PIP_NOISE)
endef

need-py311 = @test -n "$(PY311)" || { tools/bin/find-python 3.11; exit 1; }
need-py313 = @test -n "$(PY313)" || { tools/bin/find-python 3.13; exit 1; }

# The demo's tools only: the local stack (moto, the emulator's Pillow, SAM's translator), the CLI and `sam build`.
$(BIN)/.demo-installed: locks/demo-py3.11.txt pyproject.toml
	$(need-py311)
	$(call say,"installing the demo's tools into $(VENV) from $< (first time only; about a minute)")
	$(call install-locked,$(VENV),$(PY311),$<)
	@touch $@

# Everything a developer runs: the demo's tools, the tests, ruff, mypy, cfn-lint.
$(BIN)/.dev-installed: locks/dev-py3.11.txt pyproject.toml
	$(need-py311)
	$(call say,"installing the development tools into $(VENV) from $< (first time only; about two minutes)")
	$(call install-locked,$(VENV),$(PY311),$<)
	@touch $@ $(BIN)/.demo-installed

# The tests again on python3.13, the runtime the template deploys (only what the tests need).
$(VENV313)/.installed: locks/test-py3.13.txt pyproject.toml
	$(need-py313)
	$(call say,"installing the test tools into $(VENV313) from $< (first time only; about a minute)")
	$(call install-locked,$(VENV313),$(PY313),$<)
	@touch $@

# -- the two commands -------------------------------------------------------------------------------------------------

demo: $(BIN)/.demo-installed .aws-sam/build-host/.built
	@$(BIN)/python -m kontext_s3_tools.demo

# Everything CI runs: checks, both builds, the whole suite on python3.13 (the runtime the template deploys; the
# functions run on it from the build whatever runs the harness), and on 3.11 what runs on the user's own Python:
# the CLI and the pure modules. The suite runs in two processes, a file each at a time (its tests mostly wait on
# sockets; a file's fixtures, such as the e2e package's local stack, stay within one process).
test: lint typecheck template build .aws-sam/build-host/.built $(VENV313)/.installed
	$(call say,"the whole suite on python3.13")
	$(VENV313)/bin/pytest -n 2 --dist loadfile --durations=15
	$(call say,"the CLI and the pure modules on python3.11")
	$(BIN)/pytest tests/unit tests/integration/test_cli.py

# The fast tier, for the edit-test loop: the checks and the pure tests (no sockets, no local stack).
# The tiers, by folder: unit (pure), integration and adversarial (the real handlers over sockets against moto and
# the fal emulator), e2e (the local stack from the built artifact). `make test` runs them all.
test-fast: $(BIN)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q tests/unit

# Not part of CI: the newest releases the ranges in pyproject.toml allow, in a venv of their own under out/, built
# with them and run through the demo and the end-to-end pipeline tests. An upstream release that breaks the stack is
# found here, by one command, before `make lock` takes it in or a newcomer meets it.
LATEST := out/venv-latest
test-latest:
	$(need-py311)
	$(need-py313)
	$(call say,"installing the newest releases the ranges allow into $(LATEST)")
	@rm -rf $(LATEST) out/build-latest
	@$(PY311) -m venv $(LATEST)
	@$(LATEST)/bin/pip install --quiet --disable-pip-version-check --upgrade pip $(PIP_NOISE)
	@$(LATEST)/bin/pip install --quiet --disable-pip-version-check --upgrade '.[test,build]' $(PIP_NOISE)
	@$(LATEST)/bin/pip freeze --exclude kontext-s3 > out/latest-versions.txt
	@echo "installed (out/latest-versions.txt): $$(grep -iE '^(moto|boto3|aws-sam-cli|aws-sam-translator|pytest|pillow)==' out/latest-versions.txt | tr '\n' ' ')"
	@echo "changed from locks/dev-py3.11.txt: $$(comm -13 <(grep -oiE '^[a-z0-9_.-]+==[^ ]+' locks/dev-py3.11.txt | tr A-Z_ a-z- | sort) \
		<(tr A-Z_ a-z- < out/latest-versions.txt | sort) | tr '\n' ' ')"
	$(call say,"building with them")
	@LAYER_PLATFORM=$(HOST_PLATFORM) SAM_CLI_TELEMETRY=0 PATH="$(dir $(PY313)):$$PATH" $(LATEST)/bin/sam build --build-dir out/build-latest > out/build-latest.log 2>&1 \
		|| { tail -30 out/build-latest.log; exit 1; }
	$(call say,"the demo and the end-to-end pipeline tests")
	KONTEXT_BUILD_DIR=out/build-latest PYTHONPATH=layers/shared:tools $(LATEST)/bin/python -m kontext_s3_tools.demo
	KONTEXT_BUILD_DIR=out/build-latest PYTHONPATH=layers/shared:tools:. $(LATEST)/bin/pytest -p no:cacheprovider tests/e2e/test_pipeline.py

# -- checks -----------------------------------------------------------------------------------------------------------

lint: $(BIN)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/.dev-installed
	$(BIN)/mypy

template: $(BIN)/.dev-installed
	$(BIN)/cfn-lint template.yaml
	SAM_CLI_TELEMETRY=0 AWS_DEFAULT_REGION=us-east-1 $(BIN)/sam validate --lint

# -- builds: each runs again only when what it reads changed -----------------------------------------------------------

# The deployable artifact: sam build, for python3.13 on arm64 (layers/shared/Makefile, functions/Makefile).
build: .aws-sam/build/.built
.aws-sam/build/.built: $(BIN)/.demo-installed $(BUILD_INPUTS)
	$(need-py313)
	$(call say,"building the deployable artifact (arm64; log: out/build.log)")
	@mkdir -p out
	@$(SAM) build > out/build.log 2>&1 || { tail -30 out/build.log; exit 1; }
	@touch $@

# The same layout, built the same way, for this machine's architecture: what the local stack runs. Its log is kept
# apart, and SAM's "sam deploy" hint with it: this artifact is for this machine, never for Lambda.
build-host: .aws-sam/build-host/.built
.aws-sam/build-host/.built: $(BIN)/.demo-installed $(BUILD_INPUTS)
	$(need-py313)
	$(call say,"building the functions for this machine (log: out/build-host.log)")
	@mkdir -p out
	@LAYER_PLATFORM=$(HOST_PLATFORM) $(SAM) build --build-dir .aws-sam/build-host > out/build-host.log 2>&1 \
		|| { tail -30 out/build-host.log; exit 1; }
	@touch $@

# A first deploy: the four questions it must decide (stack, region, daily image budget, fal user id), then sam deploy
# of the artifact above, every other parameter at the template's default.
deploy: .aws-sam/build/.built
	$(BIN)/python -m kontext_s3_tools.first_deploy --sam "$(BIN)/sam"

# -- measurements (results under out/) ---------------------------------------------------------------------------------

stack: $(BIN)/.demo-installed .aws-sam/build-host/.built
	$(BIN)/python -m kontext_s3_tools.stack

bench: $(BIN)/.dev-installed .aws-sam/build-host/.built
	$(BIN)/python -m benchmarks.run

load: $(BIN)/.demo-installed .aws-sam/build-host/.built
	$(BIN)/python -m kontext_s3_tools.load --uploads 500

# Admission under fal's limit: 2,000 uploads, fal running 4 at once, 60 s presigned URLs.
LIMITED := --uploads 2000 --fal-concurrency 4 --processing-ms 100 --presign-seconds 60
load-limited: $(BIN)/.demo-installed .aws-sam/build-host/.built
	$(BIN)/python -m kontext_s3_tools.load --name load-limited $(LIMITED) --max-jobs-at-fal 6

# The same world without admission: what MaxJobsAtFal prevents.
load-unlimited: $(BIN)/.demo-installed .aws-sam/build-host/.built
	$(BIN)/python -m kontext_s3_tools.load --name load-unlimited $(LIMITED) --max-jobs-at-fal 0

# Closer to the model's seconds per edit: are fal's slots kept busy while uploads wait?
load-busy: $(BIN)/.demo-installed .aws-sam/build-host/.built
	$(BIN)/python -m kontext_s3_tools.load --name load-busy --uploads 200 --fal-concurrency 4 --processing-ms 1000 --presign-seconds 60 --max-jobs-at-fal 6

# -- locks: a deliberate upgrade, reviewed like code -------------------------------------------------------------------

# Resolves every lock anew from the ranges in pyproject.toml (and the layer's pins in requirements.in): the newest
# releases the index serves today. Run `make test-latest` first, then review the diff of locks/ like code.
# The tools' locks are universal (any OS and architecture, each file's hash); the demo's and python3.13's take
# the development lock's versions, so that every environment agrees.
UV_COMPILE := PIP_CONFIG_FILE=/dev/null $(BIN)/uv pip compile --quiet --generate-hashes --no-header --index-url https://pypi.org/simple
LOCK_HEADER := 1i \# Generated by `make lock` from pyproject.toml and locks/bootstrap.in: every package, pinned, with the hashes of\n\# all its files. Installed with pip --require-hashes --no-deps. Do not edit by hand; upgrade with `make lock`.
lock: $(BIN)/.dev-installed
	$(UV_COMPILE) --universal --python-version 3.11 --extra dev -o locks/dev-py3.11.txt pyproject.toml locks/bootstrap.in
	$(UV_COMPILE) --universal --python-version 3.11 --extra local --extra build -c locks/dev-py3.11.txt \
		-o locks/demo-py3.11.txt pyproject.toml locks/bootstrap.in
	$(UV_COMPILE) --universal --python-version 3.13 --extra test -c locks/dev-py3.11.txt \
		-o locks/test-py3.13.txt pyproject.toml locks/bootstrap.in
	sed -i '$(LOCK_HEADER)' locks/dev-py3.11.txt locks/demo-py3.11.txt locks/test-py3.13.txt
	$(UV_COMPILE) --python-platform aarch64-manylinux_2_28 --python-version 3.13 \
		-o layers/shared/requirements.txt layers/shared/requirements.in
	sed -i '1i # Generated by `make lock` from requirements.in: every package, pinned, with the hashes of all its files\n# (so the same lock installs for arm64 on Lambda and for the host in tests). Do not edit by hand.' layers/shared/requirements.txt

clean:
	rm -rf $(VENV) $(VENV313) .aws-sam out .pytest_cache .mypy_cache .ruff_cache
