"""Post-training end to end through the entry points, on files: pretraining (the demo's) -> SFT on a
chat JSONL from its checkpoint -> RL on a problems JSONL with data_source routing (two seeds) ->
held-out avg@k by RL step -> evaluation of the start and the ends -> HF export with the tokenizer and
chat template -> `transformers` greedy generation with apply_chat_template against tools/generate.py.

    python -m benchmarks.posttrain_e2e --out runs/posttrain_e2e            # ~50 min on 2 CPU cores
    python -m benchmarks.posttrain_e2e --no-pretrain ...                   # SFT from fresh weights

Pretraining is `make demo`'s run (pretrain/pretrain_step.py --config examples/tiny/tiny.yaml: the
embedded corpus, 300 steps); SFT starts from its checkpoint (train.init_from).

Files: the chat JSONL is written by the embedded chat generator (megatron_step.stages.sft.embedded_chats:
arithmetic problems with worked solutions as conversations, some with a system prompt, some two
exchanges) into <out>/chat/; the problems are examples/rl/problems_tiny.jsonl (365 arithmetic problems,
data_source "arith", scored by math-verify; 3 code problems, "mbpp", scored in the sandbox) and the
held-out examples/rl/problems_tiny_eval.jsonl (90 + 1). Each stage is its entry point run as a
process (one thread each; the two RL seeds side by side). Steps already done (their run directory holds
the final checkpoint) are not run again. Prints a Markdown table; <out>/result.json has the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = ["train.steps=300", "sft.embedded_train=4800", "model.router_bias_update_rate=0.0"]
RL = [
    "rl.task=dataset",
    "rl.data.train=[examples/rl/problems_tiny.jsonl]",
    "rl.data.eval=[examples/rl/problems_tiny_eval.jsonl]",
    "rl.data.rewards.mbpp=code",
    "model.seq_length=128",
    "optim.lr=1e-4",
    "optim.min_lr=1e-4",
    "rl.prompts_per_step=16",
    "rl.eval_problems=91",
]
EVAL = ["rl.data.rewards.mbpp=code", "model.seq_length=128"]


def _run(cmd: list[str], log: str, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    with open(log, "w") as f:  # the child holds its own descriptor
        p = subprocess.Popen([sys.executable, *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if not wait:
        return p
    if p.wait() != 0:
        sys.exit(f"failed: {' '.join(cmd)} (log {log})")
    return p


def _done(run_dir: str, step: int) -> bool:
    latest = os.path.join(run_dir, "checkpoints", "latest")
    return os.path.isfile(latest) and open(latest).read().strip() == str(step)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/posttrain_e2e")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--no-pretrain", action="store_true", help="SFT from fresh weights")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    from megatron_step.stages.sft import embedded_chats

    data_dir = os.path.join(out, "data")
    train_file, valid_file = embedded_chats(data_dir, 4800, 64, 1234)
    sft_dir, init = os.path.join(out, "sft"), []
    if not args.no_pretrain:
        pre_dir = os.path.join(out, "pretrain")
        if not _done(pre_dir, 300):
            cmd = ["pretrain/pretrain_step.py", "--config", "examples/tiny/tiny.yaml"]
            _run(
                [*cmd, f"train.run_dir={pre_dir}", f"data.data_dir={data_dir}"],
                os.path.join(out, "pretrain.log"),
            )
        init = [f"train.init_from={pre_dir}"]
    if not _done(sft_dir, 300):
        cmd = ["posttrain/train_sft.py", "--config", "examples/sft/sft_tiny.yaml", f"train.run_dir={sft_dir}"]
        cmd += [f"data.data_dir={data_dir}", f"sft.train_files=[{train_file}]"]
        _run([*cmd, f"sft.valid_files=[{valid_file}]", *SFT, *init], os.path.join(out, "sft.log"))
    procs = []
    for seed in args.seeds:
        run_dir = os.path.join(out, f"rl_seed{seed}")
        if not _done(run_dir, args.rl_steps):
            cmd = [
                "posttrain/train_rl.py",
                "--config",
                "examples/rl/rl_tiny.yaml",
                f"train.run_dir={run_dir}",
            ]
            cmd += [f"data.data_dir={data_dir}", f"rl.init_from={sft_dir}", f"train.seed={seed}"]
            cmd += [f"train.steps={args.rl_steps}", "train.eval_interval=10", f"rl.eval_samples={args.k}"]
            cmd += [f"train.save_interval={args.rl_steps}", *RL]
            procs.append(_run(cmd, os.path.join(out, f"rl_seed{seed}.log"), wait=False))
    for p in procs:
        if p.wait() != 0:
            sys.exit(f"an RL run failed (logs in {out})")
    from megatron_step.testing.golden import read_run

    curves = {}
    for seed in args.seeds:
        c = read_run(os.path.join(out, f"rl_seed{seed}"))
        curves[seed] = {
            "avg@k": {int(s): v for s, v in sorted(c["rl/accuracy_heldout_sampled"].items())},
            "greedy": {int(s): v for s, v in sorted(c["rl/accuracy_heldout"].items())},
        }
    evals = {}
    for name, ckpt in [("sft", sft_dir)] + [
        (f"rl_seed{s}", os.path.join(out, f"rl_seed{s}")) for s in args.seeds
    ]:
        res = os.path.join(out, f"eval_{name}.json")
        if not os.path.isfile(res):
            cmd = ["tools/evaluate.py", "--config", "examples/rl/rl_tiny.yaml", "--checkpoint", ckpt]
            cmd += ["--data", "examples/rl/problems_tiny_eval.jsonl", "--k", str(args.k), "--out", res]
            _run([*cmd, f"data.data_dir={data_dir}", *EVAL], os.path.join(out, f"eval_{name}.log"))
        with open(res) as f:
            evals[name] = json.load(f)
    hf = hf_parity(out, data_dir, os.path.join(out, f"rl_seed{args.seeds[0]}"), args.rl_steps)
    result = {"curves": curves, "evaluate": evals, "hf": hf, "minutes": (time.time() - t0) / 60}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table(result, args.k))
    return result


def hf_parity(out: str, data_dir: str, run_dir: str, step: int, n: int = 24) -> dict:
    """Export `run_dir` (native dialect, fp32, with the tokenizer and chat template), then greedy
    generation on the first `n` held-out prompts as chat: tools/generate.py from the run directory and
    from the export, and transformers alone on the export. Returns the counts of identical outputs."""
    hf_dir = os.path.join(out, "hf")
    ckpt = os.path.join(run_dir, "checkpoints", f"iter_{step:07d}")
    tok = os.path.join(data_dir, "tokenizer_v2048.model")
    _run(["tools/convert_checkpoint.py", "mcore2hf", "--ckpt", ckpt, "--out", hf_dir, "--config",
          "examples/sft/sft_tiny.yaml", "--dialect", "native", "--dtype", "fp32", "--tokenizer-model", tok],
         os.path.join(out, "export.log"))  # fmt: skip
    with open(os.path.join(REPO, "examples/rl/problems_tiny_eval.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for line in f][:n]
    pfile = os.path.join(out, "prompts.jsonl")
    with open(pfile, "w") as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": p}]}) + "\n" for p in prompts)
    got = {}
    for name, src in (("run", run_dir), ("hf", hf_dir)):
        res = os.path.join(out, f"generate_{name}.jsonl")
        cmd = ["tools/generate.py", "--config", "examples/sft/sft_tiny.yaml", "--checkpoint", src]
        cmd += ["--file", pfile, "--max-new-tokens", "40", "--out", res, f"data.data_dir={data_dir}"]
        _run(cmd, os.path.join(out, f"generate_{name}.log"))
        with open(res) as f:
            got[name] = [json.loads(line) for line in f]
    theirs = transformers_greedy(hf_dir, [[{"role": "user", "content": p}] for p in prompts], 40)
    return {
        "prompts": n,
        "prompt_ids_equal": sum(a == o["prompt_ids"] for (a, _), o in zip(theirs, got["run"], strict=True)),
        "transformers_equal": sum(b == o["ids"] for (_, b), o in zip(theirs, got["run"], strict=True)),
        "hf_dir_equal": sum(a["ids"] == b["ids"] for a, b in zip(got["run"], got["hf"], strict=True)),
        "example": {"prompt": prompts[0], "text": got["run"][0]["text"]},
    }


def transformers_greedy(hf_dir: str, chats: list, max_new: int) -> list:
    """transformers alone: AutoTokenizer.apply_chat_template, Step3p7TextModel with its KV cache and the
    exported LM head, greedy, stopping at generation_config.json's eos ids. [(prompt ids, new ids)]."""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = Step3p7TextModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["lm_head.weight"]
    with safe_open(os.path.join(hf_dir, shard), "pt") as f:
        head = f.get_tensor("lm_head.weight").float()
    stops = GenerationConfig.from_pretrained(hf_dir).eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    res = []
    for messages in chats:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        feed, new, past = torch.tensor([ids]), [], None
        with torch.no_grad():
            for _ in range(max_new):
                o = model(input_ids=feed, past_key_values=past, use_cache=True)
                past = o.past_key_values
                t = int((o.last_hidden_state[0, -1] @ head.T).argmax())
                new.append(t)
                if t in stops:
                    break
                feed = torch.tensor([[t]])
        res.append((ids, new))
    return res


def table(r: dict, k: int) -> str:
    lines = [f"| run | held-out avg@{k} by RL step | greedy by step |", "|---|---|---|"]
    for seed, c in r["curves"].items():
        avg = ", ".join(f"{s}: {v:.3f}" for s, v in c["avg@k"].items())
        gr = ", ".join(f"{s}: {v:.3f}" for s, v in c["greedy"].items())
        lines.append(f"| seed {seed} | {avg} | {gr} |")
    lines += [
        "",
        f"| checkpoint | source | problems | greedy | avg@{k} | pass@{k} | failed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, e in r["evaluate"].items():
        for src, s in [*e["sources"].items(), ("all", e["overall"])]:
            lines.append(
                f"| {name} | {src} | {s['problems']} | {s['greedy']:.3f} | {s['avg@k']:.3f} "
                f"| {s['pass@k']:.3f} | {s['failed']} |"
            )
    h = r["hf"]
    lines += [
        "",
        f"HF export, {h['prompts']} held-out chat prompts, greedy 40 tokens: apply_chat_template ids = ours "
        f"{h['prompt_ids_equal']}/{h['prompts']}; transformers tokens = tools/generate.py "
        f"{h['transformers_equal']}/{h['prompts']}; tools/generate.py on the HF directory = on the run "
        f"directory {h['hf_dir_equal']}/{h['prompts']}. {r['minutes']:.0f} minutes.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
