"""The shipped recipes: every one loads, and each recipe that claims a paper's setting equals the
official scripts' values (recipes/paper/official.yaml), after `base:` and the method's defaults."""
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from fasttrain.recipe import load_recipe, objective

PAPER = REPO / "recipes" / "paper"
OFFICIAL = yaml.safe_load((PAPER / "official.yaml").read_text())


def effective(recipe, key: str):
    """A dotted key's value as the run uses it: the loss's temperatures after the method's defaults."""
    if key in ("loss.temperature", "loss.base_temperature"):
        return getattr(objective(recipe), key.split(".")[1])
    value = recipe.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml")
                                        if not p.name.startswith("_") and p.name != "official.yaml"), ids=str)
def test_every_shipped_recipe_loads(path):
    assert load_recipe(REPO / path).method


def test_every_paper_recipe_has_its_official_table_and_a_row_in_the_docs():
    recipes = {p.name for p in PAPER.glob("*.yaml") if p.name != "official.yaml"}
    assert recipes == set(OFFICIAL)
    docs = (REPO / "docs" / "reproduce.md").read_text()
    assert all(f"recipes/paper/{name}" in docs for name in recipes)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_a_paper_recipe_follows_the_official_script(name):
    recipe = load_recipe(PAPER / name)
    table = OFFICIAL[name]
    assert table["paper"] and table["source"]
    differ = {key: (effective(recipe, key), want) for key, want in table["values"].items()
              if effective(recipe, key) != (list(want) if isinstance(want, tuple) else want)}
    assert not differ, f"{name}: recipe value vs official: {differ}"


TABLE1 = PAPER / "selfcon_table1"
T1 = yaml.safe_load((TABLE1 / "official.yaml").read_text())
T1_CELLS = [(d, a, m) for d in T1["datasets"] for a in T1["archs"] for m in T1["methods"]]
T1_ELSEWHERE = {("cifar100", "r18", "selfcon"): PAPER / "selfcon_cifar100_r18.yaml",
                ("cifar100", "r18", "supcon"): PAPER / "supcon_cifar100_r18.yaml"}


def table1_recipe(cell) -> Path:
    return T1_ELSEWHERE.get(cell, TABLE1 / f"{'_'.join(cell)}.yaml")


@pytest.mark.parametrize("cell", T1_CELLS, ids="_".join)
def test_every_cell_of_selfcon_table1_follows_the_official_scripts(cell):
    dataset, arch, method = cell
    want = {**T1["ce" if method == "ce" else "represent"], **T1["datasets"][dataset], **T1["archs"][arch],
            **T1["methods"][method]}
    recipe = load_recipe(table1_recipe(cell))
    assert recipe.method == method
    differ = {key: (effective(recipe, key), value) for key, value in want.items() if effective(recipe, key) != value}
    assert not differ, f"{cell}: recipe value vs official: {differ}"


def test_selfcon_table1_has_one_recipe_and_one_docs_row_per_cell():
    files = {p.name for p in TABLE1.glob("*.yaml") if not p.name.startswith("_") and p.name != "official.yaml"}
    assert files == {table1_recipe(cell).name for cell in T1_CELLS if cell not in T1_ELSEWHERE}
    docs = (REPO / "docs" / "reproduce.md").read_text()
    for cell in T1_CELLS:
        row = next((line for line in docs.splitlines() if str(table1_recipe(cell).relative_to(REPO)) in line), "")
        assert T1["paper"][cell[0]][cell[1]][cell[2]] in row, f"{cell}: no docs row with the paper's number"


def test_the_conformance_check_sees_a_drift(tmp_path):
    drifted = tmp_path / "x.yaml"
    drifted.write_text(f"base: {PAPER / 'selfcon_cifar100_r18.yaml'}\noptim: {{exclude_bn_bias: true}}\n")
    recipe = load_recipe(drifted)
    assert effective(recipe, "optim.exclude_bn_bias") != OFFICIAL["selfcon_cifar100_r18.yaml"]["values"][
        "optim.exclude_bn_bias"]
    assert Path(drifted).is_file()


def test_each_method_defaults_to_its_official_temperatures():
    from fasttrain.methods import Objective, get_method
    temps = {m: (Objective(get_method(m)).temperature, Objective(get_method(m)).base_temperature)
             for m in ("supcon", "selfcon", "cds", "simclr", "mixco")}
    assert temps == {"supcon": (0.1, 0.07), "selfcon": (0.1, 0.07), "cds": (0.07, 0.07), "simclr": (0.5, 0.5),
                     "mixco": (0.5, 0.5)}
    assert Objective(get_method("mixco")).options["mix_temperature"] == 0.5
    assert Objective(get_method("simclr"), temperature=0.2).base_temperature == 0.2  # NT-Xent: no rescaling


def test_a_per_process_contrast_reads_no_other_process(monkeypatch):
    """loss.gather: false: each process's loss is the loss of its own batch, with no collective."""
    import torch
    import torch.nn.functional as F

    import fasttrain.losses as losses
    features = F.normalize(torch.randn(6, 2, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    alone = losses.supcon_loss(features, labels)
    monkeypatch.setattr(losses, "_world", lambda: (2, 1))  # as process 1 of 2
    monkeypatch.setattr(losses.dist, "all_reduce", lambda *a, **k: (_ for _ in ()).throw(AssertionError("reduced")))
    assert losses.supcon_loss(features, labels, gather=False) == alone
    with pytest.raises(Exception):  # the gathering form does need the other process
        losses.supcon_loss(features, labels, gather=True)


def test_linear_evaluation_steps_at_its_milestones():
    from fasttrain.engine.linear_eval import _factor
    from fasttrain.recipe import LinearEvalConfig
    cfg = LinearEvalConfig(epochs=10, milestones=[6, 8], gamma=0.1)
    factors = [_factor(cfg, u, 100, 10) for u in range(100)]
    assert factors[59] == 1 and factors[60] == pytest.approx(0.1) and factors[80] == pytest.approx(0.01)
    assert _factor(LinearEvalConfig(epochs=10), 50, 100, 10) == pytest.approx(0.5)  # the cosine by default


@pytest.mark.parametrize("overrides,message", [
    (["loader=ffcv", "data.augment=simclr"], "data.augment=simclr: loader=ffcv does not make the simclr augmentation"),
    (["loader=dali", "data.progressive={min_size: 160}"], "data.progressive: read only by loader=ffcv"),
    (["loader=torchvision", "data.progressive={min_size: 160}"], "data.progressive: read only by loader=ffcv"),
    (["loader=dali", "method=cds", "model.exits=[layer1]", "model.exit_kind=sepconv",
      "data.view_augments=[padcrop_cutout, padcrop_contrastive]"],
     "loader=dali does not make the padcrop_contrastive, padcrop_cutout augmentation"),
])
def test_a_backend_is_refused_at_load_time_what_it_cannot_make(overrides, message):
    from fasttrain.recipe import RecipeError
    with pytest.raises(RecipeError, match=message):
        load_recipe(REPO / "recipes" / "demo_selfcon.yaml", overrides)
