"""Tokenizer and chat templates against transformers' own fast tokenizer on the same folder."""
import json
import os

import numpy as np
import pytest
import transformers

from crosspool_jax.checkpoints import CheckpointError, TemplateError, load_tokenizer
from crosspool_jax.checkpoints.tiny_models import CHATML_TEMPLATE, train_byte_bpe, write_tokenizer_files

BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] | trim }}"
                "{% if not loop.last %} {{ eos_token }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %} [ASSISTANT]{% endif %}"
                "{% if tools %} TOOLS={{ tools | tojson }}{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    rng = np.random.default_rng(41)
    words = ["the", "cold", "model", "wakes", "up", "über", "naïve", "tokens", "kv", "pool", "\n", "  "]
    texts = ["".join(w + " " for w in rng.choice(words, 60)) for _ in range(80)]
    write_tokenizer_files(path, train_byte_bpe(texts, vocab_size=400))
    return path


MESSAGES = [
    [{"role": "user", "content": "Hello, naïve über model!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  spaces\nand lines "},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}],
]


def test_encode_decode_match_transformers(tok_dir):
    ours, theirs = load_tokenizer(tok_dir), transformers.AutoTokenizer.from_pretrained(tok_dir)
    text = "the cold model wakes up über  naïve\n\ttokens 123 ✓ <|im_end|>"
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.eos_token_id == theirs.eos_token_id == 2 and ours.bos_token_id == theirs.bos_token_id == 0
    assert ours.vocab_size == len(theirs) and 259 <= ours.vocab_size <= 400   # 256 bytes + 3 specials


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("i", range(len(MESSAGES)))
def test_chatml_template_matches_transformers(tok_dir, i, gen):
    ours, theirs = load_tokenizer(tok_dir), transformers.AutoTokenizer.from_pretrained(tok_dir)
    want = theirs.apply_chat_template(MESSAGES[i], tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(MESSAGES[i], add_generation_prompt=gen) == want
    assert ours.chat_template == CHATML_TEMPLATE


def test_template_with_bos_eos_filters_and_kwargs(tok_dir, tmp_path):
    folder = str(tmp_path / "t")
    os.makedirs(folder)
    from tokenizers import Tokenizer
    write_tokenizer_files(folder, Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")),
                          chat_template=BOS_TEMPLATE)
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    tools = [{"name": "lookup", "parameters": {"q": "string"}}]
    for msgs in MESSAGES:
        assert ours.apply_chat_template(msgs) == theirs.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(msgs, tools=tools) == theirs.apply_chat_template(
            msgs, tools=tools, tokenize=False, add_generation_prompt=True)


def test_raise_exception_in_template(tok_dir):
    with pytest.raises(TemplateError, match="Unknown role: tool"):
        load_tokenizer(tok_dir).apply_chat_template([{"role": "tool", "content": "x"}])


def test_named_templates_and_jinja_file(tok_dir, tmp_path):
    folder = str(tmp_path / "named")
    os.makedirs(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tok_dir, name)) as src, open(os.path.join(folder, name), "w") as dst:
            dst.write(src.read())
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    json.dump(cfg, open(cfg_path, "w"))
    assert load_tokenizer(folder).apply_chat_template(MESSAGES[0]) == "DEFAULT"
    del cfg["chat_template"]
    json.dump(cfg, open(cfg_path, "w"))
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert load_tokenizer(folder).apply_chat_template(MESSAGES[0]) == "<Hello, naïve über model!>"
    os.remove(os.path.join(folder, "chat_template.jinja"))
    with pytest.raises(ValueError, match="no chat_template"):
        load_tokenizer(folder).apply_chat_template(MESSAGES[0])


def test_missing_and_broken_tokenizer(tmp_path):
    assert load_tokenizer(str(tmp_path)) is None
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_chat_template_works_without_transformers_loaded(tok_dir):
    """The package must not lean on transformers (or torch) having imported jinja2 pieces for it."""
    import subprocess
    import sys
    code = ("import sys; from crosspool_jax.checkpoints import load_tokenizer; "
            f"t = load_tokenizer({tok_dir!r}); "
            "print(t.apply_chat_template([{'role': 'user', 'content': 'hi'}]), end=''); "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
