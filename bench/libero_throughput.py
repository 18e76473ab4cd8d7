"""LIBERO's throughput through flywheel's adapter (issue 36), per core: steps per second of one environment stepped
by ``actors/libero.py`` (a process of LIBERO's venv, over a pipe), against the same task stepped directly in that
venv, measured in the same run (the ratio is what the adapter costs). Also where a direct step's time goes: the
physics (robosuite's 25 MuJoCo substeps a step at 20 Hz) against rendering the two cameras; the cost of rendering
with shadows, reflections and multisampling (LIBERO's own look, ``env.options={shadows: true}``); and the agent-view
camera alone (``env.sensors=[overhead]``).

    make libero-venv && PYTHONPATH=. .venv/bin/python bench/libero_throughput.py [STEPS]    (~3 min on 2 cores)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from actors.libero import ROOT, LiberoAdapter, libero_python
from bench.common import write_result

TASK = "libero_spatial/0"

# Run in LIBERO's venv: the same task, stepped without the pipe; then its physics alone.
DIRECT = """
import json, sys, time
import numpy as np
from actors.libero_server import Task
steps, size = int(sys.argv[1]), int(sys.argv[2])
task = Task("libero_spatial", 0, size, shadows=sys.argv[3] == "1")  # both cameras
rng = np.random.default_rng(0)
task.reset(0, 0)
started = time.perf_counter()
for _ in range(steps):
    task.step(rng.uniform(-1, 1, 7))
step_s = (time.perf_counter() - started) / steps
sim = task.env.env.sim
substeps = int(task.env.env.control_timestep / task.env.env.model_timestep)
started = time.perf_counter()
for _ in range(steps * substeps):
    sim.step()
physics_s = (time.perf_counter() - started) / steps
started = time.perf_counter()
for _ in range(3):
    task.reset(1, 1)
reset_s = (time.perf_counter() - started) / 3
print(json.dumps({"step_s": step_s, "physics_s": physics_s, "substeps": substeps, "reset_s": reset_s}))
"""


def direct(steps: int, size: int, shadows: bool = False) -> dict:
    out = subprocess.run([str(libero_python()), "-c", DIRECT, str(steps), str(size), str(int(shadows))], cwd=ROOT,
                         capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "MUJOCO_GL": "egl", "PATH": "/usr/bin:/bin",
                                         "LIBERO_CONFIG_PATH": str(libero_python().parent.parent / "libero")})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def through_adapter(steps: int, size: int, sensors: tuple[str, ...] = ("overhead", "wrist")) -> dict:
    started = time.perf_counter()
    env = LiberoAdapter(TASK, image_size=size, max_steps=10**6, sensors=sensors)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    started = time.perf_counter()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, 7))
    step_s = (time.perf_counter() - started) / steps
    env.close()
    return {"step_s": step_s, "build_s": build_s}


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    rows = {}
    for size in (64, 128):
        rows[size] = {"direct": direct(steps, size), "adapter": through_adapter(steps, size)}
        d, a = rows[size]["direct"], rows[size]["adapter"]
        print(f"{size}x{size}: direct {1 / d['step_s']:.2f} steps/s (physics {d['physics_s'] / d['step_s']:.0%} of a "
              f"step), through the adapter {1 / a['step_s']:.2f} steps/s; reset {d['reset_s']:.2f} s, build "
              f"{a['build_s']:.1f} s")
    published = direct(steps, 64, shadows=True)
    print(f"64x64 with shadows and reflections (LIBERO's own look): direct {1 / published['step_s']:.2f} steps/s")
    one = through_adapter(steps, 64, sensors=("overhead",))
    print(f"64x64, the agent-view camera alone: through the adapter {1 / one['step_s']:.2f} steps/s")
    d, a = rows[64]["direct"], rows[64]["adapter"]
    write_result("libero_throughput", ratio=d["step_s"] / a["step_s"], target=0.9, met=d["step_s"] / a["step_s"] >= 0.9,
                 task=TASK, steps=steps, cameras=["agentview", "robot0_eye_in_hand"],
                 per_size={str(k): {"direct_steps_per_s": 1 / v["direct"]["step_s"],
                                    "adapter_steps_per_s": 1 / v["adapter"]["step_s"],
                                    "physics_share": v["direct"]["physics_s"] / v["direct"]["step_s"],
                                    "substeps": v["direct"]["substeps"], "reset_s": v["direct"]["reset_s"],
                                    "build_s": v["adapter"]["build_s"]} for k, v in rows.items()},
                 shadows_direct_steps_per_s=1 / published["step_s"],
                 one_camera_adapter_steps_per_s=1 / one["step_s"],
                 what="LIBERO libero_spatial/0, two 64x64 cameras, one core: env steps/s through the adapter (a "
                      "process of LIBERO's venv, over a pipe) / stepped directly in that venv")


if __name__ == "__main__":
    main()
