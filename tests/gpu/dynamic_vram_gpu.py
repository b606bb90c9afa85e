"""GPU check: the server tests and the main job on a real NVIDIA GPU, with DynamicVRAM on and off.

    COMFYUI_PATH=<ComfyUI 0.33 tree> python tests/gpu/dynamic_vram_gpu.py [--runs 50] [--out DIR]

Needs CUDA, a ComfyUI host with DynamicVRAM (0.33: ``ModelPatcherDynamic`` + comfy-aimdo in its venv) and the
test dependencies. Runs twice, once per mode:
  dynamic   default flags: ComfyUI enables DynamicVRAM on NVIDIA (its log must say so), so the pack runs as one
            native patch per key, evaluated when each layer is cast to the GPU (nodes/dynamic.py);
  classic   --disable-dynamic-vram: the classic ModelPatcher, the pack's in-place bake.
Each mode: ``pytest tests/test_server.py`` with the server on the GPU (BATCH_LORA_SERVER_DEVICE=gpu), then the main
job (scripts/main_job.py, ``--runs`` prompts over its five cases). Asserts: both pytest runs pass; in each mode every
case has one latent hash over all its runs and Reset Adapters equals the plain path; and the two modes give the
same latent hash per case (printed as a table, with the largest difference if they do not). Writes
OUT/dynamic_vram_gpu.json. Nothing here runs on the CPU test suite (tests/gpu is collected, this file has no
test functions: it is a script).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODES = {"dynamic": "", "classic": "--disable-dynamic-vram"}


def run(cmd: list, env: dict, log: Path) -> int:
    """Run ``cmd`` in the repo with ``env`` added, output to ``log``; returns the exit code."""
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="main-job prompts per mode")
    ap.add_argument("--out", type=Path, default=ROOT / ".work" / "gpu")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("not run: no CUDA device")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results, failures = {}, []
    for mode, flags in MODES.items():
        env = {"BATCH_LORA_SERVER_DEVICE": "gpu", "BATCH_LORA_SERVER_ARGS": flags, "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        tests_rc = run([sys.executable, "-m", "pytest", "-q", "tests/test_server.py"], env,
                       args.out / f"{mode}_tests.log")
        work = args.out / f"main_job_{mode}"
        job_rc = run([sys.executable, "scripts/main_job.py", "--runs", str(args.runs), "--work", str(work),
                      "--naive-cycles", "10"], env, args.out / f"{mode}_main_job.log")
        report = json.loads((work / "drift_report.json").read_text()) if (work / "drift_report.json").is_file() else {}
        server_log = (work / "server.log").read_text(errors="replace") if (work / "server.log").is_file() else ""
        enabled = "DynamicVRAM support detected and enabled" in server_log
        results[mode] = {"tests_rc": tests_rc, "main_job_rc": job_rc, "dynamic_vram_enabled": enabled,
                         "hashes": {c["case"]: c["hash"] for c in report.get("cases", [])},
                         "seconds": round(time.perf_counter() - t0, 1)}
        if tests_rc:
            failures.append(f"{mode}: tests/test_server.py failed (see {mode}_tests.log)")
        if job_rc:
            failures.append(f"{mode}: the main job failed (see {mode}_main_job.log)")
        if enabled != (mode == "dynamic"):
            failures.append(f"{mode}: DynamicVRAM was {'on' if enabled else 'off'} in the server log")
    print(f"{'case':<30}" + "".join(f"{m:>20}" for m in MODES) + "   equal")
    for case in results["dynamic"]["hashes"]:
        hashes = [results[m]["hashes"].get(case) for m in MODES]
        print(f"{case:<30}" + "".join(f"{h or '-':>20}" for h in hashes) + f"   {len(set(hashes)) == 1}")
        if len(set(hashes)) != 1:
            failures.append(f"{case}: the latents differ between DynamicVRAM on and off")
    print(json.dumps({m: {k: v for k, v in r.items() if k != "hashes"} for m, r in results.items()}))
    (args.out / "dynamic_vram_gpu.json").write_text(json.dumps({"results": results, "failures": failures}, indent=1))
    print("FAILED:\n  " + "\n  ".join(failures) if failures else "OK: both modes pass and give the same latents")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
