"""One source of options: the server's and the batch command's flags are generated from
`EngineConfig` (and `ServerConfig`), with the fields' defaults and help; `--help` exits 0."""
import copy
import dataclasses
import subprocess
import sys

import pytest
from absl import flags

from crosspool_jax import batch, config_flags, serve
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.server.config import ServerConfig


def _fields(cls, skip=()):
    return [f for f in dataclasses.fields(cls) if f.name not in skip]


@pytest.mark.parametrize("module", [serve, batch])
def test_flags_and_engine_config_agree(module):
    for field in _fields(EngineConfig, ("models",)):
        flag = module.FLAGS[field.name]
        assert field.metadata.get("help") and flag.help.endswith(field.metadata["help"]), field.name
        default = field.default
        if field.metadata.get("kind") in ("bytes", "devices"):
            default = None if default is None else str(default)
        assert flag.default == default, field.name
    assert set(module.ENGINE_FLAGS) == {f.name for f in _fields(EngineConfig, ("models",))}
    # flags read back as the config's own defaults
    values = copy.deepcopy(module.FLAGS)
    values(["prog"])
    kwargs = config_flags.config_kwargs(EngineConfig, skip=("models",), flag_values=values)
    assert EngineConfig(models={"m": "p"}, **kwargs) == EngineConfig(models={"m": "p"})


def test_server_flags_and_server_config_agree():
    assert set(serve.SERVER_FLAGS) == {f.name for f in _fields(ServerConfig)}
    values = copy.deepcopy(serve.FLAGS)
    values(["serve", "--max_body_bytes=2MiB", "--port=9000", "--noenable_docs"])
    assert serve.server_config(values) == ServerConfig(max_body_bytes=2 << 20, port=9000)


def test_generated_flags_follow_new_fields():
    @dataclasses.dataclass
    class Options:
        count: int = dataclasses.field(default=3, metadata={"help": "How many."})
        ratio: float = 0.5
        tags: tuple = ("a",)

    values = flags.FlagValues()
    assert config_flags.define_flags(Options, flag_values=values) == ["count", "ratio", "tags"]
    values(["prog", "--count=4", "--tags=('x', 'y')"])
    assert config_flags.config_kwargs(Options, flag_values=values) == {"count": 4, "ratio": 0.5,
                                                                       "tags": ("x", "y")}
    assert values["ratio"].help == "Options.ratio"


def test_serve_help_exits_zero_and_lists_every_engine_option():
    proc = subprocess.run([sys.executable, "-m", "crosspool_jax.serve", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_help(proc.stdout, "crosspool-serve")


def _check_help(text: str, prog: str) -> None:
    assert text.startswith(f"usage: {prog}")
    for field in _fields(EngineConfig, ("models",)):
        assert f"--{field.name} " in text or f"--[no]{field.name}" in text, field.name
    assert "(default: 512)" in text                                 # max_num_batched_tokens


@pytest.mark.parametrize("module", [serve, batch])
def test_help_and_usage_errors_in_process(module, capsys):
    with pytest.raises(SystemExit) as info:
        module.main([module.PROG, "--help"])
    assert info.value.code == 0
    _check_help(capsys.readouterr().out, module.PROG)
    with pytest.raises(SystemExit) as info:
        module.main([module.PROG, "--max_num_seqs=lots"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.splitlines()) == 2
    assert err.startswith(f"{module.PROG}: error: ") and "max_num_seqs" in err
