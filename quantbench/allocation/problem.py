"""The allocation problem: items (a layer, or layers that must share a scheme), each with options (a
candidate scheme with its predicted cost, storage and latency), a bit budget and an optional latency
budget. Built from a sensitivity table and the recipe's constraints; solved by ilp.py or baselines.py."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from quantbench.allocation.table import SensitivityTable
from quantbench.errors import QuantbenchError
from quantbench.recipe import KEEP
from quantbench.scheme import Scheme

DEFAULT_TIES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))




@dataclass(frozen=True)
class Option:
    scheme: str
    cost: float
    bits: int  # storage of all the item's layers, scales included
    latency: float = 0.0
    family: str = ""  # the kind of kernel that serves it (Scheme.family; "dense" for kept layers)


@dataclass
class Item:
    name: str
    layers: list[str]
    numel: int
    options: list[Option]
    block: str = ""  # the decoder block its layers belong to


@dataclass(frozen=True)
class Rule:
    """Constraints on the layers whose name matches `pattern`: the schemes they may take, and bounds on
    their bits per weight (scales counted)."""

    pattern: str
    schemes: tuple[str, ...] | None = None
    min_bits: float | None = None
    max_bits: float | None = None

    def allows(self, layer: str, scheme: str, bits_per_weight: float) -> bool:
        if not re.search(self.pattern, layer):
            return True
        return ((self.schemes is None or scheme in self.schemes)
                and (self.min_bits is None or bits_per_weight >= self.min_bits - 1e-9)
                and (self.max_bits is None or bits_per_weight <= self.max_bits + 1e-9))


@dataclass
class Problem:
    items: list[Item]
    max_bits: float  # total storage allowed, in bits
    max_latency: float | None = None
    metric: str = ""
    budget: dict = field(default_factory=dict)  # as the user gave it
    family_per_block: bool = False  # every item of a block takes options of one family

    @property
    def numel(self) -> int:
        return sum(item.numel for item in self.items)

    def evaluate(self, choice: list[int]) -> tuple[float, int, float]:
        """Total cost, bits and latency of choosing option `choice[i]` for item i."""
        options = [item.options[c] for item, c in zip(self.items, choice)]
        return (sum(o.cost for o in options), sum(o.bits for o in options), sum(o.latency for o in options))

    def feasible(self, choice: list[int]) -> bool:
        _, bits, latency = self.evaluate(choice)
        return (bits <= self.max_bits * (1 + 1e-6) and (self.max_latency is None or latency <= self.max_latency + 1e-9)
                and (not self.family_per_block or self.families_agree(choice)))

    def families_agree(self, choice: list[int]) -> bool:
        """Whether every block's items take options of one family."""
        families: dict[str, set[str]] = {}
        for item, c in zip(self.items, choice):
            families.setdefault(item.block, set()).add(item.options[c].family)
        return all(len(f) == 1 for f in families.values())

    def smallest_bits(self) -> int:
        return sum(min(o.bits for o in item.options) for item in self.items)


EXPERT = re.compile(r"\.experts\.\d+$")


def tie_groups(layers: list[str], ties=DEFAULT_TIES) -> list[list[str]]:
    """Layers that must share a scheme: those of one parent module whose last name component is in one tie
    set (q/k/v of one attention, gate/up of one MLP); every other layer alone. A tie set holding "experts"
    makes the experts of a block one item per projection (all gate/up, all down) instead of free items.
    Order follows `layers`."""
    tie_experts = any("experts" in members for members in ties)
    groups: dict[tuple, list[str]] = {}
    for layer in layers:
        parent, _, leaf = layer.rpartition(".")
        tie = next((i for i, members in enumerate(ties) if leaf in members), None)
        if tie_experts and EXPERT.search(parent):
            groups.setdefault((EXPERT.sub(".experts", parent), tie if tie is not None else leaf), []).append(layer)
        else:
            groups.setdefault((parent, tie) if tie is not None else (layer,), []).append(layer)
    return list(groups.values())


def block_of(name: str) -> str:
    """The decoder block a layer belongs to: its name up to the first numeric component."""
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[:digits[0] + 1]) if digits else name


def family_of(scheme: str) -> str:
    """A candidate's format family; a name that is not a scheme (tables built by hand) is its own family."""
    if scheme == KEEP:
        return "dense"
    try:
        return Scheme.parse(scheme).family
    except QuantbenchError:
        return scheme


def latency_per_weight(scheme: str, table: dict[str, float]) -> float:
    """µs per million weights of a scheme: the first table key (a regex) found in the scheme name."""
    for pattern, value in table.items():
        if re.search(pattern, scheme):
            return value
    raise QuantbenchError(f"no latency entry matches candidate {scheme!r}; add a key for it to "
                          f"allocation.latency.table (keys are regexes searched in scheme names)")


def latency_key(scheme: str) -> str:
    """The key (an anchored regex) a measured latency table files a scheme's kernel under: activation order
    changes the codes, not the stored layout, so the key also matches the `-act` and `-act-static` variants."""
    if scheme == KEEP:
        return f"^{KEEP}$"
    kernel = Scheme.parse(scheme).model_copy(update={"act_order": False, "static_groups": False}).name
    return f"^{re.escape(kernel)}(?:\\-act)?(?:\\-static)?$"


def build_problem(table: SensitivityTable, metric: str, budget_bits: float | None = None,
                  budget_bytes: float | None = None, ties=DEFAULT_TIES, rules: list[Rule] = (),
                  latency_table: dict[str, float] | None = None, max_latency: float | None = None,
                  family_per_block: bool = False) -> Problem:
    """Items from the table (tied layers merged: costs, bits and latencies add up), options filtered by the
    rules; the budget as average bits per weight over the allocated layers or as total bytes (kept layers
    counted as stored); `family_per_block` asks one format family per decoder block."""
    if (budget_bits is None) == (budget_bytes is None):
        raise QuantbenchError("give the budget either as average bits per weight or as bytes, not both")
    items = []
    for layers in tie_groups(list(table.layers), ties):
        numel = sum(table.layers[layer].numel for layer in layers)
        shared = [s for s in table.candidates if all((layer, s) in table.errors for layer in layers)]
        options = []
        for scheme in shared:
            bits = sum(table.errors[(layer, scheme)].storage_bits for layer in layers)
            if not all(rule.allows(layer, scheme, table.errors[(layer, scheme)].storage_bits / table.layers[layer].numel)
                       for rule in rules for layer in layers):
                continue
            latency = latency_per_weight(scheme, latency_table) * numel / 1e6 if latency_table else 0.0
            options.append(Option(scheme, sum(table.cost(layer, scheme, metric) for layer in layers), bits, latency,
                                  family_of(scheme)))
        if not options:
            raise QuantbenchError(f"no candidate is allowed for {', '.join(layers)}: the allocation rules exclude "
                                  f"every one of {', '.join(shared) or 'the candidates'}; relax the rules")
        items.append(Item("+".join(layers), layers, numel, options, block_of(layers[0])))
    total = sum(item.numel for item in items)
    max_bits = budget_bits * total if budget_bits is not None else budget_bytes * 8
    budget = {"bits_per_weight": budget_bits} if budget_bits is not None else {"bytes": budget_bytes}
    if max_latency is not None:
        budget["latency_us"] = max_latency
    if family_per_block:
        budget["family_per_block"] = True
    return Problem(items, max_bits, max_latency, metric, budget, family_per_block)
