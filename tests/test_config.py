"""Typed config machinery: dotted overrides, validation on override, JSON round trip, recipes."""

from dataclasses import dataclass, field

import pytest

from sage_fast import config as C
from sage_fast.grpo.rollout import SamplerConfig


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    clip: float | None = 1.0
    """Gradient-norm clip; None = off."""
    fused: bool = False
    """Use the fused AdamW."""

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class Root:
    name: str = "run"
    """Run name."""
    steps: int = 10
    """Optimizer steps."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tags: list = field(default_factory=list)
    """Free-form tags."""


def test_overrides_parse_by_type_and_revalidate():
    cfg = C.apply_overrides(Root(), ["steps=3", "optim.lr=3e-5", "optim.betas=0.8,0.95", "optim.clip=none",
                                     "optim.fused=true", "sampler.sde_window=2,8", "sampler.sde_type=flow_grpo",
                                     'tags=["a", "b"]', "name=x=y"])
    assert cfg.steps == 3 and cfg.optim.lr == 3e-5 and cfg.optim.betas == (0.8, 0.95)
    assert cfg.optim.clip is None and cfg.optim.fused is True and cfg.name == "x=y"
    assert cfg.sampler.sde_window == (2, 8) and cfg.sampler.sde_type == "flow_grpo" and cfg.tags == ["a", "b"]
    assert Root().optim.lr == 1e-5  # the original is untouched


@pytest.mark.parametrize("override, match", [
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("sampler.sde_type=sde", "sampler.sde_type must be one of"),
    ("sampler.sde_window=5,3", "sampler.sde_window must be"),
    ("optim.lrr=1", r"unknown field 'lrr'; one of \['betas', 'clip', 'fused', 'lr'\]"),
    ("steps=ten", "steps: cannot read 'ten' as int"),
    ("optim.fused=maybe", "cannot read 'maybe' as bool"),
    ("optim.betas=0.9", "cannot read"),
    ("optim=3", "optim is a section"),
    ("steps", "must look like section.field=value"),
])
def test_bad_overrides_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        C.apply_overrides(Root(), [override])


def test_json_round_trip_and_help():
    import json

    cfg = C.apply_overrides(Root(), ["sampler.sde_window=1,4", "optim.betas=0.5,0.6"])
    back = C.from_dict(Root, json.loads(json.dumps(C.to_dict(cfg))))
    assert back == cfg
    lines = C.field_help(Root)
    assert any(line.startswith("optim.lr = 1e-05  AdamW learning rate.") for line in lines)
    assert any(line.startswith("sampler.num_steps = 20") for line in lines)
    with pytest.raises(ValueError, match="unknown fields"):
        C.from_dict(Root, {"stepz": 1})


def test_recipes_registry():
    @C.recipe("test_only_recipe")
    def _make():
        return Root(name="from recipe")

    assert C.get_recipe("test_only_recipe").name == "from recipe"
    assert "test_only_recipe" in C.recipes()
    with pytest.raises(ValueError, match="recipe must be one of"):
        C.get_recipe("nope")
    with pytest.raises(ValueError, match="registered twice"):
        C.recipe("test_only_recipe")(_make)
