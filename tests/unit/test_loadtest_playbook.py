"""playbooks/loadtest.yml's default model: the first ollama_models entry's name, whether the entry is a name or a
{name, vram_gib, ...} dict (the lab's and every example's form), and a fallback when none is configured."""

import pathlib

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

PLAYBOOK = pathlib.Path(__file__).resolve().parents[2] / "playbooks" / "loadtest.yml"


@pytest.mark.parametrize(("models", "want"), [
    ([{"name": "herd-small", "vram_gib": 5}, "qwen2.5:7b"], "herd-small"),
    (["qwen2.5:7b", {"name": "x"}], "qwen2.5:7b"),
    ([], "llama3.2:1b"),
    (None, "llama3.2:1b"),
])
def test_default_model_is_the_first_entrys_name(models, want):
    expr = yaml.safe_load(PLAYBOOK.read_text())[0]["vars"]["herd_loadtest_model"]
    variables = {} if models is None else {"ollama_models": models}
    assert Templar(loader=DataLoader(), variables=variables).template(trust_as_template(expr)) == want
