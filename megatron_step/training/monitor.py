"""What a run tells its user: the startup banner, TensorBoard scalars, the progress bar.

Only one rank writes (the first DP/TP rank of the last pipeline stage, where the loss lives);
the others get a no-op monitor.

Scalar names are one slash-namespaced scheme, lower case, no spaces (`train/lm_loss`,
`rl/reward_mean`, `moe/load_max/layer_03`; the list is docs/metrics.md); `Monitor.scalars` refuses
any other name, so a new metric cannot drift from the scheme.
"""

from __future__ import annotations

import json
import os
import platform as pyplatform
import re
import subprocess
import sys

import torch
from megatron.core import parallel_state as ps

METRIC_NAME = re.compile(r"[a-z0-9_]+(/[a-z0-9_]+)+")


def is_logging_rank() -> bool:
    return (
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_data_parallel_rank() == 0
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )


def git_hash() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def versions() -> dict:
    # __shortversion__: megatron-core's __version__ appends the git hash of the repo it sits in
    from megatron.core.package_info import __shortversion__ as mcore_version

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "megatron-core": mcore_version,
        "machine": pyplatform.machine(),
    }
    for name in ("transformer_engine", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def run_banner(env, config: dict, **extra) -> dict:
    """What a run records about itself at start (git hash, versions, layout, the resolved config)."""
    return {
        "git": git_hash(),
        "versions": versions(),
        "world_size": env.world_size,
        "layout": env.parallel.describe(env.world_size),
        "device": str(env.device),
        "cpu_patched": env.cpu_patched,
        **extra,
        "config": config,
    }


class Monitor:
    """TensorBoard + tqdm + run_info.json, on the logging rank only."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        # a resumed run: TensorBoard drops what an earlier process logged past its checkpoint (steps it
        # logged after the save it resumes from), so every step keeps one value
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stdout,
        )

    def banner(self, info: dict) -> None:
        if not self.enabled:
            return
        text = json.dumps(info, indent=2, default=str)
        short = {
            k: info[k] for k in ("git", "versions", "layout", "device", "resumed_from_step") if k in info
        }
        print(f"megatron-step run {json.dumps(short, default=str)}", flush=True)
        print(f"resolved config: {os.path.join(self.run_dir, 'run_info.json')}", flush=True)
        with open(os.path.join(self.run_dir, "run_info.json"), "w") as f:
            f.write(text)
        self.writer.add_text("run_info", f"```\n{text}\n```", 0)

    def scalars(self, step: int, values: dict) -> None:
        bad = [k for k in values if not METRIC_NAME.fullmatch(k)]
        if bad:
            raise ValueError(f"metric name {bad[0]!r} is outside the scheme section/name (docs/metrics.md)")
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def progress(self, n: int, postfix: dict | None = None) -> None:
        if self.enabled:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.flush()
            self.writer.close()
