"""The README's recipe reference must stay a valid recipe."""

import re
from pathlib import Path

import yaml

from quantbench.recipe import parse_recipe

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_recipe_reference_is_a_valid_recipe():
    section = README.read_text().split("## Recipes", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    recipe = parse_recipe(yaml.safe_load(block), source="README.md")
    assert recipe.name == "my-run"
    assert recipe.quantize.scheme_for("model.layers.3.mlp.down_proj").name == "int8-pc-sym-rtn"
    assert recipe.quantize.scheme_for("model.layers.0.self_attn.q_proj") is None


def test_readme_names_only_shipped_recipes():
    shipped = {p.name for p in (README.parent / "recipes").rglob("*.yaml")}
    named = set(re.findall(r"([\w-]+\.yaml)", README.read_text())) - {"result.yaml", "recipe.yaml", "allocation.yaml"}
    assert named <= shipped, named - shipped


def test_readme_allocation_section_is_a_valid_allocation():
    section = README.read_text().split("## Bit allocation", 1)[1]
    block = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    recipe = parse_recipe({"name": "a", "model": {"name": "m"}, **block}, source="README.md")
    assert recipe.allocation.budget == 3.5 and recipe.allocation.rules[1].schemes[0].name == "int8-pc-rtn"
    assert recipe.allocation.sweep.budgets[:2] == [2.5, 2.75]
