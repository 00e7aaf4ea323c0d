"""Run configs: YAML + key=value overrides, coercion by the fields' annotations, one run type per
stage, errors that name the field and value."""

from __future__ import annotations

import pytest

from megatron_step.config.run import (
    MMRPTRunConfig,
    PretrainConfig,
    RLRunConfig,
    cli_run_config,
    load_model_config,
    load_run_config,
)


def test_yaml_plus_overrides_are_typed():
    cfg = load_run_config(
        "examples/tiny/tiny.yaml", ["train.steps=7", "optim.lr=1", "parallel.tp=2", "model.sliding_window=4"]
    )
    assert isinstance(cfg, PretrainConfig)
    assert cfg.train.steps == 7 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel is True
    m = cfg.model_config()
    assert m.sliding_window == 4 and m.vocab_size == 2048 and m.num_layers == 8
    # YAML 1.1 reads "1e-3" as a string; float fields still get a float
    cfg = load_run_config(
        "examples/rl/rl_tiny.yaml",
        ["optim.lr=1e-3", "rl.loss.clip_eps=2e-1", "optim.optimizer=macro"],
        RLRunConfig,
    )
    assert cfg.optim.lr == 1e-3 and cfg.rl.loss.clip_eps == 0.2 and cfg.optim.optimizer == "macro"
    assert cfg.rl.loss.kind == "mispo"  # rl_tiny.yaml's `loss: mispo` sets the section's kind
    cfg = load_run_config(
        "examples/rl/rl_tiny.yaml", ["rl.loss=grpo", "rl.loss.clip_eps_high=0.28"], RLRunConfig
    )
    assert (cfg.rl.loss.kind, cfg.rl.loss.clip_eps_high, cfg.rl.loss.eps_high) == ("grpo", 0.28, 0.28)


def test_yaml_values_are_coerced_like_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  min_lr: 0\nmodel:\n  norm_eps: 1e-6\n")
    cfg = load_run_config(str(path))
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float) and cfg.optim.min_lr == 0.0
    assert cfg.model_config().norm_eps == 1e-6
    path.write_text("train:\n  steps: 3.5\n")
    with pytest.raises(ValueError, match=r"train.steps=3.5: expected an integer"):
        load_run_config(str(path))
    path.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ValueError, match=r"optim.lr='fast': expected a number"):
        load_run_config(str(path))
    with pytest.raises(ValueError, match=r"train.resume='maybe': one of never, auto, required"):
        load_run_config(None, ["train.resume=maybe"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=3", "TrainConfig has no field 'stpes'"),
        ("model.hiden_size=3", "StepFlashConfig has no field 'hiden_size'"),
        ("optim.lr_schedule=exp", "optim.lr_schedule='exp': one of cosine, WSD, linear, constant"),
        ("train.steps=0", r"train.steps=0: must be >= 1"),
        ("steps", "expected key=value"),
        ("model.moe_topk=99", r"model.moe_topk=99: must be in \[1, num_experts=8\]"),
        ("optim.optimizer=lamb", "optim.optimizer='lamb': one of adam, sgd, muon, macro"),
        ("optim.manifold=sphere", "optim.manifold='sphere': one of frobenius, spectral, oblique"),
        ("rl.loss=ppo", "rl.loss.kind='ppo': one of grpo, tis, mispo"),
        ("rl.loss.mispo_traj_low=1.1", "rl.loss.mispo_traj_low=1.1, rl.loss.mispo_traj_high=1.001"),
        ("rl.group_size=1", "rl.group_size=1: group advantages need >= 2"),
        ("rl.e3rl.segmentlen=4", "E3RLConfig has no field 'segmentlen'"),
        ("rl.e3rl.signal=logit", "rl.e3rl.signal='logit': one of cross_entropy, entropy"),
        ("rl.rollout.kind=x", "rl.rollout is not a nested section"),
        ("rl.loss.clip=0.1", "PolicyLossConfig has no field 'clip'"),
        ("rl.rollout=erase", "rl.rollout='erase': one of plain, e3rl"),
        ("rl.speculative.accept=maybe", "rl.speculative.accept='maybe': one of rejection, coupled"),
        ("rl.speculative.tokens=-1", r"rl.speculative.tokens=-1: must be >= 0"),
        ("rl.actor_minibatches=0", r"rl.actor_minibatches=0: must be >= 1"),
        ("rl.speculative.tokens=2 rl.async_mode=true", "the async replica has no MTP heads"),
        ("rl.speculative.tokens=2 rl.rollout=e3rl", "erasable rollouts decode token by token"),
        ("rl.rollout=e3rl rl.e3rl.num_segments=3", r"= 24 must equal rl.max_new_tokens\(40\)"),
        ("train.save_interval=-2", r"train.save_interval=-2: must be >= 0 \(0: off\)"),
        ("train.eval_interval=-1", r"train.eval_interval=-1: must be >= 0"),
        ("train.exit_after=0", r"train.exit_after=0: must be >= 1"),
        ("train.steps=3.5", "train.steps=3.5: expected an integer"),
        ("parallel.cp=2", "parallel.cp=2: context parallelism is not built here"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_run_config("examples/rl/rl_tiny.yaml", override.split(), RLRunConfig)


def test_each_run_type_refuses_the_sections_of_another(tmp_path):
    with pytest.raises(ValueError, match=r"'rl' is not a section of PretrainConfig.*RL runs"):
        load_run_config("examples/tiny/tiny.yaml", ["rl.group_size=4"])
    path = tmp_path / "pretrain_with_rl.yaml"
    path.write_text("model_preset: tiny\nrl:\n  group_size: 4\n")
    with pytest.raises(ValueError, match=r"pretrain_with_rl.yaml: 'rl' is not a section of PretrainConfig"):
        load_run_config(str(path))
    with pytest.raises(ValueError, match=r"'data' is not a section of MMRPTRunConfig"):
        load_run_config("examples/tiny/tiny.yaml", [], MMRPTRunConfig)
    cfg = load_run_config("examples/mmrpt/mmrpt_tiny.yaml", ["mmrpt.vision.num_layers=3"], MMRPTRunConfig)
    assert cfg.mmrpt.vision.num_layers == 3 and not hasattr(cfg, "rl")
    # tools that need only the model read it from any run's YAML
    assert load_model_config("examples/rl/rl_tiny.yaml", ["model.vocab_size=512"]).vocab_size == 512


def test_nested_section_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rl:\n  rollout: e3rl\n  e3rl:\n    segment_len: 4\n    w_max: 1\n")
    cfg = load_run_config(str(path), ["rl.e3rl.num_segments=10", "rl.e3rl.threshold_std=2"], RLRunConfig)
    e = cfg.rl.e3rl
    assert (e.segment_len, e.num_segments, e.max_new_tokens) == (4, 10, 40)
    assert e.threshold_std == 2.0 and isinstance(e.threshold_std, float) and e.w_max == 1
    assert cfg.to_dict()["rl"]["e3rl"]["segment_len"] == 4
    path.write_text("rl:\n  e3rl:\n    segment_size: 4\n")
    with pytest.raises(ValueError, match="rl.e3rl.segment_size: unknown field of E3RLConfig"):
        load_run_config(str(path), cls=RLRunConfig)


def test_batch_must_divide_over_data_parallel_ranks():
    cfg = load_run_config(
        "examples/tiny/tiny.yaml", ["train.global_batch_size=6", "train.micro_batch_size=4"]
    )
    with pytest.raises(
        ValueError, match=r"global_batch_size\(6\) is not divisible by micro_batch_size\(4\) \* dp\(1\)"
    ):
        cfg.validate(1)


def test_a_missing_file_and_bad_yaml_are_config_errors_with_the_place(tmp_path):
    with pytest.raises(ValueError, match="no_such.yaml: no such file"):
        load_run_config(str(tmp_path / "no_such.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  run_dir: [runs/x\n")
    with pytest.raises(ValueError, match=r"bad.yaml:4:1: not valid YAML"):
        load_run_config(str(bad))


def test_the_cli_reports_config_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1e-3\n")
    with pytest.raises(SystemExit, match="config error: .*bad.yaml:2:1: not valid YAML"):
        cli_run_config("x", ["--config", str(bad)])
    with pytest.raises(SystemExit, match="config error: --config .*nope.yaml: no such file"):
        cli_run_config("x", ["--config", str(tmp_path / "nope.yaml")])
