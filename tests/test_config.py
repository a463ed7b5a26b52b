from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from largebatch.config import Config, ConfigError, build_config, dump_yaml, from_dict, parse_override
from largebatch.dist import resolve_layout
from largebatch.recipes import load_recipe, recipe_names

from conftest import run_cli


def test_every_recipe_builds_and_round_trips():
    names = recipe_names()
    assert {"sc18-run-a", "sc18-run-b", "goyal-8k", "lars-32k", "fmnist-baseline", "fmnist-large"} <= set(names)
    for name in names:
        cfg = build_config(load_recipe(name))
        assert cfg.description
        assert from_dict(Config, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_fmnist_large_is_large_batch_with_warmup():
    cfg = build_config(load_recipe("fmnist-large"))
    assert cfg.train.global_batch >= 1024 and cfg.schedule.warmup_epochs > 0 and cfg.schedule.peak_lr is None


def test_set_overrides_with_types():
    cfg = build_config(load_recipe("fmnist-large"),
                       ["train.global_batch=2048", "optim.name=lars", "schedule.milestones=[3, 6]",
                        "train.bf16=false", "schedule.base_lr=1"])
    assert cfg.train.global_batch == 2048 and cfg.optim.name == "lars"
    assert cfg.schedule.milestones == [3.0, 6.0] and cfg.train.bf16 is False
    assert isinstance(cfg.schedule.base_lr, float)
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}


@pytest.mark.parametrize("override,key", [
    ("train.globl_batch=4", "unknown key train.globl_batch"),
    ("optimiser.name=sgd", "unknown key optimiser"),
    ("train.global_batch=abc", "train.global_batch: expected an integer"),
    ("train.global_batch=1.5", "train.global_batch: expected an integer"),
    ("train.bf16=3", "train.bf16: expected true/false"),
    ("optim.name=adam", "optim.name: 'adam' is not one of sgd, lars"),
    ("schedule.base_lr=-0.1", "schedule.base_lr must be >= 0"),
    ("schedule.warmup_epochs=20", "schedule.warmup_epochs"),
    ("train.global_batch=0", "train.global_batch must be positive"),
    ("schedule.milestones=[5, 2]", "schedule.milestones must be increasing"),
    ("nonsense", "--set expects KEY=VALUE"),
    ("model.sync_bn=true", "set model.bn_group_size=0 with it"),
    ("schedule.warmup_start_lr=0.1", "schedule.warmup_start_lr is no longer a key: use schedule.warmup_start"),
    ("schedule.final_lr=0.0", "use schedule.final, now a multiple of the peak LR"),
    ("data.workers=-2", "data.workers must be >= 0, or -1 to choose by dataset"),
    ("data.image_size=0", "data.image_size, data.eval_resize and data.eval_crop must be positive"),
    ("train.threads=-1", "train.threads must be >= 0"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        build_config(load_recipe("fmnist-large"), [override])


def test_one_schedule_vocabulary_a_single_schedule_is_one_phase(capsys):
    """The schedule's shape keys are the phases' keys with the same meaning, so stating the
    shape once in `schedule` or as one phase gives the same LR at every step."""
    from largebatch.optim.schedule import build_phases, lr_at
    shape = {"warmup_epochs": 2, "warmup_start": 0.125, "decay": "cosine", "final": 0.1}
    single = build_config({"train": {"global_batch": 1024, "epochs": 6}, "schedule": {"base_lr": 0.2, **shape}})
    phased = build_config({"train": {"global_batch": 1024, "epochs": 6}, "schedule": {"base_lr": 0.2},
                           "phases": [{"name": "main", "epochs": 6, "snapshot": False, **shape}]})
    a, b = build_phases(single, 10), build_phases(phased, 10)
    assert [lr_at(s, a) for s in range(60)] == [lr_at(s, b) for s in range(60)]
    assert lr_at(0, a) == pytest.approx(0.1) and lr_at(59, a) == pytest.approx(0.08, rel=0.01)
    # With phases, the schedule's shape (here as a base recipe would leave it) is reset, with a note.
    both = build_config({"train": {"epochs": 6}, "schedule": shape, "phases": [{"epochs": 6}]})
    assert (both.schedule.warmup_epochs, both.schedule.decay) == (0.0, "poly")
    assert "not used and reset: schedule.warmup_epochs=2.0, schedule.warmup_start=0.125, schedule.decay=cosine" in capsys.readouterr().err


def test_layout_arithmetic():
    cfg = build_config({"train": {"global_batch": 1024, "micro_batch": 128}})
    lay = resolve_layout(cfg.train, world_size=2, rank=1)
    assert (lay.accum_steps, lay.micro_batch, lay.global_batch) == (4, 128, 1024)
    assert resolve_layout(build_config({"train": {"global_batch": 1024}}).train, 4, 0).micro_batch == 256
    with pytest.raises(ConfigError, match=r"train.global_batch \(1000\) must be divisible by processes \(3\)"):
        resolve_layout(build_config({"train": {"global_batch": 1000, "micro_batch": 10}}).train, 3, 0)
    # A recipe written for one process (fmnist-lars-3072: 3,072 in micro-batches of 1,024)
    # run on two is told the micro-batch that fits, one its BN groups of 32 divide.
    with pytest.raises(ConfigError, match=r"; train.micro_batch=768 fits this layout"):
        resolve_layout(build_config({"train": {"global_batch": 3072, "micro_batch": 1024}}).train, 2, 0, 32)
    with pytest.raises(ConfigError, match=r"; train.micro_batch=96 fits this layout"):
        resolve_layout(build_config({"train": {"global_batch": 384, "micro_batch": 100}}).train, 2, 0, 32)
    with pytest.raises(ConfigError, match="model.bn_group_size"):
        resolve_layout(build_config({"train": {"global_batch": 96, "micro_batch": 48}}).train, 1, 0, 32)


def test_recipe_base_chain_merges(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: fmnist-large\ndescription: mine\ntrain: {epochs: 3}\n")
    data = load_recipe(str(p))
    cfg = build_config(data)
    assert cfg.train.epochs == 3 and cfg.train.global_batch == 1024 and cfg.description == "mine"


def test_cli_config_errors_exit_cleanly_without_traceback(tmp_path):
    for args, msg in [
        (["--set", "train.nope=1"], "unknown key train.nope"),
        (["--global-batch", "1000", "--micro-batch", "300"], "train.global_batch (1000) must be divisible"),
        (["--model", "resnet50"], "model.name: resnet50"),
        (["--set", "schedule.warmup_epochs=50"], "schedule.warmup_epochs"),
    ]:
        proc = run_cli("train", "--recipe", "fmnist-large", "--out", tmp_path / "x", *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert msg in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--recipe", "no-such-recipe", check=False)
    assert proc.returncode == 2 and "no recipe named 'no-such-recipe'" in proc.stderr


def test_missing_fmnist_says_how_to_get_it(tmp_path):
    proc = run_cli("train", "--recipe", "fmnist-large", "--out", tmp_path / "x", "--data", tmp_path / "empty",
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "apt-get install dataset-fashion-mnist" in proc.stderr and "data.download=true" in proc.stderr


def test_recipes_command_lists_one_line_each():
    out = run_cli("recipes").stdout.strip().splitlines()
    assert len(out) == len(recipe_names())
    assert any(line.startswith("sc18-run-a ") for line in out)


def test_powersgd_is_refused_with_what_it_cannot_compress():
    for other in ("dist.exact_reduction=true", "dist.allreduce_bf16=true"):
        with pytest.raises(ConfigError, match="dist.powersgd_rank compresses the bucketed all-reduce"):
            build_config({}, ["dist.powersgd_rank=2", other])
    assert build_config({}, ["dist.powersgd_rank=2"]).dist.powersgd_rank == 2


@pytest.mark.parametrize("recipe,run", [
    ("fmnist-lars", "b1536-lr2.233-lars-e30-s0"),
    ("fmnist-lars-3072", "b3072-lr2.4-lars-warm2x-e30-s0"),
])
def test_study_recipes_equal_the_runs_they_come_from(recipe, run):
    # A recipe that claims a study result must train what the study trained: every key of
    # the committed run's config but its description, logging and the measured auto choices.
    path = Path(__file__).parents[1] / "experiments/results/critical_batch" / run / "config.yaml"
    ran = yaml.safe_load(path.read_text())
    built = asdict(build_config(load_recipe(recipe)))

    def flat(d, pre=""):
        for k, v in d.items():
            yield from flat(v, f"{pre}{k}.") if isinstance(v, dict) else [(pre + k, v)]

    skip = {"description", "train.eval_batch", "train.log_every_steps", "train.channels_last", "train.compile"}
    ran, built = dict(flat(ran)), dict(flat(built))
    # keys added since: train.deterministic has no effect on CPUs; model.fuse_bn_relu computes
    # the same functions with other kernels (float rounding apart)
    later = {"train.deterministic", "model.fuse_bn_relu"}
    assert ran.keys() == built.keys() - later
    assert {k: built[k] for k in ran if k not in skip} == {k: ran[k] for k in ran if k not in skip}
