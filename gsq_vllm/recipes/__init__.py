"""The recipes shipped with gsq-vllm (``*.yaml`` beside this file), and editing recipes.

One owner for recipe facts: which modifiers count as quantization methods, where the shipped
recipes live (package data, so a non-editable install finds them; the repository's
``recipes/`` links here), and how the command line and the benchmarks change bits, group size
and modifier options. No heavy import: the command line lists recipes in its ``--help``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["MODIFIERS", "RECIPES_DIR", "recipe_names", "resolve_recipe", "load_recipe", "uses_modifier", "set_modifier_options",
           "edit_recipe", "recipe_summary"]

RECIPES_DIR = Path(__file__).resolve().parent
# quantization modifiers a recipe may use, and the method name each stands for
MODIFIERS = {"GSQModifier": "gsq", "GPTQModifier": "gptq", "AutoRoundModifier": "autoround", "QuantizationModifier": "rtn"}


def recipe_names() -> list[str]:
    """The recipes shipped with the package (``gsq_vllm/recipes/*.yaml``), by name."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe by name (``gsq_w2a16_g64``) from the shipped recipes, or a YAML path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"recipe {name_or_path!r} is neither a file nor one of: {', '.join(recipe_names())}")


def _modifiers(recipe: dict, quantization_only: bool = True):
    """(modifier name, its options) of every (quantization) modifier in a recipe, in order."""
    for stage in recipe.values():
        for group in stage.values():
            for modifier_name, options in group.items():
                if modifier_name in MODIFIERS or not quantization_only:
                    yield modifier_name, options


def uses_modifier(recipe: dict, modifier_name: str) -> bool:
    """Whether any stage of the recipe runs ``modifier_name``."""
    return any(name == modifier_name for name, _ in _modifiers(recipe, quantization_only=False))


def set_modifier_options(recipe: dict, modifier_name: str, **options) -> dict:
    """Set options (those not None) of every ``modifier_name`` in a recipe; refuse a recipe without one."""
    found = False
    for name, existing in _modifiers(recipe, quantization_only=False):
        if name == modifier_name:
            found = True
            existing.update({key: value for key, value in options.items() if value is not None})
    if not found and any(value is not None for value in options.values()):
        raise ValueError(f"the recipe has no {modifier_name} to set {sorted(options)} on")
    return recipe


def edit_recipe(recipe: dict, bits: int | str | None = None, group_size: int | None = None, **gsq_options) -> dict:
    """Override the bit width and group size of every quantization modifier, and GSQ's options.

    ``bits="ternary"`` sets ``num_bits: 2`` and, for GSQ, ``grid: ternary``.
    """
    found = False
    for modifier_name, options in _modifiers(recipe):
        found = True
        if modifier_name == "GSQModifier":
            options.update({key: value for key, value in gsq_options.items() if value is not None})
        if bits == "ternary":
            if modifier_name != "GSQModifier":
                raise ValueError(f"{modifier_name} cannot target the ternary grid; only GSQModifier can")
            options["grid"] = "ternary"
        elif bits is not None and modifier_name == "GSQModifier":
            options["grid"] = "auto"
        if (bits is not None or group_size is not None) and not options.get("config_groups"):
            raise ValueError(f"{modifier_name} in the recipe has no `config_groups` to set the bits or group size "
                             "in (a `scheme` preset cannot be edited); write the recipe with config_groups")
        for scheme in (options.get("config_groups") or {}).values():
            weights = scheme.get("weights") or {}
            if bits is not None:
                weights["num_bits"] = 2 if bits == "ternary" else int(bits)
            if group_size is not None:
                weights["group_size"] = int(group_size)
    if not found:
        raise ValueError(f"the recipe names none of {', '.join(MODIFIERS)}")
    return recipe


_PRESET = re.compile(r"^W(\d+)A\d+$")


def _first_weights(modifier_name: str, options: dict) -> dict:
    """The ``weights`` of a quantization modifier's first config group (or of its scheme preset, e.g.
    ``W4A16``), or an error naming what the recipe lacks."""
    groups = options.get("config_groups") or {}
    if groups:
        group_name, group = next(iter(groups.items()))
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise ValueError(f"{modifier_name}: config group {group_name!r} has no `weights` entry "
                             "(num_bits, type, symmetric, strategy, group_size)")
        return group["weights"]
    preset = _PRESET.match(str(options.get("scheme", "")))
    if preset:
        return {"num_bits": int(preset.group(1)), "group_size": None}
    raise ValueError(f"{modifier_name} in the recipe has neither `config_groups` nor a `scheme` preset (such as "
                     "W4A16): nothing says which bits to quantize to. Add config_groups: {group_0: {targets: [Linear], "
                     "weights: {num_bits: 3, type: int, symmetric: true, strategy: group, group_size: 64}}}")


def recipe_summary(recipe: dict) -> dict:
    """method, bits, group size and grid of the (first) quantization modifier in a recipe."""
    for modifier_name, options in _modifiers(recipe):
        weights = _first_weights(modifier_name, options)
        method = MODIFIERS[modifier_name]
        grid = options.get("grid", "auto") if method == "gsq" else "auto"
        return {"method": method, "bits": "ternary" if grid == "ternary" else weights["num_bits"],
                "group_size": weights.get("group_size")}
    raise ValueError("the recipe names no quantization modifier")


def load_recipe(name_or_path: str | os.PathLike) -> dict:
    """A recipe (by name or path) as a mapping, with a clear error for bad YAML."""
    import yaml

    path = resolve_recipe(name_or_path)
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping of stages")
    return recipe
