"""The README and the docs stay true: their recipes parse, and they name only shipped recipes."""

import re
from pathlib import Path

import pytest
import yaml

from quantbench.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def test_readme_is_a_short_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make quickstart" in text and "make test" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_readme_recipe_is_a_valid_recipe():
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.S).group(1)
    recipe = parse_recipe(yaml.safe_load(block), source="README.md")
    assert recipe.quantize.scheme_for("model.layers.3.mlp.down_proj").name == "int8-pc-sym-rtn"


def test_recipe_reference_is_a_valid_recipe():
    section = (DOCS / "recipes.md").read_text().split("## Recipes", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    recipe = parse_recipe(yaml.safe_load(block), source="README.md")
    assert recipe.name == "my-run"
    assert recipe.quantize.scheme_for("model.layers.3.mlp.down_proj").name == "int8-pc-sym-rtn"
    assert recipe.quantize.scheme_for("model.layers.0.self_attn.q_proj") is None


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_pages_name_only_shipped_recipes(page):
    shipped = {p.name for p in (ROOT / "recipes").rglob("*.yaml")}
    named = set(re.findall(r"recipes/([\w/-]+\.yaml)", page.read_text()))
    assert {Path(n).name for n in named} <= shipped, named


def test_readme_names_only_shipped_recipes():
    shipped = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    listed = re.search(r"`recipes/` holds ready ones\s*\((.*?)\)\.", README.read_text(), re.S).group(1)
    assert set(re.findall(r"`([\w-]+)`", listed)) == shipped


def test_allocation_reference_is_a_valid_allocation():
    section = (DOCS / "allocation.md").read_text().split("## Bit allocation", 1)[1]
    block = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    recipe = parse_recipe({"name": "a", "model": {"name": "m"}, **block}, source="README.md")
    assert recipe.allocation.budget == 3.5 and recipe.allocation.rules[1].schemes[0].name == "int8-pc-rtn"
    assert recipe.allocation.sweep.budgets[:2] == [2.5, 2.75]
