"""DistillSpec's sub-specs behind its flat keys: keywords, CLI options and recipe keys land in the right sub-spec,
``whelp distill --help`` lists the same options as before the grouping, and a bad key is one line naming it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from whelp.errors import WhelpError
from whelp.schema import flat_keys, from_dict, to_dict
from whelp.specs import DistillSpec, LossSpec, OnPolicySpec, OptimSpec

# The options of `whelp distill --help` before DistillSpec was grouped (the CLI's own and the spec's).
DISTILL_OPTIONS = set(
    "--alpha --batch-size --beta --cache --ce-weight --chunk-size --data --dtype --eval-data --eval-every "
    "--eval-tokens --force --gen-tokens --grad-accum --grad-checkpointing --help --keep-last --loss --lr "
    "--max-grad-norm --max-tokens --no-grad-checkpointing --no-shard-teachers --no-t2-scale --no-tensorboard "
    "--on-policy --on-policy-from --on-policy-loss --out --prompt-tokens --resume --save-dtype --save-every --schedule --seed "
    "--seq-len --shard-teachers --steps --t2-scale --teacher --temperature --tensorboard --warmup "
    "--weight-decay".split()
)
DISTILL_OPTIONS |= {"--hidden-weight", "--hidden-loss", "--hidden-map", "--local", "--no-local"}  # added since
DISTILL_OPTIONS |= {"--mixture", "--mixture-every", "--mixture-dev-blocks"}  # added since: the dynamic data mixture
DISTILL_OPTIONS |= {"--chat-loss"}  # added since: sequence-level KD on chat data
DISTILL_OPTIONS |= {"--interpolate"}  # added since: WiSE-FT on save

FLAT = {
    "lr": (2e-3, ("optim", "lr")),
    "warmup": (1, ("optim", "warmup")),
    "max_grad_norm": (0.5, ("optim", "max_grad_norm")),
    "loss": ("jsd", ("kd", "name")),
    "temperature": (2.0, ("kd", "temperature")),
    "chunk_size": (64, ("kd", "chunk_size")),
    "on_policy": (0.5, ("gkd", "fraction")),
    "gen_tokens": (8, ("gkd", "gen_tokens")),
    "on_policy_loss": ("jsd", ("gkd", "loss")),
    "shard_teachers": (True, ("compute", "shard_teachers")),
    "dtype": ("float32", ("compute", "dtype")),
    "eval_tokens": (64, ("monitor", "eval_tokens")),
    "tensorboard": (True, ("monitor", "tensorboard")),
    "keep_last": (3, ("save", "keep_last")),
    "save_dtype": ("bfloat16", ("save", "save_dtype")),
    "interpolate": (0.5, ("save", "interpolate")),
    "seq_len": (64, ("seq_len",)),
    "hidden_weight": (0.5, ("hidden", "weight")),
    "hidden_loss": ("cosine", ("hidden", "loss")),
    "hidden_map": ("uniform", ("hidden", "map")),
    "local": (True, ("hidden", "local")),
    "mixture": ("dynamic", ("mix", "kind")),
    "mixture_every": (3, ("mix", "every")),
    "mixture_dev_blocks": (2, ("mix", "dev_blocks")),
}
WITH = {"gen_tokens": {"on_policy": 0.5}, "on_policy_loss": {"on_policy": 0.5}}  # refused without on-policy


def _at(spec, where):
    for part in where:
        spec = getattr(spec, part)
    return spec


@pytest.mark.parametrize("key", FLAT)
def test_flat_keywords_and_recipe_keys_set_their_sub_spec_field(key):
    value, where = FLAT[key]
    given = {"steps": 2, **WITH.get(key, {})}
    assert flat_keys(DistillSpec)[key] == where
    for spec in (DistillSpec(**given, **{key: value}), from_dict(DistillSpec, {**given, key: value}, "recipe.distill")):
        assert _at(spec, where) == value
        assert spec.flat()[key] == value and to_dict(spec)[key] == value
    assert replace(DistillSpec(**given), **{key: value}) == DistillSpec(**given, **{key: value})


def test_sub_specs_given_whole_or_flat_are_the_same_spec():
    whole = DistillSpec(steps=2, optim=OptimSpec(lr=1e-3), kd=LossSpec("jsd", beta=0.3), gkd=OnPolicySpec(0.5, 8))
    assert whole == DistillSpec(steps=2, lr=1e-3, loss="jsd", beta=0.3, on_policy=0.5, gen_tokens=8)
    assert whole.gkd.loss_spec(whole.kd) == LossSpec("reverse_kl", beta=0.3, ce_weight=0.0)
    assert list(DistillSpec(steps=1).flat()) == list(DistillSpec.KEYS)  # run.json keeps its flat keys


def test_help_lists_the_same_options_as_before():
    import typer

    from whelp.cli import app

    command = typer.main.get_command(app).commands["distill"]
    names = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    assert names - {"student"} == DISTILL_OPTIONS - {"--help"}
    shown = [param.name for param in command.params if param.name in DistillSpec.KEYS]
    assert shown == list(DistillSpec.KEYS)  # in the order they were listed


def test_a_bad_key_is_one_line_naming_it():
    with pytest.raises(WhelpError) as err:
        DistillSpec(steps=1, lrr=1e-3)
    assert str(err.value).startswith("DistillSpec.lrr: unknown key; valid keys: data, steps,") and "\n" not in str(
        err.value
    )
    with pytest.raises(WhelpError, match=r"^recipe\.distill\[0\]\.fraction: unknown key; valid keys: .*on_policy"):
        from_dict(DistillSpec, {"steps": 1, "fraction": 0.5}, "recipe.distill[0]")  # a sub-spec's own name is no key
    with pytest.raises(WhelpError, match=r"^recipe\.distill\[0\]\.on_policy_loss: 'tvd' is not valid; choose one of"):
        from_dict(DistillSpec, {"steps": 1, "on_policy_loss": "tvd"}, "recipe.distill[0]")
    with pytest.raises(WhelpError, match=r"^recipe\.distill\[0\]\.lr: expected a number"):
        from_dict(DistillSpec, {"steps": 1, "lr": "fast"}, "recipe.distill[0]")
    with pytest.raises(WhelpError, match=r"^recipe\.distill\[0\]: temperature must be > 0, got -1.0$"):
        from_dict(DistillSpec, {"steps": 1, "temperature": -1}, "recipe.distill[0]")
