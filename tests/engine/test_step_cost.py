"""The TBT budget's option and cost model. (The engine measuring its step costs and serving the
same outputs: tests/engine/test_llm_engine.py; the scheduler sizing prefill from them:
tests/engine/test_scheduler_policies.py.)"""
import math

import pytest
from absl import flags

from crosspool_jax import LLM, config_flags
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.engine.step_cost import fit_line
from crosspool_jax.engine.scheduler import ModelStepCost

def test_an_invalid_budget_is_a_value_error_naming_the_field():
    for bad in (0, -1.0, math.nan, math.inf, "10", True):
        with pytest.raises(ValueError, match="tbt_budget_ms"):
            EngineConfig(models={"m": "/nowhere"}, tbt_budget_ms=bad)
    with pytest.raises(ValueError, match="tbt_budget_ms"):
        LLM(model="/nowhere", tbt_budget_ms=-5)
    assert EngineConfig(models={"m": "/nowhere"}, tbt_budget_ms=25).tbt_budget_ms == 25
    values = flags.FlagValues()                      # the servers' flags come from the field
    config_flags.define_flags(EngineConfig, skip=("models",), flag_values=values)
    values(["prog", "--tbt_budget_ms=12.5"])
    assert config_flags.config_kwargs(EngineConfig, skip=("models",), flag_values=values)["tbt_budget_ms"] == 12.5


def test_the_cost_line_fit():
    assert fit_line([(16, 2.0), (64, 5.0)]) == pytest.approx((1.0, 1 / 16))
    assert fit_line([(64, 3.2)]) == pytest.approx((0.0, 0.05))                # one point: through the origin
    assert fit_line([(16, 3.0), (64, 2.0)]) == pytest.approx((2.5, 0.0))     # noise: never a negative slope
    assert ModelStepCost((16, 64), (1e-3, 2e-3)).most_tokens_within(1e-4) == 0
